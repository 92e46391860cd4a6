"""Shared fixtures: offline environment, tiny model zoos (built once per session), data files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import transformers  # noqa: E402

# the test session's own choice: tiny random models make transformers warn a lot (fixtures change nothing)
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
from hub_server import hub_server, hub_server_raw  # noqa: E402,F401  (loopback Hub fixtures)
from routed import routed  # noqa: E402,F401  (a routed library of the trained zoo)

from mergetool.testing.toy import make_lora_zoo, make_zoo, write_jsonl  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def plenty_of_memory(monkeypatch):
    """Cache behaviour must not depend on how loaded the test machine is: the prefix cache's memory
    pressure check (tested on its own in test_engine) reports no pressure."""
    import mergetool.evaluation.engine as engine

    monkeypatch.setattr(engine, "memory_is_short", lambda extra: False)


@pytest.fixture(scope="session")
def zoo_factory(tmp_path_factory):
    """zoo_factory(arch) -> (base_dir, [task_dirs]); each architecture is built once."""
    cache: dict = {}

    def get(arch: str, **kwargs):
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"zoo-{arch}")
            cache[key] = make_lora_zoo(root, **kwargs) if arch == "lora" else make_zoo(root, arch, **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    """Two small labelled jsonl files."""
    root = tmp_path_factory.mktemp("data")
    rows = [{"text": f"example {i}", "label": i % 2} for i in range(8)]
    return [write_jsonl(root / f"t{i}.jsonl", rows) for i in range(2)]


@pytest.fixture(scope="session")
def trained_zoo(tmp_path_factory):
    """Tiny BERTs fine-tuned on three conflicting synthetic tasks (trained, not random)."""
    from mergetool.testing.toy import make_trained_zoo

    return make_trained_zoo(tmp_path_factory.mktemp("trained"))


def pytest_addoption(parser):
    """--fuzz-long: the fuzz suite (tests/test_fuzz_*.py) runs 10x its default examples per command."""
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="run the property-based fuzz suite at 10x its default budget")


# the fuzz suite's session fixtures (tests/fuzz_fixtures.py), shared by every tests/test_fuzz_*.py
from fuzz_fixtures import fuzz_report, world  # noqa: E402,F401
