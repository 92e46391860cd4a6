"""Expert libraries, format v1: export (writer), open and verify (reader), model card, export-model.

Light imports only here; the heavy modules load on first use.
"""

from __future__ import annotations

from mergetool.library.manifest import FORMAT_VERSION, Manifest, parse_manifest

__all__ = ["FORMAT_VERSION", "Manifest", "parse_manifest", "ExpertLibrary", "load_task_state",
           "export_library", "export_model"]


def __getattr__(name: str):
    if name in ("ExpertLibrary", "load_task_state"):
        from mergetool.library import reader

        return getattr(reader, name)
    if name == "export_library":
        from mergetool.library.writer import export_library

        return export_library
    if name == "export_model":
        from mergetool.library.export_model import export_model

        return export_model
    raise AttributeError(name)
