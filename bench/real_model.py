"""Generation on the real model (SmolLM2-135M-Instruct), side by side in one run: vLLM (the
project's Engine, in-process, enforce_eager) against transformers' batched `generate`, each in
fp32 and in bf16, on the real run's prompts (jobs/real.yaml's safety and false-refusal sets
through the model's chat template, its stop rule); then whether the answers agree across
dtypes, and the vLLM-vs-transformers greedy agreement that `eval.engine_check_min_match`
is calibrated on.

    .venv/bin/python bench/real_model.py                          # 96 prompts x 64 tokens
    .venv/bin/python bench/real_model.py --prompts 32 --new-tokens 32 --check-prompts 16

Every engine starts cold in a fresh Python process (as the eval actor starts it). Prints a
table, then one JSON line; recorded in docs/BENCHMARKS.md with the machine, the date and
`uptime`'s load average (a loaded box slows both sides; compare the ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def real_prompts(n: int) -> tuple[list[str], str, str]:
    """The first n of the real run's generate prompts (interleaved over its benchmarks), the
    model folder and the chat stop rule (JSON)."""
    from transformers import AutoTokenizer

    from tbr_ray.config import load_config
    from tbr_ray.evaluate import item_prompt, load_items
    from tbr_ray.prompts import stop_rule
    from tbr_ray.tiny import resolve_model

    cfg = load_config(REPO / "jobs" / "real.yaml")
    path = resolve_model(MODEL, cfg.paths.resolved_cache_dir(), cfg.data.resolved_root())
    tok = AutoTokenizer.from_pretrained(path)
    items = [it for it in load_items(cfg) if it.mode == "generate"]
    step = max(1, len(items) // n)
    prompts = [item_prompt(it, tok, "chat") for it in items[::step][:n]]
    return prompts, path, stop_rule(tok, "chat").to_json()


def vllm_worker(spec: dict) -> dict:
    """One cold engine in this process: start, one greedy pass."""
    t0 = time.time()
    from tbr_ray.engine import Engine, EngineSettings
    from tbr_ray.prompts import StopRule

    adapter = spec.get("adapter")  # a LoRA adapter the engine serves (bench/real_adapters.py)
    settings = EngineSettings(
        dtype=spec["dtype"], max_model_len=2048, gpu_memory_utilization=0.2, max_lora_rank=64
    )
    engine = Engine(spec["model"], settings, adapters=[adapter] if adapter else [])
    started = time.time()
    gens = engine.generate(
        spec["prompts"], spec["new_tokens"], adapter, stop=StopRule.from_json(spec["stop"])
    )
    done = time.time()
    return {
        "import_start_s": round(started - t0, 1),
        "engine_start_s": round(engine.start_seconds, 1),
        "generate_s": round(done - started, 2),
        "new_tokens": sum(len(g.token_ids) for g in gens),
        "tokens": [list(g.token_ids) for g in gens],
        "texts": [g.text for g in gens],
    }


def run_worker(spec: dict, tmp: str) -> dict:
    path = f"{tmp}/spec-{spec['dtype']}-{spec.get('name', 'base')}.json"
    Path(path).write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, __file__, "--worker", path], capture_output=True, text=True
    )
    if out.returncode != 0:
        sys.exit(f"bench worker failed:\n{out.stderr[-3000:]}")
    return json.loads(Path(path + ".out").read_text())


def transformers_side(model: str, prompts: list[str], new_tokens: int, dtype: str, stop: str):
    """Batched greedy `generate` (one batch, left padding) on the same ids and stop tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tbr_ray.prompts import StopRule, prompt_token_ids_batch

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    ids = prompt_token_ids_batch(tok, prompts)
    width = max(map(len, ids))
    pad = tok.pad_token_id
    batch = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    eos = list(StopRule.from_json(stop).token_ids)
    t0 = time.time()
    with torch.no_grad():
        out = m.generate(
            input_ids=batch,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    seconds = time.time() - t0
    new = out[:, width:]
    tokens = []
    for row in new.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        tokens.append(row[:cut])
    return {"generate_s": round(seconds, 2), "new_tokens": sum(map(len, tokens)), "tokens": tokens}


def engine_agreement(model: str, prompts: list[str], dtype: str, stop: str) -> dict:
    """vLLM's greedy tokens against transformers' on `prompts` (16 tokens, the check's length),
    as `tbr_ray.engine.check_engine` counts them (ties within eval.engine_check_tie_tol)."""
    from tbr_ray.engine import CHECK_NEW_TOKENS, reference_greedy
    from tbr_ray.prompts import StopRule

    rule = StopRule.from_json(stop)
    ref = reference_greedy(model, prompts, CHECK_NEW_TOKENS, [None], rule, dtype=dtype)[None]
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"model": model, "prompts": prompts, "new_tokens": CHECK_NEW_TOKENS}
        got = run_worker({**spec, "dtype": dtype, "stop": stop}, tmp)["tokens"]
    stops = set(rule.token_ids)
    return agreement_counts(got, ref, stops)


def agreement_counts(got: list, ref: list, stops: set[int], tie_tol: float = 0.01) -> dict:
    """same / tie / differ counts of `tbr_ray.engine.agreement`, and the gap (nats) at the
    first differing token of each prompt that is not the same (inf: not measurable)."""
    from tbr_ray.engine import agreement

    found = [agreement(tuple(g), r, stops, tie_tol) for g, r in zip(got, ref, strict=True)]
    return {
        "prompts": len(found),
        "same": sum(v == "same" for v, _ in found),
        "tie": sum(v == "tie" for v, _ in found),
        "differ": sum(v == "differ" for v, _ in found),
        "gaps": sorted(round(gap, 3) for v, gap in found if v != "same"),
    }


def labels(texts: list[str]) -> list[bool]:
    from tbr_ray.judges import paper_keywords_refused

    return [paper_keywords_refused(t) for t in texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--check-prompts", type=int, default=32)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        result = vllm_worker(json.loads(Path(a.worker).read_text()))
        Path(a.worker + ".out").write_text(json.dumps(result))
        return
    prompts, model, stop = real_prompts(a.prompts)
    load = os.getloadavg()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            spec = {"model": model, "prompts": prompts, "new_tokens": a.new_tokens, "stop": stop}
            res[f"vllm_{dtype}"] = run_worker({**spec, "dtype": dtype}, tmp)
            res[f"hf_{dtype}"] = transformers_side(model, prompts, a.new_tokens, dtype, stop)
    check = {d: engine_agreement(model, prompts[: a.check_prompts], d, stop) for d in res_dtypes()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; {time.strftime('%Y-%m-%d')}")
    print(f"load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}")
    print(f"{len(prompts)} prompts x {a.new_tokens} new tokens (chat stop rule), {MODEL}")
    for name, r in res.items():
        print(f"{name:<18} {r['generate_s']:7.1f}s  {r['new_tokens'] / r['generate_s']:6.0f} tok/s")
    for d in res_dtypes():
        v, h = res[f"vllm_{d}"], res[f"hf_{d}"]
        ratio = (v["new_tokens"] / v["generate_s"]) / (h["new_tokens"] / h["generate_s"])
        print(f"vLLM / transformers, {d}: {ratio:.2f}x")
    f32, b16 = res["vllm_float32"], res["vllm_bfloat16"]
    same_tok = sum(x == y for x, y in zip(f32["tokens"], b16["tokens"], strict=True))
    pairs = zip(labels(f32["texts"]), labels(b16["texts"]), strict=True)
    same_label = sum(x == y for x, y in pairs)
    print(
        f"vLLM bf16 vs fp32: same greedy tokens on {same_tok}/{len(prompts)}, same keyword "
        f"label on {same_label}/{len(prompts)}; refusals fp32 {sum(labels(f32['texts']))}, "
        f"bf16 {sum(labels(b16['texts']))}"
    )
    for d, c in check.items():
        print(f"engine check agreement ({d}, vs transformers {d}): {c}")
    summary = {k: {x: r[x] for x in ("generate_s", "new_tokens")} for k, r in res.items()}
    print(json.dumps({"load": load, "runs": summary, "check": check, "same_tokens": same_tok,
                      "same_labels": same_label, "prompts": len(prompts)}))  # fmt: skip


def res_dtypes() -> tuple[str, str]:
    return ("float32", "bfloat16")


if __name__ == "__main__":
    main()
