"""Delta experts in the ExpertStore (#13): closed-form C equals the built bits and the bytes the codec writes,
the delta is taken from the *stored and decoded* base, and the stored base counts once per component."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergetool.core.errors import MergetoolError
from mergetool.core.storage import storage_cost
from mergetool.merge.codecs import base_stored_bits, decode, decode_base, encode_base, tensor_bytes, to_tensors
from mergetool.merge.experts import ExpertStore
from mergetool.models.plan import build_plan, open_models
from mergetool.recipe.loader import parse_recipe
from mergetool.testing.toy import make_text_zoo, recipe_text

MENU = ("codecs: [full, {delta_quant: {bits: 1}}, {delta_quant: {bits: 3}}, {delta_switch: {density: 0.1}}, "
        "{delta_switch: {density: 0.3, scale: row}}, {low_rank: {rank: 64}}]")


@pytest.fixture(scope="module", params=["fp32", "fp16", "int8"])
def store(request, tmp_path_factory):
    base, tasks, data = make_text_zoo(tmp_path_factory.mktemp("delta"), n_tasks=3)
    text = recipe_text(base, tasks, data, codecs=MENU, storage=f"base_storage: {request.param}")
    recipe = parse_recipe(text, None)
    plan = build_plan(recipe)
    return ExpertStore(recipe, plan, *open_models(recipe))


def test_closed_form_bits_equal_built_bits_and_written_bytes(store):
    for codec in range(1, len(store.menu)):
        for component in range(store.plan.L):
            for members in [(0,), (0, 2), (0, 1, 2)]:
                counted = store.expert_bits(component, members, codec)  # nothing merged or built
                expert = store.expert(component, members, codec)
                written = sum(8 * tensor_bytes(to_tensors(e, f"x{i}")) for i, e in enumerate(expert.delta.values()))
                assert counted == expert.bits == written, (store.codec_names[codec], component, members)


def test_delta_is_taken_from_the_decoded_stored_base(store):
    comp = next(l for l, c in enumerate(store.plan.components) if any(store.base.meta(n).shape.__len__() == 2
                                                                      for n in c.tensors))
    expert = store.expert(comp, (1,), store.codec_names.index("low_rank:64"))  # full rank: lossless up to fp32
    for name in store.plan.components[comp].tensors:
        reference = decode_base(encode_base(store.base.get(name), store.stored_base.storage))
        assert torch.equal(expert.reference[name], reference)
        own = store.tasks[1].get(name)
        dense = expert.dense()[name]
        assert dense.dtype == own.dtype
        assert torch.equal(dense, (reference + decode(expert.delta[name])).to(own.dtype))
        assert torch.allclose(dense, own, atol=1e-4)  # base error does not compound: θ = base' + (θ − base')


def test_storage_cost_counts_each_stored_base_component_once(store):
    T, L = store.plan.T, store.plan.L
    G = np.zeros((T, L), dtype=int)
    G[1, :] = 1  # two groups per component
    codecs = [1 + (l % (len(store.menu) - 1)) for l in range(L)]
    codecs[0] = 0  # component 0 stays `full`: no stored base for it
    bits = sum(store.expert_bits(l, m, codecs[l]) for l, m in [(l, (0, 2)) for l in range(L)] + [(l, (1,)) for l in range(L)])
    base = 0
    for l in range(1, L):
        for n in store.plan.components[l].tensors:
            meta = store.base.meta(n)
            base += base_stored_bits(meta.shape, store.stored_base.storage, torch.finfo(meta.dtype).bits)
    assert base == sum(store.stored_base.bits(l) for l in range(1, L))
    want = storage_cost(bits + base, d=store.plan.d, base_bits=store.plan.base_bits)
    assert store.storage_cost(G, codecs) == want
    assert store.storage_cost(G) == store.storage_cost(G, [0] * L)  # the default: the menu's first codec


def test_stored_base_bits_equal_its_bytes(store):
    for l in range(store.plan.L):
        stored = store.stored_base.stored(l)
        assert store.stored_base.bits(l) == sum(8 * tensor_bytes(to_tensors(s, n)) for n, s in stored.items())


def test_bad_codec_choice_is_refused(store):
    G = np.zeros((store.plan.T, store.plan.L), dtype=int)
    for bad in ([0] * (store.plan.L - 1), [len(store.menu)] * store.plan.L, [-1] * store.plan.L):
        with pytest.raises(MergetoolError, match="codec"):
            store.storage_cost(G, bad)


@pytest.mark.slow
def test_search_with_a_delta_codec_runs_end_to_end(trained_zoo, tmp_path):
    """A one-codec delta menu: the search scores delta experts and reports their exact C (stored base
    included); the fp32 references stay the plain individual models (C = T)."""
    import json

    from typer.testing import CliRunner

    from mergetool.cli.app import app
    from mergetool.testing.toy import trained_recipe

    recipe = tmp_path / "delta.yaml"
    recipe.write_text(trained_recipe(trained_zoo, evaluations=8, population=4,
                                     extra="codecs: [{delta_switch: {density: 0.1}}]\nbase_storage: int8\n")
                      + f"output: {tmp_path / 'run'}\n")
    result = CliRunner().invoke(app, ["search", str(recipe), "--quiet", "--no-racing"])
    assert result.exit_code == 0, result.output
    parsed = parse_recipe(recipe.read_text(), recipe)
    plan = build_plan(parsed)
    store = ExpertStore(parsed, plan, *open_models(parsed))
    front = json.loads((tmp_path / "run" / "search" / "front.json").read_text())
    for point in front:
        assert point["storage_cost"] == pytest.approx(store.storage_cost(np.asarray(point["grouping"])), abs=1e-12)
        assert point["storage_cost"] < 1.0  # every task in less than one fp32 model: 10 % masks + int8 base
    refs = json.loads((tmp_path / "run" / "search" / "reference.json").read_text())
    assert refs["individual"]["storage_cost"] == pytest.approx(plan.T)
