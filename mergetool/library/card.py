"""The library's model card (README.md): YAML front matter for the Hub, then tables and usage.

The card only uses manifest fields that are fixed before README.md is written (not `files`, not
the "other"/"total" disk bytes), so rendering the final manifest gives the card the writer wrote.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Optional

import yaml

from mergetool.library.manifest import Manifest, Solution

LETTERS = string.ascii_uppercase + string.ascii_lowercase
TAGS = ["merge", "mergetool", "model-merging"]
TENSOR_CATEGORIES = ("experts", "heads", "buffers", "router", "base_features")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def group_letters(m: Manifest, s: Solution) -> list[tuple[str, list[str], int]]:
    """Per component: (name, a group letter per task, number of experts). Same letter = shared."""
    rows = []
    for l, comp in enumerate(m.components):
        labels = [row[l] for row in s.grouping]
        rows.append((comp.name, [LETTERS[g] if g < len(LETTERS) else str(g) for g in labels], len(set(labels))))
    return rows


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _base_model(ref: str) -> str:
    """A hub id as is; a local folder by its name (the Hub only links hub ids)."""
    looks_hub = ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not Path(ref).exists()
    name = ref.split("@")[0] if looks_hub else Path(ref).name
    return name if _REPO_ID.match(name) else re.sub(r"[^\w.\-]+", "-", name).strip("-.") or "unknown"


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def test_split_scores(s: Solution) -> Optional[dict]:
    """Test-split scores {performance, per_task} if the manifest records them (else None)."""
    for name in ("test", "test_scores"):
        v = getattr(s, name, None)
        if isinstance(v, dict):
            return v
    per_task = getattr(s, "test_per_task", None)
    if isinstance(per_task, dict):
        return {"performance": getattr(s, "test_performance", None), "per_task": per_task}
    return None


def routing_accuracy(m: Manifest) -> str:
    """Routing accuracy from the manifest's router (test split): 'n/a' without a router or a score."""
    r = m.router
    if not r:
        return "n/a (no router in this library)"
    get = r.get if isinstance(r, dict) else (lambda k: getattr(r, k, None))
    acc, per = get("routing_accuracy"), get("routing_accuracy_per_task")
    if acc is None:
        return "n/a (not measured)"
    text = f"{acc:.4f} on the test split"
    if per:
        text += " (" + ", ".join(f"{t} {v:.4f}" for t, v in per.items()) + ")"
    features = get("features")
    return text + (f"; router features: `{features}`" if features else "")


def render_card(m: Manifest, *, repo_id: Optional[str] = None) -> str:
    """README.md for the library; `repo_id` (known on push) fills in the usage snippet."""
    s = m.solutions[m.default_solution]
    names = [t.name for t in m.tasks]
    test = test_split_scores(s) or {}
    front = {"library_name": "mergetool", "tags": TAGS, "base_model": _base_model(m.base.ref), "tasks": names}
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    out += [f"# Expert library: {', '.join(names)}", "",
            f"A MERGE expert library (format v{m.format_version}, mergetool {m.mergetool_version}) of "
            f"{len(names)} tasks over {len(m.components)} components of `{m.base.ref}`, "
            f"merged with `{m.merge.get('method')}` and quantised at {m.quantization.get('bits')} bits "
            f"({m.quantization.get('granularity')}, {m.quantization.get('mode')}). "
            f"It holds {len(m.experts)} experts and {len(m.solutions)} solution(s).", ""]

    out += ["## Tasks", "", "Each task runs the chain of experts below, one per component.", "",
            "| task | labels | chain | shared experts | validation | test |", "|---|---|---|---|---|---|"]
    for t in m.tasks:
        chain = s.chains[t.name]
        shared = sum(1 for e in chain if len(m.expert(e).group_members) > 1)
        val = (s.per_task or {}).get(t.name)
        tst = (test.get("per_task") or {}).get(t.name)
        labels = ", ".join(t.labels) if t.labels else ""
        out.append(f"| {_cell(t.name)} | {_cell(labels)} | {' '.join(chain)} | {shared} of {len(chain)} "
                   f"| {_num(val)} | {_num(tst)} |")
    out.append("")

    out += ["## Groups per component", "", "Tasks with the same letter share one expert.", "",
            "| component | " + " | ".join(map(_cell, names)) + " | experts |", "|---" * (len(names) + 2) + "|"]
    for comp, letters, n in group_letters(m, s):
        out.append(f"| {comp} | " + " | ".join(letters) + f" | {n} |")
    out.append("")

    st = s.storage
    out += ["## Storage and scores", "",
            f"- storage cost C (Eq. 8, experts only, x the base model's mergeable part): **{st.storage_cost:.6f}**",
            f"- C including the task-specific heads: {st.storage_cost_with_heads:.6f}",
            f"- d = {st.d:,} parameters, b+ = {st.base_bits} bits",
            f"- expert tensor data: {st.expert_data_bytes:,} bytes (row masks {st.mask_bytes:,}); "
            f"heads: {st.head_data_bytes:,} bytes",
            *_codec_lines(m),
            f"- performance P on validation: {_num(s.performance)}"
            + ("" if s.id is None else f" (front solution {s.id})"),
            f"- performance P on test: {_num(test.get('performance'))}",
            f"- routing accuracy: {routing_accuracy(m)}", ""]
    if len(m.solutions) > 1:
        out += ["| solution | P | C |", "|---|---|---|"]
        for sol in m.solutions:
            out.append(f"| {sol.id} | {_num(sol.performance)} | {sol.storage.storage_cost:.6f} |")
        out.append("")
    sizes = {k: m.disk_bytes.get(k, 0) for k in TENSOR_CATEGORIES}
    out += ["On disk, by category (configs, tokenizer and this card excluded):", ""]
    out += [f"- {k}: {human(v)}" for k, v in sizes.items() if v]
    out += [f"- total: {human(sum(sizes.values()))}", ""]

    repo = repo_id or "USER/REPO"
    t0 = names[0]
    out += ["## Usage", "", "```bash", "pip install mergetool", f"mergetool pull {repo} ./library",
            "mergetool predict ./library --input inputs.jsonl --output preds.jsonl",
            f"mergetool export-model ./library --task {t0} --out ./{t0}-model", "```", "", "```python",
            "from mergetool.library import ExpertLibrary, load_task_state",
            f"lib = ExpertLibrary.load('hub:{repo}')  # downloaded, verified",
            f"state = load_task_state('./library', '{t0}')  # dequantised, original tensor names",
            "```", ""]
    out += ["## Recipe", "", "```yaml", m.recipe.rstrip(), "```", ""]
    return "\n".join(out)


def _codec_lines(m: Manifest) -> list[str]:
    """Format v2: the experts' codecs and the stored base (nothing for a v1 library)."""
    if not m.stored_base:
        return []
    codecs = sorted({e.codec for e in m.experts})
    base = sum(st.bits for st in m.stored_base.values()) // 8
    return [f"- expert codecs: {', '.join(codecs)}; the base they are deltas from is stored once at "
            f"{m.base_storage} ({len(m.stored_base)} tensors, {base:,} bytes, counted in C and in the expert "
            "tensor data)"]
