"""Verdicts: is an estimator unbiased, a scaled gradient, or biased — with the exact bias vector.

``report(est, mdp, policy, G)`` compares the exact E[ĝ] (``tpg.exact.moments``) with the exact
∇J (``tpg.exact.gradient``). The verdict thresholds are tied to float64 round-off, not to taste:

- the engine's own round-off floor δ is measured on every call, as the relative gap between two
  independent float64 routes to ∇J (autograd through J = Σ P(y) RM, and the score-function sum
  Σ P(y) RM ∇log P(y) through the estimator machinery);
- a quantity is called zero when it is below ``RTOL = 1e-10`` relative to ‖∇J‖. RTOL is about
  4.5·10^5 float64 epsilons: far above δ (≈ 1e-16 – 1e-14 on tpg's MDPs, printed in every report)
  and far below the smallest bias of any FALSE claim (≥ 1e-3 on the default MDPs). If δ ever
  exceeds RTOL/100 the verdict is "inconclusive" rather than a guess.

Verdicts: "unbiased" (‖E ĝ − ∇J‖ ≤ RTOL‖∇J‖); "scaled" (E ĝ = c∇J with c ≠ 1: the residual after
the best scale c = ⟨E ĝ, ∇J⟩/‖∇J‖² is ≤ RTOL‖∇J‖); "biased" otherwise.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from tpg import exact
from tpg.mdp import TokenMDP, TPGError

RTOL = 1e-10
VERDICTS = ("unbiased", "scaled", "biased", "inconclusive")


@dataclass
class Report:
    name: str
    grad: torch.Tensor           # ∇J (D,)
    mean: torch.Tensor           # E[ĝ] (D,)
    bias: torch.Tensor           # E[ĝ] − ∇J (D,)
    rel_bias: float              # ‖bias‖ / ‖∇J‖
    scale: float                 # c = ⟨E ĝ, ∇J⟩ / ‖∇J‖²
    residual: float              # ‖E ĝ − c∇J‖ / ‖∇J‖
    cosine: float
    verdict: str
    roundoff: float              # measured δ (see module docstring)
    cov_trace: float | None = None
    notes: tuple = ()
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        v = self.verdict if self.verdict != "scaled" else f"scaled (c = {self.scale:.6g})"
        return (f"{self.name}: {v}; rel. bias {self.rel_bias:.3e}, residual after scaling {self.residual:.3e}, "
                f"cosine {self.cosine:.12f}, round-off δ {self.roundoff:.1e}")

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not isinstance(v, torch.Tensor)}
        d["bias_norm"] = float(self.bias.norm())
        return d


def verdict_of(mean: torch.Tensor, grad: torch.Tensor, roundoff: float = 0.0, rtol: float = RTOL
               ) -> tuple[str, float, float, float, float]:
    """(verdict, rel_bias, scale, residual, cosine) of an expected update against ∇J."""
    gn = float(grad.norm())
    if not math.isfinite(gn) or not torch.isfinite(mean).all():
        raise TPGError("non-finite gradient or expectation: the MDP or estimator produced NaN/inf")
    if gn == 0.0:
        raise TPGError("∇J is exactly zero for this MDP and policy (e.g. constant rewards): no verdict is "
                       "possible; use another seed or reward kind")
    rel = float((mean - grad).norm()) / gn
    c = float(mean @ grad) / gn**2
    resid = float((mean - c * grad).norm()) / gn
    mn = float(mean.norm())
    cos = float(mean @ grad) / (mn * gn) if mn > 0 else 0.0
    if roundoff > rtol / 100:
        return "inconclusive", rel, c, resid, cos
    if rel <= rtol:
        return "unbiased", rel, c, resid, cos
    if resid <= rtol:
        return "scaled", rel, c, resid, cos
    return "biased", rel, c, resid, cos


def roundoff_floor(mdp: TokenMDP, policy, grad: torch.Tensor | None = None) -> float:
    """δ: relative gap between autograd ∇J and the score-function sum Σ P(y) RM(y) ∇log P(y)."""
    tab = exact.tables(mdp, policy)
    grad = exact.gradient(mdp, policy, tab.enum) if grad is None else grad
    W = (tab.prob * tab.enum.rm)[:, None] * tab.enum.mask                              # (N, L)
    sf = exact.expected_score(policy, tab.enum, W)
    return float((sf - grad).norm() / grad.norm().clamp(min=1e-300))


def report(est, mdp: TokenMDP, policy, G: int = 1, *, name: str | None = None, cov: str | None = "trace",
           rtol: float = RTOL, target: torch.Tensor | None = None, **kw) -> Report:
    """Exact verdict for any estimator (registry ``Estimator`` or a user callable with the same
    signature ``est(rollouts) -> EstimatorOutput | loss``) on an MDP, a policy and a group size.

    ``target`` replaces ∇J when a claim compares with another exact vector (e.g. ∇(J − β KL)).
    Other keyword arguments go to ``tpg.exact.moments`` (n_prompts, route, old_policy, critic, ref).
    """
    grad = exact.gradient(mdp, policy) if target is None else target
    delta = roundoff_floor(mdp, policy)
    mo = exact.moments(est, mdp, policy, G, cov=cov, **kw)
    v, rel, c, resid, cos = verdict_of(mo.mean, grad, delta, rtol)
    label = name or getattr(est, "name", None) or getattr(est, "__name__", "estimator")
    return Report(label, grad, mo.mean, mo.mean - grad, rel, c, resid, cos, v, delta, mo.cov_trace, mo.notes)
