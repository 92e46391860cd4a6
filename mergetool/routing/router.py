"""The router: a 3-layer MLP over standardised features, saved as router.safetensors + router.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mergetool.core.errors import LibraryError
from mergetool.core.safejson import parse_json

WEIGHTS, CONFIG = "router.safetensors", "router.json"
FORMAT = 1
# an unsure input's second opinion (inference.second_opinion) keeps the larger of these, per candidate task
SECOND_OPINION_RULE = "router_prob_x_head_conf"


class Router(nn.Module):
    """features (n, d) -> task logits (n, T): Linear-ReLU-Linear-ReLU-Linear."""

    def __init__(self, in_dim: int, hidden: Sequence[int], tasks: Sequence[str]):
        super().__init__()
        h1, h2 = hidden
        self.tasks = list(tasks)
        self.net = nn.Sequential(nn.Linear(in_dim, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(),
                                 nn.Linear(h2, len(self.tasks)))
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.mean) / self.std)

    def save(self, folder: Path, extra: dict) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(Path(folder) / WEIGHTS), metadata={"format": "pt"})
        config = {"format": FORMAT, "in_dim": self.mean.numel(), "hidden": [m.out_features for m in self.net[:4:2]],
                  "tasks": self.tasks, **extra}
        (Path(folder) / CONFIG).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path, weights: str = WEIGHTS, config: str = CONFIG) -> tuple["Router", dict]:
        from safetensors.torch import load_file

        path = Path(folder) / config
        try:
            cfg = parse_json(path.read_bytes())
            router = cls(int(cfg["in_dim"]), [int(h) for h in cfg["hidden"]], [str(t) for t in cfg["tasks"]])
            router.load_state_dict(load_file(str(Path(folder) / weights)), strict=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            # the type only: the message of a failed parse or load may quote the untrusted file
            raise LibraryError(f"cannot load the router ({type(exc).__name__})", file=str(path),
                               fix="re-export the library") from None
        if cfg.get("format") != FORMAT:
            raise LibraryError(f"unknown router format {cfg.get('format')!r}", file=str(path),
                               fix="upgrade mergetool or re-export the library")
        return router.eval(), cfg
