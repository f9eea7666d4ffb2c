"""Benchmark: one vLLM engine shared by a base model's adapters vs one engine per cell.

    .venv/bin/python bench/eval_engine.py [--adapters 3] [--prompts 100] [--new-tokens 48]

Builds tiny-llama, makes N random LoRA adapters, then measures side by side in one run, every
engine cold in a fresh Python process (as each Tune trial or eval actor would start it):
  shared    one process, one engine with all N adapters, one pass per adapter (what tbr-ray does)
  per-cell  N processes, one engine and one adapter each (one engine per Tune trial)
  default   vLLM's default multi-process CPU engine (engine core + worker spawned) against the
            in-process one tbr-ray uses: start-up and greedy tokens on the same adapter
and, on the same prompts, transformers' batched greedy generate for scale.
Prints seconds, new tokens/s and the ratios; recorded in docs/BENCHMARKS.md (machine, date).
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time


def make_adapters(base: str, n: int, out_dir: str) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tbr_ray.models import TINY_MODELS

    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(
                r=16,
                lora_alpha=32,
                init_lora_weights=False,
                target_modules=list(TINY_MODELS["tiny-llama"].lora_targets),
            ),
        )
        path = f"{out_dir}/adapter{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def worker(spec: dict) -> dict:
    """One cold engine in this process: import, start, one greedy pass per adapter."""
    t0 = time.time()
    from tbr_ray.engine import Engine, EngineSettings

    imported = time.time()
    settings = EngineSettings(max_lora_rank=16, in_process=spec["in_process"])
    engine = Engine(spec["base"], settings, spec["adapters"])
    started = time.time()
    tokens = [
        [list(g.token_ids) for g in engine.generate(spec["prompts"], spec["new_tokens"], a)]
        for a in spec["adapters"]
    ]
    done = time.time()
    return {
        "import_s": imported - t0,
        "start_s": started - imported,
        "generate_s": done - started,
        "new_tokens": sum(len(t) for per in tokens for t in per),
        "tokens": tokens,
    }


def run_worker(spec: dict, tmp: str) -> dict:
    """Runs `worker` in a fresh interpreter; adds the process's whole wall time."""
    path = f"{tmp}/spec.json"
    with open(path, "w") as f:
        json.dump(spec, f)
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--worker", path], capture_output=True, text=True
    )
    wall = time.time() - t0
    if out.returncode != 0:
        sys.exit(f"bench worker failed:\n{out.stderr[-3000:]}")
    with open(path + ".out") as f:
        result = json.load(f)
    return {**result, "wall_s": wall}


def transformers_generate(base, prompts, new_tokens, batch=64):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    t0, tokens = time.time(), 0
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        new = out[:, enc["input_ids"].shape[1] :]
        tokens += int((new != tok.pad_token_id).sum())
    return time.time() - t0, tokens


def line(name: str, r: dict) -> str:
    return (
        f"{name:<16} process {r['wall_s']:6.1f}s  (imports {r['import_s']:5.1f}s, "
        f"engine start {r['start_s']:5.1f}s, generate {r['generate_s']:5.1f}s, "
        f"{r['new_tokens'] / r['generate_s']:5.0f} new tok/s)"
    )


def main() -> None:
    from tbr_ray.benchmarks import load_benchmark
    from tbr_ray.config import DataConfig, PathsConfig
    from tbr_ray.models import TINY_MODELS
    from tbr_ray.tiny import build_tiny_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        with open(a.worker) as f:
            result = worker(json.load(f))
        with open(a.worker + ".out", "w") as f:
            json.dump(result, f)
        return
    base = str(
        build_tiny_model(
            TINY_MODELS["tiny-llama"],
            PathsConfig().resolved_cache_dir(),
            DataConfig().resolved_root(),
        )
    )
    items = load_benchmark("xstest_safe", DataConfig().resolved_root(), sample_size=a.prompts)
    prompts = [it.prompt for it in items]
    spec = {"base": base, "prompts": prompts, "new_tokens": a.new_tokens, "in_process": True}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, a.adapters, tmp)
        shared = run_worker({**spec, "adapters": adapters}, tmp)
        per_cell = [run_worker({**spec, "adapters": [ad]}, tmp) for ad in adapters]
        default = run_worker({**spec, "adapters": adapters[:1], "in_process": False}, tmp)
    hf_s, hf_tok = transformers_generate(base, prompts, a.new_tokens)

    cell_wall = sum(r["wall_s"] for r in per_cell)
    same_tokens = [r["tokens"][0] for r in per_cell] == shared["tokens"]
    print(f"machine: {platform.machine()}; {time.strftime('%Y-%m-%d')}")
    print(f"{a.adapters} adapters x {len(prompts)} prompts x {a.new_tokens} new tokens, each cold")
    print(line("shared engine", shared))
    for i, r in enumerate(per_cell):
        print(line(f"per-cell {i}", r))
    print(
        f"per-cell / shared wall time: {cell_wall:.1f}s / {shared['wall_s']:.1f}s = "
        f"{cell_wall / shared['wall_s']:.2f}x; same greedy tokens per adapter: {same_tokens}"
    )
    print(line("vLLM default mp", default))
    print(
        f"engine start, vLLM default (2 spawned processes) / in-process: "
        f"{default['start_s']:.1f}s / {per_cell[0]['start_s']:.1f}s = "
        f"{default['start_s'] / per_cell[0]['start_s']:.1f}x; same greedy tokens: "
        f"{default['tokens'][0] == per_cell[0]['tokens'][0]}"
    )
    print(
        f"transformers batched generate (base, 1 pass): {hf_s:.1f}s, {hf_tok / hf_s:.0f} new tok/s"
    )


if __name__ == "__main__":
    main()
