"""The adapter path on the real model (SmolLM2-135M-Instruct), side by side in one run: a
trained LoRA adapter served by vLLM as LoRA against the same adapter merged into a copy of the
model (`tbr_ray.engine.merge_adapter`, what eval.adapter_engines: merge does) and against the
base model, each engine cold in a fresh process, on the real run's prompts; then the engine
check of the merged engine against transformers + PEFT (the unmerged pair), with the gap in
nats at each prompt's first differing token, which eval.engine_check_tie_tol is set from.

    .venv/bin/python bench/real_adapters.py runs/real/adapters/<cell>       # after make real
    .venv/bin/python bench/real_adapters.py <adapter> --dtype float32 --prompts 48

Prints a table, then one JSON line; recorded in docs/BENCHMARKS.md with the machine, the date
and `uptime`'s load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import MODEL, agreement_counts, real_prompts, run_worker  # noqa: E402


def merged_check(model: str, merged: str, adapter: str, prompts, dtype: str, stop: str) -> dict:
    """The merged engine's greedy tokens against transformers + PEFT on the unmerged pair, at
    the engine check's length (as `tbr_ray.engine.check_engine` compares a merged engine)."""
    from tbr_ray.engine import CHECK_NEW_TOKENS, reference_greedy
    from tbr_ray.prompts import StopRule

    rule = StopRule.from_json(stop)
    ref = reference_greedy(model, prompts, CHECK_NEW_TOKENS, [None, adapter], rule, dtype=dtype)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, key in (("base", model, None), ("merged", merged, adapter)):
            spec = {"model": path, "prompts": prompts, "new_tokens": CHECK_NEW_TOKENS}
            got = run_worker({**spec, "dtype": dtype, "stop": stop, "name": name}, tmp)
            out[name] = agreement_counts(got["tokens"], ref[key], set(rule.token_ids))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter", help="a trained adapter folder of the real model")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--check-prompts", type=int, default=32)
    a = ap.parse_args()
    from tbr_ray.engine import merge_adapter

    prompts, model, stop = real_prompts(a.prompts)
    adapter = str(Path(a.adapter).resolve())
    load = os.getloadavg()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        merged = merge_adapter(model, adapter, Path(tmp) / "merged", "float32")
        merge_s = time.time() - t0
        spec = {"prompts": prompts, "new_tokens": a.new_tokens, "stop": stop, "dtype": a.dtype}
        sides = {
            "base": {"model": model},
            "lora": {"model": model, "adapter": adapter},
            "merged": {"model": merged},
        }
        for name, side in sides.items():
            res[name] = run_worker({**spec, **side, "name": name}, tmp)
        check = merged_check(model, merged, adapter, prompts[: a.check_prompts], a.dtype, stop)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; {time.strftime('%Y-%m-%d')}")
    print(f"load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}")
    print(f"{len(prompts)} prompts x {a.new_tokens} new tokens, {MODEL}, {a.dtype}")
    print(f"merge (fp32, load + merge + save): {merge_s:.1f}s")
    for name, r in res.items():
        rate = r["new_tokens"] / r["generate_s"]
        start, gen = r["engine_start_s"], r["generate_s"]
        print(f"vLLM {name:<8} start {start:5.1f}s  {gen:7.1f}s  {rate:6.0f} tok/s")
    same = sum(x == y for x, y in zip(res["lora"]["tokens"], res["merged"]["tokens"], strict=True))
    print(f"LoRA-served vs merged: same greedy tokens on {same}/{len(prompts)}")
    for name, c in check.items():
        print(f"engine check, {name} engine vs transformers{' + PEFT' * (name == 'merged')}: {c}")
    keys = ("engine_start_s", "generate_s", "new_tokens")
    summary = {k: {x: r[x] for x in keys} for k, r in res.items()}
    out = {"load": load, "dtype": a.dtype, "merge_s": round(merge_s, 1), "runs": summary}
    print(json.dumps({**out, "same_tokens_lora_merged": same, "check": check}))


if __name__ == "__main__":
    main()
