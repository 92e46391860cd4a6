"""Library format v2 (#13): delta-coded experts and the stored base, exported by the CLI.

For each codec (BitDelta, 3-bit delta, T-Switch per tensor and per row, low rank) at some base precision:
the manifest says format 2; C in the manifest is the ExpertStore's C exactly, and the tensor-data bytes on
disk are exactly the counted bits; the assembled task state is the searched one, bitwise; the runtime
predicts, export-model writes a checkpoint transformers loads, and `inspect` shows codecs and base storage.
v1 libraries (codec `full`) are still written and read as before; tampered v2 metadata is refused at load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from routed import invoke

from mergetool.core.errors import LibraryError
from mergetool.library.reader import load_task_state
from mergetool.library.safetensors_io import data_bytes
from mergetool.library.verify import sha256_file
from mergetool.merge.codecs import (
    DeltaQuantSpec,
    DeltaSwitchSpec,
    LowRankSpec,
    encode,
    encode_base,
    stored_layout,
    to_tensors,
)
from mergetool.merge.experts import ExpertStore
from mergetool.models.plan import build_plan, open_models
from mergetool.recipe.loader import parse_recipe
from mergetool.testing.toy import make_text_zoo, recipe_text

COMBOS = {  # codec -> base storage (five of the fifteen pairs; every codec and every precision)
    "{delta_quant: {bits: 1}}": "fp32",
    "{delta_quant: {bits: 3}}": "int8",
    "{delta_switch: {density: 0.1}}": "fp16",
    "{delta_switch: {density: 0.3, scale: row}}": "int8",
    "{low_rank: {rank: 8}}": "fp16",
}
LABELS = ["delta_quant:1", "delta_quant:3", "delta_switch:0.1", "delta_switch:0.3:row", "low_rank:8"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2zoo")
    return root, *make_text_zoo(root, n_tasks=3)


def _export(zoo, name: str, extra: dict) -> dict:
    root, base, tasks, data = zoo
    folder = root / name
    folder.mkdir()
    recipe = folder / "r.yaml"
    recipe.write_text(recipe_text(base, tasks, data, out=f"output: {folder / 'run'}", **extra))
    parsed = parse_recipe(recipe.read_text(), recipe)
    plan = build_plan(parsed)
    G = np.zeros((plan.T, plan.L), dtype=int)
    G[1:, plan.L // 2:] = 1  # tasks 1 and 2 share the upper half; task 0 keeps its own
    G[2, -1] = 2  # and task 2 its own last component
    g = folder / "g.json"
    g.write_text(json.dumps({"grouping": G.tolist()}))
    result, text = invoke("export", recipe, "--grouping", g, "--out", folder / "lib", "--shard-size", "1000")
    assert result.exit_code == 0, text
    store = ExpertStore(parsed, plan, *open_models(parsed))
    return {"lib": folder / "lib", "G": G, "store": store, "plan": plan, "root": folder}


@pytest.fixture(scope="module")
def exported(zoo):
    """label -> its library, exported once per module on first use."""
    cache: dict[str, dict] = {}

    def get(label: str) -> dict:
        if label not in cache:
            codec = list(COMBOS)[LABELS.index(label)]
            cache[label] = _export(zoo, label.replace(":", "-"), {
                "codecs": f"codecs: [{codec}]", "storage": f"base_storage: {COMBOS[codec]}"}) | {
                "label": label, "base_storage": COMBOS[codec]}
        return cache[label]
    return get


@pytest.fixture(params=LABELS)
def v2(request, exported):
    return exported(request.param)


@pytest.fixture(scope="module")
def v1(zoo):
    return _export(zoo, "v1", {})


def _manifest(lib: Path) -> dict:
    return json.loads((lib / "manifest.json").read_text())


def test_layout_is_what_to_tensors_writes():
    """stored_layout (the sanity layer's one source of part shapes) agrees with to_tensors for every codec."""
    for spec in (DeltaQuantSpec(1), DeltaQuantSpec(3), DeltaSwitchSpec(0.1), DeltaSwitchSpec(0.3, "row"),
                 LowRankSpec(8)):
        for t in (torch.randn(6, 10), torch.randn(7), torch.randn(3, 4, 5).half(), torch.randn(())):
            enc = encode(t.float(), spec, meta_dtype=t.dtype)
            got = {k: (v.dtype, tuple(v.shape)) for k, v in to_tensors(enc, "p").items()}
            assert {"p" + k: v for k, v in stored_layout(enc.info()).items()} == got
    for storage in ("fp32", "fp16", "int8"):
        for t in (torch.randn(6, 10), torch.randn(7).half()):
            sb = encode_base(t, storage)
            got = {k: (v.dtype, tuple(v.shape)) for k, v in to_tensors(sb, "p").items()}
            assert {"p" + k: v for k, v in stored_layout(sb.info()).items()} == got


def test_manifest_v2_and_exact_bytes(v2):
    lib, store, G = v2["lib"], v2["store"], v2["G"]
    m = _manifest(lib)
    assert m["format_version"] == 2 and m["base_storage"] == v2["base_storage"]
    assert {e["codec"] for e in m["experts"]} == {v2["label"]}
    assert m["solutions"][0]["storage"]["storage_cost"] == store.storage_cost(G)  # exactly
    assert m["storage_cost"] == store.storage_cost(G)  # one solution: the library is the solution
    experts = sorted(lib.glob("experts-*.safetensors"))
    bases = sorted(lib.glob("base-*.safetensors"))
    assert len(experts) > 1 and bases  # sharded
    assert sum(data_bytes(p) for p in experts) * 8 == sum(e["data_bits"] for e in m["experts"])
    base_bits = sum(store.stored_base.bits(l) for l in range(v2["plan"].L))  # every component has delta experts
    assert sum(data_bytes(p) for p in bases) * 8 == base_bits == sum(st["bits"] for st in m["stored_base"].values())
    assert m["disk_bytes"]["stored_base"] == sum(p.stat().st_size for p in bases)
    assert f"expert codecs: {v2['label']}" in (lib / "README.md").read_text()  # the model card says so too
    for e in m["experts"]:
        key = (e["component"], tuple(int(t[1:]) for t in e["group_members"]))
        assert e["data_bits"] == store.expert_bits(*key) == sum(st["bits"] for st in e["tensors"].values())
        assert all(st["codec"]["codec"] == v2["label"].split(":")[0] for st in e["tensors"].values())


def test_assembled_equals_searched_bitwise(v2):
    store, G = v2["store"], v2["G"]
    for t, name in enumerate(v2["plan"].tasks):
        got = load_task_state(v2["lib"], name, original_names=False)
        want = store.task_state(G, t) | store.own_tensors(t)
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), (name, k)


def test_runtime_export_model_and_inspect(v2, tmp_path):
    import transformers as tf

    from mergetool.inference.runtime import ExpertLibrary

    lib = ExpertLibrary.load(v2["lib"], device="cpu")
    res = lib.predict(["w1 w2", "w2 w1 w1"], task="t1", return_logits=True)
    assert len(res) == 2
    res_routed = lib.predict(["w1 w2"])
    assert len(res_routed) == 1
    result, text = invoke("export-model", v2["lib"], "--task", "t1", "--out", tmp_path / "model")
    assert result.exit_code == 0, text
    model = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    want = v2["store"].task_state(v2["G"], 1)
    names = lib.manifest.task("t1").original_names
    state = model.state_dict()
    assert all(torch.equal(state[names.get(k, k)], v) for k, v in want.items())
    result, text = invoke("inspect", v2["lib"])
    assert result.exit_code == 0, text
    text = " ".join(text.split())  # rich wraps lines at the test terminal's width
    assert "format v2" in text and v2["label"] in text and f"base storage: {v2['base_storage']}" in text
    result, text = invoke("inspect", v2["lib"], "--json")
    report = json.loads(result.stdout)
    assert report["format_version"] == 2 and report["base_storage"] == v2["base_storage"]
    assert {e["codec"] for e in report["experts"]} == {v2["label"]}


def test_v1_library_still_loads(v1):
    m = _manifest(v1["lib"])
    assert m["format_version"] == 1
    text = (v1["lib"] / "manifest.json").read_text()
    assert "base_storage" not in text and "stored_base" not in text and '"codec"' not in text
    assert not list(v1["lib"].glob("base-*.safetensors"))
    assert m["storage_cost"] == v1["store"].storage_cost(v1["G"])
    got = load_task_state(v1["lib"], "t0", original_names=False)
    want = v1["store"].task_state(v1["G"], 0)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    result, text = invoke("inspect", v1["lib"])
    text = " ".join(text.split())
    assert result.exit_code == 0 and "format v1" in text and "expert codecs: full" in text, text


# ---------------------------------------------------------------- tampering (checksums rewritten to match)

def _edit(lib: Path, fn) -> None:
    m = _manifest(lib)
    fn(m)
    (lib / "manifest.json").write_text(json.dumps(m))  # manifest.json is not in `files`: nothing to re-sign


def _relist(lib: Path, name: str) -> None:
    _edit(lib, lambda m: m["files"].update({name: {"sha256": sha256_file(lib / name),
                                                   "bytes": (lib / name).stat().st_size}}))


def _first(m, key: str, value=None):
    """The first delta tensor entry whose codec has `key` (equal to value, when given)."""
    return next(st for e in m["experts"] for st in e["tensors"].values()
                if key in st["codec"] and (value is None or st["codec"][key] == value) and len(st["shape"]) == 2)


def _bits_plus_8(e: dict) -> None:
    """One more byte in a tensor's bits and its expert's data_bits: the manifest agrees with itself, not the shard."""
    next(iter(e["tensors"].values()))["bits"] += 8
    e["data_bits"] += 8


def _rename_part(lib: Path, suffix: str) -> None:
    name = sorted(p.name for p in lib.glob("experts-*.safetensors"))[0]
    raw = (lib / name).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = raw[8:8 + n].decode().replace(suffix + '"', suffix[:-1] + 'x"', 1).encode()
    (lib / name).write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n:])
    _relist(lib, name)


def _truncate(lib: Path) -> None:
    name = sorted(p.name for p in lib.glob("base-*.safetensors"))[0]
    raw = (lib / name).read_bytes()
    (lib / name).write_bytes(raw[:-3])
    _relist(lib, name)


TAMPERS = {
    "delta_quant-bits": (lambda m: _first(m, "bits")["codec"].update(bits=2), "does not match its shard's header"),
    "delta_switch-density": (lambda m: _first(m, "density")["codec"].update(density=0.5),
                             "does not match its shard's header"),
    "low_rank-rank": (lambda m: _first(m, "rank")["codec"].update(rank=2), "does not match its shard's header"),
    "entry-bits": (lambda m: m["experts"][0]["tensors"][next(iter(m["experts"][0]["tensors"]))].update(bits=8),
                   "data_bits differ from its tensors' bits"),
    "entry-and-expert-bits": (lambda m: _bits_plus_8(m["experts"][0]), "does not match its shard's header"),
    "nonsense-codec": (lambda m: m["experts"][0]["tensors"][next(iter(m["experts"][0]["tensors"]))]["codec"].update(
        codec="zip"), "a codec's metadata is not valid"),
    "base-storage": (lambda m: m.update(base_storage="fp32" if m["base_storage"] != "fp32" else "fp16"),
                     "stored base tensor 1 is not a base codec"),
    "as-v1": (lambda m: m.update(format_version=1), "format 1 manifest holds format 2 fields"),
    "drop-stored-base": (lambda m: m["stored_base"].pop(next(iter(m["stored_base"]))),
                         "without a stored base tensor"),
    "expert-codec-full": (lambda m: m["experts"][0].pop("codec"), "full expert with codec-stored tensors"),
}


@pytest.mark.parametrize("case", list(TAMPERS) + ["rename-part", "truncate-base"])
def test_tampered_v2_library_is_refused(case, tmp_path, exported):
    label = {"delta_quant-bits": "delta_quant:3", "delta_switch-density": "delta_switch:0.3:row",
             "low_rank-rank": "low_rank:8"}.get(case, "delta_quant:3")
    bad = tmp_path / "bad"
    shutil.copytree(exported(label)["lib"], bad)
    if case == "rename-part":
        _rename_part(bad, ".scale")
        needle = "does not match its shard's header"
    elif case == "truncate-base":
        _truncate(bad)
        needle = "is not a valid safetensors file"
    else:
        tamper, needle = TAMPERS[case]
        _edit(bad, tamper)
    with pytest.raises(LibraryError, match=needle.replace("'", ".")):
        load_task_state(bad, "t0", verify=False)
    result, text = invoke("inspect", bad, "--verify")
    assert result.exit_code == 2 and needle in text and len(text.strip().splitlines()) == 1, text



def test_hub_round_trip_of_a_v2_library(hub_server, exported, tmp_path):
    """push, then pull (verified: checksums, allow-list, sanity incl. codec parts): the same library."""
    from mergetool.library.reader import load_task_state

    lib = exported("low_rank:8")["lib"]
    result, text = invoke("push", lib, "test-user/v2-lib")
    assert result.exit_code == 0, text
    result, text = invoke("pull", "test-user/v2-lib", tmp_path / "got")
    assert result.exit_code == 0, text
    got = tmp_path / "got"
    assert _manifest(got)["format_version"] == 2 and _manifest(got)["base_storage"] == "fp16"
    for task in ("t0", "t1", "t2"):
        a, b = load_task_state(lib, task), load_task_state(got, task)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
