"""Benchmark: one vLLM engine shared by a base model's adapters vs one engine per cell.

    .venv/bin/python bench/eval_engine.py [--adapters 3] [--prompts 100] [--new-tokens 48]

Builds tiny-llama, makes N random LoRA adapters, then measures side by side in one run:
  shared   one engine with all N adapters, one pass per adapter (what tbr-ray does)
  per-cell N engines, one adapter each (what one engine per Tune trial would cost)
then vLLM's default multi-process CPU engine against the in-process one tbr-ray uses (start
and tokens), and, on the same prompts, transformers' batched greedy generate for scale.
Prints seconds, new tokens/s and the ratios; recorded in docs/BENCHMARKS.md (machine, date).
"""

import argparse
import platform
import time
from dataclasses import replace

import torch


def make_adapters(base: str, n: int, out_dir: str) -> list[str]:
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


def timed_passes(engine, prompts, adapters, new_tokens):
    t0, tokens = time.time(), 0
    for adapter in adapters:
        tokens += sum(len(g.token_ids) for g in engine.generate(prompts, new_tokens, adapter))
    return time.time() - t0, tokens


def transformers_generate(base, prompts, new_tokens, batch=64):
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


def main() -> None:
    import tempfile

    from tbr_ray.benchmarks import load_benchmark
    from tbr_ray.config import DataConfig, PathsConfig
    from tbr_ray.engine import Engine, EngineSettings
    from tbr_ray.models import TINY_MODELS, build_tiny_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=48)
    a = ap.parse_args()
    base = str(build_tiny_model(TINY_MODELS["tiny-llama"], PathsConfig().resolved_cache_dir()))
    items = load_benchmark("xstest_safe", DataConfig().resolved_root(), sample_size=a.prompts)
    prompts = [it.prompt for it in items]
    settings = EngineSettings(max_lora_rank=16)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, a.adapters, tmp)
        t0 = time.time()
        shared = Engine(base, settings, adapters)
        start_shared = time.time() - t0
        gen_shared, tok_shared = timed_passes(shared, prompts, adapters, a.new_tokens)
        del shared
        per_cell_start, per_cell_gen, tok_cell = 0.0, 0.0, 0
        for adapter in adapters:
            t0 = time.time()
            eng = Engine(base, settings, [adapter])
            per_cell_start += time.time() - t0
            g, n = timed_passes(eng, prompts, [adapter], a.new_tokens)
            per_cell_gen, tok_cell = per_cell_gen + g, tok_cell + n
            del eng
        # vLLM's default on CPU (engine core and worker in two spawned processes) against the
        # in-process engine tbr-ray uses: start-up and tokens, same adapter, same prompts.
        t0 = time.time()
        eng = Engine(base, replace(settings, in_process=False), adapters[:1])
        mp_start = time.time() - t0
        mp_tokens = [g.token_ids for g in eng.generate(prompts, a.new_tokens, adapters[0])]
        del eng
        t0 = time.time()
        eng = Engine(base, settings, adapters[:1])
        in_start = time.time() - t0
        same = mp_tokens == [g.token_ids for g in eng.generate(prompts, a.new_tokens, adapters[0])]
        del eng
    hf_s, hf_tok = transformers_generate(base, prompts, a.new_tokens)
    total_shared, total_cell = start_shared + gen_shared, per_cell_start + per_cell_gen
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; {time.strftime('%Y-%m-%d')}"
    )
    print(f"{a.adapters} adapters x {len(prompts)} prompts x {a.new_tokens} new tokens")
    print(
        f"shared engine : start {start_shared:6.1f}s  generate {gen_shared:6.1f}s  "
        f"total {total_shared:6.1f}s  {tok_shared / gen_shared:7.0f} new tok/s"
    )
    print(
        f"engine per cell: start {per_cell_start:6.1f}s  generate {per_cell_gen:6.1f}s  "
        f"total {total_cell:6.1f}s  {tok_cell / per_cell_gen:7.0f} new tok/s"
    )
    print(f"per-cell / shared wall time: {total_cell / total_shared:.2f}x")
    print(
        f"engine start, vLLM default (2 spawned processes): {mp_start:.1f}s; in-process: "
        f"{in_start:.1f}s ({mp_start / in_start:.1f}x); same greedy tokens: {same}"
    )
    print(
        f"transformers batched generate (base, 1 pass): {hf_s:.1f}s, {hf_tok / hf_s:.0f} new tok/s"
    )


if __name__ == "__main__":
    main()
