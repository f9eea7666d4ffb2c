"""How the general (Alpaca) rows are drawn: to the answer-length distribution of a plain Alpaca
sample, with no row longer than the model's `data.max_seq_len` (pure functions of rows).

    rows, bins = sample_general(pool, n=1800, seed=0, reference=[answer_words(r) for r in ref])
    kept, dropped_ids = drop_over_max_len(pool, token_lengths, max_seq_len=512)
    sampling_report(rows, reference, bins, token_lengths)   # quantiles per source, bins

Why: the shipped gumbelsoft subset is "biased toward long outputs" (its ATTRIBUTION.md). A
uniform sample of the pooled subsets (jobs/paper.yaml, seed 0) took 1,194 of its 1,800 rows from
it: median answer 188 tokens (Llama-2-style tokenizer) against bloom-lora's 49, so the 200
refusals were 2.6% of the loss tokens (7.2% with 1,800 bloom-lora-like answers; 3.9% now).
Lengths are answer words (whitespace-split), the same for every tokenizer: every model draws
the same rows but for those too long for its own tokenizer.

Sampling (reference given): per quantile bin of the reference's answer words (LENGTH_BINS),
its share of n, drawn in seeded rank order (`row_priority`: removing a row from the pool moves
no other row). A bin holding too few rows passes its shortfall to the next longer bin, which
fills it with its shortest rows left (nearest to where they were wanted); a shortfall left at
the top is filled downward with the longest rows left. Each bin's target, available and taken
rows go to the mix report.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import asdict, dataclass

import numpy as np

LENGTH_BINS = 10  # quantile bins (deciles) of the reference's answer words
QUANTILES = {"min": 0.0, "p10": 0.1, "p25": 0.25, "median": 0.5, "p75": 0.75, "p90": 0.9}
QUANTILES |= {"max": 1.0}


def answer_words(row: dict) -> int:
    """A row's answer (`output`) length in whitespace-separated words."""
    return len(row["output"].split())


def row_priority(seed: int, source_id: str) -> bytes:
    """A row's seeded random rank (rows are taken in this order); unlike a shuffle of a list,
    removing one row from the pool leaves every other row's rank as it was."""
    return hashlib.sha256(f"{seed}:{source_id}".encode()).digest()


def quantiles(values: list[float]) -> dict[str, float]:
    """{min, p10, p25, median, p75, p90, max, mean, n} of `values` (rounded to 0.1)."""
    if not len(values):
        return {"n": 0}
    arr = np.asarray(values, dtype=float)
    qs = np.quantile(arr, list(QUANTILES.values()))
    out = {name: round(float(q), 1) for name, q in zip(QUANTILES, qs, strict=True)}
    return {**out, "mean": round(float(arr.mean()), 1), "n": len(values)}


@dataclass(frozen=True)
class LengthBin:
    """One quantile bin of the reference's answer words, [low, high) (high None: no bound):
    the reference's share, the rows it asks for (share of n), the pool's rows, the rows taken."""

    low: int
    high: int | None
    share: float
    target: int
    available: int
    taken: int


def drop_over_max_len(
    rows: list[dict], lengths: dict[str, int] | None, max_seq_len: int
) -> tuple[list[dict], list[str]]:
    """(rows whose templated tokens, EOS included, fit max_seq_len; ids of the others).
    lengths None (no tokenizer at hand, e.g. the preflight): every row is kept."""
    if lengths is None:
        return rows, []
    kept = [r for r in rows if lengths[r["source_id"]] <= max_seq_len]
    return kept, [r["source_id"] for r in rows if lengths[r["source_id"]] > max_seq_len]


def sample_general(
    rows: list[dict], n: int, seed: int, reference: list[int] | None
) -> tuple[list[dict], list[LengthBin]]:
    """n of `rows` (n <= len(rows)): uniform in seeded rank order when `reference` (answer
    words of a plain sample) is None, else matched to its length distribution (module
    docstring); with the bins it used."""
    ranked = sorted(rows, key=lambda r: row_priority(seed, r["source_id"]))
    if reference is None:
        return ranked[:n], []
    edges = bin_edges(reference)
    pools: list[list[dict]] = [[] for _ in range(len(edges) + 1)]
    for row in ranked:
        pools[bisect.bisect_right(edges, answer_words(row))].append(row)
    shares = [c / len(reference) for c in _counts(reference, edges)]
    targets = apportion(n, shares)
    chosen = _fill(pools, targets)
    bounds = [0, *edges, None]
    bins = [
        LengthBin(bounds[b], bounds[b + 1], round(shares[b], 4), targets[b], len(p), len(c))
        for b, (p, c) in enumerate(zip(pools, chosen, strict=True))
    ]
    return [row for taken in chosen for row in taken], bins


def bin_edges(reference: list[int], n_bins: int = LENGTH_BINS) -> list[int]:
    """Inner edges of the reference's quantile bins (word counts, duplicates merged)."""
    inner = np.quantile(reference, [i / n_bins for i in range(1, n_bins)], method="higher")
    return sorted({int(e) for e in inner})


def _counts(values: list[int], edges: list[int]) -> list[int]:
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[bisect.bisect_right(edges, v)] += 1
    return counts


def apportion(n: int, shares: list[float]) -> list[int]:
    """Whole counts summing to n in proportion to `shares` (largest remainder, ties to the
    first)."""
    raw = [n * s for s in shares]
    out = [int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))
    for i in order[: n - sum(out)]:
        out[i] += 1
    return out


def _fill(pools: list[list[dict]], targets: list[int]) -> list[list[dict]]:
    """Rows taken per bin: its target in rank order, plus shortfalls carried up (shortest
    first), then any shortfall left carried down (longest first)."""
    chosen, carry = [], 0
    for pool, target in zip(pools, targets, strict=True):
        own = pool[:target]
        extra = sorted(pool[target:], key=answer_words)[:carry]
        chosen.append(own + extra)
        carry += target - len(own) - len(extra)
    for b in reversed(range(len(pools))):
        if carry <= 0:
            break
        taken = {id(r) for r in chosen[b]}
        left = sorted((r for r in pools[b] if id(r) not in taken), key=answer_words)
        extra = left[::-1][:carry]
        chosen[b] += extra
        carry -= len(extra)
    return chosen


def sampling_report(
    sample: list[dict],
    reference: list[int] | None,
    reference_name: str | None,
    bins: list[LengthBin],
    answer_tokens: dict[str, int] | None = None,
) -> dict:
    """The general sample's length distribution for the mix report: answer words (and answer
    tokens with EOS, when a tokenizer was at hand) per source and overall, the reference's,
    and the bins (how many rows each asked for, held and gave, and how many moved)."""
    sources = sorted({r["source"] for r in sample})
    groups = {"all": sample, **{s: [r for r in sample if r["source"] == s] for s in sources}}
    out = {
        "rule": (
            f"answer lengths matched to {reference_name} ({len(bins)} quantile bins of answer "
            "words; see tbr_ray.lengths)"
            if reference is not None
            else "uniform (data.length_reference: null)"
        ),
        "reference": reference_name,
        "answer_words": {k: quantiles([answer_words(r) for r in g]) for k, g in groups.items()},
        "bins": [asdict(b) for b in bins],
        "n_moved": sum(max(0, b.taken - b.target) for b in bins),
    }
    if reference is not None:
        out["answer_words"]["reference"] = quantiles(reference)
    if out["n_moved"]:
        words = out["answer_words"]
        out["note"] = (
            f"the pool holds too few rows of the reference's shorter lengths: {out['n_moved']} "
            f"of {len(sample)} rows come from longer bins than asked, so the sample's answers "
            f"are longer than the reference's (median {words['all']['median']} vs "
            f"{words['reference']['median']} words). Fix: a larger plain Alpaca pool (the full "
            "Alpaca file), or a smaller data.n_general."
        )
    if answer_tokens is not None:
        out["answer_tokens"] = {
            k: quantiles([answer_tokens[r["source_id"]] for r in g]) for k, g in groups.items()
        }
    return out
