//! How much of the aesthetic rating and of each of its eight factors a CLIP's image embedding
//! carries linearly: a least-squares fit (with bias) of each on the embeddings of 10,240
//! training renders, its Pearson r on those and on 20 renders of each test prompt (the aesthetic
//! gate's renders, `GATE_RENDER_SEED`). The aesthetic head is linear in the embedding (LAION
//! layout, no activations), so the rating's test r bounds what the head can reach.
//!
//! `cargo run --release --example embedding_probe -- CLIP_DIR TOKENIZER_DIR TEST_PROMPTS`, e.g.
//! `tiny/weights/clip tiny/weights/diffusion/tokenizer tiny/weights/prompts/test.txt`.
use std::path::PathBuf;

use anyhow::{bail, Context};
use ril_pipe::rewards::clip_loader::{ClipFiles, ClipLayout, FrozenClip};
use ril_pipe::tiny::aesthetic_rating;
use ril_pipe::tiny::scene::Scene;
use ril_pipe::tiny::train::data::{factor_values, prompt_scenes, scene_batch, Excluded};
use ril_pipe::tiny::train::aesthetic::GATE_RENDER_SEED;
use ril_pipe::tiny::train::gates;
use tch::{Device, Kind, Tensor};

const NAMES: [&str; 9] = ["rating", "harmony", "composition", "contrast", "texture", "shading", "saturation", "clutter", "grain"];

/// `[N, 9]`: the rating and the eight factors of each scene.
fn targets(scenes: &[Scene]) -> Tensor {
    let values: Vec<f32> = scenes.iter().flat_map(|s| std::iter::once(aesthetic_rating(s)).chain(factor_values(s))).collect();
    Tensor::from_slice(&values).view([-1, NAMES.len() as i64])
}

fn with_bias(x: &Tensor) -> Tensor {
    Tensor::cat(&[x, &Tensor::ones([x.size()[0], 1], (Kind::Float, x.device()))], 1)
}

/// Pearson r of two columns.
fn pearson(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let values = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double));
    Ok(gates::pearson(&values(a)?, &values(b)?))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [clip_dir, tokenizer, test_file] = args.as_slice() else {
        bail!("usage: embedding_probe CLIP_DIR TOKENIZER_DIR TEST_PROMPTS");
    };
    let device = Device::Cpu;
    let files = ClipFiles { layout: ClipLayout::Transformers, weights: PathBuf::from(clip_dir), config: None, tokenizer: PathBuf::from(tokenizer) };
    let clip = FrozenClip::load(&files, device, Kind::Float)?;
    let test: Vec<String> = std::fs::read_to_string(test_file).with_context(|| format!("reading {test_file}"))?.lines().map(String::from).collect();
    let excluded = Excluded::new(&test);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for step in 0..40 {
        let batch = scene_batch(0, 4, step, 256, &excluded, device)?;
        xs.push(tch::no_grad(|| clip.image_embeddings(&batch.images))?);
        ys.push(targets(&batch.scenes));
    }
    let (x, y) = (with_bias(&Tensor::cat(&xs, 0)), Tensor::cat(&ys, 0));
    let weights = x.linalg_lstsq(&y, None::<f64>, "gelsd").0;
    let held_out = prompt_scenes(&test, 20, GATE_RENDER_SEED, device)?;
    let xt = with_bias(&tch::no_grad(|| clip.image_embeddings(&held_out.images))?);
    let yt = targets(&held_out.scenes);
    let (fit, predicted) = (x.matmul(&weights), xt.matmul(&weights));
    println!("{:12} {:>8} {:>8}", "", "train r", "test r");
    for (k, name) in NAMES.iter().enumerate() {
        let k = k as i64;
        println!("{name:12} {:8.3} {:8.3}", pearson(&fit.select(1, k), &y.select(1, k))?, pearson(&predicted.select(1, k), &yt.select(1, k))?);
    }
    Ok(())
}
