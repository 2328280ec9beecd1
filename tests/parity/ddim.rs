//! DDIM against diffusers' DDIMScheduler (SD1.5 scheduler config and a config using the other options).
use std::collections::HashMap;

use ril_pipe::models::ddim::{Ddim, DdimConfig};
use tch::Tensor;

use crate::support::{fixtures, max_abs_diff};

fn load(name: &str) -> (DdimConfig, HashMap<String, Tensor>) {
    let dir = fixtures("ddim");
    let config = DdimConfig::from_json_file(&dir.join(format!("{name}_scheduler_config.json"))).unwrap();
    let tensors = Tensor::read_safetensors(dir.join(format!("{name}.safetensors"))).unwrap();
    (config, tensors.into_iter().collect())
}

fn check(name: &str) {
    let (config, t) = load(name);
    let ours = Tensor::from_slice(&config.alphas_cumprod());
    let diff = max_abs_diff(&ours, &t["alphas_cumprod"]);
    assert!(diff < 1e-6, "{name}: alphas_cumprod differ by {diff}");
    let mut worst_step = 0.0f64;
    for n in [50usize, 10] {
        let ddim = Ddim::new(config.clone(), n).unwrap();
        let expected: Vec<i64> = Vec::try_from(&t[&format!("timesteps_{n}")]).unwrap();
        assert_eq!(ddim.timesteps(), expected.as_slice(), "{name}: timesteps for N={n}");
        let ts = ddim.timesteps();
        for step in [ts[0], ts[ts.len() / 2], ts[ts.len() - 1]] {
            let key = |s: &str| format!("n{n}_t{step}_{s}");
            let (eps, sample, noise) = (&t[&key("eps")], &t[&key("sample")], &t[&key("noise")]);
            for eta in [0i64, 1] {
                let out = ddim.step(eps, step, sample, eta as f64, Some(noise)).unwrap();
                let d_prev = max_abs_diff(&out.prev_sample, &t[&key(&format!("eta{eta}_prev"))]);
                let d_x0 = max_abs_diff(&out.pred_original_sample, &t[&key(&format!("eta{eta}_x0"))]);
                assert!(d_prev < 1e-4 && d_x0 < 1e-4, "{name} N={n} t={step} eta={eta}: {d_prev} {d_x0}");
                worst_step = worst_step.max(d_prev).max(d_x0);
            }
        }
    }
    let noisy = config.add_noise(&t["add_noise_x0"], &t["add_noise_noise"], &t["add_noise_timesteps"]).unwrap();
    let diff = max_abs_diff(&noisy, &t["add_noise_out"]);
    assert!(diff < 1e-4, "{name}: add_noise differs by {diff}");
    eprintln!("ddim {name}: max abs diff alphas_cumprod {:.2e}, step {worst_step:.2e}, add_noise {diff:.2e}", max_abs_diff(&ours, &t["alphas_cumprod"]));
}

#[test]
fn ddim_sd15_matches_diffusers() {
    check("sd15");
}

#[test]
fn ddim_other_options_match_diffusers() {
    check("other");
}

#[test]
fn ddim_step_is_differentiable() {
    let ddim = Ddim::new(DdimConfig::default(), 50).unwrap();
    let eps = Tensor::randn([1, 4, 2, 2], tch::kind::FLOAT_CPU).set_requires_grad(true);
    let sample = Tensor::randn([1, 4, 2, 2], tch::kind::FLOAT_CPU);
    let out = ddim.step(&eps, 1, &sample, 0.0, None).unwrap();
    out.prev_sample.sum(tch::Kind::Float).backward();
    assert!(eps.grad().abs().sum(tch::Kind::Float).double_value(&[]) > 0.0);
}
