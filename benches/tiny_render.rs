//! Throughput of the tiny world's scene sampling, rendering and batching
//! (`cargo bench --bench tiny_render`; add `--profile dev` for the unoptimised build the
//! pipeline runs). Reports thread CPU time where Linux provides it, since wall time on a
//! shared machine mostly measures the other processes.
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use ril_pipe::tiny::{random_caption_spec, render, sample_scene_for, to_chw_batch};

/// Seconds this thread has run on a CPU (Linux), else wall-clock seconds since `start`.
fn seconds(start: Instant) -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or_else(|| start.elapsed().as_secs_f64(), |ns| ns * 1e-9)
}

/// Best of five timings of `work`, in seconds.
fn time(mut work: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            let t0 = seconds(start);
            work();
            seconds(start) - t0
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    const N: usize = 2000;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let scenes: Vec<_> = (0..N)
        .map(|_| {
            let spec = random_caption_spec(&mut rng);
            sample_scene_for(&spec, &mut rng)
        })
        .collect();
    let images: Vec<_> = scenes.iter().map(render).collect();

    let render_s = time(|| {
        for scene in &scenes {
            std::hint::black_box(render(scene));
        }
    });
    let sample_s = time(|| {
        for _ in 0..N {
            let spec = random_caption_spec(&mut rng);
            std::hint::black_box(sample_scene_for(&spec, &mut rng));
        }
    });
    let batch_s = time(|| {
        std::hint::black_box(to_chw_batch(&images).map(|b| b.data.len()).unwrap_or(0));
    });
    println!(
        "render: {:.0} images/s; sample: {:.0} scenes/s; NCHW batch: {:.0} images/s",
        N as f64 / render_s,
        N as f64 / sample_s,
        N as f64 / batch_s,
    );
}
