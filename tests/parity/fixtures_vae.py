"""VAE fixtures: small random diffusers AutoencoderKLs (saved with save_pretrained), one of them
re-saved with the legacy mid-block attention names (query/key/value/proj_attn), with images,
latents and the reference posterior parameters and decodings.

Layout under out_dir: <case>/config.json, <case>/diffusion_pytorch_model.safetensors,
<case>/io.safetensors with image, mean, logvar (after quant_conv and the clamp), latent, decoded.
"""
import pathlib

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

CASES = {
    "two_blocks": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=16,
    ),
    "three_blocks_legacy_names": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        norm_num_groups=16,
        latent_channels=4,
        sample_size=32,
    ),
    "no_attention_no_quant": dict(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=3,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=16,
    ),
}

IMAGE_SIZES = {"two_blocks": (16, 16), "three_blocks_legacy_names": (24, 16), "no_attention_no_quant": (16, 24)}

LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def perturb(model: torch.nn.Module) -> None:
    """Random init leaves norms at 1/0 and some biases at 0: move them so the test sees them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1:
                p.add_(0.1 * torch.randn_like(p))


def to_legacy_names(path: pathlib.Path) -> None:
    """Rewrites a checkpoint with the names of diffusers' deprecated AttentionBlock."""
    tensors = load_file(path)
    renamed = {}
    for name, tensor in tensors.items():
        for new, old in LEGACY.items():
            for block in ("encoder.mid_block.attentions.0.", "decoder.mid_block.attentions.0."):
                if name.startswith(block + new + "."):
                    name = block + old + name[len(block + new):]
        renamed[name] = tensor
    assert any(".query." in n for n in renamed)
    save_file(renamed, path)


def main(out_dir: pathlib.Path) -> None:
    torch.manual_seed(0)
    for name, cfg in CASES.items():
        model = AutoencoderKL(**cfg)
        perturb(model)
        model.eval()
        folder = out_dir / name
        model.save_pretrained(folder, safe_serialization=True)
        if "legacy" in name:
            to_legacy_names(folder / "diffusion_pytorch_model.safetensors")
        height, width = IMAGE_SIZES[name]
        factor = 2 ** (len(cfg["block_out_channels"]) - 1)
        image = torch.rand(2, 3, height, width) * 2 - 1
        latent = torch.randn(2, cfg["latent_channels"], height // factor, width // factor)
        with torch.no_grad():
            posterior = model.encode(image).latent_dist
            decoded = model.decode(latent).sample
        save_file({"image": image, "mean": posterior.mean.contiguous(), "logvar": posterior.logvar.contiguous(),
                   "latent": latent, "decoded": decoded.contiguous()}, folder / "io.safetensors")
