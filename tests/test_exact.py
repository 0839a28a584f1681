"""The exact engine against the paper's identities (PAPER §2, §7 items 1–8) and naive references.

Every identity is checked under hypothesis over random token MDPs (tests/strategies.py: EOS and
fixed length, several prompts with a non-uniform ρ, γ = 1 and γ < 1, every reward kind) and both
policies, at the exact tolerance of tests/conftest.py (1e-10 relative); finite differences use the
"fd" tolerance. An expectation E[Σ_t c_t ∇ℓ_t] is computed as ``expected_score(policy, enum, W)``
with W[n, t] = P(y_n) c_t(y_n) (DESIGN §2), so each identity is a comparison of two exact vectors.
"""
from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from conftest import assert_close, assert_vec_close
from strategies import mdp_and_policy, mdps
from tpg import exact
from tpg.mdp import TokenMDP
from tpg.policies import LogLinear, TabularSoftmax
from tpg.rollouts import enumerate_responses


# ------------------------------------------------------------------------------------------ helpers
def discounts(mdp: TokenMDP) -> torch.Tensor:
    """(H,) γ^(t-1) for t = 1..H."""
    return mdp.gamma ** torch.arange(mdp.horizon, dtype=torch.float64)


def score(policy, tab, c: torch.Tensor) -> torch.Tensor:
    """E[Σ_t c_t ∇ℓ_t] for per-token coefficients c (N, L) that are functions of the response."""
    return exact.expected_score(policy, tab.enum, tab.prob[:, None] * c)


def roots(mdp: TokenMDP) -> torch.Tensor:
    """(P,) state index of each prompt's empty prefix."""
    return torch.arange(len(mdp.prompts)) * mdp.states_per_prompt


def collected_reward(tab) -> torch.Tensor:
    """(S,) C(s) = Σ_{k ≤ t} γ^(k-1) r_k along the prefix of s (t tokens), by a forward pass over the tree."""
    mdp = tab.mdp
    st_ = mdp.state_table()
    child, level = torch.as_tensor(st_["child"]), torch.as_tensor(st_["level"])
    C = torch.zeros(mdp.num_states, dtype=torch.float64)
    for lvl in range(mdp.horizon - 1):
        idx = torch.nonzero(level == lvl)[:, 0]
        ch = child[idx]                                                          # (n, V), −1 = terminal
        ok = ch >= 0
        C[ch[ok]] = (C[idx][:, None] + mdp.gamma**lvl * tab.r[idx])[ok]
    return C


# ------------------------------------------------------------------------------- §7 setup: the engine
@given(mdp_and_policy())
def test_probabilities_sum_to_one_per_prompt(case):
    """§7 setup: the enumeration is a distribution: Σ_y π(y|x) = 1 for every prompt and P(x, y) = ρ(x) π(y|x)."""
    mdp, pol = case
    tab = exact.tables(mdp, pol)
    rho = torch.as_tensor(mdp.prompt_probs)
    per_prompt = torch.zeros(len(mdp.prompts), dtype=torch.float64).index_add(0, tab.enum.prompt_idx, tab.prob)
    assert bool((tab.prob >= 0).all())
    assert_close(per_prompt, rho, what="Σ_y P(x, y) = ρ(x)")
    assert_close(tab.pi.sum(1), torch.ones(mdp.num_states), what="Σ_a π(a|s) = 1")


@given(mdp_and_policy())
def test_objective_is_root_value(case):
    """§7 setup: J = Σ_x ρ(x) U(root_x); J_prompt[x] = U(root_x); objective() agrees with tables()."""
    mdp, pol = case
    tab = exact.tables(mdp, pol)
    U_root = tab.U[roots(mdp)]
    assert_close(tab.J_prompt, U_root, what="J_x = U(root_x)")
    assert_close(tab.J, float(torch.as_tensor(mdp.prompt_probs) @ U_root), what="J = Σ_x ρ(x) U(root_x)")
    assert_close(exact.objective(mdp, pol).detach(), tab.J, what="objective() = tables().J")


@given(mdp_and_policy())
def test_visit_probabilities(case):
    """§7 setup (ρ(s)): the reach probability of a prefix state is Σ of P(y) over the responses through it."""
    mdp, pol = case
    tab = exact.tables(mdp, pol)
    enum = tab.enum
    s = mdp.state_index(enum.prompt_idx, enum.tokens)                            # (N, L)
    m = enum.mask.bool()
    through = torch.zeros(mdp.num_states, dtype=torch.float64).index_add(
        0, s[m], tab.prob[:, None].expand_as(enum.mask)[m])                      # a tree: each response visits s once
    assert_close(tab.visit, through, what="ρ(s) = Σ_{y through s} P(y)")


# ------------------------------------------------------------------------- §7 items 1–2: ∇J four ways
@given(mdp_and_policy(kinds=("tabular",)))
def test_gradient_autograd_equals_closed_form(case):
    """§7 item 2: for the tabular softmax, autograd ∇J = ρ(s) π(a|s) (U(s⊕a) − U(s)) (PAPER §2)."""
    mdp, pol = case
    tab = exact.tables(mdp, pol)
    assert_vec_close(exact.gradient(mdp, pol, tab.enum), tab.closed_form(), what="autograd vs closed form")


@given(mdp_and_policy())
def test_gradient_equals_score_function(case):
    """§7 item 1: ∇J = E[RM(y) Σ_t ∇ℓ_t], for both policies."""
    mdp, pol = case
    tab = exact.tables(mdp, pol)
    reinforce = score(pol, tab, tab.enum.rm[:, None].expand_as(tab.enum.mask))
    assert_vec_close(reinforce, exact.gradient(mdp, pol, tab.enum), what="score function vs autograd")


@given(mdp_and_policy())
def test_gradient_equals_tree_backward(case):
    """PAPER §2 closed form, any policy: ∂J/∂log π(a|s) = ρ(s) π(a|s) U(s⊕a), so ∇J is the
    vector-Jacobian product of the per-state log-probs with that table (parameter sharing included)."""
    mdp, pol = case
    tab = exact.tables(mdp, pol)
    params = [p for p in pol.parameters() if p.requires_grad]
    lp = exact.state_log_probs(mdp, pol)                                         # (S, V) with autograd
    vjp = torch.autograd.grad(lp, params, grad_outputs=tab.visit[:, None] * tab.pi * tab.Uc)
    assert_vec_close(exact.flat(vjp, params), exact.gradient(mdp, pol, tab.enum), what="tree backward vs autograd")


def central_differences(mdp, pol, directions: torch.Tensor, eps: float) -> torch.Tensor:
    """(K,) (J(θ + εd) − J(θ − εd)) / 2ε for each direction d, on a copy of the policy."""
    probe = copy.deepcopy(pol)
    params = [p for p in probe.parameters() if p.requires_grad]
    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
    enum = enumerate_responses(mdp)
    out = []
    with torch.no_grad():
        for d in directions:
            vals = []
            for sign in (1.0, -1.0):
                torch.nn.utils.vector_to_parameters(theta + sign * eps * d, params)
                vals.append(float(exact.objective(mdp, probe, enum)))
            out.append((vals[0] - vals[1]) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


@given(mdp_and_policy())
def test_gradient_matches_finite_differences(case):
    """§7 item 1: ∇J·d matches central finite differences along 3 random unit directions (fixed seed,
    JAX check_grads style). ε = 1e-5: truncation ~ε²|J'''| and round-off ~1e-16|J|/ε are both ≲ 1e-9."""
    mdp, pol = case
    grad = exact.gradient(mdp, pol)
    d = torch.randn(3, grad.numel(), generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    d /= d.norm(dim=1, keepdim=True)                                             # (3, D) unit directions
    assert_vec_close(central_differences(mdp, pol, d, 1e-5), d @ grad, kind="fd", what="∇J·d vs central differences")


# --------------------------------------------------------------------- §7 items 3–8: lemmas, theorems
@given(mdp_and_policy())
def test_lemma1_discounted_q(case):
    """§7 item 3 (Lemma 1, Eq. 4): E Σ_t γ^(t-1) Q(s_{t-1}, y_t) ∇ℓ_t = ∇J for every γ ∈ (0, 1]."""
    mdp, pol = case
    tab = exact.tables(mdp, pol)
    c = discounts(mdp)[None, :] * tab.along(tab.Q)                               # (N, L)
    assert_vec_close(score(pol, tab, c), exact.gradient(mdp, pol, tab.enum), what="Lemma 1")


@given(mdp_and_policy(), st.integers(0, 2**31 - 1))
def test_lemma2_state_baseline_has_zero_mean(case, seed):
    """§7 item 4 (Lemma 2): E Σ_t c(s_{t-1}) ∇ℓ_t = 0 for a random per-state table c, and adding it to
    Lemma 1's weights leaves ∇J unchanged."""
    mdp, pol = case
    tab = exact.tables(mdp, pol)
    table = torch.randn(mdp.num_states, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    base = tab.along(table)                                                      # (N, L) c(s_{t-1})
    assert_vec_close(score(pol, tab, base), torch.zeros(exact.gradient(mdp, pol, tab.enum).numel()),
                     what="Lemma 2: E Σ c(s) ∇ℓ")
    c = base + discounts(mdp)[None, :] * tab.along(tab.Q)
    assert_vec_close(score(pol, tab, c), exact.gradient(mdp, pol, tab.enum), what="Lemma 2 + Lemma 1")


@given(mdp_and_policy())
def test_theorem1_reinforce_with_prefix_values(case):
    """§7 item 5 (Theorem 1, Eq. 21): E Σ_t U(s_t) ∇ℓ_t = ∇J, and term by term
    E[RM ∇ℓ_t] = E[U(s_t) ∇ℓ_t] for every position t."""
    mdp, pol = case
    tab = exact.tables(mdp, pol)
    U_after = tab.along(tab.Uc)                                                  # (N, L) U(y_≤t), RM at the end
    assert_vec_close(score(pol, tab, U_after), exact.gradient(mdp, pol, tab.enum), what="Theorem 1")
    rm = tab.enum.rm[:, None] * tab.enum.mask                                    # (N, L)
    for t in range(mdp.horizon):
        only_t = torch.zeros_like(rm)
        only_t[:, t] = 1.0
        assert_vec_close(score(pol, tab, U_after * only_t), score(pol, tab, rm * only_t),
                         what=f"Theorem 1 at position t={t + 1}")


@given(mdp_and_policy())
def test_theorem2_advantage_form(case):
    """§7 item 6 (Theorem 2, Eq. 28): E Σ_t (U(s_t) − U(s_{t-1})) ∇ℓ_t = ∇J, and pathwise on every
    enumerated response U(s_t) − U(s_{t-1}) = γ^(t-1) (Q_t − V(s_{t-1})) in both decompositions."""
    mdp, pol = case
    tab = exact.tables(mdp, pol)
    delta = tab.along(tab.Uc) - tab.along(tab.U)                                 # (N, L)
    assert_vec_close(score(pol, tab, delta), exact.gradient(mdp, pol, tab.enum), what="Theorem 2")
    for t_ in (tab, exact.tables(mdp.zra(), pol)):
        assert_close(delta, discounts(mdp)[None, :] * t_.along(t_.A), what="U(s_t) − U(s_{t-1}) = γ^(t-1) A_t")


@given(mdp_and_policy())
def test_telescoping(case):
    """§7 item 8: Σ_t (U(s_t) − U(s_{t-1})) = Σ_t γ^(t-1) A_t = RM(y) − U(root) for every response."""
    mdp, pol = case
    tab = exact.tables(mdp, pol)
    expected = tab.enum.rm - tab.U[roots(mdp)][tab.enum.prompt_idx]             # (N,)
    assert_close((tab.along(tab.Uc) - tab.along(tab.U)).sum(1), expected, what="Σ_t ΔU")
    assert_close((discounts(mdp)[None, :] * tab.along(tab.A)).sum(1), expected, what="Σ_t γ^(t-1) A_t")


@given(mdp_and_policy(gamma=1.0))
def test_telescoping_undiscounted_advantages(case):
    """§7 item 8 as stated (γ = 1): Σ_t A_t = RM(y) − U(w_0) pathwise."""
    mdp, pol = case
    tab = exact.tables(mdp, pol)
    assert_close(tab.along(tab.A).sum(1), tab.enum.rm - tab.U[roots(mdp)][tab.enum.prompt_idx], what="Σ_t A_t")


@given(mdp_and_policy())
def test_decomposition_invariance(case):
    """§7 item 7: true token rewards vs the ZRA decomposition of the same RM give the same RM, J, ∇J
    and A (every pair), while V differs: V(s) = (U(s) − C(s)) / γ^t with C(s) the discounted reward
    already collected on the t-token prefix of s (C = 0 under ZRA), so V_ZRA(s) − V(s) = C(s)/γ^t."""
    mdp, pol = case
    true, zra = exact.tables(mdp, pol), exact.tables(mdp.zra(), pol)
    assert_close(zra.enum.rm, true.enum.rm, what="RM")
    assert_close(zra.J, true.J, what="J")
    assert_vec_close(exact.gradient(mdp.zra(), pol), exact.gradient(mdp, pol), what="∇J")
    assert_close(zra.A, true.A, what="A")
    level = torch.as_tensor(mdp.state_table()["level"])
    g_t = mdp.gamma ** level.to(torch.float64)                                   # (S,) γ^t
    C = collected_reward(true)
    assert_close(true.V, (true.U - C) / g_t, what="V = (U − C)/γ^t")
    assert_close(zra.V, zra.U / g_t, what="V_ZRA = U/γ^t")
    # The stated margin: a level-1 state reached by a non-EOS first token a has C = r(root, a), so
    # max_s |V_ZRA − V| ≥ max |r(root, a)| over those a; positive for dense Gaussian rewards (H ≥ 2).
    if mdp.additive and mdp.horizon >= 2:
        child = torch.as_tensor(mdp.state_table()["child"])[roots(mdp)]          # (P, V)
        margin = float(true.r[roots(mdp)].abs().masked_fill(child < 0, 0.0).max())
        assert float((zra.V - true.V).abs().max()) >= margin * (1 - 1e-10)
        if "sparse" not in mdp.name:
            assert margin > 0.0
    else:                                                                        # no intermediate rewards
        assert_close(zra.V, true.V, what="V (response-level MDP: already ZRA)")


# ------------------------------------------------------------------------------- naive references
def token_reward(x: int, prefix: tuple, a: int) -> float:
    """A deterministic, position- and history-dependent token reward r(x, y_<t, a)."""
    h = sum((i + 1.7) * (t + 0.3) for i, t in enumerate(prefix))
    return math.sin(1.3 + 2.1 * x + h + 0.7 * a * (len(prefix) + 1))


def response_reward(x: int, y: tuple) -> float:
    """A non-additive RM: 1 if all tokens differ, plus a bonus that depends on the maximum token."""
    return float(len(set(y)) == len(y)) + 0.25 * max(y) - 0.1 * x


def naive_tables(mdp: TokenMDP, policy) -> dict:
    """U, Uc, V, Q, visit of every (prompt, prefix) by plain recursion over prefixes (PAPER §1–2).

    Uses only the MDP's definition (responses end at EOS or H; RM = Σ γ^(t-1) r_t or the response
    callable with the ZRA decomposition r_T = RM/γ^(T-1)) and one ``log_probs`` call per prefix."""
    V_, H, eos, g = mdp.vocab_size, mdp.horizon, mdp.eos, mdp.gamma
    out = {k: {} for k in ("U", "Uc", "V", "Q", "visit", "pi")}

    def pi(x, prefix):
        toks = torch.tensor([list(prefix) + [0]])
        return policy.log_probs(torch.tensor([x]), toks)[0, len(prefix)].exp().detach()

    def rm(x, y):
        if mdp.additive:
            return sum(g**t * mdp.token_rewards(x, y[:t], y[t]) for t in range(len(y)))
        return mdp.response_rewards(x, y)

    def r(x, prefix, a, terminal):
        if mdp.additive:
            return mdp.token_rewards(x, prefix, a)
        return rm(x, prefix + (a,)) / g ** len(prefix) if terminal else 0.0

    def visit(x, prefix, reach):
        p = pi(x, prefix)
        key = (x, prefix)
        out["visit"][key], out["pi"][key] = reach, p
        U = V = 0.0
        Q, Uc = [], []
        for a in range(V_):
            y = prefix + (a,)
            terminal = a == eos or len(y) == H
            if terminal:
                uc, v_next = rm(x, y), 0.0
            else:
                uc, v_next = visit(x, y, reach * float(p[a]))
            Q.append(r(x, prefix, a, terminal) + g * v_next)
            Uc.append(uc)
            U += float(p[a]) * uc
            V += float(p[a]) * Q[-1]
        out["U"][key], out["V"][key], out["Q"][key], out["Uc"][key] = U, V, Q, Uc
        return U, V

    for x, rho in enumerate(mdp.prompt_probs):
        visit(x, (), float(rho))
    return out


NAIVE_CASES = [  # (V, H, eos, prompts, γ, reward form)
    (3, 3, 2, [(0,), ()], 0.8, "token"),
    (3, 3, 0, [(1, 2)], 1.0, "token"),
    (2, 3, None, [(), (1,)], 0.6, "response"),
    (3, 2, 2, [(1,), (0, 0)], 0.9, "response"),
    (2, 4, 1, [()], 1.0, "token"),
]


@pytest.mark.parametrize("case", NAIVE_CASES)
@pytest.mark.parametrize("kind", ["tabular", "loglinear"])
def test_tables_match_naive_recursion(case, kind):
    """The vectorised level-by-level tables (U, U(s⊕a), V, Q, ρ(s), π) equal a plain recursive
    implementation over (prompt, prefix) pairs on tiny MDPs with callable rewards."""
    V_, H, eos, prompts, gamma, form = case
    rewards = dict(token_rewards=token_reward) if form == "token" else dict(response_rewards=response_reward)
    mdp = TokenMDP(prompts, V_, H, eos, gamma, prompt_probs=np.linspace(1, 2, len(prompts)) / np.linspace(
        1, 2, len(prompts)).sum(), **rewards)
    pol = TabularSoftmax(mdp, seed=3) if kind == "tabular" else LogLinear(mdp, seed=3)
    tab, ref = exact.tables(mdp, pol), naive_tables(mdp, pol)
    assert len(ref["U"]) == mdp.num_states
    for s in range(mdp.num_states):
        key = mdp.prefix_of(s)
        for name in ("U", "V", "visit"):
            assert_close(getattr(tab, name)[s], ref[name][key], what=f"{name}{key}")
        for name in ("Q", "Uc", "pi"):
            assert_close(getattr(tab, name)[s], torch.as_tensor(ref[name][key], dtype=torch.float64), what=f"{name}{key}")


def itertools_responses(mdp: TokenMDP) -> list[tuple[int, tuple]]:
    """Every (prompt, response): length-H sequences without EOS, or EOS-terminated shorter ones."""
    V_, H, eos = mdp.vocab_size, mdp.horizon, mdp.eos
    out = []
    for x in range(len(mdp.prompts)):
        for T in range(1, H + 1):
            for y in itertools.product(range(V_), repeat=T):
                ends = y[-1] == eos or T == H
                if ends and eos not in y[:-1]:
                    out.append((x, y))
    return out


@pytest.mark.parametrize("V_,H,eos,prompts", [(3, 3, 2, [(0,), ()]), (3, 2, 0, [(1,)]), (2, 4, None, [(), (1,), (0, 1)]),
                                              (4, 2, 1, [(3,)]), (2, 3, 1, [(0,)])])
def test_enumeration_matches_itertools(V_, H, eos, prompts):
    """enumerate_responses lists every response exactly once (vs itertools.product), zero-padded, with
    the right mask, prompt and RM (the additive callable summed with γ^(t-1))."""
    mdp = TokenMDP(prompts, V_, H, eos, 0.7, token_rewards=token_reward)
    enum = enumerate_responses(mdp)
    lengths = enum.mask.sum(1).long().tolist()
    got = [(x, tuple(row[:n])) for x, row, n in zip(enum.prompt_idx.tolist(), enum.tokens.tolist(), lengths)]
    expected = itertools_responses(mdp)
    assert len(got) == len(set(got)) == mdp.num_responses
    assert set(got) == set(expected)
    assert all(all(v == 0 for v in row[n:]) for row, n in zip(enum.tokens.tolist(), lengths))
    assert torch.equal(enum.mask, (torch.arange(H)[None, :] < torch.tensor(lengths)[:, None]).double())
    rm = [sum(0.7**t * token_reward(x, y[:t], y[t]) for t in range(len(y))) for x, y in got]
    assert_close(enum.rm, torch.tensor(rm, dtype=torch.float64), what="RM")


@given(mdp_and_policy())
def test_state_log_probs_matches_per_state_calls(case):
    """state_log_probs (one batched call per level) equals log_probs evaluated at each state's prefix."""
    mdp, pol = case
    table = exact.state_log_probs(mdp, pol)
    for s in range(mdp.num_states):
        x, prefix = mdp.prefix_of(s)
        row = pol.log_probs(torch.tensor([x]), torch.tensor([list(prefix) + [0]]))[0, len(prefix)]
        assert_close(table[s], row, what=f"log π(·|{prefix}) of prompt {x}")


@given(mdps())
def test_zra_keeps_rm_and_moves_reward_to_last_token(mdp):
    """PAPER §1.4: mdp.zra() has the same RM on every response and token rewards 0 before the last
    token, r_T = RM/γ^(T-1); a response-level MDP is its own ZRA form."""
    z = mdp.zra()
    a, b = enumerate_responses(mdp), enumerate_responses(z)
    assert_close(b.rm, a.rm, what="RM")
    T = b.mask.sum(1).long()
    last = torch.zeros_like(b.mask).scatter_(1, (T - 1)[:, None], 1.0)             # (N, L) one-hot of y_T
    assert_close(b.token_rewards, last * (b.rm / mdp.gamma ** (T - 1).double())[:, None], what="ZRA rewards")
    assert z.additive is False and (z is mdp) == (not mdp.additive)


def test_engine_refuses_a_policy_for_another_mdp_or_without_parameters():
    """DESIGN §5: exact computations check that the policy fits the MDP and has parameters to differentiate."""
    from tpg.mdp import TPGError
    mdp = TokenMDP([(0,)], 3, 2, 2, token_rewards=token_reward)
    other = TokenMDP([(0,)], 3, 3, 2, token_rewards=token_reward)
    with pytest.raises(TPGError, match=r"the policy was built for a different MDP structure"):
        exact.gradient(mdp, TabularSoftmax(other))
    frozen = TabularSoftmax(mdp).requires_grad_(False)
    with pytest.raises(TPGError, match=r"TabularSoftmax has no parameters that require grad"):
        exact.gradient(mdp, frozen)
