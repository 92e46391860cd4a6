"""Model references and lazy tensor reading.

A reference is a local directory (never sent to the Hub), `pkg:MODULE` (a model shipped in an
installed package), or a hub id (`org/name[@revision]`, read from the local cache when offline).
`ModelSource` reads tensors lazily (memory-mapped safetensors; `.bin` only with weights_only=True)
under *normalised* names: the architecture's backbone prefix (`bert.`, `model.`, ...) is removed, so
a base `BertModel` and its `BertForSequenceClassification` fine-tunes line up tensor by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Optional

import torch

from mergetool.core.errors import ModelLoadError
from mergetool.core.paths import expand_user
from mergetool.core.safejson import UnsafeJSON, parse_json
from mergetool.core.userimport import import_named

# backbone prefixes that task heads wrap around the base model, per config model_type
BACKBONE_PREFIXES = {
    "bert": ("bert.",), "roberta": ("roberta.",), "xlm-roberta": ("roberta.",),
    "distilbert": ("distilbert.",), "gpt2": ("transformer.",),
    "llama": ("model.",), "mistral": ("model.",), "qwen2": ("model.",), "qwen3": ("model.",),
    "vit": ("vit.",), "clip": ("vision_model.",), "clip_vision_model": ("vision_model.",),
    "t5": (), "mt5": (),
}
PEFT_PREFIX = "base_model.model."
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def resolve_model_ref(ref: str, *, key: str = "model") -> Path:
    """Turn a recipe model reference into a local directory, or raise ModelLoadError."""
    if ref.startswith("pkg:"):
        return _package_model(ref[4:], key)
    path = expand_user(ref)
    if path.is_absolute() or ref.startswith((".", "~")):
        if not path.exists():
            raise ModelLoadError(f"model path {str(path)!r} does not exist", key=key,
                                 fix="check the path (relative paths resolve against the recipe's folder)")
        if not path.is_dir():
            raise ModelLoadError(f"model path {str(path)!r} is not a directory", key=key,
                                 fix="point to the folder holding config.json and the weights")
        return path
    return _hub_model(ref, key)


def _package_model(module: str, key: str) -> Path:
    mod = import_named(module, key=key, error=ModelLoadError)
    getter = getattr(mod, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(mod.__file__ or ".").parent
    if not path.is_dir():
        raise ModelLoadError(f"package {module!r} has no model folder at {path}", key=key)
    return path


def _hub_model(ref: str, key: str) -> Path:
    repo_id, _, revision = ref.partition("@")
    if repo_id.count("/") > 1 or not repo_id.strip():
        raise ModelLoadError(f"{ref!r} is neither an existing path nor a hub id (org/name)", key=key,
                             fix="prefix local paths with ./ or use an absolute path")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
        path = Path(snapshot_download(repo_id, revision=revision or None, local_files_only=offline,
                                      allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):  # .bin weights only when the repo has no safetensors
            path = Path(snapshot_download(repo_id, revision=revision or None, local_files_only=offline,
                                          allow_patterns=patterns + ["*.bin"]))
        return path
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"hub model {ref!r} is not in the local cache and HF_HUB_OFFLINE is set",
                             key=key, fix="download it once online, or use a local path") from None
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all are input problems here
        raise ModelLoadError(f"cannot fetch hub model {ref!r}: {type(exc).__name__}: {exc}", key=key) from None


class ModelSource:
    """Lazy, read-only view of one model's tensors under normalised names."""

    def __init__(self, path: Path, *, label: str = "model", base_type: Optional[str] = None):
        self.path = Path(path)
        self.label = label
        self.is_adapter = (self.path / "adapter_config.json").is_file()
        self._base_type = base_type  # adapters take their backbone prefix from the base model
        self._files = self._weight_files()
        self._handles: dict[Path, object] = {}
        self._bins: dict[Path, dict] = {}
        self._index: dict[str, tuple[Path, str]] = {}
        self._meta: dict[str, TensorMeta] = {}
        self._build_index()

    # --- config -------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        name = "adapter_config.json" if self.is_adapter else "config.json"
        if not (self.path / name).is_file():
            raise ModelLoadError(f"{self.path} has no {name}", key=self.label,
                                 fix="point to a Hugging Face model or PEFT adapter folder")
        return self._json(name)

    def _json(self, name: str) -> dict:
        """A JSON object from the model folder (config, adapter config, shard index); one line when broken."""
        try:
            data = parse_json((self.path / name).read_bytes())
        except (OSError, UnsafeJSON) as exc:
            raise ModelLoadError(f"{self.path / name} is not readable JSON: {exc}", key=self.label,
                                 fix="restore the file from the model's original release") from None
        if not isinstance(data, dict):
            raise ModelLoadError(f"{self.path / name} is not a JSON object", key=self.label,
                                 fix="restore the file from the model's original release")
        return data

    @property
    def model_type(self) -> Optional[str]:
        return self._base_type if self.is_adapter else self.config.get("model_type")

    @cached_property
    def peft_config(self):
        """peft's own config object for adapters (LoRA, IA3)."""
        from peft import PeftConfig

        return PeftConfig.from_pretrained(str(self.path))

    # --- files --------------------------------------------------------------------------------
    def _weight_files(self) -> list[Path]:
        if self.is_adapter:
            names = ["adapter_model.safetensors", "adapter_model.bin"]
            found = [self.path / n for n in names if (self.path / n).is_file()]
            return found[:1] or self._missing()
        for index in INDEX_FILES:
            if (self.path / index).is_file():
                weight_map = self._json(index).get("weight_map")
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise ModelLoadError(f"{self.path / index} has no weight_map of tensor name -> file name",
                                         key=self.label, fix="restore the index from the model's original release")
                files = sorted({self.path / f for f in weight_map.values()})
                for f in files:
                    if f.resolve().parent != self.path.resolve() or not f.is_file():
                        raise ModelLoadError(f"index lists a missing or outside file {f.name}", key=self.label)
                return files
        found = [self.path / n for n in WEIGHT_FILES if (self.path / n).is_file()]
        return found[:1] or self._missing()

    def _missing(self) -> list[Path]:
        raise ModelLoadError(f"no weights in {self.path}", key=self.label,
                             fix="expected model.safetensors, a sharded index, or pytorch_model.bin")

    def _open(self, f: Path):
        if f.suffix == ".safetensors":
            if f not in self._handles:
                from safetensors import safe_open

                try:
                    self._handles[f] = safe_open(str(f), framework="pt")
                except Exception as exc:  # noqa: BLE001 - safetensors' own errors and OS errors alike
                    raise ModelLoadError(f"{f} is not a readable safetensors file: {exc}", key=self.label) from None
            return self._handles[f]
        if f not in self._bins:
            try:
                self._bins[f] = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - torch's unpickler refuses with many error types
                raise ModelLoadError(f"{f} cannot be loaded safely (weights_only): {exc}", key=self.label) from None
        return self._bins[f]

    def _build_index(self) -> None:
        raw: dict[str, tuple[Path, str, TensorMeta]] = {}
        for f in self._files:
            h = self._open(f)
            if f.suffix == ".safetensors":
                for k in h.keys():
                    sl = h.get_slice(k)
                    raw[k] = (f, k, TensorMeta(tuple(sl.get_shape()), _ST_DTYPES[sl.get_dtype()]))
            else:
                for k, t in h.items():
                    raw[k] = (f, k, TensorMeta(tuple(t.shape), t.dtype))
        prefixes = self._prefixes(raw)
        for k, (f, orig, meta) in raw.items():
            name = self.normalise(k, prefixes)
            if name in self._index:
                raise ModelLoadError(f"tensors {orig!r} and {self._index[name][1]!r} collide after prefix "
                                     "normalisation", key=self.label)
            self._index[name] = (f, orig)
            self._meta[name] = meta

    def _prefixes(self, raw: dict) -> tuple[str, ...]:
        cands = BACKBONE_PREFIXES.get(self.model_type or "", ())
        if self.is_adapter:
            return cands  # keys are base_model.model.<full model key>
        return tuple(p for p in cands if any(k.startswith(p) for k in raw))

    def normalise(self, key: str, prefixes: tuple[str, ...] = ()) -> str:
        if self.is_adapter:
            key = key.removeprefix(PEFT_PREFIX)
        for p in prefixes:
            if key.startswith(p):
                return key[len(p):]
        return key

    # --- tensors ------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def checkpoint_name(self, name: str) -> str:
        """The tensor's name as stored in the checkpoint (before prefix normalisation)."""
        return self._index[name][1]

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def get(self, name: str) -> torch.Tensor:
        f, orig = self._index[name]
        h = self._open(f)
        return h.get_tensor(orig) if f.suffix == ".safetensors" else h[orig]

    def original_name(self, name: str) -> str:
        return self._index[name][1]

    def location(self, name: str) -> tuple[Path, str]:
        """(weight file, key in it) of a tensor, for readers that stream it (mergetool.models.streaming)."""
        return self._index[name]

    def close(self) -> None:
        self._handles.clear()
        self._bins.clear()


def open_model(ref: str, *, key: str = "model", base_type: Optional[str] = None) -> ModelSource:
    """Resolve a reference and open it lazily; adapters need the base's model_type."""
    return ModelSource(resolve_model_ref(ref, key=key), label=key, base_type=base_type)


def max_length_of(task_lengths: Iterable[int], config: dict) -> int:
    """Longest tokenised input: the largest task max_length (recipe tasks.*.max_length; 128 when none),
    within the model's position table (a longer text would index past it)."""
    ml = max(list(task_lengths) or [128])
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
        offset = 2 if config.get("model_type") in ("roberta", "xlm-roberta") else 0
        ml = min(ml, max(1, positions - offset))
    return ml
