"""Machinery of the property-based fuzz suite (tests/test_fuzz_*.py).

* `run_cli` runs one command in-process through Typer's CliRunner with a process-wide audit hook that
  records every `open` outside an allow-list, a snapshot of the watched folders before and after, and a
  time limit; `expect` turns its outcome into a named failure (one exception class per symptom and
  command, so hypothesis reports distinct bugs apart and shrinks each).
* `run_subprocess` (fuzz_resources.py) runs a resource case (`python -m mergetool ...`) under RLIMIT_AS
  and a timeout.
* Strategies (fuzz_files.py, fuzz_strategies.py, fuzz_tamper.py): recipe mutations with a verdict
  (`bad`: every command must refuse it; `ok`: must accept; `?`: either, cleanly), recipes generated from
  the JSON Schema, raw YAML texts, predict inputs, library tampering (manifest, configs, safetensors
  headers, files) and CLI options.
"""

from __future__ import annotations

import os
import re
import signal
import site
import stat
import sys
import sysconfig
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

BAD, OK, ANY = "bad", "ok", "?"
CANARY = "CANARY-5f3a9c-do-not-print"  # inside the secret files: no output may ever quote it
COUNTS: Counter = Counter()  # command -> invocations (all phases: generation and shrinking)
MAX_ERROR_LINES = 21  # 20 problems, then "... and N more"


# ---------------------------------------------------------------------------------------- budget

class Budget:
    """Examples per test: `n` at the default budget, 10 n with --fuzz-long (or FUZZ_LONG=1)."""

    long = os.environ.get("FUZZ_LONG", "") not in ("", "0")
    scale = float(os.environ.get("FUZZ_SCALE", "1"))  # a developer's quick look: FUZZ_SCALE=0.2

    @classmethod
    def examples(cls, n: int) -> int:
        return max(1, round(n * (10 if cls.long else 1) * cls.scale))


# ---------------------------------------------------------------------------------- audit hook

def _roots(paths: Iterable) -> tuple[str, ...]:
    out: set[str] = set()
    for p in paths:
        if p is None or str(p) in ("", "/"):
            continue
        s = os.path.abspath(os.fsdecode(os.fspath(p)))
        out.add(s)
        out.add(os.path.realpath(s))
    return tuple(sorted(out))


def system_roots() -> tuple[str, ...]:
    """What any command may read: Python and its packages, the caches, /proc, /dev, /sys."""
    home = Path.home()
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             *site.getsitepackages(), site.getusersitepackages(),
             *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")),
             str(Path(__file__).resolve().parents[1] / "mergetool"),  # the package itself (lazy imports)
             *Path(__file__).resolve().parents[1].glob("*.egg-info"),  # its metadata (the version)
             home / ".cache" / "huggingface", os.environ.get("HF_HOME"), os.environ.get("HF_HUB_CACHE"),
             os.environ.get("TRANSFORMERS_CACHE"), home / ".cache" / "torch", os.environ.get("TORCH_HOME"),
             home / ".cache" / "matplotlib", home / ".config" / "matplotlib", os.environ.get("MPLCONFIGDIR"),
             home / ".cache" / "fontconfig", "/proc", "/dev", "/sys", "/usr/share/zoneinfo",
             "/etc/localtime", "/etc/mime.types", "/usr/share/fonts", "/etc/fonts"]
    try:
        import matplotlib

        paths += [matplotlib.get_cachedir(), matplotlib.get_configdir(), matplotlib.get_data_path()]
    except Exception:  # noqa: BLE001 - matplotlib is optional for the hook
        pass
    return _roots(paths)


class Guard:
    """One audit hook per process (hooks cannot be removed); it checks `open` events only while a test
    has set an allow-list, and records (never blocks) what falls outside it."""

    allow: Optional[tuple[str, ...]] = None
    hits: list = []
    installed = False
    _local = threading.local()

    @classmethod
    def install(cls) -> None:
        if not cls.installed:
            sys.addaudithook(cls._hook)
            cls.installed = True

    @classmethod
    def _hook(cls, event: str, args: tuple) -> None:
        if event != "open" or cls.allow is None or getattr(cls._local, "busy", False):
            return
        path = args[0] if args else None
        if path is None or isinstance(path, int):
            return
        mode = args[1] if len(args) > 1 else None
        cls._local.busy = True
        try:
            name = os.fsdecode(os.fspath(path))
            if mode is None and not os.path.isabs(name):
                return  # os.open(name, dir_fd=...) (shutil.rmtree's walk): relative to a folder we cannot see
            real = os.path.realpath(name)
            if not any(real == r or real.startswith(r + os.sep) for r in cls.allow):
                cls.hits.append(f"{real} (mode {mode!r})")
        except Exception:  # noqa: BLE001 - never disturb the command under test
            pass
        finally:
            cls._local.busy = False

    @classmethod
    def watching(cls, allow: Iterable) -> "_Watch":
        return _Watch(cls, system_roots() + _roots(allow))


class _Watch:
    def __init__(self, guard, allow):
        self.guard, self.allow = guard, allow

    def __enter__(self):
        self.guard.hits = []
        self.guard.allow = self.allow
        return self.guard.hits

    def __exit__(self, *exc):
        self.guard.allow = None
        return False


# ---------------------------------------------------------------------------------- snapshots

def snapshot(roots: Iterable) -> dict:
    """path -> (type, size, mtime, mode) of every entry under the roots (files: content identity;
    folders: existence only, since a temp file made and removed changes a folder's mtime)."""
    out: dict = {}
    for root in roots:
        root = os.fspath(root)
        if not os.path.lexists(root):
            continue
        entries = [root]
        if os.path.isdir(root) and not os.path.islink(root):
            for dirpath, dirnames, filenames in os.walk(root):
                entries += [os.path.join(dirpath, n) for n in dirnames + filenames]
        for p in entries:
            try:
                s = os.lstat(p)
            except OSError:
                continue
            kind = stat.S_IFMT(s.st_mode)
            out[p] = (kind, None, None, None) if stat.S_ISDIR(kind) else (
                kind, s.st_size, s.st_mtime_ns, stat.S_IMODE(s.st_mode))
    return out


def diff(before: dict, after: dict) -> list[str]:
    changes = [f"new {p}" for p in sorted(set(after) - set(before))]
    changes += [f"removed {p}" for p in sorted(set(before) - set(after))]
    changes += [f"changed {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return changes


def under(path: str, roots: Iterable) -> bool:
    return any(path == str(r) or path.startswith(str(r).rstrip(os.sep) + os.sep) for r in roots)


# ---------------------------------------------------------------------------------- running

class CommandHang(BaseException):
    """Raised by the alarm inside a command that ran past its time limit (BaseException: the command's
    own `except Exception` cannot swallow it)."""


@dataclass
class Outcome:
    command: str
    args: list
    exit_code: Optional[int]
    stdout: str = ""
    stderr: str = ""
    exc_type: Optional[str] = None
    origin: Optional[str] = None
    trace: str = ""
    reads: list = field(default_factory=list)
    changes: list = field(default_factory=list)
    elapsed: float = 0.0
    hang: bool = False

    @property
    def text(self) -> str:
        return self.stdout + self.stderr

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def describe(self) -> str:
        shown = [f"$ mergetool {' '.join(map(_short, self.args))}", f"exit {self.exit_code} in {self.elapsed:.1f}s"]
        if self.trace:
            shown.append(self.trace[-2500:])
        if self.stderr:
            shown.append("stderr: " + _tail(self.stderr))
        if self.stdout:
            shown.append("stdout: " + _tail(self.stdout, 600))
        if self.reads:
            shown.append("read outside the inputs: " + "; ".join(self.reads[:5]))
        if self.changes:
            shown.append("files: " + "; ".join(self.changes[:8]))
        return "\n".join(shown)


def _short(a) -> str:
    s = str(a)
    return s if len(s) < 120 else s[:100] + f"...({len(s)} chars)"


def _tail(s: str, n: int = 1500) -> str:
    return s if len(s) <= n else "..." + s[-n:]


def _origin(tb) -> str:
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if "/mergetool/" in f.filename.replace(os.sep, "/")]
    f = (ours or frames or [None])[-1]
    if f is None:
        return "?"
    name = f.filename.replace(os.sep, "/")
    name = name[name.rfind("/mergetool/") + 1:] if "/mergetool/" in name else os.path.basename(name)
    return f"{name}:{f.name}"


def run_cli(args: Sequence, *, reads: Iterable = (), watch: Iterable = (), stdin: Any = None,
            cwd: Optional[Path] = None, limit: float = 180.0) -> Outcome:
    """One in-process CLI run: `reads` (plus the system roots) is the allow-list of the audit hook,
    `watch` the folders snapshotted before and after, `limit` seconds before it counts as a hang."""
    from typer.testing import CliRunner

    from mergetool.cli.app import app

    Guard.install()
    args = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
    command = next((a for a in args if not a.startswith("-")), "?")
    COUNTS[command] += 1
    watch = [os.fspath(w) for w in watch]
    before = snapshot(watch)
    old_cwd = os.getcwd()
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    out = Outcome(command, args, None)
    t0 = time.monotonic()
    try:
        if cwd is not None:
            os.chdir(cwd)
        signal.setitimer(signal.ITIMER_REAL, limit)
        with Guard.watching(reads) as hits:
            try:
                result = CliRunner().invoke(app, args, input=stdin)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        out.reads = list(dict.fromkeys(hits))
        out.exit_code = result.exit_code
        out.stdout = result.stdout
        out.stderr = result.stderr or ""
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            e = result.exception
            out.exc_type = type(e).__name__
            out.origin = _origin(result.exc_info[2])
            out.trace = "".join(traceback.format_exception(*result.exc_info))
    except CommandHang:
        out.hang = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        os.chdir(old_cwd)
        out.elapsed = time.monotonic() - t0
    out.changes = diff(before, snapshot(watch))
    return out


def _alarm(signum, frame):
    raise CommandHang()


# ---------------------------------------------------------------------------------- verdicts

class FuzzFailure(AssertionError):
    """Base of the named failures; hypothesis tells bugs apart by exception class."""


_FAILURES: dict[str, type] = {}


def failure(kind: str) -> type:
    name = re.sub(r"[^0-9A-Za-z]+", "_", kind).strip("_")
    if name not in _FAILURES:
        _FAILURES[name] = type(name, (FuzzFailure,), {"__module__": __name__})
    return _FAILURES[name]


def expect(out: Outcome, verdict: str = ANY, *, why: str = "", writes: Iterable = (),
           check_ok: Optional[Callable[[Outcome], Optional[str]]] = None) -> Outcome:
    """The properties every command must hold, then the verdict's:

    * no uncaught exception, no hang, no `Traceback` text, exit 0 or 2;
    * no `open` outside the allow-list; the secret canary never printed;
    * exit 2: stderr is 1..21 lines, each `error: ...`; nothing written under the watched folders;
    * exit 0: only `writes` changed, and `check_ok(out)` (the output is correct) returns None;
    * verdict `bad` must exit 2, `ok` must exit 0.
    """
    cmd = out.command
    if os.environ.get("FUZZ_TRACE"):  # a developer's log of every case: verdict, exit, first stderr line
        with open(os.environ["FUZZ_TRACE"], "a", encoding="utf-8") as f:
            first = (out.stderr_lines or [""])[0][:160]
            f.write(f"{cmd}\t{verdict}\t{out.exit_code}\t{out.exc_type or ''}\t{why[:200]}\t{first}\n")

    def fail(kind: str, detail: str = "") -> None:
        exc = failure(f"{cmd} {kind}")(f"{cmd}: {kind}{(' - ' + detail) if detail else ''}\n{out.describe()}")
        exc.outcome = out
        raise exc

    if out.hang:
        fail("hang", f"no answer within the time limit ({why})")
    if out.exc_type:
        fail(f"traceback {out.exc_type} at {out.origin}", why)
    if "Traceback" in out.text:
        fail("printed a traceback", why)
    if out.exit_code not in (0, 2):
        fail(f"exit code {out.exit_code}", why)
    if out.reads:
        fail("read outside its inputs", why)
    if CANARY in out.text:
        fail("quoted a secret file", why)
    if out.exit_code == 2:
        lines = out.stderr_lines
        errors = [x for x in lines if x.startswith("error: ")]
        if not errors or len(errors) != len(lines) or len(errors) > MAX_ERROR_LINES:
            fail("error is not one `error:` line per problem", f"{len(lines)} stderr lines; {why}")
        if out.changes:
            fail("wrote files on failure", why)
        if verdict == OK:
            fail("refused a valid input", why)
    else:
        if verdict == BAD:
            fail("accepted a bad input", why)
        outside = [c for c in out.changes if not under(c.split(" ", 1)[1], writes)
                   and not (c.startswith("new ") and any(under(str(w), [c[4:]]) for w in writes))]  # its parents
        if outside:
            fail("wrote outside its output", "; ".join(outside[:5]))
        if check_ok is not None:
            problem = check_ok(out)
            if problem:
                fail("wrong output", problem)
    return out


class Soft:
    """Run several checks of one example and raise the first failure at the end, so that a failing first
    command does not hide what the next ones do: `soft(expect, out, ...)` returns the outcome either way."""

    def __init__(self):
        self.errors: list[FuzzFailure] = []

    def __call__(self, check: Callable, *args, **kwargs):
        try:
            return check(*args, **kwargs)
        except FuzzFailure as e:
            self.errors.append(e)
            return getattr(e, "outcome", None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self.errors:
            raise self.errors[0]
        return False


def agree(first: Outcome, then: Outcome, how: str) -> None:
    """Two commands on the same input must agree: `how` says which way ('a refuses => b refuses')."""
    raise failure(f"{then.command} disagrees with {first.command}")(
        f"{how}\n--- {first.command}:\n{first.describe()}\n--- {then.command}:\n{then.describe()}")


def combine(*verdicts: str) -> str:
    if BAD in verdicts:
        return BAD
    return OK if all(v == OK for v in verdicts) else ANY
