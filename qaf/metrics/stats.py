"""Honest numbers: confidence intervals of top-1 and paired tests between two runs on the same images.

- :func:`wilson_interval`: the Wilson score interval of a proportion (good coverage also near 0 %
  or 100 % and for small samples, unlike the normal approximation).
- :func:`paired_comparison`: two models scored on the same images. The difference of their
  accuracies gets a Wald interval for paired proportions (its variance uses only the images on
  which they disagree), and the exact McNemar test gives the p-value of "no difference": under
  the null hypothesis each disagreement is equally likely to favour either model, so the number
  won by A is Binomial(b + c, 1/2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binom, norm

#: Two-sided level of every interval and test.
LEVEL = 0.95


def _z(level: float) -> float:
    return float(norm.ppf(0.5 + level / 2))


def wilson_interval(correct: int, total: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion, in percent.

    Parameters
    ----------
    correct : int
        Successes (correctly classified images).
    total : int
        Trials (evaluated images), > 0.
    level : float
        Confidence level.

    Returns
    -------
    tuple of float
        ``(low, high)`` in percent.
    """
    if total <= 0:
        raise ValueError("total must be > 0")
    z = _z(level)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` (A right, B wrong) and ``c``."""
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(b, c), n, 0.5)))


@dataclass(frozen=True)
class PairedComparison:
    """A against B on the same images (accuracies and differences in percent).

    Attributes
    ----------
    n : int
        Images both were scored on.
    top1_a, top1_b : float
        Their accuracies.
    diff : float
        ``top1_a - top1_b``.
    ci95 : tuple of float
        Interval of ``diff`` (paired Wald).
    a_only, b_only : int
        Images only A (only B) classifies correctly: McNemar's discordant counts.
    p_value : float
        Exact McNemar p-value of "no difference".
    significant : bool
        ``p_value < 1 - level``.
    """

    n: int
    top1_a: float
    top1_b: float
    diff: float
    ci95: tuple[float, float]
    a_only: int
    b_only: int
    p_value: float
    significant: bool

    def as_dict(self) -> dict:
        """Plain dict (JSON-able)."""
        return {**asdict(self), "ci95": list(self.ci95)}


def paired_comparison(correct_a: np.ndarray, correct_b: np.ndarray, level: float = LEVEL) -> PairedComparison:
    """Compare two models' per-image correctness on the same images.

    Parameters
    ----------
    correct_a, correct_b : np.ndarray
        Boolean arrays of equal length, image ``i`` in both.
    level : float
        Confidence level.

    Returns
    -------
    PairedComparison
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or not a.size:
        raise ValueError(f"paired comparison needs two equal, non-empty 1-D arrays, got {a.shape} and {b.shape}")
    n = a.size
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    diff = (a_only - b_only) / n
    var = ((a_only + b_only) / n - diff**2) / n
    half = _z(level) * math.sqrt(max(var, 0.0))
    p = mcnemar_exact(a_only, b_only)
    return PairedComparison(n, 100.0 * a.mean(), 100.0 * b.mean(), 100.0 * diff,
                            (100.0 * (diff - half), 100.0 * (diff + half)), a_only, b_only, p, p < 1 - level)
