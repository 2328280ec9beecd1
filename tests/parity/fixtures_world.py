"""A complete miniature world with random weights, saved by the upstream packages themselves
(diffusers/transformers save_pretrained), so that the stage-level tests exercise the real
checkpoint layouts: a diffusers pipeline folder (unet, vae, text_encoder, tokenizer, scheduler),
a transformers CLIPModel folder for the reward and metric models, a LAION-layout head, an FID
reference, prompt files and the tiny-world manifest `world.json`.

A second copy differs only in a head with NaN weights, to test that non-finite rewards stop a
fine-tune."""
import json
import pathlib
import shutil

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fixtures_tokenizer import DATA, hf_folder

RESOLUTION = 16


def text_config(**extra):
    return dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, **extra)


def build(root: pathlib.Path, tokenizer_files: pathlib.Path, nan_head: bool) -> None:
    torch.manual_seed(0)
    diffusion = root / "diffusion"
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    ).save_pretrained(diffusion / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=RESOLUTION,
    ).save_pretrained(diffusion / "vae")
    CLIPTextModel(CLIPTextConfig(**text_config())).save_pretrained(diffusion / "text_encoder")
    tokenizer = CLIPTokenizer(str(tokenizer_files / "vocab.json"), str(tokenizer_files / "merges.txt"))
    tokenizer.save_pretrained(diffusion / "tokenizer")
    # transformers 5 writes only tokenizer.json; SD1.5's folder has the slow tokenizer's files.
    for folder in (diffusion / "tokenizer",):
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tokenizer_files / name, folder / name)
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(diffusion / "scheduler")

    clip_cfg = CLIPConfig(
        text_config=text_config(projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4, projection_dim=16),
        projection_dim=16,
    )
    clip = CLIPModel(clip_cfg)
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_files / name, root / "clip" / name)

    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 4), torch.nn.Linear(4, 1))
    state = {f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()}
    if nan_head:
        state["layers.3.weight"] = torch.full_like(state["layers.3.weight"], float("nan"))
    save_file(state, str(root / "aesthetic_head.safetensors"))

    features = torch.nn.functional.normalize(torch.randn(64, 16, dtype=torch.float64), dim=-1)
    save_file({"mu": features.mean(0), "sigma": torch.cov(features.T)}, str(root / "fid_reference.safetensors"))

    words = ["red", "blue", "green", "small", "large", "circle", "square", "triangle"]
    train = [f"a {a} {b} on a white background" for a in words for b in words if a != b][:24]
    test = ["a red circle", "a blue square", "a green triangle", "a small red square"]
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "test.txt").write_text("\n".join(test) + "\n\n")
    (root / "world.json").write_text(json.dumps({
        "diffusion": "diffusion", "resolution": RESOLUTION, "aesthetic_clip": "clip",
        "aesthetic_head": "aesthetic_head.safetensors", "hps": "clip", "clip_score": "clip",
        "tokenizer": "diffusion/tokenizer", "fid_reference": "fid_reference.safetensors",
        "train_prompts": "train.txt", "test_prompts": "test.txt", "jpeg_quality": 80.0,
    }, indent=1))


def main(out_dir: pathlib.Path) -> None:
    bpe = DATA / "bpe_simple_vocab_16e6.txt.gz"
    tokenizer_files = hf_folder(bpe, out_dir)
    for name, nan in (("random", False), ("nan_head", True)):
        root = out_dir / name
        if root.exists():
            shutil.rmtree(root)
        root.mkdir()
        build(root, tokenizer_files, nan)
