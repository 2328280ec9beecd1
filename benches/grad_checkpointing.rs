//! What gradient checkpointing (`grad_checkpointing: true`) saves and costs on the CPU: the peak
//! resident set and the time of one training update of `ril-pipe bench-step`, with the decode
//! and the reward in one graph and chunk by chunk (one image at a time), for the baseline and
//! RID. The models: the SD1.5 VAE config (the memory hog) at 64x64 pixels, a tiny UNet and a
//! tiny CLIP image tower (`benches/configs/`), random weights, fp32, micro-batch 4. Each
//! measurement runs in its own process, so that its peak is its own.
//!
//! `cargo bench --profile dev --bench grad_checkpointing`
use std::path::Path;
use std::process::Command;

const MICRO: &str = "4";

fn run(method: &str, checkpointing: bool) -> serde_json::Value {
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs");
    let threads = std::env::var("RIL_BENCH_THREADS").unwrap_or_else(|_| "2".into());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ril-pipe"));
    cmd.args(["bench-step", "--vae", "sd15", "--resolution", "64", "--micro", MICRO, "--precision", "fp32", "--device", "cpu"]);
    cmd.args(["--warmup", "1", "--steps", "3", "--threads", &threads, "--method", method]);
    cmd.arg("--unet").arg(configs.join("tiny_unet.json")).arg("--clip").arg(configs.join("tiny_clip_vision.json"));
    if checkpointing {
        cmd.args(["--checkpointing", "--decode-chunk", "1"]);
    }
    let out = cmd.output().expect("run ril-pipe bench-step");
    assert!(out.status.success(), "bench-step failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

fn main() {
    println!("gradient checkpointing on the CPU: SD1.5 VAE at 64x64 pixels, micro-batch {MICRO}, fp32, median of 3 updates");
    println!("{:9} {:>16} {:>14} {:>16} {:>14}", "method", "peak RSS whole", "peak RSS ckpt", "time whole (ms)", "time ckpt (ms)");
    for method in ["baseline", "rid"] {
        let whole = run(method, false);
        let ckpt = run(method, true);
        let mb = |v: &serde_json::Value| v["peak_memory_bytes"].as_f64().map_or("-".into(), |b| format!("{:.0} MB", b / 1e6));
        let ms = |v: &serde_json::Value| v["median_s"].as_f64().unwrap_or(f64::NAN) * 1e3;
        let (w, c) = (whole["peak_memory_bytes"].as_f64(), ckpt["peak_memory_bytes"].as_f64());
        println!("{method:9} {:>16} {:>14} {:>16.0} {:>14.0}", mb(&whole), mb(&ckpt), ms(&whole), ms(&ckpt));
        if let (Some(w), Some(c)) = (w, c) {
            println!("          checkpointing: peak x{:.2}, time x{:.2}; estimate {} -> {}", c / w, ms(&ckpt) / ms(&whole), whole["estimate"].as_str().unwrap_or("-").split(" (").next().unwrap_or("-"), ckpt["estimate"].as_str().unwrap_or("-").split(" (").next().unwrap_or("-"));
        }
    }
}
