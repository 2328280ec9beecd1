"""UNet fixtures: small random diffusers UNet2DConditionModels (saved with save_pretrained, so the
checkpoint and config.json are the real layout) with per-sample mixed timesteps and contexts; a
gradient case with a reference LoRA wrapper; and the full SD1.5 config with weights generated
deterministically through libtorch's generator (no weight file: the Rust side regenerates them).

Layout under out_dir:
  <case>/config.json, <case>/diffusion_pytorch_model.safetensors, <case>/io.safetensors
      io: sample, timesteps, context, out
  lora_grad/...: as a case, plus lora.safetensors (the adapter file format of ril-pipe:
      <layer>.lora_A.0.weight, <layer>.lora_B.0.weight, lora_scales) and in io: weights (the
      fixed tensor of the scalar (out * weights).sum()), out (with LoRA), grad.<tensor name>
  sd15/config.json, sd15/io.safetensors: sample, timesteps, context, out, randn_check,
      randn_check_4d, param_sums (f64, one per parameter in sorted-name order)
"""
# depends: scripts/torch_reference.py
import math
import pathlib
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
from torch_reference import sd15_unet_config, wrap_lora  # noqa: E402


SMALL_CASES = {
    # Two blocks, cross attention then plain, conv projections, one layer per block.
    "xattn_plain": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=2,
        cross_attention_dim=16,
        norm_num_groups=8,
        sample_size=8,
    ),
    # Three blocks, linear projections, per-block head counts, two layers per block.
    "three_blocks_linear": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        attention_head_dim=[2, 4, 4],
        cross_attention_dim=24,
        norm_num_groups=16,
        use_linear_projection=True,
        sample_size=8,
    ),
    # Cross attention everywhere, two transformer layers, the other time-embedding convention,
    # centred input, a mid-block scale, and an odd latent size (upsampling to the skip's size).
    "all_xattn_odd": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=4,
        transformer_layers_per_block=2,
        cross_attention_dim=16,
        norm_num_groups=8,
        flip_sin_to_cos=False,
        freq_shift=1,
        center_input_sample=True,
        mid_block_scale_factor=1.5,
        norm_eps=1e-6,
        sample_size=8,
    ),
    # Plain block first, cross attention last (the mirror image of SD's layout).
    "plain_xattn": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=[1, 8],
        cross_attention_dim=32,
        norm_num_groups=32,
        downsample_padding=1,
        sample_size=8,
    ),
}

SIZES = {"all_xattn_odd": (7, 9)}


def deterministic_parameter(index: int, name: str, shape) -> torch.Tensor:
    """The SD1.5 weights: parameter `index` (sorted-name order) from torch.manual_seed(index).
    Matrices and kernels get std 1/sqrt(fan_in), norm scales 1 + 0.1 N, biases 0.1 N.
    The Rust test computes exactly the same expressions."""
    torch.manual_seed(index)
    t = torch.randn(shape)
    if name.endswith("weight") and len(shape) >= 2:
        return t * (1.0 / math.sqrt(math.prod(shape[1:])))
    if name.endswith("weight"):
        return t * 0.1 + 1.0
    return t * 0.1


def perturb(model: torch.nn.Module) -> None:
    """Random init leaves norms at 1/0 and some biases at 0: move them so the test sees them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1:
                p.add_(0.1 * torch.randn_like(p))


def inputs(cfg: dict, height: int, width: int, batch: int = 3, tokens: int = 5):
    sample = torch.randn(batch, cfg.get("in_channels", 4), height, width)
    timesteps = torch.tensor([1, 500, 981][:batch], dtype=torch.long)
    context = torch.randn(batch, tokens, cfg["cross_attention_dim"])
    return sample, timesteps, context


def random_adapter(base: torch.nn.Linear, rank: int) -> tuple:
    """A trained-looking adapter: A N(0, 1/in), B 0.1 N (both non-zero, so every gradient shows)."""
    return torch.randn(rank, base.in_features) / math.sqrt(base.in_features), torch.randn(base.out_features, rank) * 0.1


def small_case(out: pathlib.Path, name: str, cfg: dict) -> None:
    model = UNet2DConditionModel(**cfg)
    perturb(model)
    model.eval()
    folder = out / name
    model.save_pretrained(folder, safe_serialization=True)
    height, width = SIZES.get(name, (8, 8))
    sample, timesteps, context = inputs(cfg, height, width)
    with torch.no_grad():
        result = model(sample, timesteps, encoder_hidden_states=context).sample
    save_file({"sample": sample, "timesteps": timesteps, "context": context, "out": result.contiguous()},
              folder / "io.safetensors")


def lora_grad_case(out: pathlib.Path) -> None:
    cfg = SMALL_CASES["xattn_plain"]
    model = UNet2DConditionModel(**cfg)
    perturb(model)
    model.eval()
    folder = out / "lora_grad"
    model.save_pretrained(folder, safe_serialization=True)
    wrapped = wrap_lora(model, 4, init=random_adapter)
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = {}
    for layer, wrapper in wrapped.items():
        wrapper.lora_A.requires_grad_(True)
        wrapper.lora_B.requires_grad_(True)
        adapters[f"{layer}.lora_A.0.weight"] = wrapper.lora_A
        adapters[f"{layer}.lora_B.0.weight"] = wrapper.lora_B
    lora_file = {k: v.detach().clone() for k, v in adapters.items()}
    lora_file["lora_scales"] = torch.tensor([1.0], dtype=torch.float64)
    save_file(lora_file, folder / "lora.safetensors")

    sample, timesteps, context = inputs(cfg, 8, 8, batch=2)
    timesteps = torch.tensor([37.0, 742.0])  # float timesteps are accepted too
    result = model(sample, timesteps, encoder_hidden_states=context).sample
    weights = torch.randn_like(result)
    (result * weights).sum().backward()
    io = {"sample": sample, "timesteps": timesteps, "context": context, "weights": weights,
          "out": result.detach().contiguous()}
    for key, param in adapters.items():
        io[f"grad.{key}"] = param.grad.contiguous()
    save_file(io, folder / "io.safetensors")


def sd15_case(out: pathlib.Path) -> None:
    folder = out / "sd15"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = sd15_unet_config()
    with torch.device("meta"):
        model = UNet2DConditionModel(**cfg)
    model.to_empty(device="cpu")
    model.eval()
    model.save_config(folder)
    params = dict(model.named_parameters())
    assert set(params) == set(model.state_dict()), "the UNet has buffers: generate them too"
    sums = []
    with torch.no_grad():
        for index, name in enumerate(sorted(params)):
            value = deterministic_parameter(index, name, tuple(params[name].shape))
            params[name].copy_(value)
            sums.append(value.sum(dtype=torch.float64))
    torch.manual_seed(0)
    randn_check = torch.randn(1000)
    torch.manual_seed(3)
    randn_check_4d = torch.randn(320, 4, 3, 3)
    torch.manual_seed(12345)
    sample = torch.randn(1, 4, 16, 16)
    timesteps = torch.tensor([981], dtype=torch.long)
    context = torch.randn(1, 77, 768)
    with torch.no_grad():
        result = model(sample, timesteps, encoder_hidden_states=context).sample
    save_file({"sample": sample, "timesteps": timesteps, "context": context, "out": result.contiguous(),
               "randn_check": randn_check, "randn_check_4d": randn_check_4d, "param_sums": torch.stack(sums),
               "param_count": torch.tensor([sum(p.numel() for p in params.values())], dtype=torch.long)},
              folder / "io.safetensors")


def main(out_dir: pathlib.Path) -> None:
    torch.manual_seed(0)
    for name, cfg in SMALL_CASES.items():
        small_case(out_dir, name, cfg)
    lora_grad_case(out_dir)
    sd15_case(out_dir)
