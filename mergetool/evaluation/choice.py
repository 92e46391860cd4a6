"""Multiple-choice tasks scored by likelihood, in the way of lm-eval-harness.

A row holds a context (`text`), its candidate continuations (`choices`: a list, or a JSON list in
csv) and a label (the index of the right choice, or the choice itself). Every (row, choice) pair is
one sequence; its score is the summed log-probability of the choice's tokens given the context:
  causal_lm_choice: context + choice in one sequence, right-padded; the choice's tokens are scored;
  seq2seq_choice:   the context is the encoder input, the choice the decoder target.
The prediction is the best-scoring choice (the first one on ties). Metric `acc_norm` divides each
sum by the choice's length in characters first, as lm-eval does.
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np
import torch

from mergetool.core.errors import DataError
from mergetool.evaluation.data import iter_records
from mergetool.evaluation.metrics import METRICS
from mergetool.recipe.schema import DataSplit

CHOICE_KINDS = ("causal_lm_choice", "seq2seq_choice")
TARGET_KEYS = ("target_ids", "target_mask")  # batch entries the model never sees


# --- rows ------------------------------------------------------------------------------------------
def parse_choices(value, *, file, key: str, row: int, line: Optional[int] = None) -> list[str]:
    """A row's choices as strings: a list, or a string holding a JSON list (csv cells)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, (str, int, float)) for c in value):
        raise DataError(f"row {row}: choices must be a non-empty list of strings", file=file, key=key, line=line,
                        fix='write the column as a list, e.g. ["yes", "no"] (a JSON list in csv)')
    return [str(c) for c in value]


def label_index(value, choices: list[str], *, file, key: str, row: int, line: Optional[int] = None) -> int:
    """A choice label: the choice string itself, or its 0-based index (int or digit string)."""
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        idx = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        idx = int(value)
    else:
        idx = None
    if idx is None or not 0 <= idx < len(choices):
        raise DataError(f"row {row}: label {value!r} is neither one of its {len(choices)} choices nor an index "
                        "into them", file=file, key=key, line=line,
                        fix=f"use an index 0..{len(choices) - 1} or the right choice's text")
    return idx


def read_rows(records: list[dict], spec: DataSplit, *, key: str, lines: Optional[list[int]] = None):
    """(contexts, choices per row, label indices) of a split's records."""
    texts, choices, labels = [], [], []
    for i, rec in enumerate(records):
        row, line = i + 1, (lines[i] if lines else None)
        opts = parse_choices(rec[spec.choices], file=spec.path, key=f"{key}.choices", row=row, line=line)
        labels.append(label_index(rec[spec.label], opts, file=spec.path, key=f"{key}.label", row=row, line=line))
        texts.append("" if spec.text is None else str(rec[spec.text]))
        choices.append(opts)
    return texts, choices, np.asarray(labels, dtype=np.int64)


def check_split(spec: DataSplit, key: str) -> list[DataError]:
    """For `mergetool validate`: every row has a choices list and a label that indexes into it."""
    if not spec.choices:
        return [DataError("a choice task's split needs a `choices` column", file=spec.path, key=key,
                          fix="add `choices: <column>` to the split")]
    lines, records = [], []
    for line, rec in iter_records(spec.path, key=key):
        lines.append(line)
        records.append(rec)
    try:
        read_rows(records, spec, key=key, lines=lines)
    except DataError as e:
        return [e]
    return []


# --- batches ---------------------------------------------------------------------------------------
def causal_batches(texts, choices, tokenizer, *, max_length: int, batch_size: int, file=None, key=None):
    """Right-padded context+choice sequences, longest first; (batches, pairs, norms)."""
    lead = _leading_specials(tokenizer)
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    seqs, pairs, norms = [], [], []
    for r, (ctx, opts) in enumerate(zip(texts, choices)):
        for c, cont in enumerate(opts):
            ctx_ids, cont_ids = _encode_pair(tokenizer, ctx, cont)
            ctx_ids = lead + ctx_ids
            if not ctx_ids:
                if fallback is None:
                    raise DataError(f"row {r + 1}: the text is empty and the tokenizer has no BOS/EOS token to "
                                    "condition on", file=file, key=key, fix="give every row a non-empty text")
                ctx_ids = [fallback]
            if not cont_ids:
                raise DataError(f"row {r + 1}: choice {c} encodes to no tokens", file=file, key=key,
                                fix="remove empty choices")
            ids = (ctx_ids + cont_ids)[-max_length:]
            seqs.append((ids, min(len(cont_ids), len(ids) - 1)))
            pairs.append((r, c))
            norms.append(max(len(cont), 1))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    pad = _pad_id(tokenizer)
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        tgt = torch.full((len(idx), width), pad, dtype=torch.long)
        tmask = torch.zeros((len(idx), width), dtype=torch.bool)
        for j, i in enumerate(idx):
            s, n_cont = seqs[i]
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
            tgt[j, :len(s) - 1] = torch.tensor(s[1:])  # position p predicts token p+1
            tmask[j, len(s) - 1 - n_cont:len(s) - 1] = True
        batches.append({"input_ids": ids, "attention_mask": mask, "target_ids": tgt, "target_mask": tmask})
    return batches, np.asarray([pairs[i] for i in order]), np.asarray([norms[i] for i in order], dtype=np.float64)


def seq2seq_batches(texts, choices, tokenizer, *, max_length: int, batch_size: int, start_id: int,
                    file=None, key=None):
    """Encoder inputs (the contexts) and decoder targets (the choices), longest first."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    seqs, pairs, norms = [], [], []
    for r, opts in enumerate(choices):
        tgt = tokenizer(list(opts), truncation=True, max_length=max_length)["input_ids"]
        for c, t in enumerate(tgt):
            if not t:
                raise DataError(f"row {r + 1}: choice {c} encodes to no tokens", file=file, key=key,
                                fix="remove empty choices")
            seqs.append((enc[r], t))
            pairs.append((r, c))
            norms.append(max(len(opts[c]), 1))
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), -len(seqs[i][1])))
    pad = _pad_id(tokenizer)
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        w_enc = max(len(seqs[i][0]) for i in idx)
        w_dec = max(len(seqs[i][1]) for i in idx)
        b = {"input_ids": torch.full((len(idx), w_enc), pad, dtype=torch.long),
             "attention_mask": torch.zeros((len(idx), w_enc), dtype=torch.long),
             "decoder_input_ids": torch.full((len(idx), w_dec), pad, dtype=torch.long),
             "decoder_attention_mask": torch.zeros((len(idx), w_dec), dtype=torch.long),
             "target_ids": torch.full((len(idx), w_dec), pad, dtype=torch.long),
             "target_mask": torch.zeros((len(idx), w_dec), dtype=torch.bool)}
        for j, i in enumerate(idx):
            e, t = seqs[i]
            b["input_ids"][j, :len(e)] = torch.tensor(e)
            b["attention_mask"][j, :len(e)] = 1
            b["decoder_input_ids"][j, :len(t)] = torch.tensor([start_id] + t[:-1])  # shifted right
            b["decoder_attention_mask"][j, :len(t)] = 1
            b["target_ids"][j, :len(t)] = torch.tensor(t)
            b["target_mask"][j, :len(t)] = True
        batches.append(b)
    return batches, np.asarray([pairs[i] for i in order]), np.asarray([norms[i] for i in order], dtype=np.float64)


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: the context's trailing spaces go to the continuation; the continuation's
    tokens are those of the whole text after the context's, so merges across the seam are kept."""
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def _leading_specials(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's BOS; none for GPT-2)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    if plain and full[len(full) - len(plain):] == plain:
        return list(full[:len(full) - len(plain)])
    return []


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0  # padded positions are masked out everywhere


# --- scores ----------------------------------------------------------------------------------------
def choice_logprobs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Summed log-probability of each sequence's target tokens: [B, S, V] logits -> [B].

    Only the scored positions are normalised (a few per sequence, not B*S*V values)."""
    mask = batch["target_mask"]
    rows = torch.log_softmax(logits[mask].float(), -1)
    lp = rows.gather(-1, batch["target_ids"][mask].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp).sum(-1)


def choice_predictions(outputs: np.ndarray, pairs: np.ndarray, n_rows: int,
                       norms: Optional[np.ndarray] = None) -> np.ndarray:
    """The best choice per row from per-pair scores (batch order); ties go to the first choice."""
    scores = np.asarray(outputs, dtype=np.float64).reshape(-1)
    if norms is not None:
        scores = scores / norms
    table = np.full((n_rows, int(pairs[:, 1].max()) + 1), -np.inf)
    table[pairs[:, 0], pairs[:, 1]] = scores
    return table.argmax(1)


def choice_score(metric: str, outputs: np.ndarray, pairs: np.ndarray, labels: np.ndarray,
                 norms: Optional[np.ndarray] = None) -> float:
    """Accuracy (or `acc_norm`, or any classification metric) of the predicted choices."""
    pred = choice_predictions(outputs, pairs, len(labels), norms if metric == "acc_norm" else None)
    return METRICS["accuracy" if metric == "acc_norm" else metric](pred, labels)
