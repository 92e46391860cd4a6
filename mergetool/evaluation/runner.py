"""A task's model whose component parameters are swapped in per expert chain.

`TaskModel` holds one Hugging Face module per task (built from the fine-tune's config, its head
loaded once) and copies expert tensors into it. For encoder classifiers (BERT, RoBERTa) it can run
stage by stage, embeddings → layer 0 … layer N-1 → head, so hidden states after a stage can be
cached and reused by every chain that shares that prefix.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from mergetool.models import ModelSource
from mergetool.plan import Plan


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from mergetool.errors import MergetoolError

        raise MergetoolError("--device cuda was asked for but no CUDA device is available", key="--device",
                             fix="use --device auto or cpu")
    return torch.device(device)


def build_module(source: ModelSource) -> torch.nn.Module:
    """An empty module of the fine-tune's own architecture (config.json), in eval mode."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(source.path))
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForSequenceClassification
    model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    return model.eval()


class TaskModel:
    """One task's module; `load(l, members, tensors)` swaps component l's expert in."""

    def __init__(self, plan: Plan, source: ModelSource, own: dict[str, torch.Tensor], device: torch.device):
        self.plan = plan
        self.device = device
        self.module = build_module(source).to(device)
        self._params = dict(self.module.state_dict(keep_vars=True))
        self._name = {n: source.original_name(n) for c in plan.components for n in c.tensors}
        self._name.update({n: source.original_name(n) for n in own})
        self.loaded: dict[int, tuple[int, ...]] = {}
        with torch.no_grad():
            for n, t in own.items():
                self._target(n).copy_(t)
        self.stages = self._stages()

    def _target(self, name: str) -> torch.Tensor:
        return self._params[self._name[name]]

    def load(self, component: int, members: tuple[int, ...], tensors: dict[str, torch.Tensor]) -> None:
        if self.loaded.get(component) == members:
            return
        with torch.no_grad():
            for n in self.plan.components[component].tensors:
                self._target(n).copy_(tensors[n])
        self.loaded[component] = members

    # --- staged execution ---------------------------------------------------------------------
    def _stages(self) -> Optional[list[list[int]]]:
        """Component indices per stage (embeddings, each layer, head), or None if not layerable."""
        backbone = getattr(self.module, "bert", None) or getattr(self.module, "roberta", None)
        if backbone is None or self.plan.granularity != "component":
            return None
        n_layers = len(backbone.encoder.layer)
        stages: list[list[int]] = [[] for _ in range(n_layers + 2)]
        for i, c in enumerate(self.plan.components):
            if c.kind == "embeddings":
                stages[0].append(i)
            elif c.layer is not None and c.stack is None:
                stages[c.layer + 1].append(i)
            else:
                stages[-1].append(i)
        return stages

    @property
    def layerable(self) -> bool:
        return self.stages is not None

    def stage_fn(self, s: int) -> Callable:
        m = self.module
        backbone = getattr(m, "bert", None) or getattr(m, "roberta", None)
        last = len(self.stages) - 1
        if s == 0:
            def embed(batch):
                h = backbone.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
                mask = backbone._create_attention_masks(attention_mask=batch["attention_mask"],
                                                        encoder_attention_mask=None, embedding_output=h,
                                                        encoder_hidden_states=None, past_key_values=None)[0]
                return h, mask
            return embed
        if s < last:
            layer = backbone.encoder.layer[s - 1]
            return lambda state: (layer(state[0], state[1]), state[1])
        if hasattr(m, "bert"):
            return lambda state: m.classifier(m.dropout(backbone.pooler(state[0])))
        return lambda state: m.classifier(state[0])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Plain full forward (every component must be loaded)."""
        return self.module(**batch).logits
