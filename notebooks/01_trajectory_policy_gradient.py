# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Response-level rewards are enough
#
# This notebook checks, **exactly**, the two theorems of *Response-Level Rewards Are All You Need
# for Online RL in LLMs* (He et al., 2025) on a small random token MDP: every response is
# enumerated, so every expectation below is a finite sum computed in float64, not a Monte Carlo
# estimate. Each section states the math (with pointers to `PAPER.md` and the written proofs in
# `proofs/`), computes it with `tpg`, and ends with an `assert` that ties the prose to the numbers.
#
# **Prerequisites**: the score-function identity ∇E[f] = E[f ∇log p] and a little PyTorch. About 20 minutes.
# The notebook runs in seconds on a CPU; `TPG_FAST=1` (the test suite sets it) uses a smaller MDP
# (horizon 3 instead of 4) and fewer Monte Carlo samples. Every number the prose states is computed
# below and checked by an `assert`.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

from tpg import TabularSoftmax, estimator, exact, random_mdp, report
from tpg.figures.core import STYLE
from tpg.verify import RTOL, mc_batches, mc_check

plt.style.use(str(STYLE))            # tpg's figure style (no LaTeX needed)
FAST = bool(os.environ.get("TPG_FAST"))
H = 3 if FAST else 4                 # horizon: 3 tokens with EOS → 13 responses per prompt; 4 → 40
GAMMA = 0.8                          # the discount used for the γ < 1 half of each check
print(f"TPG_FAST={FAST}: horizon H = {H}; equalities are checked to rtol {RTOL:g} (float64 round-off ≈ 1e-16)")


def make(gamma: float, seed: int = 0, **kw):
    """A seeded random token MDP (vocabulary {0, 1, EOS}, 2 prompts, Gaussian token rewards) and a
    tabular softmax policy on it (one logit vector per prefix state)."""
    mdp = random_mdp(seed, vocab_size=3, horizon=H, eos=True, n_prompts=2, gamma=gamma, **kw)
    return mdp, TabularSoftmax(mdp, seed=seed)


# %% [markdown]
# ## 1.1 The token MDP, J and ∇J by enumeration
#
# A state is (prompt x, response prefix y_<t); an action is the next token y_t; EOS (token id 2
# here) ends the response, which otherwise stops at the horizon H. Token rewards r_t add up to
# the response-level reward **RM(x, y) = Σ_t γ^(t−1) r_t** (PAPER §1.2–1.3, proofs/01-setup.md
# §1.1). The objective is J(θ) = E_x E_{y∼π_θ}[RM(x, y)]; with every response enumerated,
#
#     J = Σ_{x,y} ρ(x) π_θ(y|x) RM(x, y),        ∇J = Σ_{x,y} ρ(x) ∇π_θ(y|x) RM(x, y),
#
# and `tpg.exact.gradient` takes ∇J by autograd through that finite sum. For the tabular softmax
# there is also a closed form ∂J/∂θ[s, a] = ρ(s) π(a|s) (U(s⊕a) − U(s)) (proofs/01-setup.md §1.8),
# where U(s) = E[RM | prefix s] is the expected final reward of a prefix.

# %%
mdp, policy = make(gamma=1.0)
tab = exact.tables(mdp, policy)                   # π, r, U, V, Q, A, reach probabilities, P(x, y)
grad = exact.gradient(mdp, policy, tab.enum)      # ∇J, flat over the logits table (S·V,)
enum = tab.enum

print(mdp)
print(f"{'x':>2} {'response y':<12} {'P(x, y)':>9} {'RM':>8}")
for i in torch.argsort(tab.prob, descending=True)[:6].tolist():
    y = enum.tokens[i, : int(enum.lengths[i])].tolist()
    print(f"{int(enum.prompt_idx[i]):>2} {str(y):<12} {float(tab.prob[i]):9.4f} {float(enum.rm[i]):8.4f}")
J_sum = float((tab.prob * enum.rm).sum())
closed_gap = float((tab.closed_form().reshape(-1) - grad).norm() / grad.norm())
print(f"J = {tab.J:.6f} (Σ P·RM = {J_sum:.6f});  ‖∇J‖ = {float(grad.norm()):.4f};  "
      f"closed form vs autograd: rel. gap {closed_gap:.1e}")

# %%
assert abs(float(tab.prob.sum()) - 1.0) < RTOL                 # the enumeration is a probability distribution
assert abs(J_sum - tab.J) <= RTOL * abs(tab.J)
assert abs(exact.objective(mdp, policy, enum).item() - tab.J) <= RTOL * abs(tab.J)
assert closed_gap <= RTOL                                       # T2: the tabular closed form is ∇J

# %% [markdown]
# ## 1.2 Theorem 1: E Σ_t RM ∇ℓ_t = ∇J
#
# Write ℓ_t = log π_θ(y_t | x, y_<t). The trajectory policy-gradient theorem (PAPER §2, Theorem 1,
# Eq. 21; proofs/03-theorem1.md) says that weighting **every** token's score by the same
# response-level reward gives the exact gradient,
#
#     ∇J = E[ RM(x, y) Σ_t ∇ℓ_t ],
#
# so a single sampled response with its final reward is an unbiased estimate: no per-token reward
# is needed. `tpg.report` computes E[ĝ] over every possible batch for the `reinforce` estimator
# (advantage RM on every token) and compares it with ∇J. It holds for γ = 1 and for γ < 1 (then
# RM = Σ γ^(t−1) r_t is itself discounted, PAPER §1.3).

# %%
rows = []
for g in (1.0, GAMMA):
    m, p = make(gamma=g)
    r = report(estimator("reinforce"), m, p, G=1, cov=None)
    rows.append((g, r))
print(f"{'γ':>4} {'verdict':<9} {'rel. bias':>10} {'cosine':>16}")
for g, r in rows:
    print(f"{g:>4g} {r.verdict:<9} {r.rel_bias:10.1e} {r.cosine:16.12f}")

# %%
assert all(r.verdict == "unbiased" and r.rel_bias <= RTOL for _, r in rows)

# %% [markdown]
# Look at it coordinate by coordinate: every one of the D = (states × vocabulary) entries of E[ĝ]
# sits on the diagonal E[ĝ]_d = (∇J)_d. A *sampled* REINFORCE update is noisy, of course: the
# right panel follows the running mean of ⟨u, ĝ_b⟩ along the unit gradient direction u = ∇J/‖∇J‖
# over independent samples b, with the exact ±1.96 σ/√n band (σ² = uᵀ Cov[ĝ] u from
# `exact.moments`). A **designed** Monte Carlo check (`tpg.verify.mc_check`, with `n_batches=None`
# the number of samples is chosen by the design from the exact skewness and kurtosis; false-fail
# rate α = 1e-6) agrees with the exact verdict.

# %%
r1 = rows[0][1]
u = (grad / grad.norm())[None, :]                                        # (1, D) the unit gradient direction
N_MC = 2000 if FAST else 20000
z = mc_batches(estimator("reinforce"), mdp, policy, 1, N_MC, torch.Generator().manual_seed(1), u)[:, 0]   # (n,)
sigma = float(exact.moments(estimator("reinforce"), mdp, policy, 1, cov="full", directions=u).cov[0, 0]) ** 0.5
n = np.arange(1, N_MC + 1)
running = np.cumsum(z) / n
check = mc_check(estimator("reinforce"), mdp, policy, 1, generator=torch.Generator().manual_seed(2),
                 n_directions=2 if FAST else 8)                         # u ∥ ∇J and 1 (fast) or 7 directions ⟂ it
print(check.summary())

fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
a.scatter(grad.numpy(), r1.mean.numpy(), s=10)
lim = float(grad.abs().max()) * 1.1
a.plot([-lim, lim], [-lim, lim], "k--", lw=0.8, label="E[ĝ] = ∇J")
a.set_xlabel("∇J, coordinate d (autograd through J)")
a.set_ylabel("E[ĝ]_d (every response enumerated)")
a.set_title(f"REINFORCE, exact: rel. bias {r1.rel_bias:.0e}")
a.legend()
t = float(grad.norm())
b.plot(n, running, lw=1, label="running mean of ⟨u, ĝ_b⟩")
b.fill_between(n[9:], t - 1.96 * sigma / np.sqrt(n[9:]), t + 1.96 * sigma / np.sqrt(n[9:]), alpha=0.25,
               label="‖∇J‖ ± 1.96 σ/√n (exact σ)")
b.axhline(t, color="k", lw=0.8)
b.set_xscale("log")
b.set_xlabel("number of sampled responses n")
b.set_ylabel("⟨u, mean ĝ⟩,  u = ∇J/‖∇J‖")
b.set_title("one sampled response at a time")
b.set_ylim(t - 4 * sigma / np.sqrt(30), t + 4 * sigma / np.sqrt(30))
b.legend(loc="upper right")
plt.show()

# %%
assert check.passed and check.trustworthy and check.n_batches == check.needed_batches   # n chosen by the design
assert abs(running[-1] - t) <= 5 * sigma / np.sqrt(N_MC)                                 # the sample mean is where it should be

# %% [markdown]
# ## 1.3 Theorem 2, pathwise: U(y_≤t) − U(y_<t) = γ^(t−1) A_t
#
# Let U(y_≤t) = E[RM | x, y_≤t] be the expected final reward once the first t tokens are fixed,
# and A_t = Q(s_{t−1}, y_t) − V(s_{t−1}) the usual advantage of the token MDP (PAPER §2, Theorem 2,
# Eq. 28; proofs/04-theorem2.md §4.1). Then, on **every** response (not just in expectation),
#
#     U(y_≤t) − U(y_<t) = γ^(t−1) A_t,
#
# because U(y_<t) = Σ_{k<t} γ^(k−1) r_k + γ^(t−1) V(s_{t−1}) and U(y_≤t) = Σ_{k<t} γ^(k−1) r_k +
# γ^(t−1) Q(s_{t−1}, y_t). So the "value of the prefix after minus before" — which needs only
# the response-level reward — is exactly the discounted advantage, and E Σ_t (U_t − U_{t−1}) ∇ℓ_t
# = ∇J: Theorem 1 with the best per-position baseline. `exact.tables` gives U, A along each
# response (`tab.along`, `tab.prefix_values`).

# %%
def theorem2(gamma: float):
    """(max pathwise gap, rel. gap of E Σ ΔU ∇ℓ vs ∇J, the table and ΔU along responses)."""
    m, p = make(gamma=gamma)
    t = exact.tables(m, p)
    g = exact.gradient(m, p, t.enum)
    pv = t.prefix_values(t.enum)                                          # (N, L+1) U(y_≤t), t = 0..L
    dU = (pv[:, 1:] - pv[:, :-1]) * t.enum.mask                           # (N, L) U(y_≤t) − U(y_<t)
    disc = gamma ** torch.arange(m.horizon, dtype=torch.float64)[None, :]  # (1, L) γ^(t−1)
    gA = disc * t.along(t.A)                                              # (N, L) γ^(t−1) A_t
    path = float((dU - gA).abs().max() / dU.abs().max())
    mean = exact.expected_score(p, t.enum, t.prob[:, None] * dU)          # E Σ_t ΔU_t ∇ℓ_t (D,)
    return path, float((mean - g).norm() / g.norm()), t, dU, gA


print(f"{'γ':>4} {'max |ΔU − γ^(t−1)A| / max |ΔU|':>32} {'‖E Σ ΔU ∇ℓ − ∇J‖/‖∇J‖':>24}")
t2 = {}
for g in (1.0, GAMMA):
    t2[g] = theorem2(g)
    print(f"{g:>4g} {t2[g][0]:32.1e} {t2[g][1]:24.1e}")

_, _, t08, dU, gA = t2[GAMMA]
i = int(torch.argmax(t08.enum.lengths))                                   # one full-length response
print(f"\nγ = {GAMMA}, response {t08.enum.tokens[i].tolist()} of prompt {int(t08.enum.prompt_idx[i])}:")
print("  ΔU_t        ", [f"{v:+.5f}" for v in dU[i].tolist()])
print("  γ^(t−1) A_t ", [f"{v:+.5f}" for v in gA[i].tolist()])

# %%
assert all(path <= RTOL and mean_gap <= RTOL for path, mean_gap, *_ in t2.values())

# %% [markdown]
# Every (response, position) pair is one point below, for γ = 0.8: the per-token weight ΔU_t that
# Theorem 2 uses, against the textbook discounted advantage. They lie on the diagonal, not near it.
# The right panel shows what the per-position baseline buys: Theorem 1's weight RM is the same on
# every token of a response, Theorem 2's ΔU_t is each token's own share of RM − U(x) (section 1.4
# shows they telescope to it when γ = 1).

# %%
m_ = t08.enum.mask.bool()
fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
a.scatter(gA[m_].numpy(), dU[m_].numpy(), s=8)
lim = float(dU.abs().max()) * 1.1
a.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
a.set_xlabel("γ^(t−1) A_t  (token-MDP advantage)")
a.set_ylabel("U(y_≤t) − U(y_<t)  (response-level values)")
a.set_title(f"Theorem 2 pathwise, γ = {GAMMA}: max gap {t2[GAMMA][0]:.0e}")
L = int(t08.enum.lengths[i])
pos = np.arange(1, L + 1)
b.bar(pos - 0.2, [float(t08.enum.rm[i])] * L, width=0.4, label="Theorem 1 weight: RM (every token)")
b.bar(pos + 0.2, dU[i, :L].numpy(), width=0.4, label="Theorem 2 weight: ΔU_t")
b.axhline(0, color="k", lw=0.6)
b.set_xticks(pos)
b.set_xlabel(f"position t in response {t08.enum.tokens[i, :L].tolist()}")
b.set_ylabel("weight on ∇ℓ_t")
b.set_title("one response: same RM, different credit")
lo, hi = b.get_ylim()
b.set_ylim(lo - 0.45 * (hi - lo), hi)                                    # room for the legend below the bars
b.legend(fontsize=7, loc="lower center")
plt.show()

# %% [markdown]
# ## 1.4 Decomposition invariance: same RM ⇒ same ∇J and same A, different V
#
# Many token rewards give the same response reward. The Zero-Reward decomposition (ZRA, PAPER
# §1.4) puts everything on the last token: r_t = 0 for t < T and r_T = RM / γ^(T−1), so that
# Σ γ^(t−1) r_t is still RM. `mdp.zra()` builds that MDP. Since J and U depend only on RM, ∇J and
# γ^(t−1) A_t = ΔU (section 1.3) are unchanged, hence A itself is unchanged — but V(s) = E[Σ_{k≥t}
# γ^(k−t) r_k | s] counts only the **future** rewards of a decomposition, so the critic's target
# moves (PAPER §7 item T7; proofs/04-theorem2.md §4.4). A critic is a choice of decomposition; the
# advantage and the gradient are not. (At the roots V = U(x) in both: no reward has been collected
# yet, so the two tables agree there and nowhere else in general.)

# %%
m, p = make(gamma=GAMMA)
mz = m.zra()
t_tok, t_zra = exact.tables(m, p), exact.tables(mz, p)
g_tok, g_zra = exact.gradient(m, p), exact.gradient(mz, p)
A_tok, A_zra = t_tok.along(t_tok.A), t_zra.along(t_zra.A)                 # (N, L) along every response
reach = t_tok.visit > 0
grad_gap = float((g_zra - g_tok).norm() / g_tok.norm())
adv_gap = float((A_zra - A_tok).abs().max() / A_tok.abs().max())
v_diff = float((t_zra.V - t_tok.V)[reach].abs().max() / t_tok.V[reach].abs().max())
print(f"γ = {GAMMA}:  ∇J rel. gap {grad_gap:.1e};  A_t max rel. gap {adv_gap:.1e};  "
      f"V max rel. difference {v_diff:.3g}")
print(f"{'state':>5} {'V (token rewards)':>18} {'V (ZRA)':>10}")
for s in range(4):
    print(f"{s:>5} {float(t_tok.V[s]):18.5f} {float(t_zra.V[s]):10.5f}")

# %%
assert grad_gap <= RTOL and adv_gap <= RTOL      # same gradient, same advantages
assert v_diff > 1e-3                              # ... but a different value function

# %% [markdown]
# ## 1.5 Why dropping γ^(t−1) is biased for γ < 1
#
# Lemma 1 (PAPER §2, Eq. 4; proofs/02-lemmas.md §2.1) is ∇J = E Σ_t γ^(t−1) Q(s_{t−1}, y_t) ∇ℓ_t,
# and the reward-to-go estimator `reinforce_oracle` uses γ^(t−1) G_t with G_t = Σ_{k≥t} γ^(k−t) r_k.
# Common implementations drop the factor γ^(t−1) and weight token t by G_t alone. Its expectation
# is E Σ_t Q_t ∇ℓ_t — the paper's Eq. 26 — which over-weights late tokens by γ^−(t−1): biased for
# every γ < 1, and harmless only at γ = 1 (PAPER §7 item F1; proofs/07-false-claims.md F1).

# %%
print(f"{'γ':>4} {'with γ^(t−1)':>14} {'without':>10} {'rel. bias without':>18} {'cosine without':>15}")
f1 = {}
for g in (1.0, 0.9, GAMMA, 0.5):
    m, p = make(gamma=g)
    good = report(estimator("reinforce_oracle", gamma=g), m, p, G=1, cov=None)
    bad = report(estimator("reinforce_oracle", gamma=g, discount_weight=False), m, p, G=1, cov=None)
    f1[g] = (good, bad)
    print(f"{g:>4g} {good.verdict:>14} {bad.verdict:>10} {bad.rel_bias:18.3g} {bad.cosine:15.6f}")

# %%
assert all(good.verdict == "unbiased" for good, _ in f1.values())
assert f1[1.0][1].verdict == "unbiased"                                  # γ = 1: γ^(t−1) = 1, nothing dropped
assert all(bad.verdict == "biased" and bad.rel_bias > 1e-3 for g, (_, bad) in f1.items() if g < 1)

# %% [markdown]
# The bias grows as γ moves away from 1. Sweeping γ (same seeded MDP and policy, only γ changes):

# %% tags=["thumbnail"]
gammas = np.linspace(0.3, 1.0, 5 if FAST else 15)
sweep = []
for g in gammas:
    m, p = make(gamma=float(g))
    good = report(estimator("reinforce_oracle", gamma=float(g)), m, p, G=1, cov=None)
    bad = report(estimator("reinforce_oracle", gamma=float(g), discount_weight=False), m, p, G=1, cov=None)
    sweep.append((good.rel_bias, bad.rel_bias, 1 - bad.cosine))
sweep = np.array(sweep)
fig, ax = plt.subplots(figsize=(6, 3.6))
ax.semilogy(gammas, np.maximum(sweep[:, 1], 1e-17), marker="o", label="drop γ^(t−1): ‖E ĝ − ∇J‖/‖∇J‖")
ax.semilogy(gammas, np.maximum(sweep[:, 2], 1e-17), marker="s", label="drop γ^(t−1): 1 − cos(E ĝ, ∇J)")
ax.semilogy(gammas, np.maximum(sweep[:, 0], 1e-17), marker="x", color="0.4", label="keep γ^(t−1) (Lemma 1): rel. bias")
ax.axhline(RTOL, color="k", ls=":", lw=0.8, label=f"'unbiased' threshold {RTOL:g}")
ax.set_xlabel("discount γ")
ax.set_ylabel("exact relative bias  (0 drawn at 1e-17)")
ax.set_title(f"Reward-to-go REINFORCE without γ^(t−1) (Eq. 26), H = {H}")
ax.legend(fontsize=7)
plt.show()

# %%
assert (sweep[:, 0] <= RTOL).all()                                        # Lemma 1's weights: unbiased at every γ
assert sweep[-1, 1] <= RTOL and (sweep[:-1, 1] > 1e-3).all()              # dropped: exact at γ = 1 only
assert (np.diff(sweep[:, 1]) < 0).all()                                   # and worse the smaller γ is, here

# %% [markdown]
# ## Exercises
#
# **1. Theorem 1 term by term.** PAPER §7 item T5 says more than Theorem 1: for **each** position t,
# E[RM ∇ℓ_t] = E[U(y_≤t) ∇ℓ_t] (the tokens after t only add noise to the weight of token t). Check it for
# every t on the γ = 0.8 MDP, using `exact.expected_score(policy, enum, W)`, which returns
# Σ_{n,t} W[n, t] ∇ℓ_t(y_n) for a weight table W of shape (N, L).
#
# *Solution.* Put P(y)·RM (resp. P(y)·U(y_≤t)) in column t of W and zeros elsewhere; the two sums agree
# because E[RM | y_≤t] = U(y_≤t) and ∇ℓ_t is a function of y_≤t (tower property, proofs/03-theorem1.md).

# %%
m, p = make(gamma=GAMMA)
t_ = exact.tables(m, p)
pv = t_.prefix_values(t_.enum)                                            # (N, L+1) U(y_≤t)
gaps = []
for t in range(m.horizon):
    W_rm = torch.zeros_like(t_.enum.mask)
    W_u = torch.zeros_like(t_.enum.mask)
    W_rm[:, t] = t_.prob * t_.enum.rm * t_.enum.mask[:, t]
    W_u[:, t] = t_.prob * pv[:, t + 1] * t_.enum.mask[:, t]
    a_, b_ = exact.expected_score(p, t_.enum, W_rm), exact.expected_score(p, t_.enum, W_u)
    gaps.append(float((a_ - b_).norm() / a_.norm()))
print("per-position rel. gaps:", [f"{g:.1e}" for g in gaps])
assert max(gaps) <= RTOL

# %% [markdown]
# **2. Telescoping.** With γ = 1, show on every response that Σ_t (U(y_≤t) − U(y_<t)) = RM(x, y) − U(x)
# (proofs/04-theorem2.md §4.3): the exact per-token advantages redistribute the response-level advantage.
#
# *Solution.* The sum telescopes to U(y_≤T) − U(x), and U of a complete response is its reward.

# %%
m, p = make(gamma=1.0)
t_ = exact.tables(m, p)
pv = t_.prefix_values(t_.enum)
tele = ((pv[:, 1:] - pv[:, :-1]) * t_.enum.mask).sum(1)                   # (N,) Σ_t ΔU_t
roots = pv[:, 0]                                                          # U(x) of each response's prompt
tele_gap = float((tele - (t_.enum.rm - roots)).abs().max())
print(f"max |Σ_t ΔU_t − (RM − U(x))| = {tele_gap:.1e}")
assert tele_gap <= RTOL * float(t_.enum.rm.abs().max())

# %% [markdown]
# **3. Finite differences.** `exact.gradient` uses autograd. Check it against a central difference
# (J(θ + hv) − J(θ − hv))/2h along one seeded random unit direction v (T1), with h = 1e-5.
#
# *Solution.* The central difference has error O(h²·‖∇³J‖) plus round-off O(ε/h) ≈ 1e-11: a relative
# agreement of 1e-8 is what float64 allows here.

# %%
m, p = make(gamma=GAMMA)
g_ = exact.gradient(m, p)
v = torch.randn(p.logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
v /= v.norm()
h = 1e-5


def J(logits):
    with torch.no_grad():
        return float(exact.objective(m, TabularSoftmax(m, logits)))


fd = (J(p.logits.detach() + h * v) - J(p.logits.detach() - h * v)) / (2 * h)
ad = float(g_ @ v.reshape(-1))
print(f"finite difference {fd:.10f}, autograd {ad:.10f}, rel. gap {abs(fd - ad) / abs(ad):.1e}")
assert abs(fd - ad) <= 1e-8 * max(abs(ad), float(g_.norm()))
print("All checks of notebook 1 passed.")
