"""PyTorch eager counterpart of `ril-pipe bench-step` (src/cli/bench_cmds.rs), for
scripts/gpu_check.sh: the same last-step training update with random weights, timed the same way.
Prints one JSON line per micro-batch size.

The models: a diffusers UNet2DConditionModel and AutoencoderKL (SD1.5's configs by default), a
transformers CLIPVisionModelWithProjection (ViT-L/14 by default) with an MLP of the LAION
aesthetic head's shape, and a reference LoRA wrapper on to_q/to_k/to_v/to_out.0 (as
scripts/torch_reference.py). Frozen models in --precision, LoRA parameters fp32 and cast to
the activations' dtype for each call, as ril-pipe does.

The step (src/method/objective.rs): the guided last UNet call z_1 -> z_0 with gradient, the DDIM
update in fp32 (SD1.5's schedule, t = 1 of 50 steps), the decode `(vae.decode(z / s) / 2 + 0.5)
.clamp(0, 1)`, the reward (bilinear resize to the tower's size, CLIP normalisation, image
embedding, L2 normalisation, head), for RID the EMA teacher's last step and decode without
gradient (before the student's step) and 0.1 * mse(images, teacher images); with
--checkpointing, decode and reward --decode-chunk samples at a time on a detached z_0, then
push the collected gradient through the UNet call; backward, gradient clipping at 5, AdamW
(lr 1e-4, weight decay 0.1) and for RID the EMA update (momentum 0.99). Also times one guided
UNet call without gradient (a sampling step N..2).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from torch_reference import adapter_parameters, kaiming_zero, sd15_unet_config, sd15_vae_config, wrap_lora
except ImportError as e:  # gpu_check.sh reports this and skips the comparison
    print(json.dumps({"side": "pytorch", "error": f"missing python package: {e.name}"}))
    sys.exit(3)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vit_l14() -> dict:
    return dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14,
                image_size=224, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def load_config(spec: str, builtin: str, default) -> dict:
    cfg = default() if spec == builtin else json.load(open(spec))
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("model_type", "architectures")}


def small_random_b(base: torch.nn.Linear, rank: int) -> tuple:
    """A Kaiming-uniform, B small and random: a non-zero B makes A's gradient (and the teacher's
    pass) real work, as bench-step does."""
    a, b = kaiming_zero(base, rank)
    return a, torch.randn_like(b) * 1e-3


def sd15_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--unet", default="sd15", help="sd15 or a diffusers config.json")
    p.add_argument("--vae", default="sd15", help="sd15 or a diffusers config.json")
    p.add_argument("--clip", default="vit-l14", help="vit-l14 or a transformers CLIP vision config.json")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--micro", default="4", help="micro-batch sizes, comma-separated (one JSON line each)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--precision", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--method", default="baseline", choices=["baseline", "rid"])
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--decode-chunk", type=int, default=1)
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
    rid = args.method == "rid"
    chunk = max(args.decode_chunk, 1)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**load_config(args.unet, "sd15", sd15_unet_config)).to(dtype=dtype)
        vae = AutoencoderKL(**load_config(args.vae, "sd15", sd15_vae_config)).to(dtype=dtype)
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**load_config(args.clip, "vit-l14", vit_l14))).to(dtype=dtype)
        proj = vision.config.projection_dim
        head = torch.nn.Sequential(*[torch.nn.Linear(i, o) for i, o in zip([proj, 1024, 128, 64, 16], [1024, 128, 64, 16, 1])]).to(dtype=dtype)
    for model in (unet, vae, vision, head):
        model.requires_grad_(False)
    frozen = sum(t.numel() for m in (unet, vae, vision, head) for t in m.parameters())
    wrappers = list(wrap_lora(unet, args.rank, init=small_random_b).values())
    params = adapter_parameters(dict(enumerate(wrappers)))
    if rid:
        for w in wrappers:
            w.teacher = (w.lora_A.detach().clone(), w.lora_B.detach().clone())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    alphas = sd15_alphas_cumprod()
    a_t, a_prev = float(alphas[1]), float(alphas[0])
    scaling = vae.config.scaling_factor
    size = vision.config.image_size
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    side = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    cross = unet.config.cross_attention_dim

    def decode(z):
        return (vae.decode((z / scaling).to(dtype)).sample.float() / 2 + 0.5).clamp(0, 1)

    def reward(images):
        pixels = (F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False) - mean) / std
        emb = vision(pixel_values=pixels.to(dtype)).image_embeds.float()
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return head(emb.to(dtype)).squeeze(-1).float()

    for m in [int(x) for x in args.micro.split(",")]:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        context = lambda b: (torch.randn(b, 77, cross, device=device) * 0.5).to(dtype)
        cond, uncond = context(m), context(1)
        z_1 = torch.randn(m, unet.config.in_channels, side, side, device=device)
        t = torch.full((2 * m,), 1, device=device, dtype=torch.long)
        both_context = torch.cat([uncond.expand(m, -1, -1), cond])

        def last_step() -> torch.Tensor:
            out = unet(torch.cat([z_1, z_1]).to(dtype), t, encoder_hidden_states=both_context).sample.float()
            eps_u, eps_c = out.chunk(2)
            eps = eps_u + args.guidance * (eps_c - eps_u)
            x0 = (z_1 - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps

        def teacher_images():
            for w in wrappers:
                w.use_teacher = True
            with torch.no_grad():
                z_t = last_step()
                images = decode(z_t) if not args.checkpointing else torch.cat([decode(c) for c in z_t.split(chunk)])
            for w in wrappers:
                w.use_teacher = False
            return images

        def step() -> bool:
            target = teacher_images() if rid else None
            z_0 = last_step()
            if not args.checkpointing:
                images = decode(z_0)
                loss = -reward(images).mean()
                if rid:
                    loss = loss + 0.1 * (images - target).square().mean()
                loss.backward()
            else:
                free = z_0.detach().requires_grad_(True)
                for start in range(0, m, chunk):
                    images = decode(free[start:start + chunk])
                    loss = -reward(images).sum() / m
                    if rid:
                        loss = loss + 0.1 * (images - target[start:start + chunk]).square().sum() / target.numel()
                    loss.backward()
                z_0.backward(free.grad)
            norm = torch.nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if rid:
                with torch.no_grad():
                    for w in wrappers:
                        w.teacher[0].mul_(0.99).add_(w.lora_A, alpha=0.01)
                        w.teacher[1].mul_(0.99).add_(w.lora_B, alpha=0.01)
            return bool(torch.isfinite(norm))

        def timed(f, n):
            times = []
            for _ in range(n):
                start = time.perf_counter()
                f()
                if cuda:
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            return statistics.median(times), min(times)

        finite = all(step() for _ in range(args.warmup))
        results = []
        median_s, min_s = timed(lambda: results.append(step()), max(args.steps, 1))
        finite = finite and all(results)
        with torch.no_grad():
            sample_s, _ = timed(last_step, max(args.steps, 1))
        result = {
            "side": "pytorch", "method": args.method, "device": str(device), "precision": args.precision,
            "micro_batch": m, "checkpointing": args.checkpointing, "decode_chunk": chunk if args.checkpointing else None,
            "resolution": args.resolution, "median_s": median_s, "min_s": min_s, "sample_step_s": sample_s,
            "steps": max(args.steps, 1), "finite": finite, "frozen_parameters": frozen,
            "lora_parameters": sum(p.numel() for p in params), "torch": torch.__version__,
        }
        if cuda:
            result.update({
                "peak_memory_bytes": torch.cuda.max_memory_reserved(device),
                "peak_memory_measure": "torch.cuda.max_memory_reserved (caching allocator, after empty_cache)",
                "max_memory_allocated": torch.cuda.max_memory_allocated(device),
            })
        print(json.dumps(result), flush=True)
        del cond, uncond, z_1, both_context
    return 0


if __name__ == "__main__":
    sys.exit(main())
