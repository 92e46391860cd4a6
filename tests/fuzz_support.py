"""Machinery of the property-based fuzz suite (tests/test_fuzz.py).

* `run_cli` runs one command in-process through Typer's CliRunner with a process-wide audit hook that
  records every `open` outside an allow-list, a snapshot of the watched folders before and after, and a
  time limit; `expect` turns its outcome into a named failure (one exception class per symptom and
  command, so hypothesis reports distinct bugs apart and shrinks each).
* `run_subprocess` runs a resource case (`python -m mergetool ...`) under RLIMIT_AS and a timeout.
* Strategies: recipe mutations with a verdict (`bad`: every command must refuse it; `ok`: must accept;
  `?`: either, cleanly), recipes generated from the JSON Schema, raw YAML texts, predict inputs,
  library tampering (manifest, configs, safetensors headers, files) and CLI options.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import resource
import shutil
import signal
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from hypothesis import strategies as st

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


# ---------------------------------------------------------------------------------- subprocess cases

@dataclass
class Proc:
    rc: Optional[int]
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool
    signal: Optional[int]


def run_subprocess(args: Sequence, *, cwd: Path, timeout: float = 60.0, memory: int = 4 << 30,
                   stdin: Optional[bytes] = None) -> Proc:
    """`python -m mergetool ARGS` with RLIMIT_AS = memory and a wall-clock timeout (the group is killed)."""

    def limits():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="")
    cmd = [sys.executable, "-m", "mergetool", *map(str, args)]
    COUNTS[next((str(a) for a in args if not str(a).startswith("-")), "?") + " (subprocess)"] += 1
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, preexec_fn=limits, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(stdin, timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        timed_out = True
    rc = p.returncode
    return Proc(None if timed_out else rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                time.monotonic() - t0, timed_out, -rc if rc is not None and rc < 0 else None)


# ---------------------------------------------------------------------------------- files

def pick(draw, options: Sequence[tuple], faulty: bool):
    """One (value, verdict, ...) option: any of them when this dimension is the example's fault, else an OK one."""
    return draw(st.sampled_from(list(options) if faulty else [o for o in options if o[1] == OK]))


def faults(*dims: str) -> st.SearchStrategy[str]:
    """Which dimension of an example may be wrong: none (a third of the examples), one, or all ("any")."""
    return st.sampled_from(["none"] * max(2, len(dims) // 2) + list(dims) + ["any"])


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def to_yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=10_000)


HUGE = "__FUZZ_HUGE_NUMBER__"  # json.dumps cannot write 1e400: this string is replaced by the literal


def to_json(data: Any) -> str:
    text = json.dumps(data, allow_nan=True)
    return text.replace(f'"{HUGE}"', "1e400")


def nested(depth: int, kind: str = "list") -> str:
    """A JSON/YAML flow document nested `depth` deep."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a": ' * depth + "1" + "}" * depth


def relist(lib: Path) -> None:
    """Rewrite the manifest's checksums and sizes to match the files as they are now (a tampered
    library whose integrity check passes: only the sanity checks can refuse it)."""
    import hashlib

    mpath = lib / "manifest.json"
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
        files = m["files"]
        assert isinstance(files, dict)
    except Exception:  # noqa: BLE001 - the manifest itself was broken on purpose
        return
    for name in list(files):
        p = lib / name
        if isinstance(files[name], dict) and p.is_file() and not p.is_symlink():
            files[name] = {**files[name], "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                           "bytes": p.stat().st_size}
    mpath.write_text(to_json(m), encoding="utf-8")


def json_paths(doc: Any, limit_depth: int = 7) -> list[tuple]:
    """Every location in a JSON document (keys and indices), breadth-first, the root excluded."""
    out: list[tuple] = []
    stack = [((), doc)]
    while stack:
        loc, node = stack.pop(0)
        if len(loc) >= limit_depth:
            continue
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append(loc + (k,))
            stack.append((loc + (k,), v))
    return out


DELETE = object()


def set_at(doc: Any, loc: tuple, value: Any) -> bool:
    """doc[loc] = value (or delete it); False when the location no longer exists."""
    node = doc
    for k in loc[:-1]:
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            return False
    k = loc[-1]
    if isinstance(node, dict):
        if value is DELETE:
            node.pop(k, None)
        else:
            node[k] = value
        return True
    if isinstance(node, list) and isinstance(k, int) and k < len(node):
        if value is DELETE:
            del node[k]
        else:
            node[k] = value
        return True
    return False


def get_at(doc: Any, loc: tuple, default: Any = None) -> Any:
    node = doc
    for k in loc:
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            return default
    return node


# ---------------------------------------------------------------------------------- recipe strategies

@dataclass(frozen=True)
class Mut:
    """One edit of a recipe dict: set `loc` to `value` (or DELETE); `verdict` for the whole recipe."""
    loc: tuple
    value: Any
    verdict: str
    label: str

    def __repr__(self) -> str:
        v = "<delete>" if self.value is DELETE else _short(repr(self.value))
        return f"Mut({'.'.join(map(str, self.loc)) or '<root>'} = {v}; {self.verdict}: {self.label})"


NAN, INF = float("nan"), float("inf")
JUNK_SCALARS = [None, True, "", "abc", [], {}, {"a": 1}, [1, 2], -1, 0, 10**30, 1e308, NAN, INF, -INF]


def _num_case(v: Any) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return type(v).__name__


def number_slot(loc: tuple, *, lo=None, hi=None, lo_in=True, hi_in=True, integer=False, required=False,
                finite=True, name: str = "") -> st.SearchStrategy[Mut]:
    """A numeric recipe field: values inside its range (ok), outside, non-finite, of the wrong type (bad)."""
    name = name or ".".join(map(str, loc))

    def inside(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return not finite and not math.isnan(v) and (hi is None or v < 0) and (lo is None or v > 0)
        if integer and not float(v).is_integer():
            return False
        if lo is not None and not (lo <= v if lo_in else lo < v):
            return False
        return hi is None or (v <= hi if hi_in else v < hi)

    if integer:
        good = st.integers(min_value=lo if lo is None else int(lo) + (0 if lo_in else 1),
                           max_value=None if hi is None else int(hi) - (0 if hi_in else 1)).map(
            lambda v: max(min(v, 10**6), -10**6) if lo is None or hi is None else v)
    else:
        good = st.floats(min_value=lo, max_value=hi, exclude_min=lo is not None and not lo_in,
                         exclude_max=hi is not None and not hi_in, allow_nan=False, allow_infinity=False)
    edges = [NAN, INF, -INF, -1, 0, 1, 0.5, 1.5, 2, 1e308, -1e308, 2**64, 2**70, "abc", "", [], {"x": 1}, "1e400"]
    for b in (lo, hi):
        if b is not None:
            edges += [b, b - 1, b + 1, b - 1e-9, b + 1e-9]
    if not required:
        edges.append(DELETE)
    if required:
        edges.append(None)

    def verdict(v) -> str:
        if v is DELETE:
            return ANY
        if isinstance(v, bool):
            return ANY  # lax YAML/pydantic coercion is not this suite's business
        if inside(v):
            return ANY if abs(v) > 1e9 else OK  # absurd but in range: refusing it is fine too
        return BAD

    return st.one_of(good, st.sampled_from(edges)).map(
        lambda v: Mut(loc, v, verdict(v), f"{name}={_short(repr(v)) if v is not DELETE else 'deleted'}"
                      f"{'' if verdict(v) != BAD else ' (out of range/type)'}"))


def choice_slot(loc: tuple, choices: Sequence[str], *, bad_extra: Sequence = (), name: str = "") -> st.SearchStrategy[Mut]:
    name = name or ".".join(map(str, loc))
    bad = ["", "nope", " " + choices[0], choices[0] + "x", 5, [], {"a": 1}, *bad_extra]
    return st.one_of(
        st.sampled_from(list(choices)).map(lambda v: Mut(loc, v, OK, f"{name}={v}")),
        st.sampled_from(bad).map(lambda v: Mut(loc, v, BAD, f"{name}={v!r} (not a choice)")),
    )


TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
ODD_NAMES = ["", "../x", "..", ".", "a/b", "/abs", "x" * 65, "x" * 300, "bad name!", "tâche", "t0\n", "-x", ".hidden",
             "C:\\x", "a\x00b", "🤖", "con", "t" + "é" * 10, " t0", "t0 "]
ODD_PATHS = ["", "../x.jsonl", "../../../../../../nonexistent-fuzz/x.jsonl", "/nonexistent-fuzz/x.jsonl",
             "/dev/null", "~/nonexistent-fuzz.jsonl", "x" * 300 + ".jsonl", "dir/", "${FUZZ_UNSET_VAR}/x.jsonl",
             "C:\\data\\x.jsonl", "\u00e9\u00e8.jsonl", "a\nb.jsonl"]


def name_value(taken: Sequence[str] = ("t0",)) -> st.SearchStrategy[tuple[str, str]]:
    """(task name, verdict): names as file names are safe only when they match TASK_NAME; a name already
    taken by another task is a duplicate."""
    return st.one_of(
        st.from_regex(TASK_NAME, fullmatch=True).filter(lambda s: len(s) <= 64 and "\n" not in s),
        st.sampled_from(ODD_NAMES + list(taken)),
    ).map(lambda s: (s, OK if TASK_NAME.match(s) and "\n" not in s and s not in taken else BAD))


def rename_task(recipe: dict, old: str, new: str) -> dict:
    r = copy.deepcopy(recipe)
    for m in r.get("models", []):
        if isinstance(m, dict) and m.get("name") == old:
            m["name"] = new
    if isinstance(r.get("tasks"), dict) and old in r["tasks"]:
        r["tasks"] = {(new if k == old else k): v for k, v in r["tasks"].items()}
    return r


def apply(recipe: dict, muts: Iterable[Mut]) -> dict:
    """The recipe with the edits made (a whole-recipe edit first); missing parent mappings are created."""
    r = copy.deepcopy(recipe)
    for m in sorted(muts, key=lambda m: len(m.loc) != 0):
        value = DELETE if m.value is DELETE else copy.deepcopy(m.value)
        if m.loc == ():
            r = value
            continue
        node = r
        for k in m.loc[:-1]:
            if isinstance(node, dict):
                if not isinstance(node.get(k), (dict, list)):
                    node[k] = {}
                node = node[k]
            elif isinstance(node, list) and isinstance(k, int) and k < len(node):
                node = node[k]
            else:
                node = None
                break
        if node is not None:
            set_at(node, m.loc[-1:], value)
    return r


def named_paths(recipe: Any, base_dir: Path) -> list[Path]:
    """The local paths a recipe names (models, data, output): reading them is reading its inputs."""
    out = []

    def add(v):
        if isinstance(v, str) and v.strip() and not v.startswith("pkg:") and "\x00" not in v:
            p = Path(os.path.expanduser(v))
            p = p if p.is_absolute() else base_dir / p
            if str(p.resolve()) != "/":
                out.append(p)

    if not isinstance(recipe, dict):
        return out
    add(recipe.get("base_model"))
    add(recipe.get("output"))
    for m in recipe.get("models") or [] if isinstance(recipe.get("models"), list) else []:
        if isinstance(m, dict):
            add(m.get("model"))
    tasks = recipe.get("tasks")
    for t in tasks.values() if isinstance(tasks, dict) else []:
        for split in ("validation", "test", "router"):
            if isinstance(t, dict) and isinstance(t.get(split), dict):
                add(t[split].get("path"))
    return out


@contextmanager
def scratch(root: Path):
    """A fresh folder for one example, removed afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(dir=root))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------- schema-driven

def from_schema(schema: dict, *, junk: float = 0.1, max_items: int = 3) -> st.SearchStrategy:
    """Values of a (pydantic) JSON Schema: $ref, anyOf, enum/const, objects, arrays, numbers with bounds,
    strings; with probability `junk` any value is replaced by an out-of-schema scalar."""
    defs = schema.get("$defs", {})

    def gen(s: dict, depth: int) -> st.SearchStrategy:
        if "$ref" in s:
            return st.deferred(lambda: gen(defs[s["$ref"].split("/")[-1]], depth + 1))
        if "anyOf" in s:
            return st.one_of([gen(x, depth) for x in s["anyOf"]])
        if "const" in s:
            return st.just(s["const"])
        if "enum" in s:
            return st.sampled_from(s["enum"])
        t = s.get("type")
        if t == "object" or "properties" in s:
            props = s.get("properties", {})
            required = set(s.get("required", []))
            extra = s.get("additionalProperties")
            fixed = {k: gen(v, depth + 1) for k, v in props.items() if k in required}
            optional = {k: gen(v, depth + 1) for k, v in props.items() if k not in required}
            base = st.fixed_dictionaries(fixed, optional=optional)
            if isinstance(extra, dict) and depth < 6:
                more = st.dictionaries(st.from_regex(TASK_NAME, fullmatch=True), gen(extra, depth + 1),
                                       max_size=max_items)
                return st.tuples(base, more).map(lambda bm: {**bm[1], **bm[0]})
            if extra is True:
                return st.tuples(base, st.dictionaries(st.sampled_from(["weight", "lambda", "density", "t", "x"]),
                                                      st.floats(-2, 2), max_size=2)).map(lambda bm: {**bm[1], **bm[0]})
            return base
        if t == "array":
            item = s.get("items")
            if isinstance(item, dict):
                return st.lists(gen(item, depth + 1), min_size=s.get("minItems", 0),
                                max_size=max(s.get("minItems", 0), s.get("maxItems", max_items)))
            if "prefixItems" in s:
                return st.tuples(*[gen(x, depth + 1) for x in s["prefixItems"]]).map(list)
            return st.lists(st.integers(), max_size=max_items)
        if t == "integer":
            lo = s.get("minimum", s.get("exclusiveMinimum", -10) + (1 if "exclusiveMinimum" in s else 0))
            hi = s.get("maximum", s.get("exclusiveMaximum", lo + 1000) - (1 if "exclusiveMaximum" in s else 0))
            return st.integers(min_value=lo, max_value=min(hi, lo + 10**6))
        if t == "number":
            return st.floats(min_value=s.get("minimum", s.get("exclusiveMinimum")),
                             max_value=s.get("maximum", s.get("exclusiveMaximum")),
                             exclude_min="exclusiveMinimum" in s, exclude_max="exclusiveMaximum" in s,
                             allow_nan=False, allow_infinity=False)
        if t == "boolean":
            return st.booleans()
        if t == "string":
            return st.text(st.characters(codec="utf-8", exclude_characters="$"), max_size=12)
        if t == "null":
            return st.none()
        return st.one_of(st.none(), st.integers(), st.text(max_size=5))

    junk_values = st.sampled_from([5, -3, "x", [], {}, None, NAN, INF, 2**70, [[1]], {"q": [1]}])
    top = gen(schema, 0)
    if not junk:
        return top
    # junk replaces whole sections: the schema says which, jsonschema says whether the result is invalid
    sections = st.lists(st.tuples(st.sampled_from(sorted(schema.get("properties", {}))), junk_values), max_size=2)
    return st.tuples(top, sections).map(lambda tj: {**tj[0], **dict(tj[1])} if isinstance(tj[0], dict) else tj[0])


def schema_invalid(schema: dict, data: Any) -> Optional[str]:
    """The first JSON Schema error of `data`, or None."""
    import jsonschema

    try:
        err = next(iter(jsonschema.Draft202012Validator(schema).iter_errors(data)), None)
    except Exception as exc:  # noqa: BLE001 - a NaN in an enum comparison, etc.
        return f"schema check raised {type(exc).__name__}"
    return None if err is None else f"{'.'.join(map(str, err.absolute_path)) or '<root>'}: {err.message[:120]}"


# ---------------------------------------------------------------------------------- YAML text

YAML_PIECES = [
    ("anchor+alias", "x: &a [1, 2]\ny: *a\n", BAD),
    ("merge key", "base: &b {population: 2}\nsearch:\n  <<: *b\n", BAD),
    ("python tag", "name: !!python/object/apply:os.system ['true']\n", BAD),
    ("binary tag", "name: !!binary aGVsbG8=\n", BAD),
    ("set tag", "name: !!set {a, b}\n", BAD),
    ("tab indent", "search:\n\tpopulation: 2\n", BAD),
    ("two documents", "---\nname: a\n---\nname: b\n", BAD),
    ("duplicate key", "name: a\nname: b\n", BAD),
    ("deep flow 200", "deep: " + "[" * 200 + "]" * 200 + "\n", BAD),
    ("unclosed", "name: [unclosed\n", BAD),
    ("bom", "\ufeffname: a\n", ANY),
    ("crlf", "name: a\r\nother: 1\r\n", ANY),
    ("null doc", "~\n", BAD),
    ("scalar doc", "just a string\n", BAD),
    ("list doc", "- a\n- b\n", BAD),
    ("nul byte", "name: a\x00b\n", BAD),
    ("env var", "name: ${FUZZ_UNSET_VAR}\n", BAD),
    ("long line", "name: " + "x" * 20000 + "\n", ANY),
    ("unicode key", "nämé: 1\n", BAD),
    ("int key", "1: a\n", BAD),
    ("complex key", "? [a, b]\n: c\n", BAD),
    ("timestamp", "name: 2001-12-14t21:59:43.10-05:00\n", ANY),
    ("empty", "", BAD),
    ("comment only", "# nothing\n", BAD),
]


def yaml_text(valid_text: str) -> st.SearchStrategy[tuple[bytes, str, str]]:
    """(recipe bytes, verdict, label): a valid recipe's text with pieces spliced in, cut, or garbled."""
    lines = valid_text.splitlines(keepends=True)

    def splice(args) -> tuple[bytes, str, str]:
        (label, piece, verdict), where, mode = args
        where = min(where, len(lines))
        if mode == "insert":  # a bad piece spoils the recipe wherever it lands
            text = "".join(lines[:where]) + piece + "".join(lines[where:])
        elif mode == "replace":  # a lone piece is never a whole recipe
            text, verdict = piece, BAD
        else:  # the recipe cut before line `where` (required keys lost), then the piece
            text = "".join(lines[:where]) + piece
            verdict = verdict if where == len(lines) else BAD
        return text.encode("utf-8"), verdict, f"{mode} {label} at line {where + 1}"

    def garble(args) -> tuple[bytes, str, str]:
        cut, junk = args
        raw = valid_text.encode("utf-8")
        return raw[:cut] + junk, ANY, f"cut at byte {cut} + {junk[:20]!r}"

    non_utf8 = st.sampled_from([b"\xff\xfe", b"\x80", b"name: caf\xe9\n", b"\xc3\x28"]).map(
        lambda b: (valid_text.encode() + b, BAD, f"non-UTF-8 bytes {b!r}"))
    return st.one_of(
        st.tuples(st.sampled_from(YAML_PIECES), st.integers(0, len(lines)),
                  st.sampled_from(["insert", "replace", "truncate"])).map(splice),
        st.tuples(st.integers(0, len(valid_text)), st.binary(max_size=30)).map(garble),
        non_utf8,
    )


# ---------------------------------------------------------------------------------- predict inputs

@dataclass(frozen=True)
class Line:
    raw: bytes
    kind: str  # good | bad | blank | maybe

    def __repr__(self) -> str:
        return f"Line({self.kind}: {self.raw[:80]!r}{'...' if len(self.raw) > 80 else ''})"


WORDS = [f"w{i}" for i in range(59)]


def _j(obj) -> bytes:
    return json.dumps(obj).encode("utf-8")


def predict_line(field_name: str = "text", *, good_only: bool = False) -> st.SearchStrategy[Line]:
    words = st.lists(st.sampled_from(WORDS + ["[UNK]", "zzz", "é", "🤖"]), min_size=1, max_size=12).map(" ".join)
    if good_only:
        return words.map(lambda t: Line(_j({field_name: t}), "good"))
    return st.one_of(
        words.map(lambda t: Line(_j({field_name: t}), "good")),
        words.map(lambda t: Line(_j({field_name: t, "id": 7, "extra": [1, {"a": None}]}), "good")),
        st.text(min_size=1, max_size=40).filter(lambda s: s.strip()).map(lambda t: Line(_j({field_name: t}), "good")),
        st.sampled_from([5000, 40000]).map(lambda n: Line(_j({field_name: "w1 " * n}), "good")),  # > position table
        st.sampled_from([None, [], {}, ["w1"], {"a": "w1"}, True]).map(lambda v: Line(_j({field_name: v}), "bad")),
        st.sampled_from([1, 2.5, 10**30]).map(lambda v: Line(_j({field_name: v}), "maybe")),
        st.just(Line(_j({field_name: ""}), "maybe")),
        st.just(Line(_j({"other": "w1"}), "bad")),
        st.sampled_from([b"{oops", b"[1]", b'"w1"', b"null", b"42", b"{'text': 'w1'}", b'{"text": "w1"',
                         b'{"text": NaN}', b'{"text": "w1", "x": 1e400}', b'{"text": "w1", "text": 5}']).map(
            lambda raw: Line(raw, "bad" if raw not in (b'{"text": "w1", "x": 1e400}', b'{"text": "w1", "text": 5}')
                             else "maybe")),
        st.sampled_from([b'{"text": "caf\xe9"}', b"\xff\xfe\x00", b'{"text": "\xc3\x28"}']).map(lambda r: Line(r, "bad")),
        st.sampled_from([b"", b"   ", b"\t"]).map(lambda r: Line(r, "blank")),
        st.sampled_from([100, 1000]).map(lambda d: Line(b'{"text": "w1", "x": ' + nested(d).encode() + b"}", "maybe")),
    )


# ---------------------------------------------------------------------------------- library tampering

JSON_JUNK = [None, True, False, -5, -1, 0, 1, 0.5, 10**30, 2**63, HUGE, NAN, INF, "", "x", "../../secret.json",
             "/etc/passwd", "A" * 300, "\u0000", [], {}, [1, "a"], {"a": 1}, json.loads(nested(80))]
DTYPES = ["I32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "I64", "XX", "", 5, None]
SHAPES = [[HUGE], [-1], [0], [10**12], [10**12, 10**12], [], [1.5], ["a"], None, 5, [2**63]]
OFFSETS = [[0, 0], [-8, 8], [0, 10**15], [8, 4], [0], "x", None, [0, 2**70]]
METADATA = [5, [], "x", None, {"format": 5}, {"format": ["pt"]}, {"a": {"b": 1}}, {"format": "pt", "x": None}]


@dataclass(frozen=True)
class Tamper:
    """One change to a copy of a library; `apply(lib, secret)` performs it."""
    kind: str
    target: str
    loc: tuple = ()
    value: Any = None

    def __repr__(self) -> str:
        v = "" if self.value is None and self.kind not in ("json_set",) else f" = {_short(repr(self.value))}"
        return f"Tamper({self.kind} {self.target}{'.' + '.'.join(map(str, self.loc)) if self.loc else ''}{v})"

    def apply(self, lib: Path, secret: Path) -> None:
        p = lib / self.target
        if self.kind in ("json_set", "json_delete"):
            try:
                doc = json.loads(p.read_text(encoding="utf-8"))
            except Exception:  # noqa: BLE001 - an earlier tamper broke it
                return
            set_at(doc, self.loc, DELETE if self.kind == "json_delete" else copy.deepcopy(self.value))
            p.write_text(to_json(doc), encoding="utf-8")
        elif self.kind == "json_replace":
            write(p, self.value)
        elif self.kind == "header_set":
            _edit_header(p, self.loc, self.value)
        elif self.kind == "bytes":
            if not p.is_file():
                return
            raw = bytearray(p.read_bytes())
            op, n = self.value
            if op == "truncate":
                raw = raw[: min(n, len(raw))]
            elif op == "flip" and raw:
                raw[n % len(raw)] ^= 0xFF
            elif op == "empty":
                raw = bytearray()
            elif op == "append":
                raw += b"\x00" * n
            p.write_bytes(bytes(raw))
        elif self.kind == "delete":
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        elif self.kind == "symlink":
            if p.exists() or p.is_symlink():
                p.unlink() if not p.is_dir() or p.is_symlink() else shutil.rmtree(p)
            target = {"secret": secret / "secret.json", "secret_dir": secret, "loop": p, "dangling":
                      lib / "nowhere", "sibling": lib / "manifest.json"}[self.value]
            os.symlink(target, p)
        elif self.kind == "extra":
            name, data = self.value
            if data is None:
                (lib / name).mkdir(exist_ok=True)
            else:
                write(lib / name, data)
        elif self.kind == "recipe_paths":
            _point_recipe_at(lib, secret, self.value)


def _edit_header(path: Path, loc: tuple, value: Any) -> None:
    try:
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
    except Exception:  # noqa: BLE001 - an earlier tamper broke it
        return
    if loc and loc[0] == "<tensor>":
        names = sorted(k for k in header if k != "__metadata__")
        if not names:
            return
        loc = (names[0],) + loc[1:]
    set_at(header, loc, DELETE if value is DELETE else copy.deepcopy(value))
    text = to_json(header).encode("utf-8")
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def _point_recipe_at(lib: Path, secret: Path, how: str) -> None:
    """The manifest's embedded recipe reads its data from the secret folder (absolute, `../`, symlink)."""
    import yaml

    mpath = lib / "manifest.json"
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
        r = yaml.safe_load(m["recipe"])
    except Exception:  # noqa: BLE001
        return
    target = {"absolute": str(secret / "secret.jsonl"),
              "parent": os.path.relpath(secret / "secret.jsonl", lib),
              "link": "data/secret.jsonl"}[how]
    if how == "link":
        (lib / "data").mkdir(exist_ok=True)
        os.symlink(secret / "secret.jsonl", lib / "data" / "secret.jsonl")
    for task in (r.get("tasks") or {}).values():
        for split in ("validation", "test", "router"):
            if isinstance(task.get(split), dict):
                task[split]["path"] = target
    m["recipe"] = yaml.safe_dump(r, sort_keys=False)
    mpath.write_text(json.dumps(m), encoding="utf-8")


def tampers(lib: Path) -> st.SearchStrategy[Tamper]:
    """Changes to a library: JSON edits (manifest, configs, router, tokenizer), whole-file replacements,
    safetensors header edits, byte damage, deletions, symlinks, extra files, recipe paths."""
    jsons = {p.name: json.loads(p.read_text()) for p in sorted(lib.glob("*.json"))}
    shards = sorted(p.name for p in lib.glob("*.safetensors"))
    files = sorted(p.name for p in lib.iterdir())
    per_file = {name: json_paths(doc) for name, doc in jsons.items()}
    json_names = sorted(per_file)
    edits = st.sampled_from(json_names).flatmap(lambda n: st.tuples(
        st.just(n), st.sampled_from(per_file[n] or [("x",)]), st.sampled_from(JSON_JUNK + [DELETE])).map(
        lambda t: Tamper("json_delete" if t[2] is DELETE else "json_set", t[0], t[1],
                         None if t[2] is DELETE else t[2])))
    whole = st.tuples(st.sampled_from(json_names), st.sampled_from(
        ["{}", "[]", '"x"', "5", "null", "not json", "{", b"\xff\xfe", "", nested(5000), nested(70, "obj"),
         '{"a": 1e400}', '{"a": NaN}'])).map(lambda t: Tamper("json_replace", t[0], (), t[1]))
    targeted = st.sampled_from([
        Tamper("json_set", "config.json", ("hidden_size",), 32), Tamper("json_set", "config.json", ("model_type",), "nope"),
        Tamper("json_set", "config.json", ("vocab_size",), 3), Tamper("json_set", "config.json", ("max_position_embeddings",), 2),
        Tamper("json_set", "config.json", ("num_hidden_layers",), 5), Tamper("json_set", "config.json", ("num_attention_heads",), 3),
        Tamper("json_replace", "config.json", (), "[1, 2]"), Tamper("json_replace", "tokenizer.json", (), "{}"),
        Tamper("json_set", "router.json", ("max_length",), -5), Tamper("json_set", "router.json", ("in_dim",), 7),
        Tamper("json_set", "router.json", ("hidden",), [3, 3]), Tamper("json_set", "router.json", ("tasks",), ["a"]),
        Tamper("json_set", "manifest.json", ("router", "max_length"), -5),
        Tamper("json_set", "manifest.json", ("tasks", 0, "labels"), []),
        Tamper("json_set", "manifest.json", ("tasks", 0, "heads"), {}),
        Tamper("json_set", "manifest.json", ("tasks", 0, "name"), "../escape"),
        Tamper("json_set", "manifest.json", ("tasks", 0, "name"), "x" * 300),
        Tamper("json_set", "manifest.json", ("default_solution",), 7),
        Tamper("json_set", "manifest.json", ("storage_cost",), HUGE),
        Tamper("json_set", "manifest.json", ("format_version",), 2),
        Tamper("json_set", "manifest.json", ("base", "config"), "../outside.json"),
        Tamper("recipe_paths", "manifest.json", (), "absolute"), Tamper("recipe_paths", "manifest.json", (), "parent"),
        Tamper("recipe_paths", "manifest.json", (), "link"),
        Tamper("header_set", "router.safetensors", ("__metadata__",), 5),
        Tamper("header_set", "router.safetensors", ("__metadata__",), {"format": ["pt"]}),
        *[Tamper("header_set", s, ("<tensor>", "dtype"), "I32") for s in shards[:2]],
        *[Tamper("header_set", s, ("<tensor>", "shape"), [HUGE]) for s in shards[:2]],
    ])
    header = st.tuples(st.sampled_from(shards), st.one_of(
        st.tuples(st.just(("<tensor>", "dtype")), st.sampled_from(DTYPES)),
        st.tuples(st.just(("<tensor>", "shape")), st.sampled_from(SHAPES)),
        st.tuples(st.just(("<tensor>", "data_offsets")), st.sampled_from(OFFSETS)),
        st.tuples(st.just(("__metadata__",)), st.sampled_from(METADATA)),
        st.tuples(st.just(("<tensor>",)), st.sampled_from([DELETE, 5, [], {}])),
        st.tuples(st.just(("extra/../name",)), st.just({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})),
    )).map(lambda t: Tamper("header_set", t[0], t[1][0], t[1][1]))
    damage = st.tuples(st.sampled_from(files), st.sampled_from(
        [("truncate", 0), ("truncate", 7), ("truncate", 100), ("flip", -1), ("flip", 9), ("empty", 0), ("append", 16)])
    ).map(lambda t: Tamper("bytes", t[0], (), t[1]))
    removal = st.sampled_from(files).map(lambda f: Tamper("delete", f))
    links = st.tuples(st.sampled_from(files), st.sampled_from(["secret", "secret_dir", "loop", "dangling", "sibling"])
                      ).map(lambda t: Tamper("symlink", t[0], (), t[1]))
    extra = st.sampled_from([("weights.pkl", b"\x80\x04K\x01."), (".hidden", "x"), ("sub", None),
                             ("model.safetensors", b"\x00" * 16), ("experts-99999-of-00001.safetensors", b"")]
                            ).map(lambda v: Tamper("extra", v[0], (), v))
    return st.one_of(targeted, targeted, targeted, edits, edits, whole, header, header, damage, removal, links, extra)


# ---------------------------------------------------------------------------------- CLI options

BAD_NUMBERS = ["abc", "", "-1", "0", "nan", "inf", "-inf", "1e400", "-1e400", "0x10", "1,5", "1.5.1", "--1"]
ODD_NUMBERS = ["9" * 40, " 3", "१२", "1_0", "+2"]  # Python's float() takes them: accepting them is fine too
