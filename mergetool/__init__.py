"""mergetool: component-wise model merging (MERGE) driven by YAML recipes."""

__version__ = "0.1.0"
