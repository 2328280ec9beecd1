//! Mixed precision on the miniature random world (`tests/parity/fixtures_world.py`): a bf16
//! fine-tune (frozen models in bf16, LoRA, teacher and optimizer in fp32) runs on the CPU, stays
//! close to the fp32 one, and an fp32 stage is what it always was. The memory estimate of
//! `plan` is filled in for the stages that load models.
use std::path::Path;

use ril_pipe::exec::filehash::FileHasher;
use ril_pipe::exec::plan::plan;
use ril_pipe::exec::launch::Outcome;
use ril_pipe::exec::{run, Cache, RunOptions};
use ril_pipe::pipeline::{load_resolved, ResolvedPipeline};
use ril_pipe::records::{EvaluationRecord, TrainLogLine};
use ril_pipe::stages::registry;
use tch::Kind;
use crate::support::{object, tensors, world};

const STAGES: &str = r#"
  - id: ft/${precision}
    kind: finetune
    matrix: {precision: [fp32, bf16]}
    inputs: {model: base}
    params: {task: aesthetic, method: rid, precision: "${precision}"}
  - id: eval/${precision}
    kind: evaluate
    matrix: {precision: [fp32, bf16]}
    inputs: {model: "ft/fp32"}
    params: {precision: "${precision}"}
"#;

fn pipeline(dir: &Path) -> ResolvedPipeline {
    let text = format!(
        r#"
defaults:
  finetune: {{epochs: 1, prompts_per_epoch: 4, batch_size: 2, micro_batch: 1, lr: 1.0e-2, ddim_steps: 3, guidance: 2.0, lora_rank: 2}}
  evaluate: {{images_per_prompt: 2, ddim_steps: 3, guidance: 2.0, batch_size: 4}}
stages:
  - id: base
    kind: tiny_world
    params: {{root: "{root}"}}
{STAGES}"#,
        root = world("random").display()
    );
    let path = dir.join("p.yaml");
    std::fs::write(&path, text).unwrap();
    load_resolved(&path, &registry().schemas(), &[]).unwrap()
}

fn train_log(dir: &Path) -> Vec<TrainLogLine> {
    std::fs::read_to_string(dir.join("train_log.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_bf16_finetune_keeps_fp32_adapters_and_stays_close_to_fp32() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path());
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(cache_dir.path());
    let summary = run(&p, &registry(), &cache, &RunOptions::default()).unwrap();
    for o in &summary.outcomes {
        if let Outcome::Failed { error, log } = &o.outcome {
            let log = log.as_ref().and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default();
            panic!("stage {} failed: {error}\n{log}", o.id);
        }
    }
    let (fp32_dir, bf16_dir) = (object(&p, &cache, "ft/fp32"), object(&p, &cache, "ft/bf16"));
    let (fp32, bf16) = (tensors(&fp32_dir.join("adapters.safetensors")), tensors(&bf16_dir.join("adapters.safetensors")));
    let teacher = tensors(&bf16_dir.join("teacher.safetensors"));
    assert_eq!(fp32.keys().collect::<Vec<_>>(), bf16.keys().collect::<Vec<_>>());
    // Adapters and the EMA teacher stay fp32 (the scales are f64).
    for (name, t) in bf16.iter().chain(&teacher).filter(|(n, _)| n.as_str() != "lora_scales") {
        assert_eq!(t.kind(), Kind::Float, "{name}");
    }
    // The training moved B away from zero in both precisions, by nearly the same amounts: the
    // bf16 update differs from the fp32 one by a small fraction of the update itself. (Element
    // by element the difference can reach 2 lr: AdamW's first steps move every element by about
    // lr times the sign of its gradient, and a gradient near zero may flip sign in bf16.)
    let (mut diff, mut norm, mut dsq, mut nsq, mut agree, mut count) = (0.0f64, 0.0f64, 0.0, 0.0, 0.0, 0.0);
    for (name, a) in fp32.iter().filter(|(n, _)| n.contains(".lora_B.")) {
        let b = &bf16[name];
        diff = diff.max((a - b).abs().max().double_value(&[]));
        norm = norm.max(a.abs().max().double_value(&[]));
        dsq += (a - b).square().sum(Kind::Double).double_value(&[]);
        nsq += a.square().sum(Kind::Double).double_value(&[]);
        agree += (a * b).gt(0.0).sum(Kind::Double).double_value(&[]);
        count += a.numel() as f64;
    }
    println!("bf16 vs fp32 fine-tune: max |B_bf16 - B_fp32| = {diff:.3e}, max |B_fp32| = {norm:.3e}, ratio {:.3}; relative Frobenius {:.3}; same sign {:.3}", diff / norm, (dsq / nsq).sqrt(), agree / count);
    assert!(norm > 1e-4, "the fp32 fine-tune did not move B");
    assert!(diff > 0.0, "bf16 changed nothing: the precision was not applied");
    let relative = (dsq / nsq).sqrt();
    assert!(relative < 0.10, "bf16 adapters differ from the fp32 ones by {relative} (relative Frobenius)");
    assert!(agree / count > 0.95, "only {} of the B elements moved the same way", agree / count);
    assert!(diff <= 2.0 * 1e-2 * 2.0 + 1e-6, "an element moved further than two AdamW steps: {diff}");
    // Finite rewards, losses and gradients at every step, in both precisions; close rewards.
    let (log32, log16) = (train_log(&fp32_dir), train_log(&bf16_dir));
    assert_eq!(log32.len(), log16.len());
    for (a, b) in log32.iter().zip(&log16) {
        assert!(b.reward.is_finite() && b.loss.is_finite() && b.grad_norm.is_finite() && b.grad_norm > 0.0, "{b:?}");
        println!("step {}: reward fp32 {:.6} bf16 {:.6}, grad norm fp32 {:.4e} bf16 {:.4e}", a.step, a.reward, b.reward, a.grad_norm, b.grad_norm);
        assert!((a.reward - b.reward).abs() <= 0.02 * a.reward.abs().max(1e-3), "step {}: {} vs {}", a.step, a.reward, b.reward);
        assert!((a.grad_norm - b.grad_norm).abs() <= 0.02 * a.grad_norm, "step {}: gradient norm {} vs {}", a.step, a.grad_norm, b.grad_norm);
    }
    // Evaluating the same model in bf16 gives nearly the fp32 metrics.
    let metrics = |id: &str| EvaluationRecord::read(&object(&p, &cache, id).join("metrics.json")).unwrap().metrics;
    let (m32, m16) = (metrics("eval/fp32"), metrics("eval/bf16"));
    for (m, v) in &m32 {
        println!("{m:?}: fp32 {v:.5} bf16 {:.5}", m16[m]);
        assert!((m16[m] - v).abs() <= 0.02 * v.abs().max(1e-3), "{m:?}: bf16 {} vs fp32 {v}", m16[m]);
    }
    let log = std::fs::read_to_string(bf16_dir.join("log.txt")).unwrap();
    assert!(log.contains("bf16 frozen models") && log.contains("estimated peak memory"), "{log}");
}

#[test]
fn plan_estimates_the_peak_memory_of_model_stages() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path());
    let cache_dir = tempfile::tempdir().unwrap();
    let pl = plan(&p, &registry(), &Cache::new(cache_dir.path()), &FileHasher::ephemeral()).unwrap();
    let peak = |id: &str| pl.stages.iter().find(|s| s.stage.id == id).unwrap().estimate.peak_memory_bytes;
    let (ft32, ft16) = (peak("ft/fp32").unwrap(), peak("ft/bf16").unwrap());
    // Half precision halves every tensor of the frozen models; the fixed allowance stays.
    let allowance = ril_pipe::stages::memory::WORKSPACE_BYTES;
    assert!(ft16 < ft32 && ft16 - allowance > (ft32 - allowance) / 3, "{ft16} vs {ft32}");
    assert!(peak("eval/fp32").unwrap() > allowance);
    assert_eq!(peak("base"), None);
}
