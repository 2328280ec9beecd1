//! What verifying an object on read costs (`Cache::verified_object`: every file hashed with
//! blake3 against its manifest before `check`, `report`, `export`, `sample` or `lora export`
//! reads it), for the largest files a paper-scale study's readers read: the FID reference
//! statistics (`fid_stats.safetensors`, 2048 x 2048 f64, 32 MiB) and a fine-tune's adapter group
//! with its EMA teacher after three tasks at SD1.5 (about 13 MB), and a 256 MiB file for the rate.
//!
//! `cargo bench --profile dev --bench cache_verify`
use std::time::Instant;

use ril_pipe::exec::filehash::hash_file;

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    println!("blake3 of a cached file, as verification on read does it (median of 5, page cache warm):");
    for (name, bytes) in [("fid_stats.safetensors (2048^2 f64)", 32usize << 20), ("SD1.5 adapters + teacher, 3 tasks", 13_000_000), ("256 MiB", 256 << 20)] {
        let path = dir.path().join("file");
        let data: Vec<u8> = (0..bytes).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let _ = hash_file(&path).expect("hash");
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let start = Instant::now();
                hash_file(&path).expect("hash");
                start.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let t = times[2];
        println!("  {name:38} {:>8.1} MB  {:>8.1} ms  {:>7.0} MB/s", bytes as f64 / 1e6, t * 1e3, bytes as f64 / 1e6 / t);
    }
}
