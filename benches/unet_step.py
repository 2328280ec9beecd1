"""PyTorch eager counterpart of benches/unet_step.rs: one LoRA training step of a tiny diffusers
UNet (no-grad denoising calls, then one call with gradient, backward, AdamW step), timed the same
way. Usage: python benches/unet_step.py benches/unet_step.json; prints one JSON line."""
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel


class LoraLinear(torch.nn.Module):
    """W x + b + B (A x), A Kaiming-uniform, B zero (the adapter of a new task)."""

    def __init__(self, base: torch.nn.Linear, rank: int):
        super().__init__()
        self.base = base
        bound = 1.0 / base.in_features ** 0.5
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features).uniform_(-bound, bound))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B)


def add_lora(model: torch.nn.Module, rank: int, targets) -> list:
    params = []
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapper = LoraLinear(module, rank)
            if isinstance(parent, torch.nn.ModuleList):
                parent[int(child)] = wrapper
            else:
                setattr(parent, child, wrapper)
            params += [wrapper.lora_A, wrapper.lora_B]
    return params


def main() -> None:
    cfg = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg["unet"])
    unet.requires_grad_(False)
    params = add_lora(unet, cfg["rank"], cfg["targets"])
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
