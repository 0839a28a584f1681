"""REINFORCE-family advantages: one number per response, broadcast over its tokens (B, L).

Outcome estimators read the response-level reward RM (the reward model's score, which verl's
reward manager puts on the last token, minus a KL-in-reward term when enabled). The oracle and
baseline forms read the MDP's token rewards / state baselines. Equations refer to PAPER.md.
"""
from __future__ import annotations

from typing import Callable

import torch

from tpg.estimators.core import check_gamma, group_stats, is_real, masked_whiten, register_advantage
from tpg.mdp import TPGError
from tpg.rollouts import Rollouts


def _tile(a: torch.Tensor, ro: Rollouts) -> torch.Tensor:
    return a[:, None] * ro.mask                                                   # (B,) → (B, L)


def discounts(ro: Rollouts, gamma: float) -> torch.Tensor:
    """(1, L) γ^(t-1) for t = 1..L."""
    return gamma ** torch.arange(ro.tokens.shape[1], dtype=torch.float64)[None, :]


def rewards_to_go(r: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = Σ_{k≥t} γ^(k-t) r_k along dim 1 (B, L); r is zero after the end of each response."""
    out = torch.zeros_like(r)
    acc = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):                                         # L ≤ H steps, vectorised over B
        acc = r[:, t] + gamma * acc
        out[:, t] = acc
    return out


@register_advantage("reinforce", local=True, exchangeable=True, multilinear=True)
def reinforce(ro: Rollouts) -> torch.Tensor:
    """A_t = RM(x, y) on every token (Theorem 1's single-sample form; the Zero-Reward REINFORCE)."""
    return _tile(ro.rm, ro)


@register_advantage("reinforce_oracle", local=True, exchangeable=True, multilinear=True)
def reinforce_oracle(ro: Rollouts, gamma: float = 1.0, discount_weight: bool = True) -> torch.Tensor:
    """A_t = γ^(t-1) G_t with the TRUE token rewards-to-go G_t (Lemma 1 with Q replaced by its sample).

    ``discount_weight=False`` drops γ^(t-1): the common practical form, biased for γ < 1 (F1).
    """
    gamma = check_gamma(gamma)
    G = rewards_to_go(ro.token_rewards * ro.mask, gamma)
    return G * (discounts(ro, gamma) if discount_weight else 1.0) * ro.mask


@register_advantage("baseline")
def with_baseline(ro: Rollouts, baseline: Callable[[Rollouts], torch.Tensor] | None = None) -> torch.Tensor:
    """A_t = RM − b(s_{t-1}) for a user state baseline b(prefix) → (B, L) (Lemma 2: unbiased for any b)."""
    if baseline is None:
        raise TPGError("estimator 'baseline' needs baseline=callable(rollouts) -> (B, L) values of b(prefix)")
    b = torch.as_tensor(baseline(ro), dtype=torch.float64)
    if b.shape != ro.tokens.shape:
        raise TPGError(f"baseline returned shape {tuple(b.shape)}, expected (B, L) = {tuple(ro.tokens.shape)}")
    return (ro.rm[:, None] - b) * ro.mask


@register_advantage("grpo", local=True, exchangeable=True, multilinear=True)
def grpo(ro: Rollouts, std: bool = True, eps: float = 1e-6, ddof: int = 1) -> torch.Tensor:
    """A_i = (R_i − mean_g R) / (std_g R + ε) (verl ``compute_grpo_outcome_advantage``: Bessel std,
    ε = 1e-6; TRL uses ε = 1e-4). ``std=False`` is the Dr. GRPO advantage R_i − mean_g R. The mean
    includes sample i, so mean-only GRPO has E[ĝ] = (1 − 1/G)∇J (PAPER §3.2). A group with equal
    rewards has std 0 and advantage exactly 0."""
    if not (is_real(eps) and eps >= 0):
        raise TPGError(f"grpo eps (added to the group std) must be a number ≥ 0, got {eps!r}")
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise TPGError(f"grpo ddof must be 0 (population std) or 1 (Bessel, verl), got {ddof!r}")
    mean, sd, _ = group_stats(ro.rm, ro.group, ddof)
    a = ro.rm - mean
    return _tile(a / (sd + eps) if std else a, ro)


@register_advantage("rloo", local=True, exchangeable=True, multilinear=True)
def rloo(ro: Rollouts) -> torch.Tensor:
    """A_i = R_i − mean_{j≠i} R_j = G/(G−1)(R_i − mean_g R) (verl / TRL). Unbiased (baseline
    independent of y_i). A singleton group keeps A = R (verl's loop version)."""
    mean, _, cnt = group_stats(ro.rm, ro.group, ddof=0)
    a = torch.where(cnt > 1, cnt / (cnt - 1).clamp(min=1) * (ro.rm - mean), ro.rm)
    return _tile(a, ro)


def _outcome_token_rewards(ro: Rollouts) -> torch.Tensor:
    """(B, L) verl's token_level_rewards: the task RM on the last token, minus β·kl_t on every token
    when a KL-in-reward term is on (``ro.kl_reward``; ``ro.rm`` then already has Σ_t subtracted)."""
    kl = ro.kl_reward
    task_rm = ro.rm if kl is None else ro.rm + kl.sum(1)                             # (B,)
    r = torch.zeros_like(ro.mask)
    r[torch.arange(ro.batch_size), (ro.lengths - 1).clamp(min=0)] = task_rm
    return (r if kl is None else r - kl) * ro.mask


@register_advantage("remax", needs={"greedy": True}, local=True, exchangeable=True, multilinear=True)
def remax(ro: Rollouts) -> torch.Tensor:
    """A_t = Σ_{k≥t} r_k − RM(ŷ_greedy) (verl ``compute_remax_outcome_advantage``): the reward-to-go
    of the outcome reward, i.e. RM(y) on every token when no KL is in the reward. Unbiased: ŷ is
    deterministic given θ (F11: RM(ŷ) ≠ U(x))."""
    return (rewards_to_go(_outcome_token_rewards(ro), 1.0) - ro.extras["greedy_rm"][:, None]) * ro.mask


@register_advantage("reinforce_pp", local=True, exchangeable=True, multilinear=True)
def reinforce_pp(ro: Rollouts, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: G_t = discounted reward-to-go of the outcome reward, whitened over the batch's
    tokens (verl ``compute_reinforce_plus_plus_outcome_advantage``). Batch mean includes the sample
    and 1/std is random: biased in scale (ESTIMATORS.md §2.6)."""
    G = rewards_to_go(_outcome_token_rewards(ro), check_gamma(gamma))
    return masked_whiten(G, ro.mask, ro.batch, ro.n_batches)


@register_advantage("reinforce_pp_baseline", local=True, exchangeable=True, multilinear=True)
def reinforce_pp_baseline(ro: Rollouts) -> torch.Tensor:
    """REINFORCE++-baseline: A_i = R_i − mean_g R tiled, then whitened over the batch (verl)."""
    mean, _, _ = group_stats(ro.rm, ro.group, ddof=1)
    return masked_whiten(_tile(ro.rm - mean, ro), ro.mask, ro.batch, ro.n_batches)
