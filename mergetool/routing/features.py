"""Router features h(x): which extractor, the shared prefix of a library, and the shipped weights.

- `prefix`: the mean-pooled hidden state after the longest prefix of whole stages (embeddings, then
  encoder layers) in which every chain of every solution uses the same experts. The runtime computes
  it once per batch, routes on it and continues each chain from there. Nothing extra ships.
- `base`: the mean-pooled last hidden state of the pre-trained base; its weights (pooler dropped)
  ship as base-features.safetensors.
- `embeddings`: the mean-pooled output of the base's embedding layer; that layer ships.
- `auto`: `prefix` when the library has a shared prefix (and an encoder the runtime can stage), else `base`.
Pooling (router.pooling): `mean` over the real tokens (the default), or `mean_max`, mean and max side by side
(twice the width); the manifest records it (a library without it means `mean`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import torch

from mergetool.core.compat import skip_weight_init
from mergetool.core.errors import LibraryError
from mergetool.library.manifest import FeatureStorage, Manifest
from mergetool.library.safetensors_io import StreamWriter
from mergetool.routing.backbone import LAYER, pool, stage_of

FEATURE_FILE = "base-features.safetensors"
STAGEABLE_TYPES = ("bert", "roberta", "xlm-roberta")


def shared_prefix(m: Manifest) -> int:
    """Number of leading stages every chain (of every solution) shares whole; 0 if none."""
    names = [list(c.tensors) for c in m.components]
    n = 1 + max((int(hit.group(1)) for ns in names for x in ns if (hit := LAYER.match(x))), default=-1)
    stages = [{stage_of(x, n) for x in ns} for ns in names]
    head_stages = {stage_of(x, n) for t in m.tasks for x in t.heads}
    experts = [{chain[l] for s in m.solutions for chain in s.chains.values()} for l in range(len(names))]
    k = 0
    for s in range(n + 1):  # embeddings and the encoder layers; never what follows
        touching = [l for l, st in enumerate(stages) if s in st]
        if s in head_stages or not touching or any(len(experts[l]) > 1 for l in touching):
            break
        k = s + 1
    return k


def resolve(requested: str, m: Manifest) -> tuple[str, int]:
    """(extractor, prefix stages) for the recipe's `router.features` on this library."""
    k = shared_prefix(m) if m.base.model_type in STAGEABLE_TYPES else 0
    if requested in ("auto", "prefix"):
        return ("prefix", k) if k > 0 else ("base", 0)
    return requested, 0


def config_from_dict(data: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(**data)


def _embeddings_name(model: torch.nn.Module) -> str:
    if hasattr(model, "embeddings"):
        return "embeddings"
    emb = model.get_input_embeddings()
    return next(n for n, mod in model.named_modules() if mod is emb)


def write_features(kind: str, base_path: Path, folder: Path) -> FeatureStorage:
    """Ship what the `base` or `embeddings` extractor needs; `prefix` ships nothing."""
    if kind == "prefix":
        return FeatureStorage(file=None, params=0, bytes=0, share_of_base=0.0)
    from transformers import AutoModel
    from transformers.utils import logging


    logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(base_path))
    state = model.state_dict()
    if kind == "base":
        keep = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    else:
        name = _embeddings_name(model)
        keep = {k: v for k, v in state.items() if k.startswith(name + ".")}
    w = StreamWriter(folder / FEATURE_FILE)
    for k, v in keep.items():
        w.add(k, v)
    w.close()
    params = sum(v.numel() for v in keep.values() if v.is_floating_point())
    total = sum(p.numel() for p in model.parameters())
    return FeatureStorage(file=FEATURE_FILE, params=params, bytes=(folder / FEATURE_FILE).stat().st_size,
                          share_of_base=params / total)


class FeatureModel:
    """The `base` or `embeddings` extractor, loaded from the library's base-features file."""
    def __init__(self, kind: str, file: Path, base_config: dict, device: torch.device, pooling: str = "mean"):
        from safetensors.torch import load_file
        from transformers import AutoModel

        self.kind, self.pooling = kind, pooling
        with skip_weight_init():
            model = AutoModel.from_config(config_from_dict(base_config))
        state = load_file(str(file))
        if kind == "base":
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("pooler.") for k in missing):
                raise LibraryError(f"{file.name} does not match the base config ({(unexpected or missing)[:3]})",
                                   file=str(file), fix="re-export the library")
            if getattr(model, "pooler", None) is not None:
                model.pooler = None  # mean pooling: the pooler is not shipped
            self.module = model
        else:
            name = _embeddings_name(model)
            self.module = model.get_submodule(name)
            try:
                self.module.load_state_dict({k[len(name) + 1:]: v for k, v in state.items()}, strict=True)
            except RuntimeError as exc:
                raise LibraryError(f"{file.name} does not match the base config: {str(exc)[:200]}",
                                   file=str(file), fix="re-export the library") from None
            params = inspect.signature(self.module.forward).parameters
            self._token_types = "token_type_ids" in params
        self.module.to(device).eval()

    def __call__(self, batch: dict) -> torch.Tensor:
        if self.kind == "base":
            h = self.module(**batch).last_hidden_state
        elif isinstance(self.module, torch.nn.Embedding):
            h = self.module(batch["input_ids"])
        elif self._token_types:
            h = self.module(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        else:
            h = self.module(input_ids=batch["input_ids"])
        return pool(h, batch["attention_mask"], self.pooling)


def load_extractor(kind: str, lib_path: Path, file: Optional[str], base_config: dict,
                   device: torch.device, pooling: str = "mean") -> Optional[FeatureModel]:
    if kind == "prefix":
        return None
    if not file:
        raise LibraryError(f"the {kind} router features need their weights file", key="router.feature_storage",
                           fix="re-export the library")
    return FeatureModel(kind, Path(lib_path) / file, base_config, device, pooling)
