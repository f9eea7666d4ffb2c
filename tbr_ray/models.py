"""The model registry (the paper's 15 base models + tiny presets), the prompt template, and
the builder that makes tiny presets locally (tokenizer + brief pre-training), no hub needed.

    tbr-ray models                       # list the registry
    tbr-ray build-models                 # build (or find cached) every tiny preset
    path = resolve_model("tiny-llama", cache_dir, data_root)  # local HF folder, built if needed

A model name is a registry name or a local folder holding an HF-format causal LM.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FALCON_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


@dataclass(frozen=True)
class Shape:
    """The architecture numbers the planner sizes memory with (tbr_ray.plan), copied from each
    model's published HF config.json (num_hidden_layers, hidden_size, num_attention_heads,
    num_key_value_heads, head_dim, intermediate_size, vocab_size)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int  # < heads: grouped-query / multi-query attention (smaller KV cache)
    head_dim: int
    ffn: int  # MLP inner width (SwiGLU's intermediate_size; Falcon: 4 x hidden)
    vocab: int
    mlp_mats: int = 3  # weight matrices of the MLP: 3 gated (SwiGLU / GeGLU), 2 Falcon (GELU)


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. `gpus`/`zero_stage`: what tbr_ray.plan.train_layout chooses for the
    paper grid on 80 GiB cards (bf16 LoRA; tests/test_plan.py holds them equal), listed by
    `tbr-ray models`; a run takes the planner's choice for its cluster."""

    name: str
    hf_id: str | None  # None for tiny presets (built locally)
    family: str  # llama | gemma | gemma2 | falcon
    params_b: float  # parameters, billions
    lora_targets: tuple[str, ...]
    gpus: int  # GPUs per cell (= Ray Train workers on a GPU cluster)
    zero_stage: int  # DeepSpeed ZeRO stage suggested at that size
    vllm_lora: bool = True  # False: vLLM cannot serve LoRA for this arch -> merge adapter
    arch: dict[str, Any] = field(default_factory=dict)  # tiny presets: HF config kwargs
    shape: Shape | None = None  # paper models: published architecture numbers

    @property
    def tiny(self) -> bool:
        return self.hf_id is None


def _paper(name, hf_id, family, params_b, gpus, zero, targets=LLAMA_TARGETS, vllm_lora=True):
    shape = SHAPES[name.removesuffix("-chat")]
    return ModelSpec(name, hf_id, family, params_b, targets, gpus, zero, vllm_lora, {}, shape)


# Published configs (layers, hidden, heads, KV heads, head dim, MLP width, vocab). Llama-1 and
# Llama-2 7B/13B share shapes; Llama-3 and 3.1 share shapes; chat models share their base's.
_LLAMA_7B = Shape(32, 4096, 32, 32, 128, 11008, 32000)
_LLAMA_13B = Shape(40, 5120, 40, 40, 128, 13824, 32000)
_LLAMA3_8B = Shape(32, 4096, 32, 8, 128, 14336, 128256)
_LLAMA3_70B = Shape(80, 8192, 64, 8, 128, 28672, 128256)
SHAPES: dict[str, Shape] = {
    "gemma-2b": Shape(18, 2048, 8, 1, 256, 16384, 256000),
    "gemma-2-2b": Shape(26, 2304, 8, 4, 256, 9216, 256000),
    "gemma-7b": Shape(28, 3072, 16, 16, 256, 24576, 256000),
    "llama-7b": _LLAMA_7B,
    "llama-2-7b": _LLAMA_7B,
    "falcon-7b": Shape(32, 4544, 71, 1, 64, 4 * 4544, 65024, 2),  # 71 heads: no tensor parallel
    "llama-3-8b": _LLAMA3_8B,
    "llama-3.1-8b": _LLAMA3_8B,
    "gemma-2-9b": Shape(42, 3584, 16, 8, 256, 14336, 256000),
    "llama-13b": _LLAMA_13B,
    "llama-2-13b": _LLAMA_13B,
    "falcon-40b": Shape(60, 8192, 128, 8, 64, 4 * 8192, 65024, 2),
    "llama-2-70b": Shape(80, 8192, 64, 8, 128, 28672, 32000),
    "llama-3-70b": _LLAMA3_70B,
    "llama-3.1-70b": _LLAMA3_70B,
}


# The paper's 15 base models (PAPER.md section 3). GPU counts assume 80 GiB cards, bf16, LoRA.
PAPER_MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        _paper("gemma-2b", "google/gemma-2b", "gemma", 2.5, 1, 2),
        _paper("gemma-2-2b", "google/gemma-2-2b", "gemma2", 2.6, 1, 2),
        _paper("gemma-7b", "google/gemma-7b", "gemma", 8.5, 1, 2),
        _paper("llama-7b", "huggyllama/llama-7b", "llama", 6.7, 1, 2),
        _paper("llama-2-7b", "meta-llama/Llama-2-7b-hf", "llama", 6.7, 1, 2),
        _paper("falcon-7b", "tiiuae/falcon-7b", "falcon", 7.2, 1, 2, FALCON_TARGETS, False),
        _paper("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "llama", 8.0, 1, 2),
        _paper("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "llama", 8.0, 1, 2),
        _paper("gemma-2-9b", "google/gemma-2-9b", "gemma2", 9.2, 1, 2),
        _paper("llama-13b", "huggyllama/llama-13b", "llama", 13.0, 1, 2),
        _paper("llama-2-13b", "meta-llama/Llama-2-13b-hf", "llama", 13.0, 1, 2),
        _paper("falcon-40b", "tiiuae/falcon-40b", "falcon", 41.8, 4, 3, FALCON_TARGETS, False),
        _paper("llama-2-70b", "meta-llama/Llama-2-70b-hf", "llama", 69.0, 8, 3),
        _paper("llama-3-70b", "meta-llama/Meta-Llama-3-70B", "llama", 70.6, 8, 3),
        _paper("llama-3.1-70b", "meta-llama/Llama-3.1-70B", "llama", 70.6, 8, 3),
    ]
}

# head_dim 64 everywhere: vLLM's CPU attention rejects smaller heads (STACK.md).
_TINY_COMMON = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=1024
)
TINY_MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec(
            "tiny-llama",
            None,
            "llama",
            0.0004,
            LLAMA_TARGETS,
            0,
            2,
            True,
            dict(
                _TINY_COMMON,
                model_type="llama",
                intermediate_size=384,
                head_dim=64,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            ),
        ),
        ModelSpec(
            "tiny-gemma",
            None,
            "gemma",
            0.0004,
            LLAMA_TARGETS,
            0,
            2,
            True,
            dict(
                _TINY_COMMON,
                model_type="gemma",
                intermediate_size=384,
                head_dim=64,
                num_key_value_heads=1,
            ),
        ),
        ModelSpec(
            "tiny-gemma2",
            None,
            "gemma2",
            0.0004,
            LLAMA_TARGETS,
            0,
            2,
            True,
            dict(
                _TINY_COMMON,
                model_type="gemma2",
                intermediate_size=384,
                head_dim=64,
                num_key_value_heads=1,
                sliding_window=256,
                query_pre_attn_scalar=64,
            ),
        ),
        ModelSpec(
            "tiny-falcon",
            None,
            "falcon",
            0.0004,
            FALCON_TARGETS,
            0,
            2,
            False,
            dict(
                _TINY_COMMON,
                model_type="falcon",
                multi_query=True,
                parallel_attn=True,
                new_decoder_architecture=False,
                alibi=False,
                bias=False,
            ),
        ),
    ]
}

# The official chat models of the prompting experiment (PAPER.md section 7, Table 1): evaluated
# untrained under the Direct / CoT prompts, never fine-tuned here.
CHAT_MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        _paper("gemma-2b-chat", "google/gemma-2b-it", "gemma", 2.5, 1, 2),
        _paper("gemma-7b-chat", "google/gemma-7b-it", "gemma", 8.5, 1, 2),
        _paper("llama-2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", "llama", 6.7, 1, 2),
        _paper("llama-3-8b-chat", "meta-llama/Meta-Llama-3-8B-Instruct", "llama", 8.0, 1, 2),
        _paper("llama-3.1-8b-chat", "meta-llama/Llama-3.1-8B-Instruct", "llama", 8.0, 1, 2),
    ]
}

REGISTRY: dict[str, ModelSpec] = {**TINY_MODELS, **PAPER_MODELS, **CHAT_MODELS}

# Alpaca templates (PAPER.md section 1, Fig. 10). The paper shows only the with-input form;
# rows without an input use Alpaca's own no-input form (our choice, logged in PAPER.md terms).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The training/eval prompt for one instruction; the response follows it directly."""
    if input_text.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


class UnknownModelError(ValueError):
    pass


def get_spec(name: str) -> ModelSpec:
    """Registry entry for a name, or a spec inferred from a local HF folder's config.json."""
    if name in REGISTRY:
        return REGISTRY[name]
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
        family = {"llama": "llama", "gemma": "gemma", "gemma2": "gemma2", "falcon": "falcon"}.get(
            model_type
        )
        if family is None:
            raise UnknownModelError(
                f"{name}: model_type {model_type!r} has no LoRA target list here. Fix: use a "
                f"llama, gemma, gemma2 or falcon model, or add its family to tbr_ray.models."
            )
        targets = FALCON_TARGETS if family == "falcon" else LLAMA_TARGETS
        return ModelSpec(
            str(path.resolve()), str(path.resolve()), family, 0.0, targets, 1, 2, family != "falcon"
        )
    close = [n for n in REGISTRY if n.split("-")[0] in name.lower()][:5]
    raise UnknownModelError(
        f"unknown model {name!r}: not in the registry and not a folder with config.json. "
        f"Fix: run `tbr-ray models` to list names"
        + (f" (close: {', '.join(close)})" if close else "")
        + ", or pass a local model path."
    )


def model_shape(name: str) -> Shape | None:
    """Architecture numbers of a model: the registry's published shape, a tiny preset's build
    config, or a local folder's config.json (None if its keys are not the usual ones)."""
    spec = get_spec(name)
    if spec.shape is not None:
        return spec.shape
    if spec.tiny:
        return shape_from_hf_config({**spec.arch, "vocab_size": PRETRAIN["vocab_size"]})
    return shape_from_hf_config(json.loads((Path(spec.hf_id) / "config.json").read_text()))


def shape_from_hf_config(c: dict[str, Any]) -> Shape | None:
    """A Shape from HF config keys (Llama / Gemma / Gemma-2, and Falcon's own names)."""
    hidden = c.get("hidden_size")
    heads = c.get("num_attention_heads", c.get("n_head"))
    layers = c.get("num_hidden_layers", c.get("n_layer"))
    if not (hidden and heads and layers and c.get("vocab_size")):
        return None
    if c.get("model_type") == "falcon":
        new = c.get("new_decoder_architecture")
        kv = c.get("num_kv_heads", heads) if new else (1 if c.get("multi_query", True) else heads)
        ffn, mats = c.get("ffn_hidden_size") or 4 * hidden, 2
    else:
        kv, ffn, mats = c.get("num_key_value_heads", heads), c["intermediate_size"], 3
    head_dim = c.get("head_dim") or hidden // heads
    return Shape(layers, hidden, heads, kv, head_dim, ffn, c["vocab_size"], mats)


def shape_params(shape: Shape) -> int:
    """Weights counted from a shape: attention (q, o of heads x head_dim; k, v of kv_heads x
    head_dim), the MLP (mlp_mats x hidden x ffn), one embedding; norms and biases left out."""
    attn = 2 * shape.hidden * shape.heads * shape.head_dim
    attn += 2 * shape.hidden * shape.kv_heads * shape.head_dim
    mlp = shape.mlp_mats * shape.hidden * shape.ffn
    return shape.layers * (attn + mlp) + shape.vocab * shape.hidden


def model_label(name: str) -> str:
    """Short name for ids and tables: registry name, or a local folder's base name."""
    return name if name in REGISTRY else Path(name).name


def resolve_model(name: str, cache_dir: Path, data_root: Path, seed: int = 0) -> str:
    """A loadable model location: tiny presets are built (or found cached) under cache_dir,
    pre-trained on text under data_root (the run's `data.root`); paper models resolve to their
    HF id (the cluster's HF cache or hub); paths stay paths."""
    if name not in REGISTRY and not Path(name).expanduser().exists() and is_hub_id(name):
        return name  # a hub id (judge or reflector on a cluster with an HF cache)
    spec = get_spec(name)
    if spec.tiny:
        return str(build_tiny_model(spec, cache_dir, data_root, seed=seed))
    return spec.hf_id or name


def is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


# ---------------------------------------------------------------- tiny preset builder

PRETRAIN = dict(steps=400, batch_size=16, seq_len=128, lr=3e-3, vocab_size=2048)


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
    blob = json.dumps(
        {
            "arch": spec.arch,
            "pretrain": PRETRAIN,
            "seed": seed,
            "corpus": hashlib.sha256("\n".join(corpus).encode()).hexdigest(),
            "version": 2,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


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
