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

Layout: ``engine`` (``SymbolicMDP``, structures, zero tests), its two algebra backends ``probs`` and
``logits``, ``linear`` (estimators as exact linear maps read off the numeric code) and
``identities`` (evidence, the checks, the registry, ``prove``); ``run_cli`` is ``tpg prove``.
"""
from __future__ import annotations

from tpg.symbolic.engine import (BACKENDS, GAMMA, Path, SymbolicMDP, describe, is_zero, paths_of, scale, structure,
                                 sub, to_expr)
from tpg.symbolic.identities import *  # noqa: F401,F403  (the checks, sizes and helpers)
from tpg.symbolic.identities import (IDENTITIES, Evidence, Identity, Result, Witness, _std_grpo_expectation,
                                     gae_along, get_identity, judge, prove, weights)
from tpg.symbolic.linear import (exact_rational, feed_continuations, feed_outcome, fresh_expectation, group_rollouts,
                                 joint_tuples, linear_coefficients, linear_expectation, trepo_expectation,
                                 tuple_expectation)
from tpg.symbolic.logits import LogitAlgebra
from tpg.symbolic.probs import ProbAlgebra


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
