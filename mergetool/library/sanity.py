"""The library-sanity layer: after the checksums and before anything in a library is used.

A checksum only proves that a file is the one the manifest lists; a library tampered with and then
re-listed passes it. `check_library` (called by `verify.verify_folder`, the one path for loading,
`inspect`, `pull`, `hub:` references, push and serve) checks that the files make sense together:

- every listed JSON file (configs, router config, tokenizer files) parses as bounded, finite JSON;
- the base and task configs are JSON objects with a `model_type` this transformers knows, and build;
- the manifest's structure: chains of experts of the right components, tensor shapes and dtypes
  (floating point for weights), adapter slots, stored tensors against their shards' headers
  (sanity_tensors);
- every task's model, built from its config on the meta device, has a place of the right shape and
  kind for every tensor the library gives it and gets every tensor it needs (sanity_model);
- the router's config and weights, its dimensions against the base config (sanity_model);
- the tokenizer loads.

Errors are one line naming the file, what is wrong and the fix; they never quote the files' content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from mergetool.core.errors import LibraryError
from mergetool.core.safejson import UnsafeJSON, parse_json
from mergetool.library.manifest import REEXPORT, TOKENIZER_FILES, Manifest
from mergetool.library.sanity_model import check_features, check_models, check_router, check_task_model
from mergetool.library.sanity_tensors import check_stored, check_structure

Fail = Callable[..., LibraryError]  # fail(message, file name=None, fix=...) -> LibraryError
UPGRADE = "upgrade transformers, or re-export the library; it may be corrupt or tampered with"


def check_library(folder: Path, m: Manifest, headers: dict[str, dict], fail: Fail) -> None:
    """Refuse (raise fail(...)) a library whose files do not make sense together; `headers`: the parsed
    safetensors headers by file name (verify.read_header checked their own structure)."""
    docs = read_json_files(folder, m, fail)
    base = read_config(docs, m.base.config, fail, model_type=m.base.model_type)
    configs = {t.name: read_config(docs, t.config, fail) for t in m.tasks}
    check_structure(m, fail)
    check_stored(m, headers, fail)
    if m.router is not None:
        check_router(m, docs, headers, base, fail)
        check_features(m, headers, base, fail)
    check_models(m, configs, fail)
    check_tokenizer(folder, m, fail)


def read_json_files(folder: Path, m: Manifest, fail: Fail) -> dict[str, object]:
    """Every listed .json file, parsed as untrusted JSON (bounded size and depth, finite numbers)."""
    docs = {}
    for name in sorted(m.files):
        if not name.endswith(".json"):
            continue
        try:
            docs[name] = parse_json((Path(folder) / name).read_bytes())
        except UnsafeJSON as exc:
            raise fail(f"{name} is not valid, safe JSON: {exc}", name) from None
    return docs


def read_config(docs: dict, name: str, fail: Fail, *, model_type: Optional[str] = None):
    """A model config: a JSON object with a known `model_type`, that transformers builds; returns it."""
    from transformers import CONFIG_MAPPING, AutoConfig

    data = docs.get(name)
    if not isinstance(data, dict):
        raise fail(f"{name} is not a JSON object, so not a model config", name)
    kind = data.get("model_type")
    if not isinstance(kind, str) or kind not in CONFIG_MAPPING:
        raise fail(f"{name} has no model_type that this transformers knows", name, UPGRADE)
    if model_type is not None and kind != model_type:
        raise fail(f"{name}'s model_type differs from the manifest's base.model_type", name)
    try:
        return AutoConfig.for_model(**data)
    except Exception as exc:  # noqa: BLE001 - any failure to read an untrusted config means the same: refuse it
        raise fail(f"{name} is not a config transformers can read ({type(exc).__name__})", name, UPGRADE) from None


def check_tokenizer(folder: Path, m: Manifest, fail: Fail) -> None:
    """The library's tokenizer (when it ships one) loads, as the runtime will load it, and encodes a probe
    (a tampered tokenizer_config, e.g. unk_token: null, loads but fails on the first unknown word)."""
    present = [n for n in TOKENIZER_FILES if n in m.files]
    if not present:
        return
    from transformers import AutoTokenizer

    name = "tokenizer.json" if "tokenizer.json" in present else present[0]
    try:
        if "tokenizer.json" in present:
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        tok(["a probe: unknown wörds, 12345 ✓"], ["and a pair"], truncation=True, max_length=16)  # it must encode
    except Exception as exc:  # noqa: BLE001 - tokenizers and transformers raise many kinds: all mean unusable
        raise fail(f"the tokenizer does not load ({type(exc).__name__})", name,
                   "export from models saved with a working tokenizer; the library may be tampered with") from None


def check_task(folder: Path, m: Manifest, task: str, chain: list[str], config: dict) -> None:
    """One task's model against the tensors of its chain (export-model's check before it writes, also for
    a library opened earlier): refuse a model that would miss a weight, such as its head."""
    def fail(msg: str, name: Optional[str] = None, fix: str = REEXPORT) -> LibraryError:
        return LibraryError(msg, file=f"{folder}/{name}" if name else str(folder), fix=fix)

    t = m.task(task)
    check_task_model(m, t, read_config({t.config: config}, t.config, fail), [chain], fail)
