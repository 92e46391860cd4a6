"""The library's model card (README.md): YAML front matter for the Hub, then tables and usage."""

from __future__ import annotations

import string
from pathlib import Path

import yaml

from mergetool.library.manifest import Manifest, Solution

LETTERS = string.ascii_uppercase + string.ascii_lowercase


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
    return ref.split("@")[0] if looks_hub else Path(ref).name


def render_card(m: Manifest) -> str:
    s = m.solutions[m.default_solution]
    names = [t.name for t in m.tasks]
    front = {
        "library_name": "mergetool",
        "tags": ["merge", "mergetool", "model-merging"],
        "base_model": _base_model(m.base.ref),
        "tasks": names,
    }
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    out += [f"# Expert library: {', '.join(names)}", "",
            f"A MERGE expert library (format v{m.format_version}, mergetool {m.mergetool_version}) of "
            f"{len(names)} tasks over {len(m.components)} components of `{m.base.ref}`, "
            f"merged with `{m.merge.get('method')}` and quantised at {m.quantization.get('bits')} bits "
            f"({m.quantization.get('granularity')}, {m.quantization.get('mode')}). "
            f"It holds {len(m.experts)} experts and {len(m.solutions)} solution(s).", ""]

    out += ["## Tasks", "", "| task | labels | experts in chain | shared experts | score |", "|---|---|---|---|---|"]
    for t in m.tasks:
        chain = s.chains[t.name]
        shared = sum(1 for e in chain if len(m.expert(e).group_members) > 1)
        score = "" if not s.per_task or t.name not in s.per_task else f"{s.per_task[t.name]:.4f}"
        labels = ", ".join(t.labels) if t.labels else ""
        out.append(f"| {t.name} | {labels} | {len(chain)} | {shared} | {score} |")
    out.append("")

    out += ["## Groups per component", "", "Tasks with the same letter share one expert.", "",
            "| component | " + " | ".join(names) + " | experts |", "|---" * (len(names) + 2) + "|"]
    for comp, letters, n in group_letters(m, s):
        out.append(f"| {comp} | " + " | ".join(letters) + f" | {n} |")
    out.append("")

    st = s.storage
    perf = "n/a" if s.performance is None else f"{s.performance:.4f}"
    out += ["## Storage and scores", "",
            f"- storage cost C (Eq. 8, experts only, x the base model's mergeable part): **{st.storage_cost:.6f}**",
            f"- C including the task-specific heads: {st.storage_cost_with_heads:.6f}",
            f"- d = {st.d:,} parameters, b+ = {st.base_bits} bits",
            f"- expert tensor data: {st.expert_data_bytes:,} bytes (row masks {st.mask_bytes:,}); "
            f"heads: {st.head_data_bytes:,} bytes",
            f"- performance P: {perf}" + ("" if s.id is None else f" (front solution {s.id})"), ""]
    if len(m.solutions) > 1:
        out += ["| solution | P | C |", "|---|---|---|"]
        for sol in m.solutions:
            p = "n/a" if sol.performance is None else f"{sol.performance:.4f}"
            out.append(f"| {sol.id} | {p} | {sol.storage.storage_cost:.6f} |")
        out.append("")
    out += ["On disk (manifest.json excluded):", ""]
    out += [f"- {k}: {human(v)}" for k, v in m.disk_bytes.items() if v or k == "total"]
    out.append("")

    t0 = names[0]
    out += ["## Usage", "", "```bash", "mergetool inspect . --verify",
            f"mergetool export-model . --task {t0} --out ./{t0}-model", "```", "", "```python",
            "from mergetool.library import load_task_state",
            f"state = load_task_state('.', '{t0}')  # verified, dequantised, original tensor names",
            "```", ""]
    out += ["## Recipe", "", "```yaml", m.recipe.rstrip(), "```", ""]
    return "\n".join(out)
