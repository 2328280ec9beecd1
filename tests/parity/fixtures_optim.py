"""AdamW and gradient clipping reference: torch.optim.AdamW and clip_grad_norm_ on fixed
gradients, several steps, so the Rust optimizer can be compared update by update."""
import pathlib

import torch
from safetensors.torch import save_file


def main(out: pathlib.Path) -> None:
    torch.manual_seed(0)
    shapes = [(4, 8), (8,), (3, 5)]
    params = [torch.randn(s) for s in shapes]
    tensors = {f"init.{i}": p.clone() for i, p in enumerate(params)}
    live = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(live, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(6):
        grads = [torch.randn(s) * (10.0 if step == 2 else 1.0) for s in shapes]
        for i, (p, g) in enumerate(zip(live, grads)):
            p.grad = g.clone()
            tensors[f"grad.{step}.{i}"] = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(live, 5.0)
        tensors[f"norm.{step}"] = norm.reshape(1).clone()
        opt.step()
        for i, p in enumerate(live):
            tensors[f"after.{step}.{i}"] = p.detach().clone()
    save_file(tensors, str(out / "adamw.safetensors"))
