"""The model registry: one row per family, agreeing with vLLM; local folders of listed and
unlisted families; a tiny model of an unlisted family trained (all-linear LoRA) and evaluated
through a merged-model engine, end to end."""

import json

import pytest
from safetensors.torch import load_file

from tbr_ray.engine import merges_adapters, serves_lora, vllm_serves_lora
from tbr_ray.models import (
    _TINY_COMMON,
    ALL_LINEAR,
    FAMILIES,
    LLAMA_TARGETS,
    REGISTRY,
    TINY_MODELS,
    TINY_VOCAB,
    ModelSpec,
    UnknownModelError,
    attention_implementation,
    get_spec,
    unlisted_family,
)

from .conftest import small_config


def _folder(tmp_path, **config) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_every_family_row_agrees_with_vllm():
    """A row's `vllm_lora` decides one engine vs a merged engine per adapter; vLLM's own model
    registry is the truth (Falcon: no LoRA in vllm 0.32)."""
    for family in FAMILIES.values():
        assert vllm_serves_lora(family.architecture) is family.vllm_lora, family.name
    assert all(spec.family is FAMILIES[spec.family.name] for spec in REGISTRY.values())


def test_local_folder_of_a_listed_family_takes_its_row(tmp_path):
    spec = get_spec(_folder(tmp_path, model_type="llama", architectures=["LlamaForCausalLM"]))
    assert spec.family is FAMILIES["llama"] and spec.peft_target_modules() == list(LLAMA_TARGETS)


def test_local_folder_of_an_unlisted_family_gets_all_linear_and_asks_vllm(tmp_path):
    qwen = get_spec(_folder(tmp_path, model_type="qwen2", architectures=["Qwen2ForCausalLM"]))
    assert qwen.peft_target_modules() == ALL_LINEAR and qwen.vllm_lora is None
    assert serves_lora(qwen) is True  # vLLM's Qwen2 takes LoRA: one engine for every adapter
    gptj = unlisted_family("gptj", "GPTJForCausalLM")
    assert serves_lora(ModelSpec("x", gptj, 0.0, "x")) is False  # merged engine per adapter


def test_adapter_engines_setting_decides_merge_or_lora():
    """eval.adapter_engines: auto follows the family (Falcon merges), merge merges a LoRA-capable
    family too (the CPU real run), serve on Falcon is an error naming the fix."""
    llama, falcon = get_spec("tiny-llama"), get_spec("tiny-falcon")
    auto, merge, serve = (
        small_config(f"eval.adapter_engines={mode}") for mode in ("auto", "merge", "serve")
    )
    assert (merges_adapters(auto, llama), merges_adapters(auto, falcon)) == (False, True)
    assert merges_adapters(merge, llama) and not merges_adapters(serve, llama)
    with pytest.raises(ValueError, match="serves no LoRA for tiny-falcon.*auto or merge"):
        merges_adapters(serve, falcon)


def test_unusable_local_folders_are_named_with_the_fix(tmp_path):
    with pytest.raises(UnknownModelError, match=r"architectures=\[\].*save_pretrained"):
        get_spec(_folder(tmp_path, model_type="qwen2"))
    with pytest.raises(ValueError, match="no model class for architecture 'NoSuchForCausalLM'"):
        vllm_serves_lora("NoSuchForCausalLM")


# A family the table does not list, and whose LoRA vLLM 0.32 cannot serve: the merged path.
_STABLELM = dict(_TINY_COMMON, model_type="stablelm", intermediate_size=384, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny_stablelm(cache_dir, data_root) -> str:
    from tbr_ray.tiny import build_tiny_model

    family = unlisted_family("stablelm", "StableLmForCausalLM")
    spec = ModelSpec("tiny-stablelm", family, 0.0004, arch=_STABLELM)
    return str(build_tiny_model(spec, cache_dir, data_root))


@pytest.mark.slow
def _tiny_gemma2_with_large_scores(folder) -> str:
    """The tiny Gemma-2 preset built from its config (random weights) with its query and key
    weights scaled up, so that attention scores pass Gemma-2's cap of 50, saved in `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(TINY_MODELS["tiny-gemma2"].arch)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=TINY_VOCAB, **arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20.0)
            layer.self_attn.k_proj.weight.mul_(20.0)
    model.save_pretrained(folder)
    return str(folder)


def test_gemma2_trains_and_is_checked_with_eager_attention_the_one_that_softcaps(tmp_path):
    """transformers' default sdpa drops Gemma-2's attention softcapping, which vLLM applies
    (issue 20, point 9): where scores pass the cap the two attentions give other logits, and
    only the cap makes the difference. The trainer and the engine check load it eager."""
    import torch
    from transformers import AutoModelForCausalLM

    from tbr_ray.engine import _reference_model
    from tbr_ray.train import build_lora_model, deepspeed_config

    path = _tiny_gemma2_with_large_scores(tmp_path)
    ids = torch.randint(0, TINY_VOCAB, (1, 48), generator=torch.Generator().manual_seed(0))

    def gap(**config) -> float:
        logits = [
            AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, **config)(ids)
            for impl in ("eager", "sdpa")
        ]
        return float((logits[0].logits - logits[1].logits).abs().max())

    capped, uncapped = gap(), gap(attn_logit_softcapping=None)
    print(f"largest logit gap eager vs sdpa: {capped:.3f} with the cap, {uncapped:.2e} without")
    assert capped > 0.1 and uncapped < 1e-4  # logits here are within about +-1
    cfg = small_config()
    trained = build_lora_model(cfg, path, path, deepspeed_config(cfg, 2, 1)).get_base_model()
    assert trained.config._attn_implementation == "eager"
    assert _reference_model(path, gpus=1).config._attn_implementation == "eager"
    assert attention_implementation("llama") is None  # other families: transformers' default


def test_unlisted_family_trains_all_linear_and_evaluates_merged(ray_local, tiny_stablelm, tmp_path):
    from tbr_ray import results
    from tbr_ray.config import Cell
    from tbr_ray.data import build_mix
    from tbr_ray.evaluate import evaluate_base_model
    from tbr_ray.train import run_training

    assert "stablelm" not in FAMILIES and get_spec(tiny_stablelm).vllm_lora is None
    cfg = small_config(
        f"grid.models=[{tiny_stablelm}]",
        "train.max_steps=2",
        "eval.evaluate_base=false",  # one engine: the merged model's
        "eval.benchmarks=[xstest_safe]",
        "eval.sample_size=2",
    )
    cell = Cell(tiny_stablelm, "none", 0.0, 0)
    adapter = run_training(cfg, cell, tiny_stablelm, build_mix(cfg, cell, tiny_stablelm), tmp_path)
    # all-linear: LoRA on every attention and MLP projection, none on the output head
    targets = {
        k.split(".lora_")[0].rsplit(".", 1)[-1]
        for k in load_file(adapter / "adapter_model.safetensors")
    }
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    out = evaluate_base_model(cfg, tiny_stablelm, tiny_stablelm, [(cell, adapter)], tmp_path, "t")
    assert out == {cell.cell_id: "done"}
    status = results.read_status(tmp_path).set_index("cell_id").loc[cell.cell_id]
    # the merged engine's greedy tokens matched transformers + PEFT on the unmerged pair
    assert status["engine_check"] == {"base": 1.0}
    assert not (tmp_path / "scratch" / f"merged-{cell.cell_id}").exists()


def test_readme_extending_examples_match_the_code():
    """The README's "Extending" snippets run against the modules they name and agree with them."""
    from dataclasses import replace
    from pathlib import Path

    from tbr_ray import benchmarks, judges, models

    text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    blocks = text.split("## Extending", 1)[1].split("```python\n")[1:]
    family, bench, rules = (b.split("```", 1)[0] for b in blocks)
    qwen = eval(family.strip().rstrip(","), vars(models))
    assert qwen.vllm_lora is vllm_serves_lora(qwen.architecture)
    advbench = eval(bench.strip().rstrip(","), vars(benchmarks))
    assert replace(advbench, loader=None) == replace(benchmarks.BENCHMARKS["advbench"], loader=None)
    namespace = dict(vars(judges))
    exec(rules, namespace)
    assert namespace["RULE_JUDGES"] == judges.RULE_JUDGES
