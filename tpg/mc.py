"""Designed Monte Carlo tests (DESIGN §4) for policies too large to enumerate (e.g. a GPT-2).

When the responses cannot be enumerated, E[ĝ] is not available exactly; what can still be tested,
with a designed error rate, is a statement about the MEANS of estimators, by sampling many
independent batches b = 1..n and projecting each batch's estimate onto a few fixed directions u_k:

    z[b, k] = ⟨u_k, ĝ_b⟩ = Σ_{i,t} c_b[i, t] ⟨u_k, ∇θ log π(y_it | s_it)⟩       (DESIGN §2 contract)

The projected scores ⟨u_k, ∇ℓ_it⟩ come from ``tpg.scores.projected_scores`` and c = −∂loss/∂logp
from the estimator (``tpg.batches.projected_estimates``, batch-locality checked), so the very
estimator code of the exact engine is under test, for any policy. ``projected_estimates`` is
tested against a naive per-batch backward pass in tests/test_lm.py.

``paired_test`` is the statistical test: for per-batch paired differences d[b, k] (two estimators
on the SAME batches, e.g. z_REINFORCE − z_RLOO, or z_GRPO − (1 − 1/G) z_REINFORCE), H0 is
E d[·, k] = 0 for every k. It is a two-sided Studentized mean test per direction with
Bonferroni over the K directions, designed so that

- the false-fail rate is ≤ α (default 10⁻⁶) in total: each direction gets α/(2K) — half of its
  Bonferroni share α/K, the other half being a margin for the error of the t approximation at
  these tails, which the test estimates (below) and must find < 100 % (``MCTest.trustworthy``),
  so the true rate is < 2 · α/(2K) per direction; the |t| threshold is t* = t_{n−1}^{-1}(1 − α/(4K));
- the smallest detectable difference (MDD) is reported per direction: a true mean difference of
  size ≥ MDD_k = (t* + z_β) · s_k / √n is detected with probability ≥ 1 − β (default β = 10⁻⁶).
  Tests assert an MDD below the effect of their biased negative control.

Why the sample variance s² is fine at n ≥ 10³ batches: the threshold is the Student t quantile,
exact for normal d whatever the noise in s²; for non-normal d the Studentized mean T obeys
P(|T| > x) = 2(1 − Φ(x)) − 2 q₂(x) φ(x)/n + O(n⁻²) (Hall 1987; the O(n^{-1/2}) skewness term is
even in x and cancels between the two tails), with
q₂(x) = x[κ(x² − 3)/12 − γ²(x⁴ + 2x² − 3)/18 − (x² + 3)/4], γ, κ the skewness and excess
kurtosis of d. The last term is the normal-data part, already in the t quantile; the rest gives a
relative error ≈ M(x) · |x[κ(x² − 3)/12 − γ²(x⁴ + 2x² − 3)/18]| / n at x = t* (M = φ/(1 − Φ) ≈ x,
the Mills ratio), computed from the sample γ, κ on every run (``edgeworth_rel_error``: 5–40 % in
tests/test_lm.py, n = 3000). And s itself is then accurate to a relative s.e. √((κ + 2)/(4n)) ≈ 2 %.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats

from tpg.mdp import TPGError

ALPHA = 1e-6          # total false-fail rate of one test
BETA = 1e-6           # false-pass rate at the smallest detectable difference


# Projections live in one place: ``tpg.scores`` (projected_scores, random_directions) and
# ``tpg.batches.projected_estimates``; this module is the statistical test on top of them.


# ------------------------------------------------------------------------------ the test
def _edgeworth_rel_error(x: float, skew: float, exkurt: float, n: int) -> float:
    """Relative error of the two-sided Student-t tail at threshold x for a Studentized mean of
    non-normal data: the second-order Edgeworth term P(|T| > x) ≈ 2(1 − Φ(x)) − 2 q₂(x) φ(x)/n
    (Hall 1987) without its normal-data part −x(x² + 3)/4, which the t quantile already carries;
    relative to the tail that is |q₂(x)| · Mills(x) / n. The skewness term O(n^{-1/2}) cancels
    between the two tails."""
    q2 = x * (exkurt * (x**2 - 3) / 12 - skew**2 * (x**4 + 2 * x**2 - 3) / 18)
    mills = stats.norm.pdf(x) / stats.norm.sf(x)
    return abs(q2) * mills / n


@dataclass
class MCTest:
    """Result of ``paired_test`` (all per-direction arrays have shape (K,))."""
    name: str
    n: int
    alpha: float
    beta: float
    mean: np.ndarray
    se: np.ndarray
    t: np.ndarray
    threshold: float
    mdd: np.ndarray
    skew: np.ndarray
    exkurt: np.ndarray
    edgeworth_rel_error: float
    passed: bool
    notes: list = field(default_factory=list)

    @property
    def trustworthy(self) -> bool:
        """The false-fail rate is within α: estimated tail error of the t approximation < 100 %."""
        return self.edgeworth_rel_error < 1.0

    def summary(self) -> str:
        v = "PASS (no difference detected)" if self.passed else "FAIL (difference detected)"
        rows = "; ".join(f"u{k}: mean {m:+.3e} ± {s:.1e} (t = {t:+.2f}, MDD {d:.2e})"
                         for k, (m, s, t, d) in enumerate(zip(self.mean, self.se, self.t, self.mdd)))
        return (f"{self.name}: {v} at α = {self.alpha:g}, |t| threshold {self.threshold:.3f}, n = {self.n}; "
                f"{rows}; Edgeworth rel. error {self.edgeworth_rel_error:.2%}")


def paired_test(diffs: torch.Tensor | np.ndarray, name: str = "paired difference", alpha: float = ALPHA,
                beta: float = BETA) -> MCTest:
    """Two-sided test of E d[:, k] = 0 for all k from n independent rows d (n, K) (module docstring).

    Raises TPGError if n < 100 (the variance estimate is not trustworthy at 10⁻⁶ tails). The
    result's ``trustworthy`` is False when the estimated Edgeworth error of the tail is ≥ 100 % (the
    α/2 margin would not cover it): a test that must PASS asserts it; for a negative control, which
    must FAIL, the relevant error is the false-pass rate, bounded through the MDD instead.
    """
    d = np.asarray(torch.as_tensor(diffs, dtype=torch.float64))
    if d.ndim != 2:
        raise TPGError(f"diffs must have shape (n, K), got {d.shape}")
    n, K = d.shape
    if n < 100:
        raise TPGError(f"a designed test at α = {alpha:g} needs n ≥ 100 independent batches, got {n}")
    mean, sd = d.mean(0), d.std(0, ddof=1)                                            # (K,)
    se = sd / math.sqrt(n)
    thr = float(stats.t.isf(alpha / (2 * K) / 2, n - 1))                              # Bonferroni/2 per side
    z_beta = float(stats.norm.isf(beta))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, mean / se, np.where(mean == 0, 0.0, np.inf))
    skew = stats.skew(d, axis=0, bias=False) if n > 2 else np.zeros(K)
    kurt = stats.kurtosis(d, axis=0, bias=False) if n > 3 else np.zeros(K)
    skew, kurt = np.nan_to_num(skew), np.nan_to_num(kurt)
    err = max(_edgeworth_rel_error(thr, float(g), float(k), n) for g, k in zip(skew, kurt))
    return MCTest(name, n, alpha, beta, mean, se, t, thr, (thr + z_beta) * se, skew, kurt, err,
                  bool(np.all(np.abs(t) <= thr)))


def abs_mean_lower_bound(x: torch.Tensor | np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """(K,) lower confidence bounds on |E x[:, k]| (simultaneous over k, confidence 1 − α), from n
    rows x (n, K): max(|mean| − t_{α/(2K)} · s/√n, 0). Used to lower-bound a negative control's true
    effect when it cannot be computed exactly (the MC regime)."""
    x = np.asarray(torch.as_tensor(x, dtype=torch.float64))
    n, K = x.shape
    thr = float(stats.t.isf(alpha / (2 * K), n - 1))
    return np.maximum(np.abs(x.mean(0)) - thr * x.std(0, ddof=1) / math.sqrt(n), 0.0)
