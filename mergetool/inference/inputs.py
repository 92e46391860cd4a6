"""Inputs of an expert library: reading them, tokenising them (truncated to the model's limit), padding.

An input is a text, a (text, text_pair) tuple or a {"text": ..., "text_pair": ...} dict; one call may mix
inputs with and without a pair (the server batches requests from many clients)."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from mergetool.core.errors import MergetoolError

Inputs = Union[str, Sequence[Union[str, tuple, dict]]]
TOKEN_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def read_items(inputs: Inputs) -> list[tuple]:
    """(text, text_pair or None) per input; anything else is one error naming the input."""
    if isinstance(inputs, str):
        inputs = [inputs]
    out = []
    for x in inputs:
        if isinstance(x, dict):
            x = (x.get("text"), x.get("text_pair"))
        elif isinstance(x, str):
            x = (x, None)
        if not (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                and (x[1] is None or isinstance(x[1], str))):
            raise MergetoolError(f"cannot read input {str(x)[:60]!r}", key="inputs",
                                 fix="give texts, (text, text_pair) tuples or {'text': ...} dicts")
        out.append(x)
    return out


def encode(tokenizer, max_length: int, items: list[tuple]) -> tuple[list[dict], list[bool]]:
    """Token ids per input, truncated to max_length, and whether each input was truncated."""
    out: list = [None] * len(items)
    for paired in (False, True):
        rows = [i for i, (_, b) in enumerate(items) if (b is not None) == paired]
        if not rows:
            continue
        texts = [items[i][0] for i in rows]
        pairs = [items[i][1] for i in rows] if paired else None
        enc = tokenizer(texts, pairs, truncation=False, verbose=False)
        keys = [k for k in TOKEN_KEYS if k in enc]
        for j, i in enumerate(rows):
            out[i] = {k: enc[k][j] for k in keys}
    long = [i for i, e in enumerate(out) if len(e["input_ids"]) > max_length]
    for paired in (False, True):
        rows = [i for i in long if (items[i][1] is not None) == paired]
        if rows:
            cut = tokenizer([items[i][0] for i in rows], [items[i][1] for i in rows] if paired else None,
                            truncation=True, max_length=max_length)
            for j, i in enumerate(rows):
                out[i] = {k: cut[k][j] for k in out[i]}
    truncated = [False] * len(items)
    for i in long:
        truncated[i] = True
    return out, truncated


def pad(encs: list[dict], rows: Sequence[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded batch of the given inputs, as tokenizer.pad builds it."""
    width = max(len(encs[i]["input_ids"]) for i in rows)
    out = {}
    for k in encs[rows[0]]:
        fill = pad_id if k == "input_ids" else 0
        out[k] = torch.tensor([encs[i][k] + [fill] * (width - len(encs[i][k])) for i in rows],
                              dtype=torch.long, device=device)
    return out


def length_batches(rows: Sequence[int], lengths: Sequence[int], batch_size: int, spread: float = 2.0) -> list[list[int]]:
    """`rows` (sorted longest first) cut into batches of at most batch_size, a new batch starting where an
    input is more than `spread` times shorter than its batch's longest: padding then wastes under half of a
    batch's compute (a 20-token tweet padded beside a 256-token article costs 13 times its own work)."""
    out: list[list[int]] = []
    for i in rows:
        if out and len(out[-1]) < batch_size and lengths[i] * spread >= lengths[out[-1][0]]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def per_input(manifest, given, n: int, key: str):
    """`task`: None, a task name or n task names / None; `head`: None or n task names / None. Names checked."""
    if given is None or (isinstance(given, str) and key == "task"):
        if given is not None:
            manifest.task(given)
        return given
    if isinstance(given, str):
        raise MergetoolError(f"{key} must give a task per input", key=key)
    given = list(given)
    if len(given) != n:
        raise MergetoolError(f"{len(given)} {key}s for {n} inputs", key=key)
    for t in set(given) - {None}:
        manifest.task(t)
    return given
