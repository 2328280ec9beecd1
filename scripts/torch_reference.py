"""The PyTorch side of ril-pipe's comparisons, written once: SD1.5's UNet and VAE configs as
diffusers writes them, and a reference LoRA wrapper. Used by the parity fixtures
(tests/parity/fixtures_unet.py, fixtures_memory.py), the unet_step bench (benches/unet_step.py)
and the GPU check (scripts/gpu_step_torch.py); a test oracle only, never part of the tool."""
import math

import torch
import torch.nn.functional as F

# AlignProp's adapted layers (ril-pipe's default `lora_targets`).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def sd15_unet_config() -> dict:
    """Stable Diffusion v1.5's unet/config.json."""
    return dict(
        act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), center_input_sample=False,
        cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
        mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def sd15_vae_config() -> dict:
    """Stable Diffusion v1.5's vae/config.json."""
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    )


def kaiming_zero(base: torch.nn.Linear, rank: int) -> tuple:
    """A new task's adapter: A Kaiming-uniform (bound 1/sqrt(in)), B zero."""
    bound = 1.0 / math.sqrt(base.in_features)
    device = base.weight.device
    return torch.empty(rank, base.in_features, device=device).uniform_(-bound, bound), torch.zeros(base.out_features, rank, device=device)


class LoraLinear(torch.nn.Module):
    """W x + b + B (A x) with fp32 A and B cast to the activations' dtype for each call (the
    frozen layer may be half precision), and an EMA teacher copy used while `use_teacher` is set."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(a)
        self.lora_B = torch.nn.Parameter(b)
        self.teacher = None
        self.use_teacher = False

    def forward(self, x):
        a, b = self.teacher if (self.use_teacher and self.teacher is not None) else (self.lora_A, self.lora_B)
        return self.base(x) + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))


def wrap_lora(model: torch.nn.Module, rank: int, init=kaiming_zero, targets=LORA_TARGETS) -> dict:
    """Replaces every linear layer whose name ends in a target by a LoraLinear with the adapter
    `init(base, rank)` returns; returns {layer name: wrapper} in module order."""
    wrapped = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapper = LoraLinear(module, *init(module, rank))
            if isinstance(parent, torch.nn.ModuleList):
                parent[int(child)] = wrapper
            else:
                setattr(parent, child, wrapper)
            wrapped[name] = wrapper
    return wrapped


def adapter_parameters(wrapped: dict) -> list:
    return [t for w in wrapped.values() for t in (w.lora_A, w.lora_B)]
