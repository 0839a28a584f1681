"""TRUE claims (PAPER §7, first list): identities in exact arithmetic, to RTOL = 1e-10.

T1–T18 are PAPER §7 items 1–18. T19–T22 check what the engine and the estimators compute on the
paths that items 1–18 leave at special values (tpg issue 9, item 6), each against an independent
formula of ``tpg.claims.oracles``: clipping at ratio ≠ 1 (T19), GAE at γ < 1 (T20), TRePO's
interpolation and chunk weights on every response (T21), several prompts with unequal ρ(x) (T22).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from tpg import exact
from tpg.claims import oracles
from tpg.claims.base import (Check, Exact, Outcome, claim, combine, discount, equal, est_verdict, expect, fd_error,
                             identity_verdict, many, mean_only_grpo, merge, moved, onehot, prefix_U, rel,
                             scored, setup, true_outcome, unbiased_outcome, with_policy, binary_mdp, differ)
from tpg.claims.oracles import grpo_kappa
from tpg.draws import ExactDraws, TableCritic, exact_critic, perturbed_critic
from tpg.estimators import estimator
from tpg.mdp import TokenMDP, TPGError

TABULAR_ONLY = "the closed form is a statement about the tabular softmax's per-state logits"


def binary6(seed: int, kind: str) -> Exact:
    """One prompt, binary RM, exactly 6 of its 15 responses correct (so 0 < J < 1 surely)."""
    return with_policy(binary_mdp(seed, (6,)), seed, kind)


@claim("T1", "Score function: ∇J = E[RM(W) Σ_t ∇ℓ_t], matching finite differences, for any γ",
       "PAPER §2 Thm 1 / §7.1", "unbiased", mdp={"gamma": 0.8})
def t1(ex: Exact) -> Outcome:
    rep = ex.report(estimator("reinforce"))
    fd = fd_error(ex.mdp, ex.pol, ex.grad, ex.seed)
    checks = [equal("E[RM Σ∇ℓ] = ∇J", rep.rel_bias), Check("finite differences (error / tolerance)", fd, "<=", 1.0)]
    return true_outcome(est_verdict(rep), checks,
                        f"rel. gap {rep.rel_bias:.1e}; FD err/tol {fd:.1e} (γ = {ex.mdp.gamma:g})",
                        {"rel_bias": rep.rel_bias, "fd_error_over_tol": fd, "gamma": ex.mdp.gamma})


@claim("T2", "Closed form for the tabular softmax: ∂J/∂θ[s,a] = ρ(s) π(a|s) (U(s⊕a) − U(s))",
       "PAPER §2 (extra identities), §7.2", "holds", mdp={"gamma": 0.9}, policies=('tabular',), why_not=TABULAR_ONLY)
def t2(ex: Exact) -> Outcome:
    gap = rel(ex.tab.closed_form().reshape(-1), ex.grad)
    return true_outcome(identity_verdict(gap), [equal("closed form = ∇J", gap)], f"rel. gap {gap:.1e}",
                        {"rel_gap": gap})


def t3_seeded(seed: int, kind: str) -> Outcome:
    return merge({f"γ={g}": t3(setup(seed, kind, gamma=g)) for g in (0.8, 1.0)}, "true")


@claim("T3", "Lemma 1: E Σ_t γ^(t−1) Q_t ∇ℓ_t = ∇J for every γ ∈ (0, 1]",
       "PAPER Eq. 4", "holds", seeded=t3_seeded)
def t3(ex: Exact) -> Outcome:
    gamma = ex.mdp.gamma
    direct = rel(ex.expect(discount(ex.tab) * ex.tab.along(ex.tab.Q)), ex.grad)
    rep = ex.report(estimator("reinforce_oracle", gamma=gamma))
    checks = [equal(f"E Σ γ^(t−1) Q_t ∇ℓ_t = ∇J (γ={gamma:g})", direct),
              equal(f"reinforce_oracle unbiased (γ={gamma:g})", rep.rel_bias)]
    gap = max(direct, rep.rel_bias)
    return true_outcome(identity_verdict(gap), checks, f"max rel. gap {gap:.1e}",
                        {"gamma": gamma, "lemma1_gap": direct, "oracle_rel_bias": rep.rel_bias})


@claim("T4", "Lemma 2: E Σ_t c(W_{0,t−1}) ∇ℓ_t = 0 for any prefix function c",
       "PAPER Lemma 2", "holds")
def t4(ex: Exact) -> Outcome:
    c = torch.randn(ex.mdp.num_states, generator=torch.Generator().manual_seed(ex.seed), dtype=torch.float64)  # (S,)
    zero = float(ex.expect(ex.tab.along(c)).norm() / ex.grad.norm())
    rep = ex.report(estimator("baseline", baseline=TableCritic(ex.mdp, c)))
    checks = [equal("‖E Σ c(s_{t−1}) ∇ℓ_t‖ / ‖∇J‖", zero), equal("RM − c(s_{t−1}) unbiased", rep.rel_bias)]
    return true_outcome(identity_verdict(max(zero, rep.rel_bias)), checks,
                        f"‖E Σ c∇ℓ‖/‖∇J‖ {zero:.1e}; baseline est. {rep.rel_bias:.1e}",
                        {"baseline_term_rel": zero, "baseline_estimator_rel_bias": rep.rel_bias})


@claim("T5", "Theorem 1: E Σ_t U(W_{0,t}) ∇ℓ_t = ∇J, and term by term E[RM ∇ℓ_t] = E[U(W_{0,t}) ∇ℓ_t]",
       "PAPER Eq. 21", "holds", mdp={"gamma": 0.8})
def t5(ex: Exact) -> Outcome:
    Ut, _ = prefix_U(ex.tab)
    gap = rel(ex.expect(Ut), ex.grad)
    checks = [equal("E Σ U(W_{0,t}) ∇ℓ_t = ∇J", gap)]
    L = Ut.shape[1]
    for t in range(L):                                                       # term by term
        lhs = ex.expect(ex.tab.enum.rm[:, None] * onehot(L, t))
        checks.append(equal(f"E[RM ∇ℓ_{t + 1}] = E[U(W_0,{t + 1}) ∇ℓ_{t + 1}] (rel. to max(‖·‖, ‖∇J‖))",
                            rel(ex.expect(Ut * onehot(L, t)), lhs, ex.grad.norm())))
    worst = max(c.value for c in checks)
    return true_outcome(identity_verdict(worst), checks,
                        f"rel. gap {gap:.1e}; term by term ≤ {worst:.1e} (γ = {ex.mdp.gamma:g})",
                        {"rel_gap": gap, "max_term_gap": worst})


@claim("T6", "Theorem 2: E Σ_t (U(W_{0,t}) − U(W_{0,t−1})) ∇ℓ_t = ∇J; pathwise U_t − U_{t−1} = γ^(t−1) A_t",
       "PAPER Eq. 28", "holds", mdp={"gamma": 0.8})
def t6(ex: Exact) -> Outcome:
    Ut, Uprev = prefix_U(ex.tab)
    diff = Ut - Uprev                                                        # (N, L)
    gap = rel(ex.expect(diff), ex.grad)
    path = float((diff - discount(ex.tab) * ex.tab.along(ex.tab.A)).abs().max() / diff.abs().max())
    rep = ex.report(estimator("trepo", variant="all", K=1))
    checks = [equal("E Σ (U_t − U_{t−1}) ∇ℓ_t = ∇J", gap),
              equal("pathwise U_t − U_{t−1} = γ^(t−1) A_t (max abs / max)", path),
              equal("TRePO 'all' (exact continuations) unbiased", rep.rel_bias)]
    return true_outcome(identity_verdict(max(gap, path)), checks,
                        f"rel. gap {gap:.1e}; pathwise {path:.1e} (γ = {ex.mdp.gamma:g})",
                        {"rel_gap": gap, "pathwise_gap": path, "trepo_all_rel_bias": rep.rel_bias})


def gae_advantages_on(tab, policy, lam: float) -> torch.Tensor:
    """(N, L) the registry's GAE(γ, λ) advantages along every response with the exact critic."""
    est = estimator("gae", gamma=tab.mdp.gamma, lam=lam)
    ro, _ = ExactDraws(tab, policy, critic=exact_critic(tab)).fill(scored(tab, policy), est.needs)
    return est(ro).advantages.detach()


@claim("T7", "Decomposition invariance (true r vs ZRA): ∇J, A_t, δ_t and GAE(λ) advantages equal; V differs",
       "PAPER §2 (extra identities), §7.7", "holds", mdp={"gamma": 0.8})
def t7(ex: Exact) -> Outcome:
    ez = Exact(ex.mdp.zra(), ex.pol)
    tab, tz = ex.tab, ez.tab
    grad_gap = rel(ez.grad, ex.grad)
    A, Az = tab.along(tab.A), tz.along(tz.A)
    a_gap = float((A - Az).abs().max() / A.abs().max())
    checks = [equal("∇J (true r) = ∇J (ZRA)", grad_gap), equal("A_t equal pathwise", a_gap)]
    for lam in (0.0, 0.5, 1.0):                                              # λ = 0 is the TD error δ_t
        g, gz = gae_advantages_on(tab, ex.pol, lam), gae_advantages_on(tz, ex.pol, lam)
        checks.append(equal(f"GAE(λ={lam}) advantages equal pathwise", float((g - gz).abs().max() / g.abs().max())))
    reach = tab.visit > 0
    v_gap = float((tab.V - tz.V)[reach].abs().max() / tab.V[reach].abs().max())
    checks.append(differ("V differs (max |V − V_ZRA| / max |V|)", v_gap))
    worst = max(c.value for c in checks if c.op == "<=")
    return true_outcome(identity_verdict(worst), checks,
                        f"max gap {worst:.1e}; V differs by {v_gap:.2g} (γ = {ex.mdp.gamma:g})",
                        {"grad_gap": grad_gap, "advantage_gap": a_gap, "value_difference": v_gap})


def t8_seeded(seed: int, kind: str) -> Outcome:
    return merge({"token rewards": t8(setup(seed, kind)), "ZRA": t8(setup(seed, kind, reward="zra"))}, "true")


@claim("T8", "Telescoping (γ = 1): Σ_t A_t = RM(W) − U(w_0) for every W",
       "PAPER §7.8", "holds", seeded=t8_seeded)
def t8(ex: Exact) -> Outcome:
    if ex.mdp.gamma != 1.0:
        raise TPGError("T8 (telescoping Σ_t A_t = RM − U(w_0)) is a statement for γ = 1")
    tab = ex.tab
    total = tab.along(tab.A).sum(1)                                          # (N,) Σ_t A_t
    target = tab.enum.rm - tab.along(tab.U)[:, 0]                            # RM − U(w_0)
    gap = float((total - target).abs().max() / target.abs().max())
    return true_outcome(identity_verdict(gap), [equal("Σ_t A_t = RM − U(w_0) for every W", gap)],
                        f"max pathwise gap {gap:.1e}", {"pathwise_gap": gap})


@claim("T9", "Exact-critic GAE (γ = 1) is unbiased for every λ; a wrong critic is unbiased at λ = 1",
       "PAPER §3.2 (PPO), §7.9", "unbiased")
def t9(ex: Exact) -> Outcome:
    exact_c, wrong = exact_critic(ex.tab), perturbed_critic(ex.tab, bias=0.3, noise=0.5, seed=ex.seed)
    cases = [(f"exact critic, λ={lam}", estimator("gae", lam=lam), 1, {"critic": exact_c}) for lam in (0.0, 0.3, 0.7, 1.0)]
    cases.append(("wrong critic, λ=1", estimator("gae", lam=1.0), 1, {"critic": wrong}))
    return unbiased_outcome(many(ex, cases), "5 configs")


@claim("T10", "RLOO is unbiased",
       "PAPER §3.2, §7.10", "unbiased", mdp={"n_prompts": 2})
def t10(ex: Exact) -> Outcome:
    return unbiased_outcome(many(ex, [(f"RLOO G={G}", estimator("rloo"), G, {}) for G in (2, 4)]), "G = 2, 4")


@claim("T11", "ReMax (greedy baseline) is unbiased",
       "PAPER §3.2, §7.11", "unbiased")
def t11(ex: Exact) -> Outcome:
    return unbiased_outcome(many(ex, [(f"ReMax G={G}", estimator("remax"), G, {}) for G in (1, 2)]), "G = 1, 2")


def binarised(ex: Exact) -> TokenMDP:
    """The claim's MDP with RM replaced by 1[RM > the midrange of its prompt's rewards] (a
    terminal-pair table: ``Tables.Uc`` holds RM(x, y) at the last (state, token) of every response).
    A prompt whose RM varies keeps both outcomes (min < midrange < max, ties or not)."""
    m, enum = ex.mdp, ex.tab.enum
    rms = [enum.rm[enum.prompt_idx == x] for x in range(len(m.prompts))]
    thr = torch.stack([(r.min() + r.max()) / 2 for r in rms])                                     # (P,)
    state_prompt = torch.as_tensor(m.state_table()["prompt"])                                     # (S,)
    table = (ex.tab.Uc > thr[state_prompt][:, None]).to(torch.float64)                            # (S, V)
    return TokenMDP(m.prompts, m.vocab_size, m.horizon, m.eos, m.gamma, m.prompt_probs, response_rewards=table.numpy())


@claim("T12", "GRPO mean-only, self-inclusive: E[ĝ] = (1 − 1/G) ∇J exactly",
       "PAPER §3.2 (1), §7.12", "scaled", mdp={"n_prompts": 2})
def t12(ex: Exact, Gs: tuple = (2, 3, 4)) -> Outcome:
    reps, checks, m = mean_only_grpo(ex, Gs)
    # A practitioner's group size, G = 16 (the keyed route), with the same policy on the same tree and
    # the reward binarised at each prompt's midrange (both outcomes occur where RM varies, so ∇J' ≠ 0).
    big, bchecks, bm = mean_only_grpo(Exact(binarised(ex), ex.pol, ex.seed), (16,))
    reps, checks, m, Gs = reps + big, checks + bchecks, {**m, **bm}, Gs + (16,)
    cs = ", ".join(f"{r.scale:.6g}" for _, r in reps)
    return true_outcome(combine([est_verdict(r) for _, r in reps]), checks,
                        f"c = {cs} for G = {', '.join(map(str, Gs))}; |c − (1 − 1/G)| ≤ {max(c.value for c in checks):.1e}", m)


@claim("T13", "GRPO with std, one prompt, binary RM: E[ĝ] = κ∇J, κ = h(1) − h(0) ≥ 0, cosine 1",
       "PAPER §3.2 (2), §7.13", "scaled", build=binary6)
def t13(ex: Exact) -> Outcome:
    eps = 1e-4
    p = ex.tab.J                                                             # P(RM = 1)
    reps = [(G, ex.report(estimator("grpo", eps=eps, ddof=1), G)) for G in (2, 3, 16)]   # G = 16: keyed route
    checks, m = [], {"success_rate": p, "eps": eps}
    for G, r in reps:
        kappa = grpo_kappa(p, G, eps)
        checks += [equal(f"κ (engine) = h(1) − h(0) (formula), G={G}", abs(r.scale - kappa) / abs(kappa)),
                   Check(f"κ ≥ 0, G={G}", -r.scale, "<=", 0.0)]
        m[f"G={G}"] = {"kappa": r.scale, "kappa_formula": kappa, "cosine": r.cosine, "residual": r.residual}
    fig = "; ".join(f"G={G}: κ = {r.scale:.6g} (formula {m[f'G={G}']['kappa_formula']:.6g})" for G, r in reps)
    return true_outcome(combine([est_verdict(r) for _, r in reps]), checks, fig + ", cosine 1", m)


@claim("T14", "PPO clipped surrogate at θ = θ_old: ∇L_clip = E Σ_t Â_t ∇ℓ_t (clipping inactive)",
       "PAPER §7.14", "holds")
def t14(ex: Exact) -> Outcome:
    wrong = perturbed_critic(ex.tab, bias=0.3, noise=0.5, seed=ex.seed)
    cases = [("RLOO G=2", "rloo", {}, 2, {}, {}),
             ("GAE λ=0.5, wrong critic, dual clip 3", "gae", {"lam": 0.5}, 1, {"critic": wrong}, {"dual_clip": 3.0})]
    checks = []
    for label, name, opts, G, kw, clip_kw in cases:
        ppo = exact.moments(estimator(name, loss="ppo", **clip_kw, **opts), ex.mdp, ex.pol, G, **kw).mean
        pg = exact.moments(estimator(name, loss="pg", **opts), ex.mdp, ex.pol, G, **kw).mean
        checks.append(equal(f"∇L_clip = PG form at θ = θ_old ({label})", rel(ppo, pg)))
    worst = max(c.value for c in checks)
    return true_outcome(identity_verdict(worst), checks, f"max rel. gap {worst:.1e} (2 estimators)",
                        {c.name: c.value for c in checks})


@claim("T15", "MC advantages at every position, Â_t = v̂_t − v̂_{t−1} from K ≥ 1 fresh rollouts: unbiased",
       "PAPER §4 reading 1, §7.15", "unbiased")
def t15(ex: Exact) -> Outcome:
    cases = [(f"TRePO 'all' K={K}", estimator("trepo", variant="all", K=K), 1, {}) for K in (1, 3)]
    return unbiased_outcome(many(ex, cases), "K = 1, 3")


@claim("T16", "Chunk (value-anchored, VinePPO-like) advantages, fixed anchors or stopping times: unbiased",
       "PAPER §4 reading 4, §7.16", "unbiased", mdp={"horizon": 4})
def t16(ex: Exact) -> Outcome:
    cases = [("chunk, anchors {2} + T", estimator("trepo", variant="chunk", K=2,
                                                  anchors={"kind": "fixed", "positions": [2]}), 1, {}),
             ("chunk, every 2nd + T", estimator("trepo", variant="chunk", K=1, anchors={"kind": "every", "k": 2}), 1, {}),
             ("VinePPO step 2, unwhitened", estimator("vineppo", K=2, step=2, whiten=False), 1, {})]
    return unbiased_outcome(many(ex, cases), "3 configs, H = 4")


@claim("T17", "Random anchor subset with 1/q_t reweighting: unbiased",
       "PAPER §4 reading 2, §7.17", "unbiased")
def t17(ex: Exact) -> Outcome:
    cases = [(f"subset q={q}, 1/q reweighting", estimator("trepo", variant="subset", K=1,
                                                         anchors={"kind": "bernoulli", "q": q}), 1, {})
             for q in (0.5, 0.3)]
    return unbiased_outcome(many(ex, cases), "q = 0.5, 0.3")


@claim("T18", "All-zero rewards: a group with every RM = 0 (GRPO/RLOO weights 0) where exact A_t ≠ 0",
       "PAPER §3.1 (Perplexity), §7.18", "holds", build=binary6)
def t18(ex: Exact, G: int = 4) -> Outcome:
    """Binary RM with 0 < J < 1 (``binary_mdp``): along any RM = 0 response Σ_t A_t = −J ≠ 0 (T8)."""
    tab = ex.tab
    zero = torch.nonzero((tab.enum.rm == 0) & (tab.prob > 0))[:, 0]
    if len(zero) == 0:
        return Outcome("fails", "no response with RM = 0 in this MDP", 0.0, {"n_zero_responses": 0})
    A = tab.along(tab.A)                                                     # (N, L) exact A_t (γ = 1)
    rows = zero[torch.argsort(tab.prob[zero], descending=True)][:G]         # the likeliest RM = 0 responses
    rows = rows.repeat(G)[:G]                                                # (G,) with repeats if fewer
    ro = scored(tab, ex.pol).select(rows, group=torch.zeros(G, dtype=torch.long),
                                    batch=torch.zeros(G, dtype=torch.long), n_batches=1)
    adv = {name: float(estimator(name)(ro).advantages.abs().max()) for name in ("grpo", "rloo")}
    a_max = float(A[rows].abs().max())
    checks = [equal("every GRPO advantage is 0", adv["grpo"]), equal("every RLOO advantage is 0", adv["rloo"]),
              differ("max |A_t| along the group", a_max)]
    verdict = "holds" if all(c.ok for c in checks) else "fails"
    return Outcome(verdict, f"group of {G} with RM = 0: GRPO/RLOO weights 0, max |A_t| = {a_max:.3g}", a_max,
                   {"max_abs_A": a_max, "grpo_max_abs_adv": adv["grpo"], "rloo_max_abs_adv": adv["rloo"],
                    "group_probability": float(torch.prod(tab.prob[rows])), "responses": rows.tolist()}, checks)




# ====================================================================================== beyond §7: the engine's own paths
UNEQUAL_RHO = {"n_prompts": 2, "prompt_probs": (0.3, 0.7)}     # two prompts, ρ(x) unequal


def _along(mdp, enum, table: torch.Tensor) -> np.ndarray:
    """(N, L) a per-state table read along every response (0 after the end), in numpy."""
    s = mdp.state_index(enum.prompt_idx, enum.tokens, enum.mask).numpy()
    return table.numpy()[s] * enum.mask.numpy()


@claim("T19", "PPO clipped surrogate at θ ≠ θ_old: E[ĝ] = E_old Σ_t A_t ρ_t 1[ρ_t unclipped] ∇ℓ_t, the clip "
       "region derived by hand (ε, clip-higher, dual clip), with clipping active",
       "PAPER §3.2 (5); ESTIMATORS.md (PPO loss)", "holds", mdp=UNEQUAL_RHO)
def t19(old: Exact) -> Outcome:
    """Responses from θ_old, scored under θ = θ_old moved (``moved``): the engine's E[ĝ] of the
    registry's clipped loss against ``oracles.ppo_clip_weights`` (never ``ppo_clip_loss``)."""
    new = Exact(old.mdp, moved(old.pol, old.seed), old.seed)
    mdp, enum = old.mdp, old.tab.enum
    ratio = oracles.ratios(mdp, enum, new.tab.pi, old.tab.pi)                 # (N, L)
    mask, p_old, rm = enum.mask.numpy(), old.tab.prob.numpy(), enum.rm.numpy()
    b = torch.randn(mdp.num_states, generator=torch.Generator().manual_seed(old.seed), dtype=torch.float64)
    adv = (rm[:, None] - _along(mdp, enum, b)) * mask                         # A_t = RM − b(s_(t−1))
    neg = (adv < 0) & (mask > 0) & (p_old[:, None] > 0)
    # The dual clip c acts only where A < 0 and ρ > c: c halfway between 1 + ε and the probability-weighted
    # median of those ρ > 1 + ε, so it caps at least half of their mass (verl's default c = 3 rarely acts here).
    up = neg & (ratio > 1.2)
    if up.any():
        r_up, w_up = ratio[up], np.broadcast_to(p_old[:, None], ratio.shape)[up]
        order = np.argsort(r_up)
        med = float(r_up[order][np.searchsorted(np.cumsum(w_up[order]), w_up.sum() / 2)])
        c = (1.2 + med) / 2
    else:
        c = 3.0
    dual_mass = float((p_old[:, None] * (neg & (ratio > c))).sum())             # E #{t: A_t < 0, ρ_t > c}
    cond = (old.tab.prob / torch.as_tensor(mdp.prompt_probs)[enum.prompt_idx]).numpy()   # π_old(y|x)
    baseline = estimator("baseline", baseline=TableCritic(mdp, b), loss="ppo", clip=0.2)
    cases = [("baseline b(s), ε = 0.2", baseline, 1, dict(clip_low=0.2), adv),
             (f"baseline b(s), ε = 0.2, dual clip c = {c:.3g}",
              estimator("baseline", baseline=TableCritic(mdp, b), loss="ppo", clip=0.2, dual_clip=c), 1,
              dict(clip_low=0.2, dual_clip=c), adv),
             ("RLOO G=2, ε = 0.2, clip-higher 0.28", estimator("rloo", loss="ppo", clip=0.2, clip_high=0.28), 2,
              dict(clip_low=0.2, clip_high=0.28), None)]
    checks, m = [], {}
    for label, est, G, clip, a in cases:
        engine = exact.moments(est, mdp, new.pol, G, old_policy=old.pol).mean
        if G == 1:
            W = oracles.ppo_clip_weights(p_old, a, ratio, mask, **clip)
            mass = oracles.clipped_mass(p_old, a, ratio, mask, **clip)
        else:
            args = (p_old, cond, enum.prompt_idx.numpy(), rm, ratio, mask)
            W = oracles.ppo_clip_weights_rloo2(*args, **clip)
            mass = oracles.clipped_mass_rloo2(*args, **clip)
        hand = exact.expected_score(new.pol, enum, torch.as_tensor(W))
        gap = rel(engine, hand)
        checks += [equal(f"{label}: engine E[ĝ] = hand formula", gap),
                   differ(f"{label}: expected number of clipped tokens", mass)]
        m[label] = {"gap": gap, "clipped_tokens": mass}
    checks.append(differ(f"dual clip c = {c:.3g}: expected number of tokens it caps (A < 0, ρ > c)", dual_mass))
    worst = max(v["gap"] for v in m.values())
    low = min(v["clipped_tokens"] for v in m.values())
    m["dual_clip"] = {"c": c, "capped_tokens": dual_mass}
    return true_outcome(identity_verdict(worst), checks, f"max rel. gap {worst:.1e} (3 losses); E[clipped tokens] "
                        f"≥ {low:.2g}, dual-capped {dual_mass:.2g}", m)


@claim("T20", "GAE at γ < 1: the registry's advantages = Σ_j (γλ)^(j−t) δ_j on every response (wrong critic, "
       "λ = 0, 0.5, 0.9, 1); with γ^(t−1) weights unbiased (exact critic, any λ; any critic, λ = 1)",
       "PAPER §3.2 (PPO), Lemma 1", "holds", mdp={"gamma": 0.8})
def t20(ex: Exact) -> Outcome:
    tab, enum, gamma = ex.tab, ex.tab.enum, ex.mdp.gamma
    wrong = perturbed_critic(tab, bias=0.3, noise=0.5, seed=ex.seed)
    ro = scored(tab, ex.pol)
    values = wrong(ro).detach()                                                 # (N, L) V̂ before token t
    r, lengths = (enum.token_rewards * enum.mask).numpy(), enum.lengths.numpy()
    checks, m = [], {}
    for lam in (0.0, 0.5, 0.9, 1.0):
        got = estimator("gae", gamma=gamma, lam=lam)(replace(ro, extras={"values": values})).advantages.numpy()
        want = oracles.gae_closed_form(r, values.numpy(), lengths, gamma, lam)
        gap = float(np.abs(got - want).max() / np.abs(want).max())
        checks.append(equal(f"GAE(γ={gamma:g}, λ={lam}) = Σ_j (γλ)^(j−t) δ_j on every response", gap))
        m[f"pathwise_gap_lam={lam}"] = gap
    reps = many(ex, [(f"exact critic, λ={lam}, γ^(t−1) weights",
                      estimator("gae", gamma=gamma, lam=lam, discount_weight=True), 1, {"critic": exact_critic(tab)})
                     for lam in (0.0, 0.5)]
                + [("wrong critic, λ=1, γ^(t−1) weights", estimator("gae", gamma=gamma, lam=1.0, discount_weight=True),
                    1, {"critic": wrong})])
    checks += [equal(f"{label}: unbiased", r_.rel_bias) for label, r_ in reps]
    m.update({label: {"rel_bias": r_.rel_bias} for label, r_ in reps})
    path = max(v for k, v in m.items() if k.startswith("pathwise"))
    bias = max(r_.rel_bias for _, r_ in reps)
    verdict = identity_verdict(max(path, bias))
    return true_outcome(verdict, checks, f"pathwise gap ≤ {path:.1e} (4 λ); max rel. bias {bias:.1e} (γ = {gamma:g})", m)


def _anchor_positions(spec: dict, L: int) -> list[int]:
    return list(spec["positions"]) if spec["kind"] == "fixed" else list(range(spec["k"], L + 1, spec["k"]))


@claim("T21", "TRePO's anchored readings on every response (arbitrary continuation values): interpolation "
       "weights (1 − x, x), chunk and chunk/L_j values as in PAPER §4; E[ĝ] of interp = its formula",
       "PAPER §4 readings 3–5", "holds", mdp={"horizon": 4})
def t21(ex: Exact) -> Outcome:
    """Anchors {1} ∪ {T} and every 3rd ∪ {T} on variable-length responses (H = 4): the weights x =
    1/3, 2/3 are asymmetric, so swapped weights show. The continuation values are random numbers
    (v_t for t < T; v_T = RM), so the formulas are checked as functions, not only at U(prefix)."""
    tab, enum = ex.tab, ex.tab.enum
    N, L = enum.tokens.shape
    g = torch.Generator().manual_seed(ex.seed)
    t = torch.arange(L + 1)[None, :]
    v = torch.where(t < enum.lengths[:, None], torch.randn(N, L + 1, generator=g, dtype=torch.float64),
                    enum.rm[:, None])                                           # (N, L+1), RM at and after T
    ro = scored(tab, ex.pol)
    lengths = enum.lengths.numpy()
    checks, m = [], {}
    for spec in ({"kind": "fixed", "positions": [1]}, {"kind": "every", "k": 3}):
        pos = _anchor_positions(spec, L)
        anchors = (torch.zeros(N, L, dtype=torch.bool) | (torch.arange(1, L + 1)[None, :] ==
                   torch.as_tensor(pos)[:, None, None]).any(0)) & enum.mask.bool()          # (N, L)
        for variant in ("interp", "chunk", "value_interp"):
            est = estimator("trepo", variant=variant, K=1, anchors=spec)
            got = est(replace(ro, extras={"cont_rm": v[:, :, None].clone(), "anchors": anchors})).advantages.numpy()
            want = oracles.trepo_anchor_formula(v.numpy(), lengths, pos, variant)
            gap = float(np.abs(got - want).max() / np.abs(want).max())
            label = f"{variant}, anchors {pos} ∪ {{T}}"
            checks.append(equal(f"{label}: advantages = formula on every response", gap))
            m[label] = gap
    spec = {"kind": "fixed", "positions": [1]}
    Ut = tab.prefix_values(enum)                                                 # (N, L+1) v_t = U(y_≤t)
    want = expect(tab, ex.pol, torch.as_tensor(oracles.trepo_anchor_formula(Ut.numpy(), lengths, [1], "interp")))
    got = ex.report(estimator("trepo", variant="interp", K=1, anchors=spec)).mean
    mean_gap = rel(got, want, ex.grad.norm())
    checks.append(equal("interp, anchors [1] ∪ {T}: E[ĝ] (engine) = E Σ_t â_t(U) ∇ℓ_t (formula)", mean_gap))
    m["interp_mean_gap"] = mean_gap
    worst = max(m.values())
    return true_outcome(identity_verdict(worst), checks, f"max gap {worst:.1e} (3 readings × 2 anchor sets, "
                        f"and E[ĝ] of interp)", m)


@claim("T22", "Several prompts, unequal ρ(x) = (0.3, 0.7): reach probabilities ρ(s), J = Σ_x ρ(x) J_x, the closed "
       "form, and batches of 2 prompt draws (REINFORCE, RLOO unbiased; mean-only GRPO c = 1/2)",
       "PAPER §1–2, §7.2, §7.10, §7.12", "holds", mdp=UNEQUAL_RHO)
def t22(ex: Exact) -> Outcome:
    mdp, tab, enum = ex.mdp, ex.tab, ex.tab.enum
    reach = oracles.reach_probabilities(mdp, ex.pol, enum)                       # (S,)
    visit_gap = float(np.abs(tab.visit.numpy() - reach).max() / reach.max())
    with torch.no_grad():
        cond = (ex.pol.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).sum(1).exp()   # (N,) π(y|x)
    J_x = torch.zeros(len(mdp.prompts), dtype=torch.float64).index_add(0, enum.prompt_idx, cond * enum.rm)
    J = float((torch.as_tensor(mdp.prompt_probs) * J_x).sum())
    checks = [equal("ρ(s) (forward sweep) = Σ_{y through s} ρ(x) π(y|x)", visit_gap),
              equal("J_x (tables) = Σ_y π(y|x) RM", float((tab.J_prompt - J_x).abs().max() / J_x.abs().max())),
              equal("J (tables) = Σ_x ρ(x) J_x", abs(tab.J - J) / abs(J))]
    if type(ex.pol).__name__ == "TabularSoftmax":
        checks.append(equal("closed form ρ(s) π (U(s⊕a) − U(s)) = ∇J", rel(tab.closed_form().reshape(-1), ex.grad)))
    reps = many(ex, [("REINFORCE, 2 prompt draws per batch", estimator("reinforce"), 1, {"n_prompts": 2}),
                     ("RLOO G=2", estimator("rloo"), 2, {})])
    checks += [equal(f"{label}: unbiased", r.rel_bias) for label, r in reps]
    grpo = ex.report(estimator("grpo", std=False), 2)
    checks.append(equal("mean-only GRPO G=2: c = 1/2", abs(grpo.scale - 0.5)))
    worst = max(c.value for c in checks)
    return true_outcome(identity_verdict(worst), checks,
                        f"max gap {worst:.1e}; ρ(s) gap {visit_gap:.1e} (ρ = ({', '.join(f'{p:g}' for p in mdp.prompt_probs)}))",
                        {c.name: c.value for c in checks})
