"""Phrase match: the cosine between a small CLIP-style image embedding and the embedding of the prompt followed by a target phrase (random weights unless --weights: a template whose exported scores mean nothing).

A prompt-aware reward for ril-pipe, exported as a TorchScript archive:

    python examples/rewards/clip_phrase.py rewards/phrase.pt --phrase "in warm golden sunset light"
    python examples/rewards/clip_phrase.py rewards/phrase.pt --weights my_trained_state_dict.pt

What it is: two towers shaped like CLIP's at toy size. The image tower resizes the images to 32x32
(bilinear, antialiased), normalises them with CLIP's mean and std, cuts 4x4 patches, runs one pre-LN
transformer block over them and projects the class token. The text tower reads `prompt + " " + phrase`
byte by byte (its UTF-8 bytes are the tokens, the first 64 kept), runs one transformer block and projects
the mean of the token features. The score is the
cosine of the two L2-normalised embeddings, in [-1, 1].

What it is not: a trained model. With the seeded random weights it is exported with, its scores carry no
meaning about images or text; it exists to show (and to test) how a reward reads the prompts inside
TorchScript. Train the towers on your own image-text pairs, save their state dict, and export with
--weights to make it a real reward. The contract ril-pipe checks when it loads the file
(docs/rewards.md): forward(images [B, 3, H, W] float32 in [0, 1], prompts: List[str]) -> [B].
This script is for users and the tests; ril-pipe itself never runs Python.
"""
import argparse
import pathlib
from typing import List, Tuple

import torch
import torch.nn.functional as F

DESCRIPTION = __doc__.splitlines()[0]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Block(torch.nn.Module):
    """A pre-LN transformer block; `keep` masks out padding keys ([B, L] bool, True = attend)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)
        self.ln_2 = torch.nn.LayerNorm(width)
        self.fc = torch.nn.Linear(width, 4 * width)
        self.proj = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.ln_1(x)).chunk(3, dim=-1)
        q = q.reshape(b, n, self.heads, w // self.heads).transpose(1, 2)
        k = k.reshape(b, n, self.heads, w // self.heads).transpose(1, 2)
        v = v.reshape(b, n, self.heads, w // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.out(a.transpose(1, 2).reshape(b, n, w))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class ImageTower(torch.nn.Module):
    def __init__(self, width: int, embed: int, size: int = 32, patch: int = 4):
        super().__init__()
        self.size = size
        self.patch = torch.nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.cls = torch.nn.Parameter(torch.randn(width) * width ** -0.5)
        self.pos = torch.nn.Parameter(torch.randn((size // patch) ** 2 + 1, width) * width ** -0.5)
        self.block = Block(width, 4)
        self.ln = torch.nn.LayerNorm(width)
        self.proj = torch.nn.Linear(width, embed, bias=False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = self.patch((x - self.mean) / self.std).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1) + self.pos
        keep = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
        return self.proj(self.ln(self.block(x, keep))[:, 0])


@torch.jit.unused
def _utf8_eager(text: str) -> List[int]:
    return list(text.encode("utf-8"))


def utf8_bytes(text: str) -> List[int]:
    """The UTF-8 bytes of `text`: TorchScript strings are UTF-8 byte strings, so iterating one
    yields a byte at a time; eager Python encodes explicitly."""
    if torch.jit.is_scripting():
        out: List[int] = []
        for ch in text:
            out.append(ord(ch))
        return out
    return _utf8_eager(text)


class TextTower(torch.nn.Module):
    def __init__(self, width: int, embed: int, vocab: int = 256, context: int = 64):
        super().__init__()
        self.vocab = vocab
        self.context = context
        self.token = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Parameter(torch.randn(context, width) * 0.01)
        self.block = Block(width, 4)
        self.ln = torch.nn.LayerNorm(width)
        self.proj = torch.nn.Linear(width, embed, bias=False)

    def token_ids(self, texts: List[str], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        rows: List[List[int]] = []
        lengths: List[int] = []
        for text in texts:
            codes = utf8_bytes(text)[: self.context]
            lengths.append(len(codes))
            rows.append(codes + [0] * (self.context - len(codes)))
        ids = torch.tensor(rows, dtype=torch.long, device=device)
        keep = torch.arange(self.context, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        return ids, keep

    def forward(self, texts: List[str], device: torch.device) -> torch.Tensor:
        ids, keep = self.token_ids(texts, device)
        x = self.ln(self.block(self.token(ids) + self.pos, keep))
        w = keep.to(x.dtype)[:, :, None]
        return self.proj((x * w).sum(dim=1) / w.sum(dim=1))


class PhraseMatch(torch.nn.Module):
    def __init__(self, phrase: str, width: int = 64, embed: int = 32):
        super().__init__()
        self.phrase = phrase
        self.image = ImageTower(width, embed)
        self.text = TextTower(width, embed)

    def forward(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        texts: List[str] = []
        for p in prompts:
            texts.append(p + " " + self.phrase)
        img = F.normalize(self.image(images), dim=-1)
        txt = F.normalize(self.text(texts, images.device), dim=-1)
        return (img * txt).sum(dim=-1)


def build(phrase: str = "in warm golden sunset light", seed: int = 0, weights: pathlib.Path = None) -> torch.nn.Module:
    """The reward as an eager module (the tests' oracle): seeded random weights, or `weights`."""
    torch.manual_seed(seed)
    model = PhraseMatch(phrase)
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def export(path: pathlib.Path, phrase: str = "in warm golden sunset light", seed: int = 0, weights: pathlib.Path = None) -> None:
    torch.jit.script(build(phrase, seed, weights)).save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("out", type=pathlib.Path, help="the TorchScript archive to write, e.g. rewards/phrase.pt")
    parser.add_argument("--phrase", default="in warm golden sunset light", help="the text appended to every prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--weights", type=pathlib.Path, help="a state dict of trained weights for the two towers")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export(args.out, args.phrase, args.seed, args.weights)
    print(f"wrote {args.out}: {DESCRIPTION}")


if __name__ == "__main__":
    main()
