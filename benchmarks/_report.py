"""Write a benchmark's block into BENCHMARKS.md (replacing its previous block), with provenance."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def provenance(command: str, seeds) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001
        gpu = "unknown"
    cpu = platform.processor() or platform.machine()
    return (f"- commit `{commit}`{' (uncommitted changes)' if dirty else ''}, "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            f"- machine: {os.cpu_count()} CPU cores ({cpu}), GPU: {gpu}, Python {platform.python_version()}\n"
            f"- command: `{command}`\n- seeds: {seeds}\n")


def write_block(name: str, title: str, body: str, command: str, seeds) -> Path:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.is_file() else "# Benchmarks\n\nEvery block is written by its script.\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n## {title}\n\n{provenance(command, seeds)}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path


def command_line() -> str:
    return " ".join(["python"] + [a if " " not in a else repr(a) for a in sys.argv])
