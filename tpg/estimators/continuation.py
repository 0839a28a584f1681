"""Monte Carlo advantages from continuation rollouts: TRePO (every reading of PAPER §4) and VinePPO.

Both read ``ro.extras["cont_rm"]`` (B, L+1, K): the RM of K fresh continuations from each prefix
y_≤t, t = 0..L (RM(y) itself at and after the end of the response). Notation used below:

    v̂_t = cont_rm[:, t].mean(-1)   (B, L+1), the MC value of the prefix with t tokens (v̂_T = RM)
    position t = 1..T  ↦  advantage column t − 1,   Â_t = v̂_t − v̂_{t−1}   (PAPER §4, Theorem 2)

Every advantage here is linear in the continuation returns (whitened VinePPO excepted), so the
exact engine may replace them by their expectation U(prefix) (``multilinear=True``); the tests
cross-check that substitution against a joint enumeration of the continuations themselves.
"""
from __future__ import annotations

from numbers import Integral

import torch

from tpg import validate
from tpg.draws import _check_anchor_spec
from tpg.estimators.core import masked_whiten, register_advantage
from tpg.mdp import BudgetError, TPGError
from tpg.rollouts import Rollouts

TREPO_VARIANTS = ("all", "subset", "interp", "chunk", "value_interp")
ANCHORED = ("subset", "interp", "chunk", "value_interp")


# ------------------------------------------------------------------------------ plumbing
MAX_K = 1_000_000     # continuations per prefix: the (B, L+1, K) returns must fit one batch


def _check_K(K) -> int:
    K = validate.integer("number of continuation rollouts K", K, 1)
    if K > MAX_K:
        raise BudgetError(f"K={K:,} continuation rollouts per prefix is above the budget of {MAX_K:,} "
                          "(extras['cont_rm'] holds B·(L+1)·K returns)")
    return K


def _check_trepo_options(variant: str, K: int, anchors) -> None:
    if variant not in TREPO_VARIANTS:
        raise TPGError(f"unknown TRePO variant {variant!r}; choose one of {TREPO_VARIANTS}")
    _check_K(K)
    if variant == "all":
        if anchors is not None:
            raise TPGError("TRePO variant 'all' uses every position and takes no anchors; use variant='subset', "
                           "'interp', 'chunk' or 'value_interp' for an anchor set")
        return
    if anchors is None:
        raise TPGError(f"TRePO variant {variant!r} needs anchors=, e.g. {{'kind': 'bernoulli', 'q': 0.5}}, "
                       "{'kind': 'every', 'k': 2} or {'kind': 'fixed', 'positions': [1, 3]}")
    _check_anchor_spec(anchors)
    if variant == "subset" and anchors["kind"] != "bernoulli":
        raise TPGError("TRePO variant 'subset' reweights by 1/q: it needs anchors={'kind': 'bernoulli', 'q': q}, "
                       f"got {anchors!r}")


def _trepo_needs(opts: dict) -> dict:
    variant, K, anchors = opts.get("variant", "all"), opts.get("K", 1), opts.get("anchors")
    _check_trepo_options(variant, K, anchors)
    return {"continuations": K, "anchors": anchors} if variant in ANCHORED else {"continuations": K}


def mc_values(ro: Rollouts, K: int, self_inclusive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_fresh, v_base), each (B, L+1): the mean of the K continuation returns at each prefix, and
    the value used on the baseline side of a difference. With ``self_inclusive`` the baseline side
    also averages the sampled response's own RM, (Σ_k R_k + RM)/(K+1) (the F10 mistake)."""
    cont = ro.extras.get("cont_rm")
    if cont is None:
        raise TPGError("this estimator reads extras['cont_rm']: fill it with tpg.draws.MonteCarloDraws or "
                       "ExactDraws (or tpg.rollouts.continuation_rm)")
    B, L = ro.tokens.shape
    if cont.shape != (B, L + 1, K):
        raise TPGError(f"extras['cont_rm'] has shape {tuple(cont.shape)}, expected (B, L+1, K) = ({B}, {L + 1}, {K})")
    cont = cont.to(torch.float64)
    v = cont.mean(-1)                                                          # (B, L+1)
    if not self_inclusive:
        return v, v
    return v, (cont.sum(-1) + ro.rm[:, None]) / (K + 1)                        # (B, L+1)


def anchor_bounds(ro: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """(prev, nxt), each (B, L+1) over prefix lengths 0..L: the last anchor ≤ t and the first
    anchor ≥ t, where the anchors are ``extras["anchors"]`` (column t−1 = position t) plus the
    virtual anchor 0 and the end T. Past T, nxt is clamped to L (those positions are masked)."""
    B, L = ro.tokens.shape
    idx = torch.arange(L + 1).expand(B, L + 1)                                 # (B, L+1)
    is_a = torch.zeros(B, L + 1, dtype=torch.bool)
    is_a[:, 1:] = ro.extras["anchors"].bool() & ro.mask.bool()                 # positions 1..L
    is_a[:, 0] = True                                                          # virtual anchor at 0
    is_a[torch.arange(B), ro.lengths] = True                                   # T is always an anchor
    prev = torch.cummax(torch.where(is_a, idx, 0), 1).values                   # (B, L+1)
    big = torch.where(is_a, idx, L + 1).flip(1)
    nxt = torch.cummin(big, 1).values.flip(1).clamp(max=L)                     # (B, L+1)
    return prev, nxt


# ------------------------------------------------------------------------------ the math
@register_advantage("trepo", needs=_trepo_needs, local=True, exchangeable=True, multilinear=True)
def trepo(ro: Rollouts, variant: str = "all", K: int = 1, anchors: dict | None = None,
          self_inclusive: bool = False) -> torch.Tensor:
    """TRePO: MC advantages from K fresh continuations (PAPER §4, built on Theorem 2), (B, L).

    Contract: reads extras["cont_rm"] (B, L+1, K) and, for anchored variants, extras["anchors"]
    (B, L) bool; returns (B, L) advantages, 0 after the end. With anchors t_1 < … < t_m = T (T is
    always added) and t_0 = 0, Â_t = v̂_t − v̂_{t−1}:

    - "all" (§4 reading 1, claim T15): Â_t at every t ≤ T. Unbiased for any K ≥ 1.
    - "subset" (reading 2, T17): 1[t ∈ S] Â_t / q, S ~ Bernoulli(q) per position
      (anchors={"kind": "bernoulli", "q": q}; T is not forced here). Unbiased.
    - "interp" (reading 3, the literal one, F9): anchors get Â_t; t_a < t < t_b gets
      (1 − x) Â_{t_a} + x Â_{t_b}, x = (t − t_a)/(t_b − t_a), with Â_0 = 0 at the virtual anchor 0.
      Biased: interpolated positions contribute 0 in expectation on fixed-length responses.
    - "chunk" (reading 4, value-anchored, VinePPO-like, T16): every t ∈ (t_{j−1}, t_j] gets
      v̂_{t_j} − v̂_{t_{j−1}}. Unbiased (martingale property; t_j is a stopping time).
    - "value_interp" (reading 5, F9): the chunk advantage divided by L_j = t_j − t_{j−1}. Biased.

    ``self_inclusive=True`` (F10) puts the sampled RM(y) into the baseline-side average,
    v̂_{t−1} → (Σ_k R_k + RM)/(K + 1), while the v̂_t side stays fresh. Biased: the baseline term
    alone has bias −E[RM ∇ℓ_t]/(K + 1), so "all" gives E[ĝ] = K/(K + 1) ∇J.
    Not recovered from the paper (our choices): K, the anchor law, interpolation on advantages.
    """
    _check_trepo_options(variant, K, anchors)
    v, vb = mc_values(ro, K, self_inclusive)                                   # (B, L+1) each
    B, L = ro.tokens.shape
    step = v[:, 1:] - vb[:, :-1]                                               # (B, L) Â_t at column t−1
    if variant == "all":
        return step * ro.mask
    if variant == "subset":
        return ro.extras["anchors"].to(v.dtype) * step / float(anchors["q"]) * ro.mask
    prev, nxt = anchor_bounds(ro)                                              # (B, L+1)
    t = torch.arange(1, L + 1).expand(B, L)                                    # (B, L) positions
    t_b = nxt[:, 1:]                                                           # first anchor ≥ t
    if variant == "interp":
        t_a = prev[:, 1:]                                                      # last anchor ≤ t
        a_hat = torch.cat([torch.zeros(B, 1, dtype=v.dtype), step], 1)        # (B, L+1), Â_0 = 0
        span = (t_b - t_a).clamp(min=1).to(v.dtype)                            # int / int would be float32
        x = (t - t_a).to(v.dtype) / span                                       # (B, L), 0 at anchors
        return ((1 - x) * a_hat.gather(1, t_a) + x * a_hat.gather(1, t_b)) * ro.mask
    t_prev = prev[:, :-1]                                                      # last anchor ≤ t − 1 = t_{j−1}
    chunk = v.gather(1, t_b) - vb.gather(1, t_prev)                            # (B, L)
    if variant == "chunk":
        return chunk * ro.mask
    return chunk / (t_b - t_prev).clamp(min=1).to(v.dtype) * ro.mask           # value_interp


def _check_vineppo_options(K, step, max_steps) -> None:
    _check_K(K)
    if not (validate.is_int(step) and step >= 1):
        raise TPGError(f"VinePPO step size must be an int ≥ 1 (tokens per step), got {step!r}")
    if max_steps is not None and not (validate.is_int(max_steps) and max_steps >= 0):
        raise TPGError(f"max_steps must be None or an int ≥ 0 (0: a value for the first step only), got {max_steps!r}")


def _vineppo_needs(opts: dict) -> dict:
    _check_vineppo_options(opts.get("K", 9), opts.get("step", 2), opts.get("max_steps"))
    return {"continuations": int(opts.get("K", 9))}


@register_advantage("vineppo", needs=_vineppo_needs, local=True, exchangeable=True,
                    multilinear=lambda opts: not opts.get("whiten", True))
def vineppo(ro: Rollouts, K: int = 9, step: int = 2, max_steps: int | None = None, whiten: bool = True
            ) -> torch.Tensor:
    """VinePPO's MC advantages on fixed-size token steps (ESTIMATORS.md §5; PAPER §4 reading 4), (B, L).

    Contract: reads extras["cont_rm"] (B, L+1, K); returns (B, L) advantages, 0 after the end.
    Step k covers positions (k·step, min((k+1)·step, T)]; s_k is the state after k steps. With
    V̂(s_k) = v̂_{k·step} (the mean of K rollouts), V̂(terminal) = 0 and the response-level reward on
    the last step (γ = 1), A_k = r_k + V̂(s_{k+1}) − V̂(s_k) = v̂_{end of step} − v̂_{start of step},
    using v̂_T = RM. Every token of a step gets A_k (VinePPO assigns a token the advantage of the
    step holding its first character). States s_k with k > ``max_steps`` get no rollouts and are
    filled backwards with the trajectory return (VinePPO's ``max_step_for_value_estimation``): the
    capped step gets RM − V̂(s_max_steps) and later steps get 0. Then ``masked_whiten`` over each
    batch's tokens when ``whiten`` (VinePPO's default, True).

    Defaults and differences from VinePPO: K = 9 (its MATH configs); steps are ``step`` tokens, not
    newline-separated reasoning steps; no unfinished-response penalty (responses end at H).
    Without whitening or cap it is unbiased (= TRePO "chunk", anchors every ``step`` tokens). A cap
    drops every token after step ``max_steps`` from E[ĝ]: biased when responses are longer.
    Whitening adds a batch-mean shift and a random 1/std scale and is not linear in the rollouts,
    so the exact engine refuses whitened VinePPO (multilinear = not whiten): use Monte Carlo.
    """
    _check_vineppo_options(K, step, max_steps)
    v, _ = mc_values(ro, K)                                                    # (B, L+1)
    B, L = ro.tokens.shape
    T = ro.lengths[:, None]                                                    # (B, 1)
    t = torch.arange(1, L + 1)[None, :]                                        # (1, L) positions
    start = (t - 1) // step * step                                             # (1, L) boundary before the step
    end = torch.minimum(start + step, T).clamp(max=L)                          # (B, L) boundary after it
    start = start.expand(B, L)
    v_fill = v.clone()                                                         # (B, L+1) V̂ with the cap applied
    if max_steps is not None:
        k_of = torch.arange(L + 1)[None, :] // step                            # step index of each boundary
        capped = (k_of > max_steps) & (torch.arange(L + 1)[None, :] < T)
        v_fill = torch.where(capped, ro.rm[:, None].to(v.dtype), v_fill)       # filled with the return (γ = 1)
    adv = (v_fill.gather(1, end) - v_fill.gather(1, start)) * ro.mask          # (B, L)
    return masked_whiten(adv, ro.mask, ro.batch, ro.n_batches) if whiten else adv
