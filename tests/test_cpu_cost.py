"""The CPU cost model (tbr_ray.plan.cost.CPU_COST) against what this 2-core box measured: the
tiny presets' decoding and makespans, and the real model's generation in fp32 and bf16
(docs/BENCHMARKS.md "The CPU cost model refit"). Pure: no Ray, no engine, well under a second.

    .venv/bin/pytest tests/test_cpu_cost.py -q
"""

import sys
from pathlib import Path

import pytest

from tbr_ray.config import load_config
from tbr_ray.plan import CPU_COST, plan_grid
from tbr_ray.plan.cost import decode_s, engine_speed, infer_flops, prefill_s

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = "smollm2-135m-instruct"


def real(*sets):
    return load_config(REPO / "jobs" / "real.yaml", list(sets))


def job_seconds(cfg, kind: str) -> dict[str, float]:
    """{job name: planned seconds} of `kind`'s jobs in `cfg`'s plan on 2 cores."""
    return {s.job.name: s.job.seconds for s in plan_grid(cfg, 2).slots if s.job.kind == kind}


@pytest.mark.parametrize(("dtype", "tokens_per_s"), [("float32", 169), ("bfloat16", 412)])
def test_the_real_models_generation_takes_what_the_bench_measured(dtype, tokens_per_s):
    """bench/real_model.py (idle box, 2026-12-03): vLLM on 2 cores, 96 chat prompts of ~50
    tokens answered with 64 new tokens each in one call, 169 new tokens/s in fp32 and 412 in
    bf16: 36.4 s and 14.9 s. The plan's prefill and decoding of that call land within 25%
    (the cost model before the refit: ~14 minutes in either dtype)."""
    prompts, prompt_tokens, new = 96, 50, 64
    measured_s = prompts * new / tokens_per_s
    speed = engine_speed(real(f"eval.dtype={dtype}"), CPU_COST)
    prefill = prefill_s(CPU_COST, prompts * prompt_tokens * infer_flops(SMOLLM2, 50), 2, speed)
    decode = decode_s(CPU_COST, SMOLLM2, prompts * new, prompts, prompt_tokens + new / 2, 2, speed)
    assert abs(prefill + decode - measured_s) / measured_s < 0.25, (prefill, decode)


def test_the_tiny_presets_still_decode_at_the_fitted_rate():
    """The tiny presets' ~1,500 new tokens/s (fp32, 2 cores, 2026-11-29): a tiny pass's 100
    prompts x 48 tokens, within 25%."""
    tokens = 100 * 48
    seconds = decode_s(CPU_COST, "tiny-llama", tokens, 100, 80 + 24, 2)
    assert abs(tokens / seconds - 1500) / 1500 < 0.25


def test_the_tiny_grid_calibration_still_holds():
    """bench/plan_calibration.py's idle-box runs of the tiny grid (the 2026-11-29 rows: 7:41,
    5:43, 6:03): the planned makespan within 25% of each."""
    sys.path.insert(0, str(REPO / "bench"))
    from plan_calibration import RECORDED, phases

    idle = [r for r in RECORDED if r[0].startswith("2026-11-29")]
    assert len(idle) == 3
    for label, sets, measured_s, _ in idle:
        ratio = phases(sets, 2)["makespan"] / measured_s
        assert 0.75 < ratio < 1.25, (label, ratio)


def test_bf16_engines_are_planned_faster_on_cpu_and_unchanged_on_gpus():
    """eval.dtype as tbr_ray.engine.resolved_dtype reads it: bf16 speeds a CPU engine's FLOPs
    by the measured factor (auto is fp32 there); a GPU plan's rates are bf16 already."""
    assert engine_speed(real("eval.dtype=bfloat16"), CPU_COST) == CPU_COST.bf16_speedup > 2
    assert engine_speed(real("eval.dtype=auto"), CPU_COST) == 1.0
    fp32, bf16 = (job_seconds(real(f"eval.dtype={d}"), "eval") for d in ("float32", "bfloat16"))
    assert bf16[f"eval {SMOLLM2}"] < 0.6 * fp32[f"eval {SMOLLM2}"]
    from tbr_ray.plan import GPU_COST

    gpu = load_config(REPO / "jobs" / "paper.yaml")
    assert gpu.eval.dtype == "auto" and engine_speed(gpu, GPU_COST) == 1.0


def test_the_local_server_is_a_writer_of_its_own():
    """jobs/real.yaml: the model writes its internal reflections in the engines' actor and its
    external ones through vLLM's OpenAI server, started by the run (52 s on the idle box,
    2026-12-03): two writer jobs, the server's with its start."""
    writes = job_seconds(real(), "write")
    assert set(writes) == {f"write {SMOLLM2}", f"write {SMOLLM2} (server)"}
    assert writes[f"write {SMOLLM2} (server)"] > CPU_COST.server_start_s
    assert writes[f"write {SMOLLM2}"] < CPU_COST.server_start_s


def test_the_real_runs_evaluation_and_makespan_are_planned_near_what_make_real_took():
    """`make real` of 2026-12-03 (idle box, docs/BENCHMARKS.md): evaluation 11 min 16 s (676 s),
    the whole ablation 49 min 05 s. Planned within 35% of each: the evaluation only with vLLM's
    CPU prefix caching counted (the ARC shots prefilled once; without it: 21.5 min), the
    makespan with the training cells planned a little long (bf16 training is not modelled)."""
    cfg = real()
    evaluation = sum(job_seconds(cfg, "eval").values())
    assert abs(evaluation - 676) / 676 < 0.35, evaluation
    makespan = plan_grid(cfg, 2).makespan_s
    assert abs(makespan - 2945) / 2945 < 0.35, makespan
