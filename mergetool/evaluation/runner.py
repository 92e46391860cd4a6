"""A task's model whose component parameters are swapped in per expert chain.

`TaskModel` holds one Hugging Face module per task (built from the fine-tune's config, its head
loaded once) and copies expert tensors into it. For the architectures in `stages.py` (BERT,
RoBERTa, ViT, CLIP vision, GPT-2, Llama) it can run stage by stage, embeddings → layer 0 … layer
N-1 → head, so hidden states after a stage can be cached and reused by every chain that shares
that prefix.

Checkpoint names are mapped to the module's own parameters through transformers' save-time
renaming (ViT's checkpoints say `encoder.layer.N`, its module `layers.N`). Tied weights (an LM head
sharing the input embeddings) follow the embeddings component; a checkpoint that stores both
tensors gets them untied, so each holds its own expert.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from mergetool.errors import MergetoolError
from mergetool.evaluation.choice import TARGET_KEYS, choice_logprobs
from mergetool.evaluation.stages import staging
from mergetool.models import ModelSource
from mergetool.plan import Plan


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
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


def checkpoint_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors by module name and by checkpoint name (transformers' renaming reversed)."""
    params = dict(module.state_dict(keep_vars=True))
    out = dict(params)
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: checkpoint names are module names
        return out
    ids = {id(v) for v in params.values()}
    out.update({k: v for k, v in revert_weight_conversion(module, params).items() if id(v) in ids})
    return out


class TaskModel:
    """One task's module; `load(l, members, tensors)` swaps component l's expert in."""

    def __init__(self, plan: Plan, source: ModelSource, own: dict[str, torch.Tensor], device: torch.device):
        self.plan = plan
        self.device = device
        self.module = build_module(source).to(device)
        self._name = {n: source.original_name(n) for c in plan.components for n in c.tensors}
        self._name.update({n: source.original_name(n) for n in own})
        self._params = checkpoint_params(self.module)
        self._untie()
        self._check_covered(source)
        self.loaded: dict[int, tuple[int, ...]] = {}
        with torch.no_grad():
            for n, t in own.items():
                self._target(n).copy_(t)
        self._staging = staging(self.module)
        self.stages = self._stages()

    def _target(self, name: str) -> torch.Tensor:
        return self._params[self._name[name]]

    def _untie(self) -> None:
        """Give a tensor of its own to every checkpoint name that shares one with another."""
        missing = [o for o in self._name.values() if o not in self._params]
        if missing:
            raise MergetoolError(f"{type(self.module).__name__} has no tensor {missing[0]!r} "
                                 f"({len(missing)} checkpoint tensor(s) unmatched)", key="models",
                                 fix="the checkpoint does not match its config.json architectures")
        seen: dict[int, str] = {}
        for orig in sorted(set(self._name.values())):
            t = self._params[orig]
            if id(t) not in seen:
                seen[id(t)] = orig
                continue
            if orig not in dict(self.module.named_parameters(remove_duplicate=False)):
                raise MergetoolError(f"tensors {seen[id(t)]!r} and {orig!r} are tied in the module", key="models",
                                     fix="save the fine-tune with tied weights stored once")
            owner, _, attr = orig.rpartition(".")
            setattr(self.module.get_submodule(owner), attr, torch.nn.Parameter(t.detach().clone(), requires_grad=False))
            self._params = checkpoint_params(self.module)

    def _check_covered(self, source: ModelSource) -> None:
        """Every parameter of the module is written by a component or the task's own tensors."""
        written = {id(self._params[o]) for o in self._name.values()}
        left = [n for n, p in self.module.named_parameters() if id(p) not in written]
        if left:
            raise MergetoolError(f"{len(left)} parameter(s) of {type(self.module).__name__} are in no component "
                                 f"and not task-specific: {', '.join(left[:4])}", file=source.path, key="models",
                                 fix="the checkpoint lacks them; save the full fine-tune")

    def load(self, component: int, members: tuple[int, ...], tensors: dict[str, torch.Tensor]) -> None:
        if self.loaded.get(component) == members:
            return
        with torch.no_grad():
            for n in self.plan.components[component].tensors:
                self._target(n).copy_(tensors[n])
        self.loaded[component] = members

    # --- staged execution ---------------------------------------------------------------------
    def _stages(self) -> Optional[list[list[int]]]:
        """Component indices per stage (embeddings, each layer, head), or None if not layerable.

        A head tied to the input embeddings lists the embeddings components in the head stage
        too, so they are (re)loaded when the head runs after a cached prefix."""
        if self._staging is None or self.plan.granularity != "component":
            return None
        stages: list[list[int]] = [[] for _ in range(self._staging.n_layers + 2)]
        for i, c in enumerate(self.plan.components):
            if c.stack is not None:
                return None
            if c.kind == "embeddings" or (c.layer is None and c.name.endswith("pre_norm")):
                stages[0].append(i)
            elif c.layer is not None:
                if c.layer >= self._staging.n_layers:
                    return None
                stages[c.layer + 1].append(i)
            else:
                stages[-1].append(i)
        if self._tied():
            stages[-1] = [i for i in stages[0] if self.plan.components[i].kind == "embeddings"] + stages[-1]
        return stages

    def _tied(self) -> bool:
        try:
            out, inp = self.module.get_output_embeddings(), self.module.get_input_embeddings()
        except (NotImplementedError, AttributeError):  # no embeddings to tie (image models)
            return False
        return out is not None and inp is not None and out.weight is inp.weight

    @property
    def layerable(self) -> bool:
        return self.stages is not None

    def stage_fn(self, s: int) -> Callable:
        last = len(self.stages) - 1
        if s == 0:
            return self._staging.embed
        if s < last:
            return self._staging.layer(s - 1)
        return self._staging.head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Plain full forward (every component must be loaded); choice batches give log-likelihoods."""
        if "target_ids" not in batch:
            return self.module(**batch).logits
        out = self.module(**{k: v for k, v in batch.items() if k not in TARGET_KEYS}, use_cache=False)
        logits = getattr(out, "logits", None)
        if logits is None or logits.dim() != 3:
            raise MergetoolError(f"{type(self.module).__name__} has no language-model head to score choices with",
                                 key="tasks", fix="choice kinds need a *ForCausalLM / *ForConditionalGeneration model")
        return choice_logprobs(logits, batch)
