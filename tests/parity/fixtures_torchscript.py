"""TorchScript reward fixtures (src/rewards/torchscript.rs).

- The two example rewards of examples/rewards/ exported as the user would (`<name>.pt`), and their
  eager PyTorch modules as the oracle: on fixed images and prompts, the scores and the gradient of
  sum(scores * w) (a fixed random w) with respect to the images.
- Archives that ril-pipe must refuse, one per refusal case, listed in `refusals.json` with the
  refusal they must get: the wrong signature, the wrong output, non-finite scores or gradients,
  scores that are not differentiable in the images, files that are not TorchScript, and a module
  that raises on the probe batch.
- `inplace.pt`: accepted, but changes its input in place: the caller's images must stay as they were.
"""
# depends: examples/rewards/saturation.py
# depends: examples/rewards/clip_phrase.py
import importlib.util
import json
import pathlib
import sys
from typing import List, Tuple

import torch
from safetensors.torch import save_file

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "rewards"
PROMPTS = [
    "a photograph of a red apple on a wooden table",
    "",
    "日本語のテキスト and émoji 😀, a very long prompt " * 4,
    "a lighthouse at dusk",
]


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # TorchScript reads the classes' source through their module
    spec.loader.exec_module(module)
    return module


def oracle_case(model: torch.nn.Module, gen: torch.Generator, b: int, h: int, w: int) -> dict:
    images = torch.rand(b, 3, h, w, generator=gen)
    x = images.clone().requires_grad_(True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
    scores = model(x, prompts)
    weight = torch.randn(b, generator=gen)
    (grad,) = torch.autograd.grad((scores * weight).sum(), x)
    return {"images": images, "scores": scores.detach(), "weight": weight, "grad": grad}, prompts


# The refusal cases: each a module scripted and saved, with the refusal it must get.
class OneArgument(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


class PromptIsStr(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: str) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


class PromptsUntyped(torch.nn.Module):
    def forward(self, images, prompts):  # TorchScript reads an unannotated argument as a Tensor
        return images.mean(dim=(1, 2, 3))


class PromptsAreInts(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[int]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


class ExtraArgument(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str], scale: float) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) * scale


class KeepDim(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))[:, None]


class Scalar(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return images.mean()


class PerPixel(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return images.mean(dim=1)


class IntegerScores(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return (images > 0.5).sum(dim=(1, 2, 3))


class TupleOutput(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        s = images.mean(dim=(1, 2, 3))
        return s, s


class NaNScores(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return torch.log(images.mean(dim=(1, 2, 3)) - 1.0)


class InfiniteScores(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) / 0.0


class InfiniteGradient(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        # sqrt(0) = 0 is finite; its derivative 1 / (2 sqrt(0)) is not.
        return torch.sqrt(images - images.detach()).mean(dim=(1, 2, 3)) + images.mean(dim=(1, 2, 3))


class Detached(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)).detach()


class NoGrad(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        with torch.no_grad():
            s = images.mean(dim=(1, 2, 3))
        return s


class Constant(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return torch.zeros(images.shape[0], device=images.device)


class Rounded(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return torch.round(images * 255).mean(dim=(1, 2, 3))


class Raises(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        if images.shape[-1] != 512:
            raise RuntimeError("this reward only scores 512x512 images")
        return images.mean(dim=(1, 2, 3))


class InPlace(torch.nn.Module):
    """Accepted: changes its input in place, which must not reach the caller's images."""

    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        images.mul_(0.5)
        return images.mean(dim=(1, 2, 3))


SCRIPTED = {
    "signature_one_argument": (OneArgument, "Signature"),
    "signature_prompt_is_str": (PromptIsStr, "Signature"),
    "signature_prompts_untyped": (PromptsUntyped, "Signature"),
    "signature_prompts_are_ints": (PromptsAreInts, "Signature"),
    "signature_extra_argument": (ExtraArgument, "Signature"),
    "output_keepdim": (KeepDim, "Output"),
    "output_scalar": (Scalar, "Output"),
    "output_per_pixel": (PerPixel, "Output"),
    "output_integer": (IntegerScores, "Output"),
    "output_tuple": (TupleOutput, "Output"),
    "nonfinite_nan": (NaNScores, "NonFinite"),
    "nonfinite_inf": (InfiniteScores, "NonFinite"),
    "nonfinite_gradient": (InfiniteGradient, "NonFinite"),
    "nondiff_detached": (Detached, "NotDifferentiable"),
    "nondiff_no_grad": (NoGrad, "NotDifferentiable"),
    "nondiff_constant": (Constant, "NotDifferentiable"),
    "nondiff_rounded": (Rounded, "NotDifferentiable"),
    "raises": (Raises, "Probe"),
}


def main(out_dir: pathlib.Path) -> None:
    gen = torch.Generator().manual_seed(14)
    index = {"examples": {}, "refusals": {}}
    for name, shapes in (("saturation", ((3, 32, 32), (2, 48, 40))), ("clip_phrase", ((4, 32, 32), (3, 40, 56)))):
        module = example(name)
        module.export(out_dir / f"{name}.pt")
        model = module.build()
        cases = []
        for b, h, w in shapes:
            tensors, prompts = oracle_case(model, gen, b, h, w)
            case = f"{name}_{b}x{h}x{w}"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"{case}.safetensors"))
            cases.append({"case": case, "prompts": prompts})
        index["examples"][name] = {
            "archive": f"{name}.pt",
            "description": module.DESCRIPTION,
            "parameters": sum(p.numel() for p in model.parameters()),
            "cases": cases,
        }
    torch.jit.script(InPlace()).save(str(out_dir / "inplace.pt"))
    index["accepted"] = ["inplace.pt"]
    for name, (cls, refusal) in SCRIPTED.items():
        torch.jit.script(cls()).save(str(out_dir / f"{name}.pt"))
        index["refusals"][f"{name}.pt"] = refusal
    # Not TorchScript: a torch.save state dict, a torch.save pickled module, a text file.
    weights = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Linear(8, 1))
    torch.save(weights.state_dict(), out_dir / "not_ts_state_dict.pt")
    torch.save(weights, out_dir / "not_ts_pickled_module.pt")
    (out_dir / "not_ts_text.pt").write_text("def forward(images, prompts): return images.mean()\n")
    for name in ("not_ts_state_dict.pt", "not_ts_pickled_module.pt", "not_ts_text.pt"):
        index["refusals"][name] = "NotTorchScript"
    (out_dir / "torchscript.json").write_text(json.dumps(index, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
