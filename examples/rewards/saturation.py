"""Saturation: the mean over pixels of how far R, G and B spread around their grey (0 for a grey image, higher for vivid colour).

A text-free reward for ril-pipe (it ignores the prompts), exported as a TorchScript archive:

    python examples/rewards/saturation.py rewards/saturation.pt

The score of an image x [3, H, W] in [0, 1] is mean_{h,w} sqrt(mean_c (x_c - mean_c x)^2 + 1e-6): a
smooth measure of colourfulness, differentiable everywhere (the 1e-6 keeps the square root's gradient
finite on grey pixels). The contract ril-pipe checks when it loads the file (docs/rewards.md):
forward(images [B, 3, H, W] float32 in [0, 1], prompts: List[str]) -> [B], higher is better unless the
pipeline declares the reward `direction: lower`. This script is for users and the tests; ril-pipe itself
never runs Python.
"""
import argparse
import pathlib
from typing import List

import torch

DESCRIPTION = __doc__.splitlines()[0]


class Saturation(torch.nn.Module):
    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        grey = images.mean(dim=1, keepdim=True)
        spread = ((images - grey) ** 2).mean(dim=1)
        return torch.sqrt(spread + 1e-6).mean(dim=(1, 2))


def build() -> torch.nn.Module:
    """The reward as an eager module (the tests' oracle)."""
    return Saturation().eval()


def export(path: pathlib.Path) -> None:
    torch.jit.script(build()).save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("out", type=pathlib.Path, help="the TorchScript archive to write, e.g. rewards/saturation.pt")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export(args.out)
    print(f"wrote {args.out}: {DESCRIPTION}")


if __name__ == "__main__":
    main()
