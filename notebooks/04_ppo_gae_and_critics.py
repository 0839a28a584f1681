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
# # 4. PPO, GAE and critics
#
# PPO adds two things to the policy gradient: a **clipped importance ratio**, so that several optimiser
# steps can reuse one batch, and **GAE advantages** from a learned critic V̂. Both are exact statements in
# tpg. Clipping is inactive at ratio 1 and acts after the policy moved (`report(..., old_policy=θ_old)`
# draws the batches from θ_old and scores them under θ); GAE(λ) is unbiased for every λ with the exact
# critic and for λ = 1 with any critic, and biased otherwise — by how much depends on the critic, which
# we make exact, noisy and learned.
#
# **Prerequisites**: notebooks 1 and 3 (baselines). About 20 minutes. `TPG_FAST=1` shrinks the sweeps.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

from tpg import TabularSoftmax, estimator, exact, random_mdp, report, sample
from tpg.draws import exact_critic, perturbed_critic
from tpg.figures.core import STYLE
from tpg.train import LearnedTableCritic
from tpg.verify import RTOL, roundoff_floor

plt.style.use(str(STYLE))
FAST = bool(os.environ.get("TPG_FAST"))
print(f"TPG_FAST={FAST}: 'unbiased' means rel. bias ≤ {RTOL:g}")

mdp = random_mdp(0, vocab_size=3, horizon=3, eos=True, n_prompts=2, reward="gaussian")
policy = TabularSoftmax(mdp, seed=0)
tab = exact.tables(mdp, policy)
delta = roundoff_floor(mdp, policy)                        # the engine's round-off, measured once
print(mdp)


def moved(pol, step: float, seed: int = 12345):
    """A copy of a tabular policy with its logits moved by step · N(0, 1): θ after some optimiser steps."""
    g = torch.Generator().manual_seed(seed)
    return TabularSoftmax(pol.mdp, pol.logits.detach() + step * torch.randn(pol.logits.shape, generator=g,
                                                                           dtype=torch.float64))


# %% [markdown]
# ## 4.1 Clipping at ratio 1 changes nothing
#
# verl's per-token PPO loss is max(−A ρ_t, −A clip(ρ_t, 1 − ε, 1 + ε)) with ρ_t = π_θ(y_t|s)/π_old(y_t|s).
# On the first optimiser step θ = θ_old, every ρ_t = 1 lies inside the clip range, and ∇ρ_t = ρ_t ∇ℓ_t = ∇ℓ_t:
# the clipped surrogate's gradient **is** the policy-gradient estimator (T14; proofs/05-estimators.md §5.10).

# %%
at1 = {loss: report(estimator("rloo", loss=loss, clip=0.2), mdp, policy, G=2, cov=None, roundoff=delta)
       for loss in ("pg", "ppo")}
at1["ppo, dual clip 3"] = report(estimator("rloo", loss="ppo", clip=0.2, dual_clip=3.0), mdp, policy, G=2,
                                 cov=None, roundoff=delta)
for k, r in at1.items():
    print(f"RLOO G=2, loss {k:<17} {r.verdict:<9} rel. bias {r.rel_bias:.1e}")
gap1 = float((at1["ppo"].mean - at1["pg"].mean).norm() / at1["pg"].mean.norm())
print(f"‖E ĝ_ppo − E ĝ_pg‖ / ‖E ĝ_pg‖ = {gap1:.1e}")

# %%
assert all(r.verdict == "unbiased" for r in at1.values()) and gap1 <= RTOL

# %% [markdown]
# ## 4.2 After the policy moved: the surrogate is not ∇J(θ)
#
# From the second step on, the batch comes from θ_old ≠ θ. The surrogate's gradient is then
# E_old[Σ_t ρ_t 1[unclipped] A_t ∇ℓ_t] (T19 checks this hand formula against the engine). Two things
# separate it from ∇J(θ) (F7): the ratio is **per token** (the exact correction would be the ratio of the
# whole prefix, Π_{k≤t} ρ_k), and clipped tokens lose their gradient altogether. Reusing the stale batch
# with the plain `pg` loss (no ratio at all) is biased as well. Below, θ = θ_old + s·ξ for one fixed
# direction ξ, and the exact relative bias against ∇J(θ).

# %%
steps = [0.0, 0.1, 0.3, 1.0] if FAST else [0.0, 0.03, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
losses = {"PPO clip ε = 0.1": ("ppo", 0.1), "PPO clip ε = 0.2": ("ppo", 0.2), "PPO clip ε = 0.5": ("ppo", 0.5),
          "pg loss on the stale batch": ("pg", 0.2)}
moved_bias = {k: [] for k in losses}
for s in steps:
    new = moved(policy, s) if s else policy
    d = roundoff_floor(mdp, new)
    for k, (loss, clip) in losses.items():
        r = report(estimator("rloo", loss=loss, clip=clip), mdp, new, G=2, cov=None, old_policy=policy, roundoff=d)
        moved_bias[k].append(r.rel_bias)
fig, ax = plt.subplots(figsize=(6.2, 3.6))
for k, v in moved_bias.items():
    ax.plot(steps, v, marker="o", ls="--" if k.startswith("pg") else "-", label=k)
ax.set_xlabel("how far θ moved from θ_old (step s along a fixed random direction)")
ax.set_ylabel("exact ‖E ĝ − ∇J(θ)‖ / ‖∇J(θ)‖")
ax.set_title("RLOO G = 2, batch drawn from θ_old, scored under θ")
ax.legend(fontsize=7)
plt.show()

# %%
assert all(v[0] <= RTOL for v in moved_bias.values())                    # at θ = θ_old: unbiased (4.1)
assert all(min(v[1:]) > 1e-3 for v in moved_bias.values())               # after a move: biased (F7)
assert moved_bias["PPO clip ε = 0.1"][-1] > moved_bias["PPO clip ε = 0.5"][-1]   # tighter clip, more lost

# %% [markdown]
# ## 4.3 GAE(λ): exact, noisy and learned critics
#
# GAE's advantage is Â_t = Σ_{j≥t} (γλ)^(j−t) δ_j with TD errors δ_j = r_j + γ V̂(s_j) − V̂(s_(j−1))
# (proofs/04-theorem2.md §4.6). With the **exact** critic V̂ = V and deterministic transitions, δ_j = A_j
# pathwise, so every λ gives Σ (γλ)^(j−t) A_j, whose conditional mean given y_≤t is A_t: unbiased (T9).
# With a **wrong** critic, λ = 1 telescopes to G_t − V̂(s_(t−1)) — V̂ is then only a baseline, still
# unbiased — while λ < 1 leaves V̂(s_t) *after* the token in the advantage: biased (F8). γ = 1 here. The
# right panel is the error that matters for learning, MSE = tr Cov[ĝ] + ‖E ĝ − ∇J‖².

# %%
lams = [0.0, 0.5, 0.9, 1.0] if FAST else [0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0]
critics = {"exact V": exact_critic(tab), "V + noise σ = 0.2": perturbed_critic(tab, noise=0.2, seed=1),
           "V + noise σ = 0.5": perturbed_critic(tab, noise=0.5, seed=1)}
gae = {k: [report(estimator("gae", lam=lam), mdp, policy, G=1, cov="trace", critic=c, roundoff=delta)
           for lam in lams] for k, c in critics.items()}
rloo2 = report(estimator("rloo"), mdp, policy, G=2, cov="trace", roundoff=delta)
mse = lambda r: r.cov_trace + float(r.bias @ r.bias)                      # noqa: E731

# %% tags=["thumbnail"]
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
for i, (k, rs) in enumerate(gae.items()):
    a.semilogy(lams, [max(r.rel_bias, 1e-17) for r in rs], marker="o", color=f"C{i}", label=k)
    b.plot(lams, [mse(r) for r in rs], marker="o", color=f"C{i}", label=f"GAE(λ), {k}, G = 1")
b.axhline(mse(rloo2), color="k", ls=":", lw=1, label="RLOO, G = 2 (no critic)")
a.axhline(RTOL, color="k", ls=":", lw=0.8, label=f"'unbiased' threshold {RTOL:g}")
a.set_xlabel("GAE λ")
a.set_ylabel("exact rel. bias  (0 drawn at 1e-17)")
a.set_title("bias: none with the exact critic, none at λ = 1")
a.legend(fontsize=7)
b.set_xlabel("GAE λ")
b.set_ylabel("MSE = tr Cov[ĝ] + ‖bias‖²")
b.set_title("error of one update")
b.legend(fontsize=7)
plt.show()

# %%
assert all(r.verdict == "unbiased" for r in gae["exact V"])                          # T9: every λ
assert all(rs[-1].verdict == "unbiased" for rs in gae.values())                      # λ = 1: any critic
assert all(r.rel_bias > 1e-3 for k in list(critics)[1:] for r in gae[k][:-1])        # F8: λ < 1, wrong critic
assert mse(gae["exact V"][0]) < mse(rloo2)                                           # a perfect critic beats RLOO

# %% [markdown]
# A **learned** critic is a noisy one whose noise shrinks with data. `tpg.train.LearnedTableCritic` regresses
# a per-state table on sampled returns-to-go (V̂ ← V̂ + ½(mean return − V̂) per batch, starting from 0).
# After each batch we ask the engine for the exact bias and MSE of GAE(λ = 0.9) with the critic *as it is
# then*, and for its error max_s |V̂(s) − V(s)| over reachable states.

# %%
critic = LearnedTableCritic(mdp, lr=0.5)
gen = torch.Generator().manual_seed(0)
reach = tab.visit > 0
checkpoints = [1, 5, 20] if FAST else [1, 2, 5, 10, 20, 50, 100]
learned = []
for n in range(1, checkpoints[-1] + 1):
    critic.update(sample(mdp, policy, 4, gen, n_prompts=2))
    if n in checkpoints:
        r = report(estimator("gae", lam=0.9), mdp, policy, G=1, cov="trace", critic=critic, roundoff=delta)
        r1 = report(estimator("gae", lam=1.0), mdp, policy, G=1, cov=None, critic=critic, roundoff=delta)
        err = float((critic.table - tab.V)[reach].abs().max())
        learned.append((n, err, r.rel_bias, mse(r), r1.rel_bias))
        print(f"after {n:>3} batches: critic error {err:.3f}, GAE(0.9) rel. bias {r.rel_bias:.3f}, MSE {mse(r):.3f}; "
              f"GAE(1) rel. bias {r1.rel_bias:.1e}")
learned = np.array(learned)
fig, ax = plt.subplots(figsize=(6, 3.4))
ax.plot(learned[:, 0], learned[:, 1], "o-", label="critic error max_s |V̂ − V|")
ax.plot(learned[:, 0], learned[:, 2], "s-", label="GAE(0.9): exact rel. bias")
ax.set_xscale("log")
ax.set_xlabel("batches the critic has seen (8 responses each)")
ax.set_title("A learned critic: bias shrinks as the critic learns")
ax.legend(fontsize=7)
plt.show()

# %%
assert learned[-1, 1] < learned[0, 1] and learned[-1, 2] < learned[0, 2]   # a better critic, a smaller bias
assert (learned[:, 4] <= RTOL).all()                                       # λ = 1 stays unbiased throughout

# %% [markdown]
# ## Exercises
#
# **1. The best λ for a noisy critic.** For the σ = 0.5 critic, which λ on the grid gives the smallest MSE, and
# is it better than RLOO with G = 2?
#
# *Solution.* Read it off `gae`: small λ cuts variance, large λ cuts bias; the optimum is in between or at an
# end depending on the critic. The comparison with RLOO is what PAPER §3.1 leaves open ("if the critic
# trains well"): here it is a number.

# %%
m_noisy = [mse(r) for r in gae["V + noise σ = 0.5"]]
best = int(np.argmin(m_noisy))
print(f"σ = 0.5: best λ = {lams[best]} with MSE {m_noisy[best]:.4f}; RLOO G=2: {mse(rloo2):.4f}")
assert m_noisy[best] == min(m_noisy)

# %% [markdown]
# **2. γ < 1.** verl's GAE uses γ in the TD errors but no γ^(t−1) in front of the advantage; tpg's `gae`
# follows verl by default and takes `discount_weight=True` for Lemma 1's factor. On a γ = 0.8 MDP with the
# exact critic, which of the two is unbiased?
#
# *Solution.* With the exact critic GAE's conditional mean given y_≤t is A_t, so the estimator is
# E Σ_t w_t A_t ∇ℓ_t. Lemma 1 needs w_t = γ^(t−1) (T20 checks that form); without it, w_t = 1 is the
# Eq. 26 bias of notebook 1, section 1.5 — the same relative bias as reward-to-go REINFORCE without γ^(t−1).

# %%
m8 = random_mdp(0, vocab_size=3, horizon=3, eos=True, n_prompts=2, reward="gaussian", gamma=0.8)
p8 = TabularSoftmax(m8, seed=0)
c8 = exact_critic(exact.tables(m8, p8))
verl_way = report(estimator("gae", lam=0.5, gamma=0.8), m8, p8, G=1, cov=None, critic=c8)
lemma1 = report(estimator("gae", lam=0.5, gamma=0.8, discount_weight=True), m8, p8, G=1, cov=None, critic=c8)
eq26 = report(estimator("reinforce_oracle", gamma=0.8, discount_weight=False), m8, p8, G=1, cov=None)
for r in (verl_way, lemma1):
    print(r.summary())
print(f"reward-to-go REINFORCE without γ^(t−1): rel. bias {eq26.rel_bias:.4e}")
assert lemma1.verdict == "unbiased" and verl_way.verdict == "biased"
assert abs(verl_way.rel_bias - eq26.rel_bias) < 1e-9          # both are exactly Eq. 26's expectation
print("All checks of notebook 4 passed.")
