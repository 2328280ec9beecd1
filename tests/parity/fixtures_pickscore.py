"""PickScore fixtures (src/rewards/pickscore.rs, src/models/image_processor.rs).

- `pickscore_small/`: a small random transformers CLIPModel in PickScore's folder layout, as the hub
  repositories ship it (config.json and model.safetensors as CLIPModel.save_pretrained writes them; a
  legacy-layout `preprocessor_config.json` with the CLIP ViT settings at a small size; the
  tokenizer's vocab.json and merges.txt built from the CLIP BPE merges). logit_scale is set to log 100,
  the bound CLIP training clamps it to. The oracle is PickScore's reference computation through transformers: the processor
  (transformers 5's torchvision backend, on the images as float tensors x 255, which keeps them in the
  autograd graph) and the model, score = logit_scale.exp() * cos(image, text), and the gradient of
  sum(score * w) with respect to the images; plus the pixel values, and the scores PickScore's reference
  code gets through the PIL backend from the same images quantised to uint8 (what its users feed it),
  on the random images and on natural-like ones (`pil_natural`: 1/f textures with discs).
- `processor_<name>/`: processor configs alone, with images and transformers' pixel values: the CLIP
  ViT settings at 224, bilinear exact resizing without a crop, a crop larger than the resized
  image (zero padding), no rescaling with one mean/std for all channels, and transformers 5's nested
  `processor_config.json`.
"""
# depends: tests/parity/fixtures_tokenizer.py
# depends: tests/parity/fixtures_clip.py
# depends: tests/parity/fixtures_rewards.py
import json
import math
import pathlib
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from fixtures_clip import perturb
from fixtures_rewards import natural_like
from fixtures_tokenizer import DATA, hf_folder

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
# A CLIP ViT processor config in the legacy layout (int sizes, CLIPFeatureExtractor): bicubic resize of the
# short side to 224, 224 center crop, OpenAI mean/std: the settings of the CLIP processors on the hub, such as
# the one PickScore's reference code loads (laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
CLIP_224 = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": MEAN, "image_std": STD, "resample": 3,
         "size": 224}
PROMPTS = [
    "a photograph of a red apple on a wooden table",
    "",
    "A very long prompt " + " ".join(f"word{i} with details" for i in range(40)),
    "a watercolour painting of a lighthouse at dusk",
]


def model_scores(model, processor, images, prompts):
    """PickScore's reference computation on float images in [0, 1] (the processor sees x 255)."""
    inputs = processor(images=list(images * 255), text=prompts, padding="max_length", max_length=77,
                       truncation=True, return_tensors="pt")
    img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    scores = model.logit_scale.exp() * (img * txt).sum(dim=-1)
    return scores, inputs["pixel_values"]


def pil_scores(model, folder, images, prompts):
    """The scores through the PIL backend, from the images quantised to uint8 (PIL images)."""
    pil = CLIPImageProcessorPil.from_pretrained(str(folder))
    tok = CLIPTokenizer.from_pretrained(str(folder))
    q = (images * 255).round().to(torch.uint8)
    from PIL import Image
    pil_images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in q]
    pixels = pil(images=pil_images, return_tensors="pt")["pixel_values"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(**ids).pooler_output, dim=-1)
        return model.logit_scale.exp() * (img * txt).sum(dim=-1), pixels


def pickscore_case(out: pathlib.Path, tokenizer_dir: pathlib.Path, gen: torch.Generator) -> dict:
    folder = out / "pickscore_small"
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="gelu")
    vision = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act="gelu")
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    perturb(model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    model.eval()
    model.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, folder / name)
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(CLIP_224, size=36, crop_size=32), indent=2))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor.from_pretrained(str(folder)),
                              tokenizer=CLIPTokenizer.from_pretrained(str(folder)))
    cases = []
    # Down- and upscaling, landscape and portrait, and a short side already at the size (no resize).
    for b, h, w in ((2, 48, 64), (2, 64, 40), (3, 24, 24), (1, 36, 50)):
        images = torch.rand(b, 3, h, w, generator=gen)
        prompts = [PROMPTS[(i + len(cases)) % len(PROMPTS)] for i in range(b)]
        x = images.clone().requires_grad_(True)
        scores, pixels = model_scores(model, processor, x, prompts)
        # The same through CLIPModel's own logits (PickScore's formula is its diagonal).
        with torch.no_grad():
            logits = model(pixel_values=pixels, **processor.tokenizer(prompts, padding="max_length", max_length=77,
                                                                      truncation=True, return_tensors="pt"))
            assert torch.allclose(logits.logits_per_image.diagonal(), scores, atol=1e-4)
        weight = torch.randn(b, generator=gen)
        (grad,) = torch.autograd.grad((scores * weight).sum(), x)
        pil, pil_pixels = pil_scores(model, folder, images, prompts)
        name = f"{b}x{h}x{w}"
        save_file({"images": images, "scores": scores.detach(), "pixel_values": pixels.detach().contiguous(),
                   "weight": weight, "grad": grad, "pil_scores": pil, "pil_pixel_values": pil_pixels.contiguous()},
                  str(out / f"pickscore_{name}.safetensors"))
        cases.append({"case": name, "prompts": prompts})
    # Natural-like images: PIL's uint8 resize differs from the float path by its rounding and by
    # clamping the bicubic overshoot, which white noise provokes and natural images much less.
    rng = np.random.default_rng(14)
    natural = torch.stack([torch.from_numpy(natural_like(rng, n)[:48]).permute(2, 0, 1) for n in (64, 64, 64)])
    natural = natural.to(torch.float32) / 255
    prompts = PROMPTS[:3]
    pil, pil_pixels = pil_scores(model, folder, natural, prompts)
    save_file({"images": natural, "pil_scores": pil, "pil_pixel_values": pil_pixels.contiguous()},
              str(out / "pickscore_pil_natural.safetensors"))
    return {"folder": folder.name, "logit_scale": float(model.logit_scale.detach().exp()), "cases": cases,
            "pil_natural_prompts": prompts}


PROCESSORS = {
    "clip_224": (CLIP_224, ((1, 512, 512), (2, 300, 400), (1, 160, 120))),
    "bilinear_exact": ({"size": {"height": 30, "width": 30}, "do_center_crop": False, "resample": 2},
                       ((2, 40, 56), (1, 20, 24))),
    "crop_pads": ({"size": {"shortest_edge": 20}, "crop_size": {"height": 24, "width": 27}}, ((2, 30, 40),)),
    "no_rescale": ({"size": 16, "crop_size": 16, "do_rescale": False, "image_mean": 127.5, "image_std": 64.0},
                   ((2, 24, 20),)),
}


def processor_cases(out: pathlib.Path, gen: torch.Generator) -> list:
    names = []
    for name, (config, shapes) in PROCESSORS.items():
        folder = out / f"processor_{name}"
        folder.mkdir(exist_ok=True)
        (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
        processor = CLIPImageProcessor.from_pretrained(str(folder))
        tensors = {}
        for b, h, w in shapes:
            images = torch.rand(b, 3, h, w, generator=gen)
            tensors[f"images_{b}x{h}x{w}"] = images
            tensors[f"pixel_values_{b}x{h}x{w}"] = processor(images=list(images * 255), return_tensors="pt")["pixel_values"]
        save_file(tensors, str(folder / "reference.safetensors"))
        names.append(name)
    # transformers 5's CLIPProcessor.save_pretrained: the settings nested in processor_config.json.
    folder = out / "processor_nested"
    image_processor = CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(str(out / "pickscore_small"))) \
        .save_pretrained(folder)
    assert (folder / "processor_config.json").exists() and not (folder / "preprocessor_config.json").exists()
    images = torch.rand(2, 3, 50, 44, generator=gen)
    save_file({"images_2x50x44": images,
               "pixel_values_2x50x44": image_processor(images=list(images * 255), return_tensors="pt")["pixel_values"]},
              str(folder / "reference.safetensors"))
    names.append("nested")
    return names


def main(out_dir: pathlib.Path) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1414)
    tokenizer_dir = hf_folder(DATA / "bpe_simple_vocab_16e6.txt.gz", out_dir)
    index = {"pickscore": pickscore_case(out_dir, tokenizer_dir, gen), "processors": processor_cases(out_dir, gen)}
    (out_dir / "pickscore.json").write_text(json.dumps(index, indent=1))


if __name__ == "__main__":
    import sys

    main(pathlib.Path(sys.argv[1]))
