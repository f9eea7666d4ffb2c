"""Token counts the GPU cost model (tbr_ray.plan.cost) takes from the data, measured with the
real tokenizers in ../shared/tokenizers (Llama-3's 128k BPE; Mistral's 32k SentencePiece,
the Llama-1/2 kind). Prints one JSON object; docs/BENCHMARKS.md records it, and the cost
model's constants cite it.

    .venv/bin/python bench/plan_inputs.py                       # jobs/paper.yaml
    .venv/bin/python bench/plan_inputs.py --config jobs/paper.yaml --set data.n_general=900

What it measures:
  training   tokens of a training example as tbr_ray.data tokenizes it (Alpaca prompt +
             response + EOS, cut at data.max_seq_len), mean over the `none` and `internal`
             mixes of the config (internal: every safety row with a reflection of
             reflection.max_new_tokens, an upper bound); and the padding factor of the
             trainer's micro-batches (tbr_ray.train: seeded shuffle, micro_batch_size rows
             padded to the longest): padded tokens / real tokens
  answers    response tokens of the training rows, capped at eval.max_new_tokens: what a
             model tuned on them writes per answer (used for tuned cells on the Alpaca-format
             benchmarks when no run has measured it); GSM8K's reference solutions, what a
             few-shot answer imitates before the next "Question" stops it
  prompts    per shipped benchmark: prompt tokens (mean), and the prefix its prompts share
             (the Alpaca header, the few-shot block: per MMLU subject, one for ARC and GSM8K)
             in whole blocks of 16 tokens, what vLLM's prefix cache reuses
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZERS = REPO.parent / "shared" / "tokenizers"
BLOCK = 16  # vLLM's KV-cache block: only whole blocks of a shared prefix are cached


def tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


def mixes(cfg, tokenizer_name: str) -> dict[str, list[dict]]:
    """The config's `none` mix and an `internal` mix whose safety rows all carry a
    reflection of reflection.max_new_tokens words' worth (an upper bound on its length); the
    general rows as tbr_ray.data samples them for a model with this tokenizer."""
    from tbr_ray.data import assemble_mix, source_rows

    general, safety, _ = source_rows(cfg, str(TOKENIZERS / tokenizer_name))
    refusal = cfg.data.refusal or __import__("tbr_ray.config").config.PAPER_REFUSAL
    long_reflection = " ".join(["careful"] * cfg.reflection.max_new_tokens)
    seed = cfg.data.sample_seed
    none = assemble_mix(general, safety, None, 0.0, refusal, seed)
    internal = assemble_mix(general, safety, [long_reflection] * len(safety), 1.0, refusal, seed)
    return {"none": none, "internal": internal}


def training(cfg, tok, tokenizer_name: str) -> dict:
    from tbr_ray.data import tokenize_rows

    out = {}
    for name, rows in mixes(cfg, tokenizer_name).items():
        ex = tokenize_rows(rows, tok, cfg.data.max_seq_len)
        lengths = [len(e["input_ids"]) for e in ex]
        answers = [sum(1 for x in e["labels"] if x != -100) for e in ex]
        out[name] = {
            "example_tokens": statistics.fmean(lengths),
            "padding_factor": padding_factor(lengths, cfg.train.micro_batch_size),
            "answer_tokens_capped": statistics.fmean(
                min(a, cfg.eval.max_new_tokens) for a in answers
            ),
            "cut_at_max_seq_len": sum(n >= cfg.data.max_seq_len for n in lengths),
        }
    return out


def padding_factor(lengths: list[int], micro: int, epochs: int = 3) -> float:
    """Padded / real tokens of micro-batches as the trainer draws them (a seeded shuffle per
    epoch, consecutive groups of `micro`, each padded to its longest row)."""
    padded = real = 0
    for epoch in range(epochs):
        order = random.Random(epoch).sample(range(len(lengths)), len(lengths))
        for i in range(0, len(order) - micro + 1, micro):
            group = [lengths[j] for j in order[i : i + micro]]
            padded, real = padded + micro * max(group), real + sum(group)
    return padded / real


def shared_prefix(ids: list[list[int]]) -> int:
    """Tokens all `ids` share at the start, rounded down to whole cache blocks."""
    first, n = ids[0], len(ids[0])
    for other in ids[1:]:
        n = next(
            (i for i, (a, b) in enumerate(zip(first[:n], other, strict=False)) if a != b),
            min(n, len(other)),
        )
    return n // BLOCK * BLOCK


def prompt_tokens(name: str, root: Path, shots: int | None, tok) -> dict:
    """Mean prompt tokens of a benchmark at `shots`, and the prefix its prompts share."""
    from tbr_ray.benchmarks import load_benchmark

    items = load_benchmark(name, root, shots=shots)
    ids = tok([it.prompt for it in items], add_special_tokens=True)["input_ids"]
    groups: dict[str, list] = {}
    for it, x in zip(items, ids, strict=True):
        groups.setdefault(it.category if name == "mmlu" else "", []).append(x)
    prefix = sum(shared_prefix(g) * len(g) for g in groups.values()) / len(ids)
    return {
        "prompts": len(ids),
        "shots": shots or 0,
        "prompt_tokens": statistics.fmean(len(x) for x in ids),
        "shared_prefix_tokens": prefix,
        "prefix_groups": len(groups),
    }


def prompts(cfg, tok) -> dict:
    """Every shipped benchmark of the config at its shots, and the few-shot ones at 0 shots
    too (their tokens per shot: the difference over the shots)."""
    from tbr_ray.benchmarks import BENCHMARKS

    out = {}
    for name in cfg.eval.benchmarks:
        if BENCHMARKS[name].user_file:
            continue
        root, shots = cfg.data.resolved_root(), cfg.eval.shots.get(name)
        out[name] = prompt_tokens(name, root, shots, tok)
        if shots:
            zero = prompt_tokens(name, root, 0, tok)
            out[name]["zero_shot_prompt_tokens"] = zero["prompt_tokens"]
            out[name]["tokens_per_shot"] = (
                out[name]["prompt_tokens"] - zero["prompt_tokens"]
            ) / shots
    return out


def judge_template_tokens(tok) -> int:
    """Tokens of WildGuard's prompt around an empty request and answer."""
    from tbr_ray.judges import judge_prompt

    return len(tok(judge_prompt("wildguard", tok, "", ""))["input_ids"])


def gsm8k_answers(cfg, tok) -> float:
    rows = [json.loads(line) for line in (cfg.data.resolved_root() / "gsm8k" / "test.jsonl").open()]
    ids = tok([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
    return statistics.fmean(min(len(x), cfg.eval.max_new_tokens) for x in ids)


def main(argv=None) -> None:
    from tbr_ray.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "jobs" / "paper.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--tokenizers", nargs="*", default=["mistral", "llama3"])
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.sets)
    out = {"config": str(args.config), "sets": args.sets}
    for name in args.tokenizers:
        tok = tokenizer(name)
        out[name] = {
            "training": training(cfg, tok, name),
            "gsm8k_answer_tokens": gsm8k_answers(cfg, tok),
            "benchmarks": prompts(cfg, tok),
            "wildguard_template_tokens": judge_template_tokens(tok),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
