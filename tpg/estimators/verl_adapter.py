"""verl's own registered functions as tpg estimators: the exact verdict on the code people ship.

``verl_native("grpo")`` is a callable ``est(ro) -> loss`` that builds, for each independent batch of
``ro`` (the exact engine stacks thousands; verl reduces over whatever it is given, so each batch is
handed to verl alone), the inputs verl's trainer builds — ``token_level_rewards`` (the RM on the last
valid token, minus β·kl_t when a KL-in-reward term is on; GAE gets the MDP's token rewards, as tpg's
``gae``), ``response_mask`` (int64, as the trainer's slice of ``attention_mask``), ``index`` (the group
ids, verl's uid), ``values``, ``reward_baselines``, ``old_log_probs``, ``sum_pi_squared`` — calls
``ADV_ESTIMATOR_REGISTRY[name]`` the way ``ray_trainer.compute_advantage`` does, then
``POLICY_LOSS_REGISTRY[loss]`` on ``ro.logp`` as ``workers/utils/losses.py::ppo_loss`` does, with a real
``AlgoConfig`` / ``ActorConfig``. So ``tpg.report(verl_native("grpo"), mdp, policy, G)`` judges verl's
code, and ``tests/test_verl_conformance.py`` checks it gets the verdicts of tpg's own definitions.

verl is optional and not a dependency of tpg: its declared dependencies pull ray and vllm. Install it
without them (CPU is enough; ray is only imported, never used, and is stubbed when absent)::

    pip install --no-deps verl==0.9.1
    pip install --no-deps tensordict omegaconf antlr4-python3-runtime codetiming   # what core_algos imports

``available()`` says whether it imports; ``verl_native`` raises a TPGError naming the install otherwise.
"""
from __future__ import annotations

import sys
import types

import torch

from tpg.estimators.outcome import _outcome_token_rewards
from tpg.mdp import TPGError
from tpg.rollouts import Rollouts

INSTALL = ("pip install --no-deps verl==0.9.1 tensordict omegaconf antlr4-python3-runtime codetiming "
           "(its declared dependencies pull ray and vllm)")


class _RayStub(types.ModuleType):
    """verl imports ray at module level (``verl/protocol.py``); core_algos never calls it."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def _verl():
    """(core_algos, AlgoConfig, ActorConfig, PolicyLossConfig, version), or a TPGError with the install line."""
    try:
        import ray  # noqa: F401
    except ImportError:
        sys.modules.setdefault("ray", _RayStub("ray"))
    try:
        import verl
        import verl.trainer.ppo.core_algos as ca
        from verl.trainer.config.algorithm import AlgoConfig
        from verl.workers.config.actor import ActorConfig, PolicyLossConfig
    except Exception as e:                                                   # noqa: BLE001 (any import failure)
        raise TPGError(f"verl is not importable ({type(e).__name__}: {e}); install: {INSTALL}") from e
    return ca, AlgoConfig, ActorConfig, PolicyLossConfig, verl.__version__


def available() -> bool:
    try:
        _verl()
        return True
    except TPGError:
        return False


class VerlNative:
    """verl's advantage ``advantage`` × policy loss ``loss`` × ``loss_agg_mode`` ``agg``, run by verl."""

    def __init__(self, advantage: str, loss: str = "vanilla", agg: str = "token-mean", *, pi_sq=None,
                 gamma: float = 1.0, lam: float = 1.0, algo: dict | None = None, policy_loss: dict | None = None,
                 actor: dict | None = None, label: str = "", reward_dtype: torch.dtype = torch.float64):
        ca, AlgoConfig, ActorConfig, PolicyLossConfig, self.version = _verl()
        if advantage not in ca.ADV_ESTIMATOR_REGISTRY:
            raise TPGError(f"unknown verl advantage {advantage!r}; verl {self.version} registers "
                           f"{sorted(ca.ADV_ESTIMATOR_REGISTRY)}")
        if loss not in ca.POLICY_LOSS_REGISTRY:
            raise TPGError(f"unknown verl policy loss {loss!r}; verl {self.version} registers "
                           f"{sorted(ca.POLICY_LOSS_REGISTRY)}")
        if "optimal_token_baseline" in advantage and pi_sq is None:
            raise TPGError(f"verl {advantage} needs pi_sq = tpg.estimators.verl.sum_pi_squared(policy) "
                           "(verl's sum_pi_squared, Σ_a π(a|s)² per state)")
        self.advantage, self.loss, self.agg = advantage, loss, agg
        self.adv_fn, self.loss_fn = ca.ADV_ESTIMATOR_REGISTRY[advantage], ca.POLICY_LOSS_REGISTRY[loss]
        self.pi_sq = None if pi_sq is None else torch.as_tensor(pi_sq, dtype=torch.float64)
        self.gamma, self.lam = float(gamma), float(lam)
        self.reward_dtype = reward_dtype          # the trainer's rewards are float32; float64 keeps verdicts exact
        self.algo = AlgoConfig(gamma=self.gamma, lam=self.lam, **(algo or {}))
        self.actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=1,
                                 policy_loss=PolicyLossConfig(**(policy_loss or {})), **(actor or {}))
        self.name = label or f"verl-native.{advantage}/{loss}/{agg}"
        self.needs = {"values": True} if advantage == "gae" else {"greedy": True} if advantage == "remax" else {}

    def advantages(self, ro: Rollouts) -> torch.Tensor:
        """(B, L) verl's advantages for ONE batch ``ro`` (detached)."""
        mask = ro.mask.long()
        index = ro.group.numpy()
        a = self.advantage
        with torch.no_grad():
            if a == "gae":                                  # trainer: gamma, lam from algorithm config
                adv, _ = self.adv_fn(token_level_rewards=ro.token_rewards * ro.mask, values=ro.extras["values"],
                                     response_mask=mask, gamma=self.gamma, lam=self.lam)
                return adv
            kw = dict(token_level_rewards=_outcome_token_rewards(ro).to(self.reward_dtype), response_mask=mask,
                      config=self.algo)
            if a == "grpo":                                 # trainer: the std flag explicitly
                kw.update(index=index, norm_adv_by_std_in_grpo=self.algo.norm_adv_by_std_in_grpo)
            elif a == "remax":
                kw.update(reward_baselines=ro.extras["greedy_rm"])
            elif a != "reinforce_plus_plus":
                kw.update(index=index)
            if "optimal_token_baseline" in a:
                kw.update(old_log_probs=ro.logp_old, sum_pi_squared=self.pi_sq[ro.states] * ro.mask,
                          rollout_is_weights=None)
            adv, _ = self.adv_fn(**kw)
        return adv.to(torch.float64)

    def __call__(self, ro: Rollouts) -> torch.Tensor:
        if ro.logp is None:
            raise TPGError("the rollouts carry no log-probs: call ro.score(policy) first")
        total = ro.logp.new_zeros(())
        for b in range(ro.n_batches):
            rows = torch.nonzero(ro.batch == b).reshape(-1)
            if rows.numel() == 0:
                continue
            sub = ro.select(rows) if rows.numel() < ro.batch_size else ro
            adv = self.advantages(sub)
            loss, _ = self.loss_fn(old_log_prob=sub.logp_old, log_prob=sub.logp, advantages=adv,
                                   response_mask=sub.mask.long(), loss_agg_mode=self.agg, config=self.actor)
            total = total + loss
        return total


def verl_native(advantage: str, loss: str = "vanilla", agg: str = "token-mean", **options) -> VerlNative:
    """verl's own ``ADV_ESTIMATOR_REGISTRY[advantage]`` and ``POLICY_LOSS_REGISTRY[loss]`` as a tpg estimator
    (``agg`` = the actor's ``loss_agg_mode``, default token-mean as in verl). Options: ``pi_sq`` (the OTB
    estimators), ``gamma``/``lam``, ``algo`` (AlgoConfig fields, e.g. ``{"norm_adv_by_std_in_grpo": False}``),
    ``policy_loss`` (PolicyLossConfig fields, e.g. ``{"dro_beta": 0.1}``), ``actor`` (ActorConfig fields),
    ``reward_dtype`` (float64 by default; ``torch.float32`` is what verl's reward manager produces)."""
    return VerlNative(advantage, loss, agg, **options)
