"""Reference outputs for the evaluation metrics (src/metrics).

- filesize: a varied set of uint8 RGB images (smooth gradients, noise, flat colours, natural-like
  1/f textures, anti-aliased shapes, noisy gradients; 32x32, 64x64, 512x512) with the sizes of
  Pillow's `save(format="PNG")` and `save(format="JPEG", quality=q)` (4:2:0, the defaults).
  The PNG files themselves are kept too: ours must be byte-identical.
- zlib: varied byte strings and `zlib.compressobj(6, DEFLATED, 15, 9, strategy)` streams (the
  system zlib that Pillow also loads), for both strategies.
- to_uint8: float images [B,3,H,W] and the uint8 HWC images diffusers makes of them
  (`VaeImageProcessor.pt_to_numpy` + `numpy_to_pil`, after the pipeline's clamp to [0,1]).
- fid: random feature sets (several dims, N below and above D), their pytorch-fid statistics and
  `pytorch_fid.fid_score.calculate_frechet_distance`.
"""
import io
import json
import pathlib

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

SIZES = (32, 64, 512)
KINDS = ("gradient", "noise", "flat", "texture", "shapes", "noisy_gradient")
JPEG_QUALITIES = (50, 80, 95)


def _normalise(a: np.ndarray) -> np.ndarray:
    a = a - a.min()
    return a / max(a.max(), 1e-12)


def _one_over_f(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """A [n, n] field with a 1/f^exponent power spectrum, in [0, 1]."""
    white = rng.standard_normal((n, n))
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.fftfreq(n)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    spectrum = np.fft.fft2(white) / radius**exponent
    spectrum[0, 0] = 0.0
    return _normalise(np.real(np.fft.ifft2(spectrum)))


def make_image(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n), indexing="ij")
    if kind == "gradient":
        img = np.stack([xx, yy, 1 - (xx + yy) / 2], axis=-1) * 255
    elif kind == "noise":
        return rng.integers(0, 256, size=(n, n, 3), dtype=np.uint8)
    elif kind == "flat":
        colour = rng.integers(0, 256, size=3)
        img = np.broadcast_to(colour, (n, n, 3)).astype(np.float64)
    elif kind == "texture":
        # Natural images have roughly 1/f amplitude spectra; channels correlated like real scenes.
        luma = _one_over_f(rng, n, 1.2)
        chroma = [_one_over_f(rng, n, 1.6) for _ in range(2)]
        img = np.stack(
            [0.7 * luma + 0.3 * chroma[0], 0.8 * luma + 0.2 * chroma[1], 0.6 * luma + 0.2 * chroma[0] + 0.2],
            axis=-1,
        ) * 255
    elif kind == "shapes":
        img = np.empty((n, n, 3))
        img[:] = rng.uniform(0, 255, size=3)
        for _ in range(6):
            colour = rng.uniform(0, 255, size=3)
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3)
            if rng.uniform() < 0.5:
                dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r
            else:
                dist = np.maximum(np.abs(yy - cy), np.abs(xx - cx)) - r
            coverage = np.clip(0.5 - dist * n, 0, 1)[..., None]  # one-pixel anti-aliased edge
            img = img * (1 - coverage) + colour * coverage
    elif kind == "noisy_gradient":
        img = np.stack([xx, 1 - yy, (xx + yy) / 2], axis=-1) * 200 + 20
        img = img + rng.normal(0, 6, size=img.shape)
    else:
        raise ValueError(kind)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def pillow_bytes(img: np.ndarray, **save_args) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, **save_args)
    return buf.getvalue()


def write_filesize(out_dir: pathlib.Path) -> None:
    rng = np.random.default_rng(20240611)
    tensors, pngs, index = {}, {}, []
    for n in SIZES:
        for kind in KINDS:
            name = f"{kind}_{n}"
            img = make_image(kind, n, rng)
            tensors[name] = np.ascontiguousarray(img)
            png = pillow_bytes(img, format="PNG")
            pngs[name] = np.frombuffer(png, dtype=np.uint8).copy()
            entry = {"name": name, "png": len(png)}
            for q in JPEG_QUALITIES:
                entry[f"jpeg_q{q}"] = len(pillow_bytes(img, format="JPEG", quality=q))
            index.append(entry)
    save_file(tensors, str(out_dir / "filesize_images.safetensors"))
    save_file(pngs, str(out_dir / "filesize_png.safetensors"))
    (out_dir / "filesize.json").write_text(json.dumps({"jpeg_qualities": JPEG_QUALITIES, "images": index}, indent=1))


def write_zlib(out_dir: pathlib.Path) -> None:
    import zlib

    rng = np.random.default_rng(99)
    words = [b"diffusion", b"reward", b"aesthetic", b"lora", b"the", b"a", b"of", b"prompt"]
    text = b" ".join(words[i] for i in rng.integers(0, len(words), size=40000))
    inputs = {
        "empty": b"",
        "one": b"x",
        "short": b"abcabcabcabd" * 9,
        "text": text,
        "random": rng.integers(0, 256, size=70000, dtype=np.uint8).tobytes(),
        "runs": np.repeat(rng.integers(0, 4, size=3000, dtype=np.uint8), rng.integers(1, 300, size=3000)).tobytes(),
        "ramp16": (np.arange(150000, dtype=np.int64) * 37 % 65536).astype("<u2").tobytes(),
        "low_entropy": (rng.integers(0, 3, size=300000, dtype=np.uint8) + 100).tobytes(),
    }
    tensors = {}
    for name, data in inputs.items():
        tensors[f"input_{name}"] = np.frombuffer(data, dtype=np.uint8).copy()
        for label, strategy in (("default", zlib.Z_DEFAULT_STRATEGY), ("filtered", zlib.Z_FILTERED)):
            c = zlib.compressobj(6, zlib.DEFLATED, 15, 9, strategy)
            tensors[f"{label}_{name}"] = np.frombuffer(c.compress(data) + c.flush(), dtype=np.uint8).copy()
    save_file(tensors, str(out_dir / "zlib.safetensors"))
    (out_dir / "zlib.json").write_text(json.dumps({"names": list(inputs), "zlib": zlib.ZLIB_RUNTIME_VERSION}))


def write_to_uint8(out_dir: pathlib.Path) -> None:
    from diffusers.image_processor import VaeImageProcessor

    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 24) * 1.2 - 0.1  # some values outside [0, 1]
    # Values whose x*255 lands exactly on .5 (round half to even) and on the clamp limits.
    x[0, 0, 0, :6] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 254.5 / 255, 0.0, 1.0])
    pil = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(x.clamp(0, 1)))
    expected = np.stack([np.asarray(p) for p in pil])
    save_file({"x": x.numpy(), "expected": expected}, str(out_dir / "to_uint8.safetensors"))


def write_fid(out_dir: pathlib.Path) -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(7)
    cases = [(8, 5), (8, 60), (64, 40), (64, 500), (256, 120), (256, 900), (2048, 600), (2048, 2100)]
    index = []
    for dim, n in cases:
        # Correlated, non-negative-ish features like Inception pool activations, two distributions.
        mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
        feats = []
        for shift in (0.0, 0.3):
            z = rng.standard_normal((n, dim))
            # Stored as float32 like real Inception features; statistics in float64 on both sides.
            feats.append(np.abs(z @ (mixing + shift * np.eye(dim)) + shift).astype(np.float32))
        f1, f2 = (f.astype(np.float64) for f in feats)
        mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
        s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
        fid = float(calculate_frechet_distance(mu1, s1, mu2, s2))
        name = f"d{dim}_n{n}"
        tensors = {"feats1": feats[0], "feats2": feats[1], "mu1": mu1, "mu2": mu2}
        if dim <= 256:  # the 2048-d covariances would make the fixture large; those cases check the FID
            tensors.update(sigma1=s1, sigma2=s2)
        save_file(tensors, str(out_dir / f"fid_{name}.safetensors"))
        index.append({"name": name, "dim": dim, "n": n, "fid": fid})
    (out_dir / "fid.json").write_text(json.dumps(index, indent=1))


def main(out_dir: pathlib.Path) -> None:
    write_filesize(out_dir)
    write_zlib(out_dir)
    write_to_uint8(out_dir)
    write_fid(out_dir)


if __name__ == "__main__":
    import sys

    main(pathlib.Path(sys.argv[1]))
