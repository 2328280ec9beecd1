"""DDIM fixtures: diffusers DDIMScheduler as SD1.5's scheduler_config.json sets it up, plus one
config exercising the other options (trailing spacing, v-prediction, clipping)."""
import json
import pathlib

import torch
from diffusers import DDIMScheduler
from safetensors.torch import save_file

SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

OTHER = {
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "timestep_spacing": "trailing",
    "prediction_type": "v_prediction",
    "clip_sample": True,
    "clip_sample_range": 1.5,
    "set_alpha_to_one": True,
}


def build(name: str, config: dict, out_dir: pathlib.Path) -> None:
    (out_dir / f"{name}_scheduler_config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for n in (50, 10):
        sched = DDIMScheduler.from_config(config)
        sched.set_timesteps(n)
        tensors[f"timesteps_{n}"] = sched.timesteps.clone().to(torch.int64)
        tensors["alphas_cumprod"] = sched.alphas_cumprod.clone()
        ts = sched.timesteps.tolist()
        for t in (ts[0], ts[len(ts) // 2], ts[-1]):
            g = torch.Generator().manual_seed(1000 * n + t)
            eps = torch.randn(2, 4, 8, 8, generator=g)
            sample = torch.randn(2, 4, 8, 8, generator=g)
            noise = torch.randn(2, 4, 8, 8, generator=g)
            tensors[f"n{n}_t{t}_eps"] = eps
            tensors[f"n{n}_t{t}_sample"] = sample
            tensors[f"n{n}_t{t}_noise"] = noise
            for eta in (0.0, 1.0):
                out = sched.step(eps, t, sample, eta=eta, variance_noise=noise if eta > 0 else None)
                tensors[f"n{n}_t{t}_eta{int(eta)}_prev"] = out.prev_sample
                tensors[f"n{n}_t{t}_eta{int(eta)}_x0"] = out.pred_original_sample
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    noise = torch.randn(5, 4, 8, 8, generator=g)
    steps = torch.tensor([0, 1, 500, 981, 999])
    tensors["add_noise_x0"] = x0
    tensors["add_noise_noise"] = noise
    tensors["add_noise_timesteps"] = steps
    tensors["add_noise_out"] = DDIMScheduler.from_config(config).add_noise(x0, noise, steps)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"{name}.safetensors"))


def main(out_dir: pathlib.Path) -> None:
    torch.manual_seed(0)
    build("sd15", SD15, out_dir)
    build("other", OTHER, out_dir)
