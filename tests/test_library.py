"""Expert library v1: exact storage on disk, export / inspect / export-model, and refused bad input."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from mergetool.cli.app import app
from mergetool.library import LibraryFiles, load_task_state
from mergetool.library.safetensors_io import data_bytes, read_header
from mergetool.library.writer import SolutionIn, export_library
from mergetool.merge.experts import ExpertStore
from mergetool.models.plan import build_plan, open_models
from mergetool.pipeline.rundir import prepare_run
from mergetool.recipe import load_recipe
from mergetool.testing.toy import make_text_zoo, recipe_text

runner = CliRunner()
L = 8  # components of the 2-layer toy BERT
MIXED = [[0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1, 1, 1]]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny BERT zoo whose first task ships a tokenizer, and a recipe per quantisation setting."""
    root = tmp_path_factory.mktemp("libzoo")
    base, tasks, data = make_text_zoo(root)

    def recipe(bits=8, granularity="per_channel", name="r"):
        q = f"quantization: {{bits: {bits}, granularity: {granularity}, mode: conditional}}"
        path = root / f"{name}-{bits}-{granularity}.yaml"
        path.write_text(recipe_text(base, tasks, data, q=q, out=f"output: {root / ('run-' + name)}"))
        return path

    return {"root": root, "recipe": recipe, "base": base, "tasks": tasks}


def _grouping_file(path: Path, G, tasks=("t0", "t1"), **extra) -> Path:
    path.write_text(json.dumps({"tasks": list(tasks), "grouping": G, **extra}))
    return path


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.stdout + (result.stderr or "")


@pytest.fixture(scope="module")
def lib(zoo, tmp_path_factory):
    """A library exported through the CLI with --grouping (several shards)."""
    root = tmp_path_factory.mktemp("lib")
    g = _grouping_file(root / "g.json", MIXED)
    out = root / "lib"
    result, text = _invoke("export", zoo["recipe"](), "--grouping", g, "--out", out, "--shard-size", "8KB")
    assert result.exit_code == 0, text
    return out


# ---------------------------------------------------------------- storage: C is the bytes on disk

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_storage_cost_equals_expert_bytes_on_disk(zoo, tmp_path, bits, granularity):
    recipe = load_recipe(zoo["recipe"](bits, granularity))
    sources = open_models(recipe)
    plan = build_plan(recipe, sources=sources)
    G = np.asarray(MIXED)
    m = export_library(recipe, plan, sources, [SolutionIn(G)], tmp_path / "lib", shard_size=4000)
    shards = sorted((tmp_path / "lib").glob("experts-*.safetensors"))
    assert len(shards) > 1 and shards[0].name == f"experts-00001-of-{len(shards):05d}.safetensors"
    on_disk = sum(data_bytes(p) for p in shards)  # tensor data only, headers excluded
    masks = sum(e.mask_bytes for e in m.experts)
    C = m.storage_cost
    assert C == ExpertStore(recipe, plan, *sources).storage_cost(G)  # the search's C, exactly
    assert on_disk == round(C * plan.d * plan.base_bits / 8) + masks
    assert on_disk * 8 == sum(e.data_bits for e in m.experts) + 8 * masks  # integer-exact
    assert abs(C * plan.d * plan.base_bits / 8 + masks - on_disk) < 1e-6
    assert m.storage.expert_data_bytes == on_disk
    if granularity == "per_channel":
        assert masks > 0  # conditional rows mixed within a tensor are covered


# ---------------------------------------------------------------- export --grouping, inspect

def test_export_grouping_writes_verified_library(lib, zoo):
    m = json.loads((lib / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["router"]["features"] == "prefix"  # embeddings are shared
    names = sorted(p.name for p in lib.iterdir())
    assert set(m["files"]) == set(names) - {"manifest.json"}
    assert {"config.json", "config-t0.json", "config-t1.json", "heads-t0.safetensors", "tokenizer.json",
            "README.md"} <= set(names)
    assert [t["labels"] for t in m["tasks"]] == [["c0", "c1"], ["c0", "c1", "c2"]]
    assert m["tasks"][0]["original_names"]["pooler.dense.weight"] == "bert.pooler.dense.weight"
    assert len(m["experts"]) == L + sum(len(set(c)) - 1 for c in zip(*MIXED))  # one per group
    assert m["chains"]["t0"][0] == m["chains"]["t1"][0]  # embeddings shared
    assert m["solutions"][0]["grouping"] == MIXED and m["solutions"][0]["id"] is None
    assert m["storage"]["storage_cost"] == m["storage_cost"] > 0
    assert m["base"]["config_sha256"] and m["recipe"].startswith("name: tiny")
    card = (lib / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mergetool\n") and "model-merging" in card and "## Recipe" in card
    for p in lib.glob("*.safetensors"):
        read_header(p)
    LibraryFiles.load(lib, verify=True)


def test_inspect_verify_and_json(lib):
    result, text = _invoke("inspect", lib, "--verify")
    assert result.exit_code == 0, text
    assert "checksums verified" in text and "layer.0.attention" in text and "chain t1" in text
    result, text = _invoke("inspect", lib, "--json")
    rep = json.loads(result.stdout)
    assert rep["groups"]["embeddings"] == {"t0": "A", "t1": "A"}
    assert rep["groups"]["layer.0.attention"] == {"t0": "A", "t1": "B"}
    files = rep["storage"]["on_disk"]["files"]
    disk = rep["storage"]["on_disk"]
    assert disk["total"] == sum(v["bytes"] for v in files.values()) + disk["manifest.json"]
    experts = sum(v["data_bytes"] for k, v in files.items() if k.startswith("experts-"))
    assert experts == rep["storage"]["solution"]["expert_data_bytes"]


def test_library_task_state_equals_search_experts(lib, zoo):
    recipe = load_recipe(zoo["recipe"]())
    store = ExpertStore(recipe, build_plan(recipe), *open_models(recipe))
    for t, name in enumerate(("t0", "t1")):
        want = store.task_state(MIXED, t) | store.own_tensors(t)
        got = load_task_state(lib, name, original_names=False)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_export_model_loads_in_transformers(lib, tmp_path):
    out = tmp_path / "t1-model"
    result, text = _invoke("export-model", lib, "--task", "t1", "--out", out)
    assert result.exit_code == 0, text
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model, info = tf.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_labels == 3 and model.config.id2label[2] == "c2"
    assembled = tf.AutoModelForSequenceClassification.from_config(tf.AutoConfig.from_pretrained(out))
    assembled.load_state_dict(load_task_state(lib, "t1"), strict=True)
    x = torch.randint(5, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.eval()(input_ids=x).logits, assembled.eval()(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-5)
    tok = tf.AutoTokenizer.from_pretrained(out)
    assert tok("w1 w2")["input_ids"][0] == 2


# ---------------------------------------------------------------- export --budget / --all from a run

@pytest.fixture(scope="module")
def run_dir(zoo):
    """A run directory with run.json and a front of three solutions (C computed like the search)."""
    recipe_path = zoo["recipe"](name="front")
    recipe = load_recipe(recipe_path)
    store = ExpertStore(recipe, build_plan(recipe), *open_models(recipe))
    run = prepare_run(recipe, resume=False, force=False)  # run.json as the search writes it
    Gs = sorted([np.zeros((2, L), int), np.asarray(MIXED), np.repeat([[0], [1]], L, axis=1)],
                key=store.storage_cost)  # a real front: P grows with C
    front = [{"id": i, "grouping": G.tolist(), "performance": p, "storage_cost": store.storage_cost(G),
              "per_task": {"t0": p, "t1": p}} for i, (G, p) in enumerate(zip(Gs, (0.5, 0.7, 0.9)))]
    (run / "search" / "front.json").write_text(json.dumps(front))
    return run, front


def test_export_budget_picks_best_fitting(run_dir):
    run, front = run_dir
    budget = front[1]["storage_cost"] + 1e-9
    result, text = _invoke("export", run, "--budget", budget)
    assert result.exit_code == 0, text
    out = run / "libraries" / f"budget-{budget:g}"
    m = LibraryFiles.load(out, verify=True).manifest
    assert m.solutions[0].id == 1 and m.solutions[0].performance == 0.7
    assert m.storage_cost == front[1]["storage_cost"]


def test_export_all_stores_shared_experts_once(run_dir):
    run, front = run_dir
    result, text = _invoke("export", run, "--all")
    assert result.exit_code == 0, text
    lib = LibraryFiles.load(run / "libraries" / "all")
    m = lib.manifest
    assert [s.id for s in m.solutions] == [0, 1, 2] and lib.solution.id == 2  # default: best P
    # all-shared (8) + all-singleton (16) experts; MIXED only reuses them
    assert len(m.experts) == 3 * L
    for s, r in zip(m.solutions, front):
        assert s.storage.storage_cost == r["storage_cost"]
    assert LibraryFiles.load(run / "libraries" / "all", budget=front[1]["storage_cost"]).solution.id == 1
    st = load_task_state(run / "libraries" / "all", "t0", solution=0)
    assert st.keys() == load_task_state(run / "libraries" / "all", "t0").keys()


# ---------------------------------------------------------------- bad input: exit 2, nothing written

@pytest.mark.parametrize("budget", ["0", "-1", "abc", "nan"])
def test_bad_budget(run_dir, budget):
    run, _ = run_dir
    result, text = _invoke("export", run, "--budget", budget, "--out", run / "bad")
    assert result.exit_code == 2 and "budget" in text and not (run / "bad").exists()


def test_nothing_fits_budget_names_smallest_cost(run_dir):
    run, front = run_dir
    result, text = _invoke("export", run, "--budget", "0.01", "--out", run / "bad")
    smallest = min(r["storage_cost"] for r in front)
    assert result.exit_code == 2 and f"{smallest:.6g}" in text and not (run / "bad").exists()


@pytest.mark.parametrize("G,needle", [
    ([[0] * L], "shape 1x8"),
    ([[0] * (L - 1)] * 2, "shape 2x7"),
    ([[0] * L, [0] * (L - 1) + [2]], "outside 0..1"),
    ([[0] * L, [0] * (L - 1) + [-1]], "outside 0..1"),
    ([[0] * L, [0] * 3], "matrix"),
])
def test_bad_grouping(zoo, tmp_path, G, needle):
    g = _grouping_file(tmp_path / "g.json", G)
    result, text = _invoke("export", zoo["recipe"](), "--grouping", g, "--out", tmp_path / "out")
    assert result.exit_code == 2 and needle in text, text
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_grouping_tasks_must_match(zoo, tmp_path):
    g = _grouping_file(tmp_path / "g.json", MIXED, tasks=("t0", "zz"))
    result, text = _invoke("export", zoo["recipe"](), "--grouping", g, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "do not match" in text and not (tmp_path / "out").exists()


def test_existing_target_needs_force(zoo, lib, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(lib, out)
    g = _grouping_file(tmp_path / "g.json", np.zeros((2, L), int).tolist())
    result, text = _invoke("export", zoo["recipe"](), "--grouping", g, "--out", out)
    assert result.exit_code == 2 and "already exists" in text
    assert json.loads((out / "manifest.json").read_text())["solutions"][0]["grouping"] == MIXED  # untouched
    result, text = _invoke("export", zoo["recipe"](), "--grouping", g, "--out", out, "--force")
    assert result.exit_code == 0, text
    assert json.loads((out / "manifest.json").read_text())["solutions"][0]["grouping"] == [[0] * L] * 2
    not_lib = tmp_path / "home"
    not_lib.mkdir()
    (not_lib / "precious.txt").write_text("x")
    result, text = _invoke("export", zoo["recipe"](), "--grouping", g, "--out", not_lib, "--force")
    assert result.exit_code == 2 and (not_lib / "precious.txt").exists()


class _Boom:
    """Unpickling this creates a marker file: the test proves nothing was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _edit_manifest(lib: Path, fn) -> None:
    m = json.loads((lib / "manifest.json").read_text())
    fn(m)
    (lib / "manifest.json").write_text(json.dumps(m))


def _relist(lib: Path, name: str):
    from mergetool.library.verify import sha256_file

    def fn(m):
        m["files"][name] = {"sha256": sha256_file(lib / name), "bytes": (lib / name).stat().st_size}
    _edit_manifest(lib, fn)


def _corrupt(lib, tmp):
    shard = sorted(lib.glob("experts-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    return "checksum mismatch"


def _parent_path(lib, tmp):
    _edit_manifest(lib, lambda m: m["experts"][0]["tensors"][next(iter(m["experts"][0]["tensors"]))].update(
        shard="../x.safetensors"))
    return "outside the library"


def _absolute_path(lib, tmp):
    _edit_manifest(lib, lambda m: m["files"].update({"/etc/passwd.json": m["files"]["config.json"]}))
    return "absolute path"


def _format_version(lib, tmp):
    _edit_manifest(lib, lambda m: m.update(format_version=3))
    return "unknown format_version 3"


def _pickle_shard(lib, tmp):
    shard = sorted(lib.glob("experts-*.safetensors"))[0]
    shard.write_bytes(pickle.dumps(_Boom(str(tmp / "unpickled")), protocol=4))
    _relist(lib, shard.name)  # checksums match: only the header check can refuse it
    return "not a valid safetensors file"


def _extra_pkl(lib, tmp):
    (lib / "weights.pkl").write_bytes(pickle.dumps(_Boom(str(tmp / "unpickled"))))
    return "unexpected file 'weights.pkl'"


def _symlink_out(lib, tmp):
    (tmp / "outside.json").write_text("{}")
    (lib / "config.json").unlink()
    (lib / "config.json").symlink_to(tmp / "outside.json")
    return "symlink pointing outside"


def _linked_manifest(lib, tmp):
    (lib / "manifest-copy.json").write_bytes((lib / "manifest.json").read_bytes())
    (lib / "manifest.json").unlink()
    (lib / "manifest.json").symlink_to(lib / "manifest-copy.json")  # inside the folder, still not a plain file
    return "not a plain file"


def _missing_file(lib, tmp):
    (lib / "heads-t0.safetensors").unlink()
    return "missing"


@pytest.mark.parametrize("tamper", [_corrupt, _parent_path, _absolute_path, _format_version, _pickle_shard,
                                    _extra_pkl, _symlink_out, _linked_manifest, _missing_file], ids=lambda f: f.__name__.strip("_"))
def test_unsafe_library_refused(lib, tmp_path, tamper):
    bad = tmp_path / "bad"
    shutil.copytree(lib, bad)
    needle = tamper(bad, tmp_path)
    result, text = _invoke("inspect", bad, "--verify")
    assert result.exit_code == 2 and needle in text, text
    assert len(text.strip().splitlines()) == 1  # one line, no traceback
    result, text = _invoke("export-model", bad, "--task", "t0", "--out", tmp_path / "model")
    assert result.exit_code == 2 and needle in text, text
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model*"))
    with pytest.raises(Exception, match="library|safetensors|format_version|manifest|file"):
        load_task_state(bad, "t0")
    assert not (tmp_path / "unpickled").exists()


def test_unknown_task_and_missing_router_data(lib, zoo, tmp_path):
    result, text = _invoke("export-model", lib, "--task", "nope", "--out", tmp_path / "m")
    assert result.exit_code == 2 and "not in this library" in text and not (tmp_path / "m").exists()
    g = _grouping_file(tmp_path / "g.json", MIXED)
    no_router = tmp_path / "r.yaml"  # every library ships a router: no `router` split, no export
    no_router.write_text(re.sub(r", router: \{path: [^}]*\}", "", zoo["recipe"]().read_text()))
    result, text = _invoke("export", no_router, "--grouping", g, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "tasks.t0.router" in text and not (tmp_path / "o").exists()
