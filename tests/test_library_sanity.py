"""The library-sanity layer: tampered libraries whose checksums were rewritten to match are still refused.

Checksums prove a file is the one the manifest lists, not that it is sane. Every case below tampers a
real exported toy library, rewrites the manifest's sha256/bytes to match, and checks that `inspect
--verify`, `inspect`, `ExpertLibrary.load` and `predict` all refuse it with one line (exit 2 for the
CLI) that never quotes the tampered content, before any forward pass.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from routed import invoke

from mergetool.core.errors import LibraryError
from mergetool.library.verify import sha256_file
from mergetool.testing.toy import make_text_zoo, recipe_text

SECRET = "SECRET-api_key"  # planted in tampered content: no error may echo it


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """A routed BERT toy library (prefix router, tokenizer, heads, several expert shards)."""
    root = tmp_path_factory.mktemp("sanity")
    base, tasks, data = make_text_zoo(root)
    recipe = root / "r.yaml"
    recipe.write_text(recipe_text(base, tasks, data, q="quantization: {bits: 8, granularity: per_channel, "
                                  "mode: conditional}", out=f"output: {root / 'run'}"))
    g = root / "g.json"
    g.write_text(json.dumps({"tasks": ["t0", "t1"], "grouping": [[0] * 8, [0, 1, 0, 1, 0, 1, 1, 1]]}))
    result, text = invoke("export", recipe, "--grouping", g, "--out", root / "lib", "--shard-size", "8KB")
    assert result.exit_code == 0, text
    return root / "lib"


# ---------------------------------------------------------------- tampering helpers

def _manifest(lib: Path, fn) -> None:
    m = json.loads((lib / "manifest.json").read_text())
    fn(m)
    (lib / "manifest.json").write_text(json.dumps(m))


def _relist(lib: Path, *names: str) -> None:
    """Rewrite the manifest's checksums and sizes to match the tampered files."""
    def fn(m):
        for name in names:
            m["files"][name] = {"sha256": sha256_file(lib / name), "bytes": (lib / name).stat().st_size}
    _manifest(lib, fn)


def _write(lib: Path, name: str, text: str) -> None:
    (lib / name).write_text(text)
    _relist(lib, name)


def _edit_json(lib: Path, name: str, fn) -> None:
    data = json.loads((lib / name).read_text())
    fn(data)
    _write(lib, name, json.dumps(data))


def _edit_header(lib: Path, name: str, fn) -> None:
    """fn(header JSON text) -> new header text; the tensor data stays as it was."""
    raw = (lib / name).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = fn(raw[8:8 + n].decode().rstrip()).encode()
    head += b" " * (-len(head) % 8)
    (lib / name).write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n:])
    _relist(lib, name)


def _shard(lib: Path) -> str:
    return sorted(p.name for p in lib.glob("experts-*.safetensors"))[0]


def _deep(n: int) -> str:
    return "[" * n + "]" * n


# ---------------------------------------------------------------- the cases: tamper(lib) and the file the error names

def _symlink_loop(lib, names):
    for a, b in zip(names, names[1:] + names[:1]):
        (lib / a).unlink()
        (lib / a).symlink_to(b)


def _metadata(lib, name, new):
    _edit_header(lib, name, lambda h: h.replace('"__metadata__":{"format":"pt"}', '"__metadata__":' + new))


def _heads_shape(new):
    return lambda lib: _edit_header(lib, "heads-t0.safetensors", lambda h: h.replace('"shape":[2,16]', new))


def _to_i32(lib, name):
    _edit_header(lib, name, lambda h: h.replace('"dtype":"F32"', '"dtype":"I32"'))


def _expert_dtype_i32_manifest_too(lib):
    """Header and manifest both say int32: a weight must still be floating point."""
    name = _shard(lib)
    _to_i32(lib, name)
    _manifest(lib, lambda m: [st.update(dtype="int32") for e in m["experts"] for st in e["tensors"].values()
                              if st["shard"] == name])


def _swap_chain(m):
    chain = m["solutions"][0]["chains"]["t0"]
    chain[0], chain[1] = chain[1], chain[0]
    m["chains"] = m["solutions"][0]["chains"]


def _deep_in_manifest(n):
    def tamper(lib):
        text = (lib / "manifest.json").read_text()
        (lib / "manifest.json").write_text(text.replace('"merge": {', '"merge": {"deep": ' + _deep(n) + ", ", 1))
    return tamper


def _deep_router_json(lib):
    _edit_json(lib, "router.json", lambda c: None)
    text = (lib / "router.json").read_text()
    _write(lib, "router.json", text.replace('"format": 1', '"deep": ' + _deep(100_000) + ', "format": 1', 1))


def _too_long(lib):
    _manifest(lib, lambda m: m["router"].update(max_length=10**6))
    _edit_json(lib, "router.json", lambda c: c.update(max_length=10**6))


CASES = {
    # configs: JSON, a JSON object, a known model_type, that transformers reads
    "config_not_json": (lambda lib: _write(lib, "config.json", '{"model_type": "' + SECRET), "config.json"),
    "config_list": (lambda lib: _write(lib, "config.json", json.dumps([SECRET, 1])), "config.json"),
    "config_unknown_model_type": (lambda lib: _edit_json(lib, "config.json", lambda c: c.update(model_type=SECRET)),
                                  "config.json"),
    "task_config_unknown_model_type": (
        lambda lib: _edit_json(lib, "config-t1.json", lambda c: c.update(model_type=SECRET)), "config-t1.json"),
    "task_config_no_model_type": (lambda lib: _edit_json(lib, "config-t0.json", lambda c: c.pop("model_type")),
                                  "config-t0.json"),
    "task_hidden_size_string": (
        lambda lib: _edit_json(lib, "config-t0.json", lambda c: c.update(hidden_size=SECRET)), "config-t0.json"),
    # dimensions of the configs against the stored tensors
    "base_hidden_size": (lambda lib: _edit_json(lib, "config.json", lambda c: c.update(hidden_size=32)),
                         "config.json"),
    "task_hidden_size": (lambda lib: _edit_json(lib, "config-t0.json", lambda c: c.update(hidden_size=32)),
                         "config-t0.json"),
    "task_intermediate_size": (
        lambda lib: _edit_json(lib, "config-t1.json", lambda c: c.update(intermediate_size=64)), "config-t1.json"),
    "task_num_labels": (lambda lib: _edit_json(lib, "config-t1.json", lambda c: c.update(
        id2label={str(i): f"c{i}" for i in range(5)}, label2id={f"c{i}": i for i in range(5)})), "config-t1.json"),
    # the tokenizer loads
    "tokenizer_empty": (lambda lib: _write(lib, "tokenizer.json", "{}"), "tokenizer"),
    "tokenizer_unk_token_null": (  # loads, then fails on the first unknown word (found by the fuzz suite)
        lambda lib: _edit_json(lib, "tokenizer_config.json", lambda c: c.update(unk_token=None)), "tokenizer"),
    "tokenizer_list": (lambda lib: _write(lib, "tokenizer.json", json.dumps([SECRET])), "tokenizer"),
    # safetensors headers: metadata types, dims, offsets, shapes the manifest knows
    "router_metadata_not_string": (lambda lib: _metadata(lib, "router.safetensors", '{"format":1}'),
                                   "router.safetensors"),
    "shard_metadata_not_string": (
        lambda lib: _metadata(lib, _shard(lib), '{"format":"pt","' + SECRET + '":["x"]}'), "experts-00001"),
    "header_shape_1e400": (lambda lib: _edit_header(lib, "heads-t0.safetensors", lambda h: h.replace(
        '"shape":[2]', '"shape":[1e400]')), "heads-t0.safetensors"),
    "header_negative_dims": (_heads_shape('"shape":[-2,-16]'), "heads-t0.safetensors"),
    "header_float_dims": (_heads_shape('"shape":[2.0,16.0]'), "heads-t0.safetensors"),
    "header_bool_dims": (_heads_shape('"shape":[true,32]'), "heads-t0.safetensors"),
    "header_offsets_mismatch": (_heads_shape('"shape":[2,8]'), "heads-t0.safetensors"),
    "header_swapped_shape": (_heads_shape('"shape":[16,2]'), "heads-t0.safetensors"),  # same bytes
    # links
    "symlink_loop": (lambda lib: _symlink_loop(lib, ["config-t1.json"]), "config-t1.json"),
    "symlink_loop_pair": (lambda lib: _symlink_loop(lib, ["config-t0.json", "config-t1.json"]), "config-t"),
    # the router: config types and ranges, its weights, the manifest's router entry
    "router_max_length_manifest": (lambda lib: _manifest(lib, lambda m: m["router"].update(max_length=-5)),
                                   "max_length"),
    "router_max_length_past_positions": (_too_long, "position table"),
    "router_json_max_length": (lambda lib: _edit_json(lib, "router.json", lambda c: c.update(max_length=-5)),
                               "router.json"),
    "router_json_hidden": (lambda lib: _edit_json(lib, "router.json", lambda c: c.update(hidden=[SECRET, 2])),
                           "router.json"),
    "router_json_tasks": (lambda lib: _edit_json(lib, "router.json", lambda c: c.update(tasks=["t0", SECRET])),
                          "router.json"),
    "router_json_list": (lambda lib: _write(lib, "router.json", "[1, 2]"), "router.json"),
    "router_weights_shape": (lambda lib: _edit_header(lib, "router.safetensors", lambda h: h.replace(
        '"net.4.bias":{"dtype":"F32","shape":[2]', '"net.4.bias":{"dtype":"F32","shape":[1,2]')),
        "router.safetensors"),
    # dtypes: what the manifest says, floating point for weights, uint8 for quantised codes
    "shard_dtype_i32": (lambda lib: _to_i32(lib, _shard(lib)), "experts-00001"),
    "heads_dtype_i32": (lambda lib: _to_i32(lib, "heads-t1.safetensors"), "heads-t1.safetensors"),
    "router_dtype_i32": (lambda lib: _to_i32(lib, "router.safetensors"), "router.safetensors"),
    "heads_dtype_i32_manifest_too": (lambda lib: (_to_i32(lib, "heads-t1.safetensors"), _manifest(
        lib, lambda m: [st.update(dtype="int32") for st in m["tasks"][1]["heads"].values()])),
        "heads-t1.safetensors"),
    "expert_dtype_i32_manifest_too": (_expert_dtype_i32_manifest_too, "floating point"),
    "quantised_codes_dtype": (lambda lib: _edit_header(lib, _shard(lib), lambda h: re.sub(
        r'(\.q":\{"dtype":)"U8"', r'\1"I8"', h)), "experts-00001"),
    # the manifest's structure
    "chain_component_mismatch": (lambda lib: _manifest(lib, _swap_chain), "chain"),
    "architecture_not_a_model": (
        lambda lib: _manifest(lib, lambda m: m["tasks"][0].update(architecture="AutoTokenizer")), "architecture"),
    # documents nested 20k-100k deep
    "deep_manifest_20k": (_deep_in_manifest(20_000), "manifest.json"),
    "deep_manifest_100k": (_deep_in_manifest(100_000), "manifest.json"),
    "deep_config": (lambda lib: _write(lib, "config.json", '{"a": ' * 50_000 + "1" + "}" * 50_000), "config.json"),
    "deep_task_config": (lambda lib: _write(lib, "config-t1.json", '{"model_type": "bert", "x": ' + _deep(20_000)
                                            + "}"), "config-t1.json"),
    "deep_router_json": (_deep_router_json, "router.json"),
    "deep_tokenizer_config": (lambda lib: _write(lib, "tokenizer_config.json", '{"x": ' + _deep(50_000) + "}"),
                              "tokenizer_config.json"),
    "deep_header": (lambda lib: _metadata(lib, "heads-t0.safetensors", _deep(20_000)), "heads-t0.safetensors"),
    "deep_header_100k": (lambda lib: _metadata(lib, "router.safetensors", '{"format":' + _deep(100_000) + "}"),
                         "router.safetensors"),
}


def _one_clean_line(result, text: str, needle: str) -> None:
    assert result.exit_code == 2, text
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text, text
    assert needle in text and SECRET not in text, text


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_library_refused_everywhere(lib, tmp_path, case):
    from mergetool.inference.runtime import ExpertLibrary

    bad = tmp_path / "bad"
    shutil.copytree(lib, bad, symlinks=True)
    tamper, needle = CASES[case]
    tamper(bad)
    for flags in (["--verify"], []):
        result, text = invoke("inspect", bad, *flags)
        _one_clean_line(result, text, needle)
    with pytest.raises(LibraryError) as err:
        ExpertLibrary.load(bad, device="cpu")
    assert "\n" not in err.value.one_line() and SECRET not in err.value.one_line()
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "w1 w2"}\n')
    for flags in ([], ["--task", "t0"]):
        result, text = invoke("predict", bad, "--input", inputs, "--output", tmp_path / "out.jsonl", *flags)
        _one_clean_line(result, text, needle)
        assert not (tmp_path / "out.jsonl").exists()


def test_untampered_library_passes(lib, tmp_path):
    from mergetool.inference.runtime import ExpertLibrary

    result, text = invoke("inspect", lib, "--verify")
    assert result.exit_code == 0, text
    assert len(ExpertLibrary.load(lib, device="cpu").predict(["w1 w2"])) == 1


def test_export_model_refuses_a_task_without_heads(lib, tmp_path):
    """A manifest that drops a task's classification head (and its file) must not give a model whose
    classifier transformers initialises at random."""
    bad = tmp_path / "bad"
    shutil.copytree(lib, bad)
    (bad / "heads-t0.safetensors").unlink()

    def fn(m):
        m["tasks"][0]["heads"] = {}
        del m["files"]["heads-t0.safetensors"]
    _manifest(bad, fn)
    result, text = invoke("export-model", bad, "--task", "t0", "--out", tmp_path / "model")
    _one_clean_line(result, text, "t0")
    assert "head" in text, text
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model*"))
    result, text = invoke("inspect", bad, "--verify")
    _one_clean_line(result, text, "t0")


def test_export_model_refuses_an_opened_library_without_heads(lib, tmp_path):
    """export_model given an already opened LibraryFiles whose task lacks its head is refused too."""
    from mergetool.library.export_model import export_model
    from mergetool.library.reader import LibraryFiles

    opened = LibraryFiles.load(lib)
    t0 = opened.manifest.tasks[0].model_copy(update={"heads": {}})
    manifest = opened.manifest.model_copy(update={"tasks": [t0, *opened.manifest.tasks[1:]]})
    with pytest.raises(LibraryError, match="head"):
        export_model(LibraryFiles(lib, manifest, opened.index), "t0", tmp_path / "model")
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model*"))
