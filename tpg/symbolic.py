"""Symbolic proofs (sympy): the paper's identities for ALL parameter values at a given size.

The exact engine (tpg.exact) shows an identity holds at the random points it was run at; this module
shows it holds for every value of the logits, rewards, baselines, prompt probabilities and γ at a
given size, by computing both sides as exact sympy objects and checking that their difference is
identically zero. A FALSE claim is shown false by the opposite: its bias is a non-zero polynomial,
and a rational point (valid probabilities, γ ∈ (0, 1]) where it is non-zero is exhibited.

The engine, ``SymbolicMDP``, is the symbolic twin of a ``TokenMDP``: it enumerates exactly the states
(``mdp.state_table()``, ``mdp.state_index``) and responses (``enumerate_responses(mdp)``) of the
numeric engine and builds J, ∇J, U, V, Q, A and the visit probabilities ρ(s) from the same recursions
as ``tpg.exact.tables`` (PAPER §1–2). Two parametrisations of the tabular softmax:

- ``policy="logits"``: one symbol θ[s, a] per prefix state × token, π(a|s) = exp θ[s,a] / Σ_b exp θ[s,b];
  ∇J and the scores ∂ log π/∂θ come from ``sympy.diff``. Expressions are sympy ``Expr``; a difference
  is zero when, with θ = log z (z > 0), its ``together`` numerator expands to 0. Exact but slow: used
  at the small size, above all to prove the softmax score structure
  ∂ log π(a|s)/∂θ[s,b] = 1[a = b] − π(b|s) that the other parametrisation is built on.
- ``policy="probs"`` (default): the probabilities are the symbols, p[s, a] for a < V−1, with the
  simplex constraint substituted, π(V−1|s) = 1 − Σ_{a<V−1} p[s,a]. J is a polynomial; ∇_θ J follows by
  the chain rule through the softmax (∂p_a/∂θ_b = p_a(1[a=b] − p_b)), i.e. from ``diff`` of J with
  respect to the free p's, and the scores are the vectors e_a − π(·|s) in block s. Everything is a
  polynomial over QQ in sympy's sparse ring (``sympy.polys.rings``), whose elements are kept in
  expanded canonical form, so ``lhs − rhs == 0`` IS ``expand(lhs − rhs) == 0``: sound, and fast
  enough for V = 3 (tokens a, b, EOS) with H = 4 and V = 4 with H = 3, two prompts. With
  ``gamma="field"`` the coefficients live in QQ(γ), so 1/γ is allowed (the Zero-Reward
  decomposition r_T = RM/γ^(T−1)).

Rewards: ``rewards="token"`` gives one symbol r[s, a] per (state, token) and RM = Σ_t γ^(t−1) r_t
(PAPER §1.3); ``rewards="response"`` gives one symbol R[n] per complete response, any function of
the whole response, with its Zero-Reward decomposition at γ = 1 (PAPER §1.4); ``rm_values=`` fixes
RM to given numbers instead.

Estimators enter through the numeric code itself, not a re-derivation: every estimator whose
coefficients c = −∂loss/∂logp are linear in its inputs (group rewards, the greedy reward, the
continuation returns) has its exact coefficient map read off ``tpg.estimators.coefficients`` by
evaluating it on basis input vectors (plus a zero vector and a random vector, which check that the
map really is linear), converting each float to the small rational it is (verified to 1e-12). The
symbolic expectation then sums over every G-tuple of responses with its symbolic probability. So the
identity proved is a statement about the estimator code tpg runs (DESIGN §1: one code path).

Identities are registered in ``IDENTITIES`` (ids used by proofs/ and ``tpg prove``); ``prove(id)``
runs one and returns a ``Result``.
"""
from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import sympy
import torch
from sympy import QQ
from sympy.polys.rings import PolyElement, ring

from tpg.draws import deterministic_anchors
from tpg.estimators import coefficients, estimator
from tpg.mdp import TokenMDP, TPGError
from tpg.rollouts import Rollouts, enumerate_responses

GAMMA = sympy.Symbol("gamma", positive=True)


# ====================================================================================== structure
def structure(vocab_size: int = 3, horizon: int = 3, eos: bool = True, n_prompts: int = 1) -> TokenMDP:
    """A TokenMDP used for its structure only (prompts, vocabulary, EOS = V−1, horizon); rewards 0."""
    eos_id = vocab_size - 1 if eos else None
    A = vocab_size - (eos_id is not None)
    prompts = [(x % A,) for x in range(n_prompts)]
    return TokenMDP(prompts, vocab_size, horizon, eos_id, token_rewards=lambda *a: 0.0)


def describe(mdp: TokenMDP) -> str:
    """'V=3 (a, b, EOS), H=3, 2 prompts: 14 states, 30 responses' — the size a check ran at."""
    names = [chr(ord("a") + i) for i in range(mdp.arity)]
    toks = ", ".join(names + (["EOS"] if mdp.eos is not None else []))
    P = len(mdp.prompts)
    return (f"V={mdp.vocab_size} ({toks}), H={mdp.horizon}, {P} prompt{'s' if P > 1 else ''}: "
            f"{mdp.num_states} states, {mdp.num_responses} responses")


@dataclass(frozen=True)
class Path:
    """One enumerated response: its row n in ``enumerate_responses(mdp)``, prompt, tokens y_1..y_T and
    the TokenMDP index of the state before each token, s_0..s_(T−1)."""
    n: int
    prompt: int
    tokens: tuple[int, ...]
    states: tuple[int, ...]

    @property
    def T(self) -> int:
        return len(self.tokens)


def paths_of(mdp: TokenMDP) -> list[Path]:
    """Every response of ``mdp`` in the numeric enumerator's order, with its state indices."""
    enum = enumerate_responses(mdp)
    s_idx = mdp.state_index(enum.prompt_idx, enum.tokens, enum.mask)           # (N, L)
    out = []
    for n, T in enumerate(enum.lengths.tolist()):
        out.append(Path(n, int(enum.prompt_idx[n]), tuple(enum.tokens[n, :T].tolist()),
                        tuple(s_idx[n, :T].tolist())))
    return out


# ====================================================================================== the engine
class SymbolicMDP:
    """J, ∇J and the value tables of a token MDP with symbolic parameters (module docstring).

    Args:
      mdp: the structure (``structure(...)`` or any TokenMDP; its numeric rewards are ignored).
      policy: "probs" (polynomial ring, simplex substituted) or "logits" (sympy Expr with exp).
      rewards: "token" (symbols r[s,a], RM = Σ γ^(t−1) r_t) or "response" (symbols R[n], γ = 1).
      gamma: "symbol" (a generator γ), "field" (γ in the coefficient field QQ(γ); probs only) or a
        number (e.g. 1). Response rewards force γ = 1.
      rm_values: numbers RM(y_n) instead of symbols (response rewards).
      baselines: add one symbol b[s] per state; potentials: one Φ[s] per non-root state;
      extra: names of further free symbols (e.g. "lam", "g0").
    """

    def __init__(self, mdp: TokenMDP, *, policy: str = "probs", rewards: str = "token", gamma: Any = "symbol",
                 rm_values: Sequence[float] | None = None, baselines: bool = False, potentials: bool = False,
                 extra: Sequence[str] = ()):
        if policy not in ("probs", "logits"):
            raise TPGError(f"policy must be 'probs' or 'logits', got {policy!r}")
        if rewards not in ("token", "response"):
            raise TPGError(f"rewards must be 'token' or 'response', got {rewards!r}")
        if mdp.vocab_size < 2:
            raise TPGError("the symbolic engine needs vocab_size ≥ 2 (a softmax over one token is constant)")
        if rewards == "response":
            gamma = 1
        if gamma == "field" and policy != "probs":
            raise TPGError("gamma='field' needs policy='probs'")
        self.mdp, self.policy, self.rewards = mdp, policy, rewards
        st = mdp.state_table()
        self.S, self.V, self.H = mdp.num_states, mdp.vocab_size, mdp.horizon
        self.child, self.level, self.state_prompt = st["child"], st["level"], st["prompt"]
        self.paths = paths_of(mdp)
        self.terminal = {(p.states[-1], p.tokens[-1]): p.n for p in self.paths}   # last (s, a) ↦ response
        self._build_symbols(gamma, rm_values, baselines, potentials, tuple(extra))
        self._cache: dict = {}

    # ------------------------------------------------------------------ symbols
    def _build_symbols(self, gamma, rm_values, baselines, potentials, extra) -> None:
        S, V, P = self.S, self.V, len(self.mdp.prompts)
        names: list[str] = []
        if self.policy == "probs":
            names += [f"p_{s}_{a}" for s in range(S) for a in range(V - 1)]
        names += [f"rho_{x}" for x in range(P - 1)]
        if gamma == "symbol":
            names.append("gamma")
        if self.rewards == "token":
            names += [f"r_{s}_{a}" for s in range(S) for a in range(V)]
        elif rm_values is None:
            names += [f"R_{n}" for n in range(len(self.paths))]
        names += [f"b_{s}" for s in range(S)] if baselines else []
        names += [f"Phi_{s}" for s in range(S) if self.level[s] > 0] if potentials else []
        names += list(extra)
        if self.policy == "probs":
            dom = QQ.frac_field(GAMMA) if gamma == "field" else QQ
            self.ring, *gens = ring(names, dom)
            self.sym = dict(zip(names, gens))
            self.one, self.zero = self.ring.one, self.ring.zero
        else:
            self.ring = None
            self.sym = {nm: (GAMMA if nm == "gamma" else sympy.Symbol(nm, real=True)) for nm in names}
            self.theta = [[sympy.Symbol(f"theta_{s}_{a}", real=True) for a in range(V)] for s in range(S)]
            self.one, self.zero = sympy.Integer(1), sympy.Integer(0)
        if gamma == "symbol":
            self.gamma = self.sym["gamma"]
        elif gamma == "field":
            self.gamma = self.ring.domain.convert(GAMMA)
        else:
            self.gamma = self.const(gamma)
        self.rm_values = None if rm_values is None else [self.const(v) for v in rm_values]
        rho = [self.sym[f"rho_{x}"] for x in range(P - 1)]
        self.rho = rho + [self.one - sum(rho, self.zero)] if P > 1 else [self.one]
        self.pi = [self._pi_row(s) for s in range(S)]
        self.b = [self.sym[f"b_{s}"] for s in range(S)] if baselines else None
        self.phi = ([self.sym[f"Phi_{s}"] if self.level[s] > 0 else self.zero for s in range(S)]
                    if potentials else None)
        if self.rewards == "token":
            self.r = [[self.sym[f"r_{s}_{a}"] for a in range(V)] for s in range(S)]
        else:                                                   # Zero-Reward decomposition at γ = 1
            self.r = [[self.rm(self.terminal[(s, a)]) if (s, a) in self.terminal else self.zero
                       for a in range(V)] for s in range(S)]

    def const(self, x):
        """An exact constant of this engine's algebra (floats must be exactly representable rationals)."""
        q = sympy.Rational(x) if not isinstance(x, sympy.Basic) else x
        return self.ring.domain.convert(q) * self.one if self.ring is not None else q

    def _pi_row(self, s: int) -> list:
        V = self.V
        if self.policy == "probs":
            free = [self.sym[f"p_{s}_{a}"] for a in range(V - 1)]
            return free + [self.one - sum(free, self.zero)]          # the simplex constraint, substituted
        ex = [sympy.exp(th) for th in self.theta[s]]
        tot = sum(ex)
        return [e / tot for e in ex]

    def with_token_rewards(self, table: list[list]) -> "SymbolicMDP":
        """The same engine with another token-reward table (S, V) of this algebra's elements."""
        if self.rewards != "token":
            raise TPGError("with_token_rewards needs rewards='token'")
        out = copy.copy(self)
        out.r = table
        out._cache = {}
        return out

    # ------------------------------------------------------------------ responses
    def cond_prob(self, n: int):
        """π(y_n | x_n) = Π_t π(y_t | s_t)."""
        key = ("cond", n)
        if key not in self._cache:
            p = self.paths[n]
            out = self.one
            for s, a in zip(p.states, p.tokens):
                out = out * self.pi[s][a]
            self._cache[key] = out
        return self._cache[key]

    def prob(self, n: int):
        """P(x_n, y_n) = ρ(x_n) π(y_n | x_n)."""
        key = ("prob", n)
        if key not in self._cache:
            self._cache[key] = self.rho[self.paths[n].prompt] * self.cond_prob(n)
        return self._cache[key]

    def rm(self, n: int):
        """RM(y_n): Σ_t γ^(t−1) r_t (token rewards), the symbol R[n], or the given number."""
        if self.rewards == "response":
            return self.sym[f"R_{n}"] if self.rm_values is None else self.rm_values[n]
        key = ("rm", n)
        if key not in self._cache:
            p = self.paths[n]
            self._cache[key] = sum((self.gamma**t * self.r[s][a] for t, (s, a) in enumerate(zip(p.states, p.tokens))),
                                   self.zero)
        return self._cache[key]

    def J(self):
        """J = Σ_x ρ(x) Σ_y π(y|x) RM(x, y)."""
        if "J" not in self._cache:
            self._cache["J"] = sum((self.prob(p.n) * self.rm(p.n) for p in self.paths), self.zero)
        return self._cache["J"]

    # ------------------------------------------------------------------ gradient and scores
    def grad(self) -> list[list]:
        """(S, V) table ∂J/∂θ[s, a] of the tabular-softmax logits.

        logits: ``sympy.diff``. probs: J is a polynomial F̃ in the free p's; with ∂p_a/∂θ_b =
        p_a(1[a=b] − p_b), ∂J/∂θ[s,b] = 1[b < V−1] p_b ∂F̃/∂p_b − p_b Σ_{a<V−1} p_a ∂F̃/∂p_a.
        """
        if "grad" in self._cache:
            return self._cache["grad"]
        J = self.J()
        if self.policy == "logits":
            out = [[sympy.diff(J, self.theta[s][b]) for b in range(self.V)] for s in range(self.S)]
        else:
            out = []
            for s in range(self.S):
                dF = [J.diff(self.sym[f"p_{s}_{a}"]) for a in range(self.V - 1)]
                mix = sum((self.pi[s][a] * dF[a] for a in range(self.V - 1)), self.zero)
                out.append([self.pi[s][b] * ((dF[b] if b < self.V - 1 else self.zero) - mix)
                            for b in range(self.V)])
        self._cache["grad"] = out
        return out

    def score(self, s: int, a: int) -> list:
        """(V,) ∂ log π(a|s)/∂θ[s, ·] (zero outside block s): ``diff`` for logits, e_a − π(·|s) for probs."""
        key = ("score", s, a)
        if key not in self._cache:
            if self.policy == "logits":
                lp = sympy.log(self.pi[s][a])
                self._cache[key] = [sympy.diff(lp, self.theta[s][b]) for b in range(self.V)]
            else:
                self._cache[key] = [(self.one if b == a else self.zero) - self.pi[s][b] for b in range(self.V)]
        return self._cache[key]

    def expected_score(self, W: dict[int, Sequence]) -> list[list]:
        """(S, V) Σ_n Σ_t W[n][t] ∇_θ log π(y_nt | s_nt): with W[n][t] = P(y_n)·E[c_t | y_n] this is the
        expectation of Σ_t c_t ∇ℓ_t (the symbolic ``tpg.exact.expected_score``).

        W maps response rows to per-position weights (length T_n); an entry is an element, a pair
        (P, c) standing for the product P·c, or a list of these (their sum). Pairs at the same
        (state, token) that share the same object c are summed first, Σ_n P_n·c = (Σ_n P_n)·c
        (distributivity): one big product per pair instead of one per response, which is what keeps
        V = 3, H = 4 fast."""
        agg = [[self.zero] * self.V for _ in range(self.S)]                # Σ of W per (state, token)
        lazy: dict[tuple, list] = {}                                       # (s, a, id(c)) ↦ [Σ P, c]
        for n, w in W.items():
            p = self.paths[n]
            for t, (s, a) in enumerate(zip(p.states, p.tokens)):
                for item in (w[t] if isinstance(w[t], list) else [w[t]]):
                    if isinstance(item, tuple):
                        prob, c = item
                        if c == 0:
                            continue
                        slot = lazy.setdefault((s, a, id(c)), [self.zero, c])   # the slot keeps c alive
                        slot[0] = slot[0] + prob
                    elif item != 0:
                        agg[s][a] = agg[s][a] + item
        for (s, a, _), (prob, c) in lazy.items():
            agg[s][a] = agg[s][a] + prob * c
        out = [[self.zero] * self.V for _ in range(self.S)]
        for s in range(self.S):
            if self.policy == "probs":                 # Σ_a w_a (e_a − π) = w − π Σ_a w_a: V products, not V²
                tot = sum(agg[s], self.zero)
                out[s] = [agg[s][b] - self.pi[s][b] * tot for b in range(self.V)]
                continue
            for a in range(self.V):
                if agg[s][a] == 0:
                    continue
                sc = self.score(s, a)
                for b in range(self.V):
                    out[s][b] = out[s][b] + agg[s][a] * sc[b]
        return out

    # ------------------------------------------------------------------ value tables
    def tables(self) -> dict[str, list]:
        """U (S,) = E[RM | s], Uc (S, V) = U(s⊕a) (RM of the response for terminal pairs), V (S,),
        Q (S, V) = r + γ V(child), A = Q − V, visit (S,) = ρ(s): the recursions of tpg.exact.tables."""
        if "tables" in self._cache:
            return self._cache["tables"]
        S, V, g = self.S, self.V, self.gamma
        U, Vt = [self.zero] * S, [self.zero] * S
        Uc = [[self.zero] * V for _ in range(S)]
        Q = [[self.zero] * V for _ in range(S)]
        for lvl in reversed(range(self.H)):                                   # backward over the tree
            for s in np.nonzero(self.level == lvl)[0].tolist():
                for a in range(V):
                    c = int(self.child[s, a])
                    if c < 0:
                        Uc[s][a] = self.rm(self.terminal[(s, a)])
                        Q[s][a] = self.r[s][a]
                    else:
                        Uc[s][a] = U[c]
                        Q[s][a] = self.r[s][a] + g * Vt[c]
                U[s] = sum((self.pi[s][a] * Uc[s][a] for a in range(V)), self.zero)
                Vt[s] = sum((self.pi[s][a] * Q[s][a] for a in range(V)), self.zero)
        visit = [self.zero] * S
        for lvl in range(self.H):                                             # forward over the tree
            for s in np.nonzero(self.level == lvl)[0].tolist():
                if lvl == 0:
                    visit[s] = self.rho[int(self.state_prompt[s])]
                for a in range(V):
                    c = int(self.child[s, a])
                    if c >= 0:
                        visit[c] = visit[s] * self.pi[s][a]
        A = [[Q[s][a] - Vt[s] for a in range(V)] for s in range(S)]
        out = dict(U=U, Uc=Uc, V=Vt, Q=Q, A=A, visit=visit)
        self._cache["tables"] = out
        return out

    def prefix_values(self, n: int) -> list:
        """[v_0, …, v_T] = [U(x), U(y_≤1), …, U(y_≤T) = RM(y)] along response n (PAPER §2 shorthand)."""
        p, tab = self.paths[n], self.tables()
        return [tab["U"][p.states[0]]] + [tab["Uc"][s][a] for s, a in zip(p.states, p.tokens)]

    def along(self, n: int, table: list) -> list:
        """A per-state (S,) or per-(state, token) (S, V) table read along response n: length T."""
        p = self.paths[n]
        if isinstance(table[0], list):
            return [table[s][a] for s, a in zip(p.states, p.tokens)]
        return [table[s] for s in p.states]

    def completions(self, n: int, j: int) -> list[tuple[int, Any]]:
        """[(m, π(m_>j | y_≤j))] for every response m extending the open prefix y_≤j (j < T) of
        response n, by enumeration: the law of a fresh continuation rollout from that prefix."""
        p = self.paths[n]
        out = []
        for m in self.paths:
            if m.prompt == p.prompt and m.T > j and m.tokens[:j] == p.tokens[:j]:
                w = self.one
                for s, a in zip(m.states[j:], m.tokens[j:]):
                    w = w * self.pi[s][a]
                out.append((m.n, w))
        return out

    # ------------------------------------------------------------------ evaluation
    def point(self, seed: int = 0, gamma=sympy.Rational(1, 2)) -> dict[str, sympy.Rational]:
        """A rational point: probabilities from integer weights 1..9 (inside the simplex), prompt
        probabilities likewise, γ (default 1/2), every other symbol an integer in [−3, 3]."""
        rng = np.random.default_rng(seed)
        vals: dict[str, sympy.Rational] = {}
        for s in range(self.S):
            w = rng.integers(1, 10, size=self.V)
            for a in range(self.V):
                vals[f"p_{s}_{a}"] = sympy.Rational(int(w[a]), int(w.sum()))
        w = rng.integers(1, 10, size=len(self.mdp.prompts))
        for x in range(len(w)):
            vals[f"rho_{x}"] = sympy.Rational(int(w[x]), int(w.sum()))
        for nm in list(self.sym) + ["gamma"]:
            if nm not in vals:
                vals[nm] = sympy.Rational(gamma) if nm == "gamma" else sympy.Integer(int(rng.integers(-3, 4)))
        return vals

    def evaluate(self, x, point: dict):
        """Exact value (sympy Rational) of an element, or nested list, at ``point``: probs mode only.
        Term by term over the sparse representation (fast; γ in the coefficient field is substituted)."""
        if isinstance(x, (list, tuple)):
            return [self.evaluate(v, point) for v in x]
        if self.policy != "probs":
            raise TPGError("evaluate() is for policy='probs'; substitute into logits expressions with .subs")
        x = x if isinstance(x, PolyElement) else self.const(x)
        vals = [QQ.convert(sympy.Rational(point[str(g)])) for g in self.ring.symbols]
        field_ = self.ring.domain != QQ
        g = QQ.convert(sympy.Rational(point["gamma"])) if field_ else None
        total = QQ.zero
        for monom, coeff in x.iterterms():
            term = coeff.numer(g) / coeff.denom(g) if field_ else coeff
            for i, e in enumerate(monom):
                if e:
                    term = term * vals[i] ** e
            total = total + term
        return QQ.to_sympy(total)


# ====================================================================================== zero tests
def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [v for item in x for v in _flat(item)]
    return [x]


def is_zero(x) -> bool:
    """True iff every entry of x (nested lists allowed) is identically zero.

    Ring elements are in canonical expanded form, so ``== 0`` is exact. sympy Expr (logits mode):
    substitute θ = log z (z > 0), which turns exp θ into z, put over one denominator and expand the
    numerator (a polynomial in z is zero iff its expansion is)."""
    for v in _flat(x):
        if isinstance(v, PolyElement):
            if v:
                return False
            continue
        e = sympy.sympify(v)
        thetas = [s for s in e.free_symbols if s.name.startswith("theta_")]
        e = e.subs({th: sympy.log(sympy.Symbol("z" + th.name[5:], positive=True)) for th in thetas})
        num, _ = sympy.fraction(sympy.together(e))
        if sympy.expand(num) != 0:
            return False
    return True


def _first_nonzero(x, width: int = 110) -> str:
    """The shortest non-zero entry of a (nested) table (fewest terms), factored when small: the
    exhibit of a bias or of a failed identity."""
    size = lambda v: len(v) if isinstance(v, PolyElement) else sympy.count_ops(v)   # noqa: E731
    cands = [v for v in _flat(x) if not is_zero(v)]
    if not cands:
        return "0"
    best = min(cands, key=size)
    e = to_expr(best)
    if size(best) <= 40:
        e = sympy.factor(e)
    txt = str(e)
    return txt if len(txt) <= width else txt[:width] + f"… ({len(txt)} chars)"


def sub(x, y):
    """Entrywise x − y of (nested) tables."""
    if isinstance(x, (list, tuple)):
        return [sub(a, b) for a, b in zip(x, y)]
    return x - y


def scale(c, x):
    if isinstance(x, (list, tuple)):
        return [scale(c, v) for v in x]
    return c * x


def to_expr(x):
    """A readable sympy Expr of an engine element (ring elements included)."""
    return x.as_expr() if isinstance(x, PolyElement) else sympy.sympify(x)


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


# ====================================================================================== CLI
def run_cli(args) -> int:
    """``tpg prove [ID…] [--list]``: prove each identity and print a table row per identity (id,
    status, seconds, statement; then the size it was proved at); a FALSE claim's statement is the
    claim refuted. Exit status 1 if any check FAILED (its failing steps are printed under its row)."""
    ids = list(getattr(args, "ids", None) or IDENTITIES)
    for i in ids:
        get_identity(i)                                      # unknown id → TPGError naming the valid ones
    if getattr(args, "list", False):
        print(f"{'id':20s} {'kind':6s} statement [equation]\n{'':27s} size it is proved at")
        for i in ids:
            d = IDENTITIES[i]
            print(f"{d.id:20s} {d.kind:6s} {d.statement} [{d.equation}]\n{'':27s} {d.size}")
        return 0
    print(f"{'id':20s} {'status':14s} {'seconds':>7s}  statement\n{'':44s} size proved at")
    failed = 0
    for i in ids:
        res, d = prove(i), IDENTITIES[i]
        print(f"{res.id:20s} {res.status:14s} {res.seconds:7.2f}  {d.statement}\n{'':44s} {res.size}", flush=True)
        if res.status == "FAILED":
            failed += 1
            print("\n".join(f"    {line}" for line in res.detail))
    print(f"{len(ids) - failed}/{len(ids)} ok" + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0
