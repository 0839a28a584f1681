"""The estimator zoo (verl / TRL / OpenRLHF) and the settings that change verdicts (ZOO.md).

Three levels, Pyro style: replay of each formula on a hand-built batch against a hand formula
(or verl's own loop, transcribed), the coefficient contract at ratio 1, and exact verdicts that
reproduce ZOO.md's recorded ones or a derivation by hand on the tiny case.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from conftest import assert_close, assert_vec_close
from tpg.mdp import TPGError
from tpg import TabularSoftmax, exact, random_mdp, report
from tpg.estimators import coefficients, estimator
from tpg.estimators import trl as T
from tpg.estimators import verl as V
from tpg.rollouts import enumerate_responses
from tpg.scores import grad as flat_grad
from tpg.zoo import Configured, _moved, kl_objective_gradient, local_kl_gradient, run_zoo


@pytest.fixture(scope="module")
def setup():
    out = {}
    for reward in ("gaussian", "binary"):
        mdp = random_mdp(0, vocab_size=3, horizon=3, n_prompts=1, reward=reward)
        out[reward] = (mdp, TabularSoftmax(mdp, seed=0))
    return out


def batch(mdp, pol, rows, groups, batches=None):
    """A hand-built batch of enumerated responses ``rows`` with group ids, scored under ``pol``."""
    e = enumerate_responses(mdp)
    ro = e.select(torch.tensor(rows))
    b = torch.zeros(len(rows), dtype=torch.long) if batches is None else torch.tensor(batches)
    ro = replace(ro, group=torch.tensor(groups), batch=b, n_batches=int(b.max()) + 1, mdp=mdp)
    with torch.no_grad():
        lp = pol.token_log_probs(ro.prompt_idx, ro.tokens) * ro.mask
    return replace(ro, logp=lp, logp_old=lp)


def adv_of(name, ro, **kw):
    return estimator(name, **kw)(ro).advantages


# ====================================================================================== replay: advantages
def test_replay_group_advantages(setup):
    mdp, pol = setup["gaussian"]
    ro = batch(mdp, pol, [0, 3, 7, 12, 5], [0, 0, 0, 1, 2])          # a group of 3, then two singletons
    R, m, n = ro.rm, ro.mask, ro.mask.sum(1)
    g0 = R[:3]
    # rloo_vectorized: (G R − ΣR)/(G − 1); singletons 0 (the loop rloo keeps R)
    exp = torch.cat([(3 * g0 - g0.sum()) / 2, torch.zeros(2, dtype=torch.float64)])
    assert_close(adv_of("verl.rloo_vectorized", ro), exp[:, None] * m, what="rloo_vectorized")
    assert_close(adv_of("rloo", ro)[3:], R[3:, None] * m[3:], what="loop rloo singleton keeps R")
    # opo: length-weighted group mean, own row included; singleton baseline 0
    b = (n[:3] * g0).sum() / n[:3].sum()
    assert_close(adv_of("verl.opo", ro), torch.cat([g0 - b, R[3:]])[:, None] * m, what="opo")
    # gpg: α = B / #nonzero over the batch, μ singleton 0
    alpha = 5 / int((R != 0).sum())
    exp = alpha * torch.cat([g0 - g0.mean(), R[3:]])
    assert_close(adv_of("verl.gpg", ro), exp[:, None] * m, kind="f32", what="gpg (float32 α)")
    # grpo_vectorized: float32 statistics, equal to grpo to float32 accuracy
    assert_close(adv_of("verl.grpo_vectorized", ro), adv_of("grpo", ro), kind="f32", what="grpo_vectorized")
    # gdpo without components: W(grpo)·m, whitened over the batch's tokens (Bessel)
    a = adv_of("grpo", ro)
    mu = (a * m).sum() / m.sum()
    var = (((a - mu) * m) ** 2).sum() / (m.sum() - 1)
    assert_close(adv_of("verl.gdpo", ro), (a - mu) / torch.sqrt(var + 1e-8) * m, what="gdpo")


def test_replay_passk(setup):
    mdp, pol = setup["gaussian"]
    ro = batch(mdp, pol, [0, 3, 7, 12, 12, 5], [0, 0, 0, 1, 1, 1])   # group 1 has a tie at the top? (12, 12, 5)
    R = ro.rm
    top = int(torch.argmax(R[:3]))
    srt = torch.sort(R[:3], descending=True).values
    exp = torch.zeros(6, dtype=torch.float64)
    exp[top] = (srt[0] - srt[1]) / (R[:3].std() + 1e-6)
    g1 = R[3:]
    if R[3] == g1.max():                                               # the duplicated response tops: A = 0
        pass
    else:
        exp[5] = (R[5] - R[3]) / (g1.std() + 1e-6)
    assert_close(adv_of("verl.grpo_passk", ro), exp[:, None] * ro.mask, what="grpo_passk")
    with pytest.raises(TPGError, match="at least 2"):
        adv_of("verl.grpo_passk", batch(mdp, pol, [0, 3], [0, 1]))


def _otb_loop(ro, S, zero_tail=True):
    """verl compute_optimal_token_baseline_advantage, transcribed as a loop (float64)."""
    G_ = ro.rm[:, None].expand_as(ro.mask) * ro.mask                   # RTG of the outcome reward
    w = (1 - 2 * ro.logp_old.exp() + S) * ro.mask
    Wc = w.cumsum(1)
    base = torch.zeros_like(G_)
    for g in torch.unique(ro.group):
        idx = torch.nonzero(ro.group == g)[:, 0]
        if len(idx) == 1:
            continue
        num = (G_[idx] * Wc[idx] * ro.mask[idx]).sum(0)
        den = (Wc[idx] * ro.mask[idx]).sum(0) + 1e-8
        base[idx] = num / den
        if zero_tail:
            lens = ro.mask[idx].sum(1)
            s = torch.sort(lens).values
            at = torch.nonzero(lens == s[-1])[:, 0]
            if len(at) == 1 and s[-1] > s[-2]:
                base[idx[at[0]], int(s[-2]):] = 0.0
    return (G_ - base) * ro.mask


@pytest.mark.parametrize("zero_tail", [True, False])
def test_replay_optimal_token_baseline(setup, zero_tail):
    mdp, pol = setup["gaussian"]
    ro = batch(mdp, pol, [0, 1, 7, 12, 3, 4, 2], [0, 0, 0, 1, 1, 1, 2])
    pi_sq = V.sum_pi_squared(pol)
    S = pi_sq[ro.states] * ro.mask
    # the tabular identity behind the "proxy": 1 − 2π + Σπ² = ‖∇_θs log π(y|s)‖²
    p = torch.softmax(pol.logits[ro.states[0, 0]], -1).detach()
    y = int(ro.tokens[0, 0])
    assert_close(1 - 2 * p[y] + (p**2).sum(), ((torch.eye(3)[y] - p) ** 2).sum(), what="score norm")
    exp = _otb_loop(ro, S, zero_tail)
    for name in ("verl.optimal_token_baseline", "verl.tir_optimal_token_baseline"):
        got = adv_of(name, ro, pi_sq=pi_sq, handle_zero_tail=zero_tail)
        assert_close(got, exp, what=name)


def test_replay_trl_and_openrlhf(setup):
    mdp, pol = setup["gaussian"]
    ro = batch(mdp, pol, [0, 3, 7, 12, 5, 9], [0, 0, 0, 1, 1, 1])
    R = ro.rm
    g = R.view(2, 3)
    exp = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)
    assert_close(adv_of("trl.grpo", ro), exp[:, None] * ro.mask, what="trl grpo ε = 1e-4")
    expb = ((g - g.mean(1, keepdim=True)) / (R.std() + 1e-4)).reshape(-1)
    assert_close(adv_of("trl.grpo", ro, scale_rewards="batch"), expb[:, None] * ro.mask, what="trl batch std")
    exp_on = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-9)).reshape(-1)
    assert_close(adv_of("openrlhf.group_norm", ro), exp_on[:, None] * ro.mask, what="openrlhf group_norm")


# ====================================================================================== coefficients at ratio 1
PASS_THROUGH = ["verl.vanilla", "verl.dppo_tv", "verl.dppo_kl", "verl.gpg", "verl.kl_cov", "verl.cispo",
                "verl.bypass_mode", "verl.dro", "verl.gspo", "verl.sapo", "trl.clip", "trl.sapo", "trl.vespo"]


@pytest.mark.parametrize("loss", PASS_THROUGH)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_ratio_one_coefficients_are_w_times_A(setup, loss, agg):
    """ZOO §0: at θ = θ_old every registered loss except clip_cov / sapo-and-geo_mean's forced
    aggregation gives c = w·A."""
    mdp, pol = setup["gaussian"]
    ro = batch(mdp, pol, [0, 3, 7, 12, 5, 9], [0, 0, 0, 1, 1, 1])
    opts = {"beta": 0.1} if loss == "verl.dro" else {}
    est = estimator("rloo", loss=loss, agg=agg, loss_options=opts)
    w = estimator("rloo", agg=agg)(ro).diagnostics["agg_weights"]
    assert_close(coefficients(est, ro), w * est(ro).advantages, what=loss)


def test_forced_aggregations_and_geo_mean(setup):
    mdp, pol = setup["gaussian"]
    ro = batch(mdp, pol, [0, 3, 7, 12, 5, 9], [0, 0, 0, 1, 1, 1])
    A = estimator("rloo")(ro).advantages
    n = ro.mask.sum(1, keepdim=True)
    est = V.verl_estimator("rloo", loss="sapo", agg="token-mean")          # sapo forces seq-mean-token-mean
    assert est.agg == "verl.seq-mean-token-mean"
    assert_close(coefficients(est, ro), A / (6 * n) * ro.mask, what="sapo: A/(B n_i)")
    # gspo passes the actor's mode through in verl 0.9.1 (recorded: tests/data/verl_0.9.1.json). Its
    # sequence ratio exp(mean_t log ρ_t) spreads ∂/∂logp_t = 1/n_i over the row, and the row's n_i
    # token weights (1/N_tok each) add back to n_i/N_tok: every token gets A/N_tok, as token-mean PG.
    est = V.verl_estimator("rloo", loss="gspo", agg="token-mean")
    assert est.agg == "token-mean"
    assert_close(coefficients(est, ro), A / ro.mask.sum() * ro.mask, what="gspo: A/N_tok")
    # geo_mean: Ā_i / (B n_i) on each token (token-level A averaged over the row)
    At = A * torch.arange(1, 4)[None, :] * ro.mask                       # a non-constant token advantage
    est = estimator("reinforce", loss="verl.geo_mean", agg="verl.seq-mean-token-mean")
    c = coefficients(lambda r: (V.seq_mean_token_mean_exact(r) * V.geo_mean(r.logp, r.logp_old, At, r.mask)).sum(),
                     ro)
    abar = (At * ro.mask).sum(1, keepdim=True) / n
    assert_close(c, abar / (6 * n) * ro.mask, what="geo_mean Ā/(B n)")
    assert est.loss == "verl.geo_mean"


def test_clip_cov_drops_expected_share_of_eligible_tokens(setup):
    mdp, pol = setup["gaussian"]
    ro = batch(mdp, pol, [0, 3, 7, 12, 5, 9], [0, 0, 0, 1, 1, 1])
    est = estimator("rloo", loss="verl.clip_cov", agg="token-sum", loss_options=dict(clip_cov_lb=-1e9, clip_cov_ub=1e9))
    A = est(ro).advantages
    # every valid token eligible, k = 1 of N: each kept with probability 1 − 1/N
    N = ro.mask.sum()
    assert_close(coefficients(est, ro), A * (1 - 1 / N) * ro.mask, what="E over randperm of corr")


def test_verl_kl_types():
    lp = torch.tensor([-0.3, -1.2], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-0.5, -0.7], dtype=torch.float64)
    d = lp.detach() - ref
    for kind, val in [("k1", d), ("abs", d.abs()), ("k2", d**2 / 2), ("k3", torch.exp(-d) + d - 1)]:
        assert_close(V.kl_penalty(lp, ref, kind).detach(), val, what=kind)
        plus = V.kl_penalty(lp, ref, kind + "+")
        assert_close(plus.detach(), val, what=kind + "+ forward")
        (g,) = torch.autograd.grad(plus.sum(), lp)
        assert_close(g, d, what=kind + "+ has the k2 gradient d")
    with pytest.raises(TPGError, match="unknown verl KL"):
        V.kl_penalty(lp, ref, "full")


# ====================================================================================== exact verdicts (ZOO §1, §2, §5)
def test_zoo_recorded_scales(setup):
    """Exact constants ZOO records: token-sum κ = B = 3, -norm κ = 1/C = 1/3 (G = 3), GRPO without
    std κ = 1 − 1/G, GRPO-std on binary rewards κ = 2/√3 at G = 3 (the lemma), rloo_vectorized
    unbiased, gpg = RLOO for binary G = 2."""
    mdp, pol = setup["gaussian"]
    r = report(V.verl_estimator("rloo", agg="token-sum"), mdp, pol, 3, cov=None)
    assert r.verdict == "scaled" and abs(r.scale - 3) < 1e-10
    r = report(V.verl_estimator("rloo", agg="seq-mean-token-sum-norm"), mdp, pol, 3, cov=None)
    assert r.verdict == "scaled" and abs(r.scale - 1 / 3) < 1e-10
    for G in (2, 3):
        r = report(estimator("grpo", std=False), mdp, pol, G, cov=None)
        assert r.verdict == "scaled" and abs(r.scale - (1 - 1 / G)) < 1e-10
    assert report(estimator("verl.rloo_vectorized"), mdp, pol, 3, cov=None).verdict == "unbiased"
    assert report(estimator("verl.opo"), mdp, pol, 3, cov=None).verdict == "biased"
    assert report(estimator("verl.gpg"), mdp, pol, 3, cov=None).verdict == "scaled"   # no zero rewards: 1 − 1/G
    bmdp, bpol = setup["binary"]
    r = report(estimator("verl.grpo_vectorized"), bmdp, bpol, 3, cov=None)
    # (2/3)/(σ + ε) with σ = 1/√3 on the mixed groups: κ = (2/3)/(1/√3 + 1e-6)
    assert r.verdict == "scaled" and abs(r.scale - (2 / 3) / (1 / math.sqrt(3) + 1e-6)) < 1e-6
    g2 = report(estimator("verl.gpg"), bmdp, bpol, 2, cov=None)
    rl = report(estimator("rloo"), bmdp, bpol, 2, cov=None)
    assert_vec_close(g2.mean, rl.mean, what="gpg = rloo for binary G = 2")
    r = report(estimator("verl.gdpo"), bmdp, bpol, 3, cov=None)
    assert r.verdict == "biased"


def test_passk_without_std_is_pass_at_G_gradient(setup):
    """ZOO §2.5: without std, E ĝ = (1/G) ∇E[max_j R_j] exactly (leave-one-out max baseline)."""
    mdp, pol = setup["gaussian"]
    G = 3
    e = enumerate_responses(mdp)
    p = (pol.token_log_probs(e.prompt_idx, e.tokens) * e.mask).sum(1).exp()            # (N,) with autograd
    vals, inv = torch.unique(e.rm, return_inverse=True)
    pv = torch.zeros(len(vals), dtype=torch.float64).index_add(0, inv, p)
    F = pv.cumsum(0)
    Fm = F - pv
    emax = (vals * (F**G - Fm**G)).sum()
    target = flat_grad(emax / G, pol)
    r = report(estimator("verl.grpo_passk", norm_adv_by_std_in_grpo=False), mdp, pol, G, cov=None, target=target)
    assert r.verdict == "unbiased", r.summary()


# ====================================================================================== settings
def test_micro_batches_by_hand(setup):
    """Split into B parts of one response each with local token-mean = per-response token mean,
    averaged: exactly seq-mean-token-mean (exact counts); with the global count = unsplit token-mean;
    seq-mean-token-sum with equal local parts = unsplit (unbiased)."""
    mdp, pol = setup["gaussian"]
    G = 3
    local = report(Configured(estimator("rloo", agg="token-mean"), split=G, norm="local"), mdp, pol, G, cov=None)
    ref = report(estimator("rloo", agg="verl.seq-mean-token-mean"), mdp, pol, G, cov=None)
    assert_vec_close(local.mean, ref.mean, what="token-mean per one-response micro-batch = seq-mean-token-mean")
    glob = report(Configured(estimator("rloo", agg="token-mean"), split=G, norm="global"), mdp, pol, G, cov=None)
    unsplit = report(estimator("rloo", agg="token-mean"), mdp, pol, G, cov=None)
    assert_vec_close(glob.mean, unsplit.mean, what="global normaliser = unsplit")
    assert local.verdict == glob.verdict == "biased" and local.rel_bias != pytest.approx(glob.rel_bias, rel=1e-3)
    s = report(Configured(estimator("rloo"), split=G, norm="local"), mdp, pol, G, cov=None)
    assert s.verdict == "unbiased", s.summary()


def test_rollout_mismatch_by_hand(setup):
    """μ ≠ π = θ_old (the trainer recomputes θ_old = θ). G = 1 REINFORCE: token TIS with no truncation gives
    E_μ[R Σ_t ρ_t ∇log π_t] (hand enumeration below), biased for ∇J; sequence IS untruncated is
    unbiased; no correction is biased; the cap C = 2 changes the token-TIS answer."""
    mdp, pol = setup["gaussian"]
    mu = _moved(pol, 0.7)
    e = enumerate_responses(mdp)
    lp = pol.token_log_probs(e.prompt_idx, e.tokens) * e.mask                             # (N, L) autograd
    with torch.no_grad():
        lmu = mu.token_log_probs(e.prompt_idx, e.tokens) * e.mask
    p_mu = exact.prompt_weights(mdp, e) * lmu.sum(1).exp()
    rho = (lp.detach() - lmu).exp() * e.mask
    hand = flat_grad((p_mu * e.rm * (rho * lp).sum(1)).sum(), pol)
    tok = report(Configured(estimator("reinforce"), rollout_is="token_truncate", C=1e9), mdp, pol, 1, cov=None,
                 rollout_policy=mu)
    assert_vec_close(tok.mean, hand, what="token TIS = E_μ[R Σ ρ_t ∇logπ_t]")
    assert tok.verdict == "biased"
    seq = report(Configured(estimator("rloo"), rollout_is="sequence_truncate", C=1e9), mdp, pol, 3, cov=None,
                 rollout_policy=mu)
    assert seq.verdict == "unbiased", seq.summary()
    none = report(Configured(estimator("rloo"), rollout_is="none"), mdp, pol, 3, cov=None, rollout_policy=mu)
    assert none.verdict == "biased"
    capped = report(Configured(estimator("reinforce"), rollout_is="token_truncate", C=1.1), mdp, pol, 1, cov=None,
                    rollout_policy=mu)
    assert float((capped.mean - tok.mean).norm()) > 1e-6 * float(tok.mean.norm())


def test_ppo_epochs_by_hand(setup):
    """θ ≠ θ_old: the linear ``pg`` loss gives E_{θ_old}[R ∇log π_θ(y)] (hand), the clipped ratio
    another, both biased for ∇J(θ)."""
    mdp, pol = setup["gaussian"]
    old = _moved(pol, 0.3)
    e = enumerate_responses(mdp)
    lp = (pol.token_log_probs(e.prompt_idx, e.tokens) * e.mask).sum(1)
    with torch.no_grad():
        p_old = exact.prompt_weights(mdp, e) * (old.token_log_probs(e.prompt_idx, e.tokens) * e.mask).sum(1).exp()
    hand = flat_grad((p_old * e.rm * lp).sum(), pol)
    r = report(estimator("reinforce", loss="pg"), mdp, pol, 1, cov=None, old_policy=old)
    assert_vec_close(r.mean, hand, what="pg loss off-policy")
    assert r.verdict == "biased"
    assert report(estimator("rloo", loss="verl.vanilla"), mdp, pol, 3, cov=None, old_policy=old).verdict == "biased"


def test_kl_placement_by_hand(setup):
    """ZOO §4: k1 in the reward keeps RLOO unbiased for ∇(J − β KL_seq); in the loss k1 adds 0,
    k2 and every '+' form add −β∇Σ_s sg(ρ(s)) KL(π‖ref)(s), k3 adds −β∇Σ_s sg(ρ(s)) KL(ref‖π)(s)."""
    mdp, pol = setup["gaussian"]
    ref, beta = _moved(pol, 1.0), 0.1
    grad = exact.gradient(mdp, pol)
    r = report(Configured(estimator("rloo"), kl=(beta, "k1", "reward")), mdp, pol, 3, cov=None, ref=ref,
               target=kl_objective_gradient(mdp, pol, ref, beta))
    assert r.verdict == "unbiased", r.summary()
    fwd, rev = local_kl_gradient(mdp, pol, ref), local_kl_gradient(mdp, pol, ref, reverse=True)
    for kind, tgt in [("k1", grad), ("k2", grad - beta * fwd), ("k3+", grad - beta * fwd), ("abs+", grad - beta * fwd),
                      ("k3", grad - beta * rev)]:
        r = report(Configured(estimator("reinforce"), kl=(beta, kind, "loss")), mdp, pol, 1, cov=None, ref=ref,
                   target=tgt)
        assert r.verdict == "unbiased", f"{kind}: {r.summary()}"
    r = report(Configured(estimator("rloo"), kl=(beta, "k3", "reward")), mdp, pol, 3, cov=None, ref=ref,
               target=kl_objective_gradient(mdp, pol, ref, beta))
    assert r.verdict == "biased"


def test_trl_loss_types(setup):
    mdp, pol = setup["gaussian"]
    verdicts = {lt: report(T.trl_estimator(lt, scale_rewards="none",
                                           importance_sampling_level="sequence" if lt == "luspo" else "token"),
                           mdp, pol, 3, cov=None) for lt in ("dr_grpo", "luspo", "dapo", "cispo")}
    # mean-centring without std: (1 − 1/G) = 2/3; dr_grpo divides by B·L → (2/3)/3 ... per token 1/(B C), C = 3
    assert verdicts["dr_grpo"].verdict == "scaled" and abs(verdicts["dr_grpo"].scale - 2 / 9) < 1e-10
    assert verdicts["luspo"].verdict == "scaled" and abs(verdicts["luspo"].scale - 2 / 3) < 1e-10
    assert verdicts["dapo"].verdict == "biased"                                   # token-mean
    # cispo's default ε_high = ε = 0.2 caps ρ = 1 at 0.2: exactly 0.2 × dapo's update
    assert_vec_close(verdicts["cispo"].mean, 0.2 * verdicts["dapo"].mean, what="trl cispo = 0.2 × dapo at ρ = 1")


def test_zoo_matrix_runs_and_matches_zoo(setup):
    rows = run_zoo(rewards=("gaussian",), fast=True, only="verl loss")
    assert len(rows) == len(V.VERL_LOSSES)
    bad = [r for r in rows if r.agrees() is False]
    assert not bad, bad


def test_cli_zoo(tmp_path, capsys):
    from tpg.cli import main
    out = tmp_path / "z.json"
    md = tmp_path / "z.md"
    assert main(["zoo", "--fast", "--only", "agg token-sum", "--json", str(out), "--markdown", str(md)]) == 0
    assert "token-sum" in capsys.readouterr().out and out.exists() and md.read_text().startswith("| library")
    assert main(["zoo", "--G", "1"]) == 2
    assert main(["zoo", "--only", "no-such-row"]) == 2


# ====================================================================================== three policies
from tpg.zoo import (IS_MODES, openrlhf_vllm_is, parse_verl_rs, trl_grpo, verl_rollout_correction,  # noqa: E402
                     verl_rs_keep)
from tpg.estimators import openrlhf as O  # noqa: E402


def _three(mdp, pol, old, mu):
    """Every response with log π (autograd), log π_old, log μ (N, L) and P_μ (N,)."""
    e = enumerate_responses(mdp)
    lp = pol.token_log_probs(e.prompt_idx, e.tokens) * e.mask
    with torch.no_grad():
        lold = old.token_log_probs(e.prompt_idx, e.tokens) * e.mask
        lmu = mu.token_log_probs(e.prompt_idx, e.tokens) * e.mask
    p_mu = exact.prompt_weights(mdp, e) * lmu.sum(1).exp()
    return e, lp, lold, lmu, p_mu


def _reduction_cases():
    base = V.verl_estimator("rloo", agg="seq-mean-token-sum", label="verl.rloo")
    cases = [Configured(base, rollout_is=m, C=2.0) for m in IS_MODES]
    cases += [Configured(base, rollout_is=m, C=2.0, C_min=0.5) for m in IS_MODES if m != "none"]
    cases += [verl_rollout_correction(base, rollout_is="token", rollout_is_threshold="0.5_2.0",
                                      rollout_rs="token_k1,seq_mean_k3,seq_max_k2", rollout_rs_threshold="0.5_2.0,0.01,0.01"),
              verl_rollout_correction(base, bypass_mode=True),
              verl_rollout_correction(base, bypass_mode=True, loss_type="reinforce", rollout_is="sequence",
                                      rollout_rs="seq_sum_k1", rollout_rs_threshold=1.5),
              Configured(base, off_policy_mask=0.0), openrlhf_vllm_is(base, "seq-mask-tis")]
    return base, cases


def test_three_policies_reduce_to_on_policy_when_mu_equals_theta_old_equals_theta(setup):
    """μ = θ_old = θ: every correction weight is 1, nothing is rejected or masked, bypass changes
    nothing, so each configured estimator's exact E ĝ equals the on-policy one (to round-off), whether
    the policies are left out or passed explicitly; the verdict is the on-policy verdict."""
    for reward in ("gaussian", "binary"):
        mdp, pol = setup[reward]
        base, cases = _reduction_cases()
        ref = report(base, mdp, pol, 3, cov=None)
        assert ref.verdict == "unbiased"
        for est in cases:
            for kw in ({}, {"rollout_policy": pol}, {"old_policy": pol, "rollout_policy": pol}):
                r = report(est, mdp, pol, 3, cov=None, **kw)
                assert_vec_close(r.mean, ref.mean, what=f"{est.name} {sorted(kw)}")
                assert r.verdict == ref.verdict, r.summary()
    # TRL's façade with every vLLM mode, and the KL terms, reduce too (luspo/none at sequence level: 2/3)
    mdp, pol = setup["gaussian"]
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        r = report(trl_grpo("luspo", scale_rewards="none", importance_sampling_level="sequence",
                            vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.5), mdp, pol, 3,
                   cov=None, rollout_policy=pol)
        assert r.verdict == "scaled" and abs(r.scale - 2 / 3) < 1e-10, (mode, r.summary())


def test_three_policies_token_tis_with_ppo_epochs_by_hand(setup):
    """μ, θ_old, θ all different, G = 1 REINFORCE with PPO's clipped loss and untruncated token TIS:
    c_t = (π_old/μ)_t · ρ_t · R · [token t not clipped], ρ_t = π/π_old (clipped: A > 0 and ρ > 1.2, or
    A < 0 and ρ < 0.8), in expectation over y ~ μ — derived by hand below. Untruncated sequence IS with
    the linear loss turns the μ-expectation into the θ_old one exactly: E_old[R ∇log P_θ(y)]."""
    mdp, pol = setup["gaussian"]
    old, mu = _moved(pol, 0.3), _moved(pol, 0.7, seed=777)
    e, lp, lold, lmu, p_mu = _three(mdp, pol, old, mu)
    R = e.rm[:, None]
    rho = (lp.detach() - lold).exp()
    clipped = ((R > 0) & (rho > 1.2)) | ((R < 0) & (rho < 0.8))
    c = (lold - lmu).exp() * rho * R * (~clipped) * e.mask
    hand = flat_grad((p_mu[:, None] * c * lp).sum(), pol)
    r = report(Configured(estimator("reinforce"), rollout_is="token_truncate", C=None), mdp, pol, 1, cov=None,
               old_policy=old, rollout_policy=mu)
    assert_vec_close(r.mean, hand, what="token TIS × PPO ratio, three policies")
    assert r.verdict == "biased"
    assert bool(clipped[e.mask > 0].any()) and bool((~clipped)[e.mask > 0].any())     # both branches exercised
    p_old = exact.prompt_weights(mdp, e) * lold.sum(1).exp()
    lp2 = pol.token_log_probs(e.prompt_idx, e.tokens) * e.mask
    hand_seq = flat_grad((p_old * e.rm * lp2.sum(1)).sum(), pol)
    s = report(Configured(estimator("reinforce", loss="pg"), rollout_is="sequence_truncate", C=None), mdp, pol, 1,
               cov=None, old_policy=old, rollout_policy=mu)
    assert_vec_close(s.mean, hand_seq, what="sequence IS: E_μ[(P_old/P_μ) R ∇log P_θ] = E_old[R ∇log P_θ]")
    two = report(estimator("reinforce", loss="pg"), mdp, pol, 1, cov=None, old_policy=old)
    assert_vec_close(s.mean, two.mean, what="= the two-policy (θ_old, θ) expectation")


def test_is_weights_of_every_mode_by_hand():
    """The weight formulas on a hand batch of log ρ = log π_old/μ (TRL truncate clamps from both sides,
    verl from above; masks zero outside [C_min, C]; OpenRLHF seq-mask-tis keeps the raw token ρ)."""
    log_r = torch.tensor([[0.9, -0.1, 0.0], [-0.9, 0.2, 0.3]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    log_r = log_r * m
    tok, seq = log_r.exp(), log_r.sum(1, keepdim=True).exp().expand_as(log_r)
    geo = (log_r.sum(1, keepdim=True) / m.sum(1, keepdim=True)).exp()
    lo, hi = 0.5, 2.0
    base = estimator("rloo")
    exp = {"token_truncate": tok.clamp(lo, hi), "token_mask": tok * ((tok >= lo) & (tok <= hi)),
           "sequence_truncate": seq.clamp(lo, hi), "sequence_mask": seq * ((seq >= lo) & (seq <= hi)),
           "seq_mask_tis": tok * ((geo >= lo) & (geo <= hi)), "none": torch.ones_like(m)}
    for mode, e in exp.items():
        got = Configured(base, rollout_is=mode, C=hi, C_min=lo)._is_weights(log_r, m)
        assert_close(got, e * m if mode != "none" else e, what=mode)
    assert_close(Configured(base, rollout_is="token_truncate", C=hi)._is_weights(log_r, m), tok.clamp(max=hi) * m,
                 what="verl TIS clamps from above only")
    assert float(exp["seq_mask_tis"][0, 0]) == pytest.approx(math.exp(0.9))   # raw token ρ, not clamped


def test_verl_rejection_grammar_and_mask_by_hand():
    assert parse_verl_rs("token_k1", 2.0) == [("token_k1", 0.5, 2.0)]
    assert parse_verl_rs("token_k1, seq_mean_k3,token_k1", "0.8_1.5,0.1") == [("token_k1", 0.8, 1.5),
                                                                              ("seq_mean_k3", None, 0.1)]
    for bad, thr, msg in [("token_k4", 1.0, "invalid rollout_rs option"), ("seq_max_k1", 1.0, "invalid"),
                          ("token_k2", "0.1_2", "single upper bound"), ("token_k1,token_k2", "1,2,3", "one threshold"),
                          ("token_k1", None, "must be given"), ("token_k1", "2_1", "lower ≤ upper")]:
        with pytest.raises(TPGError, match=msg):
            parse_verl_rs(bad, thr)
    log_r = torch.tensor([[0.9, -0.1, 0.0], [-0.2, 0.2, 0.3]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    log_r = log_r * m
    k1, k2, k3 = -log_r, 0.5 * log_r**2, log_r.exp() - 1 - log_r
    keep = verl_rs_keep(log_r, m, parse_verl_rs("token_k1", "0.5_2.0"))
    assert_close(keep, ((k1 >= math.log(0.5)) & (k1 <= math.log(2.0))).double(), what="token_k1")
    keep = verl_rs_keep(log_r, m, parse_verl_rs("seq_sum_k2,seq_max_k3", "0.3,0.05"))
    s2 = (k2 * m).sum(1)
    mx3 = torch.stack([k3[0, :2].max(), k3[1].max()])
    assert_close(keep, ((s2 <= 0.3) & (mx3 <= 0.05)).double()[:, None].expand(2, 3), what="seq_sum_k2 ∧ seq_max_k3")
    keep = verl_rs_keep(log_r, m, parse_verl_rs("seq_mean_k1", 1.2))
    mean1 = (k1 * m).sum(1) / m.sum(1)
    assert_close(keep, ((mean1 >= math.log(1 / 1.2)) & (mean1 <= math.log(1.2))).double()[:, None].expand(2, 3),
                 what="seq_mean_k1 with a single upper bound u: [1/u, u]")


def test_verl_rollout_correction_options_and_rejection_by_hand(setup):
    """The verl grammar maps onto the modes; rejection edits the mask before the advantage (G = 1
    REINFORCE: c_t = R·keep_t in expectation over μ, by hand) — biased even without IS weights."""
    base = V.verl_estimator("rloo", agg="seq-mean-token-sum")
    c = verl_rollout_correction(base, rollout_is="token")
    assert (c.rollout_is, c.C, c.C_min) == ("token_truncate", 2.0, None)
    c = verl_rollout_correction(base, rollout_is="sequence", rollout_is_threshold="0.5_3.0")
    assert (c.rollout_is, c.C, c.C_min) == ("sequence_mask", 3.0, 0.5)
    assert verl_rollout_correction(base).rollout_is is None
    c = verl_rollout_correction(base, bypass_mode=True, loss_type="reinforce", rollout_is="token")
    assert c.bypass and c.est.loss == "verl.bypass_mode" and c.est.loss_options["rollout_is"] == "token"
    with pytest.raises(TPGError, match="rollout_is must be None"):
        verl_rollout_correction(base, rollout_is="seq")
    with pytest.raises(TPGError, match="bypass mode computes its IS"):
        Configured(base, rollout_is="token_truncate", bypass=True)
    mdp, pol = setup["gaussian"]
    mu = _moved(pol, 0.7, seed=777)
    e, lp, lold, lmu, p_mu = _three(mdp, pol, pol, mu)
    k1 = -(lold - lmu)
    keep = ((k1 >= math.log(0.5)) & (k1 <= math.log(2.0))).double() * e.mask
    hand = flat_grad((p_mu[:, None] * e.rm[:, None] * keep * lp).sum(), pol)
    r = report(verl_rollout_correction(estimator("reinforce", loss="pg"), rollout_rs="token_k1",
                                       rollout_rs_threshold="0.5_2.0"), mdp, pol, 1, cov=None, rollout_policy=mu)
    assert_vec_close(r.mean, hand, what="token_k1 rejection")
    assert 0 < float(keep.sum()) < float(e.mask.sum())                                   # some tokens rejected
    # bypass reinforce with an untruncated sequence IS: E_μ[(P_θ/P_μ) ĝ] = E_θ[ĝ] — unbiased
    r = report(verl_rollout_correction(V.verl_estimator("rloo", agg="seq-mean-token-sum"), bypass_mode=True,
                                       loss_type="reinforce", rollout_is="sequence", rollout_is_threshold=1e9),
               mdp, pol, 3, cov=None, rollout_policy=mu)
    assert r.verdict == "unbiased", r.summary()


def test_trl_off_policy_mask_and_bias_corrected_kl_by_hand(setup):
    """TRL ``get_off_policy_mask``: keep a token unless A < 0 and mean_t(log μ − log π) > δ (G = 1
    REINFORCE with the linear loss, by hand). ``use_bias_correction_kl``: k3·(π/π_old) in the loss
    estimates ∇ of the local *forward* KL (= k2's), k3 alone the local reverse KL (ZOO §4)."""
    mdp, pol = setup["gaussian"]
    mu = _moved(pol, 0.7, seed=777)
    e, lp, lold, lmu, p_mu = _three(mdp, pol, pol, mu)
    delta = 0.02
    seq_kl = ((lmu - lp.detach()) * e.mask).sum(1) / e.mask.sum(1)
    keep = ((e.rm >= 0) | (seq_kl <= delta)).double()[:, None] * e.mask
    hand = flat_grad((p_mu[:, None] * e.rm[:, None] * keep * lp).sum(), pol)
    r = report(Configured(estimator("reinforce", loss="pg"), off_policy_mask=delta), mdp, pol, 1, cov=None,
               rollout_policy=mu)
    assert_vec_close(r.mean, hand, what="OPSM")
    assert 0 < float(keep.sum()) < float(e.mask.sum())
    ref, beta = _moved(pol, 1.0), 0.1
    grad = exact.gradient(mdp, pol)
    fwd, rev = local_kl_gradient(mdp, pol, ref), local_kl_gradient(mdp, pol, ref, reverse=True)
    for ratio, tgt in [("token", grad - beta * fwd), (None, grad - beta * rev)]:
        r = report(Configured(estimator("reinforce"), kl=(beta, "k3", "loss"), kl_ratio=ratio), mdp, pol, 1,
                   cov=None, ref=ref, target=tgt)
        assert r.verdict == "unbiased", f"{ratio}: {r.summary()}"
    with pytest.raises(TPGError, match="kl_ratio multiplies a KL term in the loss"):
        Configured(estimator("rloo"), kl_ratio="token")


def test_trl_rloo_trainer_replay_and_verdict(setup):
    """TRL ``RLOOTrainer``: A_i = R_i − mean_{j≠i} R_j (β·Σ_t k1 on θ_old already in R); normalised
    over the batch with Bessel std + 1e-4 on request; the loss is PPO's clip on the sequence ratio,
    averaged over sequences: at θ_old = θ each token of row i gets A_i/B, at θ_old ≠ θ it gets
    c_i·A_i/B where the sequence ratio c_i is not clipped. Exact verdict: unbiased for ∇(J − β KL_seq)."""
    mdp, pol = setup["gaussian"]
    ro = batch(mdp, pol, [0, 3, 7, 12, 5, 9], [0, 0, 0, 1, 1, 1])
    g = ro.rm.view(2, 3)
    A = (g - (g.sum(1, keepdim=True) - g) / 2).reshape(-1)
    assert_close(adv_of("trl.rloo", ro), A[:, None] * ro.mask, what="trl rloo")
    An = (A - A.mean()) / (A.std() + 1e-4)
    assert_close(adv_of("trl.rloo", ro, normalize_advantages=True), An[:, None] * ro.mask, what="normalised")
    est = T.trl_rloo_estimator(beta=0.0)
    assert_close(coefficients(est, ro), A[:, None] / 6 * ro.mask, what="A_i / B at ratio 1")
    old = (_moved(pol, 0.3).token_log_probs(ro.prompt_idx, ro.tokens) * ro.mask).detach()
    ro2 = replace(ro, logp_old=old)
    cseq = ((ro.logp - old) * ro.mask).sum(1).exp()
    unclipped = ~(((A > 0) & (cseq > 1.2)) | ((A < 0) & (cseq < 0.8)))
    assert_close(coefficients(est, ro2), (cseq * A * unclipped / 6)[:, None] * ro.mask, what="sequence ratio clip")
    assert bool(unclipped.any()) and not bool(unclipped.all())
    ref = _moved(pol, 1.0)
    r = report(T.trl_rloo_estimator(), mdp, pol, 3, cov=None, ref=ref, target=kl_objective_gradient(mdp, pol, ref, 0.05))
    assert r.verdict == "unbiased", r.summary()


def test_openrlhf_replay_from_source(setup):
    """OpenRLHF ``compute_advantages_and_returns`` transcribed: reward shaping per group, R at the
    last token − β kl_t, returns-to-go, whitening with the *biased* variance for reinforce /
    reinforce_baseline / gae only; rloo, group_norm, dr_grpo are not whitened; G = 1 is refused."""
    mdp, pol = setup["gaussian"]
    ro = batch(mdp, pol, [0, 3, 7, 12, 5, 9], [0, 0, 0, 1, 1, 1])
    m, R = ro.mask, ro.rm
    g = R.view(2, 3)

    def whiten_(a):
        n = m.sum()
        mean = (a * m).sum() / n
        var = (((a - mean) * m) ** 2).sum() / n
        return (a - mean) * m * var.clamp(min=1e-8).rsqrt()
    loo = (g - (g.sum(1, keepdim=True) - g) / 2).reshape(-1)
    assert_close(adv_of("openrlhf.rloo", ro), loo[:, None] * m, what="rloo: not whitened")
    gn = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-9)).reshape(-1)
    assert_close(adv_of("openrlhf.group_norm", ro), gn[:, None] * m, what="group_norm")
    dr = (g - g.mean(1, keepdim=True)).reshape(-1)
    assert_close(adv_of("openrlhf.dr_grpo", ro), dr[:, None] * m, what="dr_grpo")
    assert_close(adv_of("openrlhf.reinforce_baseline", ro), whiten_(dr[:, None] * m), what="reinforce_baseline")
    assert_close(adv_of("openrlhf.reinforce", ro), whiten_(R[:, None] * m), what="reinforce")
    assert_close(adv_of("openrlhf.reinforce", ro, no_std_norm=True),
                 (R[:, None] - (R[:, None] * m).sum() / m.sum()) * m, what="no_std_norm")
    # KL in the reward: A_t = shaped R − Σ_{k≥t} β kl_k (k1 on θ_old's log-probs)
    ref = _moved(pol, 1.0)
    with torch.no_grad():
        lref = ref.token_log_probs(ro.prompt_idx, ro.tokens) * m
    ro_k = replace(ro, extras={"ref_logp": lref})
    kl = 0.1 * (ro.logp_old - lref) * m
    rtg = kl.flip(1).cumsum(1).flip(1)
    got = estimator("openrlhf.rloo", kl=tpg_KL(0.1, "k1", "reward"))(ro_k).advantages
    assert_close(got, (loo[:, None] - rtg) * m, what="rloo with k1 in the reward")
    with pytest.raises(TPGError, match="n_samples_per_prompt > 1"):
        adv_of("openrlhf.rloo", batch(mdp, pol, [0, 3], [0, 1]))
    e = O.openrlhf_estimator("rloo", "gspo")
    assert (e.loss, e.agg, e.loss_options["importance_sampling_level"]) == ("trl.clip", "verl.seq-mean-token-mean",
                                                                             "sequence")
    r = report(estimator("openrlhf.rloo", kl=tpg_KL(0.1, "k1", "reward")), mdp, pol, 3, cov=None, ref=ref,
               target=kl_objective_gradient(mdp, pol, ref, 0.1))
    assert r.verdict == "unbiased", r.summary()
    assert report(O.openrlhf_estimator("rloo"), mdp, pol, 3, cov=None).verdict == "biased"     # token-mean


from tpg import KL as tpg_KL  # noqa: E402


def test_configured_declarations_hold_under_the_probes(setup):
    """Configured vouches for locality and exchangeability (its settings act per row / per batch):
    strip the declaration and let the probes confirm it on exact batches drawn from μ."""
    from tpg.batches import Evaluator
    mdp, pol = setup["gaussian"]
    mu = _moved(pol, 0.7, seed=777)
    _, cases = _reduction_cases()
    cases.append(Configured(estimator("rloo", agg="token-mean"), split=3, norm="local"))
    for est in cases:
        def undeclared(ro, est=est):
            return est(ro)
        undeclared.needs = est.needs
        plain = exact.moments(undeclared, mdp, pol, 3, rollout_policy=mu)
        assert any("probed local: holds" in n for n in plain.notes), plain.notes
        if est.split == 1:
            assert any("probed exchangeable: holds" in n for n in plain.notes), (est.name, plain.notes)
        fast = exact.moments(est, mdp, pol, 3, rollout_policy=mu)
        assert_vec_close(fast.mean, plain.mean, what=est.name)


def test_sampled_batches_fill_logp_rollout_like_the_exact_source(setup):
    """The sampler path draws from μ and fills ``logp_rollout`` with the sampler's log-probs (and
    logp / logp_old with θ's / θ_old's): the sample mean of a token-TIS estimate matches the exact
    E ĝ along the target direction (a z-test at 5.3σ, α ≈ 1e-7)."""
    from tpg.batches import SampledBatches
    from tpg.draws import MonteCarloDraws
    from tpg.verify import mc_batches
    mdp, pol = setup["gaussian"]
    old, mu = _moved(pol, 0.3), _moved(pol, 0.7, seed=777)
    gen = torch.Generator().manual_seed(5)
    src = SampledBatches(mdp, pol, MonteCarloDraws(mdp, pol, gen), {}, 2, 4, gen, old_policy=old, rollout_policy=mu)
    ro = next(iter(src)).ro
    with torch.no_grad():
        for p, field in ((mu, ro.logp_rollout), (old, ro.logp_old), (pol, ro.logp)):
            assert_close(field, (p.token_log_probs(ro.prompt_idx, ro.tokens) * ro.mask).double(), kind="f32",
                         what="sampled log-probs")
    on = next(iter(SampledBatches(mdp, pol, MonteCarloDraws(mdp, pol, gen), {}, 2, 4, gen))).ro
    assert on.logp is None and torch.equal(on.logp_rollout, on.logp_old)
    est = Configured(estimator("reinforce", loss="pg"), rollout_is="token_truncate", C=1.5)
    ex = report(est, mdp, pol, 1, cov=None, old_policy=old, rollout_policy=mu)
    u = (ex.mean / ex.mean.norm())[None, :]
    d = mc_batches(est, mdp, pol, 1, 20000, torch.Generator().manual_seed(11), u, old_policy=old, rollout_policy=mu)
    z = (d.mean() - float(u[0] @ ex.mean)) / (d.std(ddof=1) / math.sqrt(len(d)))
    assert abs(z) < 5.3, z
