"""PyTorch eager counterpart of benches/unet_step.rs: one LoRA training step of a tiny diffusers
UNet (no-grad denoising calls, then one call with gradient, backward, AdamW step), timed the same
way. Usage: python benches/unet_step.py benches/unet_step.json; prints one JSON line."""
import json
import pathlib
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
from torch_reference import adapter_parameters, wrap_lora  # noqa: E402


def main() -> None:
    cfg = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg["unet"])
    unet.requires_grad_(False)
    params = adapter_parameters(wrap_lora(unet, cfg["rank"], targets=cfg["targets"]))
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    b, s, n = cfg["batch"], cfg["latent_size"], cfg["no_grad_calls"]
    context = torch.randn(b, cfg["context_tokens"], cfg["unet"]["cross_attention_dim"])
    noise = torch.randn(b, unet.config.in_channels, s, s)
    timesteps = [torch.full((b,), 981 - 100 * k, dtype=torch.long) for k in range(n + 1)]

    def step() -> None:
        with torch.no_grad():
            x = noise
            for k in range(n):
                x = x - 0.1 * unet(x, timesteps[k], encoder_hidden_states=context).sample
        eps = unet(x, timesteps[n], encoder_hidden_states=context).sample
        loss = eps.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(cfg["warmup_steps"]):
        step()
    times = []
    for _ in range(cfg["timed_steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"median_s": statistics.median(times), "min_s": min(times), "lora_params": sum(p.numel() for p in params)}))


if __name__ == "__main__":
    main()
