"""The search over a codec menu (#13 item 3): a genome is G plus a codec per component.

CandidateSpace's operators; a search whose records carry per-component codecs with their exact C (no
expert built for it) and that resumes by replay; a library mixing codecs: C and bytes exact, assembled
equals searched bitwise, runtime, export-model, inspect and a Hub round trip; bad codec labels refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from routed import invoke

from mergetool.core import grouping
from mergetool.core.errors import MergetoolError
from mergetool.library.reader import load_task_state
from mergetool.library.safetensors_io import data_bytes
from mergetool.merge.experts import ExpertStore
from mergetool.models.plan import build_plan, open_models
from mergetool.recipe.loader import parse_recipe
from mergetool.search.genome import CandidateSpace
from mergetool.search.operators import mutate
from mergetool.testing.toy import make_text_zoo, recipe_text

MENU = "codecs: [full, {delta_quant: {bits: 2}}, {delta_switch: {density: 0.1}}]"
LABELS = ("full", "delta_quant:2", "delta_switch:0.1")


# --- the genome ---------------------------------------------------------------------------------

def test_genome_round_trips_through_records_and_keys():
    space = CandidateSpace(3, 4, LABELS)
    G = np.array([[2, 0, 1, 1], [2, 1, 1, 0], [0, 1, 0, 0]])
    X = space.join(G, [2, 0, 1, 2])
    canon = space.canonical(X)
    assert np.array_equal(canon[:3], grouping.canonical(G)) and canon[3].tolist() == [2, 0, 1, 2]
    rec = {"i": 0, **space.fields(X)}
    assert rec["codecs"] == ["delta_switch:0.1", "full", "delta_quant:2", "delta_switch:0.1"]
    assert space.key(space.of_record(rec)) == space.key(X) != space.key(space.join(G, [0, 0, 1, 2]))
    assert space.key(X).startswith(grouping.key(G) + "|")
    assert space.size() == grouping.search_space_size(3, 4) * 3 ** 4
    with pytest.raises(MergetoolError, match="codecs"):
        space.of_record({"i": 1, "grouping": G.tolist(), "codecs": ["full"] * 3})
    with pytest.raises(MergetoolError, match="codecs"):
        space.of_record({"i": 1, "grouping": G.tolist(), "codecs": ["full", "full", "full", "int3"]})


def test_a_plain_space_is_exactly_the_grouping_search():
    """Without a menu the genome is G: same keys, no codecs field, the very same mutation draws."""
    space = CandidateSpace(4, 5)
    G = np.array([[0, 0, 1, 2, 0], [1, 0, 0, 2, 1], [1, 1, 0, 0, 0], [0, 1, 2, 1, 2]])
    assert space.key(G) == grouping.key(G) and space.fields(G) == {"grouping": grouping.canonical(G).tolist()}
    for seed in range(20):
        a = space.mutate(G.copy(), np.random.default_rng(seed))
        b = mutate(G.copy(), np.random.default_rng(seed))
        assert np.array_equal(a, b)


def test_mutation_moves_tasks_and_codecs_and_features_see_both():
    space = CandidateSpace(4, 6, LABELS)
    X = space.join(np.zeros((4, 6), dtype=int), [0] * 6)
    codec_moves = task_moves = 0
    for seed in range(200):
        Y = space.mutate(X, np.random.default_rng(seed))
        codec_moves += int(not np.array_equal(Y[4], X[4]))
        task_moves += int(not np.array_equal(Y[:4], X[:4]))
        assert set(Y[4].tolist()) <= {0, 1, 2}
    assert 20 < codec_moves < 180 and 20 < task_moves < 200
    F = space.features([X, space.join(np.zeros((4, 6), dtype=int), [1] * 6)])
    assert F.shape == (2, 6 * 6 + 6 * 3)  # co-membership bits, then a codec one-hot per component
    assert not np.array_equal(F[0], F[1]) and np.array_equal(F[0, :36], F[1, :36])


def test_initial_genomes_span_every_codec():
    space = CandidateSpace(3, 4, LABELS)
    Gs = [grouping.all_shared(3, 4), grouping.all_singletons(3, 4)] + [
        np.random.default_rng(s).integers(0, 3, size=(3, 4)) for s in range(10)]
    pop = space.with_codecs(Gs, 12, seed=0)
    assert len(pop) == 12 and len({space.key(X) for X in pop}) == 12
    uniform = {(grouping.key(X[:3]), int(X[3, 0])) for X in pop if len(set(X[3].tolist())) == 1}
    for G in (grouping.all_shared(3, 4), grouping.all_singletons(3, 4)):  # both extremes under every codec
        assert {c for k, c in uniform if k == grouping.key(G)} == {0, 1, 2}
    assert any(len(set(X[3].tolist())) > 1 for X in pop)  # and mixtures


# --- a search over the menu ---------------------------------------------------------------------

@pytest.mark.slow
def test_search_over_a_codec_menu_records_exact_costs_and_resumes(trained_zoo, tmp_path):
    recipe = tmp_path / "menu.yaml"
    recipe.write_text(trained_recipe_with_menu(trained_zoo, tmp_path))
    result, text = invoke("search", recipe, "--quiet", "--no-racing")
    assert result.exit_code == 0, text
    parsed = parse_recipe(recipe.read_text(), recipe)
    store = ExpertStore(parsed, build_plan(parsed), *open_models(parsed))
    run = tmp_path / "run" / "search"
    records = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    assert len(records) == 10 and all(len(r["codecs"]) == store.plan.L for r in records)
    assert len({c for r in records for c in r["codecs"]}) == 3  # every menu entry was tried
    for r in records:
        codecs = [store.codec_names.index(c) for c in r["codecs"]]
        assert r["storage_cost"] == store.storage_cost(np.asarray(r["grouping"]), codecs)  # exactly
    front = json.loads((run / "front.json").read_text())
    assert all("codecs" in p for p in front)
    assert min(p["storage_cost"] for p in front) < 1.0  # delta codecs reach below one fp32 model
    result, text = invoke("front", tmp_path / "run")
    assert result.exit_code == 0 and "codecs" in text and " ×" in text  # e.g. "low_rank ×3, full ×2"
    assert "codecs:" in (run / "summary.md").read_text()  # G1/G2/G3 with their codecs
    state = json.loads((run / "search_state.json").read_text())
    assert state["fingerprint"]["codecs"] == list(LABELS)
    before = (run / "evaluations.jsonl").read_bytes()
    result, text = invoke("search", recipe, "--quiet", "--no-racing", "--resume")  # replayed, nothing re-run
    assert result.exit_code == 0, text
    assert (run / "evaluations.jsonl").read_bytes() == before
    result, text = invoke("export", recipe, "--budget", "100", "--out", tmp_path / "lib")
    assert result.exit_code == 0, text
    m = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    best = max(front, key=lambda p: (p["performance"], -p["storage_cost"]))
    assert m["storage_cost"] == best["storage_cost"]
    assert {e.get("codec", "full") for e in m["experts"]} == set(best["codecs"])


def trained_recipe_with_menu(zoo, tmp_path) -> str:
    from mergetool.testing.toy import trained_recipe

    return trained_recipe(zoo, evaluations=10, population=5, extra=f"{MENU}\nbase_storage: fp16\n") + \
        f"output: {tmp_path / 'run'}\n"


# --- a library mixing codecs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    base, tasks, data = make_text_zoo(root, n_tasks=3)
    recipe = root / "r.yaml"
    recipe.write_text(recipe_text(base, tasks, data, codecs=MENU, storage="base_storage: int8",
                                  out=f"output: {root / 'run'}"))
    parsed = parse_recipe(recipe.read_text(), recipe)
    plan = build_plan(parsed)
    G = np.zeros((plan.T, plan.L), dtype=int)
    G[1:, plan.L // 2:] = 1
    G[2, -1] = 2
    codecs = [l % 3 for l in range(plan.L)]  # full, 2-bit delta, T-Switch, full, ...
    comps = [c.name for c in plan.components][::-1]  # the file lists components in another order
    (root / "g.json").write_text(json.dumps({"components": comps, "grouping": G[:, ::-1].tolist(),
                                             "codecs": [LABELS[c] for c in codecs][::-1]}))
    result, text = invoke("export", recipe, "--grouping", root / "g.json", "--out", root / "lib", "--shard-size",
                          "1000")
    assert result.exit_code == 0, text
    store = ExpertStore(parsed, plan, *open_models(parsed))
    return {"root": root, "recipe": recipe, "lib": root / "lib", "G": G, "codecs": codecs, "store": store,
            "plan": plan}


def test_mixed_library_costs_and_bytes_are_exact(mixed):
    store, G, codecs, lib = mixed["store"], mixed["G"], mixed["codecs"], mixed["lib"]
    m = json.loads((lib / "manifest.json").read_text())
    assert m["format_version"] == 2 and {e.get("codec", "full") for e in m["experts"]} == set(LABELS)
    assert m["storage_cost"] == store.storage_cost(G, codecs)  # exactly, stored base of delta components included
    for e in m["experts"]:
        members = tuple(int(t[1:]) for t in e["group_members"])
        assert e.get("codec", "full") == LABELS[codecs[e["component"]]]
        assert e["data_bits"] == store.expert_bits(e["component"], members, codecs[e["component"]])
    experts = sorted(lib.glob("experts-*.safetensors"))
    assert sum(data_bytes(p) for p in experts) * 8 == sum(e["data_bits"] + 8 * e.get("mask_bytes", 0)
                                                         for e in m["experts"])
    delta_components = {l for l in range(mixed["plan"].L) if codecs[l] != 0}
    assert sum(data_bytes(p) for p in lib.glob("base-*.safetensors")) * 8 == sum(
        store.stored_base.bits(l) for l in delta_components)


def test_mixed_library_assembles_the_searched_state_bitwise(mixed):
    store, G, codecs = mixed["store"], mixed["G"], mixed["codecs"]
    for t, name in enumerate(mixed["plan"].tasks):
        got = load_task_state(mixed["lib"], name, original_names=False)
        want = store.task_state(G, t, codecs=codecs) | store.own_tensors(t)
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), (name, k)


def test_mixed_library_runs_exports_and_inspects(mixed, tmp_path):
    import transformers as tf

    from mergetool.inference.runtime import ExpertLibrary

    lib = ExpertLibrary.load(mixed["lib"], device="cpu")
    assert len(lib.predict(["w1 w2", "w2 w1 w1"], task="t2")) == 2
    result, text = invoke("export-model", mixed["lib"], "--task", "t2", "--out", tmp_path / "model")
    assert result.exit_code == 0, text
    state = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").state_dict()
    names = lib.manifest.task("t2").original_names
    want = mixed["store"].task_state(mixed["G"], 2, codecs=mixed["codecs"])
    assert all(torch.equal(state[names.get(k, k)], v) for k, v in want.items())
    result, text = invoke("inspect", mixed["lib"], "--json")
    assert result.exit_code == 0, text
    assert {e["codec"] for e in json.loads(result.stdout)["experts"]} == set(LABELS)


def test_hub_round_trip_of_a_mixed_library(hub_server, mixed, tmp_path):
    result, text = invoke("push", mixed["lib"], "test-user/mixed-lib")
    assert result.exit_code == 0, text
    result, text = invoke("pull", "test-user/mixed-lib", tmp_path / "got")
    assert result.exit_code == 0, text
    for task in mixed["plan"].tasks:
        a, b = load_task_state(mixed["lib"], task), load_task_state(tmp_path / "got", task)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("codecs, says", [
    (["full", "int3", "full"], "codec"),
    (["full"], "codecs must list"),
    ("full", "codecs must list"),
])
def test_bad_codecs_in_a_grouping_file_are_refused(mixed, tmp_path, codecs, says):
    plan = mixed["plan"]
    bad = list(codecs) + ["full"] * (plan.L - len(codecs)) if codecs == ["full", "int3", "full"] else codecs
    g = tmp_path / "g.json"
    g.write_text(json.dumps({"grouping": mixed["G"].tolist(), "codecs": bad}))
    result, text = invoke("export", mixed["recipe"], "--grouping", g, "--out", tmp_path / "lib")
    assert result.exit_code == 2 and says in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1 and not (tmp_path / "lib").exists()
