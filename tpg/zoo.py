"""The estimator zoo: every library loss, and the settings that change its verdict, judged exactly.

Settings are estimator wrappers (any callable ``est(ro) -> loss`` works with ``tpg.report``), so the
exact engine needs no change:

- ``Configured(est, split=k, norm=...)``: each batch split into k micro-batches / accumulation steps /
  data-parallel ranks (equal parts, in row order). Advantages are computed on the whole batch first
  (verl ``compute_advantage`` and TRL's scoring run before the split). ``norm="global"``: each part
  normalised by the whole batch's count (verl ``batch_num_tokens``/``global_batch_size`` with
  ``dp_size``, TRL ``dapo``'s ``num_items_in_batch``) — the update equals the unsplit one;
  ``norm="local"``: each part normalised by its own count and the k gradients averaged (TRL
  ``bnpo``/``grpo`` with ``loss / gradient_accumulation_steps``, DDP's average over ranks).
- three policies (``report(..., policy=θ, old_policy=θ_old, rollout_policy=μ)``): the batches are
  drawn from the rollout engine μ (``ro.logp_rollout``), the trainer recomputes θ_old's log-probs
  (``ro.logp_old``: the PPO ratio's denominator) and trains θ (``ro.logp``). Every library's
  correction weighs each token's loss by a detached function of ρ = π_old/μ (verl
  ``rollout_corr_helper``, TRL ``_generate_and_score_completions``, OpenRLHF ``PolicyLoss``):
  ``Configured(est, rollout_is=mode, C=..., C_min=...)`` with "token_truncate" clamp(ρ_t, C_min, C)
  (TIS; verl ``rollout_is="token"``, TRL "token_truncate", OpenRLHF "tis"), "token_mask"
  ρ_t·[C_min ≤ ρ_t ≤ C] (IcePop; verl's "lower_upper" threshold, TRL "token_mask", OpenRLHF
  "icepop"), "sequence_truncate" / "sequence_mask" the same on Π_t ρ_t (verl
  ``rollout_is="sequence"``, TRL's default "sequence_mask"), "seq_mask_tis" ρ_t·[C_min ≤
  exp(mean_t log ρ_t) ≤ C] (OpenRLHF), or "none" (the mismatch ignored). ``rollout_rs`` (verl's
  grammar, e.g. "token_k1,seq_mean_k3") rejects tokens / sequences before the advantage is
  computed (verl edits ``response_mask``); ``bypass=True`` is verl's bypass mode (θ_old := μ);
  ``off_policy_mask=δ`` is TRL's off-policy sequence mask. The target is ∇J(θ). The façades
  ``verl_rollout_correction``, ``trl_grpo`` and ``openrlhf_vllm_is`` take each library's options.
- ``Configured(est, kl=(β, kind, where))``: any verl KL type (k1, abs, k2, k3 and the "+"
  straight-through forms), in the reward (detached, on the behaviour log-probs, verl
  ``apply_kl_penalty``) or in the loss (aggregated like the policy loss, verl ``use_kl_loss``);
  ``kl_ratio="token"`` multiplies the KL term by the (attached) PPO ratio π/π_old (TRL
  ``use_bias_correction_kl``).
- several PPO epochs need no wrapper: ``report(est, mdp, policy=θ, old_policy=θ_old)``.

``run_zoo`` builds the verdict matrix (``tpg zoo``), ``to_markdown`` renders it for the README.
"""
from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import dataclass, field, replace

import torch

from tpg import exact
from tpg.estimators.core import AGGREGATIONS, KL, POLICY_LOSSES, Estimator, agg_weights, estimator, kl_penalty
from tpg.estimators import verl as V
from tpg.estimators import trl as T
from tpg.estimators import openrlhf as O  # noqa: F401  (registration)
from tpg.mdp import TPGError
from tpg.rollouts import Rollouts

IS_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "seq_mask_tis")
NORMS = ("global", "local")
# verl rollout_corr_helper.SUPPORTED_ROLLOUT_RS_OPTIONS
VERL_RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
                   "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")


def _within_batch_position(ro: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) position of each row inside its batch (in row order) and (B,) its batch's size."""
    size = torch.bincount(ro.batch, minlength=ro.n_batches)                      # (n_batches,)
    order = torch.argsort(ro.batch, stable=True)
    start = torch.cumsum(size, 0) - size
    pos = torch.empty_like(order)
    pos[order] = torch.arange(ro.batch_size) - start[ro.batch[order]]
    return pos, size[ro.batch]


def parse_verl_rs(rollout_rs: str, threshold) -> list[tuple[str, float | None, float]]:
    """verl ``_parse_rollout_rs_thresholds``: [(option, lower, upper)] for a comma-separated
    ``rollout_rs`` and one shared threshold or one per option; k1 options take "lower_upper" (a
    single upper u means [1/u, u]), the others a single upper bound."""
    if not isinstance(rollout_rs, str) or not rollout_rs.strip():
        raise TPGError(f"rollout_rs must be a non-empty string such as 'token_k1' or 'seq_mean_k3,token_k1', got {rollout_rs!r}")
    opts = list(dict.fromkeys(o.strip() for o in rollout_rs.split(",") if o.strip()))
    for o in opts:
        if o not in VERL_RS_OPTIONS:
            raise TPGError(f"invalid rollout_rs option {o!r}; verl's options are {VERL_RS_OPTIONS}")
    if threshold is None:
        raise TPGError("rollout_rs_threshold must be given when rollout_rs is (verl raises too)")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, str)):
        raise TPGError(f"rollout_rs_threshold must be a number or a string, got {threshold!r}")
    specs = [str(threshold)] if not isinstance(threshold, str) else [x.strip() for x in threshold.split(",") if x.strip()]
    if len(specs) not in (1, len(opts)):
        raise TPGError(f"rollout_rs_threshold needs one threshold or {len(opts)} (one per option), got {threshold!r}")
    specs = specs * len(opts) if len(specs) == 1 else specs
    out = []
    for o, sp in zip(opts, specs):
        if not o.endswith("k1") and "_" in sp:
            raise TPGError(f"rollout_rs_threshold for {o!r} is a single upper bound, got {sp!r}")
        try:
            if o.endswith("k1"):
                lo, hi = (float(x) for x in sp.split("_", 1)) if "_" in sp else (1.0 / float(sp), float(sp))
            else:
                lo, hi = None, float(sp)
        except ValueError:
            raise TPGError(f"invalid numeric threshold {sp!r} for rollout_rs option {o!r}") from None
        if hi <= 0 or (lo is not None and (lo <= 0 or lo > hi)):
            raise TPGError(f"thresholds for {o!r} must be positive with lower ≤ upper, got {sp!r}")
        out.append((o, lo, hi))
    return out


def verl_rs_keep(log_r: torch.Tensor, mask: torch.Tensor, parsed) -> torch.Tensor:
    """(B, L) 0/1 keep mask of verl ``compute_rollout_rejection_mask`` on log_r = log π_old/μ:
    token_k1 = −log_r in [log lo, log hi]; k2 = ½log_r² ≤ u; k3 = e^{log_r} − 1 − log_r ≤ u; seq_sum /
    seq_mean / seq_max of a token statistic over the valid tokens; all options must pass."""
    lr = torch.clamp(log_r, -20.0, 20.0)
    stats = {"k1": -lr, "k2": 0.5 * lr**2, "k3": torch.exp(lr) - 1.0 - lr}
    n = mask.sum(1, keepdim=True)
    keep = torch.ones_like(mask)
    for opt, lo, hi in parsed:
        level, k = opt.rsplit("_", 1)
        x = stats[k]
        if level == "seq_sum":
            x = (x * mask).sum(1, keepdim=True)
        elif level == "seq_mean":
            x = (x * mask).sum(1, keepdim=True) / n.clamp(min=1.0)
        elif level == "seq_max":
            x = torch.where(mask > 0, x, torch.full_like(x, -math.inf)).max(1, keepdim=True).values
        ok = (x >= math.log(lo)) & (x <= math.log(hi)) if k == "k1" else (x <= hi)
        keep = keep * ok.to(mask.dtype).expand_as(mask)
    return keep


@dataclass(frozen=True)
class Configured:
    """A tpg ``Estimator`` run under a training setting (module docstring): ``split`` parts with a
    ``norm`` convention; a rollout-engine correction ``rollout_is`` with bounds ``C_min``/``C`` on
    ρ = π_old/μ, verl's rejection ``rollout_rs``/``rollout_rs_threshold``, verl's ``bypass`` mode,
    TRL's ``off_policy_mask`` δ; a KL term ``kl = (β, kind, where)`` (``kl_ratio``: TRL's
    bias-corrected KL). Callable: ``est(ro) -> loss``, as ``tpg.report`` expects."""
    est: Estimator
    split: int = 1
    norm: str = "global"
    rollout_is: str | None = None
    C: float | None = 2.0
    kl: tuple | None = None
    name: str = ""
    C_min: float | None = None
    rollout_rs: str | None = None
    rollout_rs_threshold: object = None
    bypass: bool = False
    off_policy_mask: float | None = None
    kl_ratio: str | None = None

    def __post_init__(self):
        if not isinstance(self.est, Estimator):
            raise TPGError(f"Configured wraps a tpg Estimator (tpg.estimator(...)), got {self.est!r}")
        if isinstance(self.split, bool) or not isinstance(self.split, int) or self.split < 1:
            raise TPGError(f"split must be an int ≥ 1 (micro-batches / accumulation steps / ranks), got {self.split!r}")
        if self.norm not in NORMS:
            raise TPGError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.rollout_is is not None and self.rollout_is not in IS_MODES:
            raise TPGError(f"rollout_is must be None or one of {IS_MODES}, got {self.rollout_is!r}")
        for nm, v in (("C", self.C), ("C_min", self.C_min)):
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                raise TPGError(f"the IS bound {nm} must be None or a number > 0, got {v!r}")
        if self.C is not None and self.C_min is not None and self.C_min > self.C:
            raise TPGError(f"the IS bounds need C_min ≤ C, got C_min={self.C_min}, C={self.C}")
        if self.rollout_rs is not None:
            object.__setattr__(self, "_rs", parse_verl_rs(self.rollout_rs, self.rollout_rs_threshold))
        if self.bypass and self.rollout_is is not None:
            raise TPGError("bypass mode computes its IS weights inside the loss (verl.bypass_mode): leave rollout_is None")
        if self.off_policy_mask is not None and not isinstance(self.off_policy_mask, (int, float)):
            raise TPGError(f"off_policy_mask is TRL's δ (a number), got {self.off_policy_mask!r}")
        if self.kl_ratio not in (None, "token", "sequence"):
            raise TPGError(f"kl_ratio must be None, 'token' or 'sequence', got {self.kl_ratio!r}")
        if self.kl is not None:
            if self.est.kl is not None:
                raise TPGError("give the KL either to the estimator or to Configured, not both")
            beta, kind, where = self.kl
            if kind not in V.VERL_KL or where not in ("reward", "loss") or not beta >= 0:
                raise TPGError(f"kl must be (β ≥ 0, kind in {V.VERL_KL}, 'reward' | 'loss'), got {self.kl!r}")
        if self.kl_ratio is not None and not (self.kl is not None and self.kl[2] == "loss"):
            raise TPGError("kl_ratio multiplies a KL term in the loss: give kl=(β, kind, 'loss') too")
        if not self.name:
            parts = [self.est.name]
            if self.split > 1:
                parts.append(f"split={self.split}/{self.norm}")
            if self.rollout_is is not None:
                b = f"C={self.C:g}" if self.C is not None else "C=∞"
                parts.append(f"IS={self.rollout_is}({b}" + (f", C_min={self.C_min:g})" if self.C_min else ")"))
            if self.rollout_rs is not None:
                parts.append(f"RS={self.rollout_rs}({self.rollout_rs_threshold})")
            if self.bypass:
                parts.append("bypass")
            if self.off_policy_mask is not None:
                parts.append(f"OPSM(δ={self.off_policy_mask:g})")
            if self.kl is not None:
                parts.append(f"KL={self.kl[1]}@{self.kl[2]}(β={self.kl[0]:g})" + ("·ratio" if self.kl_ratio else ""))
            object.__setattr__(self, "name", " ".join(parts))

    @property
    def needs(self) -> dict:
        nd = dict(self.est.needs)
        if self.kl is not None:
            nd["ref"] = True
        return nd

    def declared(self, prop: str) -> bool | None:
        """Every setting acts row by row (IS weights, rejection, OPSM, KL) or per batch (the
        aggregation), so batch-locality and exchangeability are the estimator's own — except that a
        split into parts by row position is not exchangeable (probed). Multilinearity is probed."""
        if prop == "local":
            return self.est.declared("local")
        if prop == "exchangeable" and self.split == 1:
            return self.est.declared("exchangeable")
        return None

    # ---------------------------------------------------------------------------------- the math
    def __call__(self, ro: Rollouts) -> torch.Tensor:
        if ro.logp is None:
            raise TPGError("the rollouts carry no log-probs: call ro.score(policy) first")
        mu = ro.logp_old if ro.logp_rollout is None else ro.logp_rollout               # (B, L) log μ
        if self.bypass:                                                                # verl bypass: θ_old := μ
            ro = replace(ro, logp_old=mu)
        with torch.no_grad():                                                          # log π_old/μ (bypass: π/μ)
            log_r = ((ro.logp.detach() if self.bypass else ro.logp_old) - mu) * ro.mask
        token_w = self._is_weights(log_r, ro.mask) if self.rollout_is is not None else torch.ones_like(ro.mask)
        if self.rollout_rs is not None:                                                # rejection edits the mask
            ro = replace(ro, mask=ro.mask * verl_rs_keep(log_r, ro.mask, self._rs))
        if self.kl is not None and self.kl[2] == "reward":
            beta, kind, _ = self.kl
            kl_tok = beta * V.kl_penalty(ro.logp_old, ro.extras["ref_logp"], kind).detach() * ro.mask   # (B, L)
            ro = replace(ro, token_rewards=ro.token_rewards - kl_tok, rm=ro.rm - kl_tok.sum(1), kl_reward=kl_tok)
        adv = self.est(ro).advantages                                                # (B, L) on the whole batch
        loss_fn = POLICY_LOSSES[self.est.loss].fn
        ctx = {"ro": ro} if "ro" in inspect.signature(loss_fn).parameters else {}
        per_tok = loss_fn(ro.logp, ro.logp_old, adv, ro.mask, **self.est._loss_kwargs(), **ctx) * token_w
        if self.off_policy_mask is not None:                                         # TRL get_off_policy_mask
            with torch.no_grad():
                n = ro.mask.sum(1, keepdim=True).clamp(min=1.0)
                seq_kl = ((mu - ro.logp.detach()) * ro.mask).sum(1, keepdim=True) / n
                keep = ((adv >= 0) | (seq_kl <= self.off_policy_mask)).to(per_tok.dtype)
            per_tok = per_tok * keep
        w = self._weights(ro)                                                        # (B, L) aggregation
        loss = (w * per_tok).sum()
        if self.est.kl is not None and self.est.kl.where == "loss":
            loss = loss + self.est.kl.coef * (w * kl_penalty(ro.logp, ro.extras["ref_logp"], self.est.kl.kind)).sum()
        if self.kl is not None and self.kl[2] == "loss":
            kl_tok = V.kl_penalty(ro.logp, ro.extras["ref_logp"], self.kl[1])
            if self.kl_ratio == "token":                                             # TRL: × coef_1, attached
                kl_tok = kl_tok * torch.exp(ro.logp - ro.logp_old)
            elif self.kl_ratio == "sequence":
                n = ro.mask.sum(1, keepdim=True).clamp(min=1.0)
                kl_tok = kl_tok * torch.exp(((ro.logp - ro.logp_old) * ro.mask).sum(1, keepdim=True) / n)
            loss = loss + self.kl[0] * (w * kl_tok).sum()
        return loss

    def _weights(self, ro: Rollouts) -> torch.Tensor:
        """Aggregation weights: the whole batch's ("global", or split = 1), or each part's own,
        averaged over the k parts ("local")."""
        if self.split == 1 or self.norm == "global":
            return agg_weights(ro, self.est.agg, self.est.agg_constant)
        pos, size = _within_batch_position(ro)
        if bool((size % self.split != 0).any()):
            raise TPGError(f"a batch of {int(size[0])} responses cannot be split into {self.split} equal parts")
        part = pos * self.split // size                                              # (B,) part index
        sub = replace(ro, batch=ro.batch * self.split + part, n_batches=ro.n_batches * self.split)
        return agg_weights(sub, self.est.agg, self.est.agg_constant) / self.split

    def _is_weights(self, log_r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) detached IS weight of each token from log ρ = log π_old/μ (module docstring)."""
        with torch.no_grad():
            if self.rollout_is == "none":
                return torch.ones_like(mask)
            lo = -math.inf if self.C_min is None else self.C_min
            hi = math.inf if self.C is None else self.C
            tok = torch.exp(torch.clamp(log_r, -20.0, 20.0))
            if self.rollout_is == "seq_mask_tis":                                     # OpenRLHF: geometric mean filter
                g = torch.exp((log_r * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0))
                return tok * ((g >= lo) & (g <= hi)).to(mask.dtype) * mask
            r = tok if self.rollout_is.startswith("token") else \
                torch.exp(torch.clamp(log_r.sum(1, keepdim=True), -20.0, 20.0)).expand_as(log_r)
            if self.rollout_is.endswith("truncate"):
                return torch.clamp(r, min=lo, max=hi) * mask                            # ±inf bounds: no-ops
            return torch.where((r >= lo) & (r <= hi), r, torch.zeros_like(r)) * mask


def verl_rollout_correction(est: Estimator, rollout_is: str | None = None, rollout_is_threshold=2.0,
                            rollout_rs: str | None = None, rollout_rs_threshold=None, bypass_mode: bool = False,
                            loss_type: str = "ppo_clip", **kw) -> Configured:
    """verl ``algorithm.rollout_correction`` (``rollout_corr_helper.compute_rollout_correction_and_add_to_batch``;
    ``trainer/config/algorithm/rollout_correction.yaml``): ``rollout_is`` ∈ {None, "token", "sequence"}
    with ``rollout_is_threshold`` a float (TIS: clamp from above) or "lower_upper" (IcePop: zero
    outside); ``rollout_rs`` a comma-separated list of verl's rejection options with
    ``rollout_rs_threshold``. Decoupled mode (3 policies): weights and mask from π_old/μ, the mask
    edited before the advantage. ``bypass_mode=True`` (2 policies): θ_old := μ and the loss is
    ``verl.bypass_mode`` (``loss_type`` "ppo_clip": no IS weight; "reinforce": its IS weight)."""
    if rollout_is is not None and rollout_is not in ("token", "sequence"):
        raise TPGError(f"verl rollout_is must be None, 'token' or 'sequence', got {rollout_is!r}")
    if isinstance(rollout_is_threshold, bool):
        raise TPGError("rollout_is_threshold must be a float or a 'lower_upper' string, not a boolean")
    lower, upper = None, None
    if isinstance(rollout_is_threshold, str) and "_" in rollout_is_threshold:
        lower, upper = (float(x) for x in rollout_is_threshold.split("_", 1))
    elif rollout_is_threshold is not None:
        upper = float(rollout_is_threshold)
    if upper is not None and (upper <= 0 or (lower is not None and not 0 < lower <= upper)):
        raise TPGError(f"invalid rollout_is_threshold {rollout_is_threshold!r} (positive, lower ≤ upper)")
    if bypass_mode:
        if lower is not None:
            raise TPGError("tpg's verl.bypass_mode takes a float rollout_is_threshold (TIS) only")
        inner = replace(est, loss="verl.bypass_mode", loss_options=dict(
            loss_type=loss_type, rollout_is=rollout_is, rollout_is_threshold=upper if upper is not None else 2.0),
            name=f"{est.name}/bypass({loss_type})")
        return Configured(inner, bypass=True, rollout_rs=rollout_rs, rollout_rs_threshold=rollout_rs_threshold, **kw)
    mode = None if rollout_is is None or upper is None else f"{rollout_is}_{'mask' if lower is not None else 'truncate'}"
    return Configured(est, rollout_is=mode, C=upper, C_min=lower, rollout_rs=rollout_rs,
                      rollout_rs_threshold=rollout_rs_threshold, **kw)


TRL_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def trl_grpo(loss_type: str = "dapo", scale_rewards: str = "group", importance_sampling_level: str = "token",
             vllm_importance_sampling_correction: bool = True, vllm_importance_sampling_mode: str = "sequence_mask",
             vllm_importance_sampling_clip_max: float | None = 3.0, vllm_importance_sampling_clip_min: float | None = None,
             off_policy_mask_threshold: float | None = None, beta: float = 0.0, use_bias_correction_kl: bool = False,
             loss_options: dict | None = None, **kw) -> Configured:
    """TRL ``GRPOTrainer`` with its off-policy options (``grpo_config.py`` defaults): the vLLM IS
    ratio π_old/μ per token or per sequence (Σ_t), truncated (clamp(C_min, C_max)) or masked (0
    outside), multiplied into the per-token loss (not for ``vespo``, which folds it into w);
    ``off_policy_mask_threshold`` δ (drop tokens with A < 0 of sequences whose mean log μ/π > δ);
    ``beta`` > 0: k3 to the reference in the loss, × the attached ratio π/π_old when
    ``use_bias_correction_kl`` (token level, or exp(mean log ρ) at sequence level)."""
    if vllm_importance_sampling_mode not in TRL_IS_MODES:
        raise TPGError(f"unknown vllm_importance_sampling_mode {vllm_importance_sampling_mode!r}; TRL's are {TRL_IS_MODES}")
    est = T.trl_estimator(loss_type, scale_rewards=scale_rewards, importance_sampling_level=importance_sampling_level,
                          loss_options=loss_options)
    mode = vllm_importance_sampling_mode if vllm_importance_sampling_correction and loss_type != "vespo" else None
    kl = (beta, "k3", "loss") if beta else None
    ratio = (importance_sampling_level if use_bias_correction_kl else None) if kl else None
    return Configured(est, rollout_is=mode, C=vllm_importance_sampling_clip_max, C_min=vllm_importance_sampling_clip_min,
                      off_policy_mask=off_policy_mask_threshold, kl=kl, kl_ratio=ratio, **kw)


def openrlhf_vllm_is(est: Estimator, is_correction_type: str = "tis", is_correction_threshold=(0.5, 5.0),
                     **kw) -> Configured:
    """OpenRLHF ``--algo.advantage.is_correction_enable`` (``models/loss.py::PolicyLoss``, ppo loss
    only): ρ = π_old/μ per token; "tis" clamp(ρ, low, high), "icepop" ρ·[low ≤ ρ ≤ high],
    "seq-mask-tis" ρ·[low ≤ exp(mean_t log ρ) ≤ high] (the token ρ itself is not clamped);
    thresholds default [0.5, 5.0] (``cli/train_ppo_ray.py``)."""
    modes = {"tis": "token_truncate", "icepop": "token_mask", "seq-mask-tis": "seq_mask_tis"}
    if is_correction_type not in modes:
        raise TPGError(f"OpenRLHF is_correction_type must be one of {tuple(modes)}, got {is_correction_type!r}")
    lo, hi = is_correction_threshold
    return Configured(est, rollout_is=modes[is_correction_type], C=hi, C_min=lo, **kw)


# ====================================================================================== exact targets
def kl_objective_gradient(mdp, policy, ref, beta: float) -> torch.Tensor:
    """∇(J − β KL_seq(π‖π_ref)), KL_seq = Σ_y P(y) log P_π(y)/P_ref(y), by autograd through the enumeration."""
    from tpg.rollouts import enumerate_responses
    from tpg.scores import grad as flat_grad
    enum = enumerate_responses(mdp)
    lp = (policy.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).sum(1)            # (N,)
    with torch.no_grad():
        lr = (ref.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).sum(1)
    rho = exact.prompt_weights(mdp, enum)
    return flat_grad((rho * lp.exp() * (enum.rm - beta * (lp - lr))).sum(), policy)


def local_kl_gradient(mdp, policy, ref, reverse: bool = False) -> torch.Tensor:
    """∇ Σ_s sg(ρ(s)) KL(π(·|s)‖π_ref(·|s)) (``reverse``: KL(π_ref‖π)), the state distribution frozen:
    what k2 (and every "+" form) resp. k3 in the loss estimate (ZOO §4)."""
    from tpg.scores import grad as flat_grad
    visit = exact.tables(mdp, policy).visit.detach()                                         # (S,)
    lp = policy.state_log_probs().to(torch.float64)                                           # (S, V)
    with torch.no_grad():
        lr = ref.state_log_probs().to(torch.float64)
    kl = (lr.exp() * (lr - lp)).sum(-1) if reverse else (lp.exp() * (lp - lr)).sum(-1)      # (S,)
    return flat_grad((visit * kl).sum(), policy)


# ====================================================================================== the matrix
@dataclass
class Row:
    lib: str
    name: str
    setting: str
    mdp: str
    verdict: str
    scale: float
    residual: float
    rel_bias: float
    target: str = "∇J"
    expected: str | None = None            # ZOO's recorded verdict, where it gives one
    seconds: float = 0.0

    def agrees(self) -> bool | None:
        return None if self.expected is None else self.expected == self.verdict


def _cases(fast: bool):
    """(lib, name, setting, builder(pol) -> est, report kwargs(pol) -> dict, target, expected on gaussian)."""
    vanilla, tm, smts = "verl.vanilla", "token-mean", "seq-mean-token-sum"
    adv_expect = {"gae": None, "grpo": "biased", "verl.grpo_vectorized": "biased", "verl.gdpo": "biased",
                  "verl.grpo_passk": "biased", "reinforce_pp_baseline": "biased", "rloo": "unbiased",
                  "verl.rloo_vectorized": "unbiased", "verl.opo": "biased", "reinforce_pp": "biased",
                  "remax": "unbiased", "verl.gpg": "scaled", "verl.optimal_token_baseline": "biased",
                  "verl.tir_optimal_token_baseline": "biased"}
    out = []
    for vname, tname in V.VERL_NAMES.items():
        if tname == "gae" and fast:
            continue
        for agg in ((smts,) if fast else (smts, tm)):
            def build(pol, tname=tname, agg=agg):
                opts = dict(pi_sq=V.sum_pi_squared(pol)) if "optimal_token" in tname else {}
                return V.verl_estimator(tname, loss=vanilla, agg=agg, label=f"verl.{vname}", **opts)
            kw = (lambda pol: {"critic": _exact_critic(pol)}) if tname == "gae" else (lambda pol: {})
            out.append(("verl", f"adv {vname}", f"vanilla/{agg}", build, kw, "∇J",
                        adv_expect[tname] if agg == smts else None))
    # gspo at ratio 1 under seq-mean-token-sum is the plain PG (its 1/n_i ratio derivative meets n_i tokens)
    loss_expect = {"sapo": "biased", "geo_mean": "biased", "gspo": "unbiased", "clip_cov": "biased"}
    for lname in V.VERL_LOSSES:
        opts = {"beta": 0.1} if lname == "dro" else {}
        if lname == "bypass_mode":
            opts = {"loss_type": "reinforce"}
        def build(pol, lname=lname, opts=opts):
            return V.verl_estimator("rloo", loss=lname, agg=smts, loss_options=opts, label=f"verl.{lname}")
        agg = V.FORCED_AGG.get(f"verl.{lname}", smts)
        out.append(("verl", f"loss {lname}", f"rloo/{agg}", build, lambda pol: {}, "∇J",
                    loss_expect.get(lname, "unbiased")))
    for agg in AGG_ROWS:
        out.append(("verl", f"agg {agg}", "rloo/vanilla", lambda pol, agg=agg: V.verl_estimator(
            "rloo", loss=vanilla, agg=agg, label=f"verl.agg.{agg}"), lambda pol: {}, "∇J",
            {"token-mean": "biased", "token-sum": "scaled", "seq-mean-token-sum": "unbiased",
             "seq-mean-token-sum-norm": "scaled", "seq-mean-token-mean": "biased",
             "verl.seq-mean-token-mean": "biased", "verl.seq-mean-token-sum-norm-longest": "biased"}[agg]))
    for lt in T.LOSS_TYPES:
        for sr in (("group",) if fast else ("group", "none")):
            lo = {"epsilon_high": 5.0} if lt == "cispo" and sr == "none" else {}
            lvl = "sequence" if lt == "luspo" else "token"
            out.append(("trl", f"loss_type {lt}", f"scale_rewards={sr}" + (" ε_high=5" if lo else ""),
                        lambda pol, lt=lt, sr=sr, lo=lo, lvl=lvl: T.trl_estimator(
                            lt, scale_rewards=sr, importance_sampling_level=lvl, loss_options=lo),
                        lambda pol: {}, "∇J", None))
    for oname in O.OPENRLHF_NAMES:
        kw = (lambda pol: {"critic": _exact_critic(pol)}) if oname == "gae" else (lambda pol: {})
        out.append(("openrlhf", f"adv {oname}", "ppo/token-mean", lambda pol, oname=oname: O.openrlhf_estimator(
            oname), kw, "∇J", None))
    out.append(("openrlhf", "adv rloo", "gspo/per-sample", lambda pol: O.openrlhf_estimator("rloo", "gspo"),
                lambda pol: {}, "∇J", "biased"))
    out.append(("openrlhf", "adv rloo", "ppo/seq-mean-token-sum, k1 in reward (β=0.1)", lambda pol: estimator(
        "openrlhf.rloo", kl=KL(0.1, "k1", "reward"), label="openrlhf.rloo+k1"), lambda pol: {"ref": _moved(pol, 1.0)},
        ("∇(J − βKL)", 0.1), "unbiased"))
    for ctype in ("tis", "icepop", "seq-mask-tis"):
        out.append(("openrlhf", "vLLM IS rloo/ppo/seq-mean-token-sum", f"is_correction_type={ctype} [0.5, 5]",
                    lambda pol, ctype=ctype: openrlhf_vllm_is(estimator("openrlhf.rloo", label="openrlhf.rloo"), ctype),
                    lambda pol: {"rollout_policy": _rollout(pol)}, "∇J", None))
    # TRL's RLOOTrainer and off-policy options
    out.append(("trl", "RLOOTrainer", "β=0.05 (k1 in reward), seq ratio clip", lambda pol: T.trl_rloo_estimator(),
                lambda pol: {"ref": _moved(pol, 1.0)}, ("∇(J − βKL)", 0.05), "unbiased"))
    out.append(("trl", "RLOOTrainer", "β=0.05, normalize_advantages", lambda pol: T.trl_rloo_estimator(
        normalize_advantages=True), lambda pol: {"ref": _moved(pol, 1.0)}, ("∇(J − βKL)", 0.05), "biased"))
    for mode in TRL_IS_MODES:
        out.append(("trl", "vllm IS luspo/none/sequence", f"{mode} (C_max=3)", lambda pol, mode=mode: trl_grpo(
            "luspo", scale_rewards="none", importance_sampling_level="sequence", vllm_importance_sampling_mode=mode),
            lambda pol: {"rollout_policy": _rollout(pol)}, "∇J", None))
    out.append(("trl", "off_policy_mask rloo/" + smts, "δ=0.05, θ_old ≠ θ, μ ≠ θ_old", lambda pol: Configured(
        estimator("rloo"), off_policy_mask=0.05), lambda pol: {"old_policy": _moved(pol, 0.3),
                                                               "rollout_policy": _rollout(pol)}, "∇J(θ)", None))
    for ratio in (None, "token"):
        out.append(("trl", "k3 in loss rloo/" + smts, f"use_bias_correction_kl={ratio is not None} (β=0.1)",
                    lambda pol, ratio=ratio: Configured(estimator("rloo"), kl=(0.1, "k3", "loss"), kl_ratio=ratio),
                    lambda pol: {"ref": _moved(pol, 1.0)}, ("∇J − β∇KL_local(π‖ref)", 0.1),
                    "unbiased" if ratio else "biased"))
    # ------------------------------------------------------------------ settings
    for agg in (tm, smts):
        for norm in NORMS:
            out.append(("setting", f"micro-batches rloo/{agg}", f"split=3/{norm}", lambda pol, agg=agg, norm=norm:
                        Configured(estimator("rloo", agg=agg), split=3, norm=norm), lambda pol: {}, "∇J",
                        "unbiased" if agg == smts else "biased"))
    for mode in IS_MODES:
        out.append(("setting", "rollout mismatch rloo/" + smts, f"IS={mode} (C=2)", lambda pol, mode=mode: Configured(
            estimator("rloo"), rollout_is=mode, C=2.0), lambda pol: {"rollout_policy": _rollout(pol)}, "∇J",
            None))
    out.append(("setting", "rollout mismatch rloo/" + smts, "IS=sequence_truncate(C=1e6)", lambda pol: Configured(
        estimator("rloo"), rollout_is="sequence_truncate", C=1e6), lambda pol: {"rollout_policy": _rollout(pol)},
        "∇J", "unbiased"))
    for opts in (dict(rollout_is="token"), dict(rollout_is="token", rollout_is_threshold="0.5_2.0"),
                 dict(rollout_is="sequence"), dict(rollout_is="sequence", rollout_is_threshold="0.5_2.0"),
                 dict(rollout_rs="token_k1", rollout_rs_threshold="0.5_2.0"),
                 dict(rollout_is="sequence", rollout_is_threshold=1e6, rollout_rs="seq_mean_k3",
                      rollout_rs_threshold=0.05),
                 dict(bypass_mode=True), dict(bypass_mode=True, loss_type="reinforce", rollout_is="sequence"),
                 dict(bypass_mode=True, loss_type="reinforce", rollout_is="sequence", rollout_is_threshold=1e6)):
        label = ", ".join(f"{k}={v}" for k, v in opts.items())
        out.append(("verl", "rollout_correction rloo/vanilla/" + smts, label, lambda pol, opts=opts:
                    verl_rollout_correction(V.verl_estimator("rloo", agg=smts, label="verl.rloo"), **opts),
                    lambda pol: {"rollout_policy": _rollout(pol)}, "∇J",
                    "unbiased" if opts.get("rollout_is_threshold") == 1e6 and not opts.get("rollout_rs") else None))
    out.append(("setting", "three policies rloo/vanilla/" + smts, "seq IS (C=1e6), θ_old ≠ θ, μ ≠ θ_old",
                lambda pol: verl_rollout_correction(V.verl_estimator("rloo", agg=smts, label="verl.rloo"),
                                                    rollout_is="sequence", rollout_is_threshold=1e6),
                lambda pol: {"old_policy": _moved(pol, 0.3), "rollout_policy": _rollout(pol)}, "∇J(θ)", "biased"))
    for loss in ("ppo", "verl.vanilla", "verl.cispo", "verl.dppo_tv", "verl.gspo"):
        out.append(("setting", f"PPO epoch 2 rloo/{loss}", "θ_old ≠ θ (step 0.3)", lambda pol, loss=loss: estimator(
            "rloo", loss=loss, agg=smts, label=f"epoch2.{loss}"), lambda pol: {"old_policy": _moved(pol, 0.3)},
            "∇J(θ)", None))
    for kind in ("k1", "abs", "k2", "k3", "k1+", "k3+", "abs+"):
        for where in ("reward", "loss"):
            if where == "reward" and kind.endswith("+"):
                continue
            out.append(("setting", "KL rloo/" + smts, f"{kind} in {where} (β=0.1)", lambda pol, kind=kind, where=where:
                        Configured(estimator("rloo"), kl=(0.1, kind, where)), lambda pol: {"ref": _moved(pol, 1.0)},
                        ("∇(J − βKL)", 0.1), "unbiased" if (kind == "k1" and where == "reward") else "biased"))
    return out


AGG_ROWS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                       "seq-mean-token-mean", "verl.seq-mean-token-mean", "verl.seq-mean-token-sum-norm-longest")


def _moved(pol, step: float, seed: int = 12345):
    """A copy of a tabular policy with its logits moved by ``step``·N(0, 1) (a fixed seed): θ_old, μ or π_ref."""
    from tpg.policies import TabularSoftmax
    g = torch.Generator().manual_seed(seed)
    return TabularSoftmax(pol.mdp, pol.logits.detach() + step * torch.randn(pol.logits.shape, generator=g,
                                                                           dtype=torch.float64))


def _rollout(pol):
    """The rollout engine μ of the zoo's off-policy rows: θ moved by 0.7·N(0, 1) along another direction
    than θ_old's (so μ, θ_old and θ are three different policies, not on one line)."""
    return _moved(pol, 0.7, seed=777)


def _exact_critic(pol):
    from tpg.draws import exact_critic
    return exact_critic(exact.tables(pol.mdp, pol))


def run_zoo(seeds=(0,), rewards=("gaussian", "binary"), G: int = 3, fast: bool = False, only: str | None = None,
            progress=None) -> list[Row]:
    """The verdict matrix on seeded MDPs (one prompt, vocab {a, b, EOS}, H = 3: ZOO.md's set-up)."""
    from tpg import random_mdp
    from tpg.policies import TabularSoftmax
    from tpg.verify import report, roundoff_floor
    rows = []
    for seed in seeds:
        for reward in rewards:
            mdp = random_mdp(seed, vocab_size=3, horizon=3, n_prompts=1, reward=reward)
            pol = TabularSoftmax(mdp, seed=seed)
            delta = roundoff_floor(mdp, pol)
            grad = exact.gradient(mdp, pol)
            for lib, name, setting, build, kw, target, expected in _cases(fast):
                if only and only not in f"{lib} {name} {setting}":
                    continue
                t0 = time.perf_counter()
                kwargs = kw(pol)
                tgt = grad
                if isinstance(target, tuple):
                    target, beta = target
                    tgt = kl_objective_gradient(mdp, pol, kwargs["ref"], beta) if target == "∇(J − βKL)" else \
                        grad - beta * local_kl_gradient(mdp, pol, kwargs["ref"])
                    target = target.replace("β", f"{beta:g}·")
                r = report(build(pol), mdp, pol, G, cov=None, target=tgt, roundoff=delta, **kwargs)
                rows.append(Row(lib, name, setting, f"{reward}(seed={seed})", r.verdict, r.scale, r.residual,
                                r.rel_bias, target, expected if reward == "gaussian" else None,
                                time.perf_counter() - t0))
                if progress:
                    progress(rows[-1])
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'lib':9s} {'estimator':40s} {'setting':32s} {'mdp':20s} {'verdict':9s} {'scale':>9s} {'resid/|c|':>9s} {'ZOO':5s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        res = r.residual / abs(r.scale) if r.scale else math.inf
        z = "" if r.agrees() is None else ("ok" if r.agrees() else "DIFF")
        lines.append(f"{r.lib:9s} {r.name:40s} {r.setting:32s} {r.mdp:20s} {r.verdict:9s} {r.scale:9.4f} "
                     f"{res:9.1e} {z:5s}")
    return "\n".join(lines)


def to_markdown(rows: list[Row]) -> str:
    """The matrix as a markdown table (for the README; generated, never hand-typed)."""
    out = ["| library | estimator | setting | MDP | target | verdict | scale c | residual / c |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res = r.residual / abs(r.scale) if r.scale else math.inf
        out.append(f"| {r.lib} | `{r.name}` | {r.setting} | {r.mdp} | {r.target} | **{r.verdict}** | "
                   f"{r.scale:.4g} | {res:.1e} |")
    return "\n".join(out)


def run_cli(args) -> int:
    """``tpg zoo``: print the matrix (``--json PATH``, ``--markdown PATH``); exit 1 if a verdict
    contradicts one ZOO.md records."""
    from tpg import validate
    validate.check_output_path(args.json)
    validate.check_output_path(args.markdown, "--markdown")
    if args.G < 2:
        raise TPGError(f"--G must be ≥ 2 (group estimators need two responses), got {args.G}")
    rows = run_zoo(seeds=tuple(range(args.seed, args.seed + args.seeds)), G=args.G, fast=args.fast, only=args.only)
    if not rows:
        raise TPGError(f"--only {args.only!r} matches no row of the zoo")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(rows) + "\n")
    return 1 if any(r.agrees() is False for r in rows) else 0


def add_parser(sub) -> None:
    s = sub.add_parser("zoo", help="verdict matrix of every verl / TRL / OpenRLHF estimator × aggregation × setting")
    s.add_argument("--seeds", type=int, default=1, help="random MDPs per reward kind (default 1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--G", type=int, default=3, help="responses per prompt (default 3)")
    s.add_argument("--fast", action="store_true", help="one aggregation per advantage, no GAE (for CI)")
    s.add_argument("--only", metavar="TEXT", help="only rows whose 'lib name setting' contains TEXT")
    s.add_argument("--json", metavar="PATH")
    s.add_argument("--markdown", metavar="PATH", help="also write the matrix as a markdown table")
    s.set_defaults(fn=run_cli)
