"""Estimators as exact linear maps: the symbolic E[ĝ] of the numeric estimator code.

Every estimator whose coefficients c = −∂loss/∂logp are linear in its inputs (group rewards, the
greedy reward, the continuation returns) has its exact coefficient map read off
``tpg.estimators.coefficients`` by evaluating it on basis input vectors (plus a zero vector and a
random vector, which check that the map really is linear), converting each float to the small
rational it is (verified to 1e-12). The symbolic expectation then sums over every G-tuple of
responses with its symbolic probability (``tuple_expectation``), or over every response and every
choice of fresh continuations (``fresh_expectation``). So the identity proved is a statement about
the estimator code tpg runs (DESIGN §1: one code path).
"""
from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import sympy
import torch

from tpg.draws import deterministic_anchors
from tpg.estimators import coefficients
from tpg.mdp import TokenMDP, TPGError
from tpg.rollouts import Rollouts, enumerate_responses
from tpg.symbolic.engine import SymbolicMDP


# ====================================================================================== estimators as exact maps
def exact_rational(x: float, unit: float = 1.0, max_den: int = 10_000) -> sympy.Rational:
    """The rational q with x = q·unit, found by continued fractions and verified to 1e-12·max(1,|x|):
    the coefficients of the estimators used here are small rationals (times 1/√2 for std-GRPO)."""
    q = sympy.Rational(x / unit).limit_denominator(max_den)
    if abs(float(q) * unit - x) > 1e-12 * max(1.0, abs(x)):
        raise TPGError(f"coefficient {x!r} is not a small rational multiple of {unit!r}: the estimator's "
                       "coefficient map cannot be converted exactly")
    return q


def group_rollouts(mdp: TokenMDP, tuples: np.ndarray, Z: np.ndarray, feed: Callable) -> Rollouts:
    """A Rollouts holding one independent batch per (tuple, input vector): tuples (n, G) response
    rows, Z (E, G, K) per-row input vectors; ``feed(ro, z (B, K))`` writes the inputs into the
    rollouts (rm, extras). Log-probs are 0 = logp_old: ratio 1, the on-policy gradient."""
    enum = enumerate_responses(mdp)
    n, G = tuples.shape
    E = Z.shape[0]
    rows = torch.as_tensor(np.repeat(tuples[:, None, :], E, 1).reshape(-1))        # (n·E·G,)
    ro = enum.select(rows)
    B, L = ro.tokens.shape
    ids = torch.arange(n * E).repeat_interleave(G)                                  # one batch per (tuple, input)
    ro.group, ro.batch, ro.n_batches = ids, ids, n * E
    ro.logp = torch.zeros(B, L, dtype=torch.float64)
    ro.logp_old = torch.zeros(B, L, dtype=torch.float64)
    ro.extras = {}
    z = torch.as_tensor(np.broadcast_to(Z[None], (n,) + Z.shape).reshape(B, -1), dtype=torch.float64)  # (B, K)
    return feed(ro, z)


def linear_coefficients(est, mdp: TokenMDP, tuples: np.ndarray, K: int, feed: Callable, seed: int = 0
                        ) -> np.ndarray:
    """Exact map M (n, G, L, G, K) with c[i, t] = Σ_{j,k} M[i, t, j, k] z[j, k] for each tuple.

    ``coefficients(est, ro)`` is evaluated on every basis vector of the G·K inputs, on 0 and on a
    random vector; a non-zero offset or a failed linearity check raises TPGError (the estimator is
    not linear in these inputs, so its expectation cannot be written this way)."""
    n, G = tuples.shape
    D = G * K
    rand = np.random.default_rng(seed).standard_normal(D)
    Z = np.concatenate([np.eye(D), np.zeros((1, D)), rand[None]]).reshape(D + 2, G, K)   # (E, G, K)
    ro = group_rollouts(mdp, tuples, Z, feed)
    L = ro.tokens.shape[1]
    c = coefficients(est, ro).reshape(n, D + 2, G, L).numpy()                      # (n, E, G, L)
    basis = c[:, :D]                                                               # (n, D, G, L)
    if np.abs(c[:, D]).max() > 1e-14:
        raise TPGError(f"estimator {getattr(est, 'name', est)!r} has coefficients at zero inputs: not linear")
    pred = np.einsum("d,ndgl->ngl", rand, basis)
    if np.abs(pred - c[:, D + 1]).max() > 1e-12 * max(1.0, np.abs(pred).max()):
        raise TPGError(f"estimator {getattr(est, 'name', est)!r} is not linear in its inputs")
    exact = {v: exact_rational(float(v)) for v in np.unique(basis)}
    M = np.vectorize(lambda v: exact[v], otypes=[object])(basis)                   # (n, D, G, L)
    return M.reshape(n, G, K, G, L).transpose(0, 3, 4, 1, 2)                        # (n, G, L, G, K)


def joint_tuples(mdp: TokenMDP, G: int) -> np.ndarray:
    """(n, G) every ordered G-tuple of responses of the same prompt (joint route), prompt-major."""
    enum = enumerate_responses(mdp)
    out = []
    for x in range(len(mdp.prompts)):
        ids = torch.nonzero(enum.prompt_idx == x)[:, 0].tolist()
        out += list(itertools.product(ids, repeat=G))
    return np.asarray(out, dtype=np.int64)


def feed_outcome(ro: Rollouts, z: torch.Tensor) -> Rollouts:
    """Inputs (RM, greedy RM): z[:, 0] is RM, z[:, 1] (when present) the greedy response's RM."""
    ro.rm = z[:, 0].clone()
    if z.shape[1] > 1:
        ro.extras["greedy_rm"] = z[:, 1].clone()
    return ro


def tuple_expectation(eng: SymbolicMDP, tuples: np.ndarray, coef: Callable) -> list[list]:
    """(S, V) symbolic E[ĝ] over every ordered tuple of responses of a prompt (``joint_tuples``):
    Σ_k ρ(x) Π_i π(y_i|x) Σ_i Σ_t c[i, t] ∇ℓ_it, where ``coef(k, tup, i, t)`` returns c[i, t] of
    tuple k as a list of (rational q, element z) terms, c = Σ q·z. Each term enters the E-weights as
    the lazy pair (P·q, z), so ``expected_score`` multiplies each distinct input z (a U(prefix), an
    R(y)) once per (state, token) by its summed probability (DESIGN §2: linearity)."""
    W: dict[int, list] = {p.n: [[] for _ in range(p.T)] for p in eng.paths}
    conv: dict = {}
    for k, tup in enumerate(tuples.tolist()):
        w = eng.rho[eng.paths[tup[0]].prompt]
        for m in tup:
            w = w * eng.cond_prob(m)
        for i, m in enumerate(tup):
            for t in range(eng.paths[m].T):
                for q, z in coef(k, tup, i, t):
                    if q not in conv:
                        conv[q] = eng.const(q)
                    W[m][t].append((w * conv[q], z))
    return eng.expected_score(W)


def linear_expectation(eng: SymbolicMDP, est, G: int, inputs: Callable, K: int, feed: Callable = feed_outcome
                       ) -> list[list]:
    """(S, V) symbolic E[ĝ] of a G-sample estimator linear in K per-response inputs, with its
    coefficient map read off the numeric code (``linear_coefficients``); ``inputs(n)`` gives the K
    symbolic inputs of response n (e.g. [RM(y_n)], or [RM(y_n), RM(greedy)])."""
    tuples = joint_tuples(eng.mdp, G)
    M = linear_coefficients(est, eng.mdp, tuples, K, feed)                        # (n, G, L, G, K)

    def coef(k, tup, i, t):
        out = []
        for j, m in enumerate(tup):
            z = inputs(m)
            out += [(M[k, i, t, j, kk], z[kk]) for kk in range(K) if M[k, i, t, j, kk] != 0]
        return out
    return tuple_expectation(eng, tuples, coef)


# ------------------------------------------------------------------------------ TRePO
def feed_continuations(anchors: dict | None = None) -> Callable:
    """Inputs of a TRePO estimator with K continuations: z = (cont_rm[0..L, 0..K−1], RM) per row."""

    def feed(ro: Rollouts, z: torch.Tensor) -> Rollouts:
        B, L = ro.tokens.shape
        K = (z.shape[1] - 1) // (L + 1)
        ro.extras["cont_rm"] = z[:, :-1].reshape(B, L + 1, K).clone()
        ro.rm = z[:, -1].clone()
        if anchors is not None:
            ro.extras["anchors"] = deterministic_anchors(anchors, B, L) & ro.mask.bool()
        return ro
    return feed


def _trepo_inputs(eng: SymbolicMDP, n: int, K: int) -> list:
    """Continuation returns replaced by their expectation U(y_≤j) (RM(y) at and after the end)."""
    v = eng.prefix_values(n)
    v = v + [v[-1]] * (eng.H + 1 - len(v))
    return [v[j] for j in range(eng.H + 1) for _ in range(K)] + [eng.rm(n)]


def trepo_expectation(eng: SymbolicMDP, est, K: int = 1, anchors: dict | None = None) -> list[list]:
    """(S, V) E[ĝ] of a TRePO estimator (G = 1) with the continuation returns substituted by their
    conditional expectation U(prefix): exact for estimators linear in fresh continuations."""
    return linear_expectation(eng, est, 1, lambda n: _trepo_inputs(eng, n, K), (eng.H + 1) * K + 1,
                              feed_continuations(anchors))


def fresh_expectation(eng: SymbolicMDP, est, K: int) -> list[list]:
    """(S, V) E[ĝ] of a TRePO estimator with K fresh continuation rollouts per open prefix, enumerated
    jointly: every response y and every choice of K completions c_(j,k) of each open prefix y_≤j
    (j < T), probability P(y) Π π(c_(j,k) | y_≤j), inputs RM(c_(j,k)) (RM(y) at and after the end)."""
    L, Kin = eng.H, (eng.H + 1) * K + 1
    M = linear_coefficients(est, eng.mdp, joint_tuples(eng.mdp, 1), Kin, feed_continuations())  # (n,1,L,1,Kin)
    W: dict[int, list] = {p.n: [[] for _ in range(p.T)] for p in eng.paths}
    conv = {q: eng.const(q) for q in set(M.reshape(-1).tolist())}
    for p in eng.paths:
        per_prefix = [list(itertools.product(eng.completions(p.n, j), repeat=K)) for j in range(p.T)]
        for draw in itertools.product(*per_prefix):                              # one K-tuple per open prefix
            w = eng.prob(p.n)
            z = []
            for j in range(L + 1):
                for k in range(K):
                    if j < p.T:
                        m, pm = draw[j][k]
                        w = w * pm
                        z.append(eng.rm(m))
                    else:
                        z.append(eng.rm(p.n))
            z.append(eng.rm(p.n))
            for t in range(p.T):
                W[p.n][t] += [(w * conv[M[p.n, 0, t, 0, kk]], z[kk]) for kk in range(Kin)
                              if M[p.n, 0, t, 0, kk] != 0]
    return eng.expected_score(W)
