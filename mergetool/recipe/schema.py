"""The recipe schema: frozen pydantic models, in the style of mergekit's config.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from mergetool.core.errors import RecipeError

PRESETS = ("auto", "bert", "roberta", "distilbert", "gpt2", "llama", "vit", "clip_vision", "t5", "custom")
GRANULARITIES = ("component", "layer", "kind", "model")
KINDS = ("embeddings", "attention", "mlp", "norm", "other")
TASK_KINDS = ("sequence_classification", "image_classification", "causal_lm_choice", "seq2seq_choice", "custom")
METRICS = ("accuracy", "f1", "f1_macro", "matthews", "pearson_spearman", "pearson", "spearman", "acc_norm")
CHOICE_METRICS = ("accuracy", "acc_norm", "f1", "f1_macro", "matthews")  # for the *_choice kinds
DEFAULT_TASK_SPECIFIC = (r"^classifier\.", r"^pre_classifier\.", r"^score\.", r"^qa_outputs\.")
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")  # ≤ 64: names become file names (heads-<task>)


class Strict(BaseModel):
    """Base of all recipe models: immutable, unknown keys refused, floats finite (no NaN or inf)."""
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"regex {pattern!r} does not compile: {exc}") from None
    return pattern


class ModelEntry(Strict):
    name: str = Field(description="Unique task name; must also appear under `tasks`.")
    model: str = Field(description="Full fine-tune directory, PEFT adapter directory, hub id or pkg:MODULE.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Per-model merge parameters, e.g. weight.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TASK_NAME.match(v):
            raise ValueError("task names are 1-64 letters, digits, '_', '.', '-' and start with a letter or digit")
        return v


class Rule(Strict):
    name: str = Field(description="Component name; '{layer}' is filled from the (?P<layer>) group.")
    pattern: str = Field(description="Regex on the normalised tensor name; (?P<layer>\\d+) gives the layer.")
    kind: Literal[KINDS] = "other"  # type: ignore[valid-type]

    _check = field_validator("pattern")(classmethod(lambda cls, v: _check_regex(v)))


class ComponentsConfig(Strict):
    preset: Literal[PRESETS] = "auto"  # type: ignore[valid-type]
    granularity: Literal[GRANULARITIES] = "component"  # type: ignore[valid-type]
    rules: tuple[Rule, ...] = ()
    task_specific: tuple[str, ...] = DEFAULT_TASK_SPECIFIC

    @field_validator("task_specific")
    @classmethod
    def _regexes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_regex(p) for p in v)

    @model_validator(mode="after")
    def _custom_needs_rules(self) -> "ComponentsConfig":
        if self.preset == "custom" and not self.rules:
            raise ValueError("preset 'custom' needs at least one entry in components.rules")
        return self


class MergeConfig(Strict):
    method: str = Field("task_arithmetic", description="Any mergekit method; aliases wa, ta, tm, bc.")
    parameters: dict[str, Any] = Field(default_factory=dict)


class QuantizationConfig(Strict):
    bits: int = Field(8, description="2..8, or 32 / none to disable.")
    granularity: Literal["per_tensor", "per_channel"] = "per_channel"
    mode: Literal["conditional", "always", "never"] = "conditional"

    @field_validator("bits", mode="before")
    @classmethod
    def _bits(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "off", "32")):
            return 32
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("bits must be an integer 2..8, or 32 / none")
        if not (2 <= v <= 8 or v == 32):
            raise ValueError(f"bits must be 2..8, or 32 / none, not {v}")
        return v

    @property
    def enabled(self) -> bool:
        return self.bits <= 8 and self.mode != "never"


CODEC_NAMES = ("full", "delta_quant", "delta_switch", "low_rank")


class CodecChoice(Strict):
    """One entry of the `codecs:` menu. `full` is the paper's whole-expert quantisation with the settings of
    `quantization:`; the others store an expert as a code of its delta from the stored base."""
    kind: Literal[CODEC_NAMES] = "full"  # type: ignore[valid-type]
    bits: Optional[int] = Field(None, ge=1, le=8, description="delta_quant: 1 (BitDelta: sign · row scale)..8")
    density: Optional[float] = Field(None, gt=0, le=1, description="delta_switch: share of entries kept")
    scale: Literal["tensor", "row"] = Field("tensor", description="delta_switch: one scale per tensor or row")
    rank: Optional[int] = Field(None, ge=1, description="low_rank: SVD rank of the delta")

    @model_validator(mode="before")
    @classmethod
    def _from_menu(cls, v: Any) -> Any:
        """`full`, or a one-key mapping {name: {settings}} as written in the recipe."""
        if isinstance(v, str):
            return {"kind": v}
        if isinstance(v, dict) and len(v) == 1 and "kind" not in v:
            (name, settings), = v.items()
            if settings is None:
                settings = {}
            if not isinstance(settings, dict):
                raise ValueError(f"the settings of codec {str(name)[:40]!r} must be a mapping, "
                                 "e.g. {delta_quant: {bits: 2}}")
            return {"kind": name, **settings}
        if isinstance(v, dict) and ("kind" in v or not v):
            return v
        raise ValueError("a codec is `full` or one mapping such as {delta_switch: {density: 0.05}}")

    @model_validator(mode="after")
    def _settings_match_kind(self) -> "CodecChoice":
        needs = {"full": (), "delta_quant": ("bits",), "delta_switch": ("density",), "low_rank": ("rank",)}
        wanted = needs[self.kind]
        for key in ("bits", "density", "rank"):
            given = getattr(self, key) is not None
            if key in wanted and not given:
                raise ValueError(f"codec {self.kind} needs `{key}`")
            if key not in wanted and given:
                raise ValueError(f"codec {self.kind} takes no `{key}`")
        if self.scale != "tensor" and self.kind != "delta_switch":
            raise ValueError(f"codec {self.kind} takes no `scale`")
        return self

    @property
    def label(self) -> str:
        """Short name for reports: full, delta_quant:2, delta_switch:0.05, low_rank:16."""
        value = {"delta_quant": self.bits, "delta_switch": self.density, "low_rank": self.rank}.get(self.kind)
        return self.kind if value is None else f"{self.kind}:{value:g}" + (":row" if self.scale == "row" else "")


class DataSplit(Strict):
    path: str
    text: Optional[str] = "text"
    text_pair: Optional[str] = None
    label: str = "label"
    image: Optional[str] = None
    choices: Optional[str] = None
    limit: Optional[int] = Field(None, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _has_input(self) -> "DataSplit":
        if not (self.text or self.image):
            raise ValueError("a split needs a `text` or an `image` column")
        return self


class TaskConfig(Strict):
    kind: Literal[TASK_KINDS] = "sequence_classification"  # type: ignore[valid-type]
    metric: str = "accuracy"
    validation: Optional[DataSplit] = None
    test: Optional[DataSplit] = None
    router: Optional[DataSplit] = None
    max_length: int = Field(128, gt=0)
    batch_size: int = Field(64, gt=0)
    evaluator: Optional[str] = Field(None, description="'module:function' for kind: custom.")

    @model_validator(mode="after")
    def _consistent(self) -> "TaskConfig":
        if self.validation is None:
            raise ValueError("every task needs `validation` data: the search scores groupings on it")
        if self.kind == "custom":
            if not self.evaluator or ":" not in self.evaluator:
                raise ValueError("kind 'custom' needs `evaluator: \"module:function\"`")
        elif self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        elif self.kind.endswith("_choice") and self.metric not in CHOICE_METRICS:
            raise ValueError(f"kind {self.kind!r} scores with one of {', '.join(CHOICE_METRICS)}")
        elif self.metric == "acc_norm" and not self.kind.endswith("_choice"):
            raise ValueError("metric 'acc_norm' (length-normalised accuracy) is for the *_choice kinds")
        column = {"image_classification": "image"}.get(self.kind, "choices" if self.kind.endswith("_choice") else None)
        for name in ("validation", "test"):
            split = getattr(self, name)
            if column and split is not None and not getattr(split, column):
                raise ValueError(f"kind {self.kind!r} needs `{column}: <column>` in its {name} split")
        return self


class RayConfig(Strict):
    address: str = "auto"
    num_workers: int = Field(2, ge=1)


class RacingConfig(Strict):
    """Racing: score candidates on a fixed subset of validation inputs first (whole batches, stratified
    by label), and complete only those whose upper confidence bound could beat the front at their C."""

    fraction: float = Field(0.25, gt=0, le=1, description="share of each task's validation inputs in the subset")
    confidence: float = Field(0.95, gt=0, lt=1, description="one-sided confidence of the upper bound")
    margin: float = Field(0.0, ge=0, description="extra slack added to the upper bound")


class SearchConfig(Strict):
    population: int = Field(20, ge=2)
    evaluations: int = Field(300, ge=1)
    surrogate: Literal["random_forest", "none"] = "random_forest"
    init: Literal["kmeans", "random"] = "kmeans"
    crossover: Literal["one_point", "uniform"] = Field(
        "one_point", description="one_point: cut along the components in forward order (keeps chain prefixes); "
                                 "uniform: each component column from either parent")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    executor: Literal["local", "ray"] = "local"
    ray: RayConfig = RayConfig()
    racing: Optional[RacingConfig] = Field(RacingConfig(), description="null (or --no-racing) evaluates every "
                                           "candidate on all validation inputs")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: screen under bf16 autocast; the final "
                                               "front is re-scored at fp32")

    @field_validator("racing", mode="before")
    @classmethod
    def _racing_switch(cls, v: Any) -> Any:
        return {True: {}, False: None}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _budget(self) -> "SearchConfig":
        if self.evaluations < self.population:
            raise ValueError(
                f"evaluations ({self.evaluations}) is smaller than population ({self.population}); "
                "the initial population alone needs that many"
            )
        return self


class RouterConfig(Strict):
    features: Literal["auto", "prefix", "base", "embeddings"] = "auto"
    pooling: Literal["mean", "mean_max"] = Field("mean", description=(
        "How hidden states become router features: mean over the tokens, or mean and max side by side."))
    hidden: tuple[int, ...] = (256, 128)
    epochs: int = Field(30, ge=1)
    lr: float = Field(5.0e-4, gt=0)
    max_per_task: int = Field(1000, ge=1)

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) != 2 or any(h <= 0 for h in v):
            raise ValueError("hidden is two positive widths: the router is a 3-layer MLP")
        return v


class Recipe(Strict):
    name: str
    base_model: str
    models: tuple[ModelEntry, ...] = Field(min_length=2)
    components: ComponentsConfig = ComponentsConfig()
    merge: MergeConfig = MergeConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    codecs: tuple[CodecChoice, ...] = Field((CodecChoice(),), description=(
        "The menu the search picks a codec from, per component: full (the quantization block), "
        "{delta_quant: {bits: 1..8}}, {delta_switch: {density: (0, 1], scale: tensor|row}}, {low_rank: {rank: r}}."))
    base_storage: Literal["fp32", "fp16", "int8"] = Field("fp32", description=(
        "Precision of the base components stored for delta codecs (their bytes count in C)."))
    tasks: dict[str, TaskConfig]
    search: SearchConfig = SearchConfig()
    router: RouterConfig = RouterConfig()
    output: Optional[str] = None

    _path: Optional[Path] = PrivateAttr(None)
    _text: str = PrivateAttr("")
    _positions: dict = PrivateAttr(default_factory=dict)

    @field_validator("codecs")
    @classmethod
    def _distinct_codecs(cls, v: tuple) -> tuple:
        if not v:
            raise ValueError("the codec menu is empty; leave `codecs` out for the paper's `full`, or list some")
        labels = [c.label for c in v]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"codec {dupes[0]} is listed twice")
        return v

    @property
    def uses_delta_codecs(self) -> bool:
        return any(c.kind != "full" for c in self.codecs)

    @model_validator(mode="after")
    def _tasks_match_models(self) -> "Recipe":
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate task name(s) in models: {', '.join(dupes)}")
        missing = [n for n in names if n not in self.tasks]
        if missing:
            raise ValueError(f"models {missing} have no entry under `tasks`")
        extra = [n for n in self.tasks if n not in names]
        if extra:
            raise ValueError(f"tasks {extra} have no model under `models`")
        return self

    def with_source(self, path: Optional[Path], text: str, positions: dict) -> "Recipe":
        """This recipe, remembering the file it was read from (for located errors and the run's hash)."""
        self._path, self._text, self._positions = path, text, positions
        return self

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    @property
    def path(self) -> Optional[Path]:
        return self._path

    @property
    def text(self) -> str:
        return self._text

    @property
    def run_dir(self) -> Path:
        base = self._path.parent if self._path else Path.cwd()
        return Path(self.output) if self.output and Path(self.output).is_absolute() else base / (
            self.output or f"runs/{self.name}")

    def position(self, loc: tuple) -> tuple[Optional[int], Optional[int]]:
        """1-based (line, column) of the deepest known key along `loc`."""
        loc = tuple(loc)
        while loc:
            if loc in self._positions:
                return self._positions[loc]
            loc = loc[:-1]
        return self._positions.get((), (None, None))

    def error(self, message: str, key: Union[str, tuple], fix: Optional[str] = None, cls=None):
        """A located error about `key` (a dotted string or a loc tuple) of this recipe."""
        loc = tuple(key.split(".")) if isinstance(key, str) else tuple(key)
        loc = tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in loc)
        line, col = self.position(loc)
        label = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        return (cls or RecipeError)(message, file=self._path, key=label, fix=fix, line=line, col=col)


def json_schema() -> dict:
    """The JSON Schema of recipes, for editor autocompletion."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mergetool recipe"
    return schema

