"""Provenance and BENCHMARKS.md blocks, shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device=None) -> str:
    """OS, CPU model, cores, torch and its threads, the device and the load average."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if device.type == "cuda" else ""
    load = f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    return (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), device {device}{gpu}{load}")


def replace_block(path: Path, name: str, block: str) -> Path:
    """Put `block` between the `name` markers of `path`, replacing an earlier run's block."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.is_file() else "# Benchmarks\n\nEvery block is written by its script.\n"
    body = f"{start}\n{block.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    path.write_text(text)
    return path


def write_block(name: str, title: str, body: str, command: str, seeds) -> Path:
    """A titled block with commit, date, machine, command and seeds, then `body`."""
    head = (f"## {title}\n\n- commit: {commit()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            f"- machine: {machine()}\n- command: `{command}`\n- seeds: {seeds}\n")
    return replace_block(ROOT / "BENCHMARKS.md", name, head + "\n" + body)


def command_line() -> str:
    return " ".join(["python"] + [a if " " not in a else repr(a) for a in sys.argv])
