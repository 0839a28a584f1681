"""verl's registries as tpg estimators: ``ADV_ESTIMATOR_REGISTRY``, ``POLICY_LOSS_REGISTRY``, ``agg_loss``.

Every name is ``verl.<verl's registry name>`` and follows verl 0.9 ``verl/trainer/ppo/core_algos.py``
(read at tag v0.9.0 and main 1dda039; ZOO.md §1–6 for the traps copied here). verl's entries that
tpg already had under its own names are not repeated: ``gae``, ``grpo`` (= verl ``grpo``, singleton
A = R/(1+ε)), ``rloo`` (= verl's loop ``rloo``, singleton A = R), ``remax``, ``reinforce_pp``
(= ``reinforce_plus_plus``) and ``reinforce_pp_baseline``; ``VERL_NAMES`` maps each verl name to
the tpg name that implements it.

Group statistics use ``ro.group`` (verl's ``index``/uid), batch statistics ``ro.batch`` (one verl
batch): the exact engine stacks thousands of batches, and each must be reduced alone.

Where verl's defaults differ from tpg's: PPO's dual clip is on (c = 3, ``verl.vanilla``); the actor's
aggregation is ``token-mean`` (tpg: ``seq-mean-token-sum``); ``sapo`` and ``geo_mean``
ignore ``loss_agg_mode`` (``gspo`` does not in 0.9.1) (use ``verl_estimator``, which forces the mode they use); divisors
``mask.sum() + 1e-8`` are exact counts because verl's masks are bool (float32 sum: the 1e-8 vanishes).
"""
from __future__ import annotations

import torch

from tpg.estimators.core import (estimator, group_stats, masked_whiten, ppo_clip_loss, register_advantage,
                                 register_aggregation, register_policy_loss, segment_sum)
from tpg.estimators.outcome import _tile, rewards_to_go
from tpg.mdp import TPGError
from tpg.rollouts import Rollouts

# verl registry name -> the tpg estimator that implements it (ZOO §2; every one registered)
VERL_NAMES = {
    "gae": "gae", "grpo": "grpo", "grpo_vectorized": "verl.grpo_vectorized", "gdpo": "verl.gdpo",
    "grpo_passk": "verl.grpo_passk", "reinforce_plus_plus_baseline": "reinforce_pp_baseline", "rloo": "rloo",
    "rloo_vectorized": "verl.rloo_vectorized", "opo": "verl.opo", "reinforce_plus_plus": "reinforce_pp",
    "remax": "remax", "gpg": "verl.gpg", "optimal_token_baseline": "verl.optimal_token_baseline",
    "tir_optimal_token_baseline": "verl.tir_optimal_token_baseline",
}
VERL_LOSSES = ("vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dro",
               "cispo", "bypass_mode")
# Losses whose verl function ignores ``loss_agg_mode`` (ZOO §6 trap 5): the mode they really use.
# verl 0.9.1 ``gspo`` passes the mode it is given (only its default is seq-mean-token-mean; the actor passes
# token-mean): not forced (recorded, tests/test_verl_conformance.py).
FORCED_AGG = {"verl.sapo": "verl.seq-mean-token-mean", "verl.geo_mean": "verl.seq-mean-token-mean"}


def _seg(x: torch.Tensor, ro: Rollouts, by: str) -> torch.Tensor:
    """Per-row sum of x (B,) over the row's group (by="group") or batch (by="batch")."""
    ids = ro.group if by == "group" else ro.batch
    n = int(ids.max()) + 1
    return segment_sum(x, ids, n)[ids]


# ====================================================================================== advantages
@register_advantage("verl.grpo_vectorized", local=True, exchangeable=None)
def grpo_vectorized(ro: Rollouts, epsilon: float = 1e-6) -> torch.Tensor:
    """A_i = (R_i − μ_g)/(σ_g + ε) with μ, σ from ``verl.utils.group_mean_std`` in **float32** (variance
    floor 0, Bessel; singleton μ=0, σ=1). verl ``compute_grpo_vectorized_outcome_advantage``. Through
    the trainer ``norm_adv_by_std_in_grpo`` never reaches it (ZOO §2.3), so it always divides by σ.
    Float32 sums depend on the order of the members: exchangeability is probed, not declared."""
    R = ro.rm.to(torch.float32)                                                   # (B,) float32 island
    ids = ro.group
    n = int(ids.max()) + 1
    cnt = torch.zeros(n, dtype=torch.float32).index_add_(0, ids, torch.ones_like(R))
    mean = torch.zeros(n, dtype=torch.float32).index_add_(0, ids, R) / cnt.clamp_min(1.0)
    c = R - mean[ids]
    var = torch.zeros(n, dtype=torch.float32).index_add_(0, ids, c * c) / (cnt - 1.0).clamp_min(1.0)
    std = torch.sqrt(var.clamp(min=0.0))
    single = cnt <= 1.0
    mean, std = torch.where(single, 0.0, mean), torch.where(single, 1.0, std)
    scores = ro.rm.to(torch.float32)
    return _tile(((scores - mean[ids]) / (std[ids] + epsilon)).to(torch.float64), ro)


@register_advantage("verl.gdpo", local=True, exchangeable=True)
def gdpo(ro: Rollouts, components=None, weights=None, epsilon: float = 1e-6,
         norm_adv_by_std_in_grpo: bool = True) -> torch.Tensor:
    """A = W(Σ_k w_k A^grpo_k)·m: GRPO on each reward component alone, weighted sum, then batch
    whitening (verl ``compute_gdpo_outcome_advantage``). ``components(ro) -> (B, K)`` gives the
    per-response reward components (verl reads them from ``non_tensor_batch`` as float32); without
    it the single component is the RM (verl's fallback). ``weights`` default to 1. The trainer
    does not forward the std flag (ZOO §2.4): keep it True to match the trainer."""
    comps = ro.rm[:, None] if components is None else torch.as_tensor(components(ro)).to(torch.float32).double()
    if comps.dim() != 2 or comps.shape[0] != ro.batch_size:
        raise TPGError(f"gdpo components must return (B, K) = ({ro.batch_size}, K), got {tuple(comps.shape)}")
    w = torch.ones(comps.shape[1], dtype=torch.float64) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float32).double()
    total = torch.zeros_like(ro.rm)
    for k in range(comps.shape[1]):
        mean, sd, _ = group_stats(comps[:, k], ro.group, ddof=1)
        a = comps[:, k] - mean
        total = total + w[k] * (a / (sd + epsilon) if norm_adv_by_std_in_grpo else a)
    return masked_whiten(_tile(total, ro), ro.mask, ro.batch, ro.n_batches)


@register_advantage("verl.grpo_passk", local=True, exchangeable=True)
def grpo_passk(ro: Rollouts, epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True) -> torch.Tensor:
    """Only the group's arg-max row gets A = (R_max − R_2nd)/(σ_g + ε) (σ Bessel; without std: R_max −
    R_2nd); every other row gets 0 (verl ``compute_grpo_passk_outcome_advantage``; the std flag comes
    from the config there). A tie at the top gives R_2nd = R_max, so 0 for all. Raises on a group of
    fewer than 2 rows, as verl does. Without std: E ĝ = (1/G)·∇E[max_j R_j] (leave-one-out max)."""
    R, ids = ro.rm, ro.group
    n = int(ids.max()) + 1
    if int(torch.bincount(ids, minlength=n).min()) < 2:
        raise TPGError("verl.grpo_passk needs at least 2 responses per group (verl raises ValueError); use G ≥ 2")
    top = torch.full((n,), -torch.inf, dtype=R.dtype).scatter_reduce(0, ids, R, "amax")[ids]   # (B,) R_max
    is_top = R == top
    n_top = _seg(is_top.double(), ro, "group")
    others = torch.where(is_top, torch.full_like(R, -torch.inf), R)
    second = torch.full((n,), -torch.inf, dtype=R.dtype).scatter_reduce(0, ids, others, "amax")[ids]
    gap = torch.where(n_top > 1, torch.zeros_like(R), R - second)                # R_max − R_2nd (0 on a tie)
    if norm_adv_by_std_in_grpo:
        _, sd, _ = group_stats(R, ids, ddof=1)
        gap = gap / (sd + epsilon)
    return _tile(torch.where(is_top & (n_top == 1), gap, torch.zeros_like(R)), ro)


@register_advantage("verl.rloo_vectorized", local=True, exchangeable=True)
def rloo_vectorized(ro: Rollouts, epsilon: float = 1e-6) -> torch.Tensor:
    """A_i = (G R_i − Σ_g R)/(G − 1) for G > 1; a **singleton gets 0** (verl
    ``compute_rloo_vectorized_outcome_advantage``; the loop ``rloo`` keeps A = R there)."""
    c = _seg(torch.ones_like(ro.rm), ro, "group")
    a = (c * ro.rm - _seg(ro.rm, ro, "group")) / (c - 1).clamp(min=1) * (c > 1)
    return _tile(a, ro)


@register_advantage("verl.opo", local=True, exchangeable=True)
def opo(ro: Rollouts, epsilon: float = 1e-6) -> torch.Tensor:
    """A_i = R_i − Σ_{j∈g} n_j R_j / Σ_{j∈g} n_j: length-weighted group mean, own row included;
    singleton baseline 0 (verl ``compute_opo_outcome_advantage``)."""
    n = ro.mask.sum(1)                                                            # (B,) lengths
    b = _seg(n * ro.rm, ro, "group") / _seg(n, ro, "group")
    single = _seg(torch.ones_like(ro.rm), ro, "group") <= 1
    return _tile(ro.rm - torch.where(single, torch.zeros_like(b), b), ro)


@register_advantage("verl.gpg", local=True, exchangeable=True)
def gpg(ro: Rollouts, epsilon: float = 1e-6, f_norm: float = 1.0) -> torch.Tensor:
    """A_i = α (R_i − μ_g)/f_norm, α = B / max(#{i: R_i ≠ 0}, 1) over the **whole batch**, a float32
    scalar (verl ``compute_gpg_outcome_advantage``; its ``alpha`` argument is overwritten, σ unused).
    Singleton μ = 0."""
    B = _seg(torch.ones_like(ro.rm), ro, "batch")                                # (B,) rows per batch
    nz = _seg((ro.rm != 0).double(), ro, "batch")
    alpha = (B.to(torch.int64) / nz.clamp(min=1).to(torch.int64)).to(torch.float32).double()  # float32 island
    mean, _, _ = group_stats(ro.rm, ro.group, ddof=1)
    return _tile(alpha * (ro.rm - mean) / f_norm, ro)


def sum_pi_squared(policy) -> torch.Tensor:
    """(S,) Σ_a π(a|s)² per prefix state: the ``sum_pi_squared`` verl's actor computes
    (``actor.calculate_sum_pi_squared``), exactly, for the OTB estimators' option ``pi_sq``."""
    with torch.no_grad():
        return (2 * policy.state_log_probs().to(torch.float64)).exp().sum(-1)


def _otb_baseline(G_: torch.Tensor, Wc: torch.Tensor, m: torch.Tensor, ro: Rollouts, epsilon: float,
                  handle_zero_tail: bool) -> torch.Tensor:
    """(B, L) b_{g,t} = Σ_j m G W / (Σ_j m W + ε) per group and column; singleton 0; zero tail."""
    n_g = int(ro.group.max()) + 1
    num = segment_sum(G_ * Wc * m, ro.group, n_g)[ro.group]                      # (B, L)
    den = segment_sum(Wc * m, ro.group, n_g)[ro.group] + epsilon
    b = num / den
    size = _seg(torch.ones_like(ro.rm), ro, "group")
    b = torch.where(size[:, None] <= 1, torch.zeros_like(b), b)
    if handle_zero_tail:
        n = m.sum(1)                                                              # (B,) lengths
        top = torch.zeros(n_g, dtype=n.dtype).scatter_reduce(0, ro.group, n, "amax", include_self=False)[ro.group]
        at_top = n == top
        n_top = _seg(at_top.double(), ro, "group")
        second = torch.zeros(n_g, dtype=n.dtype).scatter_reduce(
            0, ro.group, torch.where(at_top, torch.zeros_like(n), n), "amax")[ro.group]
        tail = at_top & (n_top == 1) & (size > 1)                                 # the unique longest row
        cols = torch.arange(m.shape[1], dtype=n.dtype)[None, :]
        b = torch.where(tail[:, None] & (cols >= second[:, None]), torch.zeros_like(b), b)
    return b


def _otb_inputs(ro: Rollouts, pi_sq) -> tuple[torch.Tensor, torch.Tensor]:
    if pi_sq is None:
        raise TPGError("verl's optimal-token-baseline estimators need pi_sq = tpg.estimators.verl.sum_pi_squared("
                       "policy) (Σ_a π(a|s)² per state of the rollout policy; verl's sum_pi_squared)")
    S = torch.as_tensor(pi_sq, dtype=torch.float64)[ro.states] * ro.mask          # (B, L)
    w = 1 - 2 * ro.logp_old.exp() + S                                             # ‖∇_θs log π(y_t|s_t)‖² (tabular)
    G_ = rewards_to_go(_outcome_rewards(ro), 1.0)                                 # (B, L) RTG of the outcome reward
    return G_, (w * ro.mask).cumsum(1)


def _outcome_rewards(ro: Rollouts) -> torch.Tensor:
    from tpg.estimators.outcome import _outcome_token_rewards
    return _outcome_token_rewards(ro)


@register_advantage("verl.optimal_token_baseline", local=True, exchangeable=True)
def optimal_token_baseline(ro: Rollouts, pi_sq=None, handle_zero_tail: bool = True, epsilon: float = 1e-8
                           ) -> torch.Tensor:
    """A_t = RTG_t − b_{g,t}, b_{g,t} = Σ_j m G_j W_j / (Σ_j m W_j + ε) per group and **absolute
    position** t, W_t = Σ_{k≤t} m (1 − 2π_k + Σ_a π(a|s_k)²) (verl ``compute_optimal_token_baseline_advantage``;
    π = exp(old log-probs), ``pi_sq`` = ``sum_pi_squared(policy)``). Zero tail: a group's unique longest
    row gets b = 0 from the second-longest length on. Singleton: b = 0. Rollout IS weights: 1."""
    G_, Wc = _otb_inputs(ro, pi_sq)
    return (G_ - _otb_baseline(G_, Wc, ro.mask, ro, epsilon, handle_zero_tail)) * ro.mask


@register_advantage("verl.tir_optimal_token_baseline", local=True, exchangeable=True)
def tir_optimal_token_baseline(ro: Rollouts, pi_sq=None, handle_zero_tail: bool = True, epsilon: float = 1e-8
                               ) -> torch.Tensor:
    """The OTB aligned by **k-th valid token** instead of absolute position: each row's valid tokens are
    compacted to the left, the baseline computed there and scattered back (verl
    ``compute_multi_turn_optimal_token_baseline_advantage``; its docstring says handle_zero_tail
    defaults to False, the code to True). Equal to ``verl.optimal_token_baseline`` on prefix masks."""
    G_, Wc = _otb_inputs(ro, pi_sq)
    order = torch.sort(1 - ro.mask, dim=1, stable=True).indices                   # (B, L) valid columns first
    m_c, G_c, W_c = (x.gather(1, order) for x in (ro.mask, G_, Wc))
    adv_c = (G_c - _otb_baseline(G_c, W_c, m_c, ro, epsilon, handle_zero_tail)) * m_c
    return torch.zeros_like(adv_c).scatter(1, order, adv_c) * ro.mask


# ====================================================================================== aggregation
@register_aggregation("verl.seq-mean-token-mean", local=True, exchangeable=True)
def seq_mean_token_mean_exact(ro: Rollouts, constant=None) -> torch.Tensor:
    """1/(B'·n_i) with the **exact** count n_i: verl's ``mask.sum(-1) + 1e-8`` is float32 for its bool
    masks, where the 1e-8 vanishes (ZOO §6 trap 6); tpg's ``seq-mean-token-mean`` keeps n + 1e-8."""
    B = _seg(torch.ones(ro.batch_size, dtype=ro.mask.dtype), ro, "batch")[:, None]
    return ro.mask / (B * ro.mask.sum(1, keepdim=True))


@register_aggregation("verl.seq-mean-token-sum-norm-longest", local=True, exchangeable=True)
def seq_mean_token_sum_norm_longest(ro: Rollouts, constant=None) -> torch.Tensor:
    """1/(B'·C), C = the longest response of the batch: what the engine path's ``to_padded_tensor()``
    makes of the default C = ``loss_mask.shape[-1]`` (ZOO §1, from reading). A random C."""
    longest = torch.zeros(ro.n_batches, dtype=ro.mask.dtype).scatter_reduce(
        0, ro.batch, ro.mask.sum(1), "amax", include_self=False)[ro.batch][:, None]
    B = _seg(torch.ones(ro.batch_size, dtype=ro.mask.dtype), ro, "batch")[:, None]
    return ro.mask / (B * longest)


# ====================================================================================== policy losses
def _ratio(logp, logp_old):
    return torch.exp(torch.clamp(logp - logp_old, -20.0, 20.0))                  # (B, L)


@register_policy_loss("verl.vanilla", linear=None)
def vanilla(logp, logp_old, adv, mask=None, clip_low: float = 0.2, clip_high: float | None = None,
            clip_ratio_c: float = 3.0):
    """max(−Aρ, −A clip(ρ, 1−ε_l, 1+ε_h)), then min(·, −cA) for A < 0 (verl ``compute_policy_loss_vanilla``).
    **Dual clip on by default** (ActorConfig ``clip_ratio_c = 3.0``); tpg's ``ppo`` has it off."""
    return ppo_clip_loss(logp, logp_old, adv, mask, clip_low, clip_high, clip_ratio_c)


def _dppo(logp, logp_old, adv, valid, clip_ratio_c):
    trunc = torch.clamp(_ratio(logp, logp_old), max=clip_ratio_c).detach()       # sg(min(ρ, c_T))
    return -adv * trunc * logp * valid.detach().double()


@register_policy_loss("verl.dppo_tv", linear=True)
def dppo_tv(logp, logp_old, adv, mask=None, clip_low: float = 0.2, clip_high: float | None = None,
            clip_ratio_c: float = 3.0):
    """−A · sg(min(ρ, c_T)) · log π · v, v = 1 if π − π_old ≤ δ_h (A > 0) or ≥ −δ_l (A ≤ 0), δ in
    probability units (verl ``compute_policy_loss_dppo_tv``). c_T = 3: the function looks up
    ``clip_ratio_c`` with default 20, but ActorConfig always carries 3.0 (ZOO §6 trap 4)."""
    clip_high = clip_low if clip_high is None else clip_high
    d = logp.exp() - logp_old.exp()
    return _dppo(logp, logp_old, adv, torch.where(adv > 0, d <= clip_high, d >= -clip_low), clip_ratio_c)


@register_policy_loss("verl.dppo_kl", linear=True)
def dppo_kl(logp, logp_old, adv, mask=None, clip_low: float = 0.2, clip_high: float | None = None,
            clip_ratio_c: float = 3.0):
    """As ``dppo_tv`` with v from the Bernoulli KL(π_old‖π) of the sampled token ≤ δ, or a move the
    "safe" way (π ≤ π_old for A > 0, π ≥ π_old for A ≤ 0) (verl ``compute_policy_loss_dppo_kl``)."""
    clip_high = clip_low if clip_high is None else clip_high
    p, q = logp.exp(), logp_old.exp()
    bkl = q * (logp_old - logp) + (1 - q) * torch.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
    valid = torch.where(adv > 0, (bkl <= clip_high) | (p <= q), (bkl <= clip_low) | (p >= q))
    return _dppo(logp, logp_old, adv, valid, clip_ratio_c)


@register_policy_loss("verl.gspo", linear=None)
def gspo(logp, logp_old, adv, mask, clip_low: float = 0.2, clip_high: float | None = None):
    """max(−A s, −A clip(s)), s_{i,t} = exp(min(sg(mean_t log ρ_i) + log π − sg(log π), 10)), no dual
    clip (verl ``compute_policy_loss_gspo``). verl 0.9.1 aggregates it with the ``loss_agg_mode`` it is
    given (the function's default is seq-mean-token-mean, the actor passes its token-mean; ZOO §6 trap 5),
    so it is not in ``FORCED_AGG``."""
    clip_high = clip_low if clip_high is None else clip_high
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    seq = ((logp - logp_old) * mask).sum(-1, keepdim=True) / n                  # (B, 1) mean log-ratio
    s = torch.exp(torch.clamp(logp - logp.detach() + seq.detach(), max=10.0))
    return torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - clip_low, 1 + clip_high))


@register_policy_loss("verl.sapo", linear=None)
def sapo(logp, logp_old, adv, mask=None, tau_pos: float = 1.0, tau_neg: float = 1.05):
    """−A · (4/τ) σ(τ(ρ − 1)), τ = τ_pos if A > 0 else τ_neg (verl ``compute_policy_loss_sapo``).
    verl always aggregates it with ``seq-mean-token-mean`` (``FORCED_AGG``): biased by length."""
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    return -adv * torch.sigmoid(tau * (_ratio(logp, logp_old) - 1.0)) * (4.0 / tau)


@register_policy_loss("verl.gpg", linear=True)
def gpg_loss(logp, logp_old, adv, mask=None):
    """−A · log π at any θ (verl ``compute_policy_loss_gpg``)."""
    return -adv * logp


@register_policy_loss("verl.geo_mean", linear=None)
def geo_mean(logp, logp_old, adv, mask, clip_low: float = 0.2, clip_high: float | None = None):
    """GMPO, per row: −Ā_i · exp(mean_t sgn(A) min(sgn(A) log ρ, sgn(A) clamp(log ρ, −ε_l, ε_h))),
    Ā_i = mean_t A, then the **plain mean over rows** (verl ``compute_policy_loss_geo_mean``, which
    ignores the mode and ``global_batch_info``). Written per token as the row loss on each of the
    row's tokens, so the forced ``verl.seq-mean-token-mean`` weight 1/(B n_i) sums to the row mean."""
    clip_high = clip_low if clip_high is None else clip_high
    d = logp - logp_old
    sgn = torch.sign(adv)
    d_min = sgn * torch.minimum(sgn * d, sgn * torch.clamp(d, -clip_low, clip_high))
    n = mask.sum(-1, keepdim=True)                                                # exact count (trap 6)
    ratio = torch.exp((d_min * mask).sum(-1, keepdim=True) / n)                  # (B, 1)
    a_bar = (adv * mask).sum(-1, keepdim=True) / n
    return (-a_bar * ratio) * mask                                                # (B, L) row loss on every token


@register_policy_loss("verl.dro", linear=True)
def dro(logp, logp_old, adv, mask=None, beta: float | None = None):
    """−(A log π − (β/2)(log π − log π_old)²) (verl ``compute_policy_loss_dro``); β =
    ``policy_loss.dro_beta`` has no default (verl raises): required here too."""
    if beta is None or not beta > 0:
        raise TPGError("verl.dro needs loss_options={'beta': β > 0} (verl policy_loss.dro_beta; no default)")
    return -(logp * adv - 0.5 * beta * (logp - logp_old) ** 2)


@register_policy_loss("verl.cispo", linear=True)
def cispo(logp, logp_old, adv, mask=None, clip_low: float = 0.2, clip_high: float | None = None):
    """−sg(clip(ρ, 1−ε_l, 1+ε_h)) · A · log π (verl ``compute_policy_loss_cispo``)."""
    clip_high = clip_low if clip_high is None else clip_high
    return -torch.clamp(_ratio(logp, logp_old), 1 - clip_low, 1 + clip_high).detach() * adv * logp


def _batch_mean(x, mask, ro):
    """(B, 1) mean of x over the valid tokens of each row's batch (verl ``masked_mean`` over the micro-batch)."""
    return (_seg((x * mask).sum(1), ro, "batch") / _seg(mask.sum(1), ro, "batch"))[:, None]


@register_policy_loss("verl.clip_cov", linear=None)
def clip_cov(logp, logp_old, adv, mask, ro=None, clip_low: float = 0.2, clip_high: float | None = None,
             clip_cov_ratio: float = 2e-4, clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0):
    """Vanilla PPO (no dual clip) × corr; verl (``compute_policy_loss_clip_cov``) sets corr = 0 on
    k = max(1, ⌊ratio·N⌋) tokens drawn by ``torch.randperm`` among the unclipped tokens whose
    cov = (A − Ā)(log π − mean log π) lies in (lb, ub). ĝ is linear in corr, so tpg uses its
    **expectation over the randperm**: corr = 1 − min(k, n_elig)/n_elig on the eligible tokens (exact
    for E ĝ; not for second moments). Ā and the log π mean are over each batch's valid tokens."""
    if ro is None:
        raise TPGError("verl.clip_cov needs the batch (ro): use it through tpg.estimator(...)")
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logp - logp_old)
    l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    with torch.no_grad():
        lp = logp.detach()
        cov = (adv - _batch_mean(adv, mask, ro)) * (lp - _batch_mean(lp, mask, ro))
        elig = ((l2 > l1) == 0) & (mask > 0) & (cov > clip_cov_lb) & (cov < clip_cov_ub)
        n_elig = _seg(elig.double().sum(1), ro, "batch")[:, None]
        k = torch.clamp(torch.floor(clip_cov_ratio * _seg(mask.sum(1), ro, "batch")), min=1)[:, None]
        corr = torch.where(elig, 1 - torch.minimum(k, n_elig) / n_elig.clamp(min=1), torch.ones_like(adv))
    return torch.maximum(l1, l2) * corr


@register_policy_loss("verl.kl_cov", linear=None)
def kl_cov(logp, logp_old, adv, mask, ro=None, kl_cov_ratio: float = 2e-4, ppo_kl_coef: float = 0.1):
    """−Aρ (never clipped); the top k = max(1, ⌊ratio·N⌋) tokens of each batch by cov =
    (A − Ā)(log π − mean log π) get + κ|log ρ| (verl ``compute_policy_loss_kl_cov``; κ =
    ``ppo_kl_coef``, 0.1 in PolicyLossConfig, 1.0 as the function's fallback). At ρ = 1 the |·| has
    zero subgradient (torch), so the coefficient is w·A there."""
    if ro is None:
        raise TPGError("verl.kl_cov needs the batch (ro): use it through tpg.estimator(...)")
    ratio = torch.exp(logp - logp_old)
    with torch.no_grad():
        lp = logp.detach()
        cov = torch.where(mask > 0, (adv - _batch_mean(adv, mask, ro)) * (lp - _batch_mean(lp, mask, ro)),
                          torch.full_like(adv, -torch.inf))
        k = torch.clamp(torch.floor(kl_cov_ratio * _seg(mask.sum(1), ro, "batch")), min=1)[:, None]
        # rank of each token's cov within its batch (ties: lower flat index first, as a stable topk)
        flat = cov.reshape(-1)
        b = ro.batch[:, None].expand_as(cov).reshape(-1)
        order = torch.argsort(-flat, stable=True)
        order = order[torch.argsort(b[order], stable=True)]                     # by batch, then cov descending
        rank = torch.empty_like(order)
        start = torch.cumsum(torch.bincount(b, minlength=ro.n_batches), 0) - torch.bincount(b, minlength=ro.n_batches)
        rank[order] = torch.arange(len(order)) - start[b[order]]
        top = (rank.reshape(cov.shape) < k) & (mask > 0)
    return -adv * ratio + top.double() * ppo_kl_coef * (logp - logp_old).abs()


@register_policy_loss("verl.bypass_mode", linear=None)
def bypass_mode(logp, logp_old, adv, mask, loss_type: str = "ppo_clip", rollout_is: str | None = "sequence",
                rollout_is_threshold: float = 2.0, clip_low: float = 0.2, clip_high: float | None = None,
                clip_ratio_c: float = 3.0):
    """Bypass mode: old log-probs := the rollout's (verl ``compute_policy_loss_bypass_mode``).
    loss_type "ppo_clip": ``verl.vanilla`` on ρ = π/π_rollout with no IS weight; "reinforce":
    −A log π · sg(IS), IS = min(Π_t ρ_t, C) per sequence (rollout_is="sequence") or min(ρ_t, C) per
    token ("token"), C = ``rollout_is_threshold`` = 2 (``rollout_correction`` defaults; no rejection)."""
    if loss_type == "ppo_clip":
        return vanilla(logp, logp_old, adv, mask, clip_low, clip_high, clip_ratio_c)
    if loss_type != "reinforce":
        raise TPGError(f"bypass_mode loss_type must be 'ppo_clip' or 'reinforce', got {loss_type!r}")
    with torch.no_grad():
        log_r = (logp - logp_old) * mask
        if rollout_is == "sequence":
            w = torch.exp(torch.clamp(log_r.sum(-1, keepdim=True), -20, 20)).clamp(max=rollout_is_threshold)
        elif rollout_is == "token":
            w = torch.exp(torch.clamp(log_r, -20, 20)).clamp(max=rollout_is_threshold)
        elif rollout_is is None:
            w = torch.ones_like(logp)
        else:
            raise TPGError(f"bypass_mode rollout_is must be 'token', 'sequence' or None, got {rollout_is!r}")
    return -adv * logp * w


# ====================================================================================== KL (verl kl_penalty)
VERL_KL = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "kl+", "abs+", "k2+", "mse+", "k3+",
           "low_var_kl+")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """verl ``kl_penalty``: d = log π − log π_ref; k1/kl: d; abs: |d|; k2/mse: d²/2; k3/low_var_kl:
    e^u − u − 1, u = clamp(−d, ±20), clamped to [−10, 10]. A trailing "+" keeps the base value
    forward and takes the **k2 gradient** (straight-through); "full" raises, as in verl."""
    if kind not in VERL_KL:
        raise TPGError(f"unknown verl KL type {kind!r}; choose one of {VERL_KL} ('full' is not implemented in verl)")
    base = kind.rstrip("+")
    d = logp - ref_logp
    if base in ("k1", "kl"):
        fwd = d
    elif base == "abs":
        fwd = d.abs()
    elif base in ("k2", "mse"):
        fwd = 0.5 * d**2
    else:
        u = torch.clamp(-d, -20.0, 20.0)
        fwd = torch.clamp(torch.exp(u) - u - 1.0, -10.0, 10.0)
    if not kind.endswith("+") or base in ("k2", "mse"):
        return fwd
    k2 = 0.5 * d**2
    return k2 - k2.detach() + fwd.detach()


# ====================================================================================== composition
def verl_estimator(advantage: str, loss: str = "verl.vanilla", agg: str = "token-mean", label: str = "",
                   loss_options: dict | None = None, kl=None, **options):
    """An estimator composed as verl's actor composes it: ``loss_agg_mode`` default token-mean (the
    actor default), except for the losses that ignore it (``FORCED_AGG``). ``advantage`` may be a
    verl registry name (mapped by ``VERL_NAMES``) or a tpg name."""
    adv = VERL_NAMES.get(advantage, advantage)
    if loss in VERL_LOSSES:
        loss = f"verl.{loss}"
    agg = FORCED_AGG.get(loss, agg)
    return estimator(adv, loss=loss, agg=agg, loss_options=loss_options, kl=kl,
                     label=label or f"verl.{advantage}/{loss.removeprefix('verl.')}/{agg}", **options)


# Options the declaration probes (tests/test_trust.py) need to build each estimator on an MDP.
PROBE_OPTIONS = {
    "verl.optimal_token_baseline": lambda mdp, policy: {"pi_sq": sum_pi_squared(policy)},
    "verl.tir_optimal_token_baseline": lambda mdp, policy: {"pi_sq": sum_pi_squared(policy)},
}
