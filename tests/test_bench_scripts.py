"""bench/ scripts that must stay runnable here: the GPU check's CPU dry run, ZeRO-3 loading."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_gpu_lora_mfu_tiny_dry_run_counts_flops_from_the_model():
    """`--tiny` runs the GPU script's exact step (DeepSpeed + PEFT LoRA) on CPU. The FLOPs it
    divides by come from the model it built: its frozen linear weights and LoRA weights must
    equal the counts of the shape, worked out by hand here."""
    args = ["--tiny", "--steps", "2", "--warmup", "1", "--micro", "2", "--seq", "32"]
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_lora_mfu.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MASTER_PORT": "29541"},  # not a port another test's torch uses
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    layers, h, ffn, vocab, r = 2, 256, 688, 1024, 16
    assert res["n_base"] == layers * (4 * h * h + 3 * h * ffn) + h * vocab  # + lm_head
    assert res["n_lora"] == layers * r * (4 * (h + h) + 3 * (h + ffn))
    assert res["flops_per_token"] == 4 * res["n_base"] + 6 * res["n_lora"] + 12 * layers * h * 32
    assert res["tokens_per_s"] > 0 and 0 < res["mfu"] < 1 and res["dtype"] == "float32"


def test_zero3_load_partitions_the_weights_as_they_load():
    """bench/zero3_load.py's sharded way at a tiny size (its figures at 145M parameters:
    docs/BENCHMARKS.md): 2 gloo workers build the trainer's LoRA model for ZeRO-3, each holding
    half of the base weights before DeepSpeed's engine exists (before issue 20: all of them);
    a step with activation checkpointing runs, and its loss equals the saved model's (the
    weights loaded, not left at their initialisation). The bench's own driver runs in this
    process (its imports are paid already); the two workers are processes of their own."""
    sys.path.insert(0, str(REPO / "bench"))
    from zero3_load import measure, parse_args

    args = ["--load", "sharded", "--layers", "1", "--hidden", "128", "--ffn", "256"]
    res = measure(parse_args([*args, "--vocab", "1000"]))
    assert [w["rank"] for w in res["sharded"]] == [0, 1]
    for w in res["sharded"]:
        assert w["held_share"] <= 0.51
        assert w["loss"] == pytest.approx(res["reference_loss"], rel=1e-4)


def test_grid_makespan_counts_each_job_once_and_the_busy_time_as_a_union(tmp_path):
    """bench/grid_makespan.py: an evaluation recorded on each of its cells is one job; busy
    time is the union of job spans (an evaluation beside training is not counted twice)."""
    sys.path.insert(0, str(REPO / "bench"))
    from grid_makespan import busy_seconds, jobs, report

    phases = {
        "m__none__g0.00__s0": {"train": (0, 40), "eval": (40, 60)},
        "m__base__g0.00__s0": {"eval": (40, 61)},  # same evaluation, ended a moment later
        "n__none__g0.00__s0": {"train": (40, 90)},  # trains beside m's evaluation
    }
    for cell, spans in phases.items():
        (tmp_path / "cells" / cell).mkdir(parents=True)
        rec = {k: {"start": s, "end": e} for k, (s, e) in spans.items()}
        (tmp_path / "cells" / cell / "status.json").write_text(
            json.dumps({"cell_id": cell, "phases": rec})
        )
    found = jobs(tmp_path)
    assert [k for k, _, _ in found] == [
        "train:m__none__g0.00__s0",
        "eval:m",
        "train:n__none__g0.00__s0",
    ]
    assert busy_seconds(found) == 90
    text = report(tmp_path, wall_s=100, slots=1)
    assert "work 110 s" in text and "efficiency (ideal / wall): 1.10" in text
    assert "busy (a job running / wall): 0.90" in text


def test_plan_calibration_scales_the_cost_model_to_the_boxs_measured_speed(tmp_path):
    """bench/plan_calibration.py --run: the run's mean training tokens/s over the fitted 16k
    is the box's speed; a slower box gets a longer predicted makespan."""
    sys.path.insert(0, str(REPO / "bench"))
    from plan_calibration import box_speed, phases

    for cell, tps in (("a", 8_000.0), ("b", 12_000.0)):
        (tmp_path / "adapters" / cell).mkdir(parents=True)
        (tmp_path / "adapters" / cell / "train_result.json").write_text(
            json.dumps({"train_tokens_per_s": tps})
        )
    assert box_speed(tmp_path) == 10_000 / 16_000
    fitted, slow = phases([], 2), phases([], 2, speed=0.5)
    assert slow["train"] > fitted["train"] and slow["makespan"] > fitted["makespan"]


def test_activation_memory_measured_on_cpu_matches_the_planners_count():
    """bench/activation_memory.py on a small real-architecture model (Llama-3 shaped, GQA,
    bf16, PEFT LoRA with dropout, a padded micro-batch; docs/BENCHMARKS.md has all four):
    the tensors autograd saves in one layer equal tbr_ray.plan.sizing's count within 1%;
    the peak of forward + backward is within 10% of the count without checkpointing and
    within 25% with it (the recompute's workspace is a measured constant), and
    checkpointing lowers the peak."""
    import argparse

    sys.path.insert(0, str(REPO / "bench"))
    from activation_memory import measure

    args = argparse.Namespace(layers=2, micro=2, seq=64, census=False)
    res = measure("llama-3-shaped", args)  # in this process: torch is imported once
    assert abs(res["layer_error"]) < 0.01, res
    assert abs(res["no_checkpointing"]["error"]) < 0.10, res
    assert abs(res["checkpointing"]["error"]) < 0.25, res
    assert res["checkpointing"]["peak_mib"] < res["no_checkpointing"]["peak_mib"], res
