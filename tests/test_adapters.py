"""PEFT adapter zoos end to end: LoRA and IA3 experts evaluate through `Evaluator` like full fine-tunes.

Singleton chains reproduce each task's own PEFT model (PeftModel.from_pretrained on the base, then
merge_and_unload), cached scores equal naive ones bitwise, and IA3 groups merge and cost as the
hand-computed vectors say.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers as tf

from mergetool.core.grouping import all_shared, all_singletons
from mergetool.evaluation.choice import choice_logprobs
from mergetool.merge.adapters.ia3 import apply_ia3, ia3_targets, merge_ia3, scaled_dim
from mergetool.pipeline.session import Session
from mergetool.recipe import parse_recipe
from mergetool.testing.toy import SPECIAL, WORDS, make_tokenizer, recipe_text, synthetic_rows, write_jsonl
from mergetool.testing.toy_kinds import kind_recipe_text, make_tiny_t5, write_choice_rows

T = torch.tensor


# --- IA3 by hand ---------------------------------------------------------------------------------
def test_ia3_scaled_dim_from_peft_shapes():
    # W0 is (out 3, in 2): an output vector is (3, 1) and scales rows; a feedforward one is (1, 2), columns
    assert scaled_dim((3, 1), (3, 2)) == 0 and scaled_dim((1, 2), (3, 2)) == 1
    # Conv1D stores W transposed (in 2, out 3): the dims swap
    assert scaled_dim((3, 1), (2, 3), fan_in_fan_out=True) == 1 and scaled_dim((1, 2), (2, 3), True) == 0
    with pytest.raises(ValueError, match="fits neither"):
        scaled_dim((4, 1), (3, 2))
    assert ia3_targets(["a.k.ia3_l"]) == {"a.k.weight": "a.k.ia3_l"}
    with pytest.raises(ValueError):
        ia3_targets(["a.k.weight"])


def test_ia3_merges_over_a_base_of_ones():
    l1, l2 = T([[2.0], [1.0], [0.5]]), T([[4.0], [1.0], [1.5]])
    # TA λ=1: 1 + (l1 − 1) + (l2 − 1) = [5, 1, 1]; WA: the mean [3, 1, 1]
    assert torch.equal(merge_ia3([l1, l2], "task_arithmetic", {"lambda": 1.0, "normalize": False}), T([5.0, 1.0, 1.0]))
    assert torch.allclose(merge_ia3([l1, l2], "linear", {"weight": [1.0, 1.0]}), T([3.0, 1.0, 1.0]))
    w0 = T([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert torch.equal(apply_ia3(w0, T([5.0, 1.0, 1.0]), 0), T([[5.0, 10.0], [3.0, 4.0], [5.0, 6.0]]))
    assert torch.equal(apply_ia3(w0, T([2.0, 0.5]), 1), T([[2.0, 1.0], [6.0, 2.0], [10.0, 3.0]]))


# --- LoRA zoo ------------------------------------------------------------------------------------
def train_lora_zoo(root, n_tasks: int = 3, steps: int = 30) -> tuple:
    """A tiny BERT base and LoRA adapters (query, value; ranks 4, 5, 6) fine-tuned a few steps on
    toy.synthetic_rows. Task 0 is saved with task_type SEQ_CLS and a config.json naming its labels;
    the others have neither (labels as class ids, num_labels from the saved head's shape)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    base = root / "base"
    tf.BertModel(config).save_pretrained(base)
    tok = make_tokenizer(base)
    tasks, data = [], []
    for t in range(n_tasks):
        n_cls = 2 + t
        rows = synthetic_rows(t, n_cls, 256, seed=t)
        names = [f"class{c}" for c in range(n_cls)]
        model = tf.BertForSequenceClassification.from_pretrained(
            base, num_labels=n_cls, id2label=dict(enumerate(names)), label2id={v: k for k, v in enumerate(names)})
        lcfg = LoraConfig(r=4 + t, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"],
                          task_type="SEQ_CLS" if t == 0 else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, lcfg)
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        y = torch.tensor([names.index(r["label"]) for r in rows])
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
        peft_model.train()
        for step in range(steps):
            idx = torch.arange(step * 32, step * 32 + 32) % len(rows)
            loss = peft_model(**{k: v[idx] for k, v in enc.items()}, labels=y[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        out = root / f"lora-{t}"
        peft_model.save_pretrained(out)
        eval_rows = synthetic_rows(t, n_cls, 12, seed=100 + t)
        if t == 0:
            model.config.save_pretrained(out)  # id2label: the data may name its labels
        else:
            eval_rows = [dict(r, label=names.index(r["label"])) for r in eval_rows]
        tasks.append(out)
        data.append(write_jsonl(root / f"d{t}.jsonl", eval_rows))
    return base, tasks, data


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """session(quant) -> Session over the trained LoRA zoo (TA λ=0.5)."""
    root = tmp_path_factory.mktemp("adapters-lora")
    base, tasks, data = train_lora_zoo(root)
    cache = {}

    def session(quant: str = "{bits: none}") -> Session:
        if quant not in cache:
            text = recipe_text(base, tasks, data, m="merge: {method: ta, parameters: {lambda: 0.5}}",
                               q=f"quantization: {quant}")
            cache[quant] = Session(parse_recipe(text, root / "r.yaml"), device="cpu")
        return cache[quant]

    session.base, session.tasks = base, tasks
    return session


def peft_reference(base_cls, base, adapter, **kwargs):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base_cls.from_pretrained(base, **kwargs), str(adapter))
    return model.merge_and_unload().eval()


def test_lora_singletons_reproduce_each_peft_model(lora):
    s = lora()
    ev = s.evaluator()
    G = all_singletons(s.plan.T, s.plan.L)
    for t, adapter in enumerate(lora.tasks):
        ref = peft_reference(tf.BertForSequenceClassification, lora.base, adapter, num_labels=2 + t)
        with torch.no_grad():
            want = torch.cat([ref(**b).logits for b in ev.data[t].batches]).numpy()
        got = ev.outputs(G, t)
        assert got.shape == (12, 2 + t)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert np.abs(got - ev.outputs(all_shared(s.plan.T, s.plan.L), t)).max() > 1e-3  # adapters matter
    assert ev._model(0).layerable  # staged BERT path, base weights loaded once
    assert ev.evaluate(G).performance > 0.6  # trained a few steps: better than chance


def test_lora_cached_equals_naive_bitwise(lora):
    s = lora("{bits: 4, granularity: per_channel, mode: conditional}")
    cached, naive = s.evaluator(), s.evaluator(caches=False)
    rng = np.random.default_rng(0)
    for G in [all_shared(s.plan.T, s.plan.L)] + [rng.integers(0, s.plan.T, (s.plan.T, s.plan.L)) for _ in range(5)]:
        a, b = cached.evaluate(G), naive.evaluate(G)
        assert a.per_task == b.per_task and a.storage_cost == b.storage_cost
        assert 1.0 < a.storage_cost < s.plan.individual_cost
    assert cached.counts["prefix_hits"] > 0 and naive.counts["stage_calls"] == 0


# --- IA3 zoo (T5, seq2seq_choice) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def ia3(tmp_path_factory):
    """A tiny T5 base and three IA3 adapters (k, v, wo as in T-Few); task 0's k vectors are all 2,
    task 1's all 4; session(quant, merge) -> Session."""
    from peft import IA3Config, TaskType, get_peft_model

    root = tmp_path_factory.mktemp("adapters-ia3")
    base = make_tiny_t5(root / "t5-base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tf.T5ForConditionalGeneration.from_pretrained(base),
                               IA3Config(task_type=TaskType.SEQ_2_SEQ_LM))
    tasks = []
    for t in range(3):
        g = torch.Generator().manual_seed(10 + t)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ia3_l" in name:
                    p.copy_(T(2.0 + 2 * t).expand_as(p) if name.split(".")[-3] == "k" and t < 2
                            else 1 + 0.2 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / f"ia3-{t}")
        tasks.append(root / f"ia3-{t}")
    data = [write_choice_rows(root / f"d{t}.jsonl", 6, n_choices=2 + t, seed=t) for t in range(3)]
    cache = {}

    def session(quant: str = "{bits: none}", merge: str = "{method: ta, parameters: {lambda: 1.0}}") -> Session:
        if (quant, merge) not in cache:
            extra = f"quantization: {quant}\nmerge: {merge}\n"
            text = kind_recipe_text(base, tasks, data, "seq2seq_choice", batch_size=4, extra=extra)
            cache[quant, merge] = Session(parse_recipe(text, root / "r.yaml"), device="cpu")
        return cache[quant, merge]

    session.base, session.tasks = base, tasks
    return session


def test_ia3_expert_literal_vectors_and_cost(ia3):
    s = ia3()
    plan, store = s.plan, s.store
    assert plan.adapter["type"] == "IA3"
    l = next(i for i, c in enumerate(plan.components) if any(n.endswith(".k.ia3_l") for n in c.tensors))
    k_vec = next(n for n in plan.components[l].tensors if n.endswith(".k.ia3_l"))
    k_w = k_vec.removesuffix(".ia3_l") + ".weight"
    w0 = s.base.get(k_w)
    # TA λ=1 over a base of ones: 1 + (2 − 1) + (4 − 1) = 5 for every k output row
    e = store.expert(l, (0, 1))
    assert torch.equal(e.tensors[k_vec].full, torch.full((w0.shape[0],), 5.0))
    assert torch.equal(e.dense()[k_w], 5.0 * w0)
    # a singleton is the task's own vector; a feedforward `wo` scales W0's columns
    wo = next((i, n) for i, c in enumerate(plan.components) for n in c.tensors if n.endswith(".wo.ia3_l"))
    own = s.tasks[2].get(wo[1])
    assert own.shape[0] == 1
    wo_w = wo[1].removesuffix(".ia3_l") + ".weight"
    assert torch.equal(store.expert(wo[0], (2,)).dense()[wo_w], s.base.get(wo_w) * own)
    # unquantised: every stored vector counts 32 bits per value, plus the frozen base once
    assert store.expert(l, (0, 1)).bits == 32 * plan.components[l].params
    assert s.store.storage_cost(all_singletons(plan.T, plan.L)) == pytest.approx(plan.individual_cost, abs=1e-12)
    # 8 bits, always: one unit per vector (n values → 8n bits + scale and zero at 32 bits)
    q = ia3("{bits: 8, granularity: per_channel, mode: always}")
    e8 = q.store.expert(l, (0, 1))
    sizes = [q.tasks[0].meta(n).numel for n in plan.components[l].tensors]
    assert e8.bits == sum(8 * n + 64 for n in sizes)
    assert torch.equal(e8.dense()[k_w], 5.0 * w0)  # a constant unit is stored exactly


def test_ia3_singletons_reproduce_each_peft_model(ia3):
    s = ia3()
    ev = s.evaluator()
    G = all_singletons(s.plan.T, s.plan.L)
    for t, adapter in enumerate(ia3.tasks):
        ref = peft_reference(tf.T5ForConditionalGeneration, ia3.base, adapter)
        with torch.no_grad():
            want = torch.cat([choice_logprobs(ref(**{k: v for k, v in b.items() if not k.startswith("target")},
                                                  use_cache=False).logits, b) for b in ev.data[t].batches])
        got = ev.outputs(G, t)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
        assert np.abs(got - ev.outputs(all_shared(s.plan.T, s.plan.L), t)).max() > 1e-3  # adapters matter
    assert 0.0 <= ev.evaluate(G).performance <= 1.0


def test_ia3_cached_equals_naive_bitwise(ia3):
    s = ia3("{bits: 4, granularity: per_tensor, mode: conditional}", "{method: ties, parameters: {density: 0.5}}")
    cached, naive = s.evaluator(), s.evaluator(caches=False)
    rng = np.random.default_rng(1)
    for _ in range(4):
        G = rng.integers(0, s.plan.T, (s.plan.T, s.plan.L))
        a, b = cached.evaluate(G), naive.evaluate(G)
        assert a.per_task == b.per_task and a.storage_cost == b.storage_cost


# --- libraries of adapter experts ----------------------------------------------------------------
def test_lora_library_predicts_what_the_search_scored(lora, tmp_path):
    from mergetool.inference.runtime import ExpertLibrary
    from mergetool.library.writer import SolutionIn, export_library

    s = lora("{bits: 8, granularity: per_channel, mode: conditional}")
    G = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [2, 2, 1, 2]])[:, : s.plan.L]
    m = export_library(s.recipe, s.plan, (s.base, s.tasks), [SolutionIn(G)], tmp_path / "lib")
    assert m.adapter.type == "LORA" and m.storage_cost == s.store.storage_cost(G)  # + the frozen base, once
    assert m.disk_bytes["frozen_base"] > 0 and m.tasks[0].labels == ["class0", "class1"]
    slots = [sl for e in m.experts for sl in e.adapter.values()]
    assert {sl.scaling for sl in slots} >= {1.0, 16 / 6}  # merged B'A' and task 2's own lora_alpha / r
    lib = ExpertLibrary.load(tmp_path / "lib", device="cpu")
    ev = s.evaluator()
    for t, name in enumerate(s.plan.tasks):
        texts = [r["text"] for r in ev.data[t].records]
        got = np.array([p["logits"] for p in lib.predict(texts, task=name, return_logits=True)])
        np.testing.assert_allclose(got, ev.outputs(G, t), atol=1e-5, rtol=0)
    assert lib.predict(["w1 w2"], task="t0")[0]["label"].startswith("class")


def test_ia3_library_assembles_what_the_search_scored(ia3, tmp_path):
    from mergetool.library.reader import LibraryFiles as Stored
    from mergetool.library.writer import SolutionIn, export_library

    s = ia3("{bits: 4, granularity: per_tensor, mode: conditional}")
    G = np.random.default_rng(2).integers(0, s.plan.T, (s.plan.T, s.plan.L))
    m = export_library(s.recipe, s.plan, (s.base, s.tasks), [SolutionIn(G)], tmp_path / "lib")
    assert m.adapter.type == "IA3" and m.storage_cost == s.store.storage_cost(G)
    lib = Stored.load(tmp_path / "lib")
    ev = s.evaluator()
    for t, name in enumerate(s.plan.tasks):
        module = tf.T5ForConditionalGeneration.from_pretrained(ia3.base).eval()
        module.load_state_dict(lib.task_state(name), strict=False)
        with torch.no_grad():
            want = torch.cat([choice_logprobs(module(**{k: v for k, v in b.items() if not k.startswith("target")},
                                                     use_cache=False).logits, b) for b in ev.data[t].batches])
        np.testing.assert_array_equal(ev.outputs(G, t), want.numpy())


def test_baselines_refuse_adapter_zoos_with_one_line(lora):
    from mergetool.baselines import run_baselines
    from mergetool.core.errors import MergetoolError

    with pytest.raises(MergetoolError, match="PEFT adapters") as e:
        run_baselines(lora(), methods=["ta"])
    assert "\n" not in e.value.one_line() and "models" in e.value.one_line()
