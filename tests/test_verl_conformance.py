"""tpg's verl definitions against outputs recorded from the real verl 0.9.1 functions (no verl needed).

``tests/data/verl_0.9.1.json`` is written by ``benchmarks/record_verl.py`` (run by hand where verl is
importable): every function of verl's ``ADV_ESTIMATOR_REGISTRY`` and ``POLICY_LOSS_REGISTRY``, called as
the trainer calls it, plus ``agg_loss`` (every mode, local and over two data-parallel ranks) and
``kl_penalty`` (every type). Each case is replayed here through tpg's definition
(``tpg.estimators.verl.VERL_NAMES`` / ``VERL_LOSSES``) and compared on the valid tokens.

Tolerances (relative to max(1, ‖verl's output‖_∞)):
- ``F64`` = 1e-12: verl computes in float64 on float64 inputs; what remains is summation order.
- ``F32`` = 2e-6: a float32 island inside verl — ``group_mean_std`` (grpo_vectorized), a singleton's
  σ = ``torch.tensor(1.0)`` (grpo: σ + ε is float32(1 + 1e-6), 4.6e-8 away), gpg's α = B/m
  (int / int tensor → float32), gdpo's float32 components and weights, and every batch whitening, whose
  Bessel factor ``mask_sum / (mask_sum − 1)`` is int64 / int64 → float32 (relative error ≤ 6e-8 of the
  variance). Float32 has ε = 1.2e-7; a few roundings divided by a group std ≥ 0.3 stay below 2e-6.
Integer masks (the trainer's ``response_mask``) make verl's ``n + 1e-8`` divisors float32, where the
1e-8 vanishes: exact counts (tpg ``verl.seq-mean-token-mean``); with a float64 mask they are n + 1e-8
(tpg ``seq-mean-token-mean``) — both recorded, and the difference asserted to be exactly that.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tpg.estimators import core as C
from tpg.estimators import gae as GAE
from tpg.estimators import outcome as O
from tpg.estimators import verl as V
from tpg.mdp import TPGError
from tpg.rollouts import Rollouts

DATA = Path(__file__).resolve().parent / "data" / "verl_0.9.1.json"
F64, F32 = 1e-12, 2e-6
D = torch.float64

# verl functions whose arithmetic has a float32 island on float64 inputs (module docstring)
F32_ADV = {"grpo", "grpo_vectorized", "gpg", "gdpo", "gae", "reinforce_plus_plus", "reinforce_plus_plus_baseline"}
# recorded but deliberately not compared value-by-value, with the reason the test asserts below
NOT_EXACT = {
    "clip_cov": "torch.randperm picks which eligible tokens verl drops; tpg takes the expectation over the "
                "permutation (documented): the eligible set, the count and the untouched tokens are compared",
}

ERRORS: dict[str, float] = {}          # function -> worst relative error seen (printed by test_summary)


@pytest.fixture(scope="module")
def rec():
    return json.loads(DATA.read_text())


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(tag: str, got, exp, tol: float, mask=None, what: str = ""):
    got, exp = torch.as_tensor(got, dtype=D), torch.as_tensor(exp, dtype=D)
    if mask is not None:
        got, exp = got * mask, exp * mask
    scale = max(1.0, float(exp.abs().max())) if exp.numel() else 1.0
    err = float((got - exp).abs().max()) / scale if exp.numel() else 0.0
    ERRORS[tag] = max(ERRORS.get(tag, 0.0), err)
    assert err <= tol, f"{tag} {what}: relative error {err:.3g} > {tol:g}\ntpg  {got}\nverl {exp}"


@dataclass
class _StateRollouts(Rollouts):
    """Rollouts whose prefix states are the (B, L) token slots themselves, so a recorded per-token
    Σπ² (verl's ``sum_pi_squared``) is tpg's per-state ``pi_sq`` at ``ro.states``."""

    @property
    def states(self):
        B, L = self.tokens.shape
        return torch.arange(B * L).reshape(B, L)


def rollouts(b: dict, logp_old=None) -> Rollouts:
    """The tpg batch of a recorded verl batch: one batch, groups = verl's ``index``, rm = the task
    reward (verl's token_level_rewards minus the KL-in-reward part, kept in ``kl_reward``)."""
    mask = t(b["mask"])
    B, L = mask.shape
    kl = t(b["kl"]) if b["kl_in_reward"] else None
    rm = t(b["rm"]) - (kl.sum(1) if kl is not None else 0.0)
    return _StateRollouts(torch.zeros(B, dtype=torch.long), torch.zeros(B, L, dtype=torch.long), mask,
                          t(b["token_level_rewards"]), rm, torch.tensor(b["index"]), torch.zeros(B, dtype=torch.long),
                          1, logp_old=t(b["old_log_probs"]) if logp_old is None else logp_old,
                          extras={"values": t(b["values"]), "greedy_rm": t(b["reward_baselines"])}, kl_reward=kl)


def tpg_advantage(case: dict, ro: Rollouts, b: dict) -> torch.Tensor:
    f, kw, cfg = case["function"], case["kwargs"], case["config"]
    if f == "gae":
        return GAE.gae(ro, gamma=kw["gamma"], lam=kw["lam"], whiten=True)
    if f == "grpo":
        return O.grpo(ro, std=kw["norm_adv_by_std_in_grpo"])
    if f == "grpo_passk":
        return V.grpo_passk(ro, norm_adv_by_std_in_grpo=cfg["norm_adv_by_std_in_grpo"])
    if f == "gdpo":
        if cfg and cfg["gdpo_reward_keys"]:
            comps = np.array(b["components"])
            return V.gdpo(ro, components=lambda r: comps, weights=cfg["gdpo_reward_weights"])
        return V.gdpo(ro)
    if f == "reinforce_plus_plus":
        return O.reinforce_pp(ro, gamma=cfg["gamma"])
    if "optimal_token_baseline" in f:
        pi_sq = t(b["sum_pi_squared"]).reshape(-1)
        fn = V.optimal_token_baseline if f == "optimal_token_baseline" else V.tir_optimal_token_baseline
        return fn(ro, pi_sq=pi_sq, handle_zero_tail=kw["handle_zero_tail"])
    spec = C.ADVANTAGES[V.VERL_NAMES[f]]                                 # the remaining names take no option
    return spec.fn(ro)


def tpg_returns(case: dict, ro: Rollouts) -> torch.Tensor | None:
    """verl's second output where it is not the advantage: GAE's Â + V, the (discounted) reward-to-go."""
    f = case["function"]
    if f == "gae":
        kw = case["kwargs"]
        return GAE.gae_advantages(ro.token_rewards * ro.mask, ro.extras["values"], ro.mask, kw["gamma"],
                                  kw["lam"]) + ro.extras["values"]
    if f in ("remax", "optimal_token_baseline", "tir_optimal_token_baseline", "reinforce_plus_plus"):
        gamma = case["config"]["gamma"] if f == "reinforce_plus_plus" else 1.0
        return O.rewards_to_go(O._outcome_token_rewards(ro), gamma) * ro.mask
    return None


# ====================================================================================== coverage
def test_recorded_file(rec):
    assert rec["verl_version"] == "0.9.1"
    assert DATA.stat().st_size < 2e6
    assert set(rec["adv_functions"]) == {c["function"] for c in rec["adv_cases"]}, "an advantage was not recorded"
    assert set(rec["loss_functions"]) == {c["function"] for c in rec["loss_cases"]}, "a policy loss was not recorded"
    # every verl name has a tpg counterpart
    assert set(rec["adv_functions"]) == set(V.VERL_NAMES)
    assert set(rec["loss_functions"]) == set(V.VERL_LOSSES)
    assert {c["mode"] for c in rec["agg_cases"]} == set(C.AGG_MODES)
    assert {c["kind"] for c in rec["kl_cases"]} == set(V.VERL_KL) | {"full"}


# ====================================================================================== advantages
def test_advantages(rec):
    n = 0
    for case in rec["adv_cases"]:
        b = rec["batches"][case["batch"]]
        ro = rollouts(b)
        tag = f"adv {case['function']}"
        if "error" in case:                                               # verl raises: tpg refuses too
            assert case["function"] == "grpo_passk" and "at least 2 samples" in case["error"]
            with pytest.raises(TPGError, match="at least 2"):
                tpg_advantage(case, ro, b)
            continue
        tol = F32 if case["function"] in F32_ADV else F64
        close(tag, tpg_advantage(case, ro, b), case["advantages"], tol, ro.mask, f"{case['batch']} {case['label']}")
        ret = tpg_returns(case, ro)
        if ret is not None:
            close(f"ret {case['function']}", ret, case["returns"], F64, ro.mask, f"{case['batch']} {case['label']}")
        n += 1
    assert n >= 100


# ====================================================================================== policy losses
AGG_OF = {("token-mean", "int"): "token-mean", ("seq-mean-token-sum", "int"): "seq-mean-token-sum",
          ("seq-mean-token-mean", "int"): "verl.seq-mean-token-mean"}


def tpg_loss(case: dict, logp, old, adv, mask, ro):
    name, pl = case["function"], case["policy_loss"]
    fn = V.__dict__["gpg_loss" if name == "gpg" else name]
    kw = {}
    if name == "clip_cov":
        kw = dict(ro=ro, clip_cov_ratio=pl["clip_cov_ratio"])
    elif name == "kl_cov":
        kw = dict(ro=ro, kl_cov_ratio=pl.get("kl_cov_ratio", 2e-4), ppo_kl_coef=case["config"]["ppo_kl_coef"])
    elif name == "dro":
        kw = dict(beta=pl["dro_beta"])
    elif name == "sapo":
        kw = dict(tau_pos=case["config"]["tau_pos"], tau_neg=case["config"]["tau_neg"])
    elif name in ("vanilla", "dppo_tv", "dppo_kl"):
        kw = dict(clip_low=case["config"]["clip_ratio"], clip_ratio_c=case["config"]["clip_ratio_c"])
    elif name == "bypass_mode":
        rc = pl.get("rollout_correction", {})
        kw = dict(loss_type=rc.get("loss_type", "ppo_clip"), rollout_is=rc.get("rollout_is", "sequence"),
                  rollout_is_threshold=rc.get("rollout_is_threshold", 2.0))
    return fn(logp, old, adv, mask, **kw)


def test_policy_losses(rec):
    n_elig = 0
    for case in rec["loss_cases"]:
        b = rec["loss_batches"][case["batch"]]
        mask = t(b["mask"])
        B, L = mask.shape
        old, adv = t(b["old_log_prob"]), t(b[case["advantages"]])
        leaf = t(b["log_prob"]).requires_grad_(True)
        ro = Rollouts(torch.zeros(B, dtype=torch.long), torch.zeros(B, L, dtype=torch.long), mask,
                      torch.zeros(B, L, dtype=D), torch.zeros(B, dtype=D), torch.zeros(B, dtype=torch.long),
                      torch.zeros(B, dtype=torch.long), 1, logp=leaf, logp_old=old)
        name, mode = case["function"], case["loss_agg_mode"]
        # the mode verl really used: tpg's FORCED_AGG must say exactly which losses ignore loss_agg_mode
        used = case["agg_mode_used"] or "seq-mean-token-mean"              # geo_mean: a plain mean over rows
        forced = V.FORCED_AGG.get(f"verl.{name}")
        if used != mode or name == "geo_mean":
            assert forced == "verl.seq-mean-token-mean", f"verl {name} ignores loss_agg_mode {mode!r}; FORCED_AGG"
        else:
            assert forced is None, f"verl 0.9.1 {name} aggregates with the mode it is given ({mode!r}), " \
                                   f"but FORCED_AGG forces {forced!r}"
        per_tok = tpg_loss(case, leaf, old, adv, mask, ro)
        w = C.AGGREGATIONS[AGG_OF[(used, "int")]].fn(ro)
        loss = (w * per_tok).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
        tag = f"loss {name}"
        what = f"{case['label']} {case['batch']} {mode} {case['advantages']}"
        if name in NOT_EXACT:
            full = torch.maximum(-adv * torch.exp(leaf - old),
                                 -adv * torch.clamp(torch.exp(leaf - old), 0.8, 1.2)).detach()
            corr = torch.where(full != 0, per_tok.detach() / full, torch.ones_like(full))   # tpg's E[corr]
            vm = t(case["loss_mat"])
            dropped = (vm == 0) & (full != 0) & (mask > 0)
            elig = (corr < 1) & (mask > 0)
            assert bool((dropped <= elig).all()), f"clip_cov {what}: verl dropped a token tpg deems ineligible"
            k = max(int(case["policy_loss"]["clip_cov_ratio"] * int(mask.sum())), 1)
            ne = int(elig.sum())
            assert int(dropped.sum()) == min(k, ne)
            if ne:
                close(tag + " E[corr]", corr[elig], torch.full((ne,), 1 - min(k, ne) / ne), F64)
            close(tag + " kept tokens", per_tok.detach() * ~elig, vm * ~elig, F64, mask, what)
            n_elig += ne
            continue
        tol = F64
        if case["loss_mat"] is not None:
            close(tag + " per-token", per_tok.detach(), case["loss_mat"], tol, mask, what)
        close(tag, loss.detach(), case["loss"], tol, what=what)
        close(tag + " grad", grad, case["grad"], tol, mask, what)
    assert n_elig > 0, "no clip_cov case had an eligible token: the comparison above would be vacuous"


# ====================================================================================== agg_loss
def test_agg_loss(rec):
    for case in rec["agg_cases"]:
        mat, mask = t(case["loss_mat"]), t(case["mask"])
        B, L = mask.shape
        ro = Rollouts(torch.zeros(B, dtype=torch.long), torch.zeros(B, L, dtype=torch.long), mask,
                      torch.zeros(B, L, dtype=D), torch.zeros(B, dtype=D), torch.zeros(B, dtype=torch.long),
                      torch.zeros(B, dtype=torch.long), 1)
        mode, lsf, intmask = case["mode"], case["loss_scale_factor"], case["mask_dtype"] == "int64"
        name = "verl.seq-mean-token-mean" if mode == "seq-mean-token-mean" and intmask else mode
        val = (C.AGGREGATIONS[name].fn(ro, constant=lsf) * mat).sum()
        what = f"{mode} {case['mask_dtype']} C={lsf}"
        close(f"agg {mode}", val, case["loss"], F64, what=what)
        if mode == "seq-mean-token-mean":                  # the documented difference: n + 1e-8 vs exact n
            other = "seq-mean-token-mean" if intmask else "verl.seq-mean-token-mean"
            alt = (C.AGGREGATIONS[other].fn(ro) * mat).sum()
            n = mask.sum(1)
            expect = ((mat * mask).sum(1) / (n + 1e-8 if intmask else n)).sum() / B
            close("agg seq-mean-token-mean (the other divisor)", alt, expect, F64, what=what)
            assert float(abs(alt - case["loss"])) > 1e-12 * abs(float(val)), "the two divisors must differ"
        # two data-parallel ranks with the global counts: DDP's average of the two equals the unsplit loss
        close(f"agg {mode} dp=2 global", sum(case["dp2_global"]) / 2, val, F64, what=what)
        if mode == "token-sum":
            assert case["dp2_without_global"] is None          # needs no global count
        else:
            assert "required when dp_size > 1" in case["dp2_without_global"]


# ====================================================================================== kl_penalty
def test_kl_penalty(rec):
    for case in rec["kl_cases"]:
        x = t(case["logprob"]).requires_grad_(True)
        ref = t(case["ref_logprob"])
        if "error" in case:
            assert case["kind"] == "full"
            with pytest.raises(TPGError, match="full"):
                V.kl_penalty(x, ref, case["kind"])
            continue
        val = V.kl_penalty(x, ref, case["kind"])
        (g,) = torch.autograd.grad(val.sum(), x)
        close(f"kl {case['kind']}", val.detach(), case["value"], F64, what=case["label"])
        close(f"kl {case['kind']} grad", g, case["grad"], F64, what=case["label"])


def test_summary(rec, capsys):
    """Print the worst relative error per function (run with -s to see it)."""
    test_advantages(rec), test_policy_losses(rec), test_agg_loss(rec), test_kl_penalty(rec)
    if True:
        print("\nverl 0.9.1 conformance, worst relative error per function:")
        for k in sorted(ERRORS):
            print(f"  {k:55s} {ERRORS[k]:.2e}")
    assert set(rec["loss_functions"]) - set(NOT_EXACT) <= {k.split()[1] for k in ERRORS if k.startswith("loss ")}


# ====================================================================================== verl's own code, exact verdicts
def _verl_or_skip():
    from tpg.estimators import verl_adapter
    if not verl_adapter.available():
        pytest.skip("verl is not installed (its dependencies pull ray and vllm); install: pip install --no-deps "
                    "verl==0.9.1 tensordict omegaconf antlr4-python3-runtime codetiming")
    return verl_adapter


# verl loss -> (tpg loss_options, verl PolicyLossConfig fields)
LOSS_OPTS = {"dro": ({"beta": 0.1}, {"dro_beta": 0.1})}
SKIP_VERDICT = {"clip_cov": "verl drops a torch.randperm-chosen token: its estimate is random, not a function "
                            "of the batch (tpg takes the expectation, compared above)"}


def test_verl_native_verdicts():
    """verl's own functions (tpg.estimators.verl_adapter) and tpg's definitions get the same exact verdict,
    scale κ and residual on seeded MDPs: every advantage with vanilla / token-mean, every policy loss with
    rloo. Tolerance: 1e-6 relative on κ and 1e-6 absolute on the residual (the float32 islands above, 2e-6
    per advantage, averaged over the enumerated batches)."""
    A = _verl_or_skip()
    from tpg import TabularSoftmax, random_mdp, report
    from tpg.zoo import _exact_critic
    rows = []
    for seed, reward in ((0, "gaussian"), (1, "binary")):
        mdp = random_mdp(seed, vocab_size=3, horizon=3, n_prompts=1, reward=reward)
        pol = TabularSoftmax(mdp, seed=seed)
        pi_sq = V.sum_pi_squared(pol)
        crit = {"critic": _exact_critic(pol)}
        pairs = []
        for name in V.VERL_NAMES:
            o = {"pi_sq": pi_sq} if "optimal_token" in name else {}
            tpg_o = dict(o, whiten=True) if name == "gae" else o          # verl always whitens GAE
            # tpg's grpo_vectorized models the trainer's float32 scores (its float32 island): feed verl float32
            # rewards there; on float64 rewards verl mixes float64 scores with float32 statistics, which moves κ
            # by 1e-4 where two enumerated rewards nearly tie
            v_o = dict(o, reward_dtype=torch.float32) if name == "grpo_vectorized" else o
            pairs.append((f"adv {name}", A.verl_native(name, **v_o), V.verl_estimator(name, **tpg_o),
                          crit if name == "gae" else {}))
        if seed == 0:
            for loss in V.VERL_LOSSES:
                if loss in SKIP_VERDICT:
                    continue
                to, vo = LOSS_OPTS.get(loss, ({}, {}))
                pairs.append((f"loss {loss}", A.verl_native("rloo", loss, policy_loss=vo),
                              V.verl_estimator("rloo", loss=loss, loss_options=to), {}))
        for label, native, mine, kw in pairs:
            rv, rt = report(native, mdp, pol, 2, **kw), report(mine, mdp, pol, 2, **kw)
            rows.append((reward, label, rv.verdict, rt.verdict, rv.scale, rt.scale, rv.residual, rt.residual))
            assert rv.verdict == rt.verdict, (reward, label, rv.verdict, rt.verdict)
            assert abs(rv.scale - rt.scale) <= 1e-6 * max(1.0, abs(rt.scale)), (reward, label, rv.scale, rt.scale)
            assert abs(rv.residual - rt.residual) <= 1e-6, (reward, label, rv.residual, rt.residual)
    print("\nreward    estimator                             verdict(verl/tpg)    κ verl         κ tpg"
          "          res verl   res tpg")
    for r in rows:
        print(f"{r[0]:9s} {r[1]:37s} {r[2]:>8s}/{r[3]:<8s} {r[4]: .10f} {r[5]: .10f} {r[6]:.2e} {r[7]:.2e}")
