"""A routed expert library of the trained toy zoo, exported once per session by the CLI.

Grouping: every task shares the embeddings and layer 0 (the `prefix` the router reads); task1 and
task2 share their whole chain (many tasks, one chain); task0 keeps its own layer 1 and pooler.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mergetool.testing.toy import trained_recipe

# embeddings, layer.0.{attention,norm,mlp}, layer.1.{attention,norm,mlp}, pooler
G = np.asarray([[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]])


def invoke(*args, input=None):
    from mergetool.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    return result, result.stdout + (result.stderr or "")


def write_recipe(path, zoo, extra: str = "", name: str = "run"):
    path.write_text(trained_recipe(zoo, extra=extra) + f"output: {path.parent / name}\n")
    return path


@pytest.fixture(scope="session")
def routed(trained_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("routed")
    recipe = write_recipe(root / "toy.yaml", trained_zoo)
    g = root / "g.json"
    g.write_text(json.dumps({"grouping": G.tolist()}))
    result, text = invoke("export", recipe, "--grouping", g, "--out", root / "lib")
    assert result.exit_code == 0, text
    return {"root": root, "recipe": recipe, "grouping": g, "lib": root / "lib", "G": G, "zoo": trained_zoo,
            "export_output": text}
