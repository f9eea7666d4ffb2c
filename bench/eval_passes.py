"""Benchmark: evaluation throughput before and after issue 20 point 7 (a) and (c), side by side.

    .venv/bin/python bench/eval_passes.py [--adapters 2] [--prompts 150] [--new-tokens 64]

On tiny-llama, in one process, one engine (started once, not timed):
  (a) a pass of mixed rows (XSTest safe + unsafe generations with the Alpaca stop rule, MMLU
      scored choices), the way evaluation used to feed it (Ray Data batches of 256 rows, each
      batch one vLLM call per mode and stop rule, each call waiting for its longest sequence)
      against the way it feeds it now (`Engine.run`: the whole pass in one call); greedy
      tokens must be the same either way.
  (c) the transformers reference of the engine check for the base model and N adapters, the
      way it used to be made (the model loaded once per adapter) against now (loaded once,
      adapters swapped: `reference_greedy`); the references must be identical.
Prints one JSON object: seconds, new tokens/s, the ratios, the load average during the run.
On CPU a tiny model's load takes a second, so (c) gains little here; the figure that carries
to a GPU cluster is the number of loads (1 instead of 1 + N), each ~138 GB for a 70B model.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_engine import make_adapters  # noqa: E402

OLD_BATCH_ROWS = 256  # Ray Data's batch_size in tbr_ray.evaluate before issue 20


def pass_rows(base: str, prompts: int) -> list[dict]:
    """XSTest safe + unsafe (generate, Alpaca stop) and zero-shot MMLU (choice) rows, as
    evaluation builds them (tbr_ray.evaluate._rows), for the model at `base`."""
    from tbr_ray.benchmarks import load_benchmark
    from tbr_ray.config import DataConfig
    from tbr_ray.evaluate import EvalPass, _rows, _tokenizer, base_cell

    root, items = DataConfig().resolved_root(), []
    for name, shots in (("xstest_safe", None), ("xstest_unsafe", None), ("mmlu", 0)):
        items += load_benchmark(name, root, sample_size=prompts, seed=0, shots=shots)
    return _rows([EvalPass(base_cell("tiny-llama"), None)], items, _tokenizer(base))


def old_feed(engine, rows: list[dict], new_tokens: int) -> tuple[list, int]:
    """The pre-issue-20 feeding: 256-row batches, one call per (mode, stop) group in each."""
    from tbr_ray.engine import run_rows

    out, calls = [], 0
    for i in range(0, len(rows), OLD_BATCH_ROWS):
        batch, groups = rows[i : i + OLD_BATCH_ROWS], {}
        for r in batch:
            groups.setdefault((r["mode"], r["stop"]), []).append(r)
        done = {}
        for group in groups.values():
            for r, o in zip(group, run_rows(engine, group, None, new_tokens), strict=True):
                done[id(r)] = o
            calls += 1
        out += [done[id(r)] for r in batch]
    return out, calls


def bench_passes(base: str, rows: list[dict], new_tokens: int, repeats: int) -> dict:
    """(a): the same engine, the same rows, old and new feeding alternated `repeats` times."""
    from tbr_ray.engine import Engine, EngineSettings, run_rows

    engine = Engine(base, EngineSettings(max_model_len=1024))
    old_s, new_s, same = [], [], True
    for i in range(repeats):  # alternated, the order swapped each round
        for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
            t0 = time.time()
            if name == "old":
                old, calls = old_feed(engine, rows, new_tokens)
                old_s.append(time.time() - t0)
            else:
                new = run_rows(engine, rows, None, new_tokens)
                new_s.append(time.time() - t0)
        keys = ("completion", "choice_logprobs")
        same &= [[o[k] for k in keys] for o in old] == [[n[k] for k in keys] for n in new]
    tokens = sum(o["n_new_tokens"] for o in new)
    old_t, new_t = min(old_s), min(new_s)  # the fastest of each: the least disturbed
    return {
        "rows": len(rows),
        "new_tokens": tokens,
        "old_calls": calls,
        "new_calls": 1,
        "old_s": round(old_t, 2),
        "new_s": round(new_t, 2),
        "old_tokens_per_s": round(tokens / old_t, 1),
        "new_tokens_per_s": round(tokens / new_t, 1),
        "speedup": round(old_t / new_t, 3),
        "same_outputs": same,
    }


def bench_reference(base: str, adapters: list[str], prompts: list[str], repeats: int) -> dict:
    """(c): per-adapter loads (each `reference_greedy` call loads the model) against one load
    with the adapters swapped; alternated `repeats` times, the fastest of each kept. The time
    spent loading is measured apart: it is what grows with the model (~138 GB for a 70B)."""
    import tbr_ray.engine as eng

    load_s = []
    real = eng._reference_model

    def timed_load(*args):
        t0 = time.time()
        model = real(*args)
        load_s.append(time.time() - t0)
        return model

    eng._reference_model = timed_load
    keys = [None, *adapters]
    eng.reference_greedy(base, prompts[:1], 2, keys[-1:])  # imports and caches warm, untimed
    runs = {"old": [], "new": []}
    for _ in range(repeats):
        for name in ("old", "new"):
            load_s.clear()
            t0 = time.time()
            if name == "old":
                ref = {k: eng.reference_greedy(base, prompts, 16, [k])[k] for k in keys}
            else:
                ref = eng.reference_greedy(base, prompts, 16, keys)
            runs[name].append((time.time() - t0, len(load_s), sum(load_s), ref))
    eng._reference_model = real
    old, new = (min(runs[n], key=lambda r: r[0]) for n in ("old", "new"))
    return {
        "passes": len(keys),
        "old_loads": old[1],
        "new_loads": new[1],
        "old_s": round(old[0], 2),
        "new_s": round(new[0], 2),
        "old_load_s": round(old[2], 3),
        "new_load_s": round(new[2], 3),
        "speedup": round(old[0] / new[0], 3),
        "identical": old[3] == new[3],
    }


def main() -> None:
    from tbr_ray.config import DataConfig, PathsConfig
    from tbr_ray.models import TINY_MODELS
    from tbr_ray.tiny import build_tiny_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=150, help="per benchmark (3 benchmarks)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cache, root = PathsConfig().resolved_cache_dir(), DataConfig().resolved_root()
    base = str(build_tiny_model(TINY_MODELS["tiny-llama"], cache, root))
    rows = pass_rows(base, a.prompts)
    load_before = os.getloadavg()
    passes = bench_passes(base, rows, a.new_tokens, a.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, a.adapters, tmp)
        check = [r["prompt"] for r in rows if r["mode"] == "generate"][:4]
        reference = bench_reference(base, adapters, check, a.repeats)
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "a_pass_in_one_call": passes,
                "c_reference_loaded_once": reference,
            }
        )
    )


if __name__ == "__main__":
    main()
