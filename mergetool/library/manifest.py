"""manifest.json of an expert library, formats v1 and v2: frozen pydantic models and safe file names.

Format v2 (issue #13) adds delta-coded experts: a StoredTensor's `codec` (the codec's `info()`: what its
parts are, mergetool.merge.codecs), a StoredExpert's `codec` label, and the manifest's `base_storage` and
`stored_base` (the base components some delta expert needs, stored once). A library without delta experts
is written as v1, with none of these fields (each is left out of the JSON while it has its default).

Every file name in a manifest (the `files` map, shard and config references) is checked here:
a plain name inside the library folder (no absolute path, no `..`, no sub-folder), on the
allow-list below. A Manifest instance therefore never points outside its library.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer

from mergetool.core.errors import LibraryError
from mergetool.merge.codecs import stored_layout

REEXPORT = "re-export the library; it may be corrupt or tampered with"  # the fix of every tampered-library error

FORMAT_VERSION = 2  # libraries of delta-coded experts; others are still written as v1
FORMAT_VERSIONS = (1, 2)  # what this mergetool reads
MANIFEST = "manifest.json"
README = "README.md"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja",
)
_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")]  # task names, expert ids
Count = Annotated[int, Field(ge=1)]
Dim = Annotated[int, Field(ge=0)]


def allowed_name(name: str) -> bool:
    """The allow-list: manifest.json, *.safetensors, *.json configs, tokenizer files, README.md."""
    return name in (MANIFEST, README) or name in TOKENIZER_FILES or name.endswith((".safetensors", ".json"))


def check_name(name: str) -> str:
    """A file name that stays inside the library, or ValueError saying why not."""
    if not isinstance(name, str) or not name:
        raise ValueError("empty file name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ValueError("an absolute path is not allowed in a library")
    if ".." in re.split(r"[/\\]", name):
        raise ValueError("a path points outside the library")
    if "/" in name or "\\" in name or not _PLAIN.match(name) or len(name) > 255:
        raise ValueError("a file name is not a plain file name inside the library")
    if not allowed_name(name):
        raise ValueError("a file is not an allowed library file (manifest.json, *.safetensors, *.json, "
                         "tokenizer files, README.md)")
    return name


FileName = Annotated[str, AfterValidator(check_name)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    OMITTED_AT_DEFAULT: ClassVar[tuple[str, ...]] = ()  # v2 fields: left out of the JSON at their default

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler):
        data = handler(self)
        for name in self.OMITTED_AT_DEFAULT:
            if isinstance(data, dict) and getattr(self, name) == type(self).model_fields[name].get_default(
                    call_default_factory=True):
                data.pop(name, None)
        return data


class FileEntry(Frozen):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class StoredTensor(Frozen):
    """One tensor in a shard: keys `prefix + suffix` for suffix in `keys` (see quantize.to_tensors).

    v2, a delta expert's tensor or a stored base tensor: `codec` is the encoding's info() (codecs.to_tensors
    wrote the parts), `dtype` the tensor's own dtype once decoded, `bits` 8 × its parts' bytes and
    `granularity` "codec"."""

    OMITTED_AT_DEFAULT = ("codec",)
    shard: FileName
    prefix: str
    shape: list[Dim]
    dtype: str
    bits: int
    granularity: str
    keys: list[str]
    codec: Optional[dict] = None

    @field_validator("codec")
    @classmethod
    def _valid_codec(cls, codec: Optional[dict]) -> Optional[dict]:
        if codec is not None:
            try:
                stored_layout(codec)
            except ValueError:
                raise ValueError("a codec's metadata is not valid (its kind, parameters, shape or dtype)") from None
        return codec

    def info(self) -> dict:
        return {"shape": self.shape, "dtype": self.dtype, "bits": self.bits,
                "granularity": self.granularity, "keys": self.keys}


class AdapterSlot(Frozen):
    """How a PEFT adapter expert's stored tensors give one base weight (mergetool.merge.adapters.lora, mergetool.merge.adapters.ia3):
    LoRA W0 + scaling·B@A (scaling: the task's own for a singleton, 1 for a merged B'A');
    IA3 W0 scaled along `dim` by `vector` (0: rows, and the bias; 1: columns)."""

    a: Optional[str] = None
    b: Optional[str] = None
    scaling: float = 1.0
    vector: Optional[str] = None
    dim: Optional[int] = None


class StoredExpert(Frozen):
    OMITTED_AT_DEFAULT = ("codec",)
    id: Identifier
    component: Dim  # index into Manifest.components
    group_members: list[str]  # task names
    tensors: dict[str, StoredTensor]  # normalised tensor name -> storage
    data_bits: int  # exact data bits (Eq. 8 numerator), row masks excluded
    mask_bytes: int
    adapter: dict[str, AdapterSlot] = Field(default_factory=dict)  # base weight name -> slot (adapters)
    codec: str = Field("full", pattern=r"^[a-z_]+(:[0-9A-Za-z.+\-]{1,30}){0,2}$")  # v2: the recipe's codec label


class StoredComponent(Frozen):
    name: str
    kind: str
    layer: Optional[int]
    params: int
    tensors: dict[str, list[int]]  # normalised name -> shape


class Task(Frozen):
    name: Identifier  # also in file names (config-NAME.json)
    config: FileName  # the task model's config.json, copied (num_labels, id2label, architectures)
    architecture: Optional[str]
    labels: Optional[list[str]]  # id2label in id order; None when the model has none
    heads: dict[str, StoredTensor]  # task-specific tensors, full precision
    original_names: dict[str, str]  # normalised -> the task model's own tensor name


class Storage(Frozen):
    """C (Eq. 8, exact, experts only) and the bytes behind it."""

    d: int
    base_bits: int
    storage_cost: float
    storage_cost_with_heads: float
    expert_data_bytes: int  # = storage_cost·d·b⁺/8 + mask_bytes (v2: the stored base components included)
    mask_bytes: int
    head_data_bytes: int


class Solution(Frozen):
    id: Optional[int]  # front.json id; None for an explicit --grouping
    grouping: list[list[int]]  # canonical G, T x L
    performance: Optional[float]
    per_task: Optional[dict[str, float]]
    chains: dict[str, list[str]]  # task -> expert id per component
    storage: Storage


class Base(Frozen):
    ref: str
    model_type: Optional[str]
    config_sha256: str
    config: FileName  # the base architecture's config.json, copied


class FrozenBase(Frozen):
    """Adapter libraries: the PEFT type and the frozen base's float tensors, stored once, full precision
    (storage_cost counts them as 1, like the search)."""

    type: Literal["LORA", "IA3"]
    tensors: dict[str, StoredTensor]  # normalised base name -> storage


class FeatureStorage(Frozen):
    """What the router's feature extractor ships (reported apart from the experts)."""

    file: Optional[FileName]  # base-features.safetensors, or None for `prefix` (reuses the experts)
    params: int
    bytes: int
    share_of_base: float  # params / the base model's parameters


class RouterInfo(Frozen):
    """The router (runtime issue): a 3-layer MLP over features h(x), mapping an input to a task."""
    OMITTED_AT_DEFAULT = ("pooling",)  # libraries before the field route on mean-pooled features

    weights: FileName  # router.safetensors
    config: FileName  # router.json
    features: Literal["prefix", "base", "embeddings"]
    requested: Literal["auto", "prefix", "base", "embeddings"]
    prefix_stages: int = Field(ge=0)  # stages (embeddings, layer 0, ...) every chain shares
    pooling: Literal["mean", "mean_max"] = "mean"  # of the hidden states into h(x); mean_max is 2× as wide
    hidden: Annotated[list[Count], Field(min_length=2, max_length=2)]
    epochs: Dim
    lr: float
    max_per_task: Dim
    seed: int
    max_length: Count
    train_examples: dict[str, int]
    test_examples: dict[str, int]
    routing_accuracy: Optional[float]  # on the test split, pooled over tasks
    routing_accuracy_per_task: Optional[dict[str, float]]
    feature_storage: FeatureStorage

    @property
    def files(self) -> list[str]:
        return [self.weights, self.config] + ([self.feature_storage.file] if self.feature_storage.file else [])


class Manifest(Frozen):
    OMITTED_AT_DEFAULT = ("base_storage", "stored_base")
    format_version: Literal[1, 2]
    mergetool_version: str
    base: Base
    tasks: list[Task]
    components: list[StoredComponent]
    experts: list[StoredExpert]
    buffers: dict[str, StoredTensor]  # non-float buffers shared by every task
    solutions: list[Solution] = Field(min_length=1)
    default_solution: int = 0  # index into solutions
    chains: dict[str, list[str]]  # of the default solution
    storage_cost: float  # C of every expert in the library (experts only)
    storage: Storage  # for every expert in the library
    disk_bytes: dict[str, int]  # on disk per category: experts, heads, buffers, router, base_features, other, total
    quantization: dict
    merge: dict
    recipe: str
    router: Optional[RouterInfo] = None
    adapter: Optional[FrozenBase] = None
    # v2: the base's precision for delta experts, and the base tensors they need (normalised name -> storage)
    base_storage: Optional[Literal["fp32", "fp16", "int8"]] = None
    stored_base: dict[str, StoredTensor] = Field(default_factory=dict)
    files: dict[FileName, FileEntry]

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise LibraryError(f"task {name!r} is not in this library", key="task",
                           fix=f"use one of {', '.join(t.name for t in self.tasks)}")

    def expert(self, eid: str) -> StoredExpert:
        return self.expert_map()[eid]

    def expert_map(self) -> dict[str, StoredExpert]:
        return {e.id: e for e in self.experts}


def parse_manifest(data: object, where: str) -> Manifest:
    """Validate raw JSON; unknown format versions and unsafe names become one-line LibraryErrors."""
    if not isinstance(data, dict):
        raise LibraryError("manifest is not a JSON object", file=where, fix="re-export the library")
    version = data.get("format_version")
    if type(version) is not int or version not in FORMAT_VERSIONS:
        shown = f" {version}" if type(version) is int and abs(version) < 10**6 else ""  # never echo the file
        raise LibraryError(f"unknown format_version{shown} (this mergetool reads "
                           f"{' and '.join(map(str, FORMAT_VERSIONS))})",
                           file=where, key="format_version",
                           fix="upgrade mergetool or re-export the library")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        e = exc.errors(include_input=False, include_url=False)[0]
        loc = ".".join(_location(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise LibraryError(f"invalid manifest: {msg}{more}", file=where, key=loc,
                           fix="re-export the library; it may be corrupt or tampered with") from None
    _check_version(manifest, where)
    _check_references(manifest, where)
    return manifest


def _check_version(m: Manifest, where: str) -> None:
    """A v1 manifest holds no v2 field (codecs, the stored base)."""
    if m.format_version != 1:
        return
    tensors = [st for e in m.experts for st in e.tensors.values()] + [st for t in m.tasks for st in t.heads.values()]
    tensors += list(m.buffers.values()) + (list(m.adapter.tensors.values()) if m.adapter else [])
    if (m.base_storage is not None or m.stored_base or any(e.codec != "full" for e in m.experts)
            or any(st.codec is not None for st in tensors)):
        raise LibraryError("a format 1 manifest holds format 2 fields (codecs or a stored base)", file=where,
                           key="format_version", fix=REEXPORT)


def _fields() -> set[str]:
    models = [Manifest, Base, Task, StoredTensor, StoredExpert, AdapterSlot, StoredComponent, Solution, Storage,
              RouterInfo, FeatureStorage, FrozenBase, FileEntry]
    return {f for model in models for f in model.model_fields} | {"[key]"}


def _location(part) -> str:
    """One part of an error location: an index or a schema field, never a key taken from the file."""
    if isinstance(part, int):
        return str(part)
    return part if part in _fields() else "*"


def _check_references(m: Manifest, where: str) -> None:
    """Every file the manifest uses is listed in `files`; chains name existing experts."""
    used = {m.base.config} | {t.config for t in m.tasks}
    used |= {s.shard for e in m.experts for s in e.tensors.values()} | {s.shard for s in m.stored_base.values()}
    used |= {s.shard for t in m.tasks for s in t.heads.values()} | {s.shard for s in m.buffers.values()}
    used |= set(m.router.files) if m.router else set()
    used |= {s.shard for s in m.adapter.tensors.values()} if m.adapter else set()
    missing = sorted(used - set(m.files))
    if missing:
        raise LibraryError(f"manifest uses files it does not list: {', '.join(missing)}", file=where,
                           key="files", fix="re-export the library")
    ids = m.expert_map()
    names = {t.name for t in m.tasks}
    for s in m.solutions:
        for task, chain in s.chains.items():
            bad = [e for e in chain if e not in ids]
            if task not in names or len(chain) != len(m.components) or bad:
                raise LibraryError(f"a chain of solution {s.id} is malformed", file=where,
                                   key="solutions", fix="re-export the library")
    if not 0 <= m.default_solution < len(m.solutions):
        raise LibraryError("default_solution is out of range", file=where, key="default_solution")
