"""The keyed route (``tpg.batches.KeyedGroups``): exact group moments at practitioners' G.

- Where both run (G ≤ 4), keyed and multiset routes agree to 1e-12 in E[ĝ] and tr Cov[ĝ], for
  every group estimator and aggregation (token-mean needs the length in the others' key, which the
  key probe finds by itself).
- At G = 16 and 64 the answers match independent closed forms: RLOO = ∇J, mean-only GRPO =
  (1 − 1/G)∇J, Dr. GRPO = (1 − 1/G)/H ∇J on fixed-length responses, std-GRPO with binary rewards =
  κ(p, G)∇J with κ from ``grpo_kappa`` (a binomial sum written without the estimator code).
- A user estimator that reads more than its key (another member's tokens) is detected by the
  key probe and routed through multisets; the answer equals the multiset route's.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import assert_close, assert_vec_close
from tpg import TabularSoftmax, TokenMDP, estimator, exact, random_mdp, register_advantage, report
from tpg.batches import PropertyError
from tpg.mdp import BudgetError
from tpg.claims.oracles import grpo_kappa

GROUP_ESTIMATORS = [("grpo", {}), ("grpo", {"std": False}), ("rloo", {}), ("drgrpo", {}),
                    ("grpo", {"agg": "token-mean"}), ("rloo", {"agg": "seq-mean-token-mean"}),
                    ("reinforce_pp_baseline", {})]


@pytest.mark.parametrize("reward", ["binary", "sparse"])
@pytest.mark.parametrize("name,opts", GROUP_ESTIMATORS, ids=[f"{n}-{o}" for n, o in GROUP_ESTIMATORS])
def test_keyed_equals_multiset_where_both_run(reward, name, opts):
    mdp = random_mdp(2, vocab_size=3, horizon=3, eos=True, reward=reward, n_prompts=2, prompt_probs=[0.4, 0.6])
    pol = TabularSoftmax(mdp, seed=2)
    est = estimator(name, **opts)
    for G in (2, 3, 4):
        k = exact.moments(est, mdp, pol, G, route="keyed", cov="trace")
        m = exact.moments(est, mdp, pol, G, route="multiset", cov="trace")
        assert k.route == "keyed"
        assert_vec_close(k.mean, m.mean, what=f"{name} G={G} mean")
        assert_close(k.cov_trace, m.cov_trace, what=f"{name} G={G} tr Cov")


def fixed_length_binary(H: int = 9, seed: int = 0) -> TokenMDP:
    """V = 3 without EOS (3^9 = 19,683 responses), RM ∈ {0, 1} from a terminal-pair table."""
    shape = TokenMDP(prompts=[[]], vocab_size=3, horizon=H, response_rewards=np.zeros(((3**H - 1) // 2, 3)))
    rng = np.random.default_rng(seed)
    return TokenMDP(prompts=[[]], vocab_size=3, horizon=H,
                    response_rewards=rng.choice([0.0, 1.0], size=(shape.num_states, 3), p=[0.6, 0.4]))


@pytest.mark.parametrize("G", [16, 64])
def test_large_groups_match_closed_forms(G):
    mdp = fixed_length_binary()
    pol = TabularSoftmax(mdp, seed=1)
    grad = exact.gradient(mdp, pol)
    p = exact.tables(mdp, pol).J                                                  # success rate
    cases = {"rloo": (estimator("rloo"), 1.0),
             "mean-only grpo": (estimator("grpo", std=False), 1 - 1 / G),
             "drgrpo": (estimator("drgrpo"), (1 - 1 / G) / mdp.horizon),
             "std grpo": (estimator("grpo"), grpo_kappa(p, G, 1e-6))}
    for what, (est, c) in cases.items():
        mo = exact.moments(est, mdp, pol, G)
        assert mo.route == "keyed", (what, mo.notes)
        assert_vec_close(mo.mean, c * grad, what=f"{what} at G={G}: E[ĝ] = {c:.6g}·∇J")


def test_keyed_covariance_matches_the_joint_route():
    mdp = random_mdp(5, vocab_size=2, horizon=3, eos=False, reward="binary")
    pol = TabularSoftmax(mdp, seed=5)
    for est in (estimator("grpo"), estimator("rloo", agg="token-mean")):
        k = exact.moments(est, mdp, pol, 3, route="keyed", cov="trace")
        j = exact.moments(est, mdp, pol, 3, route="joint", cov="trace")
        assert_close(k.cov_trace, j.cov_trace, what=f"{est.name} tr Cov keyed vs joint")


def test_an_estimator_reading_more_than_its_key_is_routed_safely():
    """The baseline is the mean reward of the OTHER members plus 0.1 × their first token: the key
    (reward) is not sufficient. The key probe catches it (the note says so) and the multiset route
    runs; the verdict equals the multiset route's and the independent RLOO-style analysis: the
    baseline excludes y_i, so the estimator is unbiased."""
    mdp = random_mdp(3, vocab_size=3, horizon=3, eos=True, reward="binary")
    pol = TabularSoftmax(mdp, seed=3)

    @register_advantage("user_peek_others", local=True, exchangeable=True, overwrite=True)
    def peek(ro):
        from tpg.estimators.core import segment_sum
        n = int(ro.group.max()) + 1
        cnt = segment_sum(torch.ones_like(ro.rm), ro.group, n)[ro.group]
        x = ro.rm + 0.1 * ro.tokens[:, 0].to(torch.float64)
        others = (segment_sum(x, ro.group, n)[ro.group] - x) / (cnt - 1)
        return ro.rm - others
    est = estimator("user_peek_others", loss="pg")
    with pytest.raises(PropertyError, match="same key"):
        exact.moments(est, mdp, pol, 3, route="keyed")
    G = 7                                                       # big enough that route="auto" tries the keyed route
    auto = exact.moments(est, mdp, pol, G)
    assert auto.route == "multiset" and any("keyed route" in n and "refused" in n for n in auto.notes), auto.notes
    assert_vec_close(auto.mean, exact.gradient(mdp, pol), what="unbiased (the baseline excludes y_i)")
    assert report(est, mdp, pol, 3).verdict == "unbiased"


def test_keyed_refusal_names_its_size():
    mdp = fixed_length_binary(H=6)
    pol = TabularSoftmax(mdp, seed=1)
    with pytest.raises(BudgetError, match="keyed"):
        exact.moments(estimator("grpo"), mdp, pol, 64, route="keyed", cov="trace", budget=1000)
    assert math.isfinite(exact.moments(estimator("grpo"), mdp, pol, 64).mean.norm().item())


@pytest.mark.parametrize("name,opts", GROUP_ESTIMATORS, ids=[f"{n}-{o}" for n, o in GROUP_ESTIMATORS])
def test_keyed_with_two_prompt_slots_equals_multiset(name, opts):
    """Two prompt draws per batch (batch-level whitening and token-mean couple them): keys per
    prompt, every configuration of the other slot enumerated; the mean equals the multiset route's."""
    mdp = random_mdp(2, vocab_size=3, horizon=2, eos=True, reward="binary", n_prompts=2, prompt_probs=[0.4, 0.6])
    pol = TabularSoftmax(mdp, seed=2)
    est = estimator(name, **opts)
    for G in (2, 3):
        k = exact.moments(est, mdp, pol, G, n_prompts=2, route="keyed")
        m = exact.moments(est, mdp, pol, G, n_prompts=2, route="multiset")
        assert k.route == "keyed" and k.cov_trace is None
        assert_vec_close(k.mean, m.mean, what=f"{name} G={G}, 2 slots")


def test_two_prompt_slots_at_G16_match_closed_forms():
    """Binary rewards, prompts of different difficulty, 2 draws per batch, G = 16: RLOO = ∇J and
    mean-only GRPO = (1 − 1/G)∇J (the group mean includes the sample; the other slot is independent)."""
    from tpg.claims.base import binary_mdp
    mdp = binary_mdp(0, (6, 3))
    pol = TabularSoftmax(mdp, seed=0)
    grad = exact.gradient(mdp, pol)
    for est, c in ((estimator("rloo"), 1.0), (estimator("grpo", std=False), 1 - 1 / 16)):
        mo = exact.moments(est, mdp, pol, 16, n_prompts=2)
        assert mo.route == "keyed", mo.notes
        assert_vec_close(mo.mean, c * grad, what=f"{est.name}: E[ĝ] = {c}·∇J")
