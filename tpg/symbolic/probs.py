"""The probability algebra (``SymbolicMDP(policy="probs")``, the default backend).

The next-token probabilities are the symbols, p[s, a] for a < V−1, with the simplex constraint
substituted, π(V−1|s) = 1 − Σ_{a<V−1} p[s,a]. J is a polynomial; ∇_θ J follows by the chain rule
through the softmax (∂p_a/∂θ_b = p_a(1[a=b] − p_b)), i.e. from ``diff`` of J with respect to the free
p's, and the scores are the vectors e_a − π(·|s) in block s (the softmax score structure the logit
backend proves). Everything is a polynomial over QQ in sympy's sparse ring
(``sympy.polys.rings``), whose elements are kept in expanded canonical form, so ``lhs − rhs == 0``
IS ``expand(lhs − rhs) == 0``: sound, and fast enough for V = 3 (tokens a, b, EOS) with H = 4 and
V = 4 with H = 3, two prompts. With ``gamma="field"`` the coefficients live in QQ(γ), so 1/γ is
allowed (the Zero-Reward decomposition r_T = RM/γ^(T−1)).
"""
from __future__ import annotations

from typing import Any, Sequence

import sympy
from sympy import QQ
from sympy.polys.rings import PolyElement, ring

GAMMA = sympy.Symbol("gamma", positive=True)


class ProbAlgebra:
    """Polynomials in the free probabilities p[s, a] (and the other symbols) over QQ or QQ(γ)."""
    name = "probs"

    def __init__(self, S: int, V: int, names: Sequence[str], gamma: Any):
        self.S, self.V = S, V
        names = [f"p_{s}_{a}" for s in range(S) for a in range(V - 1)] + list(names)
        dom = QQ.frac_field(GAMMA) if gamma == "field" else QQ
        self.ring, *gens = ring(names, dom)
        self.sym = dict(zip(names, gens))
        self.one, self.zero = self.ring.one, self.ring.zero
        self.theta = None

    def field_gamma(self):
        """γ as an element of the coefficient field QQ(γ) (``gamma="field"``)."""
        return self.ring.domain.convert(GAMMA)

    def const(self, x):
        """An exact constant (floats must be exactly representable rationals)."""
        q = sympy.Rational(x) if not isinstance(x, sympy.Basic) else x
        return self.ring.domain.convert(q) * self.one

    def pi_row(self, s: int) -> list:
        free = [self.sym[f"p_{s}_{a}"] for a in range(self.V - 1)]
        return free + [self.one - sum(free, self.zero)]              # the simplex constraint, substituted

    def grad(self, eng, J) -> list[list]:
        """(S, V) ∂J/∂θ[s, b]: J is a polynomial F̃ in the free p's; with ∂p_a/∂θ_b = p_a(1[a=b] − p_b),
        ∂J/∂θ[s,b] = 1[b < V−1] p_b ∂F̃/∂p_b − p_b Σ_{a<V−1} p_a ∂F̃/∂p_a."""
        out = []
        for s in range(self.S):
            dF = [J.diff(self.sym[f"p_{s}_{a}"]) for a in range(self.V - 1)]
            mix = sum((eng.pi[s][a] * dF[a] for a in range(self.V - 1)), self.zero)
            out.append([eng.pi[s][b] * ((dF[b] if b < self.V - 1 else self.zero) - mix) for b in range(self.V)])
        return out

    def score(self, eng, s: int, a: int) -> list:
        """(V,) ∂ log π(a|s)/∂θ[s, ·] = e_a − π(·|s)."""
        return [(self.one if b == a else self.zero) - eng.pi[s][b] for b in range(self.V)]

    def contract(self, eng, s: int, w: list) -> list:
        """Σ_a w_a ∇ log π(a|s) = w − π Σ_a w_a: V products, not V²."""
        tot = sum(w, self.zero)
        return [w[b] - eng.pi[s][b] * tot for b in range(self.V)]

    def evaluate(self, x, point: dict):
        """Exact value (sympy Rational) of an element, or nested list, at ``point``. Term by term over
        the sparse representation (fast; γ in the coefficient field is substituted)."""
        if isinstance(x, (list, tuple)):
            return [self.evaluate(v, point) for v in x]
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


def is_element(v) -> bool:
    return isinstance(v, PolyElement)


def element_is_zero(v: PolyElement) -> bool:
    """Ring elements are in canonical expanded form, so ``== 0`` is exact."""
    return not v


def size(v: PolyElement) -> int:
    return len(v)


def to_expr(v: PolyElement):
    return v.as_expr()
