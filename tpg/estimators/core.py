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
from numbers import Integral, Real
from typing import Callable

import torch

from tpg import validate
from tpg.mdp import TPGError
from tpg.rollouts import Rollouts

KL_KINDS = ("k1", "k2", "k3")


# ------------------------------------------------------------------------------ option checks
is_real = validate.is_real          # a finite real number that is not a bool (the one definition)


def check_gamma(gamma) -> float:
    """A discount factor must lie in (0, 1] (γ = 1: undiscounted, the LLM setting)."""
    return validate.real("discount gamma", gamma, 0.0, 1.0, "(]")


def _check_clip(name: str, x, optional: bool) -> None:
    if optional and x is None:
        return
    validate.real(name, x, 0.0, 1.0, "()", why=" (the ratio is clipped to [1 − clip, 1 + clip]; verl's default "
                  f"is 0.2){' or None' if optional else ''}")


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


# ------------------------------------------------------------------------------ registries
@dataclass(frozen=True)
class Registered:
    """A registered policy loss or aggregation and the shortcut properties it declares
    (``tpg.batches.PROPERTIES``; None = undeclared, so the exact engine probes it)."""
    name: str
    fn: Callable
    declared: dict
    doc: str


AGGREGATIONS: dict[str, Registered] = {}
POLICY_LOSSES: dict[str, Registered] = {}


def _check_name(table: dict, kind: str, name, overwrite: bool) -> None:
    if not isinstance(name, str) or not name.strip():
        raise TPGError(f"a {kind} name must be a non-empty string, got {name!r}")
    if name in table and not overwrite:
        old = table[name].fn
        raise TPGError(f"{kind} {name!r} is already registered ({old.__module__}.{old.__qualname__}); "
                       "pass overwrite=True to replace it, or choose another name")


def _declare(local, exchangeable, **more) -> dict:
    out = dict(local=local, exchangeable=exchangeable, **more)
    for k, v in out.items():
        if v is not None and not isinstance(v, bool) and not callable(v):
            raise TPGError(f"declared property {k} must be True, False, None (undeclared: probed) or a function "
                           f"of the options, got {v!r}")
    return out


def register_aggregation(name: str, *, local: bool | None = None, exchangeable: bool | None = None,
                         overwrite: bool = False):
    """Decorator: register ``fn(ro, constant=None) -> (B, L)``, the weight w[i, t] of each token's loss
    in its batch's loss (verl ``agg_loss``). Batch-level counts must be taken per ``ro.batch``
    (``segment_sum``); ``local``/``exchangeable`` declare that it is (else the engine probes)."""
    def deco(fn):
        _check_name(AGGREGATIONS, "aggregation", name, overwrite)
        AGGREGATIONS[name] = Registered(name, fn, _declare(local, exchangeable), _doc(fn))
        return fn
    return deco


def register_policy_loss(name: str, *, linear: bool | None = None, overwrite: bool = False):
    """Decorator: register ``fn(logp, logp_old, adv, mask, **options) -> (B, L)`` per-token losses
    (before aggregation). ``linear=True`` declares the loss linear in ``adv`` (then an estimator
    multilinear in continuation returns stays so); per-token losses are batch-local by construction."""
    def deco(fn):
        _check_name(POLICY_LOSSES, "policy loss", name, overwrite)
        POLICY_LOSSES[name] = Registered(name, fn, _declare(True, True, linear=linear), _doc(fn))
        return fn
    return deco


def _doc(fn) -> str:
    return (fn.__doc__ or "").strip().split("\n")[0]


# ------------------------------------------------------------------------------ aggregation
def _seqs_per_batch(ro: Rollouts) -> torch.Tensor:
    """(B, 1) number of responses in each row's batch."""
    return segment_sum(torch.ones(ro.batch_size, dtype=ro.mask.dtype), ro.batch, ro.n_batches)[ro.batch][:, None]


@register_aggregation("token-mean", local=True, exchangeable=True)
def token_mean(ro: Rollouts, constant=None) -> torch.Tensor:
    """1/N_tok: every response token of the batch weighs the same (verl's default)."""
    return ro.mask / segment_sum(ro.mask.sum(1), ro.batch, ro.n_batches)[ro.batch][:, None]


@register_aggregation("token-sum", local=True, exchangeable=True)
def token_sum(ro: Rollouts, constant=None) -> torch.Tensor:
    """1: the plain sum over the batch's tokens."""
    return ro.mask


@register_aggregation("seq-mean-token-sum", local=True, exchangeable=True)
def seq_mean_token_sum(ro: Rollouts, constant=None) -> torch.Tensor:
    """1/B: the REINFORCE average over the batch's responses (tpg's default)."""
    return ro.mask / _seqs_per_batch(ro)


@register_aggregation("seq-mean-token-mean", local=True, exchangeable=True)
def seq_mean_token_mean(ro: Rollouts, constant=None) -> torch.Tensor:
    """1/(B·(n_i + 1e-8)): each response's token mean, then the mean over responses."""
    return ro.mask / (_seqs_per_batch(ro) * (ro.mask.sum(1, keepdim=True) + 1e-8))


@register_aggregation("seq-mean-token-sum-norm", local=True, exchangeable=True)
def seq_mean_token_sum_norm(ro: Rollouts, constant=None) -> torch.Tensor:
    """1/(B·C): C = ``constant`` or the padded length L (verl ≥ 0.7.1; Dr. GRPO)."""
    C = float(ro.mask.shape[1]) if constant is None else float(constant)
    if not C > 0:
        raise TPGError(f"seq-mean-token-sum-norm needs a positive constant C, got {constant!r}")
    return ro.mask / (_seqs_per_batch(ro) * C)


AGG_MODES = tuple(AGGREGATIONS)     # verl's five modes, in verl's order


def agg_weights(ro: Rollouts, mode: str, constant: float | None = None) -> torch.Tensor:
    """(B, L) on-policy weight w[i, t] of each token's loss (the registered aggregation ``mode``)."""
    if mode not in AGGREGATIONS:
        raise TPGError(f"unknown aggregation mode {mode!r}; choose one of {tuple(AGGREGATIONS)} "
                       "(or register one with tpg.estimators.register_aggregation)")
    w = AGGREGATIONS[mode].fn(ro, constant=constant)
    return _check_per_token(w, ro, f"aggregation {mode!r}")


def _check_per_token(x, ro: Rollouts, what: str) -> torch.Tensor:
    """A (B, L) float tensor of finite values (a (B,) per-response value is tiled over the tokens)."""
    if not torch.is_tensor(x):
        raise TPGError(f"{what} must return a torch.Tensor of shape (B, L) = {tuple(ro.tokens.shape)} or (B,), "
                       f"got {type(x).__name__}")
    if x.dtype == torch.bool or not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TPGError(f"{what} returned dtype {x.dtype}; return a float tensor")
    B, L = ro.tokens.shape
    if x.dim() == 1 and x.shape[0] == B:
        x = x[:, None].expand(B, L)                                              # (B,) per response → (B, L)
    elif tuple(x.shape) != (B, L):
        raise TPGError(f"{what} returned shape {tuple(x.shape)}; expected (B, L) = ({B}, {L}) per token or "
                       f"(B,) = ({B},) per response")
    if not torch.isfinite(x).all():
        raise TPGError(f"{what} produced non-finite values (NaN or inf)")
    return x.to(torch.float64) * ro.mask


# ------------------------------------------------------------------------------ per-token losses
@register_policy_loss("ppo", linear=None)
def ppo_clip_loss(logp, logp_old, adv, mask=None, clip_low=0.2, clip_high=None, dual_clip=None):
    """verl ``compute_policy_loss_vanilla`` per token (B, L): max(−Aρ, −A·clip(ρ)), dual clip for A < 0.

    At ρ = 1 (θ = θ_old) the clamp is inactive and both branches have derivative −A, so the gradient
    is the policy gradient −A ∇logπ (PyTorch splits a tie of ``maximum`` between equal branches).
    Linear in A only where no token is clipped (e.g. at ρ = 1): undeclared, so the engine probes it.
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


@register_policy_loss("pg", linear=True)
def pg_loss(logp, logp_old, adv, mask=None):
    """REINFORCE per token (B, L): −A · log π (verl ``compute_policy_loss_reinforce``)."""
    return -adv * logp


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
        validate.real("KL coefficient coef (β)", self.coef, 0.0, None, why=" (verl's default is 0.001)")
        if self.kind not in KL_KINDS:
            raise TPGError(f"unknown KL estimator {self.kind!r}; choose one of {KL_KINDS}")
        if self.where not in ("reward", "loss"):
            raise TPGError(f"KL.where must be 'reward' or 'loss', got {self.where!r}")


# ------------------------------------------------------------------------------ advantages
NEEDS = {   # what an estimator may request, and what it then finds on the rollouts (tpg.rollouts.EXTRAS)
    "greedy": "True → extras['greedy_rm'] (B,): RM of the greedy response to the row's prompt",
    "continuations": "K ≥ 1 → extras['cont_rm'] (B, L+1, K): RM of K fresh continuations of each prefix",
    "anchors": "an anchor spec → extras['anchors'] (B, L) bool",
    "values": "True → extras['values'] (B, L): the critic's V̂ of the state before each token",
    "ref": "True → extras['ref_logp'] (B, L): log π_ref of the sampled tokens",
}


def check_needs(needs, who: str) -> dict:
    """A validated copy of an extra-draw request: known keys only, each with a value of its type."""
    if needs is None:
        return {}
    if not isinstance(needs, dict):
        raise TPGError(f"{who}: needs must be a dict such as {{'greedy': True}} or {{'continuations': 4}}, got {needs!r}")
    out = {}
    for k, v in needs.items():
        if k not in NEEDS:
            raise TPGError(f"{who}: unknown extra draw {k!r} in needs; valid keys: "
                           + "; ".join(f"{n} ({d})" for n, d in NEEDS.items()))
        if k == "continuations":
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
                raise TPGError(f"{who}: needs['continuations'] must be the number of rollouts K, an int ≥ 1, got {v!r}")
            out[k] = int(v)
        elif k == "anchors":
            from tpg.draws import _check_anchor_spec
            out[k] = _check_anchor_spec(v)
        else:
            if not isinstance(v, bool):
                raise TPGError(f"{who}: needs[{k!r}] must be True or False, got {v!r}")
            if v:
                out[k] = True
    return out


@dataclass(frozen=True)
class AdvantageSpec:
    name: str
    fn: Callable                      # fn(ro, **options) -> (B, L) or (B,) advantages
    needs: Callable                   # needs(options) -> dict of extra draws, e.g. {"greedy": True}
    declared: dict                    # property -> bool | None | callable(options) (tpg.batches.PROPERTIES)
    doc: str


ADVANTAGES: dict[str, AdvantageSpec] = {}


def register_advantage(name: str, needs: Callable | dict | None = None, *, multilinear=None, local=None,
                       exchangeable=None, overwrite: bool = False):
    """Decorator: register ``fn(ro, **options) -> (B, L) | (B,)`` advantages under ``name``.

    ``needs`` requests extra draws (``NEEDS``: a dict, or a function of the options returning one),
    which the function then reads from ``ro.extras``; unknown keys are refused here. The shortcut
    properties the exact engine relies on — ``local`` (reduces over ``ro.batch`` / ``ro.group``, never
    across batches), ``exchangeable`` (treats the members of a group alike), ``multilinear`` (in the
    continuation returns) — are None by default: undeclared, so the engine probes them on the
    estimator at hand (``tpg.batches``). Declare True only where it holds; the tests probe every
    built-in declaration. ``overwrite=True`` replaces an existing registration.
    """
    def deco(fn):
        _check_name(ADVANTAGES, "advantage", name, overwrite)
        if not callable(fn):
            raise TPGError(f"register_advantage({name!r}) decorates a function, got {fn!r}")
        if callable(needs):
            nd = needs
        else:
            fixed = check_needs(needs, f"register_advantage({name!r})")
            nd = lambda opts, _n=fixed: dict(_n)                                    # noqa: E731
        ADVANTAGES[name] = AdvantageSpec(name, fn, nd, _declare(local, exchangeable, multilinear=multilinear),
                                         _doc(fn))
        return fn
    return deco


def _resolve(v, options: dict):
    return v(options) if callable(v) else v


def _all(values) -> bool | None:
    """Conjunction of declarations: False if any is False, None if any is undeclared."""
    values = list(values)
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


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
    loss_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.advantage not in ADVANTAGES:
            raise TPGError(f"unknown estimator {self.advantage!r}; registered: {sorted(ADVANTAGES)}")
        if self.loss not in POLICY_LOSSES:
            raise TPGError(f"unknown policy loss {self.loss!r}; choose one of {sorted(POLICY_LOSSES)} "
                           "(or register one with tpg.estimators.register_policy_loss)")
        if self.agg not in AGGREGATIONS:
            raise TPGError(f"unknown aggregation mode {self.agg!r}; choose one of {tuple(AGGREGATIONS)}")
        if self.kl is not None and not isinstance(self.kl, KL):
            raise TPGError(f"kl must be None or a tpg.KL(coef, kind, where), got {self.kl!r}")
        _check_clip("clip", self.clip, optional=False)
        _check_clip("clip_high", self.clip_high, optional=True)
        if self.dual_clip is not None and not (is_real(self.dual_clip) and self.dual_clip > 1.0):
            raise TPGError(f"dual clip constant c (dual_clip) must be None or a number > 1 (verl uses 3), "
                           f"got {self.dual_clip!r}")
        if not isinstance(self.options, dict) or not isinstance(self.loss_options, dict):
            raise TPGError("options and loss_options must be dicts of keyword arguments")
        _check_options(ADVANTAGES[self.advantage], self.options)
        _check_signature(POLICY_LOSSES[self.loss].fn, f"policy loss {self.loss!r}", self._loss_kwargs(), skip=4)
        if not self.name:
            object.__setattr__(self, "name", self.advantage)
        self.needs                                                                   # validate the request now

    def _loss_kwargs(self) -> dict:
        base = dict(clip_low=self.clip, clip_high=self.clip_high, dual_clip=self.dual_clip) if self.loss == "ppo" else {}
        return {**base, **self.loss_options}

    @property
    def needs(self) -> dict:
        nd = check_needs(ADVANTAGES[self.advantage].needs(self.options), f"estimator {self.name or self.advantage!r}")
        if self.kl is not None:
            nd["ref"] = True
        return nd

    def declared(self, prop: str) -> bool | None:
        """The estimator's declaration of a shortcut property (``tpg.batches.PROPERTIES``): the
        conjunction over its advantage, loss and aggregation; None (probe it) when any part is
        undeclared or an option is a user callable (whose behaviour nothing declares)."""
        spec = ADVANTAGES[self.advantage]
        if any(callable(v) for v in self.options.values()):
            return None
        if prop == "multilinear":
            return _all([_resolve(spec.declared["multilinear"], self.options),
                         POLICY_LOSSES[self.loss].declared["linear"]])
        return _all([_resolve(spec.declared[prop], self.options), POLICY_LOSSES[self.loss].declared[prop],
                     AGGREGATIONS[self.agg].declared[prop]])

    def __call__(self, ro: Rollouts) -> EstimatorOutput:
        if ro.logp is None:
            raise TPGError("the rollouts carry no log-probs: call ro.score(policy) first")
        if self.kl is not None and self.kl.where == "reward":
            # verl apply_kl_penalty: −β·kl_t on every token; outcome estimators see the summed score
            # RM − β Σ_t kl_t, per-token ones (ReMax, REINFORCE++) read ro.kl_reward.
            kl_tok = self.kl.coef * kl_penalty(ro.logp_old, ro.extras["ref_logp"], self.kl.kind) * ro.mask  # (B, L)
            ro = replace(ro, token_rewards=ro.token_rewards - kl_tok, rm=ro.rm - kl_tok.sum(1), kl_reward=kl_tok)
        with torch.no_grad():
            adv = ADVANTAGES[self.advantage].fn(ro, **self.options)
        adv = _check_per_token(adv, ro, f"advantage {self.advantage!r}").to(ro.logp.dtype)      # (B, L)
        w = agg_weights(ro, self.agg, self.agg_constant)                                        # (B, L)
        loss_fn = POLICY_LOSSES[self.loss].fn
        ctx = {"ro": ro} if "ro" in inspect.signature(loss_fn).parameters else {}   # batch-level losses (clip_cov)
        per_tok = loss_fn(ro.logp, ro.logp_old, adv, ro.mask, **self._loss_kwargs(), **ctx)
        loss = (w * per_tok).sum()
        if self.kl is not None and self.kl.where == "loss":
            loss = loss + self.kl.coef * (w * kl_penalty(ro.logp, ro.extras["ref_logp"], self.kl.kind)).sum()
        return EstimatorOutput(loss, adv, {"agg_weights": w})


def _check_signature(fn, what: str, kwargs: dict, skip: int) -> None:
    sig = inspect.signature(fn)
    try:
        sig.bind_partial(*([None] * skip), **kwargs)
    except TypeError as e:
        valid = [p.name for p in list(sig.parameters.values())[skip:]
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        raise TPGError(f"{what} got invalid options {sorted(kwargs)} ({e}); its options are {valid or 'none'}") from e


def estimator(name: str, *, loss: str = "ppo", clip: float = 0.2, clip_high: float | None = None,
              dual_clip: float | None = None, agg: str | None = None, agg_constant: float | None = None,
              kl: KL | None = None, label: str = "", loss_options: dict | None = None, **options) -> Estimator:
    """Build an estimator: ``estimator("grpo", std=False, agg="token-mean")``. Keyword arguments
    other than the loss/aggregation/KL ones are the advantage function's options. A preset
    (``PRESETS``) fills only what the caller left unset: explicit arguments always win."""
    if not isinstance(name, str):
        raise TPGError(f"estimator name must be a string, got {name!r}")
    if name in PRESETS:
        preset = dict(PRESETS[name])
        name = preset.pop("advantage")
        agg = preset.pop("agg", None) if agg is None else agg
        agg_constant = preset.pop("agg_constant", None) if agg_constant is None else agg_constant
        preset.pop("agg", None), preset.pop("agg_constant", None)
        options = {**preset, **options}
    return Estimator(name, options, loss, clip, clip_high, dual_clip, agg or "seq-mean-token-sum", agg_constant, kl,
                     label or name, dict(loss_options or {}))


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
    name = getattr(est, "name", None) or getattr(est, "__name__", "estimator")
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise TPGError(f"estimator {name!r} must return a scalar loss tensor (or an EstimatorOutput), got "
                       f"{type(loss).__name__}{tuple(loss.shape) if torch.is_tensor(loss) else ''}")
    if not loss.requires_grad:
        return torch.zeros_like(leaf)
    (g,) = torch.autograd.grad(loss.reshape(()), leaf, allow_unused=True)
    if g is not None and not torch.isfinite(g).all():
        raise TPGError(f"estimator {name!r} has non-finite coefficients −∂loss/∂logp (NaN or inf)")
    return torch.zeros_like(leaf) if g is None else -g * ro.mask
