"""Finished parts of a `run_baselines` call, kept on disk so that a stopped run resumes where it stopped.

A part is one baseline (or the individual/pre-trained rows): the entries it appended to the run, how many
progress messages it sent, and what a later part needs from it (the tuned static parameters Twin builds its
shared expert from). Each is written atomically to FOLDER/<key>.json when it finishes, tagged with a
fingerprint of everything its figures depend on (the recipe, the split, the routing, the base storages, the
grids, racing, mergetool's version); a part whose fingerprint differs is scored again and overwritten.
Parts are JSON only (never pickled), so a resumed run reads back exactly what baselines.json would hold.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

from mergetool.core.errors import MergetoolError
from mergetool.pipeline.rundir import read_json_record, write_json_atomic


def fingerprint(settings: dict) -> str:
    """A short stable hash of the settings a part's figures depend on."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class BaselineParts:
    """The finished parts of one baselines run in `folder` (None: nothing kept, every part runs)."""

    def __init__(self, folder: Optional[Path], settings: dict):
        self.folder, self.settings = folder, dict(settings)
        self.resumed: list[str] = []

    def tag(self, own: Any = None) -> str:
        """The fingerprint of a part: the run's settings and the part's `own` ones (None: none of its own)."""
        return fingerprint(self.settings if own is None else {**self.settings, "part": own})

    def _path(self, key: str) -> Optional[Path]:
        return None if self.folder is None else self.folder / f"{key}.json"

    def finished(self, key: str, own: Any = None) -> Optional[dict]:
        """The stored part `key` when it was finished under the same settings; else None."""
        path = self._path(key)
        if path is None:
            return None
        try:
            record = read_json_record(path)
        except MergetoolError:  # an unreadable part is scored again (and overwritten)
            return None
        return record if record is not None and record.get("fingerprint") == self.tag(own) else None

    def run(self, run, key: str, fn: Callable[[], Any], own: Any = None) -> Any:
        """fn() as part `key` of `run` (a BaselineRun): its entries go to run.out and its result is returned,
        read back from disk instead when the part finished before under the same settings (the run's, and
        `own`: settings only this part depends on, so that changing them re-scores this part alone)."""
        done = self.finished(key, own)
        if done is not None:
            for _ in range(int(done.get("messages", 0))):
                run.say(f"{key} (resumed)")
            run.out.extend(done["entries"])
            self.resumed.append(key)
            return done.get("result")
        start, count, say = len(run.out), [0], run.say

        def counting(what: str) -> None:
            count[0] += 1
            say(what)

        run.say = counting
        try:
            result = fn()
        finally:
            run.say = say
        path = self._path(key)
        if path is not None:
            write_json_atomic(path, {"fingerprint": self.tag(own), "entries": run.out[start:], "messages": count[0],
                                     "result": result})
        return result
