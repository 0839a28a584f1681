"""The claims registry (PAPER §7) and the ``tpg verify`` command.

- Every claim agrees with its expected verdict on a few seeded MDPs, for the tabular and the
  log-linear policy (and, for the claims that apply, a tiny GPT-2).
- Over hypothesis-generated MDPs (tests/strategies.py): TRUE claims hold to RTOL = 1e-10 and FALSE
  claims show a bias above ``MARGIN`` (each example takes milliseconds; only exact checks here).
- The checkers can fail: a claim registered with the wrong expected verdict disagrees, and the
  independent formulas behind T13's κ are checked against hand-derived closed forms.
- The CLI: default run (exit 0, the table, the summary line), --claims, --json, --list, unknown ids
  (exit 2, one line, no traceback), a disagreement exits 1.
"""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import assume, given, strategies as st

from strategies import mdps, policies
from tpg import claims
from tpg.claims import CLAIMS, EXPECTED, MARGIN, RTOL, Claim, Exact, binary_mdp, grpo_kappa
from tpg.cli import main
from tpg.policies import make_policy



def informative(mdp) -> bool:
    """RM varies within some prompt. Otherwise ∇J is zero up to round-off (Σ_y ∇π(y|x)·const) and no
    relative statement is meaningful (e.g. binary RM equal to 1 on one prompt and 0 on the other)."""
    enum = Exact(mdp, make_policy("tabular", mdp, 0)).tab.enum
    return any(bool(r.max() > r.min()) for r in (enum.rm[enum.prompt_idx == x] for x in range(len(mdp.prompts))))


# ====================================================================================== registry
def test_registry_covers_paper_section_7():
    ids = list(CLAIMS)
    assert ids[:18] == [f"T{i}" for i in range(1, 19)]
    assert ids[18:29] == [f"F{i}" for i in range(1, 12)]
    assert all(i.startswith("N") for i in ids[29:]) and len(ids) == 31
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
                                         ("<=", 1.0), ("<=", 0.0)), (cid, ch)


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
TRUE_ON_ANY = ["T1", "T3", "T4", "T5", "T6", "T14", "T15", "T16", "T17"]


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
    assert "31 claims: 31 agree, 0 disagree" in out
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
