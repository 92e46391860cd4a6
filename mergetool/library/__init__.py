"""Expert libraries: export (writer), open and verify (reader), the Hub (hub), model card, export-model.

`ExpertLibrary` here is the user-facing runtime class (`mergetool.inference.runtime`), the one every
pushed model card imports from this path: it loads folders and `hub:REPO@REV` references, routes and
predicts. `LibraryFiles` is the verified stored form underneath it. Light imports only here; the
heavy modules load on first use.
"""

from __future__ import annotations

from mergetool.library.manifest import FORMAT_VERSION, Manifest, parse_manifest

__all__ = ["FORMAT_VERSION", "Manifest", "parse_manifest", "ExpertLibrary", "LibraryFiles", "load_task_state",
           "export_library", "export_model"]


def __getattr__(name: str):
    if name == "ExpertLibrary":  # above this package in the layers: resolved lazily (pyproject's contract)
        from mergetool.inference.runtime import ExpertLibrary  # lazy: loads torch

        return ExpertLibrary
    if name in ("LibraryFiles", "load_task_state"):
        from mergetool.library import reader  # lazy: loads torch

        return getattr(reader, name)
    if name == "export_library":
        from mergetool.library.writer import export_library  # lazy: loads torch

        return export_library
    if name == "export_model":
        from mergetool.library.export_model import export_model  # lazy: loads torch

        return export_model
    raise AttributeError(name)
