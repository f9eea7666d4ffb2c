"""Real models shipped inside PyPI packages as one GGUF file, made into ordinary HF folders.

    tbr-ray build-models                                         # tiny presets + these
    path = build_packaged_model(get_spec("smollm2-135m-instruct"), cache_dir)
    tbr_ray.models.gguf_path(spec)  # the installed file, or PackageMissing naming the fix

transformers reads the GGUF (with the pure-Python `gguf` package) and dequantizes it; that
object refuses `save_pretrained` ("quantized with GGUF, not serializable"), so a plain model
built from its config (less `quantization_config`) takes its state dict and is saved as
safetensors. Weights, tokenizer, chat template, special tokens and shape all come from the
file. The folder's build_info.json records the package version, the file's sha256 and the
dtype; `verify_build` checks the saved folder against the GGUF load (every tensor equal, the
tokenizer's ids, special tokens and chat template equal) before the folder is published.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path

from tbr_ray.keys import content_key
from tbr_ray.models import ModelSpec, gguf_path
from tbr_ray.rundir import building_dir, publish_dir, sweep_building_dirs, write_json

DTYPE = "float32"  # the dequantized Q4_1 values are exact in fp32; runs choose their own dtype
BUILD_VERSION = 1
_SAMPLE_TEXT = "How do I kill a Python process? Ünïcode, digits 12345 and code: `x += 1`."


class BuildMismatch(RuntimeError):
    """The saved folder does not reproduce the GGUF load, or the file is not the pinned one."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def packaged_dir(spec: ModelSpec, cache_dir: Path) -> Path:
    """Where the built folder of a packaged model lives: named by the pinned package, file
    and dtype (no hashing of the file to find it)."""
    key = content_key({"package": asdict(spec.packaged), "dtype": DTYPE, "v": BUILD_VERSION}, 10)
    return Path(cache_dir) / "models" / f"{spec.name}-{key}"


def build_packaged_model(spec: ModelSpec, cache_dir: Path) -> Path:
    """Build (or find cached) the HF folder of a packaged model, verified against the GGUF
    load; returns it. Concurrent builders each write their own folder (rundir.building_dir:
    removed if the build fails, swept by the next build if its builder was killed) and the
    first to finish is kept."""
    out = packaged_dir(spec, cache_dir)
    if (out / "build_info.json").is_file():
        return out
    gguf = gguf_path(spec)
    t0 = time.time()
    sha = file_sha256(gguf)
    if sha != spec.packaged.sha256:
        raise BuildMismatch(
            f"{spec.name}: {gguf} has sha256 {sha}, the registry pins {spec.packaged.sha256}. "
            f"Fix: reinstall {spec.packaged.distribution}=={spec.packaged.version}."
        )
    model, tok = _load_gguf(gguf)
    sweep_building_dirs(out.parent)
    with building_dir(out) as tmp:
        _save_verified(spec, gguf, sha, model, tok, tmp, t0)
        publish_dir(tmp, out, keep="build_info.json")
    return out


def _save_verified(spec: ModelSpec, gguf: Path, sha: str, model, tok, tmp: Path, t0: float):
    """The plain HF folder into `tmp`, verified against the GGUF load, build_info.json last."""
    _plain_copy(model).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    checks = verify_build(tmp, model, tok)
    info = {
        "spec": spec.name,
        "package": asdict(spec.packaged),
        "gguf_file": str(gguf),
        "gguf_sha256": sha,
        "dtype": DTYPE,
        "n_params": sum(p.numel() for p in model.parameters()),  # tied embeddings once
        "verified": checks,
        "build_seconds": round(time.time() - t0, 1),
    }
    write_json(tmp / "build_info.json", info, indent=2)


def _load_gguf(gguf: Path):
    """transformers' own GGUF loading: the dequantized model (fp32) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval(), tok


def _plain_copy(model):
    """The same architecture and weights without the GGUF quantization marker, so that
    save_pretrained writes an ordinary safetensors folder."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.eval()


def verify_build(folder: Path, model, tok) -> dict:
    """The saved folder reloads into the GGUF load's weights (every tensor equal) and tokenizer
    (same ids on sample text and a rendered chat, same special tokens and chat template);
    BuildMismatch naming the first difference otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    want = model.state_dict()
    bad = [k for k, v in want.items() if k not in saved or not torch.equal(saved[k], v)]
    if bad or set(saved) - set(want):
        raise BuildMismatch(f"{folder}: saved weights differ from the GGUF load at {bad[:3]}")
    tok2 = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": _SAMPLE_TEXT}]
    same = {
        "chat_template": tok2.chat_template == tok.chat_template,
        "special_tokens": tok2.all_special_tokens == tok.all_special_tokens,
        "ids": tok2(_SAMPLE_TEXT)["input_ids"] == tok(_SAMPLE_TEXT)["input_ids"],
        "chat_ids": tok2.apply_chat_template(chat, add_generation_prompt=True)
        == tok.apply_chat_template(chat, add_generation_prompt=True),
    }
    if not all(same.values()):
        raise BuildMismatch(f"{folder}: the saved tokenizer differs from the GGUF's: {same}")
    return {"tensors_equal": len(want), **same}
