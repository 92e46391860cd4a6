"""A task module's backbone and head, run apart; BERT-like encoders also run stage by stage.

Stages of an encoder: 0 = embeddings, i = encoder layer i-1 (1..N), N+1 = what follows (pooler, head).
The runtime runs a chain's backbone once per batch and each input's own task head on its rows; with
`prefix` routing it runs the shared stages once and continues each chain from the hidden states.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from mergetool.errors import LibraryError

LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


def backbone_of(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, module.base_model_prefix)


def set_backbone(module: torch.nn.Module, backbone: torch.nn.Module) -> None:
    setattr(module, module.base_model_prefix, backbone)


def no_init():
    """Skip transformers' random weight init (every tensor is loaded from the library afterwards)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return nullcontext()
    return no_init_weights()


def stage_of(name: str, n_layers: int) -> int:
    """The stage a normalised tensor name belongs to."""
    if name.startswith("embeddings."):
        return 0
    m = LAYER.match(name)
    return int(m.group(1)) + 1 if m else n_layers + 1


def stageable(backbone: torch.nn.Module) -> bool:
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    return (hasattr(backbone, "embeddings") and layers is not None
            and hasattr(backbone, "_create_attention_masks"))


def n_layers(backbone: torch.nn.Module) -> int:
    return len(backbone.encoder.layer)


def extended_mask(backbone, mask: torch.Tensor, h: torch.Tensor):
    return backbone._create_attention_masks(attention_mask=mask, encoder_attention_mask=None, embedding_output=h,
                                            encoder_hidden_states=None, past_key_values=None)[0]


def embed(backbone, batch: dict) -> torch.Tensor:
    """Stage 0, exactly as the evaluation engine runs it."""
    return backbone.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))


def run_layers(backbone, h: torch.Tensor, ext, start: int, stop: int) -> torch.Tensor:
    """Encoder layers [start, stop) on hidden states h."""
    for layer in backbone.encoder.layer[start:stop]:
        out = layer(h, ext)
        h = out[0] if isinstance(out, tuple) else out
    return h


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


def put(module: nn.Module, name: str, tensor: torch.Tensor) -> str:
    """Make `tensor` the module's parameter (shared, not copied) or buffer `name`; returns name."""
    owner, _, leaf = name.rpartition(".")
    try:
        sub = module.get_submodule(owner) if owner else module
    except AttributeError:
        sub = None
    old = None if sub is None else (sub._parameters.get(leaf) if leaf in sub._parameters else sub._buffers.get(leaf))
    if old is None or tuple(old.shape) != tuple(tensor.shape):
        raise LibraryError(f"library tensor {name!r} has no place of shape {list(tensor.shape)} in "
                           f"{type(module).__name__}", key="experts", fix="re-export the library")
    if tensor.dtype != old.dtype:
        tensor = tensor.to(old.dtype)
    if leaf in sub._parameters:
        new = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
        for m in module.modules():  # every tied alias (e.g. lm_head.weight of shared embeddings) follows
            for k, v in m._parameters.items():
                if v is old:
                    m._parameters[k] = new
    else:
        sub._buffers[leaf] = tensor.data
    return name
