"""The train stage: DeepSpeed's config and schedule (pure); one DeepSpeed ZeRO-2 + PEFT LoRA
engine in this process (loss falls, base tensors bitwise unchanged); Ray Train on 2 CPU workers
(checkpoints, a killed worker's exact resume).

    flock /work/heavy.lock pytest tests/test_train.py -q
"""

import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tbr_ray.cli import app
from tbr_ray.config import Cell, ConfigError, load_config
from tbr_ray.data import build_mix
from tbr_ray.plan import (
    accumulation_steps,
    global_batch_problems,
    plan_grid,
    planned_steps,
    resolved_train_settings,
    total_steps,
)
from tbr_ray.train import (
    Meter,
    Position,
    Worker,
    _run_epoch,
    _worker_rows,
    build_engine,
    build_lora_model,
    deepspeed_config,
    pad_collate,
    run_training,
    train_micro_step,
    train_scaling_config,
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
    before = ["train.global_batch_size=null", "train.grad_accum_steps=2"]  # 70B on 8 GPUs:
    old = load_config(REPO / "jobs" / "paper.yaml", [*before, "train.gradient_checkpointing=false"])
    assert (planned_steps(old, "llama-2-7b"), planned_steps(old, "llama-2-70b")) == (750, 93)


def test_a_global_batch_that_does_not_divide_is_a_config_error():
    paper = REPO / "jobs" / "paper.yaml"  # 70B cells on 4 GPUs x micro 4 (checkpointing on)
    problem = r"=40 does not split .*llama-2-70b.* multiple of 16"
    (line,) = global_batch_problems(load_config(paper, ["train.global_batch_size=40"]))
    assert re.search(problem, line)
    # The plan refuses it, and every command stops on it before Ray starts, --config-only too.
    assert plan_grid(load_config(paper, ["train.global_batch_size=40"]), 8).problems == [line]
    args = ["validate", str(paper), "--config-only", "--set", "train.global_batch_size=40"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2 and re.search(problem, out.output)
    with pytest.raises(ConfigError, match="Fix: remove train.grad_accum_steps"):
        load_config(paper, ["train.grad_accum_steps=4"])
    cfg = small_config("train.global_batch_size=16")  # tiny: 2 workers x micro 4
    assert accumulation_steps(cfg, world_size=2) == 2
    with pytest.raises(ValueError, match="micro_batch_size x workers = 4 x 8 = 32"):
        accumulation_steps(cfg, world_size=8)


def test_a_training_cell_stays_on_one_node_of_one_gpu_type():
    """ZeRO-3 cells must not straddle nodes or GPU types (issue 20, point 11): a GPU cell's
    workers are strictly packed on one node, each with a GPU and train.cpus_per_worker CPUs,
    on cluster.accelerator_type's GPUs when it is set; CPU cells keep PACK; an explicit
    train.placement_strategy is what it says."""
    paper = REPO / "jobs" / "paper.yaml"
    cfg = load_config(paper, ["cluster.accelerator_type=H100"])
    gpu = train_scaling_config(cfg, resolved_train_settings(cfg, "llama-2-70b")[0])
    assert (gpu.num_workers, gpu.placement_strategy, gpu.accelerator_type) == (
        4,
        "STRICT_PACK",
        "H100",
    )
    assert gpu.total_resources == {"CPU": 32, "GPU": 4, "accelerator_type:H100": 0.004}
    assert train_scaling_config(load_config(paper), 1).accelerator_type is None  # any GPU node
    cpu = train_scaling_config(small_config(), 2)
    assert (cpu.placement_strategy, cpu.use_gpu, cpu.total_resources) == ("PACK", False, {"CPU": 1})
    assert (
        train_scaling_config(small_config("train.placement_strategy=SPREAD"), 2).placement_strategy
        == "SPREAD"
    )


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


def _rates_run(cfg, steps: int) -> list[float]:
    """The learning rate of each of the first `steps` optimizer steps, with the scheduler
    DeepSpeed builds from deepspeed_config (its `_scheduler_from_config`) on a torch AdamW
    made as build_engine makes it."""
    from deepspeed.runtime import lr_schedules

    sched = deepspeed_config(cfg, zero_stage=2, world_size=2)["scheduler"]
    first = sched["params"]["warmup_min_lr"]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=first)
    scheduler = getattr(lr_schedules, sched["type"])(opt, **sched["params"])
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        scheduler.step()  # what engine.step() does at each accumulation boundary
    return rates


@pytest.mark.parametrize("warmup", [0, 1, 3, 4, 10])
def test_deepspeed_schedule_is_the_linear_warm_up_then_constant(warmup):
    """Step s runs at lr x min(1, (s + 1) / warmup_steps): the schedule the trainer had as a
    torch LambdaLR, now from DeepSpeed's config."""
    cfg = small_config(f"train.warmup_steps={warmup}", "train.learning_rate=0.001")
    expected = [0.001 * (min(1.0, (s + 1) / warmup) if warmup else 1.0) for s in range(14)]
    assert _rates_run(cfg, 14) == pytest.approx(expected, rel=1e-12)


def test_two_warm_up_steps_take_three_in_deepspeed():
    """DeepSpeed's WarmupLR warms up over at least 2 steps (docs/FIDELITY.md)."""
    cfg = small_config("train.warmup_steps=2", "train.learning_rate=0.001")
    assert _rates_run(cfg, 4) == pytest.approx([0.0005, 0.00075, 0.001, 0.001], rel=1e-12)


@pytest.fixture
def one_process_group(monkeypatch):
    """torch.distributed with this process as its only rank (gloo), as DeepSpeed needs;
    destroyed afterwards so no other test sees it."""
    import deepspeed
    import deepspeed.comm as dist

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": "29561"}.items():
        monkeypatch.setenv(key, value)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()  # DeepSpeed's own: it also drops the groups DeepSpeed cached


def test_lora_training_lowers_the_loss_and_leaves_base_tensors_bitwise_unchanged(
    tiny_llama, one_process_group
):
    """The worker's model, engine and micro-step (ZeRO-2, one rank) on one fixed batch: the
    loss falls, and every base tensor equals the file's, compared tensor by tensor."""
    from transformers import AutoTokenizer

    cfg = small_config("train.learning_rate=0.01", "train.micro_batch_size=2")
    ids = AutoTokenizer.from_pretrained(tiny_llama)(
        ["How do I bake bread at home?", "I cannot help with making a weapon."]
    )["input_ids"]
    batch = pad_collate({"input_ids": ids, "labels": ids}, pad_id=0)
    before = load_file(str(Path(tiny_llama) / "model.safetensors"))
    torch.manual_seed(0)
    ds_config = deepspeed_config(cfg, zero_stage=2, world_size=1)
    model = build_lora_model(cfg, "tiny-llama", tiny_llama, ds_config)
    engine = build_engine(cfg, model, ds_config)
    losses = [float(train_micro_step(engine, batch).detach()) for _ in range(6)]
    print(f"loss over 6 steps: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.8 * losses[0]
    after = {
        name.replace(".base_layer", ""): tensor
        for name, tensor in model.get_base_model().state_dict().items()
        if "lora_" not in name
    }
    assert set(before) <= set(after)
    changed = [name for name, tensor in before.items() if not torch.equal(after[name], tensor)]
    assert changed == []
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)  # the adapter trained


def test_every_batch_reaches_the_engine_on_the_engines_device(tiny_llama, one_process_group):
    """On a GPU worker the collate builds host tensors while the engine's model sits on
    cuda:local_rank, and DeepSpeed's forward moves no inputs: every cell stopped at micro-step 1
    (issue 20, point 1). The same mismatch on CPU: torch's default device is `meta` while the
    engine's is cpu. The real epoch loop (`_run_epoch`) must hand the model every batch on the
    engine's device."""
    from transformers import AutoTokenizer

    cfg = small_config("train.micro_batch_size=2")
    texts = ["How do I bake bread?", "I cannot help with that.", "Name a colour.", "Blue."]
    ids = AutoTokenizer.from_pretrained(tiny_llama)(texts)["input_ids"]
    ds_config = deepspeed_config(cfg, zero_stage=2, world_size=1)
    model = build_lora_model(cfg, "tiny-llama", tiny_llama, ds_config)
    engine = build_engine(cfg, model, ds_config)
    worker = Worker(cfg, {}, model, engine, [{"input_ids": x, "labels": x} for x in ids], 0, 0,
                    total_steps=2, world=1, worker_nodes="local", output=None, cell_id="c",
                    setup_s={})  # fmt: skip
    seen: list[set] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append({v.device for v in kwargs.values()}), with_kwargs=True
    )
    saved: list = []  # the checkpoints the loop asks for (Ray Train's report is not needed)
    with torch.device("meta"):  # the process's default device is not the engine's
        end, done = _run_epoch(
            worker, Position(), Meter(time.time()), lambda _w, pos, *_: saved.append(pos.step)
        )
    assert (end.step, done, saved) == (2, True, [2])
    assert seen == [{engine.device}] * 2  # both micro-batches, on the engine's device


@pytest.fixture
def undo_zero3_globals():
    """What ZeRO-3 leaves in a process, undone after the test so that later tests see plain
    torch and transformers: transformers' last HfDeepSpeedConfig (a module-global weakref; no
    later from_pretrained may build under zero.Init: transformers' advice for tests), and
    DeepSpeed's memory-efficient linear, which replaces torch.nn.functional.linear for good
    ("This will persist unless manually reset": deepspeed.runtime.zero.partition_parameters)."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    yield
    unset_hf_deepspeed_config()
    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def _losses(cfg, model_path: str, zero: int, batch: dict, steps: int) -> tuple[list[float], bool]:
    """Losses of `steps` micro-steps of the worker's model and engine on one batch, and whether
    any decoder layer checkpoints."""
    torch.manual_seed(0)
    ds_config = deepspeed_config(cfg, zero_stage=zero, world_size=1)
    model = build_lora_model(cfg, "tiny-llama", model_path, ds_config)
    engine = build_engine(cfg, model, ds_config)
    losses = [float(train_micro_step(engine, batch).detach()) for _ in range(steps)]
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    engine.destroy()
    return losses, checkpointing


@pytest.mark.parametrize("zero", [2, 3])
def test_activation_checkpointing_trains_the_same_losses(
    tiny_llama, one_process_group, undo_zero3_globals, zero
):
    """train.gradient_checkpointing recomputes each layer's activations in the backward pass:
    the same losses, step after step, within fp32 tolerance, with LoRA dropout on (the
    recompute replays the forward's RNG state), at ZeRO-2 and at ZeRO-3 (frozen partitioned
    weights inside a recompute: DeepSpeed PR 8130). The memory it saves:
    bench/checkpointing_memory.py (docs/BENCHMARKS.md)."""
    from transformers import AutoTokenizer

    texts = ["How do I bake bread at home?", "I cannot help with making a weapon."]
    ids = AutoTokenizer.from_pretrained(tiny_llama)(texts)["input_ids"]
    batch = pad_collate({"input_ids": ids, "labels": ids}, pad_id=0)
    sets = ["train.learning_rate=0.01", "train.micro_batch_size=2", "train.lora_dropout=0.05"]
    cfgs = [small_config(*sets, f"train.gradient_checkpointing={c}") for c in (False, True)]
    off, on = (_losses(cfg, tiny_llama, zero, batch, steps=4) for cfg in cfgs)
    print(f"ZeRO-{zero} losses without / with checkpointing: {off[0]} / {on[0]}")
    assert (off[1], on[1]) == (False, True)
    assert on[0] == pytest.approx(off[0], rel=1e-5)
    assert on[0][-1] < on[0][0]  # it trained


def test_two_worker_zero2_lora_run(ray_local, tiny_llama, tmp_path):
    cfg = small_config("train.max_steps=4", "train.checkpoint_every_steps=2")
    cell = Cell("tiny-llama", "none", 0.0, 0)
    mix = build_mix(cfg, cell, tiny_llama)
    adapter = run_training(cfg, cell, tiny_llama, mix, tmp_path)
    info = json.loads((adapter / "train_result.json").read_text())
    assert info["workers"] == 2 and info["zero_stage"] == 2 and info["step"] == 4
    assert info["train_tokens_per_s"] > 0
    # The adapter holds only LoRA tensors, with B moved away from PEFT's zero init.
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
