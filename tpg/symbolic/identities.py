"""The identities ``tpg prove`` proves (true) or refutes with a counterexample (false), at given sizes.

Each check builds ``SymbolicMDP`` engines (``tpg.symbolic.engine``), computes both sides of an
identity (estimators through ``tpg.symbolic.linear``) and returns ``Evidence``: differences that must
vanish identically and witnesses that must not (a non-zero polynomial, exhibited at a rational point).
``IDENTITIES`` registers them (ids used by proofs/ and ``tpg prove``); ``prove(id)`` runs one.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import sympy
import torch

from tpg.estimators import coefficients, estimator
from tpg.mdp import TokenMDP, TPGError
from tpg.symbolic.engine import SymbolicMDP, _first_nonzero, _flat, describe, is_zero, scale, structure, sub
from tpg.symbolic.linear import (exact_rational, fresh_expectation, group_rollouts, joint_tuples, linear_expectation,
                                 trepo_expectation, tuple_expectation)


# ====================================================================================== evidence and registry
@dataclass
class Witness:
    """A claimed non-zero: the symbolic expression (or table) and its exact value at a rational point."""
    label: str
    expr: Any
    value: Any
    point: str


@dataclass
class Evidence:
    """What a check computed: differences that must vanish identically, and witnesses that must not."""
    size: list[str] = field(default_factory=list)
    zero: list[tuple[str, Any]] = field(default_factory=list)
    nonzero: list[Witness] = field(default_factory=list)

    def equal(self, label: str, lhs, rhs) -> None:
        self.zero.append((label, sub(lhs, rhs)))

    def vanishes(self, label: str, x) -> None:
        self.zero.append((label, x))

    def witness(self, label: str, eng: SymbolicMDP, expr, seed: int = 0) -> None:
        pt = eng.point(seed)
        shown = {k: v for k, v in pt.items() if k in eng.sym or k == "gamma"}
        self.nonzero.append(Witness(label, expr, eng.evaluate(expr, pt), _point_text(shown)))


def _point_text(pt: dict) -> str:
    items = list(pt.items())
    txt = ", ".join(f"{k}={v}" for k, v in items[:6])
    return txt + (f", … ({len(items)} values, seeded)" if len(items) > 6 else "")


@dataclass(frozen=True)
class Identity:
    """One registered identity: ``kind`` "true" (proved: every difference is identically zero) or
    "false" (counterexample: the bias is a non-zero polynomial, non-zero at a rational point)."""
    id: str
    statement: str
    equation: str
    size: str
    kind: str
    check: Callable[[], Evidence]


@dataclass
class Result:
    id: str
    status: str          # "proved" | "counterexample" | "FAILED"
    seconds: float
    size: str
    detail: list[str] = field(default_factory=list)


def judge(identity: Identity, ev: Evidence) -> tuple[bool, list[str]]:
    """Every zero item identically zero and every witness symbolically AND numerically non-zero;
    a true identity needs ≥ 1 zero item, a false claim ≥ 1 witness."""
    lines, ok = [f"size: {s}" for s in ev.size], True
    for label, diff in ev.zero:
        z = is_zero(diff)
        ok &= z
        lines.append(f"{'ok ' if z else 'NOT'} zero: {label}" + ("" if z else f"; e.g. {_first_nonzero(diff)}"))
    for w in ev.nonzero:
        sym_nz = not is_zero(w.expr)
        val_nz = any(v != 0 for v in _flat(w.value))
        ok &= sym_nz and val_nz
        shown = next((v for v in _flat(w.value) if v != 0), 0)
        lines.append(f"{'ok ' if sym_nz and val_nz else 'NOT'} non-zero: {w.label}: symbolically "
                     f"{_first_nonzero(w.expr) if sym_nz else '0'}; = {shown} at {w.point}")
    need = ev.zero if identity.kind == "true" else ev.nonzero
    if not need:
        ok = False
        lines.append("NOT a check: no " + ("identity" if identity.kind == "true" else "witness") + " was computed")
    return ok, lines


def prove(identity_id: str) -> Result:
    """Run one registered identity; status "proved" / "counterexample" on success, else "FAILED"."""
    ident = get_identity(identity_id)
    t0 = time.perf_counter()
    try:
        ev = ident.check()
        ok, lines = judge(ident, ev)
    except Exception as e:        # a crashed check is a failed proof; the message says where
        ok, lines = False, [f"NOT run: {type(e).__name__}: {e}"]
    status = ("proved" if ident.kind == "true" else "counterexample") if ok else "FAILED"
    return Result(ident.id, status, time.perf_counter() - t0, ident.size, lines)


def get_identity(identity_id: str) -> Identity:
    if identity_id not in IDENTITIES:
        raise TPGError(f"unknown identity {identity_id!r}; valid ids: {', '.join(IDENTITIES)}")
    return IDENTITIES[identity_id]


# ====================================================================================== sizes
# Sizes: the largest at which every identity stays ≤ ~6 s of one CPU core in pure-Python sympy (no gmpy2);
# all 18 together take ≈ 35 s CPU. One size up (V = 3, H = 5 or V = 4, H = 4) costs 3–10× more.
MAIN = (dict(vocab_size=3, horizon=4, n_prompts=2), dict(vocab_size=4, horizon=3, n_prompts=2))
LOGITS = dict(vocab_size=3, horizon=2, n_prompts=1)
GROUP = ((2, dict(vocab_size=3, horizon=3, n_prompts=2)), (3, dict(vocab_size=3, horizon=2, n_prompts=2)))
FIXED = dict(vocab_size=2, horizon=4, eos=False, n_prompts=2)
FRESH = ((1, dict(vocab_size=3, horizon=3, n_prompts=1)), (2, dict(vocab_size=3, horizon=2, n_prompts=1)))


def short(size: dict | TokenMDP | SymbolicMDP) -> str:
    """'V=3 H=4 P=2' (V counts EOS; 'no-EOS' marks fixed-length responses)."""
    m = size.mdp if isinstance(size, SymbolicMDP) else size if isinstance(size, TokenMDP) else structure(**size)
    eos = "" if m.eos is not None else " no-EOS"
    return f"V={m.vocab_size}{eos} H={m.horizon} P={len(m.prompts)}"


def _mains(**opts) -> list[SymbolicMDP]:
    return [SymbolicMDP(structure(**kw), **opts) for kw in MAIN]


def weights(eng: SymbolicMDP, f: Callable) -> dict[int, list]:
    """W[n][t] = P(y_n)·f(n, t) (as a lazy pair) for positions t = 0..T−1 (t = 0 is token 1): the
    E-weights of an estimator whose coefficient along response n is f(n, t)."""
    return {p.n: [(eng.prob(p.n), f(p.n, t)) for t in range(p.T)] for p in eng.paths}


def pair_table(eng: SymbolicMDP, f: Callable) -> list[list]:
    """(S, V) table f(s, a) for a coefficient that depends on the prefix y_≤t only (one object per
    (state, token), so ``expected_score`` can sum the response probabilities first)."""
    return [[f(s, a) for a in range(eng.V)] for s in range(eng.S)]


def along_table(eng: SymbolicMDP, table: list[list]) -> Callable:
    """f(n, t) = table[s_t][y_t] along response n."""
    return lambda n, t: table[eng.paths[n].states[t]][eng.paths[n].tokens[t]]


# ====================================================================================== the checks
def check_score_function() -> Evidence:
    """Softmax score structure and ∇J = E[RM Σ_t ∇ℓ_t] (PAPER §7 item 1)."""
    ev = Evidence()
    lo = SymbolicMDP(structure(**LOGITS), policy="logits")
    ev.size.append(f"logits: {describe(lo.mdp)}")
    lemma = [[[lo.score(s, a)[b] - ((1 if a == b else 0) - lo.pi[s][b]) for b in range(lo.V)]
              for a in range(lo.V)] for s in range(lo.S)]
    ev.vanishes("∂ log π(a|s)/∂θ[s,b] = 1[a=b] − π(b|s) for every s, a, b (sympy.diff of log softmax)", lemma)
    ev.equal("∇J (sympy.diff of J in θ) = E[RM Σ_t ∇ℓ_t] (scores by sympy.diff), logits",
             lo.grad(), lo.expected_score(weights(lo, lambda n, t: lo.rm(n))))
    for eng in _mains():
        ev.size.append(f"probs: {describe(eng.mdp)}")
        ev.equal(f"∇J = E[RM Σ_t ∇ℓ_t], probabilities, {short(eng)}",
                 eng.grad(), eng.expected_score(weights(eng, lambda n, t: eng.rm(n))))
    return ev


def _closed_form(eng: SymbolicMDP) -> list[list]:
    tab = eng.tables()
    return [[tab["visit"][s] * eng.pi[s][a] * (tab["Uc"][s][a] - tab["U"][s]) for a in range(eng.V)]
            for s in range(eng.S)]


def check_closed_form() -> Evidence:
    """∂J/∂θ[s,a] = ρ(s) π(a|s) (U(s⊕a) − U(s)) (PAPER §2, §7 item 2)."""
    ev = Evidence()
    lo = SymbolicMDP(structure(**LOGITS), policy="logits")
    ev.size.append(f"logits: {describe(lo.mdp)}")
    ev.equal("∂J/∂θ[s,a] (sympy.diff) = ρ(s) π(a|s) (U(s⊕a) − U(s)), logits", lo.grad(), _closed_form(lo))
    for eng in _mains():
        ev.size.append(f"probs: {describe(eng.mdp)}")
        ev.equal(f"∂J/∂θ[s,a] = ρ(s) π(a|s) (U(s⊕a) − U(s)), probabilities, {short(eng)}",
                 eng.grad(), _closed_form(eng))
    return ev


def lemma1_table(eng: SymbolicMDP) -> list[list]:
    """(S, V) γ^(t−1) Q(s, a), t − 1 = level(s): Lemma 1's coefficient at position t."""
    Q = eng.tables()["Q"]
    return pair_table(eng, lambda s, a: eng.gamma ** int(eng.level[s]) * Q[s][a])


def check_lemma1() -> Evidence:
    """E Σ_t γ^(t−1) Q(s_(t−1), y_t) ∇ℓ_t = ∇J for symbolic γ and token rewards (PAPER Eq. 4)."""
    ev = Evidence()
    for eng in _mains():
        ev.size.append(describe(eng.mdp))
        E = eng.expected_score(weights(eng, along_table(eng, lemma1_table(eng))))
        ev.equal(f"E Σ_t γ^(t−1) Q_t ∇ℓ_t = ∇J, {short(eng)}", E, eng.grad())
    return ev


def check_lemma2() -> Evidence:
    """E Σ_t b(s_(t−1)) ∇ℓ_t = 0 for a symbolic baseline b per state, and Lemma 2's full form."""
    ev = Evidence()
    for eng in _mains(baselines=True):
        ev.size.append(describe(eng.mdp))
        base = weights(eng, along_table(eng, pair_table(eng, lambda s, a: eng.b[s])))
        ev.vanishes(f"E Σ_t b(s_(t−1)) ∇ℓ_t = 0, one symbol b[s] per state, {short(eng)}",
                    eng.expected_score(base))
        L1 = lemma1_table(eng)
        full = weights(eng, along_table(eng, pair_table(eng, lambda s, a: eng.b[s] + L1[s][a])))
        ev.equal(f"E Σ_t (b(s_(t−1)) + γ^(t−1) Q_t) ∇ℓ_t = ∇J, {short(eng)}",
                 eng.expected_score(full), eng.grad())
    return ev


def check_theorem1() -> Evidence:
    """E Σ_t U(y_≤t) ∇ℓ_t = ∇J, and term by term E[RM ∇ℓ_t] = E[U(y_≤t) ∇ℓ_t] (PAPER Eq. 21)."""
    ev = Evidence()
    for eng in _mains():
        ev.size.append(describe(eng.mdp))
        Uc = eng.tables()["Uc"]                                   # U(y_≤t) = Uc(s_(t−1), y_t)
        ev.equal(f"E Σ_t U(y_≤t) ∇ℓ_t = ∇J, {short(eng)}",
                 eng.expected_score(weights(eng, along_table(eng, Uc))), eng.grad())
        rm = {p.n: eng.rm(p.n) for p in eng.paths}
        for k in range(eng.H):
            ev.equal(f"E[RM ∇ℓ_{k + 1}] = E[U(y_≤{k + 1}) ∇ℓ_{k + 1}], {short(eng)}",
                     eng.expected_score(weights(eng, lambda n, t: rm[n] if t == k else eng.zero)),
                     eng.expected_score(weights(eng, lambda n, t: along_table(eng, Uc)(n, t) if t == k else eng.zero)))
    return ev


def check_theorem2() -> Evidence:
    """E Σ_t (U(y_≤t) − U(y_<t)) ∇ℓ_t = ∇J (PAPER Eq. 28)."""
    ev = Evidence()
    for eng in _mains():
        ev.size.append(describe(eng.mdp))
        tab = eng.tables()                                        # U(y_≤t) − U(y_<t) = Uc(s, y_t) − U(s)
        D = pair_table(eng, lambda s, a: tab["Uc"][s][a] - tab["U"][s])
        ev.equal(f"E Σ_t (U(y_≤t) − U(y_<t)) ∇ℓ_t = ∇J, {short(eng)}",
                 eng.expected_score(weights(eng, along_table(eng, D))), eng.grad())
    return ev


def check_theorem2_pathwise() -> Evidence:
    """U(y_≤t) − U(y_<t) = γ^(t−1) (Q(s_(t−1), y_t) − V(s_(t−1))) on every response, every t."""
    ev = Evidence()
    for eng in _mains():
        ev.size.append(describe(eng.mdp))
        tab = eng.tables()
        diffs = []
        for p in eng.paths:
            v, Q, Vs = eng.prefix_values(p.n), eng.along(p.n, tab["Q"]), eng.along(p.n, tab["V"])
            diffs.append([v[t + 1] - v[t] - eng.gamma**t * (Q[t] - Vs[t]) for t in range(p.T)])
        ev.vanishes(f"U(y_≤t) − U(y_<t) − γ^(t−1) A_t on all {len(eng.paths)} responses, {short(eng)}", diffs)
    return ev


def check_telescoping() -> Evidence:
    """Σ_t γ^(t−1) A_t = RM(y) − U(x) on every response (symbolic γ), hence Σ_t A_t = RM − U(x) at γ = 1."""
    ev = Evidence()
    for gamma in ("symbol", 1):
        for eng in _mains(gamma=gamma):
            ev.size.append(describe(eng.mdp) + f", γ={'symbolic' if gamma == 'symbol' else gamma}")
            A = eng.tables()["A"]
            diffs = []
            for p in eng.paths:
                a = eng.along(p.n, A)
                lhs = sum((eng.gamma**t * a[t] for t in range(p.T)), eng.zero)
                diffs.append(lhs - (eng.rm(p.n) - eng.prefix_values(p.n)[0]))
            what = "Σ_t γ^(t−1) A_t" if gamma == "symbol" else "Σ_t A_t (γ = 1)"
            ev.vanishes(f"{what} − (RM − U(x)) on all {len(eng.paths)} responses, {short(eng)}", diffs)
    return ev


def shaped_rewards(eng: SymbolicMDP) -> list[list]:
    """r'(s, a) = r(s, a) + γ Φ(s⊕a) − Φ(s), Φ = 0 at the roots and at terminals: every token
    decomposition of the same RM is of this form (PAPER §2, potential-based shaping)."""
    out = []
    for s in range(eng.S):
        row = []
        for a in range(eng.V):
            c = int(eng.child[s, a])
            row.append(eng.r[s][a] + (eng.gamma * eng.phi[c] if c >= 0 else eng.zero) - eng.phi[s])
        out.append(row)
    return out


def zra_rewards(eng: SymbolicMDP) -> list[list]:
    """Zero-Reward decomposition of the same RM: r'_T = RM/γ^(T−1) on each response's last pair, 0
    elsewhere (PAPER §1.4); needs γ in the coefficient field."""
    out = [[eng.zero] * eng.V for _ in range(eng.S)]
    for (s, a), n in eng.terminal.items():
        out[s][a] = eng.rm(n) / eng.gamma ** (eng.paths[n].T - 1)
    return out


def _decompositions() -> list[tuple[str, SymbolicMDP, SymbolicMDP]]:
    """(name, engine with r, engine with r') for potential shaping (symbolic Φ, symbolic γ) and ZRA."""
    out = []
    for kw in MAIN:
        eng = SymbolicMDP(structure(**kw), potentials=True, extra=("lam",))
        out.append(("shaping", eng, eng.with_token_rewards(shaped_rewards(eng))))
    eng = SymbolicMDP(structure(**MAIN[1]), gamma="field", extra=("lam",))
    out.append(("ZRA", eng, eng.with_token_rewards(zra_rewards(eng))))
    return out


def check_decomposition_grad() -> Evidence:
    """Two token decompositions with the same RM give the same J and ∇J (PAPER §2 extras, §7 item 7)."""
    ev = Evidence()
    for name, e1, e2 in _decompositions():
        ev.size.append(f"{name}: {describe(e1.mdp)}")
        ev.vanishes(f"RM'(y) − RM(y) on every response ({name}, {short(e1)})",
                    [e2.rm(p.n) - e1.rm(p.n) for p in e1.paths])
        ev.equal(f"J' = J ({name}, {short(e1)})", e2.J(), e1.J())
        ev.equal(f"∇J' = ∇J ({name}, {short(e1)})", e2.grad(), e1.grad())
    return ev


def gae_along(eng: SymbolicMDP, n: int, lam) -> list:
    """GAE(γ, λ) advantages with the exact critic along response n: Σ_l (γλ)^l δ_(t+l),
    δ_t = r_t + γ V(s_t) − V(s_(t−1)), V(terminal) = 0.

    The one estimator written here rather than read off the numeric code: with λ and γ symbolic,
    GAE is not linear in its inputs, so ``linear_coefficients`` cannot extract it. It is the same
    backward recursion as ``tpg.estimators.gae.gae_advantages``, and
    tests/test_symbolic.py::test_symbolic_gae_matches_the_estimator_code checks the two agree."""
    tab, p = eng.tables(), eng.paths[n]
    Vs = eng.along(n, tab["V"]) + [eng.zero]
    r = eng.along(n, eng.r)
    delta = [r[t] + eng.gamma * Vs[t + 1] - Vs[t] for t in range(p.T)]
    out, acc = [eng.zero] * p.T, eng.zero
    for t in reversed(range(p.T)):
        acc = delta[t] + eng.gamma * lam * acc
        out[t] = acc
    return out


def check_decomposition_adv() -> Evidence:
    """Same RM ⇒ same A(s, a) and the same exact-critic GAE(λ) for symbolic λ; V differs."""
    ev = Evidence()
    for name, e1, e2 in _decompositions():
        ev.size.append(f"{name}: {describe(e1.mdp)}")
        ev.equal(f"A'(s,a) = A(s,a) for every pair ({name}, {short(e1)})", e2.tables()["A"], e1.tables()["A"])
        lam = e1.sym["lam"]
        ev.vanishes(f"GAE'(λ) = GAE(λ), exact critic, symbolic λ, on every response ({name}, {short(e1)})",
                    [sub(gae_along(e2, p.n, lam), gae_along(e1, p.n, lam)) for p in e1.paths])
        ev.witness(f"V' − V (the value tables differ) ({name}, {short(e1)})", e1,
                   sub(e2.tables()["V"], e1.tables()["V"]))
    return ev


def _group_engines(**opts):
    for G, kw in GROUP:
        yield G, SymbolicMDP(structure(**kw), rewards="response", **opts)


def check_rloo() -> Evidence:
    """RLOO E[ĝ] = ∇J for any response rewards (coefficients from tpg's rloo estimator)."""
    ev = Evidence()
    for G, eng in _group_engines():
        ev.size.append(f"G={G}: {describe(eng.mdp)}, R(y) symbolic")
        E = linear_expectation(eng, estimator("rloo"), G, lambda n: [eng.rm(n)], 1)
        ev.equal(f"E[ĝ_RLOO] = ∇J, G={G}, {short(eng)}", E, eng.grad())
    return ev


def check_remax() -> Evidence:
    """ReMax E[(RM(y) − RM(ŷ)) Σ ∇ℓ] = ∇J for a symbolic greedy reward g_x per prompt."""
    ev = Evidence()
    for G, kw in GROUP[:1]:
        P = kw["n_prompts"]
        eng = SymbolicMDP(structure(**kw), rewards="response", extra=tuple(f"g_{x}" for x in range(P)))
        ev.size.append(f"{describe(eng.mdp)}, R(y) and greedy reward g_x symbolic")
        for G_ in (1, 2):
            E = linear_expectation(eng, estimator("remax"), G_,
                                   lambda n: [eng.rm(n), eng.sym[f"g_{eng.paths[n].prompt}"]], 2)
            ev.equal(f"E[ĝ_ReMax] = ∇J, G={G_}, {short(eng)}", E, eng.grad())
    return ev


def check_grpo_mean_scale() -> Evidence:
    """Self-inclusive mean-only GRPO: E[ĝ] = (1 − 1/G) ∇J exactly (PAPER §3.2)."""
    ev = Evidence()
    for G, eng in _group_engines():
        ev.size.append(f"G={G}: {describe(eng.mdp)}, R(y) symbolic")
        E = linear_expectation(eng, estimator("grpo", std=False), G, lambda n: [eng.rm(n)], 1)
        ev.equal(f"E[ĝ_GRPO-mean] = (1 − 1/{G}) ∇J, {short(eng)}", E,
                 scale(eng.const(sympy.Rational(G - 1, G)), eng.grad()))
    return ev


# ------------------------------------------------------------------------------ TRePO
def check_trepo_mc_all() -> Evidence:
    """TRePO at every position, Â_t = v̂_t − v̂_(t−1) from K fresh continuations: E[ĝ] = ∇J."""
    ev = Evidence()
    for K, kw in FRESH:
        eng = SymbolicMDP(structure(**kw), rewards="response")
        ev.size.append(f"K={K} fresh continuations enumerated: {describe(eng.mdp)}, R(y) symbolic")
        E = fresh_expectation(eng, estimator("trepo", variant="all", K=K), K)
        ev.equal(f"E[ĝ_TRePO-all] = ∇J, K={K} fresh rollouts enumerated, {short(eng)}", E, eng.grad())
    for kw in MAIN:
        eng = SymbolicMDP(structure(**kw), rewards="response")
        ev.size.append(f"continuations at their expectation U(prefix): {describe(eng.mdp)}")
        E = trepo_expectation(eng, estimator("trepo", variant="all", K=1))
        ev.equal(f"E[ĝ_TRePO-all] = ∇J, v̂ ↦ U(prefix), {short(eng)}", E, eng.grad())
    return ev


def check_trepo_chunk() -> Evidence:
    """TRePO chunk (value-anchored): every t in (t_(j−1), t_j] gets v̂_(t_j) − v̂_(t_(j−1)): E[ĝ] = ∇J
    for every fixed anchor set."""
    ev = Evidence()
    for kw in MAIN:
        eng = SymbolicMDP(structure(**kw), rewards="response")
        ev.size.append(f"{describe(eng.mdp)}, every anchor set ⊆ {{1..{eng.H - 1}}}")
        for r in range(eng.H):
            for pos in itertools.combinations(range(1, eng.H), r):
                spec = {"kind": "fixed", "positions": list(pos)}
                est = estimator("trepo", variant="chunk", K=1, anchors=spec)
                E = trepo_expectation(eng, est, anchors=spec)
                ev.equal(f"E[ĝ_TRePO-chunk] = ∇J, anchors {set(pos) or '{}'} (+T), {short(eng)}", E, eng.grad())
    return ev


# ------------------------------------------------------------------------------ FALSE claims
def check_false_drop_gamma() -> Evidence:
    """Dropping γ^(t−1): E Σ_t Q_t ∇ℓ_t ≠ ∇J for γ < 1 (F1); = ∇J at γ = 1; = PAPER Eq. 26."""
    ev = Evidence()
    for kw in MAIN:
        eng = SymbolicMDP(structure(**kw))
        ev.size.append(describe(eng.mdp))
        tab = eng.tables()
        E = eng.expected_score(weights(eng, along_table(eng, tab["Q"])))
        ev.witness(f"bias E Σ_t Q_t ∇ℓ_t − ∇J (symbolic γ), {short(eng)}", eng, sub(E, eng.grad()))
        g = eng.gamma
        lhs = scale(g ** (eng.H - 1), E)
        eq26 = pair_table(eng, lambda s, a: g ** (eng.H - 1 - int(eng.level[s])) * tab["Uc"][s][a])
        rhs = eng.expected_score(weights(eng, along_table(eng, eq26)))
        ev.equal(f"Eq. 26 (× γ^(H−1)): E Σ Q_t ∇ℓ_t = E Σ γ^(−(t−1)) U(y_≤t) ∇ℓ_t, {short(eng)}",
                 lhs, rhs)
        one = SymbolicMDP(structure(**kw), gamma=1)
        ev.equal(f"at γ = 1 the bias vanishes: E Σ_t Q_t ∇ℓ_t = ∇J, {short(one)}",
                 one.expected_score(weights(one, along_table(one, one.tables()["Q"]))), one.grad())
    return ev


def check_false_trepo_interp() -> Evidence:
    """Literal TRePO (linear interpolation of anchor advantages, fixed length, anchors {1, H}):
    E[ĝ] = E Σ_(t∈S) A_t ∇ℓ_t ≠ ∇J (F9): interpolated positions contribute exactly 0."""
    ev = Evidence()
    eng = SymbolicMDP(structure(**FIXED), rewards="response")
    ev.size.append(f"{describe(eng.mdp)}, anchors {{1, {eng.H}}}")
    spec = {"kind": "fixed", "positions": [1, eng.H]}
    E = trepo_expectation(eng, estimator("trepo", variant="interp", K=1, anchors=spec), anchors=spec)
    v = eng.prefix_values
    anchors_only = eng.expected_score(weights(
        eng, lambda n, t: v(n)[t + 1] - v(n)[t] if t + 1 in spec["positions"] else eng.zero))
    ev.equal(f"E[ĝ_interp] = E Σ_(t∈S) A_t ∇ℓ_t (anchors only), {short(eng)}", E, anchors_only)
    ev.witness(f"E[ĝ_interp] − ∇J, {short(eng)}", eng, sub(E, eng.grad()))
    return ev


def _std_grpo_expectation(eng: SymbolicMDP, rm_values: Sequence[float]) -> list[list]:
    """√2 · E[ĝ] of std-GRPO, G = 2, ε → 0⁺ (ε = 1e-300 in tpg's grpo estimator): its coefficients
    are ±1/(2√2) (0 for a tie), read off the numeric code at the given rewards, so √2·E[ĝ] is a
    polynomial over QQ."""
    G = 2
    tuples = joint_tuples(eng.mdp, G)
    vals = torch.as_tensor(rm_values, dtype=torch.float64)

    def feed(ro, z):
        ro.rm = vals[ro.response_id]
        return ro
    ro = group_rollouts(eng.mdp, tuples, np.zeros((1, G, 1)), feed)
    c = coefficients(estimator("grpo", eps=1e-300), ro).reshape(len(tuples), G, -1).numpy()  # (n, G, L)
    unit = 1 / np.sqrt(2.0)
    exact = {x: exact_rational(float(x), unit) for x in np.unique(c)}
    def coef(k, tup, i, t):
        return [(exact[c[k, i, t]], eng.one)] if c[k, i, t] else []
    return tuple_expectation(eng, tuples, coef)


def _not_parallel(ev: Evidence, label: str, eng: SymbolicMDP, E: list[list], grad: list[list]) -> None:
    """Witness that E ∦ ∇J: a 2×2 minor E_i ∇J_j − E_j ∇J_i, non-zero at the seeded rational point."""
    e, g = _flat(E), _flat(grad)
    pt = eng.point(0)
    ev_, gv = eng.evaluate(e, pt), eng.evaluate(g, pt)
    for i, j in itertools.combinations(range(len(e)), 2):
        if ev_[i] * gv[j] - ev_[j] * gv[i] != 0:
            (si, ai), (sj, aj) = divmod(i, eng.V), divmod(j, eng.V)
            ev.witness(f"{label}: 2×2 minor of (√2 E[ĝ], ∇J) at (s{si},a{ai}), (s{sj},a{aj}), so E[ĝ] ∦ ∇J",
                       eng, e[i] * g[j] - e[j] * g[i])
            return
    ev.witness(f"{label}: no non-zero 2×2 minor of (E[ĝ], ∇J) at the point", eng, eng.zero)


def check_false_grpo_std_G2() -> Evidence:
    """Std-GRPO, G = 2, ε → 0⁺: A = ±1/√2 (sign of R_i − R_j). With ≥ 3 reward values E[ĝ] is not
    parallel to ∇J (F4: "std ≈ a smaller learning rate" is false); with binary rewards it is exactly
    ∇J/√2, for one prompt or two (so at G = 2 two prompts alone do not break parallelism)."""
    ev = Evidence()
    kw = dict(vocab_size=3, horizon=3, n_prompts=1)
    m = structure(**kw)
    three = [float(n % 3) for n in range(m.num_responses)]                         # RM ∈ {0, 1, 2}
    eng = SymbolicMDP(m, rewards="response", rm_values=three)
    ev.size.append(f"{describe(m)}, RM(y_n) = n mod 3")
    _not_parallel(ev, f"RM ∈ {{0,1,2}}, {short(eng)}", eng, _std_grpo_expectation(eng, three), eng.grad())
    for P in (1, 2):
        m = structure(vocab_size=3, horizon=3, n_prompts=P)
        binary = [float(bin(n).count("1") % 2) for n in range(m.num_responses)]   # RM ∈ {0, 1}
        eng = SymbolicMDP(m, rewards="response", rm_values=binary)
        ev.size.append(f"binary contrast: {describe(m)}, RM(y_n) = parity of the bits of n")
        ev.equal(f"binary RM: √2·E[ĝ] = ∇J exactly (κ = 1/√2), {short(eng)}",
                 _std_grpo_expectation(eng, binary), eng.grad())
    return ev


# ====================================================================================== registry
# Sizes say the parametrisation: "probs" = probability symbols with the simplex substituted (ring),
# "logits" = θ symbols through exp (sympy.diff). V counts EOS; P = number of prompts.
_MAIN = "probs " + " + ".join(short(kw) for kw in MAIN)
_GROUPS = "probs " + "; ".join(f"G={G} {short(kw)}" for G, kw in GROUP)
_BOTH = f"logits {short(LOGITS)}; {_MAIN}"
_DECOMP = f"{_MAIN} (shaping); {short(MAIN[1])} (ZRA, γ in QQ(γ))"
IDENTITIES: dict[str, Identity] = {i.id: i for i in [
    Identity("score_function",
             "∇J = E[RM Σ_t ∇ℓ_t]; softmax score ∂log π(a|s)/∂θ[s,b] = 1[a=b] − π(b|s)",
             "PAPER §7.1", _BOTH, "true", check_score_function),
    Identity("closed_form", "∂J/∂θ[s,a] = ρ(s) π(a|s) (U(s⊕a) − U(s))", "PAPER §2, §7.2",
             _BOTH, "true", check_closed_form),
    Identity("lemma1", "E Σ_t γ^(t−1) Q(s_(t−1), y_t) ∇ℓ_t = ∇J (symbolic γ)", "PAPER Eq. 4",
             _MAIN, "true", check_lemma1),
    Identity("lemma2", "E Σ_t b(s_(t−1)) ∇ℓ_t = 0 for any state baseline b", "PAPER Lemma 2",
             _MAIN, "true", check_lemma2),
    Identity("theorem1", "E Σ_t U(y_≤t) ∇ℓ_t = ∇J, and term by term", "PAPER Eq. 21",
             _MAIN, "true", check_theorem1),
    Identity("theorem2", "E Σ_t (U(y_≤t) − U(y_<t)) ∇ℓ_t = ∇J", "PAPER Eq. 28",
             _MAIN, "true", check_theorem2),
    Identity("theorem2_pathwise", "U(y_≤t) − U(y_<t) = γ^(t−1) (Q_t − V(s_(t−1))) on every response",
             "PAPER Eq. 28, §7.6", _MAIN, "true", check_theorem2_pathwise),
    Identity("telescoping", "Σ_t γ^(t−1) A_t = RM(y) − U(x) on every response (γ = 1: Σ_t A_t)",
             "PAPER §2, §7.8", _MAIN + ", γ symbolic and 1", "true", check_telescoping),
    Identity("decomposition_grad", "same RM, different token rewards (shaping Φ, ZRA) ⇒ same J, ∇J",
             "PAPER §2, §7.7", _DECOMP, "true", check_decomposition_grad),
    Identity("decomposition_adv", "same RM ⇒ same A(s,a) and exact-critic GAE(λ); V differs",
             "PAPER §2, §7.7", _DECOMP, "true", check_decomposition_adv),
    Identity("rloo", "RLOO: E[ĝ] = ∇J for any response reward", "PAPER §3.2, §7.10",
             _GROUPS, "true", check_rloo),
    Identity("remax", "ReMax: E[(RM(y) − RM(ŷ)) Σ_t ∇ℓ_t] = ∇J for any greedy reward", "PAPER §3.2, §7.11",
             f"probs G=1,2 {short(GROUP[0][1])}", "true", check_remax),
    Identity("grpo_mean_scale", "mean-only GRPO (self-inclusive): E[ĝ] = (1 − 1/G) ∇J", "PAPER §3.2, §7.12",
             _GROUPS, "true", check_grpo_mean_scale),
    Identity("trepo_chunk", "TRePO chunk (value-anchored), any fixed anchor set: E[ĝ] = ∇J", "PAPER §4.4, §7.16",
             _MAIN + ", every anchor set", "true", check_trepo_chunk),
    Identity("trepo_mc_all", "TRePO, MC advantages at every position from K fresh rollouts: E[ĝ] = ∇J",
             "PAPER §4.1, §7.15", "probs " + "; ".join(f"K={K} enumerated {short(kw)}" for K, kw in FRESH)
             + "; U(prefix) " + _MAIN[6:], "true", check_trepo_mc_all),
    Identity("false_grpo_std_G2", "std-GRPO (G=2, ε→0) is ∥ ∇J ('a smaller learning rate')", "PAPER §3.1, F4",
             "probs V=3 H=3 P=1, RM ∈ {0,1,2}; binary contrast P=1,2", "false", check_false_grpo_std_G2),
    Identity("false_trepo_interp", "literal TRePO (interpolated anchor advantages) is unbiased", "PAPER §4.3, F9",
             f"probs {short(FIXED)}, anchors {{1,{FIXED['horizon']}}}", "false", check_false_trepo_interp),
    Identity("false_drop_gamma", "E Σ_t Q_t ∇ℓ_t = ∇J (γ^(t−1) dropped)", "PAPER Eq. 26, F1",
             _MAIN + ", γ symbolic", "false", check_false_drop_gamma),
]}
