"""Memory fixtures: what PyTorch's autograd keeps for the backward pass of the networks in the
training graph, measured with `torch.autograd.graph.saved_tensors_hooks` (the bytes of the
distinct storages of saved tensors, weights excluded), for the activation count of
`stages::memory` to be checked against.

Cases (fp32, CPU, random weights; the configs are written as config.json for the Rust side):
  unet_<name>: the last UNet call of training, with a LoRA adapter (rank 4, on to_q, to_k, to_v,
      to_out.0, B non-zero) and latents that need no gradient, as in the trainer;
  vae: a VAE decode from latents that need a gradient;
  clip_<name>: a CLIP vision tower (transformers) on images that need a gradient.
Layout: <case>/config.json and saved.json: {"batch", "side", "saved_bytes_per_sample"}.
"""
# depends: scripts/torch_reference.py
# depends: tests/parity/fixtures_unet.py
import json
import pathlib

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from fixtures_unet import random_adapter, wrap_lora

UNET_CASES = {
    # The SD1.5 layout at reduced widths: four levels, cross attention in three, 1x1-conv
    # projections, the 768-wide text context.
    "sd_layout": (dict(
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
        sample_size=16,
    ), 16),
    # Linear projections, two transformer layers, an odd latent size.
    "linear_two_layers": (dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=4,
        transformer_layers_per_block=2,
        cross_attention_dim=32,
        norm_num_groups=8,
        use_linear_projection=True,
        sample_size=9,
    ), 9),
}


def saved_bytes(fn, model: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs, the model's own excluded."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def write(folder: pathlib.Path, config: dict, batch: int, side: int, saved: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=list))
    (folder / "saved.json").write_text(json.dumps({"batch": batch, "side": side, "saved_bytes_per_sample": saved / batch}))


def unet_case(out: pathlib.Path, name: str, cfg: dict, side: int, batch: int = 2) -> None:
    torch.manual_seed(0)
    model = UNet2DConditionModel(**cfg)
    # Eval mode: in training mode diffusers' ResNet copies a non-contiguous input before its
    # shortcut conv (a DDP workaround), a copy ril-pipe's blocks do not make. No dropout either way.
    model.eval()
    model.requires_grad_(False)
    wrap_lora(model, 4, init=random_adapter)
    latents = torch.randn(batch, model.config.in_channels, side, side)
    context = torch.randn(batch, 77, cfg["cross_attention_dim"])
    saved = saved_bytes(lambda: model(latents, torch.full((batch,), 1), encoder_hidden_states=context).sample, model)
    write(out / f"unet_{name}", dict(model.config), batch, side, saved)


def vae_case(out: pathlib.Path, batch: int = 2, side: int = 8) -> None:
    torch.manual_seed(0)
    cfg = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)
    model = AutoencoderKL(**cfg)
    model.eval()
    model.requires_grad_(False)
    latents = torch.randn(batch, 4, side, side, requires_grad=True)
    saved = saved_bytes(lambda: model.decode(latents).sample, model)
    write(out / "vae", dict(model.config), batch, side, saved)


def clip_case(out: pathlib.Path, name: str, act: str, batch: int = 2) -> None:
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16, hidden_act=act)
    model = CLIPVisionModelWithProjection(config)
    model.eval()
    model.requires_grad_(False)
    pixels = torch.randn(batch, 3, 32, 32, requires_grad=True)
    saved = saved_bytes(lambda: model(pixel_values=pixels).image_embeds, model)
    folder = out / f"clip_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    (folder / "saved.json").write_text(json.dumps({"batch": batch, "side": 32, "saved_bytes_per_sample": saved / batch}))


def main(out_dir: pathlib.Path) -> None:
    for name, (cfg, side) in UNET_CASES.items():
        unet_case(out_dir, name, cfg, side)
    vae_case(out_dir)
    clip_case(out_dir, "quick_gelu", "quick_gelu")
    clip_case(out_dir, "gelu", "gelu")
