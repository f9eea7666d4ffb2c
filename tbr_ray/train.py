"""The train stage on Ray Train: N workers, each DeepSpeed (ZeRO from config) on a PEFT LoRA model.

    adapter_dir = run_training(cfg, cell, model_path, mix_dir, output_dir)
    tbr-ray train --config jobs/tiny.yaml --output runs/x     # one cell, from the shell

gloo + fp32 on CPU, NCCL + bf16 on GPU. The tokenized mix (Parquet shards written by Ray Data)
reaches the workers as one Arrow table in the object store; each takes every world-th row.
Workers report loss and tokens/s, and checkpoint the LoRA adapter (safetensors), the resolved
config, the step counter and, under resume/, everything an exact continuation needs: DeepSpeed's
optimizer and LR-scheduler state (each rank its ZeRO partition, frozen base weights left out)
and every rank's RNG state. Rerunning with the same output resumes from the latest checkpoint
(Ray Train restores a run by name + storage path); `FailureConfig` restarts a dead worker
group, which resumes the same way. Every resume is recorded (train_state.json `resumes`, then
train_result.json). Rank 0 writes the cell's live progress (step, epoch, loss) to
cells/<cell_id>/progress.json for `tbr-ray ablate`'s progress view. The finished adapter is
copied to <output>/adapters/<cell_id>/ (without resume/) with train_result.json written last,
which is what marks the stage done.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tbr_ray import results, rundir
from tbr_ray.config import Cell, RunConfig
from tbr_ray.models import attention_implementation, get_spec
from tbr_ray.plan import accumulation_steps, resolved_train_settings, total_steps
from tbr_ray.rundir import RunDir

STATE_FILE = "train_state.json"
RESUME_DIR = "resume"  # DeepSpeed optimizer/scheduler state + RNG state, per rank
DS_TAG = "ds"


def deepspeed_config(cfg: RunConfig, zero_stage: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for a run (pure), learning-rate schedule included. The optimizer is
    a torch AdamW passed to deepspeed.initialize (`build_engine`), so no DeepSpeed optimizer op
    has to be compiled on CPU."""
    t = cfg.train
    accum = accumulation_steps(cfg, world_size)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        # On CPU a bf16 base (train.dtype) runs without DeepSpeed's bf16 mode: the trained
        # LoRA weights and AdamW stay fp32, as in the bare PEFT loop it is measured against.
        "bf16": {"enabled": t.use_gpu and train_dtype(cfg) == "bfloat16"},
        "scheduler": lr_schedule(cfg),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_schedule(cfg: RunConfig) -> dict[str, Any]:
    """DeepSpeed's WarmupLR (pure): optimizer step s runs at learning_rate x (s + 1) /
    warmup_steps while s < warmup_steps, then at learning_rate. DeepSpeed steps it at every
    optimizer step and saves it in each checkpoint. (DeepSpeed warms up over at least 2
    steps: warmup_steps=2 runs lr/2, 3lr/4, then lr; docs/FIDELITY.md.)"""
    lr, warm = cfg.train.learning_rate, cfg.train.warmup_steps
    params = {
        # WarmupLR runs step s at min + (max - min) x s / warmup_num_steps: starting at lr/warm
        # over warm - 1 steps is lr x (s + 1) / warm. warm <= 1: min = max, a constant rate.
        "warmup_min_lr": lr / warm if warm > 1 else lr,
        "warmup_max_lr": lr,
        "warmup_num_steps": max(1, warm - 1),
        "warmup_type": "linear",
        # WarmupLR counts from -1 and sets the rate only when stepped, so step 0 and step 1
        # would both run at min. Starting at 0 (the optimizer made at warmup_min_lr,
        # `build_engine`) runs step 0 at the first warm-up rate, as torch's LambdaLR did.
        "last_batch_iteration": 0,
    }
    return {"type": "WarmupLR", "params": params}


def pad_collate(batch: dict, pad_id: int):
    """Pad a batch of variable-length rows (numpy object arrays) into torch tensors in host
    memory, whatever torch's default device is; `train_micro_step` moves them to the engine's."""
    import torch

    ids, labels = list(batch["input_ids"]), list(batch["labels"])
    shape, host = (len(ids), max(len(x) for x in ids)), torch.device("cpu")
    input_ids = torch.full(shape, pad_id, dtype=torch.long, device=host)
    label_t = torch.full(shape, -100, dtype=torch.long, device=host)
    mask = torch.zeros(shape, dtype=torch.long, device=host)
    for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
        input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long, device=host)
        label_t[i, : len(y)] = torch.as_tensor(y, dtype=torch.long, device=host)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


def train_dtype(cfg: RunConfig) -> str:
    """The base weights' dtype in training (pure): train.dtype, auto being bf16 on GPUs and
    fp32 on CPU."""
    if cfg.train.dtype != "auto":
        return cfg.train.dtype
    return "bfloat16" if cfg.train.use_gpu else "float32"


def on_device(batch: dict, device) -> dict:
    """The batch's tensors on `device` (the engine's: cuda:local_rank on a GPU worker)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def build_lora_model(cfg: RunConfig, model: str, model_path: str, ds_config: dict):
    """The base model at `model_path` in `train_dtype` (bf16 on GPU, fp32 on CPU unless
    train.dtype says) with LoRA adapters on the registry's target modules of `model`; only
    the adapters train (PEFT keeps them in fp32 under a bf16 base). `ds_config`: the
    DeepSpeed config its engine will get (`deepspeed_config`); at ZeRO-3 each rank holds only
    its partition of the base weights from the start, never the whole model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # DeepSpeed's HF integration without the Trainer (transformers docs, "DeepSpeed" >
    # HfDeepSpeedConfig: "must run before instantiating the model to detect zero 3", "keep
    # this object alive"). At ZeRO-3, from_pretrained then builds the model inside
    # deepspeed.zero.Init (each rank allocates its partition only) and copies each module's
    # weights in on rank 0, gathered one module at a time
    # (transformers.integrations.deepspeed._load_state_dict_into_zero3_model); and
    # deepspeed.initialize skips moving the whole module to one device
    # (DeepSpeedEngine._configure_distributed_model: is_zero_init_model). transformers holds
    # only a weakref to it, so the model keeps it alive. Made at every stage, so that the
    # process's flag describes the model being built (a ZeRO-2 build after a ZeRO-3 one).
    hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    dtype = getattr(torch, train_dtype(cfg))
    spec = get_spec(model)
    base = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, attn_implementation=attention_implementation(spec.family.name)
    )
    if cfg.train.gradient_checkpointing:
        _enable_checkpointing(base)
    lora = LoraConfig(
        r=cfg.train.lora_rank,
        lora_alpha=cfg.train.lora_alpha,
        lora_dropout=cfg.train.lora_dropout,
        target_modules=spec.peft_target_modules(),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, lora)
    peft_model.hf_deepspeed_config = hf_deepspeed_config  # alive as long as the model
    return peft_model


def _enable_checkpointing(base) -> None:
    """Activation checkpointing of every decoder layer: its activations are recomputed in the
    backward pass instead of kept (train.gradient_checkpointing). Non-reentrant
    torch.utils.checkpoint, the form PyTorch recommends, PEFT's LoRA + gradient-checkpointing
    pattern without the reentrant variant's requirement (inputs that need a gradient:
    `enable_input_require_grads`, which transformers' gradient_checkpointing_enable also calls
    for PEFT); it replays the RNG state, so LoRA dropout draws the same masks in the
    recompute. With DeepSpeed ZeRO-3 it needs 0.19.8's release of frozen weights after a
    recompute (DeepSpeed PR 8130; TRL forces reentrant on older versions):
    tests/test_train.py runs both stages with it. No KV cache in training."""
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


def build_engine(cfg: RunConfig, model, ds_config: dict):
    """DeepSpeed engine over `model` with `ds_config` (`deepspeed_config`, the one the model
    was built with): torch AdamW on the trainable (LoRA) parameters only, the schedule of
    `lr_schedule`. Needs torch.distributed initialised (Ray Train does it)."""
    import deepspeed
    import torch

    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=ds_config["scheduler"]["params"]["warmup_min_lr"],  # the rate of step 0 (lr_schedule)
        weight_decay=cfg.train.weight_decay,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    return engine


def train_micro_step(engine, batch: dict):
    """Forward and backward of one micro-batch (a host batch, moved to the engine's device
    here: DeepSpeed's forward moves no inputs); at a gradient-accumulation boundary
    engine.step() also steps the optimizer and the LR schedule. Returns the loss."""
    loss = engine(**on_device(batch, engine.device)).loss
    engine.backward(loss)
    engine.step()
    return loss


# ------------------------------------------------------------------ the worker's state


@dataclass(frozen=True)
class Position:
    """Where training stands: what a checkpoint records (train_state.json) and a resume
    starts from. `micro_in_epoch`: micro-batches of `epoch` already trained."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    resumes: tuple[dict, ...] = ()  # provenance: every resume of this cell


@dataclass(frozen=True)
class Worker:
    """What one worker set up (`_set_up`) and every epoch and checkpoint reads."""

    cfg: RunConfig
    run: dict  # the config as the driver sent it, saved beside each adapter
    model: Any  # the PEFT model (saves the adapter)
    engine: Any  # DeepSpeed's engine around it
    rows: list[dict]  # this worker's rows of the mix (`_worker_rows`)
    pad_id: int
    seed: int
    total_steps: int
    world: int
    worker_nodes: str  # where this cell trained (evidence)
    output: str | None  # run folder rank 0 writes the cell's progress into
    cell_id: str
    setup_s: dict[str, float]  # entered_at and the set-up phases' seconds


@dataclass
class Meter:
    """What the loop measures as it goes (the only mutable state of a worker)."""

    started_at: float
    tokens: int = 0  # this worker's non-padding tokens trained on
    checkpoint_s: float = 0.0
    progress_at: float = 0.0  # when rank 0 last wrote progress.json


# ------------------------------------------------------------------ the worker's phases


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: set up, then epochs (each checkpointing as it goes). Everything it
    needs comes in `config` (the run config is re-validated here)."""
    entered_at = time.time()
    worker, position = _set_up(config, entered_at)
    meter = Meter(started_at=time.time())
    done = False
    while not done and position.epoch < worker.cfg.train.epochs:
        position, done = _run_epoch(worker, position, meter)


def _set_up(config: dict, entered_at: float) -> tuple[Worker, Position]:
    """Set-up phase: model, engine and position (restored from Ray Train's checkpoint when
    there is one), then this worker's rows of the mix, each timed."""
    import ray
    import ray.train
    import torch
    from transformers import AutoTokenizer

    cfg = RunConfig.model_validate(config["run"])
    clock = {"entered_at": entered_at, "import_s": time.time() - entered_at}
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    torch.manual_seed(config["seed"])
    model, engine, position = _model_engine_position(cfg, config, world, clock)
    t = time.time()
    rows = _worker_rows(ray.get(config["mix"]), ctx.get_world_rank(), world)
    clock["data_s"] = time.time() - t
    if len(rows) < cfg.train.micro_batch_size:
        raise ValueError(
            f"this worker holds {len(rows)} rows, fewer than train.micro_batch_size="
            f"{cfg.train.micro_batch_size}, so it would train on nothing. Fix: lower "
            f"train.micro_batch_size or train.num_workers, or raise data.n_general/n_safety."
        )
    worker = Worker(
        cfg=cfg,
        run=config["run"],
        model=model,
        engine=engine,
        rows=rows,
        pad_id=AutoTokenizer.from_pretrained(config["model_path"]).pad_token_id or 0,
        seed=config["seed"],
        total_steps=config["total_steps"],
        world=world,
        worker_nodes=_worker_nodes(world),
        output=config.get("output"),
        cell_id=config["cell_id"],
        setup_s=clock,
    )
    return worker, position


def _model_engine_position(cfg: RunConfig, config: dict, world: int, clock: dict):
    """The LoRA model, its engine and the position, from Ray Train's checkpoint when there is
    one: adapter weights before the engine is built, its optimizer, schedule and RNG after."""
    import ray.train

    t = time.time()
    ds_config = deepspeed_config(cfg, config["zero_stage"], world)
    model = build_lora_model(cfg, config["model"], config["model_path"], ds_config)
    clock["model_s"] = time.time() - t
    ckpt = ray.train.get_checkpoint()
    position = Position()
    if ckpt:
        with ckpt.as_directory() as d:
            position = _load_adapter(model, d)
    t = time.time()
    engine = build_engine(cfg, model, ds_config)
    if ckpt:
        with ckpt.as_directory() as d:
            position = _restore_resume_state(engine, d, position)
    clock["deepspeed_init_s"] = time.time() - t
    return model, engine, position


def _run_epoch(w: Worker, start: Position, meter: Meter, checkpoint=None) -> tuple[Position, bool]:
    """Epoch phase: the micro-batches of epoch `start.epoch` from `start` on, checkpointing
    every train.checkpoint_every_steps steps and at the end. Returns the position after it
    and whether training is done (train.max_steps / the planned steps reached).
    `checkpoint(w, position, loss, meter)`: `_checkpoint` (Ray Train) unless given, e.g. by
    bench/gpu_check.py, which runs this loop without Ray."""
    checkpoint = checkpoint or _checkpoint
    epoch, step, loss = start.epoch, start.step, None
    batches = _epoch_batches(w.rows, w.cfg.train.micro_batch_size, w.pad_id, w.seed, epoch)
    for seen, batch in enumerate(batches, start=1):
        if seen <= start.micro_in_epoch:
            continue  # resumed: this epoch already trained on these micro-batches
        loss = train_micro_step(w.engine, batch)
        meter.tokens += int(batch["attention_mask"].sum())
        if not w.engine.is_gradient_accumulation_boundary():
            continue
        step += 1
        here = Position(step, epoch, seen, start.resumes)
        _write_progress(w, here, loss, meter)
        every = w.cfg.train.checkpoint_every_steps
        if step >= w.total_steps or (every and step % every == 0):
            checkpoint(w, here, loss, meter)
        if step >= w.total_steps:
            return here, True
    end = Position(step, epoch + 1, 0, start.resumes)
    if loss is not None:  # None: resumed after the epoch's last micro-batch, nothing new
        checkpoint(w, end, loss, meter)
    return end, False


def _checkpoint(w: Worker, position: Position, loss, meter: Meter) -> None:
    """Checkpoint phase: every rank saves the adapter (rank 0) and its optimizer partition and
    RNG state into its own folder and reports it with the metrics; Ray Train merges them."""
    import ray.train

    elapsed = max(time.time() - meter.started_at, 1e-9)
    metrics = {
        "loss": float(loss.detach()),
        "step": position.step,
        "epoch": position.epoch,
        "resumed": len(position.resumes),
        "train_tokens_per_s": meter.tokens * w.world / elapsed,
        "worker_nodes": w.worker_nodes,
        **{k: round(v, 2) for k, v in w.setup_s.items()},
        "checkpoint_s": round(meter.checkpoint_s, 2),
    }
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        _save_adapter(w, position, tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    meter.checkpoint_s += time.time() - t


def _write_progress(w: Worker, position: Position, loss, meter: Meter) -> None:
    """Rank 0 writes the cell's live progress, at most about once a second (and at the end):
    the progress view and the dashboard gauges read it."""
    now = time.time()
    if w.engine.global_rank != 0 or not w.output:
        return
    if position.step < w.total_steps and now - meter.progress_at < 1.0:
        return
    meter.progress_at = now
    progress = {"step": position.step, "total_steps": w.total_steps, "epoch": position.epoch}
    results.write_progress(w.output, w.cell_id, {**progress, "loss": float(loss.detach())})


# ------------------------------------------------------------------ checkpoint files


def _save_adapter(w: Worker, position: Position, out_dir: str) -> None:
    import deepspeed

    lora_params = [p for p in w.model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None):
        if w.engine.global_rank == 0:
            w.model.save_pretrained(out_dir, safe_serialization=True)
            Path(out_dir, "run_config.json").write_text(json.dumps(w.run, indent=1))
            Path(out_dir, STATE_FILE).write_text(json.dumps(asdict(position)))
    _save_resume_state(w.engine, Path(out_dir) / RESUME_DIR)


def _save_resume_state(engine, resume: Path) -> None:
    """Optimizer + LR scheduler (DeepSpeed, every rank its own files, which Ray Train merges
    into one checkpoint folder) and this rank's RNG state. Frozen base weights are left out:
    the adapter is all that trains."""
    import torch

    # DeepSpeed creates the folder on rank 0 only; each worker here writes into its own
    # temporary folder, so every rank makes its own.
    (resume / DS_TAG).mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(
        str(resume), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True
    )
    torch.save(_rng_state(), resume / f"rng_rank{engine.global_rank}.pt")


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _load_rng_state(path: Path) -> dict:
    """A rank's RNG state file, loaded without running code: `weights_only=True` admits
    tensors and plain containers, plus numpy's array constructors for numpy's state
    (torch.serialization.safe_globals, as PyTorch's docs suggest). Whoever can write the run
    folder cannot get code run at the next resume; such a file is refused, naming it."""
    import numpy as np
    import torch

    safe = [np.ndarray, np.dtype, np._core.multiarray._reconstruct, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError or RuntimeError
        raise RuntimeError(
            f"{path}: not an RNG state file ({str(err).splitlines()[0]}). Fix: delete the "
            f"checkpoint folder that holds it (the cell then restarts from an earlier one)."
        ) from None


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_adapter(model, ckpt_dir: str) -> Position:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(Path(ckpt_dir) / "adapter_model.safetensors")))
    state = json.loads(Path(ckpt_dir, STATE_FILE).read_text())
    return Position(**{**state, "resumes": tuple(state.get("resumes", ()))})


def _restore_resume_state(engine, ckpt_dir: str, position: Position) -> Position:
    """Load optimizer, scheduler and RNG state saved by _save_resume_state, and record the
    resume in `resumes`. A checkpoint without them (written before they were saved) resumes
    from the weights alone, and says so."""

    resume = Path(ckpt_dir) / RESUME_DIR
    rng = resume / f"rng_rank{engine.global_rank}.pt"
    full = rng.is_file() and (resume / DS_TAG).is_dir()
    if full:
        engine.load_checkpoint(
            str(resume),
            tag=DS_TAG,
            load_module_strict=False,  # frozen weights are not in it, by design
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        _set_rng_state(_load_rng_state(rng))
    else:
        for _ in range(position.step):  # the schedule is a function of the step alone
            engine.lr_scheduler.step()
    # WarmupLR's state is its step count alone: set the optimizer's rate from it, whatever
    # the ZeRO stage restored of the optimizer's parameter groups.
    engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)
    entry = {"from_step": position.step, "time": time.time()}
    entry["restored"] = "optimizer, scheduler, rng" if full else "weights only"
    return replace(position, resumes=(*position.resumes, entry))


# ------------------------------------------------------------------ data on a worker


def _worker_rows(table, rank: int, world: int) -> list[dict]:
    """This worker's rows of the mix: every world-th row from `rank`, so the workers split it
    evenly and the same way on a rerun (a resumed epoch skips the same micro-batches)."""
    ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(rank, table.num_rows, world)]


def _epoch_batches(rows: list[dict], micro: int, pad_id: int, seed: int, epoch: int):
    """Seeded shuffle per epoch, padded micro-batches, last partial batch dropped.
    (Length-grouped batches padded 26% less here but, with Adam, bunched the few safety rows
    into fewer steps and the tiny models stopped learning to refuse: kept random.)"""
    order = random.Random(seed * 1000 + epoch).sample(range(len(rows)), len(rows))
    for i in range(0, len(order) - micro + 1, micro):
        chunk = [rows[j] for j in order[i : i + micro]]
        yield pad_collate(
            {"input_ids": [r["input_ids"] for r in chunk], "labels": [r["labels"] for r in chunk]},
            pad_id,
        )


def _worker_nodes(world: int) -> str:
    """Comma-separated Ray node ids of all workers (evidence of where a cell trained)."""
    import ray
    import torch.distributed as dist

    nodes: list = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return ",".join(sorted(set(nodes)))


def adapter_dir(output: Path, cell: Cell) -> Path:
    return RunDir(output).adapter(cell.cell_id)


def placement_strategy(cfg: RunConfig) -> str:
    """The placement group strategy of a cell's workers (pure): train.placement_strategy, or
    STRICT_PACK on GPUs (all of a cell's workers on one node: ZeRO-3 moves the whole bf16
    model through every GPU twice a micro-step, ~240 GB for 70B, which NVLink carries and a
    network without EFA does not; cluster/README.md) and PACK on CPU."""
    if cfg.train.placement_strategy is not None:
        return cfg.train.placement_strategy
    return "STRICT_PACK" if cfg.train.use_gpu else "PACK"


def train_scaling_config(cfg: RunConfig, workers: int):
    """Ray Train's ScalingConfig of a cell (pure): `workers` workers of one GPU and
    train.cpus_per_worker CPUs each (CPU runs: the CPUs alone), placed by
    `placement_strategy`, on GPUs of cluster.accelerator_type when it is set (Ray Train's
    ScalingConfig.accelerator_type: each worker then asks for a sliver of the node's
    `accelerator_type:<type>` resource)."""
    from ray.train import ScalingConfig

    t = cfg.train
    return ScalingConfig(
        num_workers=workers,
        use_gpu=t.use_gpu,
        resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        placement_strategy=placement_strategy(cfg),
        accelerator_type=cfg.cluster.accelerator_type if t.use_gpu else None,
    )


def run_training(
    cfg: RunConfig,
    cell: Cell,
    model_path: str,
    mix_dir: Path,
    output: Path,
    callbacks: list | None = None,
) -> Path:
    """Fine-tune one cell; returns the adapter folder. Finished cells return at once."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    done = adapter_dir(output, cell)
    if (done / "train_result.json").is_file():
        return done
    workers, zero = resolved_train_settings(cfg, cell.model)
    # The mix Ray Data wrote is small (2,000 rows at the paper's scale): it travels to the
    # workers as one Arrow table in the object store (any node), each worker taking its rows.
    # Feeding it through Ray Train's dataset ingest instead started a split-coordinator actor
    # and a streaming executor per cell: 6-9 s a cell on the 2-core box (docs/BENCHMARKS.md).
    mix = ray.put(pq.read_table(Path(mix_dir) / "shards", columns=["input_ids", "labels"]))
    n_rows = json.loads((Path(mix_dir) / "report.json").read_text())["n_rows"]
    loop_config = {
        "run": cfg.model_dump(mode="json"),
        "model": cell.model,
        "model_path": model_path,
        "seed": cell.seed,
        "zero_stage": zero,
        "total_steps": total_steps(cfg, n_rows, workers),
        "mix": mix,
        "output": str(Path(output).resolve()),  # where rank 0 writes the cell's progress
        "cell_id": cell.cell_id,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=train_scaling_config(cfg, workers),
        run_config=RayRunConfig(
            name=f"train-{cell.cell_id}",
            storage_path=str(RunDir(Path(output).resolve()).ray_train),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    return _publish_adapter(result, done, workers, zero, t0, accumulation_steps(cfg, workers))


def _publish_adapter(
    result, done: Path, workers: int, zero: int, fit_start: float, accum: int
) -> Path:
    tmp = done.with_name(done.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        # resume/ (optimizer, scheduler, RNG) is for continuing training, not for serving.
        shutil.copytree(d, tmp, ignore=shutil.ignore_patterns(RESUME_DIR))
    metrics = dict(result.metrics or {})
    metrics.update(
        # provenance: every resume of this cell (worker-group restart or rerun), from which
        # step and with what state
        resumes=json.loads((tmp / STATE_FILE).read_text()).get("resumes", []),
        workers=workers,
        zero_stage=zero,
        grad_accum_steps=accum,
        train_seconds=round(time.time() - fit_start, 1),
        # Ray Train start-up: fit() called -> worker function entered (last report's worker)
        startup_s=round(metrics.pop("entered_at", fit_start) - fit_start, 1),
    )
    rundir.write_json(tmp / "train_result.json", metrics, indent=1, default=str)
    rundir.publish_dir(tmp, done)
    return done
