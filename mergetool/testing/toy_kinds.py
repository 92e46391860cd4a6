"""Tiny random models, tokenizers, image processors and data for the non-text-classification task
kinds (image_classification, causal_lm_choice, seq2seq_choice), all built offline.

  write_tiny_tokenizer(dir, kind)          word-level tokenizer: <pad> </s> <unk> <s> w0..w59 (64 ids)
  make_tiny_gpt2(dir) / make_tiny_llama(dir) / make_tiny_t5(dir)     LMs with that tokenizer
  make_tiny_vit(dir, num_labels) / make_tiny_clip(dir, num_labels)   image classifiers (8x8 pixels)
  make_kind_zoo(root, arch, ...)           a base and perturbed fine-tunes, like toy.make_zoo
  write_tiny_images(dir, n, num_labels) / write_choice_rows(path, n)  data files
  kind_recipe_text(...)                    a minimal recipe for such a zoo
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import torch
import transformers as tf

SPECIAL = ["<pad>", "</s>", "<unk>", "<s>"]  # ids 0 1 2 3, T5's order
WORDS = [f"w{i}" for i in range(60)]
PAD, EOS, UNK, BOS = 0, 1, 2, 3
VOCAB = len(SPECIAL) + len(WORDS)
IMAGE = 8  # pixels per side
SMALL = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32)
ARCHS = ("gpt2", "llama", "t5", "vit", "clip")
KIND_OF = {"gpt2": "causal_lm_choice", "llama": "causal_lm_choice", "t5": "seq2seq_choice",
           "vit": "image_classification", "clip": "image_classification"}


def word_id(word: str) -> int:
    return (SPECIAL + WORDS).index(word)


def write_tiny_tokenizer(path: Path, kind: str = "gpt2"):
    """A whitespace word-level fast tokenizer saved to `path`. `kind`: gpt2 (adds nothing),
    llama (prepends <s>) or t5 (appends </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", BOS)])
    elif kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", EOS)])
    elif kind != "gpt2":
        raise ValueError(f"tokenizer kind {kind!r}: use gpt2, llama or t5")
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                      bos_token="<s>", model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(path)
    return fast


def _save(model, path: Path) -> Path:
    model.eval().save_pretrained(path)
    return Path(path)


def make_tiny_gpt2(path: Path, *, layers: int = 2, seed: int = 0, tie: bool = True) -> Path:
    """GPT2LMHeadModel (lm_head tied to wte unless tie=False) and its tokenizer."""
    torch.manual_seed(seed)
    c = tf.GPT2Config(vocab_size=VOCAB, n_layer=layers, n_embd=16, n_head=2, n_positions=64,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=tie)
    _save(tf.GPT2LMHeadModel(c), path)
    write_tiny_tokenizer(path, "gpt2")
    return Path(path)


def make_tiny_llama(path: Path, *, layers: int = 2, seed: int = 0, tie: bool = False) -> Path:
    torch.manual_seed(seed)
    c = tf.LlamaConfig(vocab_size=VOCAB, num_hidden_layers=layers, num_key_value_heads=1, max_position_embeddings=64,
                       bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=tie, **SMALL)
    _save(tf.LlamaForCausalLM(c), path)
    write_tiny_tokenizer(path, "llama")
    return Path(path)


def make_tiny_t5(path: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """T5ForConditionalGeneration (shared embeddings, tied head) and a T5-style tokenizer."""
    torch.manual_seed(seed)
    c = tf.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=layers, num_heads=2,
                    pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
    _save(tf.T5ForConditionalGeneration(c), path)
    write_tiny_tokenizer(path, "t5")
    return Path(path)


def _labels(num_labels: int) -> dict:
    names = {i: f"c{i}" for i in range(num_labels)}
    return {"num_labels": num_labels, "id2label": names, "label2id": {v: k for k, v in names.items()}}


def make_tiny_vit(path: Path, num_labels: Optional[int] = 3, *, layers: int = 2, seed: int = 0) -> Path:
    """ViTForImageClassification with `num_labels` classes c0.. (None: a headless ViTModel base)."""
    torch.manual_seed(seed)
    c = tf.ViTConfig(image_size=IMAGE, patch_size=4, num_hidden_layers=layers, **SMALL,
                     **(_labels(num_labels) if num_labels else {}))
    _save(tf.ViTForImageClassification(c) if num_labels else tf.ViTModel(c), path)
    tf.ViTImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)
    return Path(path)


def make_tiny_clip(path: Path, num_labels: Optional[int] = 3, *, layers: int = 2, seed: int = 0) -> Path:
    """CLIPForImageClassification (None: a CLIPModel base, text tower included)."""
    torch.manual_seed(seed)
    vision = dict(image_size=IMAGE, patch_size=4, num_hidden_layers=layers, **SMALL)
    text = dict(vocab_size=VOCAB, num_hidden_layers=1, max_position_embeddings=16, **SMALL)
    c = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8,
                      **(_labels(num_labels) if num_labels else {}))
    _save(tf.CLIPForImageClassification(c) if num_labels else tf.CLIPModel(c), path)
    crop = {"height": IMAGE, "width": IMAGE}
    tf.CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size=crop).save_pretrained(path)
    return Path(path)


def make_kind_zoo(root: Path, arch: str, *, n_tasks: int = 2, layers: int = 2, labels=(2, 3), seed: int = 0,
                  noise: float = 0.02) -> tuple[Path, list[Path]]:
    """A tiny base and `n_tasks` fine-tunes (the base plus noise; image tasks get their own heads with
    labels[t] classes), each folder with its tokenizer or image processor. Returns (base, [tasks])."""
    root = Path(root)
    base = root / f"{arch}-base"
    if arch in ("vit", "clip"):
        (make_tiny_vit if arch == "vit" else make_tiny_clip)(base, None, layers=layers, seed=seed)
    else:
        {"gpt2": make_tiny_gpt2, "llama": make_tiny_llama, "t5": make_tiny_t5}[arch](base, layers=layers, seed=seed)
    cls = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM, "t5": tf.T5ForConditionalGeneration,
           "vit": tf.ViTForImageClassification, "clip": tf.CLIPForImageClassification}[arch]
    dirs = []
    for t in range(n_tasks):
        torch.manual_seed(seed + 100 + t)
        kwargs = _labels(labels[t % len(labels)]) if arch in ("vit", "clip") else {}
        model = cls.from_pretrained(base, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
        out = root / f"{arch}-task{t}"
        model.eval().save_pretrained(out)
        if arch in ("vit", "clip"):
            tf.AutoImageProcessor.from_pretrained(base).save_pretrained(out)
        else:
            tf.AutoTokenizer.from_pretrained(base).save_pretrained(out)
        dirs.append(out)
    return base, dirs


# --- data --------------------------------------------------------------------------------------------
def write_tiny_images(folder: Path, n: int, num_labels: int, *, seed: int = 0, name: str = "data.jsonl") -> Path:
    """`n` 8x8 PNGs under folder/images (class k tints channel k % 3) and a jsonl naming them,
    with relative paths and labels c0..; returns the jsonl's path."""
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randrange(num_labels)
        im = Image.new("RGB", (IMAGE, IMAGE))
        im.putdata([tuple(200 if ch == k % 3 else rng.randrange(80) for ch in range(3)) for _ in range(IMAGE * IMAGE)])
        im.save(folder / "images" / f"{seed}-{i}.png")
        rows.append({"image": f"images/{seed}-{i}.png", "label": f"c{k}"})
    return _jsonl(folder / name, rows)


def write_choice_rows(path: Path, n: int, *, n_choices: int = 3, seed: int = 0, label_as: str = "index") -> Path:
    """`n` rows {text: 3-5 words, choices: n_choices 1-3 word strings, label}; label_as index|text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 5)))
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(n_choices)]
        k = rng.randrange(n_choices)
        rows.append({"text": text, "choices": choices, "label": k if label_as == "index" else choices[k]})
    return _jsonl(Path(path), rows)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def kind_recipe_text(base: Path, tasks: list[Path], data: list[Path], kind: str, *, metric: str = "accuracy",
                     batch_size: int = 8, max_length: int = 32, extra: str = "") -> str:
    """A minimal recipe for a kinds zoo; each task's one data file is its validation split."""
    cols = {"image_classification": "image: image", "causal_lm_choice": "choices: choices",
            "seq2seq_choice": "choices: choices"}[kind]
    lines = ["name: tiny-kinds", f"base_model: {base}", "models:"]
    lines += [f"  - {{name: t{i}, model: {p}}}" for i, p in enumerate(tasks)]
    lines.append("tasks:")
    for i, d in enumerate(data):
        lines.append(f"  t{i}: {{kind: {kind}, metric: {metric}, batch_size: {batch_size}, max_length: {max_length}, "
                     f"validation: {{path: {d}, {cols}}}}}")
    return "\n".join(lines) + "\n" + extra
