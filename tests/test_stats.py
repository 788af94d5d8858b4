"""Intervals and paired tests against independent truth: scipy's exact binomial test and its Wilson
interval, and cases worked out by hand (not with the functions under test)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from qaf.metrics.stats import mcnemar_exact, paired_comparison, wilson_interval


@pytest.mark.parametrize("correct, total", [(0, 1), (1, 1), (0, 50), (50, 50), (3, 7), (9173, 10_000),
                                            (500, 1000), (1, 10_000), (9999, 10_000), (731, 846)])
def test_wilson_interval_is_scipys(correct: int, total: int) -> None:
    expected = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(correct, total)
    assert low == pytest.approx(100 * expected.low, abs=1e-9)
    assert high == pytest.approx(100 * expected.high, abs=1e-9)


def test_wilson_interval_of_the_float_resnet20_by_hand() -> None:
    # 9,173 of 10,000, z = 1.959964: centre (p + z^2/2n) / (1 + z^2/n) = 0.917139,
    # half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) = 0.005400. The normal (Wald)
    # interval would be [91.19, 92.27].
    low, high = wilson_interval(9173, 10_000)
    assert (round(low, 2), round(high, 2)) == (91.17, 92.25)


@pytest.mark.parametrize("b, c", [(0, 0), (0, 5), (5, 0), (1, 9), (3, 1), (10, 10), (7, 20), (619, 422),
                                  (150, 100)])
def test_mcnemar_exact_is_the_two_sided_binomial_test(b: int, c: int) -> None:
    expected = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_mcnemar_exact_by_hand() -> None:
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * P(X = 0), X ~ Bin(5, 1/2)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
    assert mcnemar_exact(4, 4) == 1.0


def test_paired_comparison_by_hand() -> None:
    # Ten images: A right on 7, B on 5; A alone right on images 4, 5, 6, B alone on image 7.
    a = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    b = np.array([1, 1, 1, 1, 0, 0, 0, 1, 0, 0], dtype=bool)
    result = paired_comparison(a, b)
    assert (result.n, result.a_only, result.b_only) == (10, 3, 1)
    assert (result.top1_a, result.top1_b) == pytest.approx((70.0, 50.0))
    assert result.diff == pytest.approx(20.0)
    # var = ((b + c)/n - d^2) / n = (0.4 - 0.04) / 10 = 0.036; half = 1.959964 * 0.189737 = 0.371877
    assert result.ci95 == pytest.approx((-17.1877, 57.1877), abs=1e-4)
    assert result.p_value == pytest.approx(2 * 5 / 16)  # 2 * P(X <= 1), X ~ Bin(4, 1/2)
    assert not result.significant
    swapped = paired_comparison(b, a)
    assert (swapped.a_only, swapped.b_only, swapped.diff) == (1, 3, pytest.approx(-20.0))


def test_a_clear_paired_difference_is_significant() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(2000) < 0.8
    a = b.copy()
    a[np.flatnonzero(~b)[:60]] = True  # A fixes 60 of B's errors and breaks none
    result = paired_comparison(a, b)
    assert (result.a_only, result.b_only) == (60, 0)
    assert result.p_value == pytest.approx(2 * 0.5**60) and result.significant
