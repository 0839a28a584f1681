"""PPO's advantages: GAE(γ, λ) from a critic's values (verl ``compute_gae_advantage_return``)."""
from __future__ import annotations

import torch

from tpg.estimators.core import check_gamma, is_real, masked_whiten, register_advantage
from tpg.mdp import TPGError
from tpg.rollouts import Rollouts


def gae_advantages(r: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
                   ) -> torch.Tensor:
    """Â_t = δ_t + γλ Â_{t+1}, δ_t = r_t + γ V̂(s_{t+1}) − V̂(s_t), by verl's backward recursion.

    r, values, mask (B, L); values[:, t] is V̂ of the state before token t. On masked positions the
    carried V̂ and Â are unchanged, so the last real token bootstraps from 0 (terminal V = 0).
    """
    B, L = r.shape
    adv = torch.zeros_like(r)
    next_v = torch.zeros(B, dtype=r.dtype)
    last = torch.zeros(B, dtype=r.dtype)
    for t in reversed(range(L)):                                                   # L ≤ H steps, vectorised over B
        m = mask[:, t]
        delta = r[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * last
        next_v = m * values[:, t] + (1 - m) * next_v
        last = m * a + (1 - m) * last
        adv[:, t] = a * m
    return adv


@register_advantage("gae", needs={"values": True}, local=True, exchangeable=True, multilinear=True)
def gae(ro: Rollouts, gamma: float = 1.0, lam: float = 1.0, whiten: bool = False,
        discount_weight: bool = False) -> torch.Tensor:
    """PPO advantage GAE(γ, λ) on the MDP's token rewards with the critic in ``extras["values"]``.

    verl always whitens; tpg defaults to ``whiten=False`` because whitening adds a batch-mean shift
    and a random 1/std scale (biased), and the paper's claims are about the raw advantages.
    ``discount_weight=True`` multiplies by γ^(t-1) (Lemma 1), which practical PPO drops (F1).
    Unbiased with an exact critic for any λ when γ = 1, and for any critic when λ = 1 (PAPER §3.2).
    """
    gamma = check_gamma(gamma)
    if not (is_real(lam) and 0.0 <= lam <= 1.0):
        raise TPGError(f"GAE lam (λ) must be a number in [0, 1] (0: one-step TD, 1: Monte Carlo return), got {lam!r}")
    a = gae_advantages(ro.token_rewards * ro.mask, ro.extras["values"], ro.mask, gamma, lam)
    if discount_weight:
        a = a * gamma ** torch.arange(a.shape[1], dtype=a.dtype)[None, :]
    return masked_whiten(a, ro.mask, ro.batch, ro.n_batches) if whiten else a
