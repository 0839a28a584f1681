"""tpg.symbolic: every identity proved (or refuted) symbolically, the engine cross-checked against the
numeric exact engine at random points, and the checker shown able to fail.

Measured CPU seconds per identity (one core, sympy without gmpy2): trepo_mc_all 6.0,
decomposition_adv 4.7, trepo_chunk 4.4, decomposition_grad 3.4, false_drop_gamma 2.7,
grpo_mean_scale 2.3, rloo 2.1, every other ≤ 1.6; ≈ 35 s for all 18. The whole file takes ≈ 45 s
CPU (≈ 80 s wall on a loaded 2-core machine), inside its 3-minute CI share: nothing is marked slow.
"""
from __future__ import annotations

import math
from argparse import Namespace

import numpy as np
import pytest
import sympy
import torch
from sympy.core.random import test_derivative_numerically as derivative_matches_numerically  # not a test

from conftest import assert_close, assert_vec_close
from tpg import TokenMDP, TabularSoftmax, estimator, exact
from tpg.cli import main as cli_main
from tpg.mdp import TPGError
from tpg.rollouts import greedy
from tpg.symbolic import (IDENTITIES, Evidence, Identity, SymbolicMDP, _std_grpo_expectation, exact_rational,
                          fresh_expectation, is_zero, joint_tuples, linear_coefficients, linear_expectation,
                          prove, run_cli, structure, sub, trepo_expectation, weights, feed_outcome)


# ====================================================================================== numeric twins
def _probs(eng: SymbolicMDP, pt: dict) -> np.ndarray:
    return np.array([[float(pt[f"p_{s}_{a}"]) for a in range(eng.V)] for s in range(eng.S)])


def numeric_twin(eng: SymbolicMDP, pt: dict, gamma: float | None = None) -> tuple[TokenMDP, TabularSoftmax]:
    """The numeric TokenMDP and TabularSoftmax (logits = log p) of a symbolic engine at a point."""
    m = eng.mdp
    rho = [float(pt[f"rho_{x}"]) for x in range(len(m.prompts))]
    if eng.rewards == "token":
        r = np.array([[float(pt[f"r_{s}_{a}"]) for a in range(eng.V)] for s in range(eng.S)])
        g = float(pt["gamma"]) if gamma is None else gamma
        nm = TokenMDP(m.prompts, m.vocab_size, m.horizon, m.eos, g, rho, token_rewards=r)
    else:
        table = np.zeros((eng.S, eng.V))
        for (s, a), n in eng.terminal.items():
            table[s, a] = float(eng.evaluate(eng.rm(n), pt))
        nm = TokenMDP(m.prompts, m.vocab_size, m.horizon, m.eos, 1.0, rho, response_rewards=table)
    return nm, TabularSoftmax(nm, logits=torch.as_tensor(np.log(_probs(eng, pt))))


def _num(eng, x, pt) -> torch.Tensor:
    return torch.as_tensor(np.array(eng.evaluate(x, pt), dtype=float))


SIZES = [dict(vocab_size=3, horizon=3, n_prompts=2), dict(vocab_size=2, horizon=3, eos=False, n_prompts=1),
         dict(vocab_size=4, horizon=2, n_prompts=2), dict(vocab_size=2, horizon=3, n_prompts=1)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("size", SIZES, ids=lambda kw: "-".join(f"{k[0]}{v}" for k, v in kw.items()))
def test_engine_matches_exact_tables(size, seed):
    """J, ∇J (chain rule through the simplex) and every value table equal tpg.exact's at a random
    rational point (token rewards, symbolic γ = 1/2, symbolic prompt probabilities)."""
    eng = SymbolicMDP(structure(**size))
    pt = eng.point(seed)
    nm, pol = numeric_twin(eng, pt)
    tab, sym = exact.tables(nm, pol), eng.tables()
    assert_close(float(eng.evaluate(eng.J(), pt)), tab.J, what="J")
    assert_vec_close(_num(eng, eng.grad(), pt), exact.gradient(nm, pol), what="∇J")
    for k in ("U", "Uc", "V", "Q", "A", "visit"):
        assert_close(_num(eng, sym[k], pt), getattr(tab, k), what=k)


def test_response_engine_matches_exact():
    """Response-level symbols R(y) with the Zero-Reward decomposition: tables equal tpg.exact's."""
    eng = SymbolicMDP(structure(vocab_size=3, horizon=3, n_prompts=2), rewards="response")
    pt = eng.point(3)
    nm, pol = numeric_twin(eng, pt)
    tab, sym = exact.tables(nm, pol), eng.tables()
    assert_vec_close(_num(eng, eng.grad(), pt), exact.gradient(nm, pol), what="∇J")
    for k in ("U", "Uc", "V", "Q"):
        assert_close(_num(eng, sym[k], pt), getattr(tab, k), what=k)


def _logit_values(lo: SymbolicMDP, seed: int) -> tuple[dict, np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((lo.S, lo.V))
    r = rng.integers(-3, 4, size=(lo.S, lo.V)).astype(float)
    subs = {lo.theta[s][a]: sympy.Float(theta[s, a], 30) for s in range(lo.S) for a in range(lo.V)}
    subs.update({lo.sym[f"r_{s}_{a}"]: int(r[s, a]) for s in range(lo.S) for a in range(lo.V)})
    subs[lo.sym["gamma"]] = sympy.Rational(1, 2)
    return subs, theta, r, 0.5


def test_logits_engine_matches_exact():
    """The logits engine (sympy.diff through exp) gives tpg.exact's J and ∇J at random logits."""
    lo = SymbolicMDP(structure(vocab_size=3, horizon=2, n_prompts=1), policy="logits")
    subs, theta, r, g = _logit_values(lo, 0)
    nm = TokenMDP(lo.mdp.prompts, 3, 2, lo.mdp.eos, g, token_rewards=r)
    pol = TabularSoftmax(nm, logits=torch.as_tensor(theta))
    assert_close(float(lo.J().evalf(subs=subs, n=20)), exact.tables(nm, pol).J, what="J")
    grad = [float(e.evalf(subs=subs, n=20)) for row in lo.grad() for e in row]
    assert_vec_close(torch.tensor(grad, dtype=torch.float64), exact.gradient(nm, pol), what="∇J")


def test_logits_derivative_numerically():
    """sympy's own numeric derivative check (imported under another name so pytest does not collect
    it) on J(θ) of the logits engine, one logit free and the rest at fixed values."""
    lo = SymbolicMDP(structure(vocab_size=3, horizon=2, n_prompts=1), policy="logits")
    subs, *_ = _logit_values(lo, 1)
    for s, a in [(0, 0), (1, 2), (2, 1)]:
        free = lo.theta[s][a]
        J = lo.J().subs({k: v for k, v in subs.items() if k != free})
        assert derivative_matches_numerically(J, free)


def test_parametrisations_agree_symbolically():
    """With p = softmax(θ) substituted, the chain-rule ∇J of the probability engine IS the
    sympy.diff ∇J of the logits engine (as rational functions of z = exp θ), and so are U and ρ(s)."""
    mdp = structure(vocab_size=3, horizon=2, n_prompts=1)
    pr, lo = SymbolicMDP(mdp), SymbolicMDP(mdp, policy="logits")
    z = [[sympy.Symbol(f"z_{s}_{a}", positive=True) for a in range(3)] for s in range(pr.S)]  # is_zero's exp θ
    to_z = {sympy.Symbol(f"p_{s}_{a}"): z[s][a] / sum(z[s]) for s in range(pr.S) for a in range(2)}
    for name in ("gamma",) + tuple(f"r_{s}_{a}" for s in range(pr.S) for a in range(3)):
        to_z[sympy.Symbol(name)] = lo.sym[name]                   # same names, logits engine's assumptions
    probs_side = [[e.as_expr().subs(to_z) for e in row] for row in pr.grad()]
    assert is_zero(sub(probs_side, lo.grad()))
    for k in ("U", "visit"):
        assert is_zero([pr.tables()[k][s].as_expr().subs(to_z) - lo.tables()[k][s] for s in range(pr.S)])


# ====================================================================================== estimators vs tpg.exact.moments
def _moments_mean(est, nm, pol, G) -> torch.Tensor:
    return exact.moments(est, nm, pol, G).mean


def test_rloo_and_grpo_expectations_match_moments():
    """The symbolic E[ĝ] built from the estimators' coefficient maps equals tpg.exact.moments."""
    eng = SymbolicMDP(structure(vocab_size=3, horizon=2, n_prompts=2), rewards="response")
    pt = eng.point(5)
    nm, pol = numeric_twin(eng, pt)
    for est, G in [(estimator("rloo"), 2), (estimator("grpo", std=False), 3)]:
        sym = linear_expectation(eng, est, G, lambda n: [eng.rm(n)], 1)
        assert_vec_close(_num(eng, sym, pt), _moments_mean(est, nm, pol, G), what=est.name)


def test_remax_expectation_matches_moments():
    """ReMax with the symbolic greedy reward g_x set to RM of tpg's greedy response = tpg.exact.moments."""
    eng = SymbolicMDP(structure(vocab_size=3, horizon=2, n_prompts=2), rewards="response", extra=("g_0", "g_1"))
    pt = eng.point(6)
    nm, pol = numeric_twin(eng, pt)
    g = greedy(nm, pol, torch.arange(2)).rm
    pt.update({"g_0": sympy.Rational(float(g[0])), "g_1": sympy.Rational(float(g[1]))})
    est = estimator("remax")
    sym = linear_expectation(eng, est, 2, lambda n: [eng.rm(n), eng.sym[f"g_{eng.paths[n].prompt}"]], 2)
    assert_vec_close(_num(eng, sym, pt), _moments_mean(est, nm, pol, 2), what="remax")


def test_std_grpo_expectation_matches_moments():
    """√2·E[ĝ] of std-GRPO (G = 2, ε = 1e-300) divided by √2 equals tpg.exact.moments."""
    m = structure(vocab_size=3, horizon=2, n_prompts=1)
    vals = [float(n % 3) for n in range(m.num_responses)]
    eng = SymbolicMDP(m, rewards="response", rm_values=vals)
    pt = eng.point(7)
    nm, pol = numeric_twin(eng, pt)
    sym = _num(eng, _std_grpo_expectation(eng, vals), pt) / math.sqrt(2.0)
    assert_vec_close(sym, _moments_mean(estimator("grpo", eps=1e-300), nm, pol, 2), what="std-GRPO")


@pytest.mark.parametrize("variant,anchors", [("all", None), ("chunk", {"kind": "fixed", "positions": [1]}),
                                             ("interp", {"kind": "fixed", "positions": [1, 3]})])
def test_trepo_expectation_matches_moments(variant, anchors):
    """TRePO with continuations at U(prefix): symbolic E[ĝ] = tpg.exact.moments (ExactDraws)."""
    eng = SymbolicMDP(structure(vocab_size=3, horizon=3, n_prompts=2), rewards="response")
    pt = eng.point(8)
    nm, pol = numeric_twin(eng, pt)
    est = estimator("trepo", variant=variant, K=1, anchors=anchors)
    sym = trepo_expectation(eng, est, anchors=anchors)
    assert_vec_close(_num(eng, sym, pt), _moments_mean(est, nm, pol, 1), what=f"trepo-{variant}")


def test_fresh_continuations_match_substitution():
    """Enumerating a fresh continuation per prefix jointly gives the same E[ĝ] as substituting
    U(prefix) (what tpg.exact.moments does), at a point; and the same enumeration sees the
    self-inclusive baseline mistake (F10): E[ĝ] = K/(K+1) ∇J = ½ ∇J for K = 1, symbolically."""
    eng = SymbolicMDP(structure(vocab_size=3, horizon=2, n_prompts=2), rewards="response")
    pt = eng.point(9)
    nm, pol = numeric_twin(eng, pt)
    est = estimator("trepo", variant="all", K=1)
    assert_vec_close(_num(eng, fresh_expectation(eng, est, 1), pt), _moments_mean(est, nm, pol, 1), what="fresh")
    biased = fresh_expectation(eng, estimator("trepo", variant="all", K=1, self_inclusive=True), 1)
    assert is_zero(sub(biased, [[eng.const(sympy.Rational(1, 2)) * g for g in row] for row in eng.grad()]))
    assert not is_zero(sub(biased, eng.grad()))


def test_rloo_coefficient_map_is_the_formula():
    """Replay: for G = 2 RLOO, c_i = (R_i − R_j)/G on every token of y_i: M = ±1/2 (derived from
    A_i = R_i − R_j and the seq-mean-token-sum weight 1/G)."""
    m = structure(vocab_size=3, horizon=2, n_prompts=1)
    tuples = joint_tuples(m, 2)
    M = linear_coefficients(estimator("rloo"), m, tuples, 1, feed_outcome)          # (n, G, L, G, K)
    lengths = [p.T for p in SymbolicMDP(m, rewards="response").paths]
    for k, (a, b) in enumerate(tuples.tolist()):
        for i, own in enumerate((a, b)):
            for t in range(m.horizon):
                want = [sympy.Rational(1, 2), sympy.Rational(-1, 2)][:: 1 if i == 0 else -1] \
                    if t < lengths[own] else [0, 0]
                assert list(M[k, i, t, :, 0]) == want


# ====================================================================================== the identities
EXPECTED = {i: ("proved" if d.kind == "true" else "counterexample") for i, d in IDENTITIES.items()}


@pytest.mark.parametrize("identity_id", list(IDENTITIES))
def test_identity(identity_id):
    """Each registered identity is proved (true) or refuted with a symbolic counterexample (false)."""
    res = prove(identity_id)
    assert res.status == EXPECTED[identity_id], "\n".join(res.detail)
    assert res.size == IDENTITIES[identity_id].size


# ====================================================================================== the checker can fail
def _small():
    return SymbolicMDP(structure(vocab_size=3, horizon=2, n_prompts=2))


def _wrong_action_baseline() -> Evidence:
    """'E Σ_t b(s_(t−1), y_t) ∇ℓ_t = 0' with a baseline that depends on the action: false."""
    eng, ev = _small(), Evidence()
    ev.vanishes("action-dependent baseline", eng.expected_score(weights(eng, lambda n, t: eng.r[
        eng.paths[n].states[t]][eng.paths[n].tokens[t]])))
    return ev


def _wrong_blog_form() -> Evidence:
    """The blog's form E Σ_t γ^(t−1) RM ∇ℓ_t = ∇J (F2): false for symbolic γ."""
    eng, ev = _small(), Evidence()
    ev.equal("blog form", eng.expected_score(weights(eng, lambda n, t: eng.gamma**t * eng.rm(n))), eng.grad())
    return ev


def _wrong_score_sign() -> Evidence:
    """Softmax score with the wrong sign, in the logits engine (sympy Expr path of is_zero)."""
    lo, ev = SymbolicMDP(structure(vocab_size=2, horizon=1), policy="logits"), Evidence()
    ev.vanishes("wrong-sign score", [lo.score(0, 0)[b] - (lo.pi[0][b] - (1 if b == 0 else 0)) for b in range(2)])
    return ev


def _rloo_called_biased() -> Evidence:
    """A 'counterexample' whose witness is identically zero (RLOO is unbiased): must not count."""
    eng, ev = SymbolicMDP(structure(vocab_size=3, horizon=2, n_prompts=1), rewards="response"), Evidence()
    E = linear_expectation(eng, estimator("rloo"), 2, lambda n: [eng.rm(n)], 1)
    ev.witness("RLOO bias", eng, sub(E, eng.grad()))
    return ev


def _crashes() -> Evidence:
    raise TPGError("boom")


WRONG = {
    "action_baseline": ("true", _wrong_action_baseline),
    "blog_form": ("true", _wrong_blog_form),
    "score_sign": ("true", _wrong_score_sign),
    "empty_true": ("true", Evidence),
    "rloo_biased": ("false", _rloo_called_biased),
    "empty_false": ("false", Evidence),
    "crash": ("true", _crashes),
}


@pytest.mark.parametrize("name", list(WRONG))
def test_wrong_identity_is_not_proved(name, monkeypatch):
    kind, check = WRONG[name]
    monkeypatch.setitem(IDENTITIES, f"wrong_{name}", Identity(f"wrong_{name}", name, "-", "small", kind, check))
    res = prove(f"wrong_{name}")
    assert res.status == "FAILED", res.detail
    assert any(line.startswith("NOT") for line in res.detail)


def test_linear_coefficients_refuse_a_nonlinear_estimator():
    """std-GRPO (ε = 1e-6) is not linear in the rewards: the coefficient map refuses it."""
    m = structure(vocab_size=3, horizon=2, n_prompts=1)
    with pytest.raises(TPGError, match="not linear"):
        linear_coefficients(estimator("grpo"), m, joint_tuples(m, 2), 1, feed_outcome)


def test_exact_rational_refuses_irrational():
    assert exact_rational(-0.25) == sympy.Rational(-1, 4)
    assert exact_rational(1 / math.sqrt(2), 1 / math.sqrt(2)) == 1
    with pytest.raises(TPGError, match="not a small rational"):
        exact_rational(math.sqrt(2))


def test_engine_rejects_bad_options():
    m = structure(vocab_size=3, horizon=2)
    with pytest.raises(TPGError, match="policy"):
        SymbolicMDP(m, policy="neural")
    with pytest.raises(TPGError, match="rewards"):
        SymbolicMDP(m, rewards="dense")
    with pytest.raises(TPGError, match="field"):
        SymbolicMDP(m, policy="logits", gamma="field")


# ====================================================================================== CLI
def test_cli_proves_and_lists(capsys):
    assert run_cli(Namespace(ids=["theorem2_pathwise", "false_trepo_interp"], list=False)) == 0
    out = capsys.readouterr().out
    assert "theorem2_pathwise" in out and "proved" in out and "counterexample" in out and "2/2 ok" in out
    assert run_cli(Namespace(ids=[], list=True)) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in IDENTITIES)


def test_cli_exit_status_on_failure(capsys, monkeypatch):
    monkeypatch.setitem(IDENTITIES, "wrong", Identity("wrong", "blog form", "-", "small", "true", _wrong_blog_form))
    assert run_cli(Namespace(ids=["wrong"], list=False)) == 1
    assert "FAILED" in capsys.readouterr().out


def test_cli_unknown_id(capsys):
    with pytest.raises(TPGError, match="valid ids: score_function"):
        run_cli(Namespace(ids=["lemma3"], list=False))
    assert cli_main(["prove", "lemma3"]) == 2
    assert "unknown identity 'lemma3'" in capsys.readouterr().err


def test_symbolic_gae_matches_the_estimator_code():
    """``gae_along`` (sympy, needed for symbolic λ) is the same recursion as the registry's GAE:
    at a rational point, with the exact critic, it equals ``gae_advantages`` on every response."""
    from tpg.draws import exact_critic
    from tpg.estimators.gae import gae_advantages
    from tpg.symbolic import gae_along
    eng = SymbolicMDP(structure(**SIZES[0]))
    pt = eng.point(0)
    nm, pol = numeric_twin(eng, pt)
    tab = exact.tables(nm, pol)
    enum = tab.enum
    values = exact_critic(tab)(enum)                                                   # (N, L)
    lam = sympy.Rational(1, 3)
    num = gae_advantages(enum.token_rewards, values, enum.mask, float(pt["gamma"]), float(lam))   # (N, L)
    for p in eng.paths:
        sym = [float(v) for v in eng.evaluate(gae_along(eng, p.n, lam), pt)]
        assert_close(torch.tensor(sym, dtype=torch.float64), num[p.n, : p.T], what=f"GAE along response {p.n}")
