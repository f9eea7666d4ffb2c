"""What a run's models wrote, for a reader: example generations per condition (the same
prompts in every condition, so they read side by side) and each reflected cell's usable
reflections, as markdown.

    .venv/bin/python -m analysis.examples runs/real            # 10 examples per condition
    .venv/bin/python -m analysis.examples runs/real --per-condition 5 --seed 1

Reads the run folder only (tbr_ray.results and each cell's mix report, whose path its status
records). docs/RESULTS.md quotes its output for the real run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pandas as pd

from tbr_ray import results

CONDITION_ORDER = ("base", "none", "internal", "external", "prompt-direct", "prompt-cot")


def example_prompts(gens: pd.DataFrame, n: int, seed: int) -> list[tuple[str, str]]:
    """n (benchmark, prompt_id) pairs generated in every condition, spread over the judged
    benchmarks in turn, each benchmark's in a seeded order (pure)."""
    judged = gens[gens["benchmark_kind"] != "general"]
    conditions = judged["condition"].nunique()
    counts = judged.groupby(["benchmark", "prompt_id"])["condition"].nunique()
    everywhere = counts[counts == conditions].index
    by_bench: dict[str, list[str]] = {}
    for bench, pid in sorted(everywhere, key=lambda k: _rank(seed, *k)):
        by_bench.setdefault(bench, []).append(pid)
    picked, i = [], 0
    while len(picked) < n and any(i < len(v) for v in by_bench.values()):
        picked += [(b, v[i]) for b, v in sorted(by_bench.items()) if i < len(v)]
        i += 1
    return picked[:n]


def _rank(seed: int, *parts: str) -> str:
    return hashlib.sha256("\x1f".join([str(seed), *parts]).encode()).hexdigest()


def examples_markdown(run: Path, n: int = 10, seed: int = 0, judge: str = "paper-keywords") -> str:
    res = results.read_results(run)
    gens, judg = res.generations, res.judgements
    refused = judg[judg["judge"] == judge].set_index(["cell_id", "benchmark", "prompt_id"])
    lines = []
    for bench, pid in example_prompts(gens, n, seed):
        rows = gens[(gens["benchmark"] == bench) & (gens["prompt_id"] == pid)]
        lines.append(f"**{bench} #{pid}** ({judge}: R = refused, C = complied)\n")
        for r in sorted(rows.itertuples(), key=lambda r: _order(r.condition)):
            label = refused["refused"].get((r.cell_id, bench, pid))
            mark = "?" if label is None else ("R" if label else "C")
            text = " ".join(str(r.completion).split())
            lines.append(f"- `{r.condition}` [{mark}] {text}")
        lines.append("")
    return "\n".join(lines)


def _order(condition: str) -> int:
    return CONDITION_ORDER.index(condition) if condition in CONDITION_ORDER else 99


def reflection_counts(run: Path) -> pd.DataFrame:
    """Per reflected cell: its writer's reflections for the safety rows, how many are empty
    (the writer opened with a refusal) or truncated, and how many rows carry one."""
    status = results.read_status(run)
    rows = []
    for s in status.to_dict("records") if len(status) else []:
        mix = s.get("mix")
        report = Path(mix) / "report.json" if isinstance(mix, str) else None
        if report is None or not report.is_file():
            continue
        refl = json.loads(report.read_text()).get("reflections")
        if refl:
            rows.append({"cell_id": s["cell_id"], **refl})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--per-condition", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    counts = reflection_counts(a.run)
    if len(counts):
        print(counts.to_markdown(index=False), end="\n\n")
    print(examples_markdown(a.run, a.per_condition, a.seed))


if __name__ == "__main__":
    main()
