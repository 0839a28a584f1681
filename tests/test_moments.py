"""Exact moments of estimators (``tpg.exact.moments``) and the bring-your-own-estimator report.

- The multiset route (each group an unordered multiset with its multinomial probability) and the
  joint route (ordered G-tuples) agree for every kind of estimator in the registry, one prompt draw
  or two per batch, and for a plain user callable.
- E[ĝ] and Cov[ĝ] equal a hand enumeration of every ordered batch, each ĝ computed by autograd of
  the estimator's loss on the policy's parameters (no coefficients, no ExactDraws, no multisets).
- Jobs above the budget are refused with their size before anything is allocated.
- A user estimator (a plain callable returning a loss) with an action-dependent "baseline" is
  reported biased, with its bias vector equal to a hand-derived closed form.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close, assert_vec_close
from tpg import KL, estimator, exact, random_mdp, report, scores
from tpg import batches
from tpg.batches import batch_outcomes
from tpg.draws import TableCritic, perturbed_critic
from tpg.mdp import BudgetError, TPGError
from tpg.policies import LogLinear, TabularSoftmax, make_policy
from tpg.rollouts import enumerate_responses



@pytest.fixture(scope="module")
def small():
    """Two prompts, V = 3 with EOS, H = 2: 7 responses per prompt."""
    mdp = random_mdp(11, vocab_size=3, horizon=2, eos=True, n_prompts=2)
    return mdp, TabularSoftmax(mdp, seed=11)


def user_group_mean(ro):
    """A user estimator (plain callable): A_i = R_i − mean of its group INCLUDING itself, seq-mean."""
    n = int(ro.group.max()) + 1
    cnt = torch.zeros(n, dtype=torch.float64).index_add(0, ro.group, torch.ones_like(ro.rm))
    mean = torch.zeros(n, dtype=torch.float64).index_add(0, ro.group, ro.rm) / cnt
    per_batch = torch.zeros(ro.n_batches, dtype=torch.float64).index_add(0, ro.batch, torch.ones_like(ro.rm))
    adv = (ro.rm - mean[ro.group]) / per_batch[ro.batch]                       # (B,) 1/B per batch
    return -(adv[:, None] * ro.logp * ro.mask).sum()


def configs(mdp, policy):
    """(label, estimator, G, moments kwargs): one of every kind (advantage × loss × aggregation × KL ×
    extra draws) that the exact engine handles."""
    tab = exact.tables(mdp, policy)
    wrong = perturbed_critic(tab, bias=0.2, noise=0.4, seed=1)
    ref = LogLinear(mdp, seed=5)
    old = TabularSoftmax(mdp, seed=12)
    b = TableCritic(mdp, torch.randn(mdp.num_states, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    return [
        ("reinforce pg", estimator("reinforce", loss="pg"), 2, {}),
        ("reinforce_oracle γ", estimator("reinforce_oracle", gamma=0.7), 2, {}),
        ("state baseline", estimator("baseline", baseline=b), 2, {}),
        ("grpo std", estimator("grpo"), 3, {}),
        ("grpo mean-only token-mean", estimator("grpo", std=False, agg="token-mean"), 3, {}),
        ("drgrpo", estimator("drgrpo"), 2, {}),
        ("rloo token-sum", estimator("rloo", agg="token-sum"), 3, {}),
        ("rloo seq-mean-token-mean", estimator("rloo", agg="seq-mean-token-mean"), 2, {}),
        ("remax", estimator("remax"), 2, {}),
        ("reinforce++", estimator("reinforce_pp"), 2, {}),
        ("reinforce++ baseline", estimator("reinforce_pp_baseline"), 2, {}),
        ("gae λ=0.5 whitened", estimator("gae", lam=0.5, whiten=True), 2, {"critic": wrong}),
        ("KL k3 in reward", estimator("rloo", kl=KL(0.2, "k3", "reward")), 2, {"ref": ref}),
        ("KL k2 in loss", estimator("grpo", kl=KL(0.2, "k2", "loss")), 2, {"ref": ref}),
        ("ppo dual clip, θ ≠ θ_old", estimator("rloo", dual_clip=3.0), 2, {"old_policy": old}),
        ("trepo all K=2", estimator("trepo", variant="all", K=2), 2, {}),
        ("trepo interp", estimator("trepo", variant="interp", anchors={"kind": "fixed", "positions": [1]}), 2, {}),
        ("trepo chunk", estimator("trepo", variant="chunk", anchors={"kind": "every", "k": 1}), 2, {}),
        ("trepo value_interp self-incl.", estimator("trepo", variant="value_interp", self_inclusive=True,
                                                    anchors={"kind": "fixed", "positions": [1]}), 2, {}),
        ("trepo subset (G=1)", estimator("trepo", variant="subset", anchors={"kind": "bernoulli", "q": 0.4}), 1, {}),
        ("vineppo unwhitened", estimator("vineppo", K=3, step=1, whiten=False), 2, {}),
        ("user callable", user_group_mean, 3, {}),
    ]


CONFIG_LABELS = [c[0] for c in configs(random_mdp(0, vocab_size=3, horizon=2, eos=True, n_prompts=2),
                                       TabularSoftmax(random_mdp(0, vocab_size=3, horizon=2, eos=True, n_prompts=2)))]


@pytest.mark.parametrize("label", CONFIG_LABELS)
def test_multiset_and_joint_routes_agree(small, label):
    mdp, pol = small
    _, est, G, kw = next(c for c in configs(mdp, pol) if c[0] == label)
    ms = exact.moments(est, mdp, pol, G, route="multiset", cov="trace", **kw)
    jt = exact.moments(est, mdp, pol, G, route="joint", cov="trace", **kw)
    assert_vec_close(ms.mean, jt.mean, what=f"{label}: E[ĝ] multiset vs joint")
    if ms.cov_trace is not None:
        assert_close(ms.cov_trace, jt.cov_trace, what=f"{label}: tr Cov multiset vs joint")
    assert ms.n_outcomes <= jt.n_outcomes


@pytest.mark.parametrize("label", ["grpo std", "rloo token-sum", "grpo mean-only token-mean", "user callable"])
def test_routes_agree_with_two_prompt_draws_per_batch(small, label):
    mdp, pol = small
    _, est, _, kw = next(c for c in configs(mdp, pol) if c[0] == label)
    ms = exact.moments(est, mdp, pol, 2, n_prompts=2, route="multiset", cov="trace", **kw)
    jt = exact.moments(est, mdp, pol, 2, n_prompts=2, route="joint", cov="trace", **kw)
    assert_vec_close(ms.mean, jt.mean, what=f"{label}, n_prompts=2")
    assert_close(ms.cov_trace, jt.cov_trace, what=f"{label}, n_prompts=2: tr Cov")


@pytest.mark.parametrize("route", ["multiset", "joint"])
@pytest.mark.parametrize("n_prompts", [1, 2])
def test_batch_outcomes_are_a_distribution(small, route, n_prompts):
    mdp, pol = small
    tab = exact.tables(mdp, pol)
    ids, probs = batch_outcomes(tab, 3, n_prompts, route)
    assert_close(probs.sum(), 1.0)
    per_prompt = [7, 7]                                                          # responses of each prompt
    groups = sum(math.comb(n + 2, 3) if route == "multiset" else n**3 for n in per_prompt)
    assert ids.shape == (groups**n_prompts, 3 * n_prompts)


# ====================================================================================== by hand
def hand_moments(est, mdp, policy, batches):
    """E[ĝ], Cov[ĝ] over explicitly listed batches [(prob, rows, groups)], ĝ = −∇loss by autograd."""
    enum = enumerate_responses(mdp)
    params = [p for p in policy.parameters()]
    gs, ps = [], []
    for prob, rows, groups in batches:
        ro = enum.select(torch.tensor(rows), group=torch.tensor(groups), batch=torch.zeros(len(rows), dtype=torch.long),
                         n_batches=1).score(policy)
        out = est(ro)
        loss = out if torch.is_tensor(out) else out.loss
        gs.append(-exact.flat(torch.autograd.grad(loss, params, allow_unused=True), params))
        ps.append(prob)
    g, p = torch.stack(gs), torch.tensor(ps, dtype=torch.float64)               # (n, D), (n,)
    mean = p @ g
    cov = (g - mean).T @ ((g - mean) * p[:, None])
    return mean, cov, float(p.sum())


@pytest.mark.parametrize("name", ["grpo", "rloo", "user"])
def test_moments_equal_a_hand_enumeration_of_ordered_pairs(name):
    """V = 2 without EOS, H = 2: 4 responses, 16 ordered groups of G = 2, each with P = π(y)π(y')."""
    mdp = random_mdp(3, vocab_size=2, horizon=2, eos=False)
    pol = TabularSoftmax(mdp, seed=3)
    est = {"grpo": estimator("grpo"), "rloo": estimator("rloo", agg="token-mean"), "user": user_group_mean}[name]
    pi = exact.tables(mdp, pol).prob                                             # (4,)
    batches = [(float(pi[i] * pi[j]), [i, j], [0, 0]) for i in range(4) for j in range(4)]
    mean, cov, total = hand_moments(est, mdp, pol, batches)
    assert_close(total, 1.0)
    mo = exact.moments(est, mdp, pol, 2, cov="full")
    assert_vec_close(mo.mean, mean, what="E[ĝ] vs hand")
    assert_vec_close(mo.cov, cov, what="Cov[ĝ] vs hand")
    assert_close(mo.cov_trace, float(torch.trace(cov)), what="tr Cov vs hand")


def test_two_prompt_draws_per_batch_equal_a_hand_enumeration():
    """n_prompts = 2, G = 1, token-mean aggregation (which couples the two rows of a batch): every
    ordered pair of (prompt, response) draws with P = ρ(x)π(y|x)·ρ(x')π(y'|x')."""
    mdp = random_mdp(8, vocab_size=2, horizon=2, eos=True, n_prompts=2, prompt_probs=[0.3, 0.7])
    pol = TabularSoftmax(mdp, seed=8)
    est = estimator("reinforce", agg="token-mean")
    prob = exact.tables(mdp, pol).prob                                           # (N,) ρ(x)π(y|x)
    N = len(prob)
    batches = [(float(prob[i] * prob[j]), [i, j], [0, 1]) for i in range(N) for j in range(N)]
    mean, cov, total = hand_moments(est, mdp, pol, batches)
    assert_close(total, 1.0)
    mo = exact.moments(est, mdp, pol, 1, n_prompts=2, cov="full")
    assert_vec_close(mo.mean, mean, what="E[ĝ] vs hand (n_prompts=2)")
    assert_vec_close(mo.cov, cov, what="Cov[ĝ] vs hand (n_prompts=2)")


def test_projected_covariance_equals_the_full_one_projected(small):
    mdp, pol = small
    D = mdp.num_states * mdp.vocab_size
    u = torch.randn(3, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = exact.moments(estimator("rloo"), mdp, pol, 2, cov="full")
    proj = exact.moments(estimator("rloo"), mdp, pol, 2, cov="full", directions=u)
    assert_vec_close(proj.cov, u @ full.cov @ u.T, what="projected Cov")
    assert_vec_close(proj.mean, full.mean, what="the mean stays full-dimensional")


@pytest.mark.parametrize("kind", ["tabular", "loglinear", "gpt2"])
def test_projected_scores_large_job_route_equals_the_jacobian_route(kind):
    """Above the budget, directional scores by double backward; below it, the projected Jacobian."""
    if kind == "gpt2":
        pytest.importorskip("transformers")
    mdp = random_mdp(2, vocab_size=3, horizon=2, eos=True)
    pol = make_policy(kind, mdp, 2, **({"n_layer": 1, "n_embd": 8} if kind == "gpt2" else {}))
    enum = enumerate_responses(mdp)
    D = sum(p.numel() for p in pol.parameters())
    u = torch.randn(2, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    jac = scores.projected_scores(pol, enum, u)                                   # token_scores route
    big = scores.projected_scores(pol, enum, u, budget=0)                         # double-backward route
    assert_vec_close(big, jac, what=f"{kind}: directional scores")
    assert_vec_close(jac, scores.token_scores(pol, enum) @ u.T, what=f"{kind}: vs token_scores")
    assert_vec_close(scores.projected_scores(pol, enum, u, budget=0, chunk=3), jac, what=f"{kind}: chunked")


def test_continuation_estimators_get_no_covariance_and_say_so(small):
    mdp, pol = small
    mo = exact.moments(estimator("trepo", variant="all", K=2), mdp, pol, 1, cov="trace")
    assert mo.cov_trace is None and any("no covariance" in n for n in mo.notes)


def test_bad_cov_option_is_a_user_error(small):
    mdp, pol = small
    with pytest.raises(TPGError, match="cov must be"):
        exact.moments(estimator("rloo"), mdp, pol, 2, cov="diag")


# ====================================================================================== budgets
def test_jobs_above_the_budget_are_refused_before_allocating(monkeypatch):
    mdp = random_mdp(0, vocab_size=4, horizon=4, eos=True)                      # 3^4 + 1 + 3 + 9 + 27 = 121
    pol = TabularSoftmax(mdp)
    assert mdp.num_responses == 121

    def boom(*a, **k):
        raise AssertionError("batches were enumerated before the budget check")
    monkeypatch.setattr(batches, "multisets", boom)
    monkeypatch.setattr(batches.np, "meshgrid", boom)
    with pytest.raises(BudgetError) as e:
        exact.moments(estimator("grpo"), mdp, pol, 8)
    assert f"{math.comb(121 + 7, 8) * 8:,}" in str(e.value) and "Monte Carlo" in str(e.value)
    with pytest.raises(BudgetError) as e:
        exact.moments(estimator("grpo"), mdp, pol, 30, route="joint")
    assert f"{121**30 * 30:.2e}" in str(e.value)                                # past 1e50: a float, never a big integer
    with pytest.raises(BudgetError) as e:                                       # O(1): 10^8 prompt slots, no hang
        exact.moments(estimator("grpo"), mdp, pol, 2, n_prompts=10**8)
    assert "e+" in str(e.value)
    with pytest.raises(BudgetError):
        exact.moments(estimator("grpo"), mdp, pol, 2, budget=100)               # C(122, 2)·2 > 100


def test_token_score_jacobian_budget():
    mdp = random_mdp(0, vocab_size=3, horizon=3, eos=True)
    with pytest.raises(BudgetError, match="score Jacobian"):
        scores.token_scores(TabularSoftmax(mdp), enumerate_responses(mdp), budget=10)


# ====================================================================================== bring your own estimator
def test_user_estimator_with_an_action_dependent_baseline_is_biased_by_the_hand_formula():
    """A 'baseline' b(s_{t−1}, w_t) that reads the action is not a baseline. With G = 1 the update is
    (RM − b(s, w_t))∇ℓ_t summed over t, so the bias is −E Σ_t b(s_{t−1}, w_t)∇ℓ_t. For the tabular
    softmax ∇ℓ_t = e_{s,w_t} − π(·|s) in block s, hence, for every (s, a),

        bias[s, a] = −ρ(s) Σ_w π(w|s) b(s, w) (1[w = a] − π(a|s)) = −ρ(s) π(a|s) (b(s, a) − b̄(s)),

    with b̄(s) = Σ_w π(w|s) b(s, w) and ρ(s) the reach probability."""
    mdp = random_mdp(4, vocab_size=3, horizon=3, eos=True)
    pol = TabularSoftmax(mdp, seed=4)
    b = torch.randn(mdp.num_states, mdp.vocab_size, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def action_baseline(ro):
        s = mdp.state_index(ro.prompt_idx, ro.tokens, ro.mask)                   # (B, L)
        adv = (ro.rm[:, None] - b[s, ro.tokens]) * ro.mask                       # (B, L) reads w_t
        return -(adv * ro.logp).sum()                                            # G = 1: one row per batch

    rep = report(action_baseline, mdp, pol, 1)
    assert rep.verdict == "biased" and rep.rel_bias > 1e-3 and rep.name == "action_baseline"
    tab = exact.tables(mdp, pol)
    want = -tab.visit[:, None] * tab.pi * (b - (tab.pi * b).sum(1, keepdim=True))  # (S, V)
    assert_vec_close(rep.bias, want.reshape(-1), what="bias vs hand formula")


def test_user_estimator_with_a_self_inclusive_group_mean_is_scaled_by_one_minus_one_over_G(small):
    """E[(R_i − (R_i + Σ_{j≠i} R_j)/G) ∇log p_i] = (1 − 1/G)∇J: the other members are independent of
    y_i and E[∇log p_i] = 0."""
    mdp, pol = small
    rep = report(user_group_mean, mdp, pol, 3)
    assert rep.verdict == "scaled"
    assert_close(rep.scale, 1 - 1 / 3, what="c")
