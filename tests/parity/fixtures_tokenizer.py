"""Tokenizer fixtures: token ids from open_clip's SimpleTokenizer (the shared
bpe_simple_vocab_16e6.txt.gz) and from transformers' CLIPTokenizer (a tokenizer folder built
from the same merges, as openai/clip-vit-* ship it), on the HPSv2 photo prompts and tricky text."""
import gzip
import json
import os
import pathlib

import torch
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode
from safetensors.torch import save_file
from transformers import CLIPTokenizer

TRICKY = [
    "", " ", "a", "A photo of a cat", "  leading and trailing   spaces  ", "tabs\tand\nnew\r\nlines",
    "UPPER lower MiXeD CaSe", "numbers 1234567890 and 3.14159, 1,000,000 and 2nd 3rd 21st",
    "punctuation!!! ??? ... --- ((brackets)) [x] {y} <z>", "it's a dog's life, they're we've I'm you'll he'd",
    "IT'S LOUD, DON'T", "café naïve résumé façade crème brûlée", "日本語のテキスト 中文字符 한국어 텍스트",
    "emoji 😀🎉👍🏽 and ❤️ and 🇫🇷", "curly “quotes” and ‘single’ quotes", "fullwidth ＡＢＣ１２３！",
    "ligature ﬁne ﬂow ĳ", "html &amp; entities &quot;hi&quot; &#39;x&#39; &#x41; &amp;amp;",
    "a < b & c > d &amp; e", "Greek ΟΔΟΣ σοφός Σ", "German Straße ÄÖÜ", "Turkish İstanbul ıi",
    "combining e\u0301 a\u0300 n\u0303", "under_score snake_case", "hyphen-ated well-known",
    "$100 @user #hashtag 50% a+b=c", "math x² ½ ∑ √2", "zero\u200bwidth joiner\u200d", "nbsp\u00a0space",
    "control\x07char", "emdash — and ellipsis …", "ANSI \x1b[31mred\x1b[0m text", "'quoted' \"double\"",
    "a" * 300, "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "<start_of_text> special <end_of_text>", "<|startoftext|>hf<|endoftext|> special",
    "A very long prompt " + " ".join(f"word{i} with details" for i in range(60)),
    "photo, 8k, ultra realistic, trending on artstation, by greg rutkowski, octane render, (masterpiece:1.2)",
]


# The public data the repository carries (origins and licences in data/README.md).
DATA = pathlib.Path(__file__).resolve().parents[2] / "data"


def prompts() -> list:
    data = DATA / "hpd_photo"
    lines = []
    for split in ("train.txt", "test.txt"):
        lines += [l for l in (data / split).read_text(encoding="utf-8").split("\n") if l.strip()]
    return lines + TRICKY


def hf_folder(bpe: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """vocab.json + merges.txt as openai/clip-vit-large-patch14 has them, from the open_clip merges."""
    folder = out / "hf_tokenizer"
    folder.mkdir(exist_ok=True)
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def main(out_dir: pathlib.Path) -> None:
    bpe = DATA / "bpe_simple_vocab_16e6.txt.gz"
    texts = prompts()
    (out_dir / "prompts.json").write_text(json.dumps(texts, ensure_ascii=False))
    oc = SimpleTokenizer(bpe_path=str(bpe))
    hf = CLIPTokenizer.from_pretrained(str(hf_folder(bpe, out_dir)))
    tensors = {}
    for n in (77, 16):
        tensors[f"open_clip_{n}"] = oc(texts, context_length=n)
        tensors[f"transformers_{n}"] = torch.tensor(
            hf(texts, padding="max_length", max_length=n, truncation=True)["input_ids"], dtype=torch.long)
    save_file(tensors, str(out_dir / "ids.safetensors"))
