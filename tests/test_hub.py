"""push / pull / hub: loading against the loopback Hub server, driven by the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from routed import invoke

huggingface_hub = pytest.importorskip("huggingface_hub")

from hub_server import HubServer, hub_env, hub_offline  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402

from mergetool.core.errors import LibraryError, MergetoolError  # noqa: E402
from mergetool.library import ExpertLibrary, hub  # noqa: E402
from mergetool.library.card import render_card  # noqa: E402
from mergetool.library.verify import read_manifest  # noqa: E402
from mergetool.testing.toy import make_text_zoo, recipe_text  # noqa: E402

pytestmark = pytest.mark.timeout(60)
REPO = "test-user/expert-lib"
MIXED = [[0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1, 1, 1]]
SHARED = [[0] * 8, [0] * 8]


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """Two libraries of one tiny BERT zoo (a mixed and an all-shared grouping), exported by the CLI."""
    root = tmp_path_factory.mktemp("hubzoo")
    base, tasks, data = make_text_zoo(root)
    recipe = root / "r.yaml"
    recipe.write_text(recipe_text(base, tasks, data, out=f"output: {root / 'run'}"))
    out = {}
    for name, G in (("a", MIXED), ("b", SHARED)):
        g = root / f"{name}.json"
        g.write_text(json.dumps({"tasks": ["t0", "t1"], "grouping": G}))
        result, text = invoke("export", recipe, "--grouping", g, "--out", root / name, "--shard-size", "8KB")
        assert result.exit_code == 0, text
        out[name] = root / name
    return out


def _files(lib: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(lib.iterdir())}


def _states(lib) -> dict:
    opened = hub.open_library(lib)  # a folder or a hub: reference
    return {t: opened.task_state(t) for t in opened.tasks}


def _same_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a.values(), b.values()))


def _push(lib, **kw):
    return hub.push(lib, REPO, **kw)


def _one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def _left_behind(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


# ------------------------------------------------------------------------------------- round trip


def test_round_trip_gives_the_same_library(hub_server, libs, tmp_path):
    lib = libs["a"]
    before = _files(lib)
    result, text = invoke("push", lib, REPO, "--commit-message", "first library")
    assert result.exit_code == 0, text
    assert _files(lib) == before  # push never changes the local library
    result, text = invoke("pull", REPO, tmp_path / "got")
    assert result.exit_code == 0, text
    got = tmp_path / "got"
    assert _same_states(_states(lib), _states(got))
    # identical apart from the card (it now names the repo) and the manifest's entry for it
    g, b = _files(got), before
    assert set(g) == set(b) and all(g[n] == b[n] for n in g if n not in ("README.md", "manifest.json"))
    m0, m1 = read_manifest(lib), read_manifest(got)
    assert m0.model_dump(exclude={"files", "disk_bytes"}) == m1.model_dump(exclude={"files", "disk_bytes"})
    assert {n: e for n, e in m0.files.items() if n != "README.md"} == \
           {n: e for n, e in m1.files.items() if n != "README.md"}
    ExpertLibrary.load(got, verify=True)
    assert hub_server.get_file(REPO, "manifest.json") == g["manifest.json"]
    assert not [n for n in _left_behind(tmp_path) if n != "got"]  # no temporary folder left
    result, text = invoke("inspect", f"hub:{REPO}", "--json")  # a hub: reference works wherever a folder does
    assert result.exit_code == 0 and json.loads(result.stdout)["chains"] == read_manifest(lib).chains, text
    assert _plain(_predictions(lib)) == _plain(_predictions(got))


def _predictions(path) -> list:
    """Predictions of every task (and routed ones when the library has a router)."""
    from mergetool.inference import runtime

    lib = runtime.ExpertLibrary.load(path)
    texts = ["w1 w2", "w3 w4 w5", "w7", "w2 w2 w9"]
    tasks = [t.name for t in lib.manifest.tasks] + ([None] if lib.manifest.router else [])
    return [lib.predict(texts, task=t) for t in tasks]


def _plain(x):
    """Tensors, arrays and result objects as plain lists/dicts, for ==."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "__dict__"):
        return _plain(vars(x))
    return x


def test_model_card_parses_with_hub_metadata(hub_server, libs, tmp_path):
    hub.push(libs["a"], REPO)
    card = ModelCard(hub_server.get_file(REPO, "README.md").decode())
    assert card.data.library_name == "mergetool"
    assert card.data.tags == ["merge", "mergetool", "model-merging"]
    assert card.data.base_model == "bert-base" and card.data.to_dict()["tasks"] == ["t0", "t1"]
    text = card.text
    for needle in ("| task | labels | chain |", "## Groups per component", "storage cost C", "validation",
                   "routing accuracy: n/a", "pip install mergetool", f"mergetool pull {REPO} ./library",
                   "mergetool predict ./library", f"hub:{REPO}", "## Recipe", "name: tiny"):
        assert needle in text, needle
    assert ModelCard.load(REPO).data.library_name == "mergetool"  # through the client, from the server
    m = read_manifest(libs["a"])
    router = SimpleNamespace(routing_accuracy=0.975, routing_accuracy_per_task={"t0": 1.0, "t1": 0.95},
                             features="prefix")
    assert ("routing accuracy: 0.9750 on the test split (t0 1.0000, t1 0.9500); router features: `prefix`"
            in render_card(m.model_copy(update={"router": router})))
    unmeasured = m.model_copy(update={"router": {"routing_accuracy": None}})
    assert "routing accuracy: n/a (not measured)" in render_card(unmeasured)
    assert render_card(m) == (libs["a"] / "README.md").read_text()  # stable: rendering again gives the export's


# ------------------------------------------------------------------------------------- revisions


def test_second_push_makes_a_new_revision(hub_server, libs, tmp_path):
    first = _push(libs["a"])
    second = _push(libs["b"], commit_message="all shared")
    assert first.oid != second.oid == hub_server.head(REPO)
    # stale shards of the first library are deleted in the same commit
    assert sorted(hub_server.list_files(REPO)) == sorted([".gitattributes", *_files(libs["b"])])
    hub.pull(REPO, tmp_path / "new")
    hub.pull(REPO, tmp_path / "old", revision=first.oid)
    assert _same_states(_states(tmp_path / "new"), _states(libs["b"]))
    assert _same_states(_states(tmp_path / "old"), _states(libs["a"]))
    assert _same_states(_states(f"hub:{REPO}@{first.oid}"), _states(libs["a"]))
    # --force replaces a library; without it DIR is refused
    result, text = invoke("pull", REPO, tmp_path / "old")
    assert result.exit_code == 2 and "already exists" in _one_line(text)
    result, text = invoke("pull", REPO, tmp_path / "old", "--force")
    assert result.exit_code == 0, text
    assert _same_states(_states(tmp_path / "old"), _states(libs["b"]))


def test_push_to_a_branch(hub_server, libs, tmp_path):
    _push(libs["a"])
    result, text = invoke("push", libs["b"], REPO, "--revision", "dev", "--private")
    assert result.exit_code == 0, text
    assert hub_server.resolve(REPO, "dev") != hub_server.resolve(REPO, "main")
    result, text = invoke("pull", REPO, tmp_path / "dev", "--revision", "dev")
    assert result.exit_code == 0, text
    assert _same_states(_states(tmp_path / "dev"), _states(libs["b"]))
    assert _same_states(_states(f"hub:{REPO}"), _states(libs["a"]))


# ------------------------------------------------------------------------------------- tampering


def _manifest_path_out(server):
    m = json.loads(server.get_file(REPO, "manifest.json"))
    m["files"]["../x"] = next(iter(m["files"].values()))
    server.tamper(REPO, "manifest.json", json.dumps(m))


def _shard(server) -> str:
    return next(n for n in server.list_files(REPO) if n.startswith("experts-"))


def _flip(server, in_place=False):
    name = _shard(server)
    data = bytearray(server.get_file(REPO, name))
    data[-1] ^= 0xFF
    server.tamper(REPO, name, bytes(data), in_place=in_place)


TAMPER = {
    "shard changed": (lambda s: _flip(s), "checksum mismatch"),
    "shard changed in place": (lambda s: _flip(s, in_place=True), "checksum mismatch"),
    "extra pkl": (lambda s: s.add_file(REPO, "evil.pkl", b"\x80\x04K\x01."), "unexpected file 'evil.pkl'"),
    "extra py": (lambda s: s.add_file(REPO, "modeling.py", "import os\n"), "unexpected file 'modeling.py'"),
    "sub folder": (lambda s: s.add_file(REPO, "sub/config.json", "{}"), "unexpected folder 'sub'"),
    "unlisted json": (lambda s: s.add_file(REPO, "extra.json", "{}"), "not listed in the manifest"),
    "manifest path ../x": (_manifest_path_out, "points outside the library"),
    "missing file": (lambda s: s.remove_file(REPO, _shard(s)), "is missing"),
    "format version": (lambda s: s.tamper(REPO, "manifest.json", json.dumps(
        {**json.loads(s.get_file(REPO, "manifest.json")), "format_version": 99})), "format_version"),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_repo_is_refused_and_dir_stays_empty(hub_server, libs, tmp_path, case):
    _push(libs["a"])
    tamper, needle = TAMPER[case]
    tamper(hub_server)
    parent = tmp_path / "out"
    parent.mkdir()
    result, text = invoke("pull", REPO, parent / "lib")
    assert result.exit_code == 2
    line = _one_line(text)
    assert needle in line and REPO in line, line
    assert _left_behind(parent) == []  # nothing in DIR, no temporary folder
    with pytest.raises(LibraryError, match=needle.replace(".", r"\.")):
        hub.open_library(f"hub:{REPO}")


def test_hub_bookkeeping_is_ignored_and_never_copied(hub_server, libs, tmp_path):
    _push(libs["a"])
    hub_server.add_file(REPO, ".cache/huggingface/evil.pkl", b"\x80\x04K\x01.")
    path = hub.pull(f"hub:{REPO}", tmp_path / "lib")
    assert sorted(p.name for p in path.iterdir()) == sorted(_files(libs["a"]))  # no .gitattributes, no .cache
    hub.open_library(f"hub:{REPO}")


def test_cache_links_must_stay_in_the_blob_store(hub_server, libs, tmp_path):
    _push(libs["a"])
    hub.pull(REPO, tmp_path / "first")
    snap, _ = hub.resolve_library(f"hub:{REPO}")
    assert any(p.is_symlink() for p in snap.iterdir())  # blobs are linked: that is allowed
    shard = next(p for p in snap.iterdir() if p.name.startswith("experts-"))
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(shard, outside)  # same bytes, but outside the library and the cache
    shard.unlink()
    os.symlink(outside, shard)
    result, text = invoke("pull", REPO, tmp_path / "second")
    assert result.exit_code == 2 and "link pointing outside the library" in _one_line(text)
    assert not (tmp_path / "second").exists()


# ------------------------------------------------------------------------------------- offline


def test_offline_pull_serves_the_cache_without_requests(hub_server, libs, tmp_path):
    _push(libs["a"])
    hub.pull(REPO, tmp_path / "online")
    hub_server.reset_requests()
    with hub_offline(True):
        result, text = invoke("pull", REPO, tmp_path / "offline")
        assert result.exit_code == 0, text
        lib = hub.open_library(f"hub:{REPO}")
        assert lib.tasks == ["t0", "t1"]
    assert hub_server.request_count == 0
    assert _same_states(_states(tmp_path / "offline"), _states(libs["a"]))


def test_offline_pull_of_uncached_repo_fails_fast(hub_server, libs, tmp_path):
    _push(libs["a"])
    hub_server.reset_requests()
    with hub_offline(True):
        t0 = time.monotonic()
        result, text = invoke("pull", REPO, tmp_path / "lib")
        assert time.monotonic() - t0 < 5
        with pytest.raises(MergetoolError, match="HF_HUB_OFFLINE"):
            hub.open_library(f"hub:{REPO}")
        r2, t2 = invoke("push", libs["a"], REPO)
    assert result.exit_code == 2 and "HF_HUB_OFFLINE=1" in _one_line(text)
    assert r2.exit_code == 2 and "HF_HUB_OFFLINE=1" in _one_line(t2)
    assert not (tmp_path / "lib").exists() and hub_server.request_count == 0


# ------------------------------------------------------------------------------------- errors


def test_hub_errors_are_one_line(hub_server, libs, tmp_path):
    _push(libs["a"])
    for args, needle in [
        (("pull", "test-user/nope", tmp_path / "x"), "not found"),
        (("pull", REPO, tmp_path / "x", "--revision", "no-such-branch"), "revision 'no-such-branch' not found"),
        (("pull", "not a repo id!", tmp_path / "x"), "invalid repo id"),
    ]:
        result, text = invoke(*args)
        assert result.exit_code == 2 and needle in _one_line(text), text
        assert not (tmp_path / "x").exists()


def test_push_refuses_a_corrupt_library_before_any_request(hub_server, libs, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(libs["a"], lib)
    shard = next(lib.glob("experts-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result, text = invoke("push", lib, REPO)
    assert result.exit_code == 2 and "checksum mismatch" in _one_line(text)
    assert hub_server.request_count == 0


def test_unauthorised_and_unreachable(libs, tmp_path):
    with HubServer(token="hf_the_right_token") as server, hub_env(server.endpoint, tmp_path / "home",
                                                                  token="hf_a_wrong_token"):
        result, text = invoke("push", libs["a"], REPO)
        assert result.exit_code == 2 and "refused the request (HTTP 401)" in _one_line(text)
        result, text = invoke("push", libs["a"], REPO, "--token", "hf_the_right_token", "--private")
        assert result.exit_code == 0, text
        result, text = invoke("pull", REPO, tmp_path / "x")  # private: the wrong token reads nothing
        assert result.exit_code == 2 and "not found" in _one_line(text)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with hub_env(f"http://127.0.0.1:{port}", tmp_path / "home2"):
        t0 = time.monotonic()
        result, text = invoke("pull", REPO, tmp_path / "y")
        assert result.exit_code == 2 and "cannot reach the Hub" in _one_line(text)
        result, text = invoke("push", libs["a"], REPO)
        assert result.exit_code == 2 and "cannot reach the Hub" in _one_line(text)
        assert time.monotonic() - t0 < 10
    assert not (tmp_path / "y").exists()


def test_hub_ref_parsing():
    assert hub.parse_ref("hub:org/name@v1") == ("org/name", "v1")
    assert hub.parse_ref("hub:org/name") == ("org/name", None)
    for bad in ("hub:", "hub:org/name@"):
        with pytest.raises(LibraryError):
            hub.parse_ref(bad)


def _code_block(text: str, lang: str) -> str:
    start = text.index(f"```{lang}\n") + len(lang) + 4
    return text[start:text.index("```", start)]


def test_model_card_usage_runs_as_written(hub_server, libs, tmp_path, monkeypatch):
    """The card's Usage section is what a user copies: every mergetool line of its bash block and its
    python block run as written (pip install aside), so the card cannot lie about the API again."""
    hub.push(libs["a"], REPO)
    text = hub_server.get_file(REPO, "README.md").decode()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inputs.jsonl").write_text(json.dumps({"text": "w1 w2 w3"}) + "\n")
    commands = [line.split()[1:] for line in _code_block(text, "bash").splitlines() if line.startswith("mergetool ")]
    assert [c[0] for c in commands] == ["pull", "predict", "export-model"]
    for args in commands:
        result, out = invoke(*args)
        assert result.exit_code == 0, f"mergetool {' '.join(args)}: {out}"
    assert (tmp_path / "preds.jsonl").read_text().count("\n") == 1
    namespace: dict = {}
    exec(compile(_code_block(text, "python"), "README.md", "exec"), namespace)  # noqa: S102 - our own card
    lib, state = namespace["lib"], namespace["state"]
    assert type(lib).__module__ == "mergetool.inference.runtime"  # the user-facing class, hub: resolved
    assert lib.tasks == ["t0", "t1"] and all(isinstance(v, torch.Tensor) for v in state.values())
