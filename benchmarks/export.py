"""Export throughput and peak RSS against mergekit-yaml's TIES merge of the same models, in one run.

    python benchmarks/export.py                 # 4 task variants of a SmolLM2-135M-shaped Llama
    python benchmarks/export.py --layers 4      # a quick check of the script

Like with like: mergetool exports an all-shared grouping (one group per component), TIES with the same
density, no quantisation, no router — that is a static TIES merge. Also measured: a full-library
export (every task its own expert, int8 conditional per channel). Each run is its own process, so its
peak RSS is its own (`ru_maxrss` of the child). The static merge's tensors are then compared with
mergekit-yaml's output bit for bit. Writes its block into BENCHMARKS.md; the temporary models are
removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, write_block  # noqa: E402

T = 4


def build_models(root: Path, layers: int, seed: int) -> tuple[Path, list[Path]]:
    import torch
    import transformers as tf

    tf.logging.set_verbosity_error()
    config = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                            tie_word_embeddings=True, torch_dtype="float32")
    torch.manual_seed(seed)
    base = tf.LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    dirs = []
    for t in range(T):
        g = torch.Generator().manual_seed(seed + 1 + t)
        with torch.no_grad():
            variant = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
        model = tf.LlamaForCausalLM(config)
        model.load_state_dict(variant, strict=False)
        model.tie_weights()
        model.save_pretrained(root / f"task{t}")
        dirs.append(root / f"task{t}")
    (root / "data.jsonl").write_text('{"text": "x", "label": 0}\n')
    return root / "base", dirs


WRAP = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); " \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of `cmd`, measured in a wrapper process of its own."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", WRAP, *cmd], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    return wall, int(out.stdout.strip().splitlines()[-1]) / 1024 / 1024


def count_params(path: Path) -> int:
    from math import prod

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(prod(f.get_slice(k).get_shape()) for k in f.keys())


EXPORT = """
import json, sys
from pathlib import Path
import numpy as np
from mergetool.recipe import load_recipe
from mergetool.models.plan import open_models, build_plan
from mergetool.library.writer import SolutionIn, export_library
r = load_recipe(sys.argv[1]); sources = open_models(r)
plan = build_plan(r, sources=sources, check_values=False)
G = np.zeros((plan.T, plan.L), dtype=int) if sys.argv[3] == "shared" else np.tile(np.arange(plan.T)[:, None], (1, plan.L))
export_library(r, plan, sources, [SolutionIn(grouping=G)], Path(sys.argv[2]), shard_size=2 * 10**9)
"""


def compare_outputs(lib: Path, merged: Path) -> str:
    """How many tensors of mergetool's static TIES library equal mergekit-yaml's output, bit for bit."""
    import torch
    from safetensors import safe_open

    ref = {}
    for f in sorted(merged.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            ref.update({k.removeprefix("model."): (f, k) for k in h.keys()})
    same = total = 0
    worst = 0.0
    for f in sorted(lib.glob("experts-*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                name = key.split("/", 1)[1]
                if name not in ref:
                    continue
                with safe_open(str(ref[name][0]), framework="pt") as r:
                    a, b = h.get_tensor(key), r.get_tensor(ref[name][1])
                total += 1
                same += int(a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)))
                worst = max(worst, float((a.double() - b.double()).abs().max()))
    return f"{same}/{total} tensors bitwise equal (max |difference| {worst:.3g})"


def recipe(root: Path, base: Path, tasks: list[Path], bits: str) -> Path:
    lines = ["name: bench", f"base_model: {base}", "models:"]
    lines += [f"  - {{name: t{i}, model: {p}}}" for i, p in enumerate(tasks)]
    lines += ["merge: {method: ties, parameters: {density: 0.5}}", f"quantization: {{bits: {bits}}}", "tasks:"]
    lines += [f"  t{i}: {{validation: {{path: {root / 'data.jsonl'}}}}}" for i in range(T)]
    path = root / f"recipe-{bits}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30, help="30 = SmolLM2-135M")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the models and outputs (in a temp folder)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mergetool-export-bench-"))
    try:
        return run(args, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path) -> int:
    load0 = os.getloadavg()[0]
    base, tasks = build_models(root, args.layers, args.seed)
    n_params = count_params(base / "model.safetensors")
    config = root / "mergekit.yml"
    config.write_text(json.dumps({
        "merge_method": "ties", "base_model": str(base), "dtype": "float32",
        "parameters": {"normalize": True},
        "models": [{"model": str(p), "parameters": {"density": 0.5, "weight": 1.0}} for p in tasks]}))
    script = root / "export.py"
    script.write_text(EXPORT)
    py = sys.executable
    results = {}
    results["mergetool all-shared TIES (static merge)"] = run_measured(
        [py, str(script), str(recipe(root, base, tasks, "none")), str(root / "lib-shared"), "shared"])
    results["mergetool full library (T experts/component, int8)"] = run_measured(
        [py, str(script), str(recipe(root, base, tasks, "8")), str(root / "lib-full"), "singletons"])
    mk = [str(Path(py).parent / "mergekit-yaml"), str(config), str(root / "mergekit-out"), "--quiet"]
    results["mergekit-yaml TIES"] = run_measured(mk)
    mk_wall, mk_rss = results["mergekit-yaml TIES"]
    equal = compare_outputs(root / "lib-shared", root / "mergekit-out")
    rows = ["| run | wall time | peak RSS | wall / mergekit | RSS / mergekit |", "|---|---|---|---|---|"]
    for name, (wall, rss) in results.items():
        rows.append(f"| {name} | {wall:.1f} s | {rss:.2f} GB | {wall / mk_wall:.2f}× | {rss / mk_rss:.2f}× |")
    body = (f"{T} task variants of a Llama with {args.layers} layers (SmolLM2-135M shape; {n_params / 1e6:.0f}M "
            f"parameters, fp32), random weights + 1e-3 perturbations, TIES density 0.5.\n"
            f"Goals: wall ≤ 1.0× and peak RSS ≤ 1/3 of mergekit's for the static merge.\n\n" + "\n".join(rows)
            + f"\n\nmergetool's static TIES vs mergekit-yaml's output: {equal}. Load average at the start: "
            f"{load0:.1f} (a shared machine: other jobs ran alongside).")
    print(body)
    if not args.no_write:
        write_block("export", "Export throughput and peak RSS vs mergekit-yaml", body, command_line(), [args.seed])
    return 0


if __name__ == "__main__":
    sys.exit(main())
