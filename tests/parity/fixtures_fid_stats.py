"""FID reference statistics fixtures: a folder of PNG images and the same pictures as JPEG, the
random-weight Inception of fixtures_inception in the FID layout, and pytorch-fid 0.3.0's
`compute_statistics_of_path` (mu, sigma) of each folder with it."""
import pathlib

import numpy as np
import torch
from PIL import Image
from pytorch_fid.fid_score import compute_statistics_of_path
from safetensors.torch import save_file

from fixtures_inception import build_random, randomise_batch_norm


def pictures(count: int, seed: int) -> list:
    """Smooth random pictures (blurred noise with a few flat patches), 96x72 pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        low = rng.random((9, 12, 3))
        up = np.kron(low, np.ones((8, 8, 1)))
        noise = rng.normal(0.0, 0.04, up.shape)
        out.append((np.clip(up + noise, 0.0, 1.0) * 255).round().astype(np.uint8))
    return out


def main(out_dir: pathlib.Path) -> None:
    torch.manual_seed(1)
    model, net = build_random()
    randomise_batch_norm(model, net)
    torch.save(net.state_dict(), out_dir / "pt_inception_random.pth")
    folders = {"png": out_dir / "png", "jpg": out_dir / "jpg"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(pictures(12, 3)):
        image = Image.fromarray(array)
        image.save(folders["png"] / f"img{i:02d}.png")
        image.save(folders["jpg"] / f"img{i:02d}.jpg", quality=90)
    tensors = {}
    for name, folder in folders.items():
        mu, sigma = compute_statistics_of_path(str(folder), model, 5, 2048, "cpu", 0)
        tensors[f"mu_{name}"] = torch.from_numpy(mu)
        tensors[f"sigma_{name}"] = torch.from_numpy(sigma)
    # Pillow's decode of each JPEG (libjpeg-turbo), to measure how far another decoder lands.
    tensors["pillow_jpg"] = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folders["jpg"].glob("*.jpg"))]))
    np.savez(out_dir / "stats_png.npz", mu=tensors["mu_png"].numpy(), sigma=tensors["sigma_png"].numpy())
    save_file(tensors, str(out_dir / "reference.safetensors"))
