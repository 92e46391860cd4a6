"""Bad input: every broken recipe exits 2 with one located line per problem, no traceback, no files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergetool.cli.app import app
from mergetool.testing.toy import write_jsonl

runner = CliRunner()


def good(base, tasks, data, *, names=("t0", "t1"), extra: str = "") -> str:
    models = "\n".join(f"  - {{name: {n}, model: {p}}}" for n, p in zip(names, tasks))
    task_lines = "\n".join(f"  {n}: {{validation: {{path: {d}}}}}" for n, d in zip(names, data))
    return f"name: bad\nbase_model: {base}\nmodels:\n{models}\ntasks:\n{task_lines}\n{extra}"


def nan_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("query.weight"))
    sd[key][0, 0] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    return dst


def cases(base, tasks, data, root: Path, zoo_factory):
    """id -> (recipe text, a substring the error must contain)."""
    t0, t1 = tasks
    d0, d1 = data
    gpt_base, gpt_tasks = zoo_factory("gpt2")
    lora_base, lora_tasks = zoo_factory("lora")
    b3, tasks3 = zoo_factory("bert", n_tasks=3)
    no_label = write_jsonl(root / "nolabel.jsonl", [{"text": "a", "target": 1}])
    not_json = root / "notjson.jsonl"
    not_json.write_text('{"text": "a", "label": 0}\n{oops\n')
    empty = root / "empty.jsonl"
    empty.write_text("")
    txt = root / "data.txt"
    txt.write_text("hello")
    text5 = write_jsonl(root / "text5.jsonl", [{"text": 5, "label": 0}, {"text": "b", "label": 1}])
    broken_index = root / "broken-index"
    shutil.copytree(t1, broken_index)
    (broken_index / "model.safetensors.index.json").write_text('{"weight_map": {oops')
    laughs = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else 'lol'}]\n" for i in range(9))
    return {
        "alias_bomb": (laughs + good(base, tasks, data), "anchors and aliases"),
        "alias_in_merge_parameters": (good(base, tasks, data, extra="merge: {method: ta, parameters: "
                                           "{lambda: &x 0.5, weight: [*x, *x]}}\n"), "anchors and aliases"),
        "deep_nesting": (good(base, tasks, data, extra="merge: {parameters: {x: " + "[" * 30000 + "]" * 30000 + "}}\n"),
                         "nested deeper than 64"),
        "huge_recipe": (good(base, tasks, data) + "".join(f"k{i}: 1\n" for i in range(150_000)), "larger than"),
        "many_unknown_keys": (good(base, tasks, data) + "".join(f"k{i}: 1\n" for i in range(500)),
                              "and 480 more problems"),
        "nan_lambda": (good(base, tasks, data, extra="merge: {method: ta, parameters: {lambda: .nan}}\n"),
                       "give a finite number"),
        "inf_weight": (good(base, tasks, data).replace(f"model: {t1}}}", f"model: {t1}, parameters: {{weight: .inf}}}}"),
                       "give a finite number"),
        "density_above_one": (good(base, tasks, data, extra="merge: {method: ties, parameters: {density: 2}}\n"),
                              "outside (0, 1]"),
        "density_negative": (good(base, tasks, data, extra="merge: {method: ties, parameters: {density: -1}}\n"),
                             "outside (0, 1]"),
        "pcb_ratio_above_one": (good(base, tasks, data, extra="merge: {method: pcb, parameters: {ratio: 1.5}}\n"),
                                "outside (0, 1]"),
        "pcb_ratio_zero": (good(base, tasks, data, extra="merge: {method: pcb, parameters: {ratio: 0}}\n"),
                           "outside (0, 1]"),
        "bits_16": (good(base, tasks, data, extra="quantization: {bits: 16}\n"), "2..8, or 32"),
        "router_lr_inf": (good(base, tasks, data, extra="router: {lr: .inf}\n"), "router.lr"),
        "racing_confidence_nan": (good(base, tasks, data, extra="search: {racing: {confidence: .nan}}\n"),
                                  "search.racing.confidence"),
        "text_not_a_string": (good(base, tasks, [d0, text5]), "column 'text' is a int, not text"),
        "evaluator_module_missing": (good(base, tasks, data).replace(
            f"  t1: {{validation: {{path: {d1}}}}}",
            f"  t1: {{kind: custom, evaluator: 'no_such_module_xyz:score', validation: {{path: {d1}}}}}"),
            "not installed"),
        "evaluator_function_missing": (good(base, tasks, data).replace(
            f"  t1: {{validation: {{path: {d1}}}}}",
            f"  t1: {{kind: custom, evaluator: 'json:no_such_fn', validation: {{path: {d1}}}}}"), "no function"),
        "evaluator_wrong_signature": (good(base, tasks, data).replace(
            f"  t1: {{validation: {{path: {d1}}}}}",
            f"  t1: {{kind: custom, evaluator: 'json:dumps', validation: {{path: {d1}}}}}"),
            "cannot be called with 3 arguments"),
        "package_parent_missing": (good("pkg:no_such_pkg_xyz.sub", tasks, data), "not installed"),
        "broken_shard_index": (good(base, [t0, broken_index], data), "not readable JSON"),
        "task_specific_matches_nothing": (good(base, tasks, data, extra=(
            "components: {task_specific: ['^classifier\\.', '^no_such_head\\.']}\n")), "matches no tensor"),
        "rule_matches_nothing": (good(base, tasks, data, extra=(
            "components: {rules: [{name: x, pattern: '^no_such_module\\.'}]}\n")), "matches no mergeable tensor"),
        "broken_yaml": ("name: [unclosed\nbase_model: x\n", "broken YAML"),
        "models_not_a_list": ("name: x\nbase_model: x\nmodels: 5\ntasks: {}\n", "fix: write a list here"),
        "tasks_not_a_mapping": ("name: x\nbase_model: x\nmodels: [{name: a, model: x}, {name: b, model: y}]\n"
                                "tasks: 'abc'\n", "fix: write a mapping"),
        "not_a_mapping": ("- a\n- b\n", "YAML mapping"),
        "duplicate_yaml_key": (good(base, tasks, data) + "name: again\n", "duplicate key"),
        "unknown_key": (good(base, tasks, data, extra="serch: {population: 4}\n"), "did you mean 'search'"),
        "unknown_nested_key": (good(base, tasks, data, extra="quantization: {bitz: 4}\n"), "did you mean 'bits'"),
        "wrong_type": (good(base, tasks, data, extra="search: {population: many}\n"), "population"),
        "missing_model_path": (good(base, [t0, root / "nope"], data), "does not exist"),
        "hub_id_offline": (good(base, [t0, "someorg/not-cached-model"], data), "not in the local cache"),
        "missing_package": (good("pkg:no_such_pkg_xyz", tasks, data), "not installed"),
        "duplicate_task": (good(base, tasks, [d0, d0], names=("t0", "t0")), "duplicate"),
        "no_validation": (good(base, tasks, data).replace(f"  t1: {{validation: {{path: {d1}}}}}",
                                                          "  t1: {metric: accuracy}"), "validation"),
        "task_without_model": (good(base, tasks, data) .replace("tasks:\n", "tasks:\n  t9: {validation: {path: x}}\n"),
                               "no model"),
        "label_column_missing": (good(base, tasks, [d0, no_label]), "no column 'label'"),
        "data_not_found": (good(base, tasks, [d0, root / "missing.jsonl"]), "data file not found"),
        "data_not_json": (good(base, tasks, [d0, not_json]), "line 2 is not JSON"),
        "data_empty": (good(base, tasks, [d0, empty]), "empty"),
        "data_format": (good(base, tasks, [d0, txt]), "unsupported data format"),
        "bad_regex": (good(base, tasks, data, extra="components: {task_specific: ['(oops']}\n"), "does not compile"),
        "preset_mismatch": (good(base, tasks, data, extra="components: {preset: gpt2}\n"), "does not match"),
        "uncovered": (good(base, tasks, data, extra=(
            "components:\n  preset: custom\n  rules: [{name: emb, pattern: '^embeddings\\.'}]\n")), "not covered"),
        "custom_without_rules": (good(base, tasks, data, extra="components: {preset: custom}\n"), "rules"),
        "shape_mismatch": (good(base, tasks, data, extra="components: {task_specific: []}\n"), "different shapes"),
        "nan_weights": (good(base, [t0, nan_copy(t1, root / "nan-task")], data), "NaN"),
        "architecture_mismatch": (good(base, [t0, gpt_tasks[0]], data), "differs from the base"),
        "adapter_and_full_mix": (good(lora_base, [lora_tasks[0], t1], data), "mix full fine-tunes"),
        "unknown_method": (good(base, tasks, data, extra="merge: {method: tie}\n"), "merge.method"),
        "fixed_arity_method": (good(b3, tasks3, [d0, d1, d0], names=("a", "b", "c"),
                                    extra="merge: {method: slerp, parameters: {t: 0.5}}\n"), "slerp"),
        "unknown_merge_parameter": (good(base, tasks, data, extra="merge: {method: ties, parameters: {densty: 0.5}}\n"),
                                    "densty"),
        "bits_out_of_range": (good(base, tasks, data, extra="quantization: {bits: 1}\n"), "bits"),
        "budget_below_population": (good(base, tasks, data, extra="search: {population: 20, evaluations: 5}\n"),
                                    "smaller than population"),
        "unknown_literal": (good(base, tasks, data, extra="search: {surrogate: random_forrest}\n"),
                            "did you mean 'random_forest'"),
        "unknown_crossover": (good(base, tasks, data, extra="search: {crossover: two_point}\n"),
                              "did you mean 'one_point'"),
        "router_hidden": (good(base, tasks, data, extra="router: {hidden: [256]}\n"), "3-layer"),
        "racing_fraction": (good(base, tasks, data, extra="search: {racing: {fraction: 0}}\n"), "search.racing.fraction"),
        "racing_fraction_above_one": (good(base, tasks, data, extra="search: {racing: {fraction: 1.5}}\n"),
                                      "search.racing.fraction"),
        "racing_negative_margin": (good(base, tasks, data, extra="search: {racing: {margin: -0.1}}\n"),
                                   "search.racing.margin"),
        "unknown_precision": (good(base, tasks, data, extra="search: {precision: fp8}\n"), "search.precision"),
        "all_task_specific": (good(base, tasks, data, extra="components: {task_specific: ['.*']}\n"),
                              "no parameter is left to merge"),
        "negative_seed": (good(base, tasks, data, extra="search: {seed: -1}\n"), "fix: use a value >= 0"),
        "huge_seed": (good(base, tasks, data, extra="search: {seed: 1180591620717411303424}\n"), "search.seed"),
        "unset_env_var": (good("${MERGETOOL_TEST_UNSET_VAR}", tasks, data), "MERGETOOL_TEST_UNSET_VAR"),
        "bad_task_name": (good(base, tasks, data, names=("t0", "bad name!")), "task names"),
        "task_name_300_characters": (good(base, tasks, data, names=("t0", "t" * 300)), "1-64"),
        "codec_bits_out_of_range": (good(base, tasks, data, extra="codecs: [{delta_quant: {bits: 9}}]\n"),
                                    "codecs[0].bits"),
        "codec_bits_zero": (good(base, tasks, data, extra="codecs: [{delta_quant: {bits: 0}}]\n"), "codecs[0].bits"),
        "codec_density_zero": (good(base, tasks, data, extra="codecs: [{delta_switch: {density: 0}}]\n"),
                               "codecs[0].density"),
        "codec_density_above_one": (good(base, tasks, data, extra="codecs: [{delta_switch: {density: 1.5}}]\n"),
                                    "codecs[0].density"),
        "codec_unknown": (good(base, tasks, data, extra="codecs: [{delta_zip: {bits: 2}}]\n"), "did you mean"),
        "codec_missing_setting": (good(base, tasks, data, extra="codecs: [{delta_quant: {}}]\n"), "needs `bits`"),
        "codec_malformed": (good(base, tasks, data, extra="codecs: [{delta_quant: 2}]\n"), "must be a mapping"),
        "codec_menu_empty": (good(base, tasks, data, extra="codecs: []\n"), "menu is empty"),
        "codec_menu_repeated": (good(base, tasks, data, extra="codecs: [full, {delta_quant: {bits: 2}}, "
                                                              "{delta_quant: {bits: 2}}]\n"), "listed twice"),
        "codec_delta_on_adapters": (good(lora_base, lora_tasks, data, extra="codecs: [{delta_quant: {bits: 2}}]\n"),
                                    "adapters"),
        "base_model_unknown_user": (good("~mergetool-no-such-user0/base", tasks, data), "does not exist"),
        "base_storage_unknown": (good(base, tasks, data, extra="base_storage: int4\n"), "base_storage"),
        "custom_without_evaluator": (good(base, tasks, data).replace(
            f"  t1: {{validation: {{path: {d1}}}}}", f"  t1: {{kind: custom, validation: {{path: {d1}}}}}"),
            "evaluator"),
    }


@pytest.fixture(scope="module")
def bad_cases(zoo_factory, data_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base, tasks = zoo_factory("bert")
    return cases(base, tasks, data_files, root, zoo_factory)


CASE_IDS = [
    "broken_yaml", "not_a_mapping", "duplicate_yaml_key", "unknown_key", "unknown_nested_key", "wrong_type",
    "missing_model_path", "hub_id_offline", "missing_package", "duplicate_task", "no_validation",
    "task_without_model", "label_column_missing", "data_not_found", "data_not_json", "data_empty", "data_format",
    "bad_regex", "preset_mismatch", "uncovered", "custom_without_rules", "shape_mismatch", "nan_weights",
    "architecture_mismatch", "adapter_and_full_mix", "unknown_method", "fixed_arity_method",
    "unknown_merge_parameter", "bits_out_of_range", "budget_below_population", "unknown_literal", "unknown_crossover",
    "router_hidden", "racing_fraction", "racing_fraction_above_one", "racing_negative_margin", "unknown_precision",
    "all_task_specific", "negative_seed", "huge_seed", "models_not_a_list", "tasks_not_a_mapping",
    "unset_env_var", "bad_task_name", "custom_without_evaluator",
    # hardening (issue 17): resource bombs, non-finite numbers, ranges, custom evaluators, broken files, patterns
    "alias_bomb", "alias_in_merge_parameters", "deep_nesting", "huge_recipe", "many_unknown_keys", "nan_lambda",
    "inf_weight", "density_above_one", "density_negative", "bits_16", "router_lr_inf", "racing_confidence_nan",
    "text_not_a_string", "evaluator_module_missing", "evaluator_function_missing", "evaluator_wrong_signature",
    "package_parent_missing", "broken_shard_index", "task_specific_matches_nothing", "rule_matches_nothing",
    "task_name_300_characters",
    # PCB-Merging (issue 18)
    "pcb_ratio_above_one", "pcb_ratio_zero",
    # codecs (issue 13)
    "codec_bits_out_of_range", "codec_bits_zero", "codec_density_zero", "codec_density_above_one", "codec_unknown",
    "codec_missing_setting", "codec_malformed", "codec_menu_empty", "codec_menu_repeated", "codec_delta_on_adapters",
    "base_storage_unknown", "base_model_unknown_user",  # fuzz find: ~user of no such user raised RuntimeError
]


def snapshot(root: Path) -> set:
    return {(str(p), p.stat().st_size) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_bad_recipe(case, command, bad_cases, tmp_path):
    os.environ.pop("MERGETOOL_TEST_UNSET_VAR", None)
    text, expected = bad_cases[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    before = snapshot(tmp_path)
    result = runner.invoke(app, [command, str(recipe)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    assert "Traceback" not in result.output
    assert expected in result.stderr, result.stderr
    located = [line for line in lines if str(recipe) in line or ".jsonl" in line or ".txt" in line]
    assert located, f"no line names the file: {result.stderr}"
    assert snapshot(tmp_path) == before  # nothing written


def test_all_cases_listed(bad_cases):
    assert sorted(CASE_IDS) == sorted(bad_cases) and len(CASE_IDS) >= 20


def test_errors_name_line_and_fix(bad_cases, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(bad_cases["unknown_nested_key"][0])
    result = runner.invoke(app, ["validate", str(recipe)])
    (line,) = result.stderr.strip().splitlines()
    assert f"{recipe}:" in line and "quantization.bitz" in line and "fix:" in line
    n = text_line(bad_cases["unknown_nested_key"][0], "bitz")
    assert f"{recipe}:{n}:" in line


def text_line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_debug_shows_traceback(bad_cases, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(bad_cases["missing_model_path"][0])
    result = runner.invoke(app, ["--debug", "validate", str(recipe)])
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_recipe_file_missing(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "recipe file not found" in result.stderr


def test_good_recipe_validates(zoo_factory, data_files, tmp_path):
    base, tasks = zoo_factory("bert")
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(good(base, tasks, data_files, extra="merge: {method: ta, parameters: {lambda: 0.3}}\n"))
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "T=2 tasks, L=8 components" in result.stdout
    result = runner.invoke(app, ["plan", str(recipe), "--json"])
    plan = json.loads(result.stdout)
    assert set(plan) >= {"tasks", "components", "task_specific", "uncovered", "total_params", "search_space_log10"}
    assert plan["uncovered"] == [] and plan["tasks"] == ["t0", "t1"]
    assert plan["search_space_log10"] == pytest.approx(8 * 0.30103, abs=1e-4)  # Bell(2) = 2
    assert {"name", "kind", "layer", "tensors", "params"} <= set(plan["components"][0])


def test_schema_command():
    result = runner.invoke(app, ["schema"])
    schema = json.loads(result.stdout)
    assert schema["title"] == "mergetool recipe"
    assert {"base_model", "models", "tasks", "search", "router"} <= set(schema["properties"])


def test_every_command_listed():
    help_text = runner.invoke(app, ["--help"]).stdout
    for name in ("validate", "plan", "schema", "search", "front", "export", "inspect", "export-model", "predict",
                 "evaluate", "baselines", "push", "pull"):
        assert name in help_text


assert torch  # keeps the import used for nan_copy's tensors
