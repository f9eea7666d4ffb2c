"""Ray Train + DeepSpeed ZeRO-2 + PEFT LoRA on 2 CPU workers: LoRA weights move, base does not."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tbr_ray.config import Cell, ConfigError, load_config
from tbr_ray.data import build_mix
from tbr_ray.train import (
    _worker_rows,
    accumulation_steps,
    deepspeed_config,
    pad_collate,
    planned_steps,
    resolved_train_settings,
    run_training,
    total_steps,
)

from .conftest import REPO, small_config


def test_deepspeed_config_is_pure_and_consistent():
    cfg = small_config("train.grad_accum_steps=2")
    ds = deepspeed_config(cfg, zero_stage=2, world_size=2)
    assert ds["train_batch_size"] == 4 * 2 * 2 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False
    assert total_steps(cfg, n_rows=32, world=2) == 2  # 32/2/4 = 4 micro -> 2 steps (max 3)


def test_global_batch_size_gives_every_paper_model_the_same_steps():
    """1-GPU and 8-GPU cells take the same optimizer steps of the same global batch; before,
    at grad_accum_steps 2, a 7B cell took 750 steps of 8 and a 70B cell 93 of 64."""
    cfg = load_config(REPO / "jobs" / "paper.yaml")
    workers = {m: resolved_train_settings(cfg, m)[0] for m in cfg.grid.models}
    assert len(set(workers.values())) >= 3  # 1, 4 and 8 GPUs on 80 GiB cards (tbr_ray.plan)
    assert {planned_steps(cfg, m) for m in cfg.grid.models} == {186}  # 2,000 rows, 3 epochs
    for w in set(workers.values()):
        ds = deepspeed_config(cfg, zero_stage=2, world_size=w)
        assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 32 // (4 * w)
    old = load_config(
        REPO / "jobs" / "paper.yaml", ["train.global_batch_size=null", "train.grad_accum_steps=2"]
    )
    assert (planned_steps(old, "llama-2-7b"), planned_steps(old, "llama-2-70b")) == (750, 93)


def test_a_global_batch_that_does_not_divide_is_a_config_error():
    paper = REPO / "jobs" / "paper.yaml"
    with pytest.raises(ConfigError, match=r"=48 does not split .*llama-2-70b.* multiple of 32"):
        load_config(paper, ["train.global_batch_size=48"])
    with pytest.raises(ConfigError, match="Fix: remove train.grad_accum_steps"):
        load_config(paper, ["train.grad_accum_steps=4"])
    cfg = small_config("train.global_batch_size=16")  # tiny: 2 workers x micro 4
    assert accumulation_steps(cfg, world_size=2) == 2
    with pytest.raises(ValueError, match="micro_batch_size x workers = 4 x 8 = 32"):
        accumulation_steps(cfg, world_size=8)


def test_pad_collate_masks_padding():
    b = pad_collate({"input_ids": [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [8]]}, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_workers_split_the_mix_evenly_and_the_same_way_every_time():
    import pyarrow as pa

    table = pa.table({"input_ids": [[i, i] for i in range(7)], "labels": [[i] for i in range(7)]})
    parts = [_worker_rows(table, rank, 2) for rank in range(2)]
    assert [len(p) for p in parts] == [4, 3]
    assert sorted(r["labels"][0] for p in parts for r in p) == list(range(7))  # each row once
    assert parts[1] == _worker_rows(table, 1, 2)


def test_two_worker_zero2_lora_run(ray_local, tiny_llama, tmp_path):
    cfg = small_config("train.max_steps=4", "train.checkpoint_every_steps=2")
    cell = Cell("tiny-llama", "none", 0.0, 0)
    mix = build_mix(cfg, cell, tiny_llama)
    adapter = run_training(cfg, cell, tiny_llama, mix, tmp_path)
    info = json.loads((adapter / "train_result.json").read_text())
    assert info["workers"] == 2 and info["zero_stage"] == 2 and info["step"] == 4
    assert info["train_tokens_per_s"] > 0
    # Base weights: the checksum of frozen parameters is unchanged inside the workers ...
    assert info["base_unchanged"] is True
    # ... and the adapter holds only LoRA tensors, with B moved away from PEFT's zero init.
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) > 0 for v in lora_b)
    saved = json.loads((adapter / "run_config.json").read_text())
    assert saved["train"]["zero_stage"] == 2
    # Rerunning a finished cell trains nothing: the published adapter is returned as is.
    mtime = (adapter / "train_result.json").stat().st_mtime
    assert run_training(cfg, cell, tiny_llama, mix, tmp_path) == adapter
    assert (adapter / "train_result.json").stat().st_mtime == mtime


def _kill_a_worker_after_checkpoints(storage: Path, n_checkpoints: int, killed: list) -> None:
    """SIGKILL one Ray Train worker of this test's Ray instance once the run holds
    `n_checkpoints` checkpoints (so the restarted group has one to resume from)."""
    import psutil

    deadline = time.time() + 600
    while time.time() < deadline:
        if len(list(storage.glob("train-*/checkpoint_*"))) >= n_checkpoints:
            for proc in psutil.Process().children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(proc.cmdline()):
                        proc.kill()
                        killed.append(proc.pid)
                        return
                except psutil.NoSuchProcess:
                    continue
        time.sleep(0.05)


def test_worker_killed_mid_epoch_resumes_to_the_same_result(ray_local, tiny_llama, tmp_path):
    """The worker group restarts from the last checkpoint, with optimizer, LR schedule and RNG
    state, and ends where the uninterrupted run ends; the resume is recorded."""
    cfg = small_config(
        "data.n_general=56",
        "train.epochs=2",
        "train.max_steps=12",
        "train.checkpoint_every_steps=2",
        "train.warmup_steps=4",
        "train.lora_dropout=0.1",  # RNG state matters: dropout masks continue, not restart
        "train.max_failures=2",
    )
    cell = Cell("tiny-llama", "none", 0.0, 0)
    mix = build_mix(cfg, cell, tiny_llama)
    whole = run_training(cfg, cell, tiny_llama, mix, tmp_path / "whole")
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_a_worker_after_checkpoints,
        args=(tmp_path / "killed" / "ray_train", 3, killed),
        daemon=True,
    )
    killer.start()
    resumed = run_training(cfg, cell, tiny_llama, mix, tmp_path / "killed")
    killer.join(timeout=1)
    assert killed, "no worker was killed: the run ended before its third checkpoint"
    a = json.loads((whole / "train_result.json").read_text())
    b = json.loads((resumed / "train_result.json").read_text())
    assert a["resumes"] == [] and a["step"] == b["step"] == 12
    (resume,) = b["resumes"]
    assert 0 < resume["from_step"] < 12 and resume["restored"] == "optimizer, scheduler, rng"
    wa = load_file(str(whole / "adapter_model.safetensors"))
    wb = load_file(str(resumed / "adapter_model.safetensors"))
    diff = max(float((wb[k] - v).abs().max()) for k, v in wa.items())
    print(
        f"resumed from step {resume['from_step']}: loss {b['loss']} vs {a['loss']}, "
        f"largest LoRA weight difference {diff:.2e}"
    )  # a weights-only resume: 0.12
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert not (resumed / "resume").exists()  # training state is not published with the adapter
