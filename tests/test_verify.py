"""Verdicts (``tpg.verify.report`` / ``verdict_of``) and designed Monte Carlo checks (``mc_check``).

Exact part: the verdict thresholds (unbiased / scaled / biased / inconclusive) on constructed
vectors, and the report's fields.

Monte Carlo part (marked ``mc``), DESIGN §4: the sampler path end to end (``tpg.rollouts.sample`` +
``tpg.draws.MonteCarloDraws`` + the estimator's coefficients), projected on fixed directions. Every
check has a designed total false-fail rate α = 10⁻⁶ (Bonferroni over the directions), reports the
smallest bias it detects with probability 1 − 10⁻⁶, and is paired with a biased negative control
whose EXACT bias (from ``tpg.exact``) exceeds that detectable bias and which must fail. No Monte
Carlo assertion sits inside ``@given``.

Seeds come from ``conftest.mc_seed``: fixed by default, fresh under ``TPG_MC_FRESH=1``, so the
false-fail rate can be measured on purpose:

    TPG_MC_FRESH=1 python -m pytest -m mc tests/test_verify.py      # rerun with fresh seeds
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_close, assert_vec_close, mc_seed
from tpg import KL, estimator, exact, random_mdp
from tpg.draws import TableCritic
from tpg.mdp import TPGError
from tpg.policies import LogLinear, TabularSoftmax, make_policy
from tpg.verify import RTOL, default_directions, mc_check, report, roundoff_floor, verdict_of



# ====================================================================================== verdicts
def test_verdict_thresholds():
    g = torch.tensor([3.0, -4.0], dtype=torch.float64)                          # ‖g‖ = 5
    assert verdict_of(g + 1e-12, g)[0] == "unbiased"
    v, rel, c, resid, cos = verdict_of(0.75 * g, g)
    assert v == "scaled" and abs(c - 0.75) < 1e-15 and resid < 1e-15 and abs(rel - 0.25) < 1e-15
    v, rel, c, resid, cos = verdict_of(g + torch.tensor([4.0, 3.0], dtype=torch.float64), g)  # orthogonal push
    assert v == "biased" and abs(c - 1) < 1e-15 and abs(resid - 1) < 1e-15 and abs(cos - 1 / 2**0.5) < 1e-15
    assert verdict_of(g + 1e-9 * torch.tensor([4.0, 3.0], dtype=torch.float64), g)[0] == "biased"   # > RTOL
    assert verdict_of(g, g, roundoff=RTOL)[0] == "inconclusive"                  # δ above RTOL/100
    assert verdict_of(-g, g)[:3] == ("biased", 2.0, -1.0)                        # reversed: no step size fixes it
    assert verdict_of(0 * g, g)[0] == "biased"                                   # zero expected update
    with pytest.raises(TPGError, match="exactly zero"):
        verdict_of(g, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TPGError, match="non-finite"):
        verdict_of(torch.tensor([float("nan"), 0.0], dtype=torch.float64), g)


def test_report_fields_and_roundoff_reuse():
    mdp = random_mdp(1, vocab_size=3, horizon=3, eos=True, n_prompts=2)
    pol = TabularSoftmax(mdp, seed=1)
    rep = report(estimator("grpo", std=False), mdp, pol, 4)
    assert rep.verdict == "scaled" and abs(rep.scale - 0.75) < 1e-12
    assert_vec_close(rep.bias, rep.mean - rep.grad)
    assert rep.roundoff < RTOL / 100 and rep.cov_trace > 0
    json.dumps(rep.to_dict())
    again = report(estimator("grpo", std=False), mdp, pol, 4, roundoff=roundoff_floor(mdp, pol), cov=None)
    assert_vec_close(again.mean, rep.mean)
    assert again.cov_trace is None


def test_report_against_another_target():
    """``target`` replaces ∇J: mean-only GRPO is unbiased for (1 − 1/G)∇J."""
    mdp = random_mdp(2, vocab_size=3, horizon=3, eos=True)
    pol = TabularSoftmax(mdp, seed=2)
    rep = report(estimator("grpo", std=False), mdp, pol, 3, target=(2 / 3) * exact.gradient(mdp, pol))
    assert rep.verdict == "unbiased", rep.summary()


# ====================================================================================== Monte Carlo: design
@pytest.fixture(scope="module")
def mc_mdp():
    mdp = random_mdp(7, vocab_size=3, horizon=3, eos=True)
    return mdp, TabularSoftmax(mdp, seed=7)


def test_exact_variance_is_the_projected_exact_covariance(mc_mdp):
    """With variance="exact" the tolerance comes from tpg.exact.moments: se_k = √(u_kᵀ Cov u_k / n),
    checked against the FULL covariance projected here; detectable = (threshold + z_β)·se."""
    from scipy import stats
    mdp, pol = mc_mdp
    est, n = estimator("rloo"), 500
    grad = exact.gradient(mdp, pol)
    u = default_directions(pol, grad, 3, seed=0)
    r = mc_check(est, mdp, pol, 2, n, torch.Generator().manual_seed(0), directions=u)
    full = exact.moments(est, mdp, pol, 2, cov="full").cov
    assert r.variance == "exact"
    assert_vec_close(torch.as_tensor(r.se), torch.sqrt(torch.diag(u @ full @ u.T) / n), what="se")
    assert_close(r.threshold, stats.norm.isf(1e-6 / (4 * 3)), what="Bonferroni threshold")
    assert_vec_close(torch.as_tensor(r.detectable), (r.threshold + stats.norm.isf(1e-6)) * torch.as_tensor(r.se))
    assert_close(u[0] @ grad, float(grad.norm()), what="first default direction is the unit target")
    assert np.all(np.abs(r.exact_bias) < 1e-12)


def test_mc_check_input_errors(mc_mdp):
    mdp, pol = mc_mdp
    g = torch.Generator().manual_seed(0)
    with pytest.raises(TPGError, match="n_batches"):
        mc_check(estimator("rloo"), mdp, pol, 2, 50, g)
    with pytest.raises(TPGError, match="variance must be"):
        mc_check(estimator("rloo"), mdp, pol, 2, 200, g, variance="bootstrap")
    with pytest.raises(TPGError, match="variance='sample'"):
        mc_check(estimator("trepo", variant="all", K=1), mdp, pol, 1, 200, g, variance="exact")
    with pytest.raises(TPGError, match="pass target="):
        mc_check(estimator("rloo"), mdp, pol, 2, 200, g, budget=10)             # "too big" to enumerate


# ====================================================================================== Monte Carlo: pairs
def _pair(name):
    """(mdp, policy, positive (est, G, kw), negative control (est, G, kw)) of each sampler-path pair."""
    mdp = random_mdp(7, vocab_size=3, horizon=3, eos=True)
    pol = TabularSoftmax(mdp, seed=7)
    ref = LogLinear(mdp, seed=3)
    pairs = {
        # RLOO vs self-inclusive mean-only GRPO (F3: E[ĝ] = (1 − 1/G)∇J)
        "rloo": ((estimator("rloo"), 4, {}), (estimator("grpo", std=False), 4, {})),
        # REINFORCE vs the same with per-response length normalisation (F5)
        "reinforce": ((estimator("reinforce"), 1, {}), (estimator("reinforce", agg="seq-mean-token-mean"), 1, {})),
        # ReMax vs ReMax with a KL penalty in the reward (F6: optimises J − βKL)
        "remax": ((estimator("remax"), 2, {}), (estimator("remax", kl=KL(0.5, "k1", "reward")), 2, {"ref": ref})),
        # TRePO from K fresh continuations vs the self-inclusive baseline (F10: E[ĝ] = K/(K+1)∇J).
        # No exact variance (continuations): the t-test's tail needs more samples at this skewness.
        "trepo": ((estimator("trepo", variant="all", K=2), 4, {}),
                  (estimator("trepo", variant="all", K=1, self_inclusive=True), 4, {})),
    }
    return mdp, pol, *pairs[name]


@pytest.mark.mc
@pytest.mark.parametrize("name,fixed_seed", [("rloo", 11), ("reinforce", 12), ("remax", 13), ("trepo", 14)])
def test_sampler_path_passes_and_its_biased_control_fails(name, fixed_seed):
    mdp, pol, (est, G, kw), (bad, Gb, kwb) = _pair(name)
    seed = mc_seed(fixed_seed)
    ok = mc_check(est, mdp, pol, G, None, torch.Generator().manual_seed(seed), **kw)   # n chosen by the design
    assert np.all(np.abs(ok.exact_bias) < 1e-12), ok.summary()                   # the right answer is "pass"
    assert ok.n_batches == ok.needed_batches and ok.trustworthy and ok.passed, ok.summary()
    ctl = mc_check(bad, mdp, pol, Gb, ok.n_batches, torch.Generator().manual_seed(seed + 1), **kwb)
    assert ctl.bias_detectable, f"design: control bias below the detectable bias: {ctl.summary()}"
    assert not ctl.passed, ctl.summary()
    print(ok.summary(), ctl.summary(), sep="\n")


@pytest.mark.mc
def test_sampler_path_on_a_shared_parameter_policy():
    """Log-linear policy (parameters shared across states), two prompt draws per batch."""
    mdp = random_mdp(5, vocab_size=3, horizon=3, eos=True, n_prompts=2)
    pol = make_policy("loglinear", mdp, 5)
    seed = mc_seed(21)
    ok = mc_check(estimator("rloo"), mdp, pol, 2, None, torch.Generator().manual_seed(seed), n_prompts=2)
    assert ok.trustworthy and ok.passed, ok.summary()
    ctl = mc_check(estimator("grpo", std=False), mdp, pol, 2, ok.n_batches, torch.Generator().manual_seed(seed + 1),
                   n_prompts=2)
    assert ctl.bias_detectable and not ctl.passed, ctl.summary()


@pytest.mark.mc
def test_sample_variance_route_when_too_big_to_enumerate(mc_mdp):
    """With the enumeration refused (budget) the check needs ``target`` and uses the sample variance
    (Student t, whose tail is sensitive to skewness: G = 8 responses per batch keep it small); the
    control's exact bias, computed separately here, exceeds the detectable bias."""
    mdp, pol = mc_mdp
    grad = exact.gradient(mdp, pol)
    seed = mc_seed(31)
    ok = mc_check(estimator("rloo"), mdp, pol, 8, None, torch.Generator().manual_seed(seed), grad, budget=10)
    assert ok.variance == "sample" and ok.exact_bias is None and ok.notes
    assert ok.trustworthy and ok.passed, ok.summary()
    u = default_directions(pol, grad)
    exact_bias = (u @ (exact.moments(estimator("grpo", std=False), mdp, pol, 8).mean - grad)).numpy()
    # The control is designed to detect 90 % of its largest exact bias (computed here, outside the check).
    detect = 0.9 * float(np.abs(exact_bias).max())
    ctl = mc_check(estimator("grpo", std=False), mdp, pol, 8, None, torch.Generator().manual_seed(seed + 1),
                   grad, budget=10, detect=detect)
    assert np.any(np.abs(exact_bias) >= ctl.detectable), ctl.summary()
    assert not ctl.passed, ctl.summary()


@pytest.mark.mc
def test_critic_estimator_on_the_sampler_path(mc_mdp):
    """GAE λ = 1 with a wrong critic (unbiased, T9) vs λ = 0.5 with the same critic (biased, F8)."""
    mdp, pol = mc_mdp
    tab = exact.tables(mdp, pol)
    wrong = TableCritic(mdp, tab.V + 0.5 + torch.randn(mdp.num_states, generator=torch.Generator().manual_seed(4),
                                                        dtype=torch.float64))
    seed = mc_seed(41)
    ok = mc_check(estimator("gae", lam=1.0), mdp, pol, 1, None, torch.Generator().manual_seed(seed), critic=wrong)
    assert ok.trustworthy and ok.passed, ok.summary()
    ctl = mc_check(estimator("gae", lam=0.5), mdp, pol, 1, ok.n_batches, torch.Generator().manual_seed(seed + 1),
                   critic=wrong)
    assert ctl.bias_detectable and not ctl.passed, ctl.summary()


@pytest.mark.mc
def test_default_directions_see_a_bias_orthogonal_to_the_gradient(mc_mdp):
    """A target T whose difference from E[ĝ] = ∇J is orthogonal to T itself (T = (∇J + v)/2 with
    v ⟂ ∇J, ‖v‖ = ‖∇J‖: then ⟨∇J − T, T⟩ = 0), so the bias is invisible along the unit target; the
    other default directions are orthogonal to the target and see it."""
    mdp, pol = mc_mdp
    grad = exact.gradient(mdp, pol)
    v = torch.randn(grad.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v = v - (v @ grad) / (grad @ grad) * grad
    target = (grad + v / v.norm() * grad.norm()) / 2
    assert abs(float((grad - target) @ target)) < 1e-12 * float(grad @ grad)
    u = default_directions(pol, target)
    assert float((u[1:] @ target).abs().max()) < 1e-12                         # orthogonal to the target
    seed = mc_seed(51)
    r = mc_check(estimator("reinforce"), mdp, pol, 1, None, torch.Generator().manual_seed(seed), target)
    assert r.bias_detectable and not r.passed, r.summary()
    assert abs(float(r.exact_bias[0])) < 1e-12                                 # nothing along the target
