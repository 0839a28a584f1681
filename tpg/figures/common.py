"""Helpers shared by several figures: per-position estimators and Monte Carlo covariance traces."""
from __future__ import annotations

import math
from dataclasses import replace

import torch


class AtPosition:
    """The estimator ``est`` with its gradient kept at response position ``t`` (0-based column) only:
    ĝ_t = Σ_i c[i, t] ∇log π(y_it | s_it). The loss is unchanged; only position t's log-prob keeps its
    gradient path, so c (read off the loss by autograd) is zero elsewhere."""

    def __init__(self, est, t: int):
        self.est, self.t = est, int(t)
        self.needs = dict(getattr(est, "needs", {}) or {})
        self.multilinear = bool(getattr(est, "multilinear", True))
        self.name = f"{getattr(est, 'name', 'est')}@{t + 1}"

    def __call__(self, ro):
        keep = torch.zeros_like(ro.mask)
        keep[:, self.t] = 1.0
        logp = ro.logp * keep + ro.logp.detach() * (1.0 - keep)                     # (B, L)
        return self.est(replace(ro, logp=logp))


def mc_cov_trace(est, mdp, policy, G: int, n_batches: int, seed: int, *, critic=None) -> tuple[float, float]:
    """Monte Carlo tr Cov[ĝ] over ``n_batches`` sampled batches (one prompt draw × G responses),
    with its standard error: (trace, se). For estimators whose exact covariance the engine cannot
    give (continuation rollouts). tr Cov = E‖ĝ − Eĝ‖², estimated by the unbiased sample version;
    se from the spread of ‖ĝ_b − ḡ‖² (delta method, n ≥ 10⁴ here)."""
    from tpg.verify import mc_batches
    D = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    z = torch.as_tensor(mc_batches(est, mdp, policy, G, n_batches, torch.Generator().manual_seed(seed),
                                   torch.eye(D, dtype=torch.float64), critic=critic))      # (n, D)
    n = z.shape[0]
    sq = ((z - z.mean(0)) ** 2).sum(1) * (n / (n - 1))                                     # (n,)
    return float(sq.mean()), float(sq.std() / math.sqrt(n))
