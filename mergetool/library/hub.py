"""Share expert libraries on the Hugging Face Hub: `push`, `pull` and `hub:REPO_ID@REV` loading.

A pulled library is data from a stranger. Before anything reaches DIR, or is handed out of the
cache, it is checked like a local library: the manifest's schema and format_version, exactly the
listed files with matching sha256, plain files only (links only into the cache's own blob
store), no sub-folders, nothing off the allow-list. The Hub's `.gitattributes` and a `.cache/`
folder are ignored (and never copied). Tensors are only ever read through safetensors.

Everything goes through the HF cache, so `HF_HUB_OFFLINE=1` serves cached revisions and fails
at once, with one line, for the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from mergetool.core.errors import LibraryError, MergetoolError
from mergetool.library.card import render_card
from mergetool.library.manifest import MANIFEST, README, FileEntry, Manifest, parse_manifest
from mergetool.library.reader import LibraryFiles, select_solution
from mergetool.library.staging import make_tmp, swap_in
from mergetool.library.verify import sha256_file, verify_folder
from mergetool.library.writer import check_target, disk_bytes

HUB_PREFIX = "hub:"
IGNORED_FILES = (".gitattributes",)  # added by the Hub to every repo
TAMPERED = "the repo may be corrupt or tampered with; ask its owner to push it again"


class HubError(MergetoolError):
    """The Hub could not be reached, or refused a request."""


# ------------------------------------------------------------------------------------------- refs


def is_hub_ref(ref) -> bool:
    return str(ref).startswith(HUB_PREFIX)


def parse_ref(ref: str) -> tuple[str, Optional[str]]:
    """'hub:ORG/NAME@REV' -> ('ORG/NAME', 'REV'); the revision is optional."""
    body = str(ref).removeprefix(HUB_PREFIX)
    repo_id, at, rev = body.partition("@")
    if not repo_id or (at and not rev):
        raise LibraryError(f"cannot read hub reference {ref!r}", key="library",
                           fix="write hub:NAMESPACE/NAME or hub:NAMESPACE/NAME@REVISION")
    return repo_id, rev or None


# ------------------------------------------------------------------------------------------- errors


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: Optional[str] = None, endpoint: Optional[str] = None) -> Iterator[None]:
    """huggingface_hub's exceptions -> one-line HubErrors (never a traceback, never a retry loop)."""
    try:
        from httpx2 import RequestError
    except ImportError:  # older huggingface_hub
        from httpx import RequestError
    from huggingface_hub import constants
    from huggingface_hub import errors as E

    target = repo_id + (f"@{revision}" if revision else "")
    host = endpoint or constants.ENDPOINT
    login = "pass --token (or set HF_TOKEN, or run `hf auth login`)"
    try:
        yield
    except MergetoolError:
        raise
    except E.OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE=1 forbids network access", key=target,
                       fix="unset HF_HUB_OFFLINE to reach the Hub") from None
    except E.LocalEntryNotFoundError:  # also IncompleteSnapshotError
        if constants.is_offline_mode():
            raise HubError("not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading it", key=target,
                           fix="pull it once online, or unset HF_HUB_OFFLINE") from None
        raise HubError(f"cannot reach the Hub at {host}, and it is not in the local cache", key=target,
                       fix="check the network connection and HF_ENDPOINT") from None
    except E.RevisionNotFoundError:
        raise HubError(f"revision {revision!r} not found in {repo_id}", key=target,
                       fix="give an existing branch, tag or commit sha") from None
    except E.GatedRepoError:
        raise HubError("the repository is gated", key=target, fix=f"request access on the Hub, then {login}") from None
    except E.RepositoryNotFoundError:
        raise HubError(f"repository {repo_id} not found (or it is private and no valid token was sent)",
                       key=target, fix=f"check the repo id, or {login}") from None
    except E.HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        if status in (401, 403):
            raise HubError(f"the Hub refused the request (HTTP {status})", key=target,
                           fix=f"use a token with write access: {login}") from None
        said = (getattr(e, "server_message", None) or str(e)).strip().splitlines()
        raise HubError(f"the Hub answered HTTP {status}: {said[0] if said else ''}", key=target) from None
    except E.HFValidationError as e:
        raise HubError(f"invalid repo id or revision: {str(e).splitlines()[0]}", key=target,
                       fix="use NAMESPACE/NAME") from None
    except RequestError as e:
        raise HubError(f"cannot reach the Hub at {host}: {type(e).__name__}: {e}", key=target,
                       fix="check the network connection and HF_ENDPOINT") from None


# ------------------------------------------------------------------------------------------- verify


def verify_snapshot(folder: Path, where: str, *, hashes: bool = True) -> Manifest:
    """A downloaded snapshot: the library check, with links allowed only into the cache's blob store."""
    return verify_folder(folder, hashes=hashes, where=where, links_into=Path(folder).parent.parent / "blobs",
                         ignored_files=IGNORED_FILES, fix=TAMPERED)


def _download(repo_id: str, revision: Optional[str], token, endpoint) -> Path:
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision, endpoint):
        return Path(snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint))


def resolve_library(ref: str, *, token=None, endpoint=None) -> tuple[Path, Manifest]:
    """`hub:REPO_ID@REV` -> (its verified snapshot folder in the HF cache, its manifest)."""
    repo_id, revision = parse_ref(ref)
    snap = _download(repo_id, revision, token, endpoint)
    return snap, verify_snapshot(snap, f"{repo_id}@{snap.name[:12]}", hashes=True)


# ------------------------------------------------------------------------------------------- pull


def pull(repo_id: str, dest, *, revision: Optional[str] = None, token=None, endpoint=None,
         force: bool = False) -> Path:
    """Download a library into `dest` through the HF cache; only a fully verified copy is moved there."""
    if is_hub_ref(repo_id):
        repo_id, rev = parse_ref(repo_id)
        revision = revision or rev
    dest = Path(dest).absolute()
    check_target(dest, force, key="DIR")
    snap = _download(repo_id, revision, token, endpoint)
    where = f"{repo_id}@{snap.name[:12]}"
    m = verify_snapshot(snap, where, hashes=False)  # structure first: nothing unsafe is copied
    tmp = None
    try:
        tmp = make_tmp(dest)
        for name in [MANIFEST, *m.files]:
            shutil.copyfile(snap / name, tmp / name)  # plain files, never links
        verify_folder(tmp, hashes=True, where=where, fix=TAMPERED)  # the copy itself, with every sha256
        swap_in(tmp, dest)
    except OSError as e:
        raise LibraryError(f"cannot write the library: {e}", file=str(dest), key="DIR") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ------------------------------------------------------------------------------------------- push


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def stage(lib: Path, m: Manifest, repo_id: str) -> Path:
    """A temporary copy of the library (hard links) whose card names `repo_id`; the manifest follows it."""
    lib = Path(lib)
    try:
        out = Path(tempfile.mkdtemp(prefix=f".{lib.name}.push-", dir=lib.absolute().parent))
    except OSError:
        out = Path(tempfile.mkdtemp(prefix="mergetool-push-"))
    try:
        for name in m.files:
            if name != README:
                _link_or_copy(lib / name, out / name)
        card = render_card(m, repo_id=repo_id)
        old = (lib / README).read_text(encoding="utf-8") if README in m.files else None
        if old == card:
            _link_or_copy(lib / README, out / README)
            _link_or_copy(lib / MANIFEST, out / MANIFEST)
            return out
        (out / README).write_text(card, encoding="utf-8")  # a new file: the library is never changed
        entry = FileEntry(sha256=sha256_file(out / README), bytes=(out / README).stat().st_size)
        new = m.model_copy(update={"files": dict(sorted({**m.files, README: entry}.items()))})
        new = new.model_copy(update={"disk_bytes": disk_bytes(out, new)})
        text = new.model_dump_json(indent=1)
        parse_manifest(json.loads(text), str(lib / MANIFEST))  # still a valid manifest
        (out / MANIFEST).write_text(text + "\n", encoding="utf-8")
        return out
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def push(lib_dir, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
         commit_message: Optional[str] = None, token=None, endpoint=None):
    """Verify the library, write its card, upload it as one commit; returns huggingface_hub's CommitInfo.

    Files of an earlier push that this library lacks are deleted in the same commit."""
    from huggingface_hub import HfApi

    lib = Path(lib_dir)
    m = verify_folder(lib, hashes=True)  # checksums before anything leaves the machine
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or (f"Upload expert library ({len(m.tasks)} tasks, {len(m.experts)} experts, "
                                 f"mergetool {m.mergetool_version})")
    folder = stage(lib, m, repo_id)
    try:
        with hub_errors(repo_id, revision, endpoint):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                     commit_message=message, delete_patterns="*")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def open_library(ref, *, budget: Optional[float] = None, solution: Optional[int] = None, verify: bool = True):
    """A stored library from a folder, or from `hub:REPO_ID@REV` through the HF cache (always fully verified)."""
    if is_hub_ref(ref):
        folder, m = resolve_library(str(ref))
        return LibraryFiles(folder, m, select_solution(m, budget=budget, solution=solution))
    return LibraryFiles.load(Path(ref), budget=budget, solution=solution, verify=verify)
