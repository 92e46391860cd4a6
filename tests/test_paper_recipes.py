"""The paper's four recipes (merge_recipes/paper-*.yaml) validate against tiny offline stand-ins.

The stand-ins (tests/standins.py) have the real architectures at 2 layers, width 16, so the recipes'
env vars are pointed at them and `mergetool validate` must accept each recipe with the paper's T and
the component count of a 2-layer model; broken data must be refused in one located line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from standins import GLUE, GLUE7, LAYERS, T0_TASKS, VISION, build_paper_standins
from typer.testing import CliRunner

from mergetool.cli.app import app
from mergetool.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "merge_recipes"
runner = CliRunner()

# setting -> (recipe, task names, L of the 2-layer stand-in, L of the real model)
SETTINGS = {
    # embeddings, pre-norm, layers x (attention, norm, mlp), post-norm
    "clip": ("paper-clip-vit-b32-vision8.yaml", list(VISION), 3 + 3 * LAYERS, 39),
    # embeddings, layers x (attention, norm, mlp); the MLM head stays base-only
    "roberta": ("paper-roberta-base-glue8.yaml", list(GLUE), 1 + 3 * LAYERS, 37),
    # embeddings, layers x (attention, norm, mlp), ln_f
    "gpt2": ("paper-gpt2-glue7.yaml", GLUE7, 2 + 3 * LAYERS, 38),
    # (IA)3 vectors: (encoder + decoder) x layers x (attention, mlp)
    "t0": ("paper-t0-3b-ia3-11.yaml", list(T0_TASKS), 4 * LAYERS, 96),
}
ENV_VARS = ("MERGETOOL_PAPER_DIR", "MERGETOOL_PAPER_DATA", "MERGETOOL_CLIP_BASE", "MERGETOOL_ROBERTA_BASE",
            "MERGETOOL_GPT2_BASE", "MERGETOOL_T0_BASE")


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    return root, build_paper_standins(root)


def validate(recipe: str, env: dict):
    return runner.invoke(app, ["validate", str(RECIPES / recipe)], env=env)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_paper_recipe_validates(setting, standins):
    recipe, tasks, n_components, _ = SETTINGS[setting]
    result = validate(recipe, standins[1])
    assert result.exit_code == 0, result.output
    assert f"T={len(tasks)} tasks, L={n_components} components" in result.stdout


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_paper_settings(setting, monkeypatch):
    """The paper's search and quantisation settings; the defaults name the real checkpoints."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    recipe_file, tasks, _, real_l = SETTINGS[setting]
    r = load_recipe(RECIPES / recipe_file)
    assert list(r.task_names) == tasks
    assert (r.search.population, r.search.evaluations, r.search.surrogate) == (20, 300, "random_forest")
    assert (r.quantization.bits, r.quantization.mode) == (8, "conditional")
    assert r.merge.method == "task_arithmetic" and r.merge.parameters == {"lambda": 0.3}
    assert "/" in r.base_model and not r.base_model.startswith("/")  # a hub id by default
    home = str(Path("~").expanduser().resolve())
    for m in r.models:
        assert m.model.startswith(f"{home}/models/merge-paper/")
    for t in tasks:
        cfg = r.tasks[t]
        assert cfg.test is not None and cfg.router is not None
        assert cfg.validation.path.startswith(f"{home}/data/merge-paper/")
    assert f"L = {real_l}" in r.text  # the header states the real model's L


def test_paper_metrics_and_columns():
    glue = load_recipe(RECIPES / "paper-roberta-base-glue8.yaml")
    assert glue.tasks["cola"].metric == "matthews" and glue.tasks["stsb"].metric == "pearson_spearman"
    assert {glue.tasks[t].metric for t in GLUE if t not in ("cola", "stsb")} == {"accuracy"}
    for task, (_, text, pair) in GLUE.items():
        split = glue.tasks[task].validation
        assert (split.text, split.text_pair) == (text, pair)
    gpt2 = load_recipe(RECIPES / "paper-gpt2-glue7.yaml")
    assert "stsb" not in gpt2.tasks and gpt2.tasks["cola"].metric == "matthews"
    clip = load_recipe(RECIPES / "paper-clip-vit-b32-vision8.yaml")
    assert {(t.kind, t.validation.image, t.validation.text) for t in clip.tasks.values()} == {
        ("image_classification", "image", None)}
    t0 = load_recipe(RECIPES / "paper-t0-3b-ia3-11.yaml")
    assert {(t.kind, t.metric, t.validation.choices) for t in t0.tasks.values()} == {
        ("seq2seq_choice", "accuracy", "choices")}


def test_standins_look_like_the_real_checkpoints(standins):
    root, env = standins
    clip = json.loads((root / "models/clip-vit-b32/sun397/config.json").read_text())
    assert clip["architectures"] == ["CLIPForImageClassification"] and len(clip["id2label"]) == 397
    stsb = json.loads((root / "models/roberta-base-glue/stsb/config.json").read_text())
    assert stsb["architectures"] == ["RobertaForSequenceClassification"] and len(stsb["id2label"]) == 1
    gpt2 = json.loads((root / "models/gpt2-glue/mnli/config.json").read_text())
    assert gpt2["architectures"] == ["GPT2ForSequenceClassification"] and gpt2["pad_token_id"] is not None
    ia3 = json.loads((root / "models/t0-3b-ia3/copa/adapter_config.json").read_text())
    assert ia3["peft_type"] == "IA3" and set(ia3["target_modules"]) == {"k", "v", "wo"}
    for base in ("clip", "roberta", "gpt2", "t0"):
        assert Path(env[f"MERGETOOL_{base.upper()}_BASE"]).is_dir()
    assert (Path(env["MERGETOOL_CLIP_BASE"]) / "preprocessor_config.json").is_file()
    assert (Path(env["MERGETOOL_T0_BASE"]) / "tokenizer.json").is_file()


# --- bad input: one per recipe family ------------------------------------------------------------

def _rewrite(path: Path, change) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(change(dict(r))) + "\n" for r in rows))


def _drop(column: str):
    return lambda r: {k: v for k, v in r.items() if k != column}


BAD = {
    # case: (setting, data file under data/, how to break it, key named, message)
    "clip_no_image": ("clip", "vision/eurosat/test.jsonl", _drop("image"), "tasks.eurosat.test", "no column 'image'"),
    "roberta_no_text_pair": ("roberta", "glue/mrpc/validation.jsonl", _drop("sentence2"), "tasks.mrpc.validation",
                             "no column 'sentence2'"),
    "gpt2_label_range": ("gpt2", "glue/rte/test.jsonl", lambda r: {**r, "label": 7}, "tasks.rte.test.label",
                         "label 7"),
    "t0_no_choices": ("t0", "t0/copa/router.jsonl", _drop("choices"), "tasks.copa.router", "no column 'choices'"),
    # adapters carry no config.json: the label is checked against the row's own choices
    "t0_label_range": ("t0", "t0/hellaswag/test.jsonl", lambda r: {**r, "label": 9}, "tasks.hellaswag.test.label",
                       "label 9"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_paper_recipe_bad_data(case, standins, tmp_path):
    root, env = standins
    setting, relative, change, key, message = BAD[case]
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    _rewrite(data / relative, change)
    result = validate(SETTINGS[setting][0], {**env, "MERGETOOL_PAPER_DATA": str(data)})
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(data / relative) in line
    assert key in line and message in line and "fix:" in line


def test_paper_recipe_missing_model(standins, tmp_path):
    """An env var pointing at a folder without the checkpoints names the model key, no hub call."""
    env = {**standins[1], "MERGETOOL_PAPER_DIR": str(tmp_path / "nothing-here")}
    result = validate(SETTINGS["roberta"][0], env)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(GLUE) and all("does not exist" in line for line in lines)
    assert "models[3].model" in lines[3] and "paper-roberta-base-glue8.yaml" in lines[3]
