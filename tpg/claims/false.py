"""FALSE claims (PAPER §7, second list): biases the formulas predict exactly, each far above MARGIN.

F1–F11 are PAPER §7 F1–F11. Each claim checks the inequality (relative bias > MARGIN) and, where
the paper gives one, the exact formula the biased expectation equals instead (an equality check).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from tpg import exact
from tpg.claims.base import (Exact, Outcome, claim, combine, differ, discount, equal, est_verdict,
                             false_outcome, grad_of, identity_verdict, mean_only_grpo, moved, onehot, prefix_U,
                             prompt_weights, rel, setup, with_policy)
from tpg.claims.oracles import grpo_kappa
from tpg.draws import exact_critic, perturbed_critic
from tpg.estimators import KL, estimator
from tpg.mdp import TokenMDP, random_mdp
from tpg.rollouts import greedy, response_log_prob

@claim("F1", "Dropping γ^(t−1) (γ < 1): E Σ_t Q_t ∇ℓ_t ≠ ∇J; it equals Eq. 26, E Σ_t γ^−(t−1) U(W_{0,t}) ∇ℓ_t",
       "PAPER Eq. 26, §7 F1", "biased", mdp={"gamma": 0.8})
def f1(ex: Exact) -> Outcome:
    gamma = ex.mdp.gamma
    Ut, _ = prefix_U(ex.tab)
    q_form = ex.expect(ex.tab.along(ex.tab.Q))                               # E Σ Q_t ∇ℓ_t
    eq26 = ex.expect(Ut / discount(ex.tab))                                  # E Σ γ^−(t−1) U(W_0,t) ∇ℓ_t
    rep = ex.report(estimator("reinforce_oracle", gamma=gamma, discount_weight=False))
    v, rb, _, _ = ex.vs(q_form)
    checks = [differ("E Σ Q_t ∇ℓ_t vs ∇J (rel. bias)", rb), equal("E Σ Q_t ∇ℓ_t = Eq. 26", rel(q_form, eq26)),
              equal("practical estimator (G_t, no γ^(t−1)) = E Σ Q_t ∇ℓ_t", rel(rep.mean, q_form))]
    return false_outcome(combine([v, est_verdict(rep)]), rb, checks,
                         f"rel. bias {rb:.3g}; Eq. 26 gap {checks[1].value:.1e} (γ = {gamma:g})",
                         {"rel_bias": rb, "eq26_gap": checks[1].value, "estimator_gap": checks[2].value})


@claim("F2", "Blog form E Σ γ^(t−1) RM ∇ℓ_t ≠ ∇J (γ < 1); ZRA with undiscounted r_T gives ∇E[γ^(T−1) RM] ≠ ∇E[RM]",
       "PAPER §2 (Thm 1, blog), §7 F2", "biased", mdp={"gamma": 0.8})
def f2(ex: Exact) -> Outcome:
    gamma = ex.mdp.gamma
    blog = ex.expect(discount(ex.tab) * ex.tab.enum.rm[:, None])             # E Σ γ^(t−1) RM ∇ℓ_t
    va, rba, _, _ = ex.vs(blog)
    # Part 2: the same RM under ZRA with an UNdiscounted final reward r_T = RM, i.e. a token-reward
    # MDP with RM on the terminal (state, token) pairs (``zra().response_rewards``): its RM' = γ^(T−1) RM.
    z = ex.mdp.zra()
    undisc = Exact(TokenMDP(z.prompts, z.vocab_size, z.horizon, z.eos, gamma, z.prompt_probs,
                            token_rewards=z.response_rewards), ex.pol)
    rep = undisc.report(estimator("reinforce_oracle", gamma=gamma), target=ex.grad)   # ∇E[RM]
    shifted = rel(rep.mean, undisc.grad)                                     # ∇E[γ^(T−1) RM]
    checks = [differ("E Σ γ^(t−1) RM ∇ℓ_t vs ∇J", rba),
              differ("E Σ γ^(t−1) G_t ∇ℓ_t vs ∇E[RM] (ZRA, r_T = RM)", rep.rel_bias),
              equal("E Σ γ^(t−1) G_t ∇ℓ_t = ∇E[γ^(T−1) RM]", shifted)]
    return false_outcome(combine([va, est_verdict(rep)]), min(rba, rep.rel_bias), checks,
                         f"rel. bias {rba:.3g} (blog form), {rep.rel_bias:.3g} (ZRA, γ^(T−1)); eq. gap {shifted:.1e}",
                         {"blog_rel_bias": rba, "zra_rel_bias": rep.rel_bias, "discounted_objective_gap": shifted})


@claim("F3", "GRPO mean-only is not unbiased: the factor is 1 − 1/G (direction right)",
       "PAPER §7 F3", "scaled", mdp={"n_prompts": 2})
def f3(ex: Exact, Gs: tuple = (2, 3)) -> Outcome:
    reps, checks, m = mean_only_grpo(ex, Gs)
    checks += [differ(f"rel. bias, G={G}", r.rel_bias) for G, r in reps]
    fig = ", ".join(f"G={G}: rel. bias {r.rel_bias:.4g} (c = {r.scale:.4g})" for G, r in reps)
    return false_outcome(combine([est_verdict(r) for _, r in reps]), min(r.rel_bias for _, r in reps), checks, fig, m)


# F4 measures non-parallelism by the residual after the best scale, ‖E ĝ − c∇J‖/‖∇J‖, against
# MARGIN. 1 − cos is reported too but not thresholded separately: it is a function of the same two
# numbers, 1 − cos = 1 − c/√(c² + residual²), so a second margin would add no information.


def two_rate_mdp(seed: int, kind: str, G: int = 6) -> Exact:
    """Two prompts with clearly different success rates under the policy (binary RM; V = 3 with
    EOS, H = 2: 7 responses per prompt). The policy depends only on the MDP's structure, so it is
    built first; then every pair of correct sets (both outcomes present in each prompt) is
    enumerated and the pair maximising |κ(J_0) − κ(J_1)|·√(J_0(1−J_0)J_1(1−J_1)) is kept: the
    per-prompt scales differ while both prompts keep gradient signal (∝ the RM variance)."""
    base = random_mdp(seed, vocab_size=3, horizon=2, eos=True, n_prompts=2, reward="binary")
    ex = with_policy(base, seed, kind)
    enum = ex.tab.enum
    cond = (ex.tab.prob / prompt_weights(base, enum)).numpy()          # (N,) π(y|x)
    last = enum.lengths - 1
    rows_all = torch.arange(enum.batch_size)
    s_last = base.state_index(enum.prompt_idx, enum.tokens, enum.mask)[rows_all, last].numpy()
    t_last = enum.tokens[rows_all, last].numpy()
    rows = [np.nonzero(enum.prompt_idx.numpy() == x)[0] for x in range(2)]
    masks = np.array(list(itertools.product([0, 1], repeat=len(rows[0]))))[1:-1]  # (126, 7) correct sets
    J = np.stack([masks @ cond[r] for r in rows])                           # (2, 126) success rates
    kap = np.vectorize(lambda p: grpo_kappa(float(p), G, 1e-6))(J)          # (2, 126)
    sig = np.sqrt(J * (1 - J))
    score = np.abs(kap[0][:, None] - kap[1][None, :]) * sig[0][:, None] * sig[1][None, :]   # (126, 126)
    i, j = np.unravel_index(np.argmax(score), score.shape)
    table = np.zeros((base.num_states, base.vocab_size))
    for r, mk in ((rows[0], masks[i]), (rows[1], masks[j])):
        table[s_last[r], t_last[r]] = mk
    mdp = TokenMDP(base.prompts, base.vocab_size, base.horizon, base.eos, base.gamma,
                   response_rewards=table, name=f"two-rate-binary(seed={seed})")
    return Exact(mdp, ex.pol)


@claim("F4", "Std normalisation is not a smaller learning rate: not parallel to ∇J for ≥ 3 reward values or for two "
       "prompts with different success rates",
       "PAPER §3.1, §7 F4", "biased", seeded=True)
def f4_seeded(seed: int, kind: str) -> Outcome:
    cases = [("1 prompt, continuous RM, G=2", dict(reward="zra"), 2),
             ("1 prompt, continuous RM, G=3", dict(reward="zra"), 3),
             ("2 prompts, binary RM, different success rates, G=6", None, 6)]
    checks, m, verdicts = [], {}, []
    for label, kw, G in cases:
        # κ(p) of std-GRPO depends on the success rate p only for G ≥ 4, and only through |p − 1/2|
        # (κ = 1/√2 for G = 2, 2/√3 for G = 3 with ddof 1): hence G = 6.
        ex = setup(seed, kind, **kw) if kw else two_rate_mdp(seed, kind, G)
        r = ex.report(estimator("grpo"), G)
        verdicts.append(est_verdict(r))
        checks.append(differ(f"residual after best scale ({label})", r.residual))
        m[label] = {"residual": r.residual, "cosine": r.cosine, "scale": r.scale, "rel_bias": r.rel_bias}
        if kw is None:                                                      # per-prompt κ_x differ
            kx = [grpo_kappa(float(ex.tab.J_prompt[x]), G, 1e-6) for x in range(2)]
            checks.append(differ("|κ_0 − κ_1| (per-prompt scales)", abs(kx[0] - kx[1])))
            m[label]["kappa_per_prompt"] = kx
    fig = "; ".join(f"{k}: 1 − cos {1 - v['cosine']:.2g}" for k, v in m.items())
    return false_outcome(combine(verdicts), min(v["residual"] for v in m.values()), checks, fig, m)


@claim("F5", "Length normalisation: E[(R − b)/|y| Σ∇ℓ] = ∇E[(R − b)/|y|] (b fixed) ≠ ∇J when |y| varies",
       "PAPER §3.2 (3), §7 F5", "biased")
def f5(ex: Exact, b: float = 0.5) -> Outcome:
    enum = ex.tab.enum
    est = estimator("baseline", baseline=lambda ro: torch.full_like(ro.mask, b), agg="seq-mean-token-mean")
    # Target ∇_θ E[(R − b)/|y|] with b fixed, by autograd through the enumeration; |y| + 1e-8 is
    # verl's seq-mean-token-mean normaliser exactly.
    p = prompt_weights(ex.mdp, enum) * response_log_prob(ex.pol, enum).exp()
    target = grad_of((p * (enum.rm - b) / (enum.mask.sum(1) + 1e-8)).sum(), ex.pol)   # float64 lengths
    rep = ex.report(est, target=target)
    v, rb, _, _ = ex.vs(rep.mean)
    checks = [equal("E[(R − b)/|y| Σ∇ℓ] = ∇E[(R − b)/|y|]", rep.rel_bias), differ("vs ∇J (rel. bias)", rb)]
    return false_outcome(v, rb, checks, f"rel. bias {rb:.3g}; = ∇E[(R−b)/|y|] to {rep.rel_bias:.1e} (b = {b})",
                         {"rel_bias": rb, "target_gap": rep.rel_bias, "b": b})


@claim("F6", "KL in reward (k1, sequence level): expected update = ∇(J − β KL(π‖π_ref)) ≠ ∇J",
       "PAPER §3.2 (4), §7 F6", "biased")
def f6(ex: Exact, beta: float = 0.1) -> Outcome:
    ref = moved(ex.pol, ex.seed + 7919)                                      # a different policy of the same kind
    enum = ex.tab.enum
    logp = response_log_prob(ex.pol, enum)                                    # (N,) with autograd
    with torch.no_grad():
        ref_logp = response_log_prob(ref, enum)
    rho = prompt_weights(ex.mdp, enum)
    # J − β KL(π‖π_ref), sequence level, by autograd through the enumeration.
    target = grad_of((rho * logp.exp() * (enum.rm - beta * (logp - ref_logp))).sum(), ex.pol)
    rep = ex.report(estimator("reinforce", kl=KL(coef=beta, kind="k1", where="reward")), target=target, ref=ref)
    v, rb, _, _ = ex.vs(rep.mean)
    checks = [equal("E[ĝ] = ∇(J − β KL(π‖π_ref))", rep.rel_bias), differ("vs ∇J (rel. bias)", rb)]
    return false_outcome(v, rb, checks, f"rel. bias {rb:.3g}; = ∇(J − βKL) to {rep.rel_bias:.1e} (β = {beta})",
                         {"rel_bias": rb, "kl_objective_gap": rep.rel_bias, "beta": beta})


@claim("F7", "PPO after the policy moved (θ ≠ θ_old): clipped-surrogate gradient ≠ ∇J(θ)",
       "PAPER §3.2 (5), §7 F7", "biased")
def f7(old: Exact) -> Outcome:
    ex = Exact(old.mdp, moved(old.pol, old.seed), old.seed)                  # θ after an update; θ_old samples
    rep = ex.report(estimator("rloo", loss="ppo", clip=0.2), 2, old_policy=old.pol)
    checks = [differ("PPO-clip gradient at θ ≠ θ_old vs ∇J(θ)", rep.rel_bias)]
    return false_outcome(est_verdict(rep), rep.rel_bias, checks, f"rel. bias {rep.rel_bias:.3g} (RLOO G=2, ε = 0.2)",
                         {"rel_bias": rep.rel_bias, "cosine": rep.cosine})


@claim("F8", "GAE with λ < 1 and a wrong critic is biased (exact critic, or λ = 1, are not)",
       "PAPER §3.2 (PPO), §7 F8", "biased")
def f8(ex: Exact) -> Outcome:
    wrong = perturbed_critic(ex.tab, bias=0.3, noise=0.5, seed=ex.seed)
    bad = ex.report(estimator("gae", lam=0.5), critic=wrong)
    ok_exact = ex.report(estimator("gae", lam=0.5), critic=exact_critic(ex.tab))
    ok_lam1 = ex.report(estimator("gae", lam=1.0), critic=wrong)
    checks = [differ("GAE λ=0.5, wrong critic vs ∇J", bad.rel_bias),
              equal("GAE λ=0.5, exact critic unbiased (T9)", ok_exact.rel_bias),
              equal("GAE λ=1, wrong critic unbiased (T9)", ok_lam1.rel_bias)]
    return false_outcome(est_verdict(bad), bad.rel_bias, checks, f"rel. bias {bad.rel_bias:.3g} (λ = 0.5)",
                         {"rel_bias": bad.rel_bias, "exact_critic_rel_bias": ok_exact.rel_bias,
                          "lambda1_rel_bias": ok_lam1.rel_bias})


def anchored(tab, positions: list[int]) -> torch.Tensor:
    """(N, L) indicator of t ∈ S(W): the fixed positions that lie in the response, plus the end T."""
    L = tab.enum.tokens.shape[1]
    t = torch.arange(1, L + 1)[None, :]
    T = tab.enum.lengths[:, None]
    fixed = torch.zeros_like(t, dtype=torch.bool)
    for p in positions:
        fixed |= t == p
    return ((fixed & (t <= T)) | (t == T)).to(torch.float64)


def chunk_lengths(tab, positions: list[int]) -> torch.Tensor:
    """(N, L) length L_j = t_j − t_{j−1} of the chunk (t_{j−1}, t_j] holding position t; the
    anchors are 0, the fixed positions and the end T (fixed-length responses: T = H)."""
    L = tab.enum.tokens.shape[1]
    bounds = sorted({0, *positions})
    T = tab.enum.lengths
    out = torch.zeros(tab.enum.tokens.shape, dtype=torch.float64)
    for t in range(1, L + 1):
        lo = max(b for b in bounds if b < t)
        hi = torch.clamp(T, max=min([b for b in bounds if b >= t] + [L]))   # (N,)
        out[:, t - 1] = (hi - lo).to(torch.float64)
    return out


@claim("F9", "TRePO linear interpolation of anchor advantages: interpolated positions contribute 0 (fixed length), "
       "not even anchors-only with EOS; value interpolation / L_j biased",
       "PAPER §4 readings 3, 5; §7 F9", "biased", seeded=True)
def f9_seeded(seed: int, kind: str) -> Outcome:
    interp = estimator("trepo", variant="interp", K=1, anchors={"kind": "fixed", "positions": [1]})
    # (a) fixed length: E[ĝ] = E Σ_{t∈S} A_t ∇ℓ_t, S = {1, H}: positions 2..H−1 are interpolated.
    ex = setup(seed, kind, eos=False, vocab_size=2, horizon=4)
    Ut, Uprev = prefix_U(ex.tab)
    fixed = ex.report(interp)
    only = rel(fixed.mean, ex.expect((Ut - Uprev) * anchored(ex.tab, [1])))
    # (c) value interpolation, anchors {1, H}: E[ĝ] = Σ_t E[A_t ∇ℓ_t] / L_j(t) on fixed lengths.
    val = ex.report(estimator("trepo", variant="value_interp", K=1, anchors={"kind": "fixed", "positions": [1]}))
    val_gap = rel(val.mean, ex.expect((Ut - Uprev) / chunk_lengths(ex.tab, [1])))
    # (b) variable length (EOS), T always an anchor: the interpolation weight x = (t − 1)/(T − 1)
    # depends on the future end T, so not even the anchors-only gradient.
    ev = setup(seed, kind, horizon=4)
    Ut_v, Uprev_v = prefix_U(ev.tab)
    var = ev.report(interp)
    var_only = rel(var.mean, ev.expect((Ut_v - Uprev_v) * anchored(ev.tab, [1])))
    checks = [differ("interp, fixed length vs ∇J", fixed.rel_bias),
              equal("interp, fixed length = anchors-only E Σ_{t∈S} A_t ∇ℓ_t", only),
              differ("interp, variable length vs anchors-only", var_only),
              differ("interp, variable length vs ∇J", var.rel_bias),
              differ("value interpolation vs ∇J", val.rel_bias),
              equal("value interpolation = Σ_t E[A_t ∇ℓ_t] / L_j", val_gap)]
    bias = min(fixed.rel_bias, var_only, var.rel_bias, val.rel_bias)
    return false_outcome(combine([est_verdict(fixed), est_verdict(var), est_verdict(val)]), bias, checks,
                         f"rel. bias {fixed.rel_bias:.3g} (fixed), {var.rel_bias:.3g} (EOS), {val.rel_bias:.3g} "
                         f"(value interp.); anchors-only gap {only:.1e}",
                         {"fixed_rel_bias": fixed.rel_bias, "fixed_anchors_only_gap": only,
                          "variable_rel_bias": var.rel_bias, "variable_vs_anchors_only": var_only,
                          "value_interp_rel_bias": val.rel_bias, "value_interp_formula_gap": val_gap})


@claim("F10", "Self-inclusive MC baseline ((Σ_k R_k + RM)/(K+1)): baseline term biased by −E[RM ∇ℓ_t]/(K+1), so E[ĝ] "
       "= K/(K+1) ∇J",
       "PAPER §4 reading 1, §7 F10", "scaled")
def f10(ex: Exact, K: int = 2) -> Outcome:
    est = estimator("trepo", variant="all", K=K, self_inclusive=True)
    rep = ex.report(est)
    fresh = exact.moments(estimator("trepo", variant="all", K=K), ex.mdp, ex.pol, 1)
    checks = [differ("self-inclusive baseline vs ∇J", rep.rel_bias), equal("c = K/(K+1)", abs(rep.scale - K / (K + 1)))]
    selfW = exact.moments(est, ex.mdp, ex.pol, 1).W
    L = ex.tab.enum.tokens.shape[1]
    for t in range(L):                                                       # the baseline term alone, per position
        bias_t = exact.expected_score(ex.pol, ex.tab.enum, (selfW - fresh.W) * onehot(L, t))
        want = -ex.expect(ex.tab.enum.rm[:, None] * onehot(L, t)) / (K + 1)
        checks.append(equal(f"baseline-term bias at t={t + 1} = −E[RM ∇ℓ_t]/(K+1)", rel(bias_t, want, ex.grad.norm())))
    return false_outcome(est_verdict(rep), rep.rel_bias, checks,
                         f"rel. bias {rep.rel_bias:.4g}: c = {rep.scale:.6g} = K/(K+1), K = {K}",
                         {"rel_bias": rep.rel_bias, "scale": rep.scale, "K": K})


@claim("F11", "ReMax's baseline does not estimate U(w_0): RM(greedy) ≠ U(x), yet ReMax is unbiased",
       "PAPER §3.2 (ReMax), §7 F11", "fails")
def f11(ex: Exact) -> Outcome:
    tab = ex.tab
    g_rm = float(greedy(ex.mdp, ex.pol, torch.arange(1)).rm[0])
    U0 = float(tab.J_prompt[0])
    sd = float((tab.prob * (tab.enum.rm - U0) ** 2).sum().sqrt())            # sd of RM under π
    gap = abs(g_rm - U0) / sd
    rep = ex.report(estimator("remax"))
    checks = [differ("|RM(ŷ) − U(x)| / sd(RM)", gap), equal("ReMax unbiased", rep.rel_bias)]
    return false_outcome(identity_verdict(gap), gap, checks,
                         f"|RM(ŷ) − U(x)| = {gap:.3g} sd(RM); ReMax rel. bias {rep.rel_bias:.1e}",
                         {"rm_greedy": g_rm, "U_x": U0, "gap_in_sd": gap, "remax_rel_bias": rep.rel_bias})


