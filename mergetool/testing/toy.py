"""Tiny offline model zoos for tests and the quick example, in the way of mergekit's make_picollama.

`make_zoo(root, arch)` writes a base model and `n_tasks` fine-tunes (the base's weights plus a small
perturbation, with their own heads) as Hugging Face folders, and returns their paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf

H = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32)


def _configs(arch: str, layers: int):
    if arch == "bert":
        c = tf.BertConfig(vocab_size=64, num_hidden_layers=layers, max_position_embeddings=32, **H)
        return c, tf.BertModel, tf.BertForSequenceClassification
    if arch == "roberta":
        c = tf.RobertaConfig(vocab_size=64, num_hidden_layers=layers, max_position_embeddings=40, **H)
        return c, tf.RobertaModel, tf.RobertaForSequenceClassification
    if arch == "distilbert":
        c = tf.DistilBertConfig(vocab_size=64, n_layers=layers, dim=16, n_heads=2, hidden_dim=32,
                                max_position_embeddings=32)
        return c, tf.DistilBertModel, tf.DistilBertForSequenceClassification
    if arch == "gpt2":
        c = tf.GPT2Config(vocab_size=64, n_layer=layers, n_embd=16, n_head=2, n_positions=32,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return c, tf.GPT2Model, tf.GPT2ForSequenceClassification
    if arch == "llama":
        c = tf.LlamaConfig(vocab_size=64, num_hidden_layers=layers, num_key_value_heads=1,
                           max_position_embeddings=32, tie_word_embeddings=False, **H)
        return c, tf.LlamaForCausalLM, tf.LlamaForCausalLM
    if arch == "vit":
        c = tf.ViTConfig(image_size=8, patch_size=4, num_hidden_layers=layers, **H)
        return c, tf.ViTModel, tf.ViTForImageClassification
    if arch == "clip_vision":
        c = tf.CLIPVisionConfig(image_size=8, patch_size=4, num_hidden_layers=layers, projection_dim=8, **H)
        return c, tf.CLIPVisionModelWithProjection, tf.CLIPVisionModelWithProjection
    if arch == "t5":
        c = tf.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=layers, num_heads=2,
                        decoder_start_token_id=0)
        return c, tf.T5ForConditionalGeneration, tf.T5ForConditionalGeneration
    raise ValueError(arch)


def make_zoo(root: Path, arch: str, *, n_tasks: int = 2, layers: int = 2, labels=(2, 3), seed: int = 0,
             noise: float = 0.01) -> tuple[Path, list[Path]]:
    """Save a tiny base and `n_tasks` perturbed fine-tunes under `root`; returns (base, [tasks])."""
    root = Path(root)
    config, base_cls, task_cls = _configs(arch, layers)
    torch.manual_seed(seed)
    base = base_cls(config).eval()
    base_dir = root / f"{arch}-base"
    base.save_pretrained(base_dir)
    dirs = []
    for t in range(n_tasks):
        kwargs = {}
        if task_cls is not base_cls:
            n = labels[t % len(labels)]
            kwargs = {"num_labels": n, "id2label": {i: f"c{i}" for i in range(n)},
                      "label2id": {f"c{i}": i for i in range(n)}}
        torch.manual_seed(seed + 100 + t)
        model = task_cls.from_pretrained(base_dir, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
        out = root / f"{arch}-task{t}"
        model.save_pretrained(out)
        dirs.append(out)
    return base_dir, dirs


def save_bert_tokenizer(path: Path) -> Path:
    """A BERT tokenizer for the random tiny zoo: [PAD] [UNK] [CLS] [SEP] [MASK] w0..w58, 64 ids."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]) + "\n")
        tf.BertTokenizer(vocab_file=str(vocab)).save_pretrained(path)
    return Path(path)


def make_lora_zoo(root: Path, *, n_tasks: int = 2, layers: int = 2, rank: int = 4) -> tuple[Path, list[Path]]:
    """A tiny BERT base and LoRA adapters (query, value) with a per-task classifier head."""
    from peft import LoraConfig, get_peft_model

    root = Path(root)
    config, base_cls, task_cls = _configs("bert", layers)
    torch.manual_seed(0)
    base_dir = root / "lora-base"
    base_cls(config).save_pretrained(base_dir)
    dirs = []
    for t in range(n_tasks):
        torch.manual_seed(200 + t)
        model = task_cls.from_pretrained(base_dir, num_labels=2 + t)
        peft_model = get_peft_model(model, LoraConfig(r=rank + t, lora_alpha=8, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)  # LoRA initialises B to zero; make the adapter do something
        out = root / f"lora-task{t}"
        peft_model.save_pretrained(out)
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(base_dir)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        dirs.append(out)
    return base_dir, dirs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_text_data(root: Path, n_tasks: int = 2, rows: int = 4) -> list[Path]:
    """One small jsonl per task of tokenizer-known words (`w1 w2`), labels alternating 0/1."""
    return [write_jsonl(Path(root) / f"d{i}.jsonl", [{"text": "w1 w2", "label": j % 2} for j in range(rows)])
            for i in range(n_tasks)]


def make_text_zoo(root: Path, n_tasks: int = 2) -> tuple[Path, list[Path], list[Path]]:
    """A tiny BERT zoo whose first task ships a tokenizer, with `tiny_text_data`; returns (base, tasks, data)."""
    base, tasks = make_zoo(Path(root) / "zoo", "bert", n_tasks=n_tasks)
    save_bert_tokenizer(tasks[0])
    return base, tasks, tiny_text_data(root, n_tasks)


def recipe_text(base: Path, tasks: list[Path], data: list[Path], **extra: str) -> str:
    """A minimal valid recipe for a zoo; `extra` adds top-level YAML blocks verbatim.

    Each task's one data file serves as its validation and its `router` split (export trains a
    router); real recipes keep router data apart from validation and test data."""
    names = [f"t{i}" for i in range(len(tasks))]
    lines = ["name: tiny", f"base_model: {base}", "models:"]
    lines += [f"  - {{name: {n}, model: {p}}}" for n, p in zip(names, tasks)]
    lines += ["tasks:"] + [f"  {n}: {{validation: {{path: {d}}}, router: {{path: {d}}}}}" for n, d in zip(names, data)]
    for block in extra.values():
        lines.append(block)
    return "\n".join(lines) + "\n"


# --- trained toy zoo: separable synthetic tasks ------------------------------------------------

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
WORDS = [f"w{i}" for i in range(60)]


def make_tokenizer(path: Path):
    """A word-level BERT-style tokenizer over SPECIAL + WORDS, saved to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", model_input_names=["input_ids",
                                   "token_type_ids", "attention_mask"])
    fast.save_pretrained(path)
    return fast


def synthetic_rows(task: int, n_classes: int, n: int, seed: int) -> list[dict]:
    """Texts of 4 filler words plus 2 signal words of the label's class."""
    import random

    rng = random.Random(seed)
    # every task reads the same 12 signal words but maps them to classes its own way, so tasks
    # conflict: merging them costs accuracy, keeping them apart does not
    signal = random.Random(1000 + task).sample(WORDS[:12], 12)
    per = len(signal) // n_classes
    filler = WORDS[48:]
    rows = []
    for _ in range(n):
        c = rng.randrange(n_classes)
        words = [rng.choice(filler) for _ in range(4)] + rng.sample(signal[c * per:(c + 1) * per], 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": f"class{c}"})
    return rows


def make_trained_zoo(root: Path, *, n_tasks: int = 3, classes=(2, 3, 4), layers: int = 2, hidden: int = 32,
                     steps: int = 60, seed: int = 0) -> dict:
    """A tiny BERT base and `n_tasks` fine-tunes trained on separable synthetic tasks, with data.

    Returns {"base": path, "tasks": {name: path}, "data": {name: {split: path}}}.
    """
    root = Path(root)
    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=32)
    base_dir = root / "base"
    tf.BertModel(config).save_pretrained(base_dir)
    tok = make_tokenizer(base_dir)
    out = {"base": base_dir, "tasks": {}, "data": {}}
    for t in range(n_tasks):
        name, n_cls = f"task{t}", classes[t % len(classes)]
        splits = {s: synthetic_rows(t, n_cls, n, seed * 1000 + t * 10 + i)
                  for i, (s, n) in enumerate([("train", 512), ("validation", 64), ("test", 96), ("router", 128)])}
        out["data"][name] = {s: write_jsonl(root / "data" / name / f"{s}.jsonl", rows) for s, rows in splits.items()}
        labels = [f"class{c}" for c in range(n_cls)]
        torch.manual_seed(seed + 10 + t)
        model = tf.BertForSequenceClassification.from_pretrained(
            base_dir, num_labels=n_cls, id2label=dict(enumerate(labels)), label2id={v: k for k, v in enumerate(labels)})
        _train(model, tok, splits["train"], labels, steps)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out["tasks"][name] = root / name
    return out


def _train(model, tok, rows: list[dict], labels: list[str], steps: int) -> None:
    enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    y = torch.tensor([labels.index(r["label"]) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (64,), generator=g)
        loss = model(**{k: v[idx] for k, v in enc.items()}, labels=y[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def trained_recipe(zoo: dict, *, extra: str = "", evaluations: int = 24, population: int = 6) -> str:
    """A recipe for a trained toy zoo (TA λ=0.5, 8-bit conditional per channel)."""
    lines = ["name: toy", f"base_model: {zoo['base']}", "models:"]
    lines += [f"  - {{name: {n}, model: {p}}}" for n, p in zoo["tasks"].items()]
    lines += ["merge: {method: ta, parameters: {lambda: 0.5}}", "tasks:"]
    for n, d in zoo["data"].items():
        lines.append(f"  {n}: {{validation: {{path: {d['validation']}}}, test: {{path: {d['test']}}}, "
                     f"router: {{path: {d['router']}}}, batch_size: 32}}")
    lines.append(f"search: {{population: {population}, evaluations: {evaluations}, seed: 0}}")
    return "\n".join(lines) + "\n" + extra
