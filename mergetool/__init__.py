"""mergetool: component-wise model merging (MERGE) driven by YAML recipes."""

from mergetool.core.version import __version__

__all__ = ["ExpertLibrary", "__version__"]


def __getattr__(name: str):
    if name == "ExpertLibrary":  # the inference runtime; imported on first use (torch, transformers)
        from mergetool.inference.runtime import ExpertLibrary  # lazy: loads torch

        return ExpertLibrary
    raise AttributeError(f"module 'mergetool' has no attribute {name!r}")
