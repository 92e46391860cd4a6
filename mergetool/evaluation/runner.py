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

PEFT adapter tasks (LoRA, IA3) have no config.json: the module is the base's architecture with the
task's head (`adapter_module`), the frozen base weights are loaded once, the adapter's saved
modules (`modules_to_save`, e.g. the classifier) are the task's own tensors, and each component
writes the effective weights its expert's `dense()` gives under the base's names.
"""

from __future__ import annotations

import contextlib
import json
from typing import Callable, Optional

import torch

from mergetool.core.compat import skip_weight_init
from mergetool.core.errors import MergetoolError
from mergetool.evaluation.choice import TARGET_KEYS, choice_logprobs
from mergetool.evaluation.stages import staging
from mergetool.models.plan import Plan
from mergetool.models.presets import adapter_module_weight
from mergetool.models.source import PEFT_PREFIX, ModelSource


def pick_device(device: str = "auto") -> torch.device:
    """auto (CUDA when available, else CPU), cpu, cuda or cuda:N; anything else is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise MergetoolError(f"unknown device {device!r}", key="--device", fix="use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergetoolError(f"--device {device} was asked for but no CUDA device is available", key="--device",
                             fix="use --device auto or cpu")
    return dev


def bf16_native(device: torch.device) -> bool:
    """Does this device compute bf16 in hardware? CUDA with bf16 support, or a CPU with avx512_bf16 or
    AMX. Elsewhere bf16 autocast is emulated (measured on a 2-core AVX2 EPYC: 5-6x slower than fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_module(source: ModelSource) -> torch.nn.Module:
    """An empty module of the fine-tune's own architecture (config.json), in eval mode."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(source.path))
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForSequenceClassification
    return instantiate(cls, config).eval()


def instantiate(cls, config, *, skip_init: bool = False) -> torch.nn.Module:
    """`cls(config)` with its floating tensors in the config's dtype (fp32 when it names none), as
    `from_pretrained` would build it. `skip_init` skips the random weight init when every weight is
    loaded afterwards."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with skip_weight_init() if skip_init else contextlib.nullcontext():
            return cls(config)
    finally:
        torch.set_default_dtype(previous)


# PEFT task_type, else the recipe's task kind -> the transformers auto class of an adapter's module
AUTO_CLASS = {"SEQ_CLS": "AutoModelForSequenceClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
              "CAUSAL_LM": "AutoModelForCausalLM", "TOKEN_CLS": "AutoModelForTokenClassification",
              "sequence_classification": "AutoModelForSequenceClassification",
              "seq2seq_choice": "AutoModelForSeq2SeqLM", "causal_lm_choice": "AutoModelForCausalLM",
              "image_classification": "AutoModelForImageClassification"}


LABEL_KEYS = ("num_labels", "id2label", "label2id")


def adapter_class(source: ModelSource, kind: Optional[str] = None):
    """The auto class for an adapter's task: peft's task_type, else the task kind."""
    import transformers

    task_type = getattr(source.peft_config, "task_type", None)
    task_type = getattr(task_type, "value", task_type)
    name = AUTO_CLASS.get(task_type) or AUTO_CLASS.get(kind)
    if name is None:
        raise MergetoolError(f"cannot tell which model the adapter at {source.path} belongs to", file=source.path,
                             key="task_type", fix="save the adapter with a task_type (e.g. SEQ_CLS) in its config")
    return getattr(transformers, name)


def head_names(source: ModelSource) -> dict[str, str]:
    """An adapter's saved non-adapter tensors (its `modules_to_save`): normalised -> module name."""
    return {n: source.original_name(n).removeprefix(PEFT_PREFIX) for n in source.keys()
            if adapter_module_weight(n) is None}


def adapter_config(source: ModelSource, base: ModelSource, kind: Optional[str] = None) -> dict:
    """The task's model config: the base's config.json plus the task's labels (from a config.json
    saved next to the adapter, else num_labels from the saved head's shape)."""
    import transformers

    config = dict(base.config)
    own = source.path / "config.json"
    saved = json.loads(own.read_text()) if own.is_file() else {}
    config.update({k: saved[k] for k in LABEL_KEYS if k in saved})
    heads = head_names(source)
    if "id2label" in saved or not heads:
        return config
    cls = adapter_class(source, kind)
    with torch.device("meta"):
        probe = cls.from_config(transformers.AutoConfig.from_pretrained(str(base.path)))
    shapes = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    n_default = probe.config.num_labels
    for n, key in heads.items():
        saved, built = tuple(source.meta(n).shape), shapes.get(key)
        if built and saved != built and len(saved) == len(built) and built[0] == n_default and saved[1:] == built[1:]:
            n_labels = saved[0]
            config["id2label"] = {str(i): f"LABEL_{i}" for i in range(n_labels)}
            config["label2id"] = {f"LABEL_{i}": i for i in range(n_labels)}
            config["num_labels"] = n_labels
            break
    return config


def adapter_module(source: ModelSource, base: ModelSource, kind: Optional[str] = None):
    """(module, parameters the base did not provide): the base's weights in the task's architecture."""
    import transformers

    labels = {k: v for k, v in adapter_config(source, base, kind).items() if k in LABEL_KEYS}
    config = transformers.AutoConfig.from_pretrained(str(base.path), **labels)
    module, info = adapter_class(source, kind).from_pretrained(str(base.path), config=config,
                                                               output_loading_info=True)
    return module.eval(), set(info.get("missing_keys", ()))


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


def _adapter_names(plan: Plan, source: ModelSource, module: torch.nn.Module) -> dict[str, str]:
    """The base weights (and biases) an adapter's components write: normalised -> module name."""
    names, params = {}, checkpoint_params(module)
    for c in plan.components:
        for n in c.tensors:
            target = adapter_module_weight(n)
            key = adapter_module_weight(source.original_name(n).removeprefix(PEFT_PREFIX))
            names[target] = key
            bias = key.removesuffix("weight") + "bias"
            if bias in params:  # IA3 output scaling scales the bias too
                names[target.removesuffix("weight") + "bias"] = bias
    return names


def adapter_layout(plan: Plan, source: ModelSource, base: ModelSource, kind: Optional[str] = None):
    """For library export: (the task's config with `architectures`, module names of everything the
    task's module needs: adapted weights, heads, and the frozen base tensors it takes)."""
    import transformers

    config = adapter_config(source, base, kind)
    labels = {k: v for k, v in config.items() if k in LABEL_KEYS}
    with torch.device("meta"):
        module = adapter_class(source, kind).from_config(transformers.AutoConfig.from_pretrained(str(base.path),
                                                                                                  **labels))
    config["architectures"] = [type(module).__name__]
    names = _adapter_names(plan, source, module)
    names.update(head_names(source))
    keys = set(checkpoint_params(module))
    prefix = getattr(module, "base_model_prefix", "") or ""
    for n in base.keys():
        if n in names or not base.meta(n).is_float:
            continue
        orig = base.original_name(n)
        for key in (orig, f"{prefix}.{orig}", orig.removeprefix(prefix + ".")):
            if key in keys:
                names[n] = key
                break
    return config, names


class TaskModel:
    """One task's module; `load(l, members, tensors)` swaps component l's expert in."""

    def __init__(self, plan: Plan, source: ModelSource, own: dict[str, torch.Tensor], device: torch.device,
                 *, base: Optional[ModelSource] = None, kind: Optional[str] = None):
        self.plan = plan
        self.device = device
        self.adapter = source.is_adapter
        if self.adapter:
            if base is None:
                raise MergetoolError("a PEFT adapter task model needs the base model to build its module",
                                     file=source.path, key="models", fix="pass base= to TaskModel")
            module, missing = adapter_module(source, base, kind)
            self.module = module.to(device)
            self._name = _adapter_names(plan, source, self.module)
            self._name.update(head_names(source))
        else:
            self.module = build_module(source).to(device)
            self._name = {n: source.original_name(n) for c in plan.components for n in c.tensors}
            self._name.update({n: source.original_name(n) for n in own})
        self._params = checkpoint_params(self.module)
        self._untie()
        if self.adapter:
            self._check_heads(source, missing, own)
        else:
            self._check_covered(source)
        self.loaded: dict[int, tuple] = {}
        with torch.no_grad():
            for n, t in own.items():
                self._target(n).copy_(t)
        self._staging = staging(self.module)
        self.stages = self._stages()

    def _target(self, name: str) -> torch.Tensor:
        return self._params[self._name[name]]

    def tensor(self, name: str) -> torch.Tensor:
        """The module's parameter (or buffer) that holds tensor `name` (a component's or the task's own)."""
        return self._target(name)

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

    def _check_heads(self, source: ModelSource, missing: set, own: dict) -> None:
        """Every parameter the base lacks (the task's head) comes from the adapter's saved modules."""
        written = {self._name[n] for n in own}
        left = sorted(k for k in missing if k not in written and k in dict(self.module.named_parameters()))
        if left:
            raise MergetoolError(f"{len(left)} parameter(s) of {type(self.module).__name__} are neither in the base "
                                 f"nor saved with the adapter: {', '.join(left[:4])}", file=source.path, key="models",
                                 fix="train the adapter with modules_to_save for the head and list it in "
                                     "components.task_specific")

    def load(self, component: int, expert: tuple, tensors: dict[str, torch.Tensor]) -> None:
        """Copy an expert's tensors into the module; `expert` names what is loaded (its members, codec)."""
        if self.loaded.get(component) == expert:
            return
        names = tensors if self.adapter else self.plan.components[component].tensors  # adapters: dense() names
        with torch.no_grad():
            for n in names:
                self._target(n).copy_(tensors[n])
        self.loaded[component] = expert

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
