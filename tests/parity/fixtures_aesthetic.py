"""Aesthetic head fixtures: the real LAION head (data/weights in the repository) in the improved-
aesthetic-predictor MLP, on random L2-normalised embeddings; plus a small random head of another depth."""
import pathlib

import torch
from safetensors.torch import save_file

from fixtures_tokenizer import DATA


class MLP(torch.nn.Module):
    """improved-aesthetic-predictor's head (simple_inference.py), without the Lightning wrapper."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def main(out_dir: pathlib.Path) -> None:
    torch.manual_seed(0)
    weights = DATA / "weights" / "laion_aesthetic_v2_sac_logos_ava1_l14_linearMSE.pth"
    head = MLP(768)
    head.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    head.eval()
    emb = torch.randn(16, 768)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        scores = head(emb)
    save_file({"embeddings": emb, "scores": scores}, str(out_dir / "laion.safetensors"))

    small = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Dropout(0.2), torch.nn.Linear(24, 8),
                                torch.nn.Linear(8, 1)).eval()
    emb = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    with torch.no_grad():
        scores = small(emb)
    save_file({f"layers.{k}": v for k, v in small.state_dict().items()}, str(out_dir / "small_head.safetensors"))
    save_file({"embeddings": emb, "scores": scores}, str(out_dir / "small.safetensors"))
