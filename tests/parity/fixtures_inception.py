"""Inception fixtures: pytorch_fid.inception.InceptionV3([3]) (pytorch-fid 0.3.0) with random
weights instead of the FID checkpoint (nothing is downloaded), saved with torch.save under the
`pt_inception-2015-12-05` names, and its pool features at a few input sizes."""
import pathlib

import pytorch_fid.inception as fid
import torch
import torchvision
from safetensors.torch import save_file


def build_random() -> tuple:
    """InceptionV3([3]) whose inner torchvision network keeps its random init."""
    inner = {}
    original_fid_inception = fid.fid_inception_v3
    original_load = torchvision.models.inception.Inception3.load_state_dict

    def no_download(*args, **kwargs):
        return {}

    def keep_random(self, state_dict, *args, **kwargs):
        return None

    def capture():
        net = original_fid_inception()
        inner["net"] = net
        return net

    fid.load_state_dict_from_url = no_download
    torchvision.models.inception.Inception3.load_state_dict = keep_random
    fid.fid_inception_v3 = capture
    try:
        model = fid.InceptionV3([fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        fid.fid_inception_v3 = original_fid_inception
        torchvision.models.inception.Inception3.load_state_dict = original_load
    return model, inner["net"]


def randomise_batch_norm(model, net) -> None:
    """Running statistics from one pass over random images (so activations keep a sane scale
    through 94 layers), then random affine parameters and jittered statistics."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None
        bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 299, 299))
    model.eval()
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(1 + 0.2 * torch.randn_like(bn.weight))
            bn.bias.copy_(0.1 * torch.randn_like(bn.bias))
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.25))
            bn.running_mean.add_(0.05 * torch.randn_like(bn.running_mean) * bn.running_var.sqrt())


def main(out_dir: pathlib.Path) -> None:
    torch.manual_seed(0)
    model, net = build_random()
    randomise_batch_norm(model, net)
    torch.save(net.state_dict(), out_dir / "pt_inception_random.pth")
    tensors = {}
    with torch.no_grad():
        for h, w in ((299, 299), (64, 64), (100, 150)):
            images = torch.rand(2, 3, h, w)
            tensors[f"images_{h}x{w}"] = images
            tensors[f"features_{h}x{w}"] = model(images)[0].squeeze(-1).squeeze(-1)
    save_file(tensors, str(out_dir / "reference.safetensors"))
