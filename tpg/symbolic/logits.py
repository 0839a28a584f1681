"""The logit algebra (``SymbolicMDP(policy="logits")``): one symbol θ[s, a] per prefix state × token,
π(a|s) = exp θ[s,a] / Σ_b exp θ[s,b]; ∇J and the scores ∂ log π/∂θ come from ``sympy.diff``.

Expressions are sympy ``Expr``; a difference is zero when, with θ = log z (z > 0), its ``together``
numerator expands to 0. Exact but slow: used at the small size, above all to prove the softmax
score structure ∂ log π(a|s)/∂θ[s,b] = 1[a = b] − π(b|s) that the probability backend is built on.
"""
from __future__ import annotations

from typing import Any, Sequence

import sympy

from tpg.mdp import TPGError
from tpg.symbolic.probs import GAMMA


class LogitAlgebra:
    """sympy expressions in the logits θ[s, a] (and the other symbols, real)."""
    name = "logits"

    def __init__(self, S: int, V: int, names: Sequence[str], gamma: Any):
        if gamma == "field":
            raise TPGError("gamma='field' needs policy='probs'")
        self.S, self.V = S, V
        self.ring = None
        self.sym = {nm: (GAMMA if nm == "gamma" else sympy.Symbol(nm, real=True)) for nm in names}
        self.theta = [[sympy.Symbol(f"theta_{s}_{a}", real=True) for a in range(V)] for s in range(S)]
        self.one, self.zero = sympy.Integer(1), sympy.Integer(0)

    def const(self, x):
        return sympy.Rational(x) if not isinstance(x, sympy.Basic) else x

    def pi_row(self, s: int) -> list:
        ex = [sympy.exp(th) for th in self.theta[s]]
        tot = sum(ex)
        return [e / tot for e in ex]

    def grad(self, eng, J) -> list[list]:
        """(S, V) ∂J/∂θ[s, b] by ``sympy.diff``."""
        return [[sympy.diff(J, self.theta[s][b]) for b in range(self.V)] for s in range(self.S)]

    def score(self, eng, s: int, a: int) -> list:
        """(V,) ∂ log π(a|s)/∂θ[s, ·] by ``sympy.diff`` (zero outside block s)."""
        lp = sympy.log(eng.pi[s][a])
        return [sympy.diff(lp, self.theta[s][b]) for b in range(self.V)]

    def contract(self, eng, s: int, w: list) -> list:
        """Σ_a w_a ∇ log π(a|s), one score at a time."""
        out = [self.zero] * self.V
        for a in range(self.V):
            if w[a] == 0:
                continue
            sc = eng.score(s, a)
            for b in range(self.V):
                out[b] = out[b] + w[a] * sc[b]
        return out

    def evaluate(self, x, point: dict):
        raise TPGError("evaluate() is for policy='probs'; substitute into logits expressions with .subs")


def element_is_zero(v) -> bool:
    """Substitute θ = log z (z > 0), which turns exp θ into z, put over one denominator and expand the
    numerator (a polynomial in z is zero iff its expansion is)."""
    e = sympy.sympify(v)
    thetas = [s for s in e.free_symbols if s.name.startswith("theta_")]
    e = e.subs({th: sympy.log(sympy.Symbol("z" + th.name[5:], positive=True)) for th in thetas})
    num, _ = sympy.fraction(sympy.together(e))
    return sympy.expand(num) == 0


def size(v) -> int:
    return sympy.count_ops(v)


def to_expr(v):
    return sympy.sympify(v)
