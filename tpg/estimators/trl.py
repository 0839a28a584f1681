r"""TRL's GRPO options as tpg estimators (``trl/trainer/grpo_trainer.py``, read at main; options in
``trl/trainer/grpo_config.py``). TRL's math is inline in ``GRPOTrainer`` (advantages in
``_generate_and_score_completions``, the loss in ``_compute_loss``), so it is reimplemented here.

A TRL ``loss_type`` is a per-token loss and an aggregation; ``trl_estimator`` composes the pair:

| loss_type | per-token loss | aggregation (tpg name) |
|---|---|---|
| grpo, bnpo, dr_grpo, dapo, luspo | −min(ρA, clip(ρ)A) (``trl.clip``) | grpo: ``verl.seq-mean-token-mean``; bnpo, dapo: ``token-mean`` (bnpo local, dapo global ``num_items_in_batch``: the same on an unsplit batch, see ``tpg.zoo.Split``); dr_grpo: ``seq-mean-token-sum-norm`` with C = max_completion_length; luspo: ``seq-mean-token-sum`` (mean_i \|o_i\|·ℓ_i) |
| cispo | −sg(min(ρ, ε_high))·A·log π (``trl.cispo``) | ``token-mean`` (global) |
| sapo | as verl's (``verl.sapo``, temperatures 1.0 / 1.05) | ``verl.seq-mean-token-mean`` |
| vespo | −sg(φ(w))·A·log π, w = Π_t ρ_t (``trl.vespo``) | ``token-mean`` (global) |

``RLOOTrainer`` (``trl/trainer/rloo_trainer.py``) is ``trl_rloo_estimator``: ``trl.rloo`` × ``trl.rloo_clip``
(sequence-ratio PPO clip) × ``seq-mean-token-sum``, k1 KL in the reward. The off-policy options
(``vllm_importance_sampling_mode``, ``off_policy_mask_threshold``, ``use_bias_correction_kl``) are
settings of ``tpg.zoo.trl_grpo``.

Defaults that differ from verl: ε = 1e-4 in the std; ``scale_rewards="group"``; ``loss_type="dapo"``;
``epsilon_high`` defaults to ``epsilon`` = 0.2, so ``cispo`` caps ρ at 0.2 (at ρ = 1 its update is 0.2×
the others'; the TRL docs recommend ε_high = 5).
"""
from __future__ import annotations

import math

import torch

from tpg.estimators.core import estimator, group_stats, register_advantage, register_policy_loss, segment_sum
from tpg.estimators.outcome import _tile
from tpg.estimators.verl import sapo
from tpg.mdp import TPGError
from tpg.rollouts import Rollouts

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
AGG = {"grpo": "verl.seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
       "dapo": "token-mean", "cispo": "token-mean", "sapo": "verl.seq-mean-token-mean", "luspo": "seq-mean-token-sum",
       "vespo": "token-mean"}
MAX_COMPLETION_LENGTH = None      # dr_grpo's C: None → the MDP horizon (the padded width L)


@register_advantage("trl.grpo", local=True, exchangeable=True)
def grpo(ro: Rollouts, scale_rewards: str = "group") -> torch.Tensor:
    """A_i = (R_i − μ_g)/(σ + 1e-4), σ the group's Bessel std ("group"), the batch's ("batch") or none
    ("none": A = R_i − μ_g). TRL ``GRPOTrainer._generate_and_score_completions`` (sum_then_normalize)."""
    mean, sd, _ = group_stats(ro.rm, ro.group, ddof=1)
    a = ro.rm - mean
    if scale_rewards == "none":
        return _tile(a, ro)
    if scale_rewards == "group":
        return _tile(a / (sd + 1e-4), ro)
    if scale_rewards == "batch":
        n = segment_sum(torch.ones_like(ro.rm), ro.batch, ro.n_batches)
        mu = segment_sum(ro.rm, ro.batch, ro.n_batches) / n
        var = segment_sum((ro.rm - mu[ro.batch]) ** 2, ro.batch, ro.n_batches) / (n - 1).clamp(min=1)
        return _tile(a / (var.sqrt()[ro.batch] + 1e-4), ro)
    raise TPGError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")


def _coef(logp, logp_old, mask, level: str) -> torch.Tensor:
    """ρ per token (level="token") or exp(mean_t log ρ) per sequence ("sequence", GSPO), (B, L) or (B, 1)."""
    d = logp - logp_old
    if level == "token":
        return torch.exp(d)
    if level == "sequence":
        return torch.exp((d * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
    raise TPGError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}")


@register_policy_loss("trl.clip", linear=None)
def clip(logp, logp_old, adv, mask, importance_sampling_level: str = "token", epsilon: float = 0.2,
         epsilon_high: float | None = None, delta: float | None = None):
    """−min(c A, clip(c, 1−ε, 1+ε_high) A), c = ρ per token or the sequence ratio; ``delta`` caps c
    from above (two-sided GRPO). TRL ``_compute_loss`` for grpo/bnpo/dr_grpo/dapo/luspo."""
    eh = epsilon if epsilon_high is None else epsilon_high
    c1 = _coef(logp, logp_old, mask, importance_sampling_level)
    c2 = torch.clamp(c1, 1 - epsilon, 1 + eh)
    if delta is not None:
        c1 = torch.clamp(c1, max=delta)
    return -torch.minimum(c1 * adv, c2 * adv) * mask


@register_policy_loss("trl.cispo", linear=True)
def cispo(logp, logp_old, adv, mask, importance_sampling_level: str = "token", epsilon: float = 0.2,
          epsilon_high: float | None = None):
    """−sg(min(c, ε_high))·A·log π (TRL ``_compute_loss``, loss_type="cispo": clipped from above only;
    ε_high defaults to ε = 0.2)."""
    eh = epsilon if epsilon_high is None else epsilon_high
    return -torch.clamp(_coef(logp, logp_old, mask, importance_sampling_level), max=eh).detach() * adv * logp


@register_policy_loss("trl.sapo", linear=None)
def trl_sapo(logp, logp_old, adv, mask, importance_sampling_level: str = "token",
             sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05):
    """−(4/τ)σ(τ(c − 1))·A (TRL ``_compute_loss``, loss_type="sapo"; = verl's with token-level c)."""
    c = _coef(logp, logp_old, mask, importance_sampling_level)
    tau = torch.where(adv > 0, torch.full_like(adv, sapo_temperature_pos), torch.full_like(adv, sapo_temperature_neg))
    return -torch.sigmoid(tau * (c - 1)) * 4 / tau * adv


@register_policy_loss("trl.vespo", linear=True)
def vespo(logp, logp_old, adv, mask, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
          vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0):
    """−sg(φ(w))·A·log π, φ(w) = exp(λ + k log w − λw), w = exp(Σ_t log ρ_t) (log clamped to
    [log 1e-8, 20]), k, λ by the sign of A (TRL ``GRPOTrainer.get_gamma_weights``). φ(1) = 1."""
    with torch.no_grad():
        lw = torch.clamp((torch.clamp(logp - logp_old, -20.0, 20.0) * mask).sum(-1, keepdim=True), math.log(1e-8), 20.0)
        pos = adv >= 0
        k = torch.where(pos, vespo_k_pos, vespo_k_neg)
        lam = torch.where(pos, vespo_lambda_pos, vespo_lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * lw - lam * torch.exp(lw)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * adv * logp


def trl_estimator(loss_type: str = "dapo", scale_rewards: str = "group", importance_sampling_level: str = "token",
                  max_completion_length: int | None = None, loss_options: dict | None = None, kl=None, label: str = ""):
    """TRL ``GRPOTrainer`` with ``loss_type`` (default "dapo"), ``scale_rewards`` and
    ``importance_sampling_level``: advantage ``trl.grpo`` × the loss and aggregation of the table above."""
    if loss_type not in LOSS_TYPES:
        raise TPGError(f"unknown TRL loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    opts = dict(loss_options or {})
    loss = {"cispo": "trl.cispo", "sapo": "trl.sapo", "vespo": "trl.vespo"}.get(loss_type, "trl.clip")
    if loss != "trl.vespo":
        opts.setdefault("importance_sampling_level", importance_sampling_level)
    agg_constant = float(max_completion_length) if (loss_type == "dr_grpo" and max_completion_length) else None
    return estimator("trl.grpo", loss=loss, agg=AGG[loss_type], agg_constant=agg_constant, loss_options=opts, kl=kl,
                     scale_rewards=scale_rewards,
                     label=label or f"trl.{loss_type}/{scale_rewards}/{importance_sampling_level}")


# ====================================================================================== RLOOTrainer
@register_advantage("trl.rloo", local=True, exchangeable=True)
def rloo(ro: Rollouts, normalize_advantages: bool = False) -> torch.Tensor:
    """A_i = R_i − (Σ_g R − R_i)/(G − 1), a singleton group 0 (TRL ``RLOOTrainer._generate_and_score_completions``;
    R already carries −β Σ_t k1 when the KL is in the reward). ``normalize_advantages``: (A − mean)/(std + 1e-4)
    over the batch, Bessel std (TRL ``nanstd``)."""
    mean, _, cnt = group_stats(ro.rm, ro.group, ddof=0)
    a = torch.where(cnt > 1, cnt / (cnt - 1).clamp(min=1) * (ro.rm - mean), torch.zeros_like(ro.rm))
    if normalize_advantages:
        n = segment_sum(torch.ones_like(a), ro.batch, ro.n_batches)
        mu = segment_sum(a, ro.batch, ro.n_batches) / n
        var = segment_sum((a - mu[ro.batch]) ** 2, ro.batch, ro.n_batches) / (n - 1).clamp(min=1)
        a = (a - mu[ro.batch]) / (var.sqrt()[ro.batch] + 1e-4)
    return _tile(a, ro)


@register_policy_loss("trl.rloo_clip", linear=None)
def rloo_clip(logp, logp_old, adv, mask, epsilon: float = 0.2, epsilon_high: float | None = None):
    """TRL ``RLOOTrainer._compute_loss``: the sequence ratio c_i = exp(Σ_t log π − Σ_t log π_old),
    per-sequence loss −min(c_i A_i, clip(c_i, 1−ε, 1+ε_high) A_i), spread as loss_i/n_i over the
    row's tokens so that ``seq-mean-token-sum`` gives TRL's ``per_sequence_loss.mean()``."""
    eh = epsilon if epsilon_high is None else epsilon_high
    n = mask.sum(-1, keepdim=True).clamp(min=1.0)
    a = (adv * mask).sum(-1, keepdim=True) / n                                         # (B, 1) A_i
    c = torch.exp(((logp - logp_old) * mask).sum(-1, keepdim=True))
    per_seq = -torch.minimum(c * a, torch.clamp(c, 1 - epsilon, 1 + eh) * a)
    return per_seq / n * mask


def trl_rloo_estimator(beta: float = 0.05, normalize_advantages: bool = False, epsilon: float = 0.2,
                       epsilon_high: float | None = None, label: str = ""):
    """TRL ``RLOOTrainer`` (``trl/trainer/rloo_trainer.py``, defaults from ``rloo_config.py``): k1 KL
    summed over the completion and subtracted from the reward (β = 0.05, on θ_old's log-probs),
    leave-one-out advantage, PPO clip on the sequence ratio, mean over sequences."""
    from tpg.estimators.core import KL
    return estimator("trl.rloo", loss="trl.rloo_clip", agg="seq-mean-token-sum",
                     loss_options=dict(epsilon=epsilon, epsilon_high=epsilon_high),
                     kl=KL(beta, "k1", "reward") if beta else None, normalize_advantages=normalize_advantages,
                     label=label or f"trl.RLOOTrainer(β={beta:g}{', norm' if normalize_advantages else ''})")
