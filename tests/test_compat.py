"""The dependency adapters (mergetool/core/compat.py), the environment check and `mergetool doctor`.

Each adapter is called against the installed releases; when one breaks, the test fails with one line
that names the package and its version (run `bash scripts/test.sh --latest` to see it coming)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergetool import doctor
from mergetool.cli.app import app
from mergetool.core import compat, envcheck

ROOT = Path(__file__).resolve().parent.parent


def call_adapter(package: str, fn, *args, **kwargs):
    """fn(*args, **kwargs); any failure becomes one line naming the package's installed version."""
    try:
        return fn(*args, **kwargs)
    except compat.DependencyDrift as e:
        pytest.fail(str(e), pytrace=False)
    except Exception as e:  # noqa: BLE001 - the point is to name the version, whatever broke
        pytest.fail(f"{package} {compat.installed_version(package)}: {fn.__name__} failed "
                    f"({type(e).__name__}: {e}); adapt mergetool/core/compat.py", pytrace=False)


def tiny_bert_config(attn_implementation: str = "sdpa"):
    import transformers

    return transformers.BertConfig(vocab_size=32, hidden_size=8, num_attention_heads=2, intermediate_size=16,
                                   num_hidden_layers=1, attn_implementation=attn_implementation)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bidirectional_mask_masks_padding(attn):
    config = tiny_bert_config(attn)
    h = torch.zeros(2, 5, 8)
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    mask = call_adapter("transformers", compat.bidirectional_mask, config, h, pad)
    assert mask is not None and mask.shape[0] == 2 and mask.shape[-1] == 5
    allowed = mask if mask.dtype == torch.bool else mask == 0  # bool (keep) or additive (0 keeps)
    assert bool(allowed[1, ..., :2].all()) and not bool(allowed[1, ..., 2:].any())
    assert bool(allowed[0].all())


def test_causal_mask_is_causal_without_a_cache():
    import transformers

    config = transformers.LlamaConfig(vocab_size=32, hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=16, num_hidden_layers=1,
                                      attn_implementation="eager")  # a materialised 4-D mask to inspect
    h = torch.zeros(1, 4, 8)
    pos = torch.arange(4).unsqueeze(0)
    mask = call_adapter("transformers", compat.causal_mask, config, h, torch.ones(1, 4, dtype=torch.long), pos)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    assert allowed.shape[-2:] == (4, 4)
    assert torch.equal(allowed[0, 0], torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_skip_weight_init_exists_and_builds_a_model():
    import transformers

    try:
        from transformers.initialization import no_init_weights  # noqa: F401
    except ImportError:
        pytest.fail(f"transformers {compat.installed_version('transformers')}: transformers.initialization."
                    "no_init_weights is gone; model construction falls back to random init (slower); "
                    "adapt mergetool/core/compat.py", pytrace=False)
    with compat.skip_weight_init():
        model = transformers.BertModel(tiny_bert_config())
    assert sum(p.numel() for p in model.parameters()) > 0


def test_mergekit_parameter_binding():
    from mergekit.merge_methods.base import TensorGroup

    import mergetool.merge.methods as merging

    method = merging._mergekit().get("task_arithmetic")
    metas = [torch.empty(3, 2, device="meta") for _ in range(3)]
    group = TensorGroup.from_tensors(metas, ids=["base", 0, 1], base_index=0, name="x")
    bound = call_adapter("mergekit", compat.bind_merge_parameters, method, group,
                         {"weight": {0: 0.3, 1: 0.7}, "lambda": 0.5})
    assert bound["lambda"] == 0.5
    assert {k: float(v) for k, v in bound["weight"].items()} == {0: 0.3, 1: 0.7}


def test_typer_usage_error_types():
    """Typer vendors Click privately; the CLI's one-line usage errors catch its classes via BadParameter."""
    import typer

    usage_error, click_exception = call_adapter("typer", compat.usage_error_types)
    assert issubclass(typer.BadParameter, usage_error) and issubclass(usage_error, click_exception)


def test_drift_line_names_package_version_and_fix():
    line = compat.drift("transformers", "create_causal_mask takes neither cache nor past_key_values").one_line()
    assert re.match(r"^environment: transformers \S+: create_causal_mask", line)
    assert "\n" not in line and "mergetool/core/compat.py" in line


def test_no_private_foreign_api_outside_the_adapter():
    """The private names mergetool once called; only compat.py may hold one (with its reason)."""
    banned = re.compile(r"_create_attention_masks|\._from_config\b|\._parameters\b|\._buffers\b|"
                        r"_bind_parameters|huggingface_hub\.utils\._|transformers\.modeling_utils|typer\._click|"
                        r"from click import|import click$")
    offenders = []
    for path in sorted((ROOT / "mergetool").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py")):
        if path.name in ("compat.py", "test_compat.py"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if banned.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "private dependency API outside mergetool/core/compat.py:\n" + "\n".join(offenders)


@pytest.mark.parametrize("arch", ["bert", "roberta", "vit", "clip", "gpt2", "llama"])
def test_staged_forward_equals_plain_forward(arch):
    torch.manual_seed(0)
    model, batch = doctor._tiny_models()[arch]()
    assert doctor.staged_difference(model.eval(), batch) == 0.0


def test_envcheck_names_each_difference_and_the_fix(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("torch==0.0.1 \\\n    --hash=sha256:00\n    # via x\nnot-a-real-package-xyz==1.0\n"
                    f"PyYAML=={compat.installed_version('pyyaml')}\n")
    found = envcheck.mismatches([lock])
    assert [m.name for m in found] == ["not-a-real-package-xyz", "torch"]
    line = envcheck.summary(found)
    assert "not-a-real-package-xyz missing (locked 1.0)" in line and "(locked 0.0.1)" in line
    assert line.endswith("(fix: bash scripts/setup_env.sh)") and "\n" not in line
    assert envcheck.mismatches([tmp_path / "absent.txt"]) is None


def test_this_environment_matches_the_lock_when_setup_made_it():
    found = envcheck.mismatches()
    if found is None:
        pytest.skip("installed without the repository's lock files")
    if not (ROOT / ".venv").exists() or Path(__import__("sys").prefix).name != ".venv":
        pytest.skip("not the locked venv (scripts/test.sh --latest or --oldest, or another environment)")
    assert not found, envcheck.summary(found)


def test_doctor_passes_here():
    result = CliRunner().invoke(app, ["doctor", "--no-assets"])
    assert "pass  staged forward: llama" in result.output
    assert "FAIL  staged forward" not in result.output


def test_doctor_fails_with_one_line_and_the_fix_when_the_staged_forward_breaks(monkeypatch):
    import mergetool.evaluation.stages as stages

    real = stages.staging

    def broken(module):  # what a transformers release that changes a layer's internals looks like
        plan = real(module)
        head = plan.head
        return stages.Staging(plan.n_layers, plan.embed, plan.layer, lambda state: head(state) + 1.0)

    monkeypatch.setattr(stages, "staging", broken)
    monkeypatch.setattr(envcheck, "mismatches", lambda *a, **k: [])
    result = CliRunner().invoke(app, ["doctor", "--no-assets"])
    assert result.exit_code == 2
    assert "FAIL  staged forward: bert: max |staged - plain| = 1.00e+00" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checks failed, first: staged forward: bert" in errors[0]
    assert "(fix: install the locked versions: bash scripts/setup_env.sh)" in errors[0]
    assert "Traceback" not in result.output


def test_doctor_reports_an_exception_in_the_staged_forward(monkeypatch):
    import mergetool.evaluation.stages as stages

    def raising(module):
        raise TypeError("BertModel.forward() got an unexpected keyword argument 'cache'")

    monkeypatch.setattr(stages, "staging", raising)
    result = CliRunner().invoke(app, ["doctor", "--no-assets"])
    assert result.exit_code == 2
    assert "FAIL  staged forward: gpt2: TypeError: BertModel.forward() got an unexpected keyword" in result.output
