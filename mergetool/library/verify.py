"""The one check every library passes before anything in it is used: a local folder (`LibraryFiles.load`),
a Hub snapshot and its copy (`hub.pull`, `hub:` references) and a library about to be pushed.

Before any tensor is read: the manifest (a plain JSON file of bounded size, a supported format, safe
names and references), then that the folder holds exactly the listed files (an allow-list, no
sub-folders, no link leaving the folder; a Hub snapshot's links may only point into its cache's blob
store), their sizes, that every shard has a valid safetensors header and, with `hashes`, every sha256.
Then the sanity layer (mergetool.library.sanity): configs, tokenizer, headers, stored tensors and the
router must make sense together, since checksums rewritten to match prove nothing about that.
Nothing is ever unpickled. Errors name `where` (for a snapshot: repo@revision, not a cache path).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence

from mergetool.core.errors import LibraryError
from mergetool.core.safejson import UnsafeJSON, parse_json
from mergetool.library.manifest import MANIFEST, REEXPORT, Manifest, allowed_name, parse_manifest
from mergetool.library.safetensors_io import read_header
from mergetool.library.sanity import check_library

MAX_MANIFEST = 256 * 2**20
IGNORED_DIRS = (".cache",)  # huggingface_hub's local_dir bookkeeping


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(lib: Path, where: Optional[str] = None, fix: str = REEXPORT) -> Manifest:
    """Parse and validate manifest.json (format version, safe names, references)."""
    lib = Path(lib)
    label = where or str(lib)
    if not lib.is_dir():
        raise LibraryError(f"{label} is not a library folder", file=label, fix="give the folder holding manifest.json")
    path = lib / MANIFEST
    if not path.is_file():
        raise LibraryError("no manifest.json: this is not an expert library", file=label,
                           fix="give the folder holding manifest.json")
    if path.stat().st_size > MAX_MANIFEST:
        raise LibraryError("manifest.json is implausibly large", file=f"{label}/{MANIFEST}", fix=fix)
    try:
        data = parse_json(path.read_bytes(), max_bytes=MAX_MANIFEST)
    except UnsafeJSON as exc:
        raise LibraryError(f"manifest.json is not valid, safe JSON: {exc}", file=f"{label}/{MANIFEST}", fix=fix) from None
    return parse_manifest(data, f"{label}/{MANIFEST}")


def verify_folder(folder: Path, *, hashes: bool, where: Optional[str] = None, links_into: Optional[Path] = None,
                  ignored_files: Sequence[str] = (), fix: str = REEXPORT) -> Manifest:
    """Check a library folder; its manifest. `links_into`: the one folder links may point into (a Hub
    cache's blob store); without it, no file may be a link that leaves the folder."""
    folder = Path(folder)
    label = where or str(folder)

    def fail(msg: str, name: Optional[str] = None, fix_: str = fix) -> LibraryError:
        return LibraryError(msg, file=f"{label}/{name}" if name else label, fix=fix_)

    present = _listing(folder, links_into, ignored_files, fail)
    if links_into is None and (folder / MANIFEST).is_symlink():  # a local library's manifest is a plain file
        raise LibraryError("no manifest.json (or it is not a plain file)", file=label,
                           fix="give the folder holding manifest.json")
    m = read_manifest(folder, label, fix)
    extra, missing = sorted(present - {MANIFEST} - set(m.files)), sorted(set(m.files) - present)
    if extra:
        raise fail(f"file {extra[0]!r} is not listed in the manifest", extra[0], "remove it or re-export the library")
    if missing:
        raise fail(f"listed file {missing[0]!r} is missing", None, "re-download or re-export the library")
    headers = {}
    for name, entry in m.files.items():
        size = (folder / name).stat().st_size
        if size != entry.bytes:
            raise fail(f"{name} has {size} bytes, the manifest says {entry.bytes}", name)
        if name.endswith(".safetensors"):
            headers[name] = read_header(folder / name)
    if hashes:
        for name, entry in m.files.items():
            if sha256_file(folder / name) != entry.sha256:
                raise fail(f"checksum mismatch for {name}", name)
    check_library(folder, m, headers, fail)  # checksums prove integrity, not sanity
    return m


def _listing(folder: Path, links_into: Optional[Path], ignored_files: Sequence[str], fail) -> set[str]:
    """Names of the library's files: flat, allow-listed, no link leaving the folder (or the blob store)."""
    if not folder.is_dir():
        raise LibraryError(f"{folder} is not a library folder", file=str(folder),
                           fix="give the folder holding manifest.json")
    root = folder.resolve()
    blobs = os.path.realpath(links_into) if links_into is not None else None
    present = set()
    for p in sorted(folder.iterdir()):
        if p.name in ignored_files or (p.name in IGNORED_DIRS and p.is_dir() and not p.is_symlink()):
            continue
        if p.is_symlink():
            target = Path(os.path.realpath(p))
            inside = str(target.parent) == blobs if blobs is not None else target.parent == root
            if not inside:
                raise fail(f"{p.name} is a symlink pointing outside the library", p.name)
            try:
                os.stat(p)
            except OSError:  # ELOOP, ENOENT: a link loop or a dangling link
                raise fail(f"{p.name} is a broken symlink or a symlink loop", p.name) from None
            if not target.is_file():
                raise fail(f"{p.name} is a symlink to something that is not a plain file", p.name)
        if p.is_dir():
            raise fail(f"unexpected folder {p.name!r}: libraries are flat", p.name, "remove it")
        if not allowed_name(p.name):
            raise fail(f"unexpected file {p.name!r}: libraries hold only manifest.json, *.safetensors, "
                       "*.json, tokenizer files and README.md", p.name, "remove it; never load pickles or code")
        present.add(p.name)
    return present
