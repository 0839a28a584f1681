"""The exact engine checks its shortcuts on the estimator at hand (``tpg.batches``), never assumes them.

- A catalogue of user-written estimators that break a shortcut — batch-global statistics, group
  members treated asymmetrically, advantages nonlinear in continuation returns, randomness inside
  the estimator — gets the verdict of an independent per-batch hand enumeration (autograd of the
  loss of each batch alone, ``hand_moments``), or a refusal naming the failed property.
- Every built-in declaration (``register_advantage(..., local=True, ...)``) is confirmed by the
  same probes the engine runs on undeclared estimators.
- Exact verdicts need float64: a float32/float16 policy is "inconclusive", with the reason.
- The bring-your-own-estimator API refuses misuse at registration: unknown extra draws, silent
  overwrites, wrong advantage shapes (also when B == L), presets that override explicit options.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close, assert_vec_close
from test_moments import hand_moments
from tpg import TabularSoftmax, TPGError, estimator, exact, random_mdp, register_advantage, report
from tpg.batches import Evaluator, ExactBatches, PropertyError
from tpg.draws import ExactDraws, exact_critic
from tpg.estimators import ADVANTAGES, AGGREGATIONS, register_aggregation, register_policy_loss
from tpg.estimators.core import check_needs
from tpg.rollouts import Rollouts, enumerate_responses


@pytest.fixture(scope="module")
def small():
    mdp = random_mdp(4, vocab_size=3, horizon=2, eos=True, n_prompts=2, prompt_probs=[0.3, 0.7], gamma=0.9)
    return mdp, TabularSoftmax(mdp, seed=4)


def ordered_batches(mdp, policy, G, n_prompts=1):
    """Every ordered batch [(P, rows, groups)] by brute force (itertools, no multisets)."""
    import itertools
    tab = exact.tables(mdp, policy)
    slots = list(itertools.product(range(len(tab.prob)), repeat=G))           # one prompt draw: G responses
    out = []
    for combo in itertools.product(slots, repeat=n_prompts):
        rows = [r for slot in combo for r in slot]
        ok = all(len({int(tab.enum.prompt_idx[r]) for r in slot}) == 1 for slot in combo)
        if not ok:
            continue
        p = 1.0
        for slot in combo:
            x = int(tab.enum.prompt_idx[slot[0]])
            p *= float(mdp.prompt_probs[x]) * float(torch.prod(tab.prob[list(slot)] / mdp.prompt_probs[x]))
        out.append((p, rows, [i // G for i in range(len(rows))]))
    return out


# ====================================================================================== user catalogue
def batch_global(ro):
    """Advantage RM − mean over ALL rows handed in (not per ro.batch): a batch statistic."""
    return ro.rm - ro.rm.mean()


def batch_global_std(ro):
    """(RM − mean)/std over all rows handed in (the 'whole Rollouts' std of the issue)."""
    return (ro.rm - ro.rm.mean()) / (ro.rm.std() + 1e-6)


def paired(ro):
    """Pairs rows (0, 1), (2, 3), … of each group: A_i = R_i − R_partner (group-asymmetric)."""
    rm = ro.rm.view(-1, 2)                                                   # (B/2, 2), groups of 4 in order
    return torch.stack([rm[:, 0] - rm[:, 1], rm[:, 1] - rm[:, 0]], 1).reshape(-1)


def first_is_baseline(ro):
    """Row 0 of each group is the baseline for the others and gets no update (asymmetric)."""
    first = torch.zeros(ro.batch_size, dtype=torch.bool)
    first[torch.unique(ro.group, return_inverse=True)[1].diff(prepend=torch.tensor([-1])) != 0] = True
    base = ro.rm[first][torch.unique(ro.group, return_inverse=True)[1]]
    return torch.where(first, torch.zeros_like(ro.rm), ro.rm - base)


def mean_over_rows_loss(ro):
    """A user LOSS (not an advantage) averaged over every row handed in: per batch it is seq-mean."""
    return -(ro.rm[:, None] * ro.logp * ro.mask).sum(1).mean()


CATALOGUE = [   # (name, fn as advantage or loss, G, n_prompts, note)
    ("batch_global", batch_global, 2, 1),
    ("batch_global", batch_global, 2, 2),
    ("batch_global_std", batch_global_std, 2, 1),
    ("first_is_baseline", first_is_baseline, 3, 1),
]


def _as_estimator(name, fn):
    register_advantage(f"user_{name}", overwrite=True)(fn)
    return estimator(f"user_{name}", loss="pg")


@pytest.mark.parametrize("name,fn,G,n_prompts", CATALOGUE, ids=[f"{c[0]}-G{c[2]}-P{c[3]}" for c in CATALOGUE])
def test_shortcut_breaking_estimators_get_the_hand_enumerated_expectation(small, name, fn, G, n_prompts):
    """The engine's E[ĝ] equals the per-batch hand enumeration (each batch's loss alone), whatever
    the chunking, for estimators that are not batch-local or not exchangeable."""
    mdp, pol = small
    est = _as_estimator(name, fn)
    want, _, total = hand_moments(est, mdp, pol, ordered_batches(mdp, pol, G, n_prompts))
    assert_close(total, 1.0)
    for chunk_rows in (10**6, 13):                                            # one chunk; several of ≥ 3 batches
        mo = exact.moments(est, mdp, pol, G, n_prompts=n_prompts, chunk_rows=chunk_rows)
        assert_vec_close(mo.mean, want, what=f"{name} chunk_rows={chunk_rows}")
        assert any("FAILS" in n for n in mo.notes), mo.notes                # the failed probe is reported


def test_batch_global_mean_is_reported_with_its_real_scale(small):
    """RM − mean over the batch's n_prompts·G rows includes the sample itself: E[ĝ] = (1 − 1/(PG))∇J,
    NOT the (1 − 1/G) of a group mean, and not a constant baseline (the stacked answer)."""
    mdp, pol = small
    r = report(_as_estimator("batch_global", batch_global), mdp, pol, 2, n_prompts=2)
    assert r.verdict == "scaled"
    assert_close(r.scale, 1 - 1 / 4, what="c = 1 − 1/(n_prompts·G)")


def test_group_asymmetric_estimator_is_unbiased_by_the_joint_route(small):
    """Pairing (0,1),(2,3) in groups of 4: each partner is an independent draw, so it is a valid
    baseline and the estimator is unbiased; the multiset route would evaluate sorted
    representatives and call it biased. The engine detects the asymmetry and runs 'joint'."""
    mdp = random_mdp(4, vocab_size=2, horizon=2, eos=False)
    pol = TabularSoftmax(mdp, seed=4)
    r = report(_as_estimator("paired", paired), mdp, pol, 4)
    assert r.verdict == "unbiased", r.summary()
    assert any("route 'joint'" in n for n in r.notes), r.notes
    sym = report(estimator("rloo"), mdp, pol, 4)
    assert any("route 'multiset'" in n for n in sym.notes)                 # declared exchangeable: no detour


def test_mean_over_rows_loss_gets_per_batch_semantics(small):
    """A user loss averaging over all rows handed in is, per batch, the seq-mean REINFORCE loss:
    unbiased, although stacked it would be divided by the number of stacked rows."""
    mdp, pol = small
    for G in (1, 2):
        assert report(mean_over_rows_loss, mdp, pol, G).verdict == "unbiased"


def test_nonlinear_in_continuation_returns_is_refused(small):
    """max_k R_k − mean_k R_k: substituting U(prefix) for every R_k would give 0 (an 'unbiased'
    looking baseline-free update); the engine refuses, naming multilinearity and Monte Carlo."""
    mdp, pol = small

    @register_advantage("user_maxk", needs={"continuations": 3}, overwrite=True)
    def maxk(ro):
        c = ro.extras["cont_rm"]                                             # (B, L+1, K)
        v = c.max(-1).values - c.mean(-1)                                     # (B, L+1)
        return (v[:, 1:] + ro.rm[:, None]) * ro.mask
    with pytest.raises(PropertyError, match="not multilinear.*Monte Carlo"):
        report(estimator("user_maxk", loss="pg"), mdp, pol)

    @register_advantage("user_square", needs={"continuations": 1}, overwrite=True)
    def square(ro):
        v = ro.extras["cont_rm"][..., 0]
        return (ro.rm[:, None] - v[:, :-1] ** 2) * ro.mask                    # a quadratic baseline
    with pytest.raises(PropertyError, match="not multilinear"):
        report(estimator("user_square", loss="pg"), mdp, pol)

    @register_advantage("user_middle_k", needs={"continuations": 3}, overwrite=True)
    def middle(ro):
        v = ro.extras["cont_rm"][..., 1]                                      # only the middle rollout, squared
        return (ro.rm[:, None] - v[:, :-1] ** 2) * ro.mask
    with pytest.raises(PropertyError, match="not multilinear"):
        report(estimator("user_middle_k", loss="pg"), mdp, pol)

    @register_advantage("user_sometimes_square", needs={"continuations": 1}, overwrite=True)
    def sometimes(ro):
        v = ro.extras["cont_rm"][..., 0]                                      # nonlinear only on some responses
        top = ro.rm[:, None] >= ro.rm.max()
        return (ro.rm[:, None] - torch.where(top, v[:, :-1] ** 2, v[:, :-1])) * ro.mask
    with pytest.raises(PropertyError, match="not multilinear"):
        report(estimator("user_sometimes_square", loss="pg"), mdp, pol)


def test_multilinear_user_estimator_is_accepted_after_probing(small):
    mdp, pol = small

    @register_advantage("user_trepo", needs={"continuations": 2}, overwrite=True)
    def steps(ro):
        v = ro.extras["cont_rm"].mean(-1)                                     # (B, L+1)
        return (v[:, 1:] - v[:, :-1]) * ro.mask
    r = report(estimator("user_trepo", loss="pg"), mdp, pol)
    assert r.verdict == "unbiased" and any("multilinear: holds" in n for n in r.notes), r.notes


def test_ppo_clipping_off_policy_breaks_multilinearity(small):
    """TRePO through verl's clipped loss at θ ≠ θ_old clips by the sign of Â, which is not linear in
    the returns: the engine probes (PPO's loss declares nothing) and refuses; on-policy it accepts."""
    mdp, pol = small
    est = estimator("trepo", K=1)
    assert report(est, mdp, pol).verdict == "unbiased"
    old = TabularSoftmax(mdp, seed=9)
    with pytest.raises(PropertyError, match="not multilinear"):
        exact.moments(est, mdp, pol, old_policy=old)


def test_random_numbers_inside_an_estimator_are_refused(small):
    mdp, pol = small

    def noisy(ro):
        return -((ro.rm + torch.rand(ro.batch_size))[:, None] * ro.logp * ro.mask).sum()
    with pytest.raises(PropertyError, match="not deterministic"):
        report(noisy, mdp, pol, 2)


def test_reading_an_undeclared_draw_names_the_request(small):
    mdp, pol = small

    @register_advantage("user_greedy_undeclared", overwrite=True)
    def bad(ro):
        return ro.rm - ro.extras["greedy_rm"]
    with pytest.raises(TPGError, match=r"needs=\{'greedy': True\}"):
        report(estimator("user_greedy_undeclared"), mdp, pol)


# ====================================================================================== declarations
def _probe_case(name, mdp, policy):
    """The estimator ``name`` with the options it needs: tpg's own below; a module that registers
    estimators with required options provides ``PROBE_OPTIONS = {name: fn(mdp, policy) -> options}``."""
    import sys
    opts = {"baseline": {"baseline": lambda ro: torch.zeros_like(ro.mask)},
            "trepo": {"K": 2, "variant": "chunk", "anchors": {"kind": "every", "k": 1}},
            "vineppo": {"K": 2, "step": 1, "whiten": False}}.get(name)
    if opts is None:
        extra = getattr(sys.modules[ADVANTAGES[name].fn.__module__], "PROBE_OPTIONS", {})
        opts = extra[name](mdp, policy) if name in extra else {}
    return estimator(name, loss="pg", **opts)


BUILTIN = [n for n in sorted(ADVANTAGES) if ADVANTAGES[n].fn.__module__.startswith("tpg.")]
CASES = [(n, "seq-mean-token-sum") for n in BUILTIN] + [("grpo", a) for a in sorted(AGGREGATIONS)
                                                       if AGGREGATIONS[a].fn.__module__.startswith("tpg.")]


@pytest.mark.parametrize("name,agg", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_builtin_declarations_hold_under_the_probes(small, name, agg):
    """Strip the declarations (wrap the estimator in a plain callable) and probe: every property a
    built-in declares must be confirmed on a chunk of exact batches (G = 2, two prompt draws)."""
    mdp, pol = small
    est = _probe_case(name, mdp, pol)
    est = estimator(est.advantage, loss="pg", agg=agg, **est.options)
    G = 1 if est.needs.get("anchors") else 2
    tab = exact.tables(mdp, pol)
    enum = tab.enum
    lp = pol.token_log_probs(enum.prompt_idx, enum.tokens).detach() * enum.mask
    src = ExactBatches(tab, lp, lp, ExactDraws(tab, pol, critic=exact_critic(tab)), est.needs, G, 1 if G == 1 else 2)
    chunk = next(iter(src))

    def undeclared(ro):                                                       # same loss, no declarations
        return est(ro)
    undeclared.needs = est.needs
    ev = Evaluator(undeclared, exchangeable_needed=G > 1, multilinear_needed=bool(est.needs.get("continuations")))
    ev.coefficients(chunk)
    for prop in ("local", "exchangeable", "multilinear"):
        declared = est.declared(prop)
        if declared is True and ev.state[prop] is not None:
            assert ev.state[prop] is True, f"{name}/{agg}: declared {prop} but the probe says {ev.notes}"
    assert ev.state["local"] is True, ev.notes


# ====================================================================================== round-off floor
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision_policies_are_inconclusive_with_the_reason(small, dtype):
    mdp, _ = small
    pol = TabularSoftmax(mdp, seed=4, dtype=dtype)
    r = report(estimator("rloo"), mdp, pol, 2)
    assert r.verdict == "inconclusive", r.summary()
    assert any("float64" in n for n in r.notes), r.notes


def test_roundoff_floor_is_measured_by_independent_routes(small):
    """δ is nonzero and tiny in float64 (two summation orders never agree to the bit on these
    MDPs), and about float32 epsilon when the policy computes in float32."""
    from tpg.verify import roundoff_floor
    mdp, pol = small
    d64 = roundoff_floor(mdp, pol)
    assert 0 < d64 < 1e-13
    d32 = roundoff_floor(mdp, TabularSoftmax(mdp, seed=4, dtype=torch.float32))
    assert d32 > 1e-9


# ====================================================================================== BYO API
def test_registration_refuses_unknown_draws_and_silent_overwrites():
    with pytest.raises(TPGError, match="unknown extra draw 'continuation'"):
        register_advantage("user_typo", needs={"continuation": 2})(lambda ro: ro.rm)
    with pytest.raises(TPGError, match="must be the number of rollouts K"):
        register_advantage("user_typo", needs={"continuations": True})(lambda ro: ro.rm)
    with pytest.raises(TPGError, match="already registered.*overwrite=True"):
        register_advantage("rloo")(lambda ro: ro.rm)
    with pytest.raises(TPGError, match="already registered"):
        register_policy_loss("ppo")(lambda logp, logp_old, adv, mask: -adv * logp)
    with pytest.raises(TPGError, match="already registered"):
        register_aggregation("token-mean")(lambda ro, constant=None: ro.mask)
    assert ADVANTAGES["rloo"].fn.__module__ == "tpg.estimators.outcome"       # untouched
    with pytest.raises(TPGError, match="unknown extra draw"):
        check_needs({"greedy": True, "critic": True}, "x")


def test_advantage_shapes_are_checked_even_when_B_equals_L():
    """A (B,) advantage is tiled per response; a (L,) or (B, L)ᵀ-shaped mistake with B == L used to
    broadcast silently. Here B = L = 3: (B,) is fine, (1, L) and (B, L, 1) are refused."""
    mdp = random_mdp(1, vocab_size=3, horizon=3, eos=False)
    pol = TabularSoftmax(mdp, seed=1)
    enum = enumerate_responses(mdp)
    ro = enum.select(torch.arange(3), group=torch.zeros(3, dtype=torch.long), batch=torch.zeros(3, dtype=torch.long),
                     n_batches=1).score(pol)
    assert ro.tokens.shape == (3, 3)
    register_advantage("user_per_response", overwrite=True)(lambda ro: ro.rm)
    register_advantage("user_row", overwrite=True)(lambda ro: ro.rm[None, :])
    register_advantage("user_3d", overwrite=True)(lambda ro: ro.rm[:, None, None].expand(-1, 3, 1))
    register_advantage("user_nan", overwrite=True)(lambda ro: ro.rm * float("nan"))
    register_advantage("user_list", overwrite=True)(lambda ro: ro.rm.tolist())
    out = estimator("user_per_response", loss="pg")(ro)
    assert_vec_close(out.advantages, ro.rm[:, None] * ro.mask, what="(B,) tiled over tokens")
    for name, msg in (("user_row", r"shape \(1, 3\)"), ("user_3d", r"shape \(3, 3, 1\)"), ("user_nan", "non-finite"),
                      ("user_list", "torch.Tensor")):
        with pytest.raises(TPGError, match=msg):
            estimator(name, loss="pg")(ro)


def test_presets_honour_explicit_options():
    assert estimator("drgrpo").agg == "seq-mean-token-sum-norm"
    assert estimator("drgrpo", agg="seq-mean-token-sum").agg == "seq-mean-token-sum"
    assert estimator("drgrpo", std=True).options["std"] is True


def test_registered_loss_and_aggregation_compose_and_get_verdicts(small):
    mdp, pol = small

    @register_policy_loss("user_half_pg", linear=True, overwrite=True)
    def half_pg(logp, logp_old, adv, mask, factor=0.5):
        """−factor · A · log π."""
        return -factor * adv * logp

    @register_aggregation("user_per_batch_sum", local=True, exchangeable=True, overwrite=True)
    def per_batch_sum(ro, constant=None):
        """Σ over the batch's tokens, divided by the number of prompt draws (a user normaliser)."""
        from tpg.estimators.core import segment_sum
        groups = segment_sum(torch.ones(ro.batch_size, dtype=torch.float64), ro.batch, ro.n_batches)
        return ro.mask / groups[ro.batch][:, None]
    r = report(estimator("rloo", loss="user_half_pg"), mdp, pol, 2)
    assert r.verdict == "scaled" and abs(r.scale - 0.5) < 1e-12, r.summary()
    r = report(estimator("rloo", loss="user_half_pg", loss_options={"factor": 2.0}), mdp, pol, 2)
    assert abs(r.scale - 2.0) < 1e-12
    with pytest.raises(TPGError, match="invalid options"):
        estimator("rloo", loss="user_half_pg", loss_options={"factr": 2.0})
    assert report(estimator("rloo", loss="pg", agg="user_per_batch_sum"), mdp, pol, 2).verdict == "unbiased"


def test_context_is_passed_explicitly(small):
    """γ, the MDP, state ids and positions come with the rollouts: a discounted per-token estimator
    needs no closure. Σ_t γ^(t−1) (Q(s_t, y_t) − V(s_t)) ∇ℓ_t is unbiased for ∇J (Lemma 1 + 2)."""
    mdp, pol = small
    tab = exact.tables(mdp, pol)

    @register_advantage("user_discounted_A", overwrite=True)
    def disc(ro: Rollouts):
        A = tab.A[ro.states, ro.tokens]                                        # (B, L) exact advantages
        return ro.gamma ** (ro.positions - 1).to(torch.float64) * A * ro.mask
    assert report(estimator("user_discounted_A", loss="pg"), mdp, pol).verdict == "unbiased"
