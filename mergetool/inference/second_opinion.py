"""A second opinion on inputs the router is unsure of, and the per-input results of a prediction.

With a threshold τ, an input whose top router probability is below τ also runs the router's second
choice: its chain, with its own head. Of the two (task, label) pairs the one with the larger
router probability × head confidence (the head's max softmax) wins. Off by default (τ = None); only
routed inputs (no task given) take part. Costs one more forward of the second chain per such input.
"""

from __future__ import annotations

from typing import Optional

import torch

from mergetool.core.errors import MergetoolError
from mergetool.routing.router import SECOND_OPINION_RULE as RULE  # noqa: F401 (re-exported)


def check_threshold(threshold: Optional[float], key: str = "second_opinion") -> Optional[float]:
    """None (off) or a probability in (0, 1]."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise MergetoolError(f"the second-opinion threshold must be in (0, 1], got {threshold!r}", key=key,
                             fix="pass a router probability such as 0.9, or leave it out")
    return float(threshold)


def unsure(probs: list, routed: list[bool], threshold: float) -> list[int]:
    """Routed inputs whose top router probability is below the threshold."""
    return [i for i, (p, r) in enumerate(zip(probs, routed)) if r and max(p) < threshold]


def runner_up(probs: list[float], names: list[str]) -> str:
    """The router's second choice."""
    return names[int(torch.tensor(probs).topk(2).indices[1])]


def decide(p_first: float, conf_first: float, p_second: float, conf_second: float) -> bool:
    """Whether the second choice wins: router probability × head confidence, ties to the first."""
    return p_second * conf_second > p_first * conf_first


def second_opinion(lib, rows: list[int], encs: list[dict], tasks: list[str], probs: list, logits: list,
                   states, batch_size: int) -> list[int]:
    """Run the runner-up chain (own head) for `rows`; replace tasks[i] and logits[i] where it wins.
    Returns the rows whose answer changed."""
    names = lib.router_tasks
    alt = list(tasks)
    for i in rows:
        alt[i] = runner_up(probs[i], names)
    alt_logits = lib.run_chains(rows, encs, alt, alt, states, batch_size)
    changed = []
    for i in rows:
        first, second = names.index(tasks[i]), names.index(alt[i])
        if decide(probs[i][first], logits[i][2], probs[i][second], alt_logits[i][2]):
            tasks[i], logits[i] = alt[i], alt_logits[i]
            changed.append(i)
    return changed


def reconsider(lib, asked: list[int], encs, tasks: list, heads: list, probs, logits: list, states,
               batch_size: int) -> tuple[list, list, list[int]]:
    """(tasks, heads, asked) after the second opinion on the `asked` rows (counted in lib.stats)."""
    if not asked:
        return tasks, heads, asked
    tasks = list(tasks)
    changed = set(second_opinion(lib, asked, encs, tasks, probs, logits, states, batch_size))
    heads = [tasks[i] if i in changed else h for i, h in enumerate(heads)]
    lib.stats["second_opinion"] += len(asked)
    lib.stats["second_opinion_changed"] += len(changed)
    return tasks, heads, asked


def result(labels: Optional[list], task: str, out: tuple, with_logits: bool) -> dict:
    """{task, label, label_id, score[, logits]} of one input from its head's (logits, arg max, probability)."""
    logits, i, p = out
    if len(logits) == 1 and not (labels and len(labels) > 1):  # regression
        res = {"task": task, "label": logits[0], "label_id": None, "score": logits[0]}
    else:
        res = {"task": task, "label": labels[i] if labels and i < len(labels) else str(i), "label_id": i, "score": p}
    if with_logits:
        res["logits"] = logits
    return res


def store(out: torch.Tensor, pos: list[int], rows: list[int], results: list) -> None:
    """(logits, arg max, its softmax probability) per row of a head's output."""
    out = out.float().cpu()
    top = torch.softmax(out, -1).max(-1)
    for j, lg, i, p in zip(pos, out.tolist(), top.indices.tolist(), top.values.tolist()):
        results[rows[j]] = (lg, i, p)
