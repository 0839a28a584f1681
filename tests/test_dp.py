"""The dynamic-programming route (tpg/dp.py) against the enumeration route and naive loops.

The DP reads rewards per (state, token) pair from the MDP and sweeps the state table; the
enumeration route reads them off every response. Under hypothesis over random MDPs (EOS and fixed
length, EOS in the middle of the vocabulary, γ = 1 and γ < 1, one to three prompts with a
non-uniform ρ, token- and response-reward MDPs) and both parameter structures (tabular, log-linear),
every table, J and ∇J agree at the exact tolerance; GPT-2 on one small case. The vectorised sweeps
are checked against plain loops over the child table, the per-pair rewards against the enumeration's.
Budgets are checked for being O(1) and refused before anything is allocated.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from conftest import assert_close, assert_vec_close
from strategies import mdp_and_policy, mdps
from tpg import dp, exact, rollouts
from tpg.mdp import BudgetError, TokenMDP, TPGError, random_mdp
from tpg.policies import LogLinear, TabularSoftmax
from tpg.rollouts import check_budget, enumerate_responses, log10_sizes

TABLES = ("pi", "r", "U", "Uc", "V", "Q", "A", "visit", "J_prompt")


def assert_tables_equal(d: exact.Tables, e: exact.Tables) -> None:
    for name in TABLES:
        assert_close(getattr(d, name), getattr(e, name), what=f"{name}: dp vs enumeration")
    assert_close(d.J, e.J, what="J: dp vs enumeration")


# ------------------------------------------------------------------------ dp vs enumeration
@given(mdp_and_policy())
def test_tables_dp_equal_enumeration(case):
    """Every table, J and the lazily built P(x, y) agree between the two routes."""
    mdp, pol = case
    d, e = exact.tables(mdp, pol, route="dp"), exact.tables(mdp, pol, route="enumerate")
    assert (d.route, e.route) == ("dp", "enumerate")
    assert_tables_equal(d, e)
    assert_close(d.prob, e.prob, what="P(x, y) built from the DP's log π table")


@given(mdp_and_policy())
def test_gradient_and_objective_dp_equal_enumeration(case):
    """∇J (closed-form weights on the score of the log-prob table) and J agree with autograd through
    the enumeration; the DP's J is differentiable and its autograd gradient is the same ∇J."""
    mdp, pol = case
    g_enum = exact.gradient(mdp, pol, route="enumerate")
    assert_vec_close(exact.gradient(mdp, pol, route="dp"), g_enum, what="∇J: dp vs enumeration")
    J = exact.objective(mdp, pol, route="dp")
    assert_close(J.detach(), exact.objective(mdp, pol, route="enumerate").detach(), what="J")
    params = [p for p in pol.parameters() if p.requires_grad]
    assert_vec_close(exact.flat(torch.autograd.grad(J, params, allow_unused=True), params), g_enum,
                     what="autograd through the DP's J")


@given(mdp_and_policy(kinds=("tabular",)))
def test_dp_gradient_is_the_tabular_closed_form(case):
    """For the tabular softmax the DP's ∇J is ρ(s) π(a|s) (U(s⊕a) − U(s)) itself (PAPER §2)."""
    mdp, pol = case
    tab = exact.tables(mdp, pol, route="enumerate")
    assert_vec_close(exact.gradient(mdp, pol), tab.closed_form(), what="dp ∇J vs closed form")


@given(mdp_and_policy(), st.integers(0, 2**31 - 1))
def test_dp_objective_second_derivative(case, seed):
    """dᵀ∇²J d of the DP's J (double backward through the sweep) equals the enumeration's: the DP's
    objective is J(θ) itself, not a surrogate with the right first derivative only."""
    mdp, pol = case
    params = [p for p in pol.parameters() if p.requires_grad]
    d = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def curvature(route):
        g = exact.flat(torch.autograd.grad(exact.objective(mdp, pol, route=route), params, create_graph=True,
                                           allow_unused=True), params)
        if not g.requires_grad:                                                  # J independent of θ (H = 1 …)
            return torch.zeros(())
        return exact.flat(torch.autograd.grad(g @ d, params, allow_unused=True), params) @ d
    assert_close(curvature("dp"), curvature("enumerate"), what="dᵀ∇²J d")


@given(mdps())
def test_pair_rewards_equal_the_enumerations(mdp):
    """r(s, a) and RM at terminal pairs from the MDP (no responses listed) equal the values read off
    the enumeration (exact._enumerated_rewards: a scatter of every response's rewards)."""
    r, rm = dp.pair_rewards(mdp)
    enum = enumerate_responses(mdp)
    r_e, rm_e = exact._enumerated_rewards(mdp, enum, exact._pair_index(mdp, enum))
    assert_close(r, r_e, what="r(s, a)")
    assert_close(rm, rm_e, what="RM at terminal pairs")
    assert_close(dp.pair_rewards(mdp, need_r=False)[1], rm_e, what="RM (need_r=False)")


# ------------------------------------------------------------------------ callables, GPT-2
def token_reward(x: int, prefix: tuple, a: int) -> float:
    h = sum((i + 1.7) * (t + 0.3) for i, t in enumerate(prefix))
    return math.sin(1.3 + 2.1 * x + h + 0.7 * a * (len(prefix) + 1))


def response_reward(x: int, y: tuple) -> float:
    """Non-additive: 1 if all tokens differ, plus a bonus on the largest token."""
    return float(len(set(y)) == len(y)) + 0.25 * max(y) - 0.1 * x


CALLABLE_CASES = [  # (V, H, eos, prompts, γ, reward form)
    (3, 3, 2, [(0,), ()], 0.8, "token"),
    (3, 3, 0, [(1, 2)], 1.0, "token"),                 # EOS in the middle of the vocabulary
    (2, 3, None, [(), (1,)], 0.6, "response"),
    (4, 2, 1, [(2,), (0, 3)], 0.9, "response"),
    (2, 4, 1, [()], 1.0, "token"),
]


@pytest.mark.parametrize("case", CALLABLE_CASES)
def test_callable_rewards_one_call_per_pair(case):
    """With reward callables the DP calls the token callable once per (state, token) pair and the
    response callable once per terminal pair (= once per response), and agrees with the enumeration."""
    V_, H, eos, prompts, gamma, form = case
    calls = []

    def counted(fn):
        return lambda *a: calls.append(a) or fn(*a)
    rewards = dict(token_rewards=counted(token_reward)) if form == "token" else \
        dict(response_rewards=counted(response_reward))
    mdp = TokenMDP(prompts, V_, H, eos, gamma, prompt_probs=np.arange(1, len(prompts) + 1) / sum(
        range(1, len(prompts) + 1)), **rewards)
    pol = LogLinear(mdp, seed=3)
    d = exact.tables(mdp, pol, route="dp")
    assert len(calls) == (mdp.num_states * V_ if form == "token" else mdp.num_responses)
    assert len(set(calls)) == len(calls)
    assert_tables_equal(d, exact.tables(mdp, pol, route="enumerate"))
    assert_vec_close(exact.gradient(mdp, pol), exact.gradient(mdp, pol, route="enumerate"), what="∇J")


def test_callable_rewards_are_validated():
    """A reward callable returning a non-number or NaN is refused with the pair it was called on."""
    bad = TokenMDP([()], 3, 2, 2, token_rewards=lambda x, p, a: "one" if a == 1 else 0.0)
    with pytest.raises(TPGError, match=r"token_rewards callable must return a finite float; on prompt 0, prefix \(\)"):
        dp.pair_rewards(bad)
    nan = TokenMDP([()], 3, 2, 2, response_rewards=lambda x, y: float("nan"))
    with pytest.raises(TPGError, match="NaN or inf"):
        dp.pair_rewards(nan)


def test_gpt2_dp_equals_enumeration():
    """GPT-2 (float64, random init) through its generic state_log_probs: ∇J and the tables agree."""
    pytest.importorskip("transformers")
    from tpg.lm import GPT2Policy
    mdp = random_mdp(4, vocab_size=3, horizon=2, eos=True, n_prompts=2, gamma=0.8, prompt_probs=[0.3, 0.7])
    pol = GPT2Policy(mdp, seed=0, n_layer=1, n_head=2, n_embd=8, init_range=0.3)
    assert_vec_close(exact.gradient(mdp, pol), exact.gradient(mdp, pol, route="enumerate"), what="GPT-2 ∇J")
    assert_tables_equal(exact.tables(mdp, pol), exact.tables(mdp, pol, route="enumerate"))


# ------------------------------------------------------------------------ naive references
def naive_sweeps(mdp: TokenMDP, pi: torch.Tensor, base: torch.Tensor, gamma: float):
    """X(s) = Σ_a π(a|s) Xc(s, a), Xc = base + γ X(child) (child ≥ 0), and ρ(s), by plain loops over
    the child table: deepest states first for X, shallowest first for ρ."""
    st_ = mdp.state_table()
    child, level = st_["child"], st_["level"]
    S, V = child.shape
    X, Xc, visit = [0.0] * S, [[0.0] * V for _ in range(S)], [0.0] * S
    for s in sorted(range(S), key=lambda s: -level[s]):
        for a in range(V):
            Xc[s][a] = float(base[s, a]) + (gamma * X[child[s, a]] if child[s, a] >= 0 else 0.0)
        X[s] = sum(float(pi[s, a]) * Xc[s][a] for a in range(V))
    for s in sorted(range(S), key=lambda s: level[s]):
        if level[s] == 0:
            visit[s] = float(mdp.prompt_probs[st_["prompt"][s]])
        for a in range(V):
            if child[s, a] >= 0:
                visit[child[s, a]] = visit[s] * float(pi[s, a])
    return (torch.tensor(X, dtype=torch.float64), torch.tensor(Xc, dtype=torch.float64),
            torch.tensor(visit, dtype=torch.float64))


@given(mdp_and_policy(), st.integers(0, 2**31 - 1), st.floats(0.3, 1.0))
def test_sweeps_match_naive_loops(case, seed, gamma):
    """backward_values / child_values / reach equal plain loops, for a dense random base (V, Q's
    form) and for one that vanishes off the terminal pairs (U's form, ``terminal_only``)."""
    mdp, pol = case
    pi = exact.state_log_probs(mdp, pol).detach().exp()
    base = torch.randn(mdp.num_states, mdp.vocab_size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)
    terminal = torch.as_tensor(mdp.state_table()["child"] < 0)
    for b, only in ((base, False), (base * terminal, True)):
        X_ref, Xc_ref, visit_ref = naive_sweeps(mdp, pi, b, gamma)
        X = dp.backward_values(mdp, pi, b, gamma, terminal_only=only)
        assert_close(X, X_ref, what=f"backward_values (terminal_only={only})")
        assert_close(dp.child_values(mdp, X, b, gamma), Xc_ref, what="child_values")
        assert_close(dp.reach(mdp, pi), visit_ref, what="reach")


# ------------------------------------------------------------------------ laziness, routes
def test_dp_route_never_enumerates(monkeypatch):
    """tables / gradient / objective by DP list no responses; Tables.enum and .prob are built on
    first access (and refused there above the response budget)."""
    mdp = random_mdp(2, vocab_size=3, horizon=3, eos=True, n_prompts=2, reward="binary")
    pol = TabularSoftmax(mdp, seed=1)

    def boom(*a, **k):
        raise AssertionError("responses were enumerated on the DP route")
    monkeypatch.setattr(exact, "enumerate_responses", boom)
    monkeypatch.setattr(exact, "_pair_index", boom)
    tab = exact.tables(mdp, pol)
    exact.gradient(mdp, pol)
    exact.objective(mdp, pol)
    assert tab.route == "dp" and tab._enum is None and tab._prob is None
    monkeypatch.undo()
    monkeypatch.setattr(rollouts, "DEFAULT_BUDGET", mdp.num_responses - 1)
    with pytest.raises(BudgetError, match=rf"needs {mdp.num_responses} responses"):
        tab.enum
    monkeypatch.undo()
    assert tab.enum.batch_size == mdp.num_responses
    assert_close(tab.prob.sum(), 1.0, what="Σ P(x, y)")


def test_tables_keep_a_passed_enumeration():
    """tables(mdp, policy, enum) exposes that enumeration as .enum (the moments code reads it)."""
    mdp = random_mdp(5, vocab_size=3, horizon=2, eos=True)
    pol = TabularSoftmax(mdp, seed=0)
    enum = enumerate_responses(mdp)
    for route in ("auto", "dp", "enumerate"):
        tab = exact.tables(mdp, pol, enum, route=route)
        assert tab.enum is enum
        assert_close(tab.prob, exact.tables(mdp, pol, route="enumerate").prob, what=f"prob ({route})")


class TokensOnly(torch.nn.Module):
    """A policy that follows the protocol without ``state_log_probs`` (a user's own module)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.mdp = inner, inner.mdp

    def token_log_probs(self, prompt_idx, tokens):
        return self.inner.token_log_probs(prompt_idx, tokens)


def test_routes_are_chosen_and_named():
    """auto takes the DP when the policy has a state table, else the enumeration; route='dp' without
    one, or with an enumeration, or an unknown route is refused with a TPGError naming the way out."""
    mdp = random_mdp(1, vocab_size=3, horizon=2, eos=True)
    pol, bare = LogLinear(mdp, seed=0), TokensOnly(LogLinear(mdp, seed=0))
    assert exact.choose_route(mdp, pol) == "dp"
    assert exact.choose_route(mdp, bare) == "enumerate"
    assert exact.choose_route(mdp, pol, enum=enumerate_responses(mdp)) == "enumerate"
    assert_vec_close(exact.gradient(mdp, bare), exact.gradient(mdp, pol), what="∇J without a state table")
    with pytest.raises(TPGError, match="route='dp' needs policy.state_log_probs"):
        exact.gradient(mdp, bare, route="dp")
    with pytest.raises(TPGError, match="route='dp' does not read an enumeration"):
        exact.gradient(mdp, pol, enumerate_responses(mdp), route="dp")
    with pytest.raises(TPGError, match="route must be one of"):
        exact.tables(mdp, pol, route="fast")


# ------------------------------------------------------------------------ budgets
def test_dp_budget_counts_state_table_entries_exactly():
    """The DP's budget is S·V entries: budget = S·V runs, S·V − 1 is refused (naming the unit)."""
    mdp = random_mdp(0, vocab_size=3, horizon=3, eos=True, n_prompts=2)
    pol = TabularSoftmax(mdp, seed=0)
    n = mdp.num_states * mdp.vocab_size
    exact.gradient(mdp, pol, route="dp", budget=n)
    with pytest.raises(BudgetError, match=rf"needs {n} state-table entries \(prefix states × V\), above the "
                                          rf"budget of {n - 1}\. Use Monte Carlo"):
        exact.gradient(mdp, pol, route="dp", budget=n - 1)


def test_huge_jobs_are_refused_in_constant_time(monkeypatch):
    """V = 50, H = 40 (10^67 responses) and H = 10^5 (10^169019): every route refuses at once, in
    scientific notation with its unit, before the policy's table is asked for."""
    def boom(*a, **k):
        raise AssertionError("allocated before the budget check")
    for H in (40, 100_000):
        mdp = TokenMDP([(), (1,), (2, 3)], 50, H, eos=49, response_rewards=lambda x, y: 1.0)
        pol = LogLinear(mdp, seed=0) if H == 40 else TokensOnly(LogLinear(TokenMDP([()], 50, 2, 49,
                                                                                  token_rewards=lambda *a: 0.0)))
        if H == 40:
            monkeypatch.setattr(pol, "state_log_probs", boom)
            t0 = time.perf_counter()
            for job in (exact.gradient, exact.objective, exact.tables):
                with pytest.raises(BudgetError) as e:
                    job(mdp, pol)
                msg = str(e.value)
                assert "e+68 responses" in msg and "state-table entries" in msg and "Monte Carlo" in msg, msg
            with pytest.raises(BudgetError, match=r"needs \d\.\d\de\+68 state-table entries"):
                exact.gradient(mdp, pol, route="dp")
            assert time.perf_counter() - t0 < 1.0
        t0 = time.perf_counter()
        with pytest.raises(BudgetError, match=r"needs \d\.\d\de\+\d+ responses, above the budget of 10,000,000"):
            enumerate_responses(mdp)
        assert time.perf_counter() - t0 < 1.0
    monkeypatch.undo()


def test_check_budget_sizes():
    """Exact counts compare exactly and print with separators; estimates and log10 sizes (a count a
    float cannot hold, e.g. n_groups ** n_prompts) compare in log space and print as m.mme+XX."""
    check_budget(10, 10, "x")
    with pytest.raises(BudgetError, match=r"needs 11 widgets, above the budget of 10\. Use Monte Carlo"):
        check_budget(11, 10, "x", "widgets")
    with pytest.raises(BudgetError, match=r"needs 2.50e\+07 responses"):
        check_budget(2.5e7, None, "x")
    t0 = time.perf_counter()
    with pytest.raises(BudgetError, match=r"needs 1.00e\+670000000 batches"):
        check_budget(None, None, "10^8 prompts", "batches", log10_n=6.7e8)     # (10^67)^(10^7)
    with pytest.raises(BudgetError, match=r"needs 1.23e\+45 responses"):
        check_budget(123 * 10**43, None, "x")                                   # an exact int too long to print
    assert time.perf_counter() - t0 < 0.1
    check_budget(None, None, "x", log10_n=6.9)


@given(st.integers(1, 60), st.integers(1, 30), st.booleans(), st.integers(1, 5))
def test_log10_sizes_match_exact_counts(V, H, eos, P):
    """The O(1) log10 sizes equal the exact big-integer counts to float precision."""
    if eos and V < 2:
        V = 2
    mdp = TokenMDP([()] * P, V, H, eos=V - 1 if eos else None, token_rewards=lambda *a: 0.0)
    states, responses = log10_sizes(mdp)
    assert abs(states - math.log10(mdp.num_states)) < 1e-9
    assert abs(responses - math.log10(mdp.num_responses)) < 1e-9

