"""Tests of the fake Hub server (tests/hub_server.py), driven by the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from hub_server import (  # noqa: E402,F401  (importing the fixtures registers them for this module)
    DUMMY_TOKEN,
    HubServer,
    git_blob_sha1,
    hub_env,
    hub_offline,
    hub_server,
    hub_server_raw,
)
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub import constants as hf_constants  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

pytestmark = pytest.mark.timeout(60)  # pytest-timeout (dev extra); bounds any hang

REPO = "test-user/expert-lib"
# Binary payload with NUL and high bytes (not valid UTF-8) to check byte-exact round trips.
WEIGHTS = b"\x00\xff\x80\x7f" * 64 + bytes(range(256)) * 4 + b"\x00" * 17


def _make_library(root: Path, *, version: int = 1, weights: bytes = WEIGHTS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"format": "expert-library", "version": version}))
    (root / "expert_a.safetensors").write_bytes(weights)
    (root / "README.md").write_text(f"# Expert library v{version}\n")
    (root / "experts").mkdir(exist_ok=True)
    (root / "experts" / "b.json").write_text(json.dumps({"expert": "b", "version": version}))
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".cache" not in p.parts
    }


def _api(server: HubServer) -> HfApi:
    return HfApi(endpoint=server.endpoint, token=DUMMY_TOKEN)


# ------------------------------------------------------------------------------------------ 1. round trip


def test_create_upload_download_roundtrip(hub_server, tmp_path):
    api = _api(hub_server)
    url1 = api.create_repo(REPO, exist_ok=True)
    url2 = api.create_repo(REPO, exist_ok=True)
    assert url1 == url2 == f"{hub_server.endpoint}/{REPO}"
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(REPO)  # exist_ok=False -> 409
    assert excinfo.value.response.status_code == 409

    src = _make_library(tmp_path / "src")
    info = api.upload_folder(repo_id=REPO, folder_path=src, commit_message="v1")
    assert info.oid == hub_server.head(REPO)
    assert info.commit_url == f"{hub_server.endpoint}/{REPO}/commit/{info.oid}"

    path = Path(snapshot_download(REPO, endpoint=hub_server.endpoint, cache_dir=tmp_path / "cache"))
    assert path.name == info.oid
    got = _files(path)
    assert {k: v for k, v in got.items() if k != ".gitattributes"} == _files(src)
    assert ".gitattributes" in got  # like the Hub, repos start with an initial commit holding it

    # safetensors is described as an LFS file: metadata carries its sha256, and the cache blob is named by it.
    sha256 = hashlib.sha256(WEIGHTS).hexdigest()
    tree = {f.path: f for f in api.list_repo_tree(REPO, recursive=True)}
    assert tree["expert_a.safetensors"].lfs.sha256 == sha256
    assert tree["expert_a.safetensors"].size == len(WEIGHTS)
    assert tree["manifest.json"].lfs is None
    assert tree["manifest.json"].blob_id == git_blob_sha1((src / "manifest.json").read_bytes())
    assert "experts" in tree and "experts/b.json" in tree
    assert Path(os.path.realpath(path / "expert_a.safetensors")).name == sha256

    siblings = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}
    assert siblings["expert_a.safetensors"].lfs.sha256 == sha256
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *_files(src)])

    # The configured token is sent on every API call.
    assert all(r.authorization == f"Bearer {DUMMY_TOKEN}" for r in hub_server.requests)
    assert hub_server.count("POST", "/commit/main") == 1


def test_hf_hub_download_single_file_and_missing_entries(hub_server, tmp_path):
    api = _api(hub_server)
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=_make_library(tmp_path / "src"))
    p = hf_hub_download(REPO, "experts/b.json", endpoint=hub_server.endpoint, cache_dir=tmp_path / "c")
    assert json.loads(Path(p).read_text())["expert"] == "b"
    assert api.file_exists(REPO, "manifest.json")
    assert not api.file_exists(REPO, "nope.json")
    assert api.repo_exists(REPO) and not api.repo_exists("test-user/missing")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("test-user/missing", endpoint=hub_server.endpoint, cache_dir=tmp_path / "c")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="nope", endpoint=hub_server.endpoint, cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------------------ 2. history


def test_second_upload_new_commit_old_revision_still_served(hub_server, tmp_path):
    api = _api(hub_server)
    api.create_repo(REPO, exist_ok=True)
    v1 = _make_library(tmp_path / "v1", version=1)
    old = api.upload_folder(repo_id=REPO, folder_path=v1).oid
    v2 = _make_library(tmp_path / "v2", version=2, weights=WEIGHTS[::-1])
    new = api.upload_folder(repo_id=REPO, folder_path=v2).oid
    assert old != new and len(new) == 40

    cache = tmp_path / "cache"
    old_path = Path(snapshot_download(REPO, revision=old, endpoint=hub_server.endpoint, cache_dir=cache))
    new_path = Path(snapshot_download(REPO, endpoint=hub_server.endpoint, cache_dir=cache))
    assert old_path.name == old and new_path.name == new
    assert (old_path / "expert_a.safetensors").read_bytes() == WEIGHTS
    assert (new_path / "expert_a.safetensors").read_bytes() == WEIGHTS[::-1]
    assert json.loads((old_path / "manifest.json").read_text())["version"] == 1

    refs = api.list_repo_refs(REPO)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", new)]
    assert api.model_info(REPO).sha == new
    assert api.model_info(REPO, revision=old).sha == old
    assert api.model_info(REPO, revision=new[:10]).sha == new  # short sha
    commits = [c.commit_id for c in api.list_repo_commits(REPO)]
    assert commits[:2] == [new, old] and len(commits) == 3  # + initial commit

    # Deletions (file and folder) through create_commit.
    ci = api.create_commit(
        REPO,
        operations=[
            CommitOperationDelete("README.md"),
            CommitOperationDelete("experts/"),
            CommitOperationAdd("notes.txt", b"hello"),
        ],
        commit_message="prune",
        parent_commit=new,
    )
    assert sorted(hub_server.list_files(REPO)) == [
        ".gitattributes", "expert_a.safetensors", "manifest.json", "notes.txt"
    ]
    with pytest.raises(HfHubHTTPError) as excinfo:  # stale parent_commit -> 412
        api.create_commit(REPO, operations=[CommitOperationAdd("x.txt", b"x")], commit_message="x",
                          parent_commit=new)
    assert excinfo.value.response.status_code == 412
    assert hub_server.head(REPO) == ci.oid

    # Re-uploading identical files makes no new commit (preupload returns the remote oids).
    same = api.upload_file(path_or_fileobj=b"hello", path_in_repo="notes.txt", repo_id=REPO)
    assert same.oid == ci.oid


# ------------------------------------------------------------------------------------------ 3. branches


def test_upload_to_branch_and_download_from_it(hub_server, tmp_path):
    api = _api(hub_server)
    api.create_repo(REPO)
    main_sha = api.upload_folder(repo_id=REPO, folder_path=_make_library(tmp_path / "v1", version=1)).oid

    # Like the real Hub: pushing to a branch that does not exist is a 404 "Invalid rev id".
    with pytest.raises(RevisionNotFoundError):
        api.upload_folder(repo_id=REPO, folder_path=tmp_path / "v1", revision="dev")

    api.create_branch(REPO, branch="dev", exist_ok=True)
    api.create_branch(REPO, branch="dev", exist_ok=True)
    v2 = _make_library(tmp_path / "v2", version=2)
    dev_sha = api.upload_folder(repo_id=REPO, folder_path=v2, revision="dev").oid

    refs = {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches}
    assert refs == {"main": main_sha, "dev": dev_sha}
    path = Path(snapshot_download(REPO, revision="dev", endpoint=hub_server.endpoint, cache_dir=tmp_path / "c"))
    assert path.name == dev_sha
    assert json.loads((path / "manifest.json").read_text())["version"] == 2
    main_path = Path(snapshot_download(REPO, endpoint=hub_server.endpoint, cache_dir=tmp_path / "c"))
    assert json.loads((main_path / "manifest.json").read_text())["version"] == 1

    # Tags and deleting branches.
    api.create_tag(REPO, tag="v2.0", revision="dev")
    assert api.model_info(REPO, revision="v2.0").sha == dev_sha
    api.delete_branch(REPO, branch="dev")
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main"]


def test_auto_create_branches_option(tmp_path):
    with HubServer(auto_create_branches=True) as server, hub_env(server.endpoint, tmp_path / "home"):
        api = _api(server)
        api.create_repo(REPO)
        sha = api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, revision="feature").oid
        assert server.head(REPO, "feature") == sha
        assert "x.txt" not in server.list_files(REPO, "main")


# ------------------------------------------------------------------------------------------ 4. tampering


def test_tamper_new_commit_is_served(hub_server, tmp_path):
    api = _api(hub_server)
    api.create_repo(REPO)
    good = api.upload_folder(repo_id=REPO, folder_path=_make_library(tmp_path / "src")).oid
    first = Path(snapshot_download(REPO, endpoint=hub_server.endpoint, cache_dir=tmp_path / "c1"))
    assert (first / "expert_a.safetensors").read_bytes() == WEIGHTS

    evil = b"EVIL" + WEIGHTS[4:]
    bad = hub_server.tamper(REPO, "expert_a.safetensors", evil)
    assert bad != good and hub_server.head(REPO) == bad
    again = Path(snapshot_download(REPO, endpoint=hub_server.endpoint, cache_dir=tmp_path / "c1"))
    assert again.name == bad
    assert (again / "expert_a.safetensors").read_bytes() == evil
    assert (first / "expert_a.safetensors").read_bytes() == WEIGHTS  # old snapshot untouched
    # The pinned good sha still serves the original bytes.
    pinned = Path(snapshot_download(REPO, revision=good, endpoint=hub_server.endpoint, cache_dir=tmp_path / "c2"))
    assert (pinned / "expert_a.safetensors").read_bytes() == WEIGHTS
    assert api.list_repo_commits(REPO)[0].authors == ["mallory"]


def test_tamper_in_place_keeps_commit_sha(hub_server, tmp_path):
    api = _api(hub_server)
    api.create_repo(REPO)
    sha = api.upload_folder(repo_id=REPO, folder_path=_make_library(tmp_path / "src")).oid
    evil = b'{"format": "expert-library", "version": 666}'
    assert hub_server.tamper(REPO, "manifest.json", evil, revision=sha, in_place=True) == sha
    path = Path(snapshot_download(REPO, revision=sha, endpoint=hub_server.endpoint, cache_dir=tmp_path / "c"))
    assert path.name == sha and (path / "manifest.json").read_bytes() == evil
    # Python-side helpers
    hub_server.add_file(REPO, "extra.txt", b"extra")
    assert hub_server.get_file(REPO, "extra.txt") == b"extra"
    hub_server.remove_file(REPO, "extra.txt")
    assert "extra.txt" not in hub_server.list_files(REPO)


# ------------------------------------------------------------------------------------------ 5. offline


def test_offline_cached_zero_requests_and_uncached_fails_fast(hub_server, tmp_path):
    api = _api(hub_server)
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=_make_library(tmp_path / "src"))
    api.create_repo("test-user/never-downloaded")
    cache = tmp_path / "cache"
    online = snapshot_download(REPO, endpoint=hub_server.endpoint, cache_dir=cache)
    sha = hub_server.head(REPO)

    hub_server.reset_requests()
    with hub_offline():
        assert hf_constants.is_offline_mode()
        assert snapshot_download(REPO, endpoint=hub_server.endpoint, cache_dir=cache) == online
        assert snapshot_download(REPO, revision=sha, endpoint=hub_server.endpoint, cache_dir=cache) == online
        p = hf_hub_download(REPO, "manifest.json", endpoint=hub_server.endpoint, cache_dir=cache)
        assert Path(p).read_bytes() == (tmp_path / "src" / "manifest.json").read_bytes()
        t0 = time.monotonic()
        with pytest.raises(LocalEntryNotFoundError) as excinfo:
            snapshot_download("test-user/never-downloaded", endpoint=hub_server.endpoint, cache_dir=cache)
        assert time.monotonic() - t0 < 5
        assert type(excinfo.value.__cause__).__name__ == "OfflineModeIsEnabled"
    assert not hf_constants.is_offline_mode()
    assert hub_server.request_count == 0

    # local_files_only=True behaves the same without toggling offline mode.
    assert snapshot_download(REPO, endpoint=hub_server.endpoint, cache_dir=cache, local_files_only=True) == online
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("test-user/never-downloaded", endpoint=hub_server.endpoint, cache_dir=cache,
                          local_files_only=True)
    assert hub_server.request_count == 0


def test_server_down_fails_fast_without_cache(tmp_path):
    server = HubServer().start()
    endpoint = server.endpoint
    server.stop()
    with hub_env(endpoint, tmp_path / "home"):
        t0 = time.monotonic()
        with pytest.raises(LocalEntryNotFoundError):
            snapshot_download(REPO, endpoint=endpoint, cache_dir=tmp_path / "c")
        assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------------------------------ 6. model card


def test_model_card_push_and_load(hub_server, tmp_path):
    api = _api(hub_server)
    api.create_repo(REPO)
    content = "---\nlicense: apache-2.0\ntags:\n- mergetool\n- expert-library\n---\n\n# Expert library\n"
    ModelCard(content).push_to_hub(REPO)  # module-level API: relies on hub_env's constant patching
    assert hub_server.count("POST", "/api/validate-yaml") >= 1
    assert hub_server.get_file(REPO, "README.md") == content.encode()

    card = ModelCard.load(REPO)
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["mergetool", "expert-library"]
    assert "# Expert library" in card.text

    hub_server.reject_yaml = '"license" must be one of [...]'
    with pytest.raises(ValueError, match="must be one of"):
        ModelCard(content.replace("apache-2.0", "bogus")).push_to_hub(REPO)


# ------------------------------------------------------------------------------------------ server plumbing


def test_private_repo_and_token_check(tmp_path):
    with HubServer(token="hf_secret") as server, hub_env(server.endpoint, tmp_path / "home", token="hf_secret"):
        api = HfApi(endpoint=server.endpoint, token="hf_secret")
        api.create_repo(REPO, private=True)
        api.upload_file(path_or_fileobj=b"{}", path_in_repo="manifest.json", repo_id=REPO)
        assert api.model_info(REPO).private is True
        anon = HfApi(endpoint=server.endpoint, token=False)
        with pytest.raises(RepositoryNotFoundError):
            anon.model_info(REPO)
        wrong = HfApi(endpoint=server.endpoint, token="hf_wrong")
        with pytest.raises(HfHubHTTPError) as excinfo:
            wrong.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO)
        assert excinfo.value.response.status_code in (401, 404)
        assert api.whoami()["name"] == "test-user"


def test_raw_http_range_errors_and_injection(hub_server_raw):
    server = hub_server_raw
    server.add_file("ns/raw", "blob.dat", bytes(range(100)))  # not an LFS pattern
    sha = server.head("ns/raw")
    url = f"{server.endpoint}/ns/raw/resolve/main/blob.dat"
    req = urllib.request.Request(url, headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 206 and r.read() == bytes(range(10, 20))
        assert r.headers["Content-Range"] == "bytes 10-19/100"
        assert r.headers["X-Repo-Commit"] == sha
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5) as r:
        assert r.headers["Content-Length"] == "100"
        assert r.headers["ETag"] == f'"{git_blob_sha1(bytes(range(100)))}"'
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(f"{server.endpoint}/ns/raw/resolve/main/missing.bin", timeout=5)
    excinfo.value.close()
    assert excinfo.value.code == 404 and excinfo.value.headers["X-Error-Code"] == "EntryNotFound"
    server.inject_error(403, path_contains="/resolve/", message="nope")
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(url, timeout=5)
    excinfo.value.close()
    assert excinfo.value.code == 403
    with urllib.request.urlopen(url, timeout=5) as r:  # injected once only
        assert r.status == 200
    assert server.count("GET", "/ns/raw/resolve/") == 4


def test_hub_env_restores_everything(tmp_path):
    before_const = (hf_constants.ENDPOINT, hf_constants.HF_HUB_CACHE, hf_constants.HF_HUB_OFFLINE)
    before_env = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_TOKEN", "HF_HOME")}
    before_api = huggingface_hub.hf_api.api.endpoint
    with hub_env("http://127.0.0.1:9", tmp_path / "home") as env:
        assert hf_constants.ENDPOINT == "http://127.0.0.1:9"
        assert hf_constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith("http://127.0.0.1:9/")
        assert huggingface_hub.hf_api.api.endpoint == "http://127.0.0.1:9"
        assert os.environ["HF_TOKEN"] == DUMMY_TOKEN and env.hub_cache.is_dir()
        assert Path(hf_constants.HF_TOKEN_PATH).parent == tmp_path / "home"
    assert (hf_constants.ENDPOINT, hf_constants.HF_HUB_CACHE, hf_constants.HF_HUB_OFFLINE) == before_const
    assert {k: os.environ.get(k) for k in before_env} == before_env
    assert huggingface_hub.hf_api.api.endpoint == before_api


def test_stop_closes_port():
    server = HubServer().start()
    port = server.port
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
