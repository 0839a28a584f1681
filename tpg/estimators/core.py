"""The estimator pipeline: advantage → per-token policy loss → aggregation (+ KL), as verl does it.

An ``Estimator`` is a pure function of a ``Rollouts`` batch returning the surrogate loss whose
autograd gradient is −ĝ (rlax / Spinning Up: "a loss whose gradient, for the right data, is the
policy gradient"). Because every loss in use is a function of the sampled-token log-probs,

    ĝ = Σ_i Σ_t c[i, t] ∇ log π(y_it | s_it),   c[i, t] = −∂ loss / ∂ logp[i, t]

(DESIGN §2: coefficients are the contract). ``coefficients`` reads c off the loss by autograd, so
the exact engine, the Monte Carlo sampler and GPT-2 use the very same loss code.

Aggregation is a separate, named choice (verl's ``loss_agg_mode``). tpg's default is
"seq-mean-token-sum" (the plain REINFORCE average, unbiased), not verl's "token-mean", because the
paper's theorems are statements about that average; every verl mode is available.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from numbers import Real
from typing import Callable

import torch

from tpg.mdp import TPGError
from tpg.rollouts import Rollouts

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")


# ------------------------------------------------------------------------------ option checks
def is_real(x) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def check_gamma(gamma) -> float:
    """A discount factor must lie in (0, 1] (γ = 1: undiscounted, the LLM setting)."""
    if not (is_real(gamma) and 0.0 < gamma <= 1.0):
        raise TPGError(f"discount gamma must be a number in (0, 1], got {gamma!r}")
    return float(gamma)


def _check_clip(name: str, x, optional: bool) -> None:
    if optional and x is None:
        return
    if not (is_real(x) and 0.0 < x < 1.0):
        raise TPGError(f"{name} must be a number in (0, 1) (the ratio is clipped to [1 − clip, 1 + clip]; "
                       f"verl's default is 0.2){' or None' if optional else ''}, got {x!r}")


def _check_options(spec: "AdvantageSpec", options: dict) -> None:
    """Misspelled or unknown advantage options fail here, naming the function's valid options
    (its parameters after the rollouts)."""
    sig = inspect.signature(spec.fn)
    try:
        sig.bind_partial(None, **options)
    except TypeError as e:
        valid = [p.name for p in list(sig.parameters.values())[1:]
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        raise TPGError(f"estimator {spec.name!r} got invalid options {sorted(options)} ({e}); "
                       f"its options are {valid or 'none'}") from e


# ------------------------------------------------------------------------------ segment statistics
def segment_sum(x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """(n, ...) sums of the rows of x (B, ...) by segment id seg (B,)."""
    return torch.zeros((n,) + x.shape[1:], dtype=x.dtype).index_add(0, seg, x)


def group_stats(x: torch.Tensor, group: torch.Tensor, ddof: int = 1) -> tuple[torch.Tensor, ...]:
    """Per-row group mean, std (ddof) and size of x (B,) over ``group`` ids.

    A singleton group gets mean 0 and std 1 (verl's convention), so GRPO on it is REINFORCE.
    The mean is taken about a member's value (shifted data), so a group of equal rewards has mean
    equal to them exactly and std exactly 0 (a plain Σx/n can miss by an ulp, e.g. three 0.1s).
    """
    n = int(group.max()) + 1
    cnt = segment_sum(torch.ones_like(x), group, n)                            # (n,)
    ref = torch.zeros(n, dtype=x.dtype).scatter_reduce(0, group, x, "amax", include_self=False)  # (n,)
    mean = ref + segment_sum(x - ref[group], group, n) / cnt
    dev2 = segment_sum((x - mean[group]) ** 2, group, n)
    var = dev2 / (cnt - ddof).clamp(min=1)
    single = cnt <= 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(var), var.sqrt())
    return mean[group], std[group], cnt[group]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, batch: torch.Tensor, n_batches: int,
                  shift_mean: bool = True) -> torch.Tensor:
    """verl ``masked_whiten`` per independent batch: (x − mean)·rsqrt(var + 1e-8), Bessel variance
    over the batch's response tokens. x, mask (B, L). A batch with a single response token has no
    Bessel variance: verl raises there, tpg whitens it to 0 (variance taken as 0), so the exact
    engine can enumerate one-token batches."""
    n = segment_sum(mask.sum(1), batch, n_batches)                            # (n_batches,) tokens
    mean = segment_sum((x * mask).sum(1), batch, n_batches) / n
    dev = (x - mean[batch][:, None]) * mask
    var = segment_sum((dev**2).sum(1), batch, n_batches) / n * (n / (n - 1).clamp(min=1))
    centred = x - mean[batch][:, None] if shift_mean else x
    return centred * torch.rsqrt(var[batch][:, None] + 1e-8) * mask


# ------------------------------------------------------------------------------ aggregation
def agg_weights(ro: Rollouts, mode: str, constant: float | None = None) -> torch.Tensor:
    """(B, L) on-policy weight w[i, t] of each token's loss in verl's ``agg_loss``, per batch.

    token-mean: 1/N_tok; token-sum: 1; seq-mean-token-sum: 1/B; seq-mean-token-mean:
    1/(B·(n_i + 1e-8)); seq-mean-token-sum-norm: 1/(B·C), C = ``constant`` or the padded length L
    (verl ≥ 0.7.1). B and N_tok are counted per independent batch.
    """
    m = ro.mask
    B_b = segment_sum(torch.ones(ro.batch_size, dtype=m.dtype), ro.batch, ro.n_batches)[ro.batch][:, None]
    if mode == "token-mean":
        return m / segment_sum(m.sum(1), ro.batch, ro.n_batches)[ro.batch][:, None]
    if mode == "token-sum":
        return m
    if mode == "seq-mean-token-sum":
        return m / B_b
    if mode == "seq-mean-token-mean":
        return m / (B_b * (m.sum(1, keepdim=True) + 1e-8))
    if mode == "seq-mean-token-sum-norm":
        C = float(m.shape[1]) if constant is None else float(constant)
        if not C > 0:
            raise TPGError(f"seq-mean-token-sum-norm needs a positive constant C, got {constant!r}")
        return m / (B_b * C)
    raise TPGError(f"unknown aggregation mode {mode!r}; choose one of {AGG_MODES}")


# ------------------------------------------------------------------------------ per-token losses
def ppo_clip_loss(logp, logp_old, adv, clip_low=0.2, clip_high=None, dual_clip=None):
    """verl ``compute_policy_loss_vanilla`` per token (B, L): max(−Aρ, −A·clip(ρ)), dual clip for A < 0.

    At ρ = 1 (θ = θ_old) the clamp is inactive and both branches have derivative −A, so the gradient
    is the policy gradient −A ∇logπ (PyTorch splits a tie of ``maximum`` between equal branches).
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(torch.clamp(logp - logp_old, -20.0, 20.0))                # (B, L)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(l1, l2)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise TPGError(f"dual clip constant c must be > 1, got {dual_clip}")
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


def pg_loss(logp, logp_old, adv, **_):
    """REINFORCE per token (B, L): −A · log π (verl ``compute_policy_loss_reinforce``)."""
    return -adv * logp


POLICY_LOSSES = {"ppo": ppo_clip_loss, "pg": pg_loss}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimators of KL(π‖π_ref) at sampled tokens, d = log π − log π_ref (verl):
    k1 = d; k2 = ½d²; k3 ("low_var_kl") = e^u − u − 1 with u = clamp(−d, ±20), clamped to [−10, 10]."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        u = torch.clamp(-d, -20.0, 20.0)
        return torch.clamp(torch.exp(u) - u - 1.0, -10.0, 10.0)
    raise TPGError(f"unknown KL estimator {kind!r}; choose one of {KL_KINDS}")


@dataclass(frozen=True)
class KL:
    """KL to a reference policy: β · k-estimator, either subtracted from the reward ("reward", verl
    ``use_kl_in_reward``, computed on the behaviour log-probs) or added to the loss ("loss")."""
    coef: float = 0.001
    kind: str = "k1"
    where: str = "reward"

    def __post_init__(self):
        if self.kind not in KL_KINDS:
            raise TPGError(f"unknown KL estimator {self.kind!r}; choose one of {KL_KINDS}")
        if self.where not in ("reward", "loss"):
            raise TPGError(f"KL.where must be 'reward' or 'loss', got {self.where!r}")


# ------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class AdvantageSpec:
    name: str
    fn: Callable                      # fn(ro, **options) -> (B, L) advantages
    needs: Callable                   # needs(options) -> dict of extra draws, e.g. {"greedy": True}
    multilinear: Callable             # multilinear(options) -> bool: E over continuations by substitution is exact
    doc: str


ADVANTAGES: dict[str, AdvantageSpec] = {}


def register_advantage(name: str, needs: Callable | dict | None = None, multilinear: Callable | bool = True):
    """Decorator: register ``fn(ro, **options) -> (B, L)`` under ``name`` (user estimators too).

    ``needs`` names the extra draws the function reads from ``ro.extras`` (a dict, or a function of
    the options): "greedy", "continuations" (value K), "anchors" (an anchor spec), "values",
    "ref". ``multilinear`` says whether the advantage is multilinear in the continuation returns,
    which makes the exact engine's substitution of their expectations exact.
    """
    def deco(fn):
        nd = needs if callable(needs) else (lambda opts, _n=dict(needs or {}): dict(_n))
        ml = multilinear if callable(multilinear) else (lambda opts, _m=multilinear: _m)
        ADVANTAGES[name] = AdvantageSpec(name, fn, nd, ml, (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return deco


@dataclass(frozen=True)
class EstimatorOutput:
    loss: torch.Tensor                # scalar surrogate; ĝ = −∇ loss
    advantages: torch.Tensor          # (B, L) detached advantages (before aggregation weights)
    diagnostics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Estimator:
    """advantage (registry name + options) × policy loss × aggregation × optional KL."""
    advantage: str
    options: dict = field(default_factory=dict)
    loss: str = "ppo"
    clip: float = 0.2
    clip_high: float | None = None
    dual_clip: float | None = None
    agg: str = "seq-mean-token-sum"
    agg_constant: float | None = None
    kl: KL | None = None
    name: str = ""

    def __post_init__(self):
        if self.advantage not in ADVANTAGES:
            raise TPGError(f"unknown estimator {self.advantage!r}; registered: {sorted(ADVANTAGES)}")
        if self.loss not in POLICY_LOSSES:
            raise TPGError(f"unknown policy loss {self.loss!r}; choose one of {sorted(POLICY_LOSSES)}")
        if self.agg not in AGG_MODES:
            raise TPGError(f"unknown aggregation mode {self.agg!r}; choose one of {AGG_MODES}")
        _check_clip("clip", self.clip, optional=False)
        _check_clip("clip_high", self.clip_high, optional=True)
        if self.dual_clip is not None and not (isinstance(self.dual_clip, Real) and not isinstance(self.dual_clip, bool)
                                               and self.dual_clip > 1.0):
            raise TPGError(f"dual clip constant c (dual_clip) must be None or a number > 1 (verl uses 3), "
                           f"got {self.dual_clip!r}")
        _check_options(ADVANTAGES[self.advantage], self.options)
        if not self.name:
            object.__setattr__(self, "name", self.advantage)

    @property
    def needs(self) -> dict:
        nd = dict(ADVANTAGES[self.advantage].needs(self.options))
        if self.kl is not None:
            nd["ref"] = True
        return nd

    @property
    def multilinear(self) -> bool:
        return bool(ADVANTAGES[self.advantage].multilinear(self.options))

    def __call__(self, ro: Rollouts) -> EstimatorOutput:
        if ro.logp is None:
            raise TPGError("the rollouts carry no log-probs: call ro.score(policy) first")
        if self.kl is not None and self.kl.where == "reward":
            # verl apply_kl_penalty: −β·kl_t on every token; outcome estimators see the summed score
            # RM − β Σ_t kl_t, per-token ones (ReMax, REINFORCE++) read extras["kl_reward"].
            kl_tok = self.kl.coef * kl_penalty(ro.logp_old, ro.extras["ref_logp"], self.kl.kind) * ro.mask  # (B, L)
            ro = replace(ro, token_rewards=ro.token_rewards - kl_tok, rm=ro.rm - kl_tok.sum(1),
                         extras={**ro.extras, "kl_reward": kl_tok})
        with torch.no_grad():
            adv = ADVANTAGES[self.advantage].fn(ro, **self.options).to(ro.logp.dtype) * ro.mask  # (B, L)
        if not torch.isfinite(adv).all():
            raise TPGError(f"estimator {self.name!r} produced non-finite advantages")
        w = agg_weights(ro, self.agg, self.agg_constant)                                # (B, L)
        per_tok = POLICY_LOSSES[self.loss](ro.logp, ro.logp_old, adv, clip_low=self.clip,
                                           clip_high=self.clip_high, dual_clip=self.dual_clip)
        loss = (w * per_tok).sum()
        if self.kl is not None and self.kl.where == "loss":
            loss = loss + self.kl.coef * (w * kl_penalty(ro.logp, ro.extras["ref_logp"], self.kl.kind)).sum()
        return EstimatorOutput(loss, adv, {"agg_weights": w})


def estimator(name: str, *, loss: str = "ppo", clip: float = 0.2, clip_high: float | None = None,
              dual_clip: float | None = None, agg: str = "seq-mean-token-sum", agg_constant: float | None = None,
              kl: KL | None = None, label: str = "", **options) -> Estimator:
    """Build an estimator: ``estimator("grpo", std=False, agg="token-mean")``. Keyword arguments
    other than the loss/aggregation/KL ones are the advantage function's options."""
    if name in PRESETS:
        preset = dict(PRESETS[name])
        name = preset.pop("advantage")
        for k, v in preset.items():
            if k == "agg" and agg == "seq-mean-token-sum":
                agg = v
            elif k == "agg_constant" and agg_constant is None:
                agg_constant = v
            else:
                options.setdefault(k, v)
    return Estimator(name, options, loss, clip, clip_high, dual_clip, agg, agg_constant, kl, label or name)


# Named configurations that are not separate functions in verl (ESTIMATORS.md §2.3).
PRESETS: dict[str, dict] = {
    "drgrpo": dict(advantage="grpo", std=False, agg="seq-mean-token-sum-norm"),
}


def coefficients(est: Callable, ro: Rollouts) -> torch.Tensor:
    """(B, L) c[i, t] = −∂ loss/∂ logp[i, t] at the rollouts' log-probs: ĝ = Σ c ∇logπ.

    ``ro.logp`` is replaced by a detached leaf, so this works for any policy and never touches θ.
    """
    leaf = (ro.logp if ro.logp is not None else ro.logp_old).detach().clone().requires_grad_(True)
    out = est(replace(ro, logp=leaf))
    loss = out.loss if isinstance(out, EstimatorOutput) else out
    (g,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return torch.zeros_like(leaf) if g is None else -g * ro.mask
