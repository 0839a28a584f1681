"""OpenRLHF's advantage estimators and policy losses (``openrlhf/trainer/ppo_utils/experience_maker.py``
``compute_advantages_and_returns`` / ``get_advantages_and_returns``, ``openrlhf/models/loss.py``
``PolicyLoss``; 0.11, from ZOO.md §8 — OpenRLHF needs flash-attn and is not importable here).

| ``advantage_estimator`` | tpg estimator |
|---|---|
| ``gae`` | ``gae`` (OpenRLHF whitens advantages over the batch too) |
| ``reinforce`` | ``reinforce_pp`` (REINFORCE++: batch-whitened returns) |
| ``rloo`` | ``openrlhf.rloo`` (leave-one-out baseline in the reward, then whitened) |
| ``reinforce_baseline`` | ``reinforce_pp_baseline`` (group mean, then batch whitening) |
| ``group_norm`` | ``openrlhf.group_norm`` ((R − μ_g)/(σ_g + 1e-9), Bessel std) |
| ``dr_grpo`` | ``grpo`` with ``std=False`` |

Policy loss ``ppo`` = tpg ``ppo`` (dual clip off by default); ``gspo`` = ``trl.clip`` with the sequence ratio.
"""
from __future__ import annotations

import torch

from tpg.estimators.core import group_stats, masked_whiten, register_advantage
from tpg.estimators.outcome import _tile
from tpg.rollouts import Rollouts

OPENRLHF_NAMES = {"gae": "gae", "reinforce": "reinforce_pp", "rloo": "openrlhf.rloo",
                  "reinforce_baseline": "reinforce_pp_baseline", "group_norm": "openrlhf.group_norm",
                  "dr_grpo": "grpo"}


@register_advantage("openrlhf.group_norm", local=True, exchangeable=True)
def group_norm(ro: Rollouts) -> torch.Tensor:
    """A_i = (R_i − μ_g)/(σ_g + 1e-9), σ the Bessel std (torch ``std``'s default): OpenRLHF
    ``advantage_estimator="group_norm"`` (GRPO)."""
    mean, sd, _ = group_stats(ro.rm, ro.group, ddof=1)
    return _tile((ro.rm - mean) / (sd + 1e-9), ro)


@register_advantage("openrlhf.rloo", local=True, exchangeable=True)
def rloo(ro: Rollouts) -> torch.Tensor:
    """R_i − mean_{j≠i} R_j, then REINFORCE++ whitening over the batch's tokens (OpenRLHF
    ``advantage_estimator="rloo"``: the baseline is subtracted from the reward, and the returns are
    whitened like ``reinforce``). Biased by the whitening, although the baseline alone is unbiased."""
    mean, _, cnt = group_stats(ro.rm, ro.group, ddof=0)
    a = torch.where(cnt > 1, cnt / (cnt - 1).clamp(min=1) * (ro.rm - mean), ro.rm)
    return masked_whiten(_tile(a, ro), ro.mask, ro.batch, ro.n_batches)
