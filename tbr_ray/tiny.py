"""Tiny presets built locally: a byte-level BPE tokenizer trained on the shipped Alpaca text and
a brief pre-training of every parameter, no hub needed; and `resolve_model`, which turns a
model name into a loadable location (building a tiny preset when it is one).

    tbr-ray build-models                                      # every tiny preset, cached
    path = resolve_model("tiny-llama", cache_dir, data_root)  # local HF folder, built if needed
    build_tiny_model(spec, cache_dir, data_root)              # any ModelSpec with `arch` set

The registry (tbr_ray.models) says what a preset is; this module makes it. Callers pass the data
root (`cfg.data.resolved_root()`), so nothing here reads the run config.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from tbr_ray.keys import content_key
from tbr_ray.models import (
    TINY_VOCAB,
    ModelSpec,
    format_prompt,
    get_spec,
    hub_repo,
)

PRETRAIN = dict(steps=400, batch_size=16, seq_len=128, lr=3e-3, vocab_size=TINY_VOCAB)


# What a pinned snapshot fetches: config, safetensors weights, tokenizer files (not the .bin
# or original/*.pth copies some repos also hold).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve_model(
    name: str, cache_dir: Path, data_root: Path, seed: int = 0, revisions: dict | None = None
) -> str:
    """A loadable model location: tiny presets are built (or found cached) under cache_dir,
    pre-trained on text under data_root (the run's `data.root`); packaged real models are
    built from their GGUF file (tbr_ray.packaged); a hub model (paper models,
    hub ids) is the local snapshot of the commit `revisions` (grid.hub_revisions) pins it to,
    so every loader reads that commit; paths stay paths."""
    repo = hub_repo(name)
    if repo is not None:
        return pinned_snapshot(name, repo, (revisions or {}).get(name))
    spec = get_spec(name)
    if spec.tiny:
        return str(build_tiny_model(spec, cache_dir, data_root, seed=seed))
    if spec.packaged is not None:
        from tbr_ray.packaged import build_packaged_model

        return str(build_packaged_model(spec, cache_dir))
    return name


def pinned_snapshot(name: str, repo: str, revision: str | None) -> str:
    """The folder of `repo` at commit `revision` in the Hugging Face cache ($HF_HOME, shared
    by the cluster's nodes), downloaded once (huggingface_hub.snapshot_download); every
    loader (transformers, PEFT, vLLM) then reads that folder. Unpinned: ValueError."""
    if revision is None:
        raise ValueError(unpinned_message(name, repo))
    from huggingface_hub import snapshot_download

    return snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES)


def unpinned_message(name: str, repo: str) -> str:
    return (
        f"{name} loads {repo} from the Hugging Face hub without a pinned commit, so a later "
        f"push to that repo would change results unseen. Fix: add `{name}: <its 40-hex "
        "commit, from the repo's history page>` under grid.hub_revisions in the job YAML."
    )


def _pretrain_corpus(data_root: Path) -> list[str]:
    """General text the tiny presets are pre-trained on: the shipped Alpaca rows in the Alpaca
    template, so a tiny "base model" has seen the prompt format and answers in English-like
    text (a real base model has seen far more). It never sees a refusal."""
    texts = []
    for rel in (
        "alpaca-subsets/gumbelsoft/alpaca_data.json",
        "alpaca-subsets/bloom-lora/alpaca_data_1k.json",
    ):
        for row in json.loads((data_root / rel).read_text()):
            if row.get("instruction") and row.get("output"):
                texts.append(
                    format_prompt(row["instruction"], row.get("input") or "") + row["output"]
                )
    return texts


def tiny_build_key(spec: ModelSpec, seed: int, corpus: list[str]) -> str:
    return content_key(
        {
            "arch": spec.arch,
            "pretrain": PRETRAIN,
            "seed": seed,
            "corpus": hashlib.sha256("\n".join(corpus).encode()).hexdigest(),
            "version": 2,
        },
        10,
    )


def build_tiny_model(spec: ModelSpec, cache_dir: Path, data_root: Path, seed: int = 0) -> Path:
    """Build a tiny preset: train a byte-level BPE tokenizer and pre-train all parameters
    briefly on the shipped general text under data_root. Deterministic for a seed; cached by
    content key."""
    corpus = _pretrain_corpus(data_root)
    out = Path(cache_dir) / "models" / f"{spec.name}-{tiny_build_key(spec, seed, corpus)}"
    if (out / "build_info.json").is_file():
        return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # concurrent builders: own temp
    tokenizer = _train_tokenizer(corpus, PRETRAIN["vocab_size"])
    model, info = _pretrain(spec, tokenizer, corpus, seed)
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "build_info.json").write_text(
        json.dumps({"spec": asdict(spec), "seed": seed, "pretrain": PRETRAIN, **info}, indent=2)
    )
    try:
        tmp.rename(out)
    except OSError:  # a concurrent builder finished first; keep its result
        shutil.rmtree(tmp)
    return out


def _train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=1_000_000,
    )


def _make_config(spec: ModelSpec, tokenizer):
    from transformers import AutoConfig

    kwargs = dict(spec.arch)
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def _pretrain(spec: ModelSpec, tokenizer, corpus: list[str], seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_make_config(spec, tokenizer), dtype=torch.float32)
    ids: list[int] = []
    for text in random.Random(seed).sample(corpus, len(corpus)):
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    stream = torch.tensor(ids)
    seq, bs, steps = PRETRAIN["seq_len"], PRETRAIN["batch_size"], PRETRAIN["steps"]
    n_windows = len(stream) // seq
    windows = stream[: n_windows * seq].view(n_windows, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0, losses = time.time(), []
    for step in range(steps):
        lr = PRETRAIN["lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = windows[torch.randint(0, n_windows, (bs,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    info = {
        "pretrain_loss_first": losses[0],
        "pretrain_loss_last": sum(losses[-20:]) / 20,
        "pretrain_seconds": round(time.time() - t0, 1),
        "n_params": sum(p.numel() for p in model.parameters()),
        "corpus_tokens": len(ids),
    }
    return model, info
