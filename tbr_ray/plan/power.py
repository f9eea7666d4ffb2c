"""Power of the paired design (pure arithmetic): the smallest difference between two conditions
that a number of paired prompts can resolve, and the pairs a given difference needs.

    resolvable_difference(250, 0.15)        # 0.0695: XSTest-S, one seed, 15% discordant pairs
    mcnemar_power(250, 0.04, 0.11)          # 0.81: power against a 0.07 difference
    discordance(0.75, 0.75, 0.5)            # 0.1875: share of pairs whose outcomes differ
    pairs_needed(0.04, 0.06, 250)           # 6750: pairs for a 0.02 gap, in steps of 250

The design: each benchmark prompt is answered under both conditions (e.g. `none` and
`internal`, same model and seed), and every prompt's outcome is 0 or 1 (complied, harmful,
correct). Of n pairs, b have outcome 1 under the baseline only and c under the condition only;
the difference of the two rates is (c - b) / n. The test is the report's (analysis.stats.mcnemar):
McNemar's exact two-sided binomial test of b in b + c at 1/2 while b + c < EXACT_BELOW, else the
chi-square statistic with continuity correction, (|b - c| - 1)^2 / (b + c), on 1 df; it rejects
when its p-value is at most alpha.

Power is computed exactly, not from a normal approximation: with p10 and p01 the chances of
the two kinds of discordant pair, the discordant count D is Binomial(n, p10 + p01), and given
D, b is Binomial(D, p10 / (p10 + p01)); the test rejects for b in both tails, whose edges depend
on D only. Power = sum over D of P(D) x P(b in the tails | D). Connor (1987), "Sample size for
testing differences in proportions for the paired-sample design", Biometrics 43:207-211, gives
the normal approximation that the tests compare against (`connor_pairs`).

Leaf module: it imports nothing of tbr_ray, so the planner (before a run: tbr_ray.plan
.power_plan) and the report (after it: analysis.stats) apply the same arithmetic.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import special
from scipy import stats as sps

ALPHA = 0.05  # two-sided
POWER = 0.80
EXACT_BELOW = 25  # discordant pairs under which McNemar is the exact binomial test
_SPREAD_SD = 10.0  # D outside mean +- 10 SD carries under 1e-20 of the probability


def discordance(p1: float, p2: float, correlation: float) -> float:
    """Share of pairs whose outcomes differ, for outcome rates p1 and p2 under the two
    conditions and the correlation (phi) of the two outcomes on one prompt: p1(1 - p2) +
    p2(1 - p1) - 2 phi sqrt(p1(1 - p1) p2(1 - p2)); never below |p1 - p2| (the least two rates
    that far apart allow). phi = 0: the conditions answer independently (most discordance)."""
    spread = correlation * math.sqrt(p1 * (1 - p1) * p2 * (1 - p2))
    return max(p1 * (1 - p2) + p2 * (1 - p1) - 2 * spread, abs(p1 - p2))


@functools.lru_cache(maxsize=8)
def _exact_edges(alpha: float, exact_below: int) -> tuple[int, ...]:
    """Per discordant count D < exact_below, the largest m with 2 P(X <= m) <= alpha for
    X ~ Binomial(D, 1/2) (the exact test rejects b <= m and b >= D - m), or -1."""
    edges = []
    for d in range(exact_below):
        m = np.arange(d // 2 + 1)
        rejected = m[2 * sps.binom.cdf(m, d, 0.5) <= alpha]
        edges.append(int(rejected.max()) if rejected.size else -1)
    return tuple(edges)


@functools.lru_cache(maxsize=8)
def _z(alpha: float) -> float:
    return float(sps.norm.ppf(1 - alpha / 2))


def _tail_edge(d: np.ndarray, alpha: float, exact_below: int) -> np.ndarray:
    """Per discordant count D, the largest m such that b <= m (or b >= D - m) is rejected;
    -1 where nothing is. Chi-square with continuity correction: (D - 2m - 1)^2 / D >= z^2,
    i.e. m <= (D - 1 - z sqrt(D)) / 2; under exact_below, the exact test's edges."""
    edge = np.floor((d - 1 - _z(alpha) * np.sqrt(d)) / 2).astype(int)
    exact = np.asarray(_exact_edges(alpha, exact_below))
    small = d < exact_below
    edge[small] = exact[d[small]]
    return np.maximum(edge, -1)


def mcnemar_power(
    n_pairs: int, p10: float, p01: float, alpha: float = ALPHA, exact_below: int = EXACT_BELOW
) -> float:
    """Chance that the report's McNemar test rejects at `alpha` (two-sided) on n_pairs pairs,
    when a pair is (1, 0) with chance p10 and (0, 1) with chance p01 (see the module docstring)."""
    psi = p10 + p01
    if n_pairs < 1 or psi <= 0:
        return 0.0
    sd = math.sqrt(n_pairs * psi * (1 - psi))
    low = max(1, math.floor(n_pairs * psi - _SPREAD_SD * sd))
    high = min(n_pairs, math.ceil(n_pairs * psi + _SPREAD_SD * sd))
    d = np.arange(low, high + 1)
    edge = _tail_edge(d, alpha, exact_below)
    q, some = min(1.0, max(0.0, p10 / psi)), edge >= 0  # rounding may leave p10 at -1e-17
    m = np.where(some, edge, 0)  # scipy.special.bdtr is nan below 0
    tails = np.where(some, special.bdtr(m, d, q) + special.bdtrc(d - m - 1, d, q), 0.0)
    return float(np.sum(sps.binom.pmf(d, n_pairs, min(1.0, psi)) * tails))


def _smallest(reaches, largest: float, tolerance: float, guess: float) -> float | None:
    """The smallest x in (0, largest] with reaches(x) (bisection; reaches rises with x), or
    None when reaches(largest) is False. `guess` (a normal approximation) narrows the first
    bracket to [0.8, 1.25] x guess when the answer lies there."""
    if largest <= 0 or not reaches(largest):
        return None
    low, high = 0.0, largest
    if 0 < 1.25 * guess < largest:
        if reaches(1.25 * guess):
            high = 1.25 * guess
            low = 0.8 * guess if not reaches(0.8 * guess) else 0.0
        else:
            low = 1.25 * guess
    while high - low > tolerance:
        mid = (low + high) / 2
        low, high = (low, mid) if reaches(mid) else (mid, high)
    return high


def _normal_guess(n_pairs: int, share: float, alpha: float, power: float) -> float:
    """(z_a + z_b) sqrt(share / n): the normal approximation of the resolvable difference for
    differences small against the discordant share."""
    return (_z(alpha) + float(sps.norm.ppf(power))) * math.sqrt(share / max(n_pairs, 1))


def resolvable_difference(
    n_pairs: int,
    discordance_share: float,
    alpha: float = ALPHA,
    power: float = POWER,
    tolerance: float = 2.5e-4,
) -> float | None:
    """The smallest difference of rates (c - b) / n that n_pairs pairs with this share of
    discordant pairs detect with `power` (to `tolerance`): after a run, from its observed
    share. None when even the largest difference the share allows (every discordant pair one
    way) is not detected that often: too few pairs, or too few of them discordant."""
    psi = discordance_share

    def reaches(delta: float) -> bool:
        return mcnemar_power(n_pairs, (psi - delta) / 2, (psi + delta) / 2, alpha) >= power

    guess = _normal_guess(n_pairs, psi, alpha, power)
    return _smallest(reaches, psi if n_pairs >= 1 else 0.0, tolerance, guess)


def resolvable_shift(
    n_pairs: int,
    rate: float,
    correlation: float,
    up: bool = True,
    alpha: float = ALPHA,
    power: float = POWER,
    tolerance: float = 2.5e-4,
) -> float | None:
    """Before a run: the smallest move of a rate from `rate` (up, or down) that n_pairs pairs
    detect with `power`, the discordance growing with the move (`discordance` at the two rates
    and `correlation`). None when no move within [0, 1] is detected that often."""
    sign = 1.0 if up else -1.0

    def reaches(delta: float) -> bool:
        other = rate + sign * delta
        psi = discordance(rate, other, correlation)
        p10, p01 = (psi - sign * delta) / 2, (psi + sign * delta) / 2
        return mcnemar_power(n_pairs, p10, p01, alpha) >= power

    guess = _normal_guess(n_pairs, discordance(rate, rate, correlation), alpha, power)
    return _smallest(reaches, (1 - rate if up else rate) if n_pairs >= 1 else 0.0, tolerance, guess)


def pairs_needed(
    p10: float,
    p01: float,
    step: int = 1,
    alpha: float = ALPHA,
    power: float = POWER,
    most: int = 10_000_000,
) -> int | None:
    """The fewest pairs, a multiple of `step` (e.g. a benchmark's prompts: one seed adds that
    many), with which the test reaches `power` against these chances; None when the
    difference is 0 or more than `most` pairs would be needed. A search on the exact power
    around Connor's normal approximation (the exact power rises with the pairs, up to small
    steps where the test's discrete edges move)."""
    if p10 == p01 or p10 + p01 <= 0:
        return None

    def enough(k: int) -> bool:
        return mcnemar_power(k * step, p10, p01, alpha) >= power

    guess = max(1, math.ceil(connor_pairs(p10, p01, alpha, power) / step))
    if guess * step > most:
        return None
    low, high = guess, guess  # enough(high), not enough(low) once the loops end
    while low > 1 and enough(low):
        low = max(1, low // 2)
    while not enough(high):
        high *= 2
        if high * step > 2 * most:
            return None
    if enough(low):
        return low * step
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high * step if high * step <= most else None


def connor_pairs(p10: float, p01: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Connor (1987)'s normal approximation of the pairs McNemar's test needs:
    (z_a sqrt(psi) + z_b sqrt(psi - delta^2))^2 / delta^2, psi = p10 + p01, delta = p01 - p10."""
    psi, delta = p10 + p01, p01 - p10
    z_a, z_b = sps.norm.ppf(1 - alpha / 2), sps.norm.ppf(power)
    return (z_a * math.sqrt(psi) + z_b * math.sqrt(psi - delta**2)) ** 2 / delta**2
