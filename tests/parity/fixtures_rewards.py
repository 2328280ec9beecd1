"""Reference outputs for the differentiable JPEG and the compressibility reward (src/rewards).

The differentiable JPEG here is written independently of the Rust one (per-channel formulas,
`unfold`/`fold` blocks, the DCT as a 4-d cosine basis contracted with `tensordot`, strided
slicing for 4:2:0), in float64 torch for its autograd:
- jpeg_<case>: inputs x in [0, 1], C(x) at several qualities, the gradient of sum(C(x) * w) for
  a fixed random w, and the compressibility reward -mean_{c,h,w}(x - C(x))^2 with its gradient.
- pillow: a natural-like 64x64 image and Pillow's JPEG decode at quality 80 (4:2:0), to compare
  the differentiable JPEG with a real codec.
"""
import io
import json
import math
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

LUMA = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]
CHROMA = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
          47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32
QUALITIES = (80, 50, 95, 30, 100, 10)


def factor(q: int) -> float:
    return (5000.0 / q if q < 50 else 200.0 - 2.0 * q) / 100.0


def cosine_basis() -> torch.Tensor:
    """T[x, y, u, v] = alpha(u) alpha(v) / 4 * cos((2x+1) u pi / 16) cos((2y+1) v pi / 16)."""
    k = torch.arange(8, dtype=torch.float64)
    c = torch.cos((2 * k[:, None] + 1) * k[None, :] * math.pi / 16)  # [x, u]
    alpha = torch.ones(8, dtype=torch.float64)
    alpha[0] = 1 / math.sqrt(2)
    basis = torch.einsum("xu,yv->xyuv", c, c)
    return basis * (alpha[:, None] * alpha[None, :] / 4)


def jpeg_plane(plane: torch.Tensor, table: list, q: int) -> torch.Tensor:
    """One plane [B, h, w] (0..255) through DCT -> quantise -> dequantise -> IDCT."""
    b, h, w = plane.shape
    steps = torch.clamp(torch.tensor(table, dtype=torch.float64).view(8, 8) * factor(q), min=1.0)
    basis = cosine_basis()
    cols = F.unfold(plane[:, None] - 128, kernel_size=8, stride=8)  # [B, 64, L], row-major in-block
    blocks = cols.transpose(1, 2).reshape(b, -1, 8, 8)  # [B, L, x, y]
    coef = torch.tensordot(blocks, basis, dims=([2, 3], [0, 1]))  # [B, L, u, v]
    u = coef / steps
    rounded = torch.round(u) + (u - torch.round(u)) ** 3
    deq = rounded * steps
    back = torch.tensordot(deq, basis, dims=([2, 3], [2, 3]))  # [B, L, x, y]
    cols = back.reshape(b, -1, 64).transpose(1, 2)
    return F.fold(cols, output_size=(h, w), kernel_size=8, stride=8)[:, 0] + 128


def diff_jpeg(x: torch.Tensor, q: int) -> torch.Tensor:
    x = x * 255
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b

    def sub(p):
        return (p[:, 0::2, 0::2] + p[:, 1::2, 0::2] + p[:, 0::2, 1::2] + p[:, 1::2, 1::2]) / 4

    def up(p):
        return p.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)

    y = jpeg_plane(y, LUMA, q)
    cb = up(jpeg_plane(sub(cb), CHROMA, q)) - 128
    cr = up(jpeg_plane(sub(cr), CHROMA, q)) - 128
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1)
    return rgb.clamp(0, 255) / 255


def test_images(gen: torch.Generator, b: int, h: int, w: int) -> torch.Tensor:
    """Smooth colour fields plus texture, in [0, 1] with a few saturated pixels."""
    yy = torch.linspace(0, 1, h, dtype=torch.float64).view(1, 1, h, 1)
    xx = torch.linspace(0, 1, w, dtype=torch.float64).view(1, 1, 1, w)
    phase = torch.rand(b, 3, 1, 1, generator=gen, dtype=torch.float64) * 6.28
    smooth = 0.5 + 0.35 * torch.sin(3 * xx + 2 * yy + phase)
    noise = torch.rand(b, 3, h, w, generator=gen, dtype=torch.float64)
    return (smooth + 0.25 * (noise - 0.5)).clamp(0, 1)


def write_cases(out_dir: pathlib.Path) -> list:
    gen = torch.Generator().manual_seed(1234)
    cases = []
    for shape in ((2, 32, 32), (1, 48, 64), (3, 16, 16)):
        b, h, w = shape
        x = test_images(gen, b, h, w)
        tensors = {"x": x}
        for q in QUALITIES:
            xg = x.clone().requires_grad_(True)
            c = diff_jpeg(xg, q)
            weight = torch.randn(c.shape, generator=gen, dtype=torch.float64)
            (grad,) = torch.autograd.grad((c * weight).sum(), xg)
            xr = x.clone().requires_grad_(True)
            reward = -((xr - diff_jpeg(xr, q)) ** 2).mean(dim=(1, 2, 3))
            (reward_grad,) = torch.autograd.grad(reward.sum(), xr)
            tensors.update({
                f"c_q{q}": c.detach(), f"weight_q{q}": weight, f"grad_q{q}": grad,
                f"reward_q{q}": reward.detach(), f"reward_grad_q{q}": reward_grad,
            })
        name = f"{b}x{h}x{w}"
        save_file(tensors, str(out_dir / f"jpeg_{name}.safetensors"))
        cases.append(name)
    return cases


def natural_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """A 1/f texture in correlated colours with a few anti-aliased discs, uint8 [n, n, 3]."""
    def one_over_f(exponent):
        fy, fx = np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :]
        radius = np.sqrt(fx ** 2 + fy ** 2)
        radius[0, 0] = 1
        field = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) / radius ** exponent))
        return (field - field.min()) / (field.max() - field.min())

    luma, c1, c2 = one_over_f(1.3), one_over_f(1.8), one_over_f(1.8)
    img = np.stack([0.6 * luma + 0.4 * c1, 0.7 * luma + 0.3 * c2, 0.5 * luma + 0.25 * c1 + 0.25], -1) * 255
    yy, xx = np.mgrid[0:n, 0:n] / n
    for _ in range(3):
        cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.08, 0.2)]
        cover = np.clip(0.5 - (np.hypot(yy - cy, xx - cx) - r) * n, 0, 1)[..., None]
        img = img * (1 - cover) + rng.uniform(0, 255, 3) * cover
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def write_pillow(out_dir: pathlib.Path) -> dict:
    rng = np.random.default_rng(5)
    img = natural_like(rng, 64)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=80, subsampling=2)  # 2 = 4:2:0
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].to(torch.float64) / 255
    ours = diff_jpeg(x, 80)
    ref = torch.from_numpy(decoded.copy()).permute(2, 0, 1)[None].to(torch.float64) / 255
    mae = float((ours - ref).abs().mean())
    save_file({"x": x.contiguous(), "decoded": ref.contiguous()}, str(out_dir / "pillow.safetensors"))
    return {"quality": 80, "mae_reference": mae, "mae_identity": float((x - ref).abs().mean())}


def main(out_dir: pathlib.Path) -> None:
    torch.manual_seed(0)
    cases = write_cases(out_dir)
    pillow = write_pillow(out_dir)
    (out_dir / "rewards.json").write_text(json.dumps({"qualities": QUALITIES, "cases": cases, "pillow": pillow}, indent=1))


if __name__ == "__main__":
    import sys

    main(pathlib.Path(sys.argv[1]))
