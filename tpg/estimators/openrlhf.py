"""OpenRLHF's advantage estimators and policy loss, read from its source (OpenRLHF main 3c3be62):
``openrlhf/trainer/ppo_utils/experience_maker.py`` (``compute_advantages_and_returns``,
``get_advantages_and_returns``, ``get_cumulative_returns``), ``openrlhf/models/utils.py``
(``compute_reward``, ``compute_approx_kl``), ``openrlhf/models/loss.py`` (``PolicyLoss``,
``aggregate_loss``), ``openrlhf/cli/train_ppo_ray.py`` (defaults). OpenRLHF needs deepspeed and
flash-attn, so it is reimplemented here.

``compute_advantages_and_returns`` in three steps:

1. reward shaping on the per-response reward R (groups of ``n_samples_per_prompt``): ``rloo``
   R − (Σ_g R − R)/(G − 1); ``reinforce_baseline`` and ``dr_grpo`` R − mean_g R; ``group_norm``
   (R − mean_g R)/(std_g R + 1e-9), Bessel std (torch ``std``); ``gae``/``reinforce`` R unchanged;
2. ``compute_reward``: the shaped R on the last response token, −β·kl_t on every token (KL in the
   reward, the default: ``--algo.kl.init_coef`` 0.01, estimator k1, on θ_old's log-probs), then
   returns-to-go with γ (forced to 1 for the group estimators) — or GAE with the critic for ``gae``;
3. whitening, for ``gae``, ``reinforce`` and ``reinforce_baseline`` only: over all tokens of the
   rollout batch, mean and **biased** variance (÷N), (A − mean)·rsqrt(max(var, 1e-8)) (OpenRLHF does
   this in float32; tpg in float64). ``no_std_norm`` keeps the mean shift only. ``rloo``,
   ``group_norm`` and ``dr_grpo`` are **not** whitened.

The group estimators require G > 1 (``train_ppo_ray.py`` asserts it).

| ``--algo.advantage.estimator`` | tpg estimator |
|---|---|
| ``gae`` | ``openrlhf.gae`` |
| ``reinforce`` | ``openrlhf.reinforce`` |
| ``rloo`` | ``openrlhf.rloo`` |
| ``reinforce_baseline`` | ``openrlhf.reinforce_baseline`` |
| ``group_norm`` | ``openrlhf.group_norm`` |
| ``dr_grpo`` | ``openrlhf.dr_grpo`` |

``PolicyLoss``: ``ppo`` is tpg ``ppo`` (clip ε = 0.2 both sides, dual clip off by default,
``--actor.dual_clip``); ``gspo`` is ``trl.clip`` at sequence level (the ratio exp(mean_t log ρ)).
Aggregation (``aggregate_loss``): token-level by default (Σ mℓ / the optimizer step's token count:
``token-mean`` on an unsplit batch), ``gspo`` forces the per-sample mode (each sequence's token mean,
then the mean over sequences: ``verl.seq-mean-token-mean``). The KL loss (``--algo.kl.use_loss``)
is always token-level. The vLLM IS correction is ``tpg.zoo.openrlhf_vllm_is``.
"""
from __future__ import annotations

import torch

from tpg.estimators.core import check_gamma, estimator, group_stats, register_advantage, segment_sum
from tpg.estimators.gae import gae_advantages
from tpg.estimators.outcome import rewards_to_go
from tpg.mdp import TPGError
from tpg.rollouts import Rollouts

OPENRLHF_NAMES = {"gae": "openrlhf.gae", "reinforce": "openrlhf.reinforce", "rloo": "openrlhf.rloo",
                  "reinforce_baseline": "openrlhf.reinforce_baseline", "group_norm": "openrlhf.group_norm",
                  "dr_grpo": "openrlhf.dr_grpo"}
WHITENED = ("gae", "reinforce", "reinforce_baseline")


def whiten(a: torch.Tensor, mask: torch.Tensor, ro: Rollouts, no_std_norm: bool = False) -> torch.Tensor:
    """OpenRLHF's advantage normalisation per batch: mean and biased variance over the batch's
    response tokens, (A − mean)·rsqrt(clamp(var, min=1e-8)); ``no_std_norm``: A − mean."""
    n = segment_sum(mask.sum(1), ro.batch, ro.n_batches)                              # (n_batches,)
    mean = segment_sum((a * mask).sum(1), ro.batch, ro.n_batches) / n
    centred = (a - mean[ro.batch][:, None]) * mask
    if no_std_norm:
        return centred
    var = segment_sum((centred**2).sum(1), ro.batch, ro.n_batches) / n
    return centred * torch.rsqrt(var.clamp(min=1e-8))[ro.batch][:, None]


def _task_reward(ro: Rollouts) -> torch.Tensor:
    """(B,) R before the KL-in-reward term (tpg's KL in the reward subtracts Σ_t β kl_t from ro.rm)."""
    return ro.rm if ro.kl_reward is None else ro.rm + ro.kl_reward.sum(1)


def _shaped_token_rewards(ro: Rollouts, shaped: torch.Tensor) -> torch.Tensor:
    """``compute_reward``: shaped R (B,) at the last response token, − β·kl_t on every token (B, L)."""
    r = torch.zeros_like(ro.mask)
    r[torch.arange(ro.batch_size), (ro.lengths - 1).clamp(min=0)] = shaped
    if ro.kl_reward is not None:
        r = r - ro.kl_reward
    return r * ro.mask


def _group(ro: Rollouts, kind: str) -> torch.Tensor:
    R = _task_reward(ro)
    mean, sd, cnt = group_stats(R, ro.group, ddof=1)
    if bool((cnt < 2).any()):
        raise TPGError(f"OpenRLHF {kind} requires n_samples_per_prompt > 1 (train_ppo_ray.py asserts it): use G ≥ 2")
    if kind == "rloo":
        return R - (mean * cnt - R) / (cnt - 1)
    if kind == "group_norm":
        return (R - mean) / (sd + 1e-9)
    return R - mean                                                                   # reinforce_baseline, dr_grpo


@register_advantage("openrlhf.reinforce", local=True, exchangeable=True)
def reinforce(ro: Rollouts, gamma: float = 1.0, no_std_norm: bool = False) -> torch.Tensor:
    """Returns-to-go (γ) of R at the last token − β kl_t, then whitened (``advantage.estimator=reinforce``)."""
    G = rewards_to_go(_shaped_token_rewards(ro, _task_reward(ro)), check_gamma(gamma))
    return whiten(G, ro.mask, ro, no_std_norm)


@register_advantage("openrlhf.reinforce_baseline", local=True, exchangeable=True)
def reinforce_baseline(ro: Rollouts, no_std_norm: bool = False) -> torch.Tensor:
    """R − mean_g R at the last token − β kl_t, returns-to-go (γ = 1), then whitened."""
    G = rewards_to_go(_shaped_token_rewards(ro, _group(ro, "reinforce_baseline")), 1.0)
    return whiten(G, ro.mask, ro, no_std_norm)


@register_advantage("openrlhf.rloo", local=True, exchangeable=True)
def rloo(ro: Rollouts) -> torch.Tensor:
    """R − (Σ_g R − R)/(G − 1) at the last token − β kl_t, returns-to-go (γ = 1); **not** whitened."""
    return rewards_to_go(_shaped_token_rewards(ro, _group(ro, "rloo")), 1.0) * ro.mask


@register_advantage("openrlhf.group_norm", local=True, exchangeable=True)
def group_norm(ro: Rollouts) -> torch.Tensor:
    """(R − μ_g)/(σ_g + 1e-9), Bessel σ, at the last token − β kl_t, returns-to-go (GRPO); not whitened."""
    return rewards_to_go(_shaped_token_rewards(ro, _group(ro, "group_norm")), 1.0) * ro.mask


@register_advantage("openrlhf.dr_grpo", local=True, exchangeable=True)
def dr_grpo(ro: Rollouts) -> torch.Tensor:
    """R − μ_g at the last token − β kl_t, returns-to-go; not whitened (Dr. GRPO's advantage)."""
    return rewards_to_go(_shaped_token_rewards(ro, _group(ro, "dr_grpo")), 1.0) * ro.mask


@register_advantage("openrlhf.gae", needs={"values": True}, local=True, exchangeable=True)
def gae(ro: Rollouts, gamma: float = 1.0, lam: float = 1.0, no_std_norm: bool = False) -> torch.Tensor:
    """GAE(γ, λ) (``get_advantages_and_returns``, defaults γ = λ = 1) on R at the last token − β kl_t
    with the critic's values, then whitened."""
    a = gae_advantages(_shaped_token_rewards(ro, _task_reward(ro)), ro.extras["values"] * ro.mask, ro.mask,
                       check_gamma(gamma), float(lam))
    return whiten(a, ro.mask, ro, no_std_norm)


def openrlhf_estimator(advantage: str = "gae", policy_loss_type: str = "ppo", eps_clip: float = 0.2,
                       dual_clip: float | None = None, kl=None, label: str = "", **options):
    """OpenRLHF's trainer: ``advantage`` an ``--algo.advantage.estimator`` name, ``policy_loss_type``
    "ppo" (token-level loss) or "gspo" (sequence ratio, per-sample loss); ``kl`` a ``tpg.KL`` (OpenRLHF:
    in the reward by default, k1; ``use_loss`` → in the loss, token-level)."""
    if advantage not in OPENRLHF_NAMES:
        raise TPGError(f"unknown OpenRLHF advantage estimator {advantage!r}; choose one of {tuple(OPENRLHF_NAMES)}")
    if policy_loss_type == "ppo":
        loss, agg, lo = "ppo", "token-mean", {}
        kw = dict(clip=eps_clip, dual_clip=dual_clip)
    elif policy_loss_type == "gspo":
        loss, agg, kw = "trl.clip", "verl.seq-mean-token-mean", {}
        lo = dict(importance_sampling_level="sequence", epsilon=eps_clip)
        if dual_clip is not None:
            raise TPGError("tpg's OpenRLHF gspo has no dual clip")
    else:
        raise TPGError(f"OpenRLHF policy_loss_type must be 'ppo' or 'gspo', got {policy_loss_type!r}")
    if kl is not None and kl.where == "loss" and agg != "token-mean":
        raise TPGError("OpenRLHF aggregates the KL loss per token while gspo's policy loss is per sample: "
                       "tpg composes one aggregation, so KL in the loss is supported with policy_loss_type='ppo' only")
    return estimator(OPENRLHF_NAMES[advantage], loss=loss, agg=agg, loss_options=lo, kl=kl,
                     label=label or f"openrlhf.{advantage}/{policy_loss_type}", **kw, **options)
