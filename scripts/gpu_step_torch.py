"""PyTorch eager counterpart of `ril-pipe bench-step` (src/cli/bench_cmds.rs), for
scripts/gpu_check.sh: the same last-step training update on a diffusers UNet2DConditionModel
with random weights and a reference LoRA wrapper (as tests/parity/fixtures_unet.py), timed the
same way. Prints one JSON line.

The step: the guided last UNet call z_1 -> z_0 with gradient (the frozen UNet in --precision,
the LoRA parameters fp32 and cast to the activations' dtype for each call, as ril-pipe does), the
DDIM update in fp32 (SD1.5's schedule, t = 1 of 50 steps), the stand-in reward -mean(z_0^2), for
RID the EMA teacher's pass without gradient and 0.1 mean((z_0 - z_0^T)^2), backward, gradient
clipping at 5, AdamW (lr 1e-4, weight decay 0.1) and for RID the EMA update (momentum 0.99).
"""
import argparse
import json
import math
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
except ImportError as e:  # gpu_check.sh reports this and skips the comparison
    print(json.dumps({"side": "pytorch", "error": f"missing python package: {e.name}"}))
    sys.exit(3)

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sd15_config() -> dict:
    return dict(
        act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), center_input_sample=False,
        cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
        mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


class LoraLinear(torch.nn.Module):
    """W x + b + B (A x): A, B fp32 (Kaiming-uniform A, small random B), cast per call; an EMA
    teacher copy used while `use_teacher` is set."""

    def __init__(self, base: torch.nn.Linear, rank: int):
        super().__init__()
        self.base = base
        bound = 1.0 / math.sqrt(base.in_features)
        device = base.weight.device
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features, device=device).uniform_(-bound, bound))
        self.lora_B = torch.nn.Parameter(torch.randn(base.out_features, rank, device=device) * 1e-3)
        self.teacher = None
        self.use_teacher = False

    def forward(self, x):
        a, b = self.teacher if (self.use_teacher and self.teacher is not None) else (self.lora_A, self.lora_B)
        return self.base(x) + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))


def add_lora(model: torch.nn.Module, rank: int) -> list:
    wrappers = []
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in LORA_TARGETS):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapper = LoraLinear(module, rank)
            if isinstance(parent, torch.nn.ModuleList):
                parent[int(child)] = wrapper
            else:
                setattr(parent, child, wrapper)
            wrappers.append(wrapper)
    return wrappers


def sd15_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--unet", default="sd15", help="sd15 or a diffusers config.json")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--precision", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--method", default="baseline", choices=["baseline", "rid"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.precision]
    cfg = sd15_config() if args.unet == "sd15" else json.load(open(args.unet))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if cuda:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(device)
        baseline_used = total - free
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).to(device=device, dtype=dtype)
    unet.requires_grad_(False)
    wrappers = add_lora(unet, args.rank)
    params = [t for w in wrappers for t in (w.lora_A, w.lora_B)]
    rid = args.method == "rid"
    if rid:
        for w in wrappers:
            w.teacher = (w.lora_A.detach().clone(), w.lora_B.detach().clone())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    m, s = args.micro, args.latent
    context = lambda b: (torch.randn(b, 77, cfg["cross_attention_dim"], device=device) * 0.5).to(dtype)
    cond, uncond = context(m), context(1)
    z_1 = torch.randn(m, unet.config.in_channels, s, s, device=device)
    alphas = sd15_alphas_cumprod()
    a_t, a_prev = float(alphas[1]), float(alphas[0])
    t = torch.full((2 * m,), 1, device=device, dtype=torch.long)
    both_context = torch.cat([uncond.expand(m, -1, -1), cond])

    def last_step() -> torch.Tensor:
        out = unet(torch.cat([z_1, z_1]).to(dtype), t, encoder_hidden_states=both_context).sample.float()
        eps_u, eps_c = out.chunk(2)
        eps = eps_u + args.guidance * (eps_c - eps_u)
        x0 = (z_1 - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps

    def step() -> None:
        z_0 = last_step()
        loss = z_0.square().mean()
        if rid:
            for w in wrappers:
                w.use_teacher = True
            with torch.no_grad():
                z_t = last_step()
            for w in wrappers:
                w.use_teacher = False
            loss = loss + 0.1 * (z_0 - z_t).square().mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 5.0)
        if not torch.isfinite(norm):
            raise RuntimeError(f"non-finite gradient norm {norm}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rid:
            with torch.no_grad():
                for w in wrappers:
                    w.teacher[0].mul_(0.99).add_(w.lora_A, alpha=0.01)
                    w.teacher[1].mul_(0.99).add_(w.lora_B, alpha=0.01)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(max(args.steps, 1)):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    result = {
        "side": "pytorch", "method": args.method, "device": str(device), "precision": args.precision,
        "micro_batch": m, "latent": s, "median_s": statistics.median(times), "min_s": min(times), "steps": len(times),
        "unet_parameters": sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in params),
        "lora_parameters": sum(p.numel() for p in params), "torch": torch.__version__,
    }
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        result.update({
            "peak_memory_bytes": total - free - baseline_used,
            "peak_memory_measure": "cudaMemGetInfo used - baseline (includes the caching allocator's reserve)",
            "max_memory_allocated": torch.cuda.max_memory_allocated(device),
            "max_memory_reserved": torch.cuda.max_memory_reserved(device),
        })
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
