"""Component presets: map every normalised tensor name to (stack, kind, layer).

Each preset is an ordered list of regexes; the first match wins. `other` is an explicit allow-list
per preset (BERT's pooler, an LM head, CLIP's projection): there is no catch-all, so a tensor no
rule knows is reported as uncovered instead of being silently merged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from mergetool.recipe.schema import Rule

_L = r"(?P<layer>\d+)"


@dataclass(frozen=True)
class Slot:
    """Where one tensor belongs at the finest (component) granularity."""

    kind: str  # embeddings | attention | mlp | norm | other
    layer: Optional[int] = None
    stack: Optional[str] = None
    name: Optional[str] = None  # for non-layer pieces: embeddings, final_norm, pooler, ...

    def component_name(self) -> str:
        stack = f"{self.stack}." if self.stack else ""
        if self.name:
            return stack + self.name
        return f"{stack}layer.{self.layer}.{self.kind}"


def _p(pattern: str, kind: str, name: Optional[str] = None) -> tuple[re.Pattern, str, Optional[str]]:
    return re.compile(pattern), kind, name


_BERT = [
    _p(r"^embeddings\.", "embeddings", "embeddings"),
    _p(rf"^encoder\.layer\.{_L}\.attention\.(self|output\.dense)\.", "attention"),
    _p(rf"^encoder\.layer\.{_L}\.(attention\.output|output)\.LayerNorm\.", "norm"),
    _p(rf"^encoder\.layer\.{_L}\.(intermediate|output)\.dense\.", "mlp"),
    _p(r"^pooler\.dense\.", "other", "pooler"),
]
_ENC_DEC = r"(?P<stack>encoder|decoder)"

PRESETS: dict[str, dict] = {
    "bert": {"model_types": ("bert",), "rules": _BERT},
    "roberta": {"model_types": ("roberta", "xlm-roberta"), "rules": _BERT},
    "distilbert": {"model_types": ("distilbert",), "rules": [
        _p(r"^embeddings\.", "embeddings", "embeddings"),
        _p(rf"^transformer\.layer\.{_L}\.attention\.(q|k|v|out)_lin\.", "attention"),
        _p(rf"^transformer\.layer\.{_L}\.(sa|output)_layer_norm\.", "norm"),
        _p(rf"^transformer\.layer\.{_L}\.ffn\.lin[12]\.", "mlp"),
    ]},
    "gpt2": {"model_types": ("gpt2",), "rules": [
        _p(r"^(wte|wpe)\.", "embeddings", "embeddings"),
        _p(rf"^h\.{_L}\.attn\.(c_attn|c_proj|q_attn)\.", "attention"),
        _p(rf"^h\.{_L}\.ln_(1|2|cross_attn)\.", "norm"),
        _p(rf"^h\.{_L}\.mlp\.(c_fc|c_proj)\.", "mlp"),
        _p(r"^ln_f\.", "norm", "final_norm"),
        _p(r"^lm_head\.", "other", "lm_head"),
    ]},
    "llama": {"model_types": ("llama", "mistral", "qwen2", "qwen3"), "rules": [
        _p(r"^embed_tokens\.", "embeddings", "embeddings"),
        _p(rf"^layers\.{_L}\.self_attn\.(q|k|v|o)_proj\.", "attention"),
        _p(rf"^layers\.{_L}\.self_attn\.(q|k)_norm\.", "attention"),
        _p(rf"^layers\.{_L}\.mlp\.(gate|up|down)_proj\.", "mlp"),
        _p(rf"^layers\.{_L}\.(input_layernorm|post_attention_layernorm)\.", "norm"),
        _p(r"^norm\.", "norm", "final_norm"),
        _p(r"^lm_head\.", "other", "lm_head"),
    ]},
    "vit": {"model_types": ("vit",), "rules": [
        _p(r"^embeddings\.", "embeddings", "embeddings"),
        _p(rf"^encoder\.layer\.{_L}\.attention\.(attention|output\.dense)\.", "attention"),
        _p(rf"^encoder\.layer\.{_L}\.layernorm_(before|after)\.", "norm"),
        _p(rf"^encoder\.layer\.{_L}\.(intermediate|output)\.dense\.", "mlp"),
        _p(r"^layernorm\.", "norm", "final_norm"),
        _p(r"^pooler\.dense\.", "other", "pooler"),
    ]},
    "clip_vision": {"model_types": ("clip", "clip_vision_model"), "rules": [
        _p(r"^embeddings\.", "embeddings", "embeddings"),
        _p(r"^pre_layrnorm\.", "norm", "pre_norm"),
        _p(rf"^encoder\.layers\.{_L}\.self_attn\.(q|k|v|out)_proj\.", "attention"),
        _p(rf"^encoder\.layers\.{_L}\.layer_norm[12]\.", "norm"),
        _p(rf"^encoder\.layers\.{_L}\.mlp\.fc[12]\.", "mlp"),
        _p(r"^post_layernorm\.", "norm", "final_norm"),
        _p(r"^visual_projection\.", "other", "projection"),
    ]},
    "t5": {"model_types": ("t5", "mt5"), "rules": [
        _p(r"^shared\.", "embeddings", "embeddings"),
        _p(rf"^{_ENC_DEC}\.embed_tokens\.", "embeddings", "embeddings"),
        _p(rf"^{_ENC_DEC}\.block\.{_L}\.layer\.\d+\.(SelfAttention|EncDecAttention)\.", "attention"),
        _p(rf"^{_ENC_DEC}\.block\.{_L}\.layer\.\d+\.DenseReluDense\.", "mlp"),
        _p(rf"^{_ENC_DEC}\.block\.{_L}\.layer\.\d+\.layer_norm\.", "norm"),
        _p(rf"^{_ENC_DEC}\.final_layer_norm\.", "norm", "final_norm"),
        _p(r"^lm_head\.", "other", "lm_head"),
    ]},
}

STACK_ORDER = {None: 0, "encoder": 0, "decoder": 1}
KIND_ORDER = {"embeddings": 0, "attention": 1, "norm": 2, "mlp": 3, "other": 4, "layer": 5, "model": 6}


def preset_for(model_type: Optional[str]) -> Optional[str]:
    """The preset `auto` picks for a config model_type, or None."""
    for name, preset in PRESETS.items():
        if model_type in preset["model_types"]:
            return name
    return None


class Classifier:
    """Maps tensor names to slots with user rules first, then the preset's rules."""

    def __init__(self, preset: str, rules: Sequence[Rule] = ()):
        self.preset = preset
        self.user = [(re.compile(r.pattern), r) for r in rules]
        self.rules = PRESETS[preset]["rules"] if preset in PRESETS else []
        self.used: set[int] = set()  # indices of the user rules that matched a tensor

    def slot(self, name: str) -> Optional[Slot]:
        for i, (rx, rule) in enumerate(self.user):
            m = rx.search(name)
            if m:
                self.used.add(i)
                groups = {k: v for k, v in m.groupdict().items() if v is not None}
                layer = int(groups["layer"]) if "layer" in groups else None
                label = rule.name.format(**groups) if "{" in rule.name else rule.name
                return Slot(kind=rule.kind, layer=layer, stack=groups.get("stack"), name=label)
        for rx, kind, label in self.rules:
            m = rx.search(name)
            if m:
                groups = m.groupdict()
                layer = int(groups["layer"]) if groups.get("layer") is not None else None
                return Slot(kind=kind, layer=layer, stack=groups.get("stack"), name=label)
        return None


def coarsen(slot: Slot, granularity: str) -> tuple[str, str, Optional[int], Optional[str]]:
    """(component name, kind, layer, stack) of a slot at the given granularity."""
    stack = f"{slot.stack}." if slot.stack else ""
    if granularity == "component":
        return slot.component_name(), slot.kind, slot.layer, slot.stack
    if granularity == "layer":
        if slot.layer is None:
            return slot.component_name(), slot.kind, None, slot.stack
        return f"{stack}layer.{slot.layer}", "layer", slot.layer, slot.stack
    if granularity == "kind":
        return f"{stack}{slot.kind}", slot.kind, None, slot.stack
    return "model", "model", None, None


def sort_key(kind: str, layer: Optional[int], stack: Optional[str], name: str) -> tuple:
    """Forward order: embeddings, then layers in order (stack by stack), then final pieces."""
    if layer is not None:
        position = layer
    elif kind == "embeddings" or name.endswith("pre_norm"):
        position = -1
    else:
        position = 10**6
    stack_rank = STACK_ORDER.get(stack, 2) if position != -1 else -1
    return (stack_rank, position, KIND_ORDER.get(kind, 9), name)


def adapter_module_weight(name: str) -> Optional[str]:
    """`...query.lora_A.weight` -> `...query.weight`: the base weight an adapter tensor modifies."""
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".ia3_l"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    return None
