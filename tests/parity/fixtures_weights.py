"""Weight-loading fixtures: checkpoints written by torch.save in the forms found in the wild, each
with a safetensors reference of the same tensors (made contiguous), plus malformed and hostile
files that the loader must refuse, and diffusers-style component folders."""
import collections
import io
import json
import os
import pathlib
import zipfile

import torch
from safetensors.torch import save_file


class Evil:
    """Unpickling this would run a shell command: the loader must refuse its global."""

    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def reference(out: pathlib.Path, name: str, tensors: dict) -> None:
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(out / f"{name}.reference.safetensors"))


def main(out_dir: pathlib.Path) -> None:
    torch.manual_seed(0)
    plain = {"a": torch.randn(3, 4), "b": torch.arange(7), "c": torch.randn(2, 2, dtype=torch.float64)}
    torch.save(plain, out_dir / "plain_dict.pt")
    reference(out_dir, "plain_dict", plain)

    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2), torch.nn.BatchNorm1d(2))
    ordered = net.state_dict()  # OrderedDict with `_metadata`, int64 num_batches_tracked
    torch.save(ordered, out_dir / "ordered.pth")
    reference(out_dir, "ordered", dict(ordered))

    torch.save({"state_dict": ordered, "epoch": 3, "global_step": 1200, "lr": 1e-4, "name": "run"}, out_dir / "nested.ckpt")

    half = {k: v.half() for k, v in plain.items() if v.is_floating_point()}
    torch.save(half, out_dir / "fp16.bin")
    reference(out_dir, "fp16", half)
    bf16 = {k: v.bfloat16() for k, v in plain.items() if v.is_floating_point()}
    torch.save(bf16, out_dir / "bf16.bin")
    reference(out_dir, "bf16", bf16)

    base = torch.randn(6, 8)
    views = {
        "full": base,
        "transposed": base.t(),
        "rows": base[2:5],
        "strided": base[1:, 1::3],
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(3)),
    }
    torch.save(views, out_dir / "views.pt")
    reference(out_dir, "views", {k: v.detach() for k, v in views.items()})

    torch.save({"weight": torch.randn(2), "payload": Evil()}, out_dir / "evil.pt")

    good = (out_dir / "plain_dict.pt").read_bytes()
    (out_dir / "truncated.pt").write_bytes(good[: len(good) // 2])
    # A well-formed archive whose pickle stops half-way.
    with zipfile.ZipFile(out_dir / "plain_dict.pt") as src, zipfile.ZipFile(out_dir / "truncated_pickle.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data[: len(data) // 2]
            dst.writestr(info.filename, data)
    torch.save(plain, out_dir / "legacy.pt", _use_new_zipfile_serialization=False)

    # Component folders.
    sharded = out_dir / "sharded"
    sharded.mkdir(exist_ok=True)
    first = {"a": plain["a"], "c": plain["c"]}
    second = {"b": plain["b"]}
    save_file(first, str(sharded / "model-00001-of-00002.safetensors"))
    save_file(second, str(sharded / "model-00002-of-00002.safetensors"))
    index = {"metadata": {"total_size": 0}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                           "c": "model-00001-of-00002.safetensors",
                                                           "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    both = out_dir / "both"
    both.mkdir(exist_ok=True)
    save_file({"w": torch.ones(2)}, str(both / "diffusion_pytorch_model.safetensors"))
    torch.save({"w": torch.zeros(2)}, both / "diffusion_pytorch_model.bin")

    bin_only = out_dir / "bin_only"
    bin_only.mkdir(exist_ok=True)
    torch.save(dict(ordered), bin_only / "pytorch_model.bin")
