"""CLIP fixtures: small random transformers CLIP models (saved with save_pretrained, so the
checkpoint and config.json are the real layout) and open_clip models built from custom
model-config dicts, plus the real ViT-H-14 (open_clip) and ViT-L/14 (transformers) configs at
depth 1, with token ids, pixels and the reference outputs."""
import copy
import json
import pathlib

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPVisionConfig, CLIPVisionModelWithProjection)

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def perturb(model: torch.nn.Module) -> None:
    """Random init leaves LayerNorms at 1/0 and biases at 0: move them so the test sees them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1:
                p.add_(0.1 * torch.randn_like(p))


def token_ids(batch: int, length: int, vocab: int, pad_with_eot: bool) -> torch.Tensor:
    """SOT = vocab-2, EOT = vocab-1 (the largest id, as in CLIP), random words, then padding."""
    sot, eot = vocab - 2, vocab - 1
    ids = torch.full((batch, length), eot if pad_with_eot else 0, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(0, length - 1, ()).item()) if i else length - 2  # first row full length
        ids[i, 0] = sot
        ids[i, 1:1 + n] = torch.randint(1, vocab - 2, (n,))
        ids[i, 1 + n] = eot
    return ids


def pixels(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def hf_case(out: pathlib.Path, name: str, model: torch.nn.Module, text: bool, vision: bool, vocab=None,
            length=None, image=None, pad_with_eot=True) -> None:
    perturb(model)
    model.eval()
    folder = out / name
    model.save_pretrained(folder)
    tensors = {}
    with torch.no_grad():
        if text:
            ids = token_ids(3, length, vocab, pad_with_eot)
            tensors["input_ids"] = ids
            if isinstance(model, CLIPModel):
                o = model.text_model(input_ids=ids)
                tensors["text_embeds"] = model.get_text_features(input_ids=ids).pooler_output
            else:
                o = model(input_ids=ids)
                if hasattr(o, "text_embeds"):
                    tensors["text_embeds"] = o.text_embeds
            tensors["last_hidden_state"] = o.last_hidden_state
            if hasattr(o, "pooler_output") and o.pooler_output is not None:
                tensors["text_pooled"] = o.pooler_output
        if vision:
            px = pixels(2, image)
            tensors["pixel_values"] = px
            if isinstance(model, CLIPModel):
                tensors["image_pooled"] = model.vision_model(pixel_values=px).pooler_output
                tensors["image_embeds"] = model.get_image_features(pixel_values=px).pooler_output
            else:
                tensors["image_pooled"] = model.vision_model(pixel_values=px).pooler_output
                tensors["image_embeds"] = model(pixel_values=px).image_embeds
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "reference.safetensors"))
    if isinstance(model, CLIPTextModel):
        # transformers 4 (and SD1.5's text_encoder) kept the `text_model.` prefix.
        save_file({f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()},
                  str(folder / "v4_layout.safetensors"))


def open_clip_case(out: pathlib.Path, name: str, cfg: dict, batch_images: int = 2) -> None:
    model = open_clip.model.CLIP(**copy.deepcopy(cfg))
    perturb(model)
    model.eval()
    folder = out / name
    folder.mkdir(exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    captured = {}
    model.ln_final.register_forward_hook(lambda m, i, o: captured.__setitem__("tokens", o))
    model.visual.ln_post.register_forward_hook(lambda m, i, o: captured.__setitem__("visual", o))
    t, v = cfg["text_cfg"], cfg["vision_cfg"]
    ids = token_ids(3, t.get("context_length", 77), t.get("vocab_size", 49408), pad_with_eot=False)
    px = pixels(batch_images, v.get("image_size", 224))
    with torch.no_grad():
        text_embeds = model.encode_text(ids)
        image_embeds = model.encode_image(px)
    tensors = {
        "input_ids": ids,
        "last_hidden_state": captured["tokens"],
        "text_pooled": captured["tokens"][torch.arange(3), ids.argmax(-1)],
        "text_embeds": text_embeds,
        "pixel_values": px,
        "image_pooled": captured["visual"][:, 0],
        "image_embeds": image_embeds,
    }
    save_file({k: x.contiguous() for k, x in tensors.items()}, str(folder / "reference.safetensors"))


def preprocess_case(out: pathlib.Path) -> None:
    images = torch.rand(2, 3, 40, 56)
    tensors = {"images": images}
    for size in (32, 224):
        tensors[f"preprocessed_{size}"] = (F.interpolate(images, size=(size, size), mode="bilinear",
                                                         align_corners=False) - MEAN) / STD
    save_file(tensors, str(out / "preprocess.safetensors"))


def main(out_dir: pathlib.Path) -> None:
    torch.manual_seed(0)
    small_text = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=16, eos_token_id=999)
    small_vision = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)
    hf_case(out_dir, "hf_clip", CLIPModel(CLIPConfig(text_config=small_text, vision_config=small_vision,
                                                     projection_dim=24)),
            text=True, vision=True, vocab=1000, length=16, image=32)
    # SD-style text encoder: no projection, legacy eos_token_id 2 (argmax pooling), EOT padding.
    sd_text = dict(small_text, eos_token_id=2, hidden_size=48, num_attention_heads=6, num_hidden_layers=3)
    hf_case(out_dir, "hf_text_sd", CLIPTextModel(CLIPTextConfig(**sd_text)), text=True, vision=False,
            vocab=1000, length=16)
    hf_case(out_dir, "hf_text_proj", CLIPTextModelWithProjection(CLIPTextConfig(**small_text, projection_dim=20,
                                                                                hidden_act="gelu")),
            text=True, vision=False, vocab=1000, length=12)
    hf_case(out_dir, "hf_vision_proj", CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=3, image_size=24,
        patch_size=4, projection_dim=16, hidden_act="gelu")), text=False, vision=True, image=24)
    # ViT-L/14 as openai/clip-vit-large-patch14 (transformers) at depth 1, vocab cut to 1000.
    l14_text = dict(vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                    num_attention_heads=12, max_position_embeddings=77, eos_token_id=2)
    l14_vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=16,
                      image_size=224, patch_size=14)
    hf_case(out_dir, "hf_vit_l14_depth1", CLIPModel(CLIPConfig(text_config=l14_text, vision_config=l14_vision,
                                                               projection_dim=768)),
            text=True, vision=True, vocab=1000, length=77, image=224)

    open_clip_case(out_dir, "oc_small", {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 4},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 4, "layers": 2},
    })
    open_clip_case(out_dir, "oc_quickgelu", {
        "embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 28, "layers": 3, "width": 48, "head_width": 12, "patch_size": 7, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 10, "vocab_size": 500, "width": 40, "heads": 5, "layers": 1, "mlp_ratio": 3.0},
    })
    # The real ViT-H-14 config (HPSv2's tower) at depth 1, vocab cut to 1000.
    h14 = json.loads((pathlib.Path(open_clip.__file__).parent / "model_configs" / "ViT-H-14.json").read_text())
    h14["vision_cfg"]["layers"] = 1
    h14["text_cfg"]["layers"] = 1
    h14["text_cfg"]["vocab_size"] = 1000
    open_clip_case(out_dir, "oc_vit_h14_depth1", h14, batch_images=1)
    preprocess_case(out_dir)
