"""LoRA export to diffusers, with diffusers as the oracle, on the committed tiny world.

Two adapter groups in ril-pipe's own adapter file format (`<layer>.lora_{A,B}.<i>.weight`,
`lora_scales`; see src/models/lora.rs) on the tiny world's UNet: `rid`, a RID model after two
tasks (two rank-4 adapters of scale 1 and the EMA teacher of the newest), and `soup`, a model
soup of three adapters with the coefficients 0.5, 0.3 and 0.2. For each, the same adapters in
the diffusers LoRA format that `ril-pipe lora export` writes: one safetensors file per adapter
(`adapter<i>.safetensors`: `unet.<layer>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r];
the metadata `lora_adapter_metadata` holds `unet.r`, `unet.lora_alpha` = r and
`unet.target_modules`), `merged.safetensors` (the group as one LoRA: the ranks concatenated,
A_i scaled by the adapter's weight), and `adapters.json` (names, files, the weights for
`pipe.set_adapters`). Then diffusers itself loads those files into the tiny world's pipeline
(fp32, CPU) and computes the references.

Layout under out_dir:
  world_manifest.txt      tiny/weights/MANIFEST.txt as it was (the references hold for it only)
  <case>/ril_adapters.safetensors   the group in ril-pipe's format
  <case>/peft/adapter<i>.safetensors, merged.safetensors, adapters.json
  <case>/io.safetensors:
      sample [2, 4, 8, 8], timesteps [2] (int64), context [2, 28, 64]: UNet inputs
      base: the UNet's output without LoRA
      out: with every adapter loaded by `load_lora_weights` and weighted by `set_adapters`
      out_merged: with merged.safetensors alone, weight 1
      z_n [2, 4, 8, 8], z_0: a full DDIM sample (10 steps, eta 0, guidance 3) of `prompts`
  prompts.txt             the two prompts of the DDIM sample
"""
# depends: tiny/weights/MANIFEST.txt
import json
import math
import pathlib

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "tiny" / "weights"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
STEPS, GUIDANCE = 10, 3.0
CASES = {
    # name: (ranks, scales, with a teacher)
    "rid": ([4, 4], [1.0, 1.0], True),
    "soup": ([4, 4, 4], [0.5, 0.3, 0.2], False),
}


def adapted_layers(unet) -> list:
    """Names of the linear layers ril-pipe adapts (suffix match on dotted boundaries), sorted."""
    return sorted(
        name for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS)
    )


def make_group(unet, layers, ranks, teacher: bool):
    """Adapters as training leaves them: A as ril-pipe initialises it, B moved away from zero."""
    modules = dict(unet.named_modules())
    group = []
    for rank in ranks:
        adapter = {}
        for name in layers:
            lin = modules[name]
            bound = 1.0 / math.sqrt(lin.in_features)
            a = (torch.rand(rank, lin.in_features) * 2 - 1) * bound
            b = torch.randn(lin.out_features, rank) * 0.05
            adapter[name] = (a, b)
        group.append(adapter)
    teacher_pairs = None
    if teacher:
        teacher_pairs = {n: (a + 0.01 * torch.randn_like(a), b + 0.01 * torch.randn_like(b)) for n, (a, b) in group[-1].items()}
    return group, teacher_pairs


def ril_file(group, teacher, scales) -> dict:
    tensors = {}
    for i, adapter in enumerate(group):
        for name, (a, b) in adapter.items():
            tensors[f"{name}.lora_A.{i}.weight"] = a.contiguous()
            tensors[f"{name}.lora_B.{i}.weight"] = b.contiguous()
    for name, (a, b) in (teacher or {}).items():
        tensors[f"{name}.lora_A.teacher.weight"] = a.contiguous()
        tensors[f"{name}.lora_B.teacher.weight"] = b.contiguous()
    tensors["lora_scales"] = torch.tensor(scales, dtype=torch.float64)
    return tensors


def write_lora(path: pathlib.Path, pairs: dict, rank: int, layers) -> None:
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"unet.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = b.contiguous()
    meta = {"unet.r": rank, "unet.lora_alpha": rank, "unet.target_modules": list(layers)}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})


def write_peft(folder: pathlib.Path, group, scales, layers) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    adapters = []
    for i, (adapter, scale) in enumerate(zip(group, scales)):
        rank = next(iter(adapter.values()))[0].shape[0]
        write_lora(folder / f"adapter{i}.safetensors", adapter, rank, layers)
        adapters.append({"name": f"adapter{i}", "weight_name": f"adapter{i}.safetensors", "weight": scale, "rank": rank, "alpha": rank})
    merged = {}
    for name in layers:
        merged[name] = (torch.cat([adapter[name][0] * scale for adapter, scale in zip(group, scales)], 0),
                        torch.cat([adapter[name][1] for adapter in group], 1))
    total = sum(a["rank"] for a in adapters)
    write_lora(folder / "merged.safetensors", merged, total, layers)
    index = {
        "adapters": adapters,
        "set_adapters": {"adapter_names": [a["name"] for a in adapters], "adapter_weights": [a["weight"] for a in adapters]},
        "merged": {"name": "merged", "weight_name": "merged.safetensors", "weight": 1.0, "rank": total, "alpha": total},
    }
    (folder / "adapters.json").write_text(json.dumps(index, indent=2))
    return index


def main(out_dir: pathlib.Path) -> None:
    torch.manual_seed(0)
    (out_dir / "world_manifest.txt").write_bytes((TINY / "MANIFEST.txt").read_bytes())
    pipe = StableDiffusionPipeline.from_pretrained(TINY / "diffusion", torch_dtype=torch.float32, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.eval()
    layers = adapted_layers(unet)
    attentions = sum(1 for _, m in unet.named_modules() if type(m).__name__ == "Attention")
    assert len(layers) == 4 * attentions, (len(layers), attentions)  # q, k, v, out of each
    prompts = (TINY / "prompts" / "test.txt").read_text().splitlines()[:2]
    (out_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
    cfg = unet.config
    sample = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    timesteps = torch.tensor([981, 261], dtype=torch.long)
    context = torch.randn(2, pipe.tokenizer.model_max_length, cfg.cross_attention_dim)
    z_n = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    with torch.no_grad():
        base = unet(sample, timesteps, context).sample

    def run(names, weights):
        pipe.set_adapters(names, adapter_weights=weights)
        with torch.no_grad():
            out = unet(sample, timesteps, context).sample
            z_0 = pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0, latents=z_n.clone(),
                       output_type="latent").images
        return out, z_0

    for case, (ranks, scales, teacher) in CASES.items():
        folder = out_dir / case
        folder.mkdir(parents=True, exist_ok=True)
        group, teacher_pairs = make_group(unet, layers, ranks, teacher)
        save_file(ril_file(group, teacher_pairs, scales), str(folder / "ril_adapters.safetensors"))
        index = write_peft(folder / "peft", group, scales, layers)

        pipe.unload_lora_weights()
        for a in index["adapters"]:
            pipe.load_lora_weights(folder / "peft", weight_name=a["weight_name"], adapter_name=a["name"])
        out, z_0 = run(index["set_adapters"]["adapter_names"], index["set_adapters"]["adapter_weights"])
        pipe.unload_lora_weights()
        pipe.load_lora_weights(folder / "peft", weight_name="merged.safetensors", adapter_name="merged")
        out_merged, _ = run(["merged"], [1.0])
        pipe.unload_lora_weights()
        assert (out - base).abs().max() > 1e-2, "the adapters should change the UNet's output"
        assert (out - out_merged).abs().max() < 1e-5, (out - out_merged).abs().max()
        save_file({"sample": sample, "timesteps": timesteps, "context": context, "base": base, "out": out,
                   "out_merged": out_merged, "z_n": z_n, "z_0": z_0}, str(folder / "io.safetensors"))
