"""The claims registry (PAPER §7) and the ``tpg verify`` command.

- Every claim agrees with its expected verdict on a few seeded MDPs, for the tabular and the
  log-linear policy (and, for the claims that apply, a tiny GPT-2).
- Over hypothesis-generated MDPs (tests/strategies.py): TRUE claims hold to RTOL = 1e-10 and FALSE
  claims show a bias above ``MARGIN`` (each example takes milliseconds; only exact checks here).
- The checkers can fail: a claim registered with the wrong expected verdict disagrees, and the
  independent formulas behind T13's κ are checked against hand-derived closed forms.
- The independent oracles (``tpg.claims.oracles``) on hand-worked cases; the ``@claim`` registry.
- The CLI: default run (exit 0, the table, the summary line), --claims, --json, --list, unknown ids
  (exit 2, one line, no traceback), a disagreement exits 1; ``render_table`` prints the same table.
Injected bugs that the claims must catch are in tests/test_mutations.py.
"""
from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from strategies import mdps, policies
from tpg import claims
from tpg.claims import CLAIMS, EXPECTED, MARGIN, RTOL, Claim, Exact, binary_mdp, claim, grpo_kappa, oracles
from tpg.cli import main
from tpg.estimators import estimator
from tpg.policies import make_policy



def informative(mdp) -> bool:
    """RM varies within some prompt. Otherwise ∇J is zero up to round-off (Σ_y ∇π(y|x)·const) and no
    relative statement is meaningful (e.g. binary RM equal to 1 on one prompt and 0 on the other)."""
    enum = Exact(mdp, make_policy("tabular", mdp, 0)).tab.enum
    return any(bool(r.max() > r.min()) for r in (enum.rm[enum.prompt_idx == x] for x in range(len(mdp.prompts))))


# ====================================================================================== registry
N_CLAIMS = 38


def test_registry_covers_paper_section_7():
    """T1–T18, F1–F11, N1–N2 are PAPER §7 in its order; T19–T22 and M1–M3 check the engine beyond it."""
    ids = list(CLAIMS)
    assert ids[:22] == [f"T{i}" for i in range(1, 23)]
    assert ids[22:33] == [f"F{i}" for i in range(1, 12)]
    assert ids[33:35] == ["N1", "N2"] and ids[35:] == ["M1", "M2", "M3"] and len(ids) == N_CLAIMS
    for c in CLAIMS.values():
        assert c.expected in EXPECTED, c.id
        assert c.statement and c.equation, c.id
        assert (c.on is not None) or (c.seeded is not None), c.id
        assert (c.truth == "none") == (c.expected == "measured"), c.id


@pytest.mark.parametrize("cid", list(CLAIMS))
@pytest.mark.parametrize("kind", ["tabular", "loglinear"])
def test_every_claim_agrees_on_seeded_mdps(cid, kind):
    c = CLAIMS[cid]
    if kind not in c.policies:
        with pytest.raises(claims.TPGError, match="does not apply"):
            c.check(0, kind)
        return
    for seed in (0, 1, 2):
        r = c.check(seed, kind)
        assert r.agree, f"{cid} seed {seed} {kind}: verdict {r.verdict}, failed {r.failed()}: {r.figure}"
        json.dumps(r.to_dict())                                                 # serialisable
        for ch in r.checks:                                                     # the thresholds are the stated ones
            assert (ch.op, ch.bound) in (("<=", RTOL), (">", MARGIN),
                                         ("<=", 1.0), (">", 1.0), ("<=", 0.0)), (cid, ch)


@pytest.mark.slow
@pytest.mark.parametrize("cid", [c for c in CLAIMS if "gpt2" in CLAIMS[c].policies])
def test_every_claim_agrees_with_gpt2(cid):
    pytest.importorskip("transformers")
    r = CLAIMS[cid].check(0, "gpt2")
    assert r.agree, f"{cid} gpt2: verdict {r.verdict}, failed {r.failed()}: {r.figure}"


def test_a_wrong_expectation_disagrees():
    """The agreement logic can fail: F3's measurement registered as if it were unbiased."""
    wrong = Claim("X1", "mean-only GRPO is unbiased (false)", "-", "unbiased", claims.f3, {"n_prompts": 2})
    r = wrong.check(0)
    assert r.verdict == "scaled" and not r.agree


def test_a_failed_secondary_check_disagrees():
    """F10 with the wrong K in its scale check: the verdict matches but a check fails."""
    bad = Claim("X2", "-", "-", "scaled", _f10_wrong_scale)
    r = bad.check(0)
    assert r.verdict == "scaled" and r.failed() and not r.agree


def _f10_wrong_scale(ex):
    out = claims.f10(ex, K=2)
    out.checks.append(claims.equal("c = 1/2 (wrong on purpose)", abs(out.measured["scale"] - 0.5)))
    return out


# ====================================================================================== independent formulas
@pytest.mark.parametrize("p", [0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_kappa_closed_forms_for_small_groups(p, eps):
    """Hand derivation (ddof = 1): G = 2 groups {1, 0} have σ = 1/√2, so κ = (1/2)/(1/√2 + ε) for
    every p; G = 3 groups with one or two successes have σ = 1/√3 and deviations 2/3, 1/3, so
    κ = (2/3)/(1/√3 + ε) for every p. A group of equal rewards contributes 0."""
    assert math.isclose(grpo_kappa(p, 2, eps), 0.5 / (math.sqrt(0.5) + eps), rel_tol=1e-14)
    assert math.isclose(grpo_kappa(p, 3, eps), (2 / 3) / (1 / math.sqrt(3) + eps), rel_tol=1e-14)


def test_kappa_depends_on_the_rate_for_four_or_more():
    """For G ≥ 4 κ(p) varies with |p − 1/2| (why F4 uses G = 6) and is symmetric in p ↔ 1 − p."""
    assert abs(grpo_kappa(0.9, 6, 1e-6) - grpo_kappa(0.5, 6, 1e-6)) > 0.1
    assert math.isclose(grpo_kappa(0.2, 6, 1e-6), grpo_kappa(0.8, 6, 1e-6), rel_tol=1e-12)


def test_binary_mdp_has_the_stated_number_of_successes():
    mdp = binary_mdp(3, (6, 2), horizon=2)
    enum = Exact(mdp, make_policy("tabular", mdp, 0)).tab.enum
    for x, k in enumerate((6, 2)):
        assert int(enum.rm[enum.prompt_idx == x].sum()) == k
    with pytest.raises(claims.TPGError, match="successes"):
        binary_mdp(0, (0,))


def test_f4_two_prompt_mdp_has_different_success_rates():
    ex = claims.two_rate_mdp(5, "tabular")
    J = ex.tab.J_prompt
    k = [grpo_kappa(float(j), 6, 1e-6) for j in J]
    assert abs(k[0] - k[1]) > 0.05, (J, k)


# ====================================================================================== hypothesis: TRUE claims
TRUE_ON_ANY = ["T1", "T3", "T4", "T5", "T6", "T14", "T15", "T16", "T17", "T20", "T21", "T22"]


@pytest.mark.parametrize("cid", TRUE_ON_ANY)
@given(data=st.data())
def test_true_claims_hold_on_generated_mdps(cid, data):
    mdp = data.draw(mdps(max_responses=60))
    assume(informative(mdp))
    r = CLAIMS[cid].check_on(mdp, data.draw(policies(mdp)), seed=data.draw(st.integers(0, 1000)))
    assert r.agree, f"{cid}: {r.verdict}, failed {r.failed()}: {r.figure} on {mdp!r}"


@pytest.mark.parametrize("cid", ["T8", "T9"])
@given(data=st.data())
def test_gamma_one_claims_hold_on_generated_mdps(cid, data):
    mdp = data.draw(mdps(max_responses=60, gamma=1.0))
    assume(informative(mdp))
    r = CLAIMS[cid].check_on(mdp, data.draw(policies(mdp)))
    assert r.agree, f"{cid}: {r.verdict}, failed {r.failed()}: {r.figure} on {mdp!r}"


@given(data=st.data())
def test_decomposition_invariance_on_generated_mdps(data):
    """T7 needs a decomposition that differs from ZRA: dense token rewards and H ≥ 2."""
    mdp = data.draw(mdps(max_responses=60, rewards=("gaussian",), min_horizon=2))
    r = CLAIMS["T7"].check_on(mdp, data.draw(policies(mdp)))
    assert r.agree, f"T7: {r.verdict}, failed {r.failed()}: {r.figure} on {mdp!r}"


@pytest.mark.parametrize("cid", ["T10", "T11", "T12"])
@given(data=st.data())
def test_group_claims_on_generated_mdps(cid, data):
    mdp = data.draw(mdps(max_responses=20))
    assume(informative(mdp))
    ex = Exact(mdp, data.draw(policies(mdp)))
    out = claims.t12(ex, Gs=(2, 3)) if cid == "T12" else CLAIMS[cid].on(ex)
    assert out.verdict == CLAIMS[cid].expected and all(c.ok for c in out.checks), (cid, out.figure, mdp)


@pytest.mark.parametrize("cid", ["T13", "T18"])
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["tabular", "loglinear"]))
def test_binary_reward_claims_on_generated_mdps(cid, seed, kind):
    r = CLAIMS[cid].check(seed, kind)
    assert r.agree, f"{cid}: {r.verdict}, failed {r.failed()}: {r.figure}"


# ====================================================================================== hypothesis: FALSE claims
def assert_false_claim(cid, out):
    c = CLAIMS[cid]
    assert out.verdict == c.expected, (cid, out.verdict, out.figure)
    assert out.score > MARGIN, (cid, out.score)
    bad = [ch for ch in out.checks if not ch.ok]
    assert not bad, (cid, bad)


@pytest.mark.parametrize("cid", ["F3", "F6", "F10"])
@given(data=st.data())
def test_false_claims_on_generated_mdps(cid, data):
    """Biases with an exact size (F3: 1/G, F10: 1/(K+1)) or of order β (F6). H ≥ 2: with one state
    and two tokens every vector in the tabular gradient space is a multiple of ∇J ("scaled")."""
    mdp = data.draw(mdps(max_responses=20, rewards=("gaussian", "zra"), min_horizon=2))
    ex = Exact(mdp, data.draw(policies(mdp, kinds=("tabular",))), seed=data.draw(st.integers(0, 1000)))
    assert_false_claim(cid, CLAIMS[cid].on(ex) if cid != "F3" else claims.f3(ex, Gs=(2,)))


@given(data=st.data())
def test_dropping_the_discount_is_biased_on_generated_mdps(data):
    """F1 needs γ < 1 away from 1 and at least two positions."""
    gamma = data.draw(st.floats(0.3, 0.9))
    mdp = data.draw(mdps(max_responses=60, rewards=("gaussian",), gamma=gamma, min_horizon=2))
    assert_false_claim("F1", CLAIMS["F1"].on(Exact(mdp, data.draw(policies(mdp, kinds=("tabular",))))))


@given(data=st.data())
def test_length_normalisation_is_biased_on_generated_mdps(data):
    """F5 needs lengths that vary: EOS and H ≥ 2."""
    mdp = data.draw(mdps(max_responses=60, rewards=("gaussian", "zra"), eos=True, min_horizon=2))
    assert_false_claim("F5", CLAIMS["F5"].on(Exact(mdp, data.draw(policies(mdp, kinds=("tabular",))))))


@given(data=st.data())
def test_gae_with_a_wrong_critic_is_biased_on_generated_mdps(data):
    """F8 (γ = 1, dense rewards, H ≥ 2 so that λ matters)."""
    mdp = data.draw(mdps(max_responses=60, rewards=("gaussian",), gamma=1.0, min_horizon=2))
    ex = Exact(mdp, data.draw(policies(mdp, kinds=("tabular",))), seed=data.draw(st.integers(0, 1000)))
    assert_false_claim("F8", CLAIMS["F8"].on(ex))


# ====================================================================================== the CLI
def test_verify_default_run(capsys):
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    assert f"{N_CLAIMS} claims: {N_CLAIMS} agree, 0 disagree" in out
    for cid in CLAIMS:
        assert f"\n{cid:<4} " in out
    assert "DISAGREE" not in out


def test_verify_subset_and_json(tmp_path, capsys):
    path = tmp_path / "v.json"
    assert main(["verify", "--claims", "T12", "f3", "--seeds", "3", "--seed", "5", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 claims: 2 agree, 0 disagree" in out
    doc = json.loads(path.read_text())
    assert [c["id"] for c in doc["claims"]] == ["T12", "F3"]
    assert doc["seeds"] == [5, 6, 7] and doc["summary"]["disagree"] == 0
    t12 = doc["claims"][0]["results"]
    assert [r["seed"] for r in t12] == [5, 6, 7]
    assert all(abs(r["measured"]["G=4"]["c"] - 0.75) < 1e-12 for r in t12)


def test_verify_unknown_claim_exits_2_with_one_line(capsys):
    assert main(["verify", "--claims", "T99", "T1"]) == 2
    err = capsys.readouterr().err
    assert "unknown claim id(s) T99" in err and "T1 T2" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_verify_list_and_tabular_only_skip(capsys):
    assert main(["verify", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == len(CLAIMS) and "[tabular only]" in out
    assert main(["verify", "--policy", "loglinear", "--claims", "T2", "T10"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "closed form" in out and "1 claims: 1 agree, 0 disagree, 1 skipped" in out


def test_verify_bad_seeds_is_a_user_error(capsys):
    assert main(["verify", "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_verify_exits_1_on_disagreement(monkeypatch, capsys):
    wrong = Claim("X1", "mean-only GRPO is unbiased (false on purpose)", "-", "unbiased", claims.f3, {"n_prompts": 2})
    monkeypatch.setitem(CLAIMS, "X1", wrong)
    assert main(["verify", "--claims", "X1", "T12"]) == 1
    out = capsys.readouterr().out
    assert "DISAGREE" in out and "2 claims: 1 agree, 1 disagree" in out


def test_a_crashing_check_is_reported_not_raised(monkeypatch, capsys):
    def boom(ex):
        raise RuntimeError("simulated failure")
    monkeypatch.setitem(CLAIMS, "X3", Claim("X3", "-", "-", "holds", boom))
    assert main(["verify", "--claims", "X3"]) == 1
    out = capsys.readouterr().out
    assert "error: RuntimeError" in out and "simulated failure" in out


# ====================================================================================== the registry decorator
def test_claims_are_registered_in_definition_order_with_unique_ids(monkeypatch):
    """``@claim`` registers next to the check; a second registration of an id, or an unknown expected
    verdict, is refused."""
    monkeypatch.setattr(claims.base, "CLAIMS", dict(CLAIMS))
    with pytest.raises(claims.TPGError, match="twice"):
        claims.base.claim("T1", "-", "-", "holds")(lambda ex: None)
    with pytest.raises(claims.TPGError, match="expected verdict"):
        claim("X9", "-", "-", "maybe")
    def seeded(seed, kind):
        return claims.Outcome("holds", "-", 0.0, {})
    claims.base.claim("X8", "-", "-", "holds", seeded=True)(seeded)
    c = claims.base.CLAIMS["X8"]
    assert list(claims.base.CLAIMS)[-1] == "X8" and c.seeded is seeded and c.on is None and c.check(0).agree


# ====================================================================================== independent oracles
def test_gae_closed_form_on_a_hand_worked_response():
    """T = 2, r = (1, 2), V̂ = (0.5, 0.25), γ = 0.5, λ = 0.5: δ_1 = 1 + 0.5·0.25 − 0.5 = 0.625,
    δ_2 = 2 + 0 − 0.25 = 1.75; Â_1 = δ_1 + γλ δ_2 = 0.625 + 0.4375 = 1.0625, Â_2 = 1.75."""
    r = np.array([[1.0, 2.0, 0.0]])
    v = np.array([[0.5, 0.25, 0.0]])
    got = oracles.gae_closed_form(r, v, np.array([2]), 0.5, 0.5)
    assert np.allclose(got, [[1.0625, 1.75, 0.0]], rtol=0, atol=1e-15)


def test_interpolation_formula_on_a_hand_worked_response():
    """T = 4, anchors {1, 4}, v = (0, 1, 3, 6, 10): Â_1 = 1, Â_4 = 4; t = 2: x = 1/3 → 2/3·1 + 1/3·4 = 2;
    t = 3: x = 2/3 → 1/3 + 8/3 = 3. Chunks (0, 1], (1, 4]: 1, then 9 (and 9/3 = 3 per token)."""
    v = np.array([[0.0, 1.0, 3.0, 6.0, 10.0]])
    T = np.array([4])
    assert np.allclose(oracles.trepo_anchor_formula(v, T, [1], "interp"), [[1, 2, 3, 4]])
    assert np.allclose(oracles.trepo_anchor_formula(v, T, [1], "chunk"), [[1, 9, 9, 9]])
    assert np.allclose(oracles.trepo_anchor_formula(v, T, [1], "value_interp"), [[1, 3, 3, 3]])


def test_clip_region_truth_table():
    """Unclipped iff A > 0 and ρ ≤ 1 + ε_h, or A < 0 and 1 − ε_l ≤ ρ (≤ c with the dual clip)."""
    A = np.array([1.0, 1.0, -1.0, -1.0, -1.0, 0.0])
    rho = np.array([1.1, 1.3, 0.7, 1.5, 2.5, 1.0])
    assert oracles.clip_active(A, rho, 0.2).tolist() == [True, False, False, True, True, False]
    assert oracles.clip_active(A, rho, 0.2, clip_high=0.35).tolist() == [True, True, False, True, True, False]
    assert oracles.clip_active(A, rho, 0.2, dual_clip=2.0).tolist() == [True, False, False, True, False, False]


def test_reach_probabilities_sum_to_one_per_level_and_weight_prompts():
    ex = claims.setup(3, "tabular", n_prompts=2, prompt_probs=(0.25, 0.75), eos=False)
    reach = oracles.reach_probabilities(ex.mdp, ex.pol, ex.tab.enum)
    st_ = ex.mdp.state_table()
    for x, rho in enumerate((0.25, 0.75)):
        for lvl in range(ex.mdp.horizon):           # no EOS: every response passes one state per level
            sel = (st_["prompt"] == x) & (st_["level"] == lvl)
            assert math.isclose(reach[sel].sum(), rho, rel_tol=1e-12)


def test_t19_exercises_every_clip_branch():
    """Each T19 loss clips tokens with positive probability, and the dual clip caps some (so the
    check of the clip region can fail)."""
    r = CLAIMS["T19"].check(0, "tabular")
    masses = [v["clipped_tokens"] for k, v in r.measured.items() if k != "dual_clip"]
    assert len(masses) == 3 and min(masses) > 0.01 and r.measured["dual_clip"]["capped_tokens"] > 0.01, r.measured


# ====================================================================================== Monte Carlo claims
def test_mc_claims_pass_n_batches_or_leave_it_to_mc_check(monkeypatch):
    """``run_mc_check`` passes n_batches when given; with None it defers to an mc_check whose
    n_batches has a default, and refuses, naming the fix, when mc_check requires one."""
    from tpg.claims import montecarlo
    seen = {}

    def designed(est, mdp, policy, G, n_batches=None, generator=None, target=None, **kw):
        seen.update(n_batches=n_batches, generator=generator)
        return "report"
    ex = claims.setup(0, "tabular")
    monkeypatch.setattr(montecarlo, "mc_check", designed)
    assert montecarlo.run_mc_check(estimator("reinforce"), ex, 1, ex.grad, 0, None) == "report"
    assert seen["n_batches"] is None and seen["generator"] is not None
    montecarlo.run_mc_check(estimator("reinforce"), ex, 1, ex.grad, 0, 123)
    assert seen["n_batches"] == 123

    def required(est, mdp, policy, G, n_batches, generator, target=None, **kw):
        return "report"
    monkeypatch.setattr(montecarlo, "mc_check", required)
    with pytest.raises(claims.TPGError, match="needs n_batches"):
        montecarlo.run_mc_check(estimator("reinforce"), ex, 1, ex.grad, 0, None)


def test_mc_claim_negative_controls_have_power():
    """M1 and M3's negative controls fail with an exact bias above their detectable bias."""
    for cid in ("M1", "M3"):
        r = CLAIMS[cid].check(1, "tabular")
        neg = [c for c in r.checks if "negative control" in c.name]
        assert len(neg) == 2 and all(c.ok for c in neg), (cid, neg)


# ====================================================================================== the README table
def test_render_table_is_the_cli_table(capsys):
    ids = ["T12", "F3", "M3"]
    text = claims.render_table("tabular", (0,), ids)
    assert main(["verify", "--claims", *ids, "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    strip = lambda s: [line.rsplit(" (", 1)[0] if line.startswith("3 claims") else line for line in s.splitlines()]  # noqa: E731
    assert strip(text) == strip(out)
    assert "3 claims: 3 agree, 0 disagree" in text


def test_a_negative_control_is_the_same_batches_against_the_wrong_target():
    """``Test.control`` (the statistics against the wrong target, from the passing test's report)
    equals ``mc_check`` run against that target on the same seed and directions."""
    from tpg.claims import montecarlo
    ex = claims.setup(2, "tabular")
    est = estimator("trepo", variant="all", K=1, self_inclusive=True)
    t = montecarlo.designed("K=1", est, ex, 1, 0.5 * ex.grad, 7, 2000, wrong=ex.grad)
    direct = montecarlo.run_mc_check(est, ex, 1, ex.grad, 7, 2000, directions=t.u)
    z, power = t.control()
    assert math.isclose(z, float(np.max(np.abs(direct.stat)) / direct.threshold), rel_tol=1e-9)
    assert math.isclose(power, float(np.min(direct.detectable / np.abs(direct.exact_bias))), rel_tol=1e-9)
