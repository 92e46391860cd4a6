"""Tiny offline model zoos for tests and the quick example, in the way of mergekit's make_picollama.

`make_zoo(root, arch)` writes a base model and `n_tasks` fine-tunes (the base's weights plus a small
perturbation, with their own heads) as Hugging Face folders, and returns their paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf

tf.logging.set_verbosity_error()
tf.logging.disable_progress_bar()
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


def recipe_text(base: Path, tasks: list[Path], data: list[Path], **extra: str) -> str:
    """A minimal valid recipe for a zoo; `extra` adds top-level YAML blocks verbatim."""
    names = [f"t{i}" for i in range(len(tasks))]
    lines = ["name: tiny", f"base_model: {base}", "models:"]
    lines += [f"  - {{name: {n}, model: {p}}}" for n, p in zip(names, tasks)]
    lines += ["tasks:"] + [f"  {n}: {{validation: {{path: {d}}}}}" for n, d in zip(names, data)]
    for block in extra.values():
        lines.append(block)
    return "\n".join(lines) + "\n"
