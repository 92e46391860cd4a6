"""A task module's backbone and head, run apart; BERT-like encoders also run stage by stage.

Stages of an encoder: 0 = embeddings, i = encoder layer i-1 (1..N), N+1 = what follows (pooler, head).
The runtime runs a chain's backbone once per batch and each input's own task head on its rows; with
`prefix` routing it runs the shared stages once and continues each chain from the hidden states.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from mergetool.core.errors import LibraryError

LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


def backbone_of(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, module.base_model_prefix)


def set_backbone(module: torch.nn.Module, backbone: torch.nn.Module) -> None:
    setattr(module, module.base_model_prefix, backbone)


def stage_of(name: str, n_layers: int) -> int:
    """The stage a normalised tensor name belongs to."""
    if name.startswith("embeddings."):
        return 0
    m = LAYER.match(name)
    return int(m.group(1)) + 1 if m else n_layers + 1


def n_layers(backbone: torch.nn.Module) -> int:
    return len(backbone.encoder.layer)


def finish(backbone, h: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(sequence output, pooled output or None) after the last layer."""
    pooler = getattr(backbone, "pooler", None)
    return h, (pooler(h) if pooler is not None else None)


def full(backbone, batch: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The whole backbone from token ids: (sequence output, pooled output or None)."""
    out = backbone(**batch)
    return out.last_hidden_state, getattr(out, "pooler_output", None)


HEADS = ("bert", "roberta", "xlm-roberta", "distilbert")


def has_head(module: torch.nn.Module) -> bool:
    return getattr(module.config, "model_type", None) in HEADS and hasattr(module, "classifier")


def head(module: torch.nn.Module, seq: torch.Tensor, pooled: Optional[torch.Tensor]) -> torch.Tensor:
    """The task head on backbone outputs, as the model's own forward applies it."""
    kind = module.config.model_type
    if kind == "bert":
        return module.classifier(module.dropout(pooled))
    if kind in ("roberta", "xlm-roberta"):
        return module.classifier(seq)
    if kind == "distilbert":
        x = torch.relu(module.pre_classifier(seq[:, 0]))
        return module.classifier(module.dropout(x))
    raise ValueError(f"no split head for model type {kind!r}")


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over real (unpadded) tokens."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


POOLINGS = ("mean", "mean_max")


def pool(h: torch.Tensor, mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Router features from hidden states: `mean` (d values) or `mean_max` (mean then max over the real
    tokens, 2d values)."""
    mean = mean_pool(h, mask)
    if pooling == "mean":
        return mean
    if pooling != "mean_max":
        raise LibraryError(f"unknown router pooling {pooling!r}", key="router.pooling",
                           fix=f"use one of {', '.join(POOLINGS)}, or re-export the library")
    real = mask.unsqueeze(-1).bool()
    return torch.cat([mean, h.masked_fill(~real, float("-inf")).amax(1)], -1)


def repad(states: tuple, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-padded batch of prefix hidden states for `rows`, and its attention mask.

    states: (flat real tokens with a final zero row, start per input, length per input)."""
    flat, starts, lens = states
    r = torch.as_tensor(rows)
    n = lens[r]
    steps = torch.arange(int(n.max()))
    valid = steps[None, :] < n[:, None]
    idx = torch.where(valid, starts[r][:, None] + steps[None, :], flat.shape[0] - 1)
    return flat[idx.to(flat.device)], valid.long().to(flat.device)


def unloaded(module: nn.Module, loaded: set) -> list[str]:
    """State-dict names that put() did not set; tied aliases of set names count as set."""
    sd = module.state_dict(keep_vars=True)
    done = {id(sd[n]) for n in loaded if n in sd}
    return sorted(n for n, t in sd.items() if n not in loaded and id(t) not in done)


def _own_tensor(sub: Optional[nn.Module], leaf: str) -> tuple[Optional[torch.Tensor], bool]:
    """(the parameter or buffer `leaf` of `sub` itself, whether it is a parameter)."""
    if sub is None:
        return None, False
    params = dict(sub.named_parameters(recurse=False, remove_duplicate=False))
    if leaf in params:
        return params[leaf], True
    return dict(sub.named_buffers(recurse=False, remove_duplicate=False)).get(leaf), False


def put(module: nn.Module, name: str, tensor: torch.Tensor) -> str:
    """Make `tensor` the module's parameter (shared, not copied) or buffer `name`; returns name."""
    owner, _, leaf = name.rpartition(".")
    try:
        sub = module.get_submodule(owner) if owner else module
    except AttributeError:
        sub = None
    old, is_param = _own_tensor(sub, leaf)
    if old is None or tuple(old.shape) != tuple(tensor.shape):
        raise LibraryError(f"library tensor {name!r} has no place of shape {list(tensor.shape)} in "
                           f"{type(module).__name__}", key="experts", fix="re-export the library")
    if tensor.dtype != old.dtype:
        tensor = tensor.to(old.dtype)
    if not is_param:
        setattr(sub, leaf, tensor.data)  # an existing buffer keeps its persistence
        return name
    new = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
    for m in module.modules():  # every tied alias (e.g. lm_head.weight of shared embeddings) follows
        for k, v in list(m.named_parameters(recurse=False, remove_duplicate=False)):
            if v is old:
                setattr(m, k, new)
    return name
