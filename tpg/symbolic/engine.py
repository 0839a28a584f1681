"""The symbolic engine: ``SymbolicMDP``, the sympy twin of a ``TokenMDP`` (see ``tpg.symbolic``).

It enumerates exactly the states (``mdp.state_table()``, ``mdp.state_index``) and responses
(``enumerate_responses(mdp)``) of the numeric engine and builds J, ∇J, U, V, Q, A and the visit
probabilities ρ(s) from the same recursions as ``tpg.exact.tables`` (PAPER §1–2), in one of two
algebras (backends): ``policy="probs"`` (``tpg.symbolic.probs``, probabilities as symbols in a
polynomial ring) or ``policy="logits"`` (``tpg.symbolic.logits``, softmax of logit symbols). A
backend supplies the symbols, constants, π(·|s), ∇J, the scores and their contraction and the
exact evaluation; everything else here is backend-independent. The zero tests (``is_zero``) check
each entry in the algebra it belongs to.

Rewards: ``rewards="token"`` gives one symbol r[s, a] per (state, token) and RM = Σ_t γ^(t−1) r_t
(PAPER §1.3); ``rewards="response"`` gives one symbol R[n] per complete response, any function of
the whole response, with its Zero-Reward decomposition at γ = 1 (PAPER §1.4); ``rm_values=`` fixes
RM to given numbers instead.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import sympy

from tpg.mdp import TokenMDP, TPGError
from tpg.rollouts import enumerate_responses
from tpg.symbolic import logits, probs
from tpg.symbolic.logits import LogitAlgebra
from tpg.symbolic.probs import GAMMA, ProbAlgebra

BACKENDS = {"probs": ProbAlgebra, "logits": LogitAlgebra}


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
      policy: "probs" (``tpg.symbolic.probs``: polynomial ring, simplex substituted) or "logits"
        (``tpg.symbolic.logits``: sympy Expr with exp): the algebra backend.
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
        if policy not in BACKENDS:
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
        names: list[str] = []                                   # the backend adds its policy symbols
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
        self.alg = BACKENDS[self.policy](S, V, names, gamma)
        self.ring, self.sym, self.one, self.zero = self.alg.ring, self.alg.sym, self.alg.one, self.alg.zero
        if self.alg.theta is not None:
            self.theta = self.alg.theta
        if gamma == "symbol":
            self.gamma = self.sym["gamma"]
        elif gamma == "field":
            self.gamma = self.alg.field_gamma()
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
        return self.alg.const(x)

    def _pi_row(self, s: int) -> list:
        return self.alg.pi_row(s)

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
        out = self.alg.grad(self, self.J())
        self._cache["grad"] = out
        return out

    def score(self, s: int, a: int) -> list:
        """(V,) ∂ log π(a|s)/∂θ[s, ·] (zero outside block s): ``diff`` for logits, e_a − π(·|s) for probs."""
        key = ("score", s, a)
        if key not in self._cache:
            self._cache[key] = self.alg.score(self, s, a)
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
        return [self.alg.contract(self, s, agg[s]) for s in range(self.S)]

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
        return self.alg.evaluate(x, point)


# ====================================================================================== zero tests
def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [v for item in x for v in _flat(item)]
    return [x]


def _backend_of(v):
    return probs if probs.is_element(v) else logits


def is_zero(x) -> bool:
    """True iff every entry of x (nested lists allowed) is identically zero, each entry tested by its
    algebra: ring elements are in canonical expanded form (``== 0`` is exact); sympy Expr (logits)
    after θ = log z, one denominator and an expanded numerator (``tpg.symbolic.logits``)."""
    return all(_backend_of(v).element_is_zero(v) for v in _flat(x))


def _first_nonzero(x, width: int = 110) -> str:
    """The shortest non-zero entry of a (nested) table (fewest terms), factored when small: the
    exhibit of a bias or of a failed identity."""
    size = lambda v: _backend_of(v).size(v)   # noqa: E731
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
    return _backend_of(x).to_expr(x)


