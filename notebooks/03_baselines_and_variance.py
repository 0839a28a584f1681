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
# # 3. Baselines and variance
#
# A baseline changes **nothing** in expectation and **everything** in variance. This notebook makes both
# halves exact: Lemma 2 (which baselines keep E[ĝ] = ∇J), Theorem 2's per-position value U(y_<t) as a
# baseline, the baseline that *minimises* the variance (it is not U), and finally variance against the
# number of tokens an update samples. Every variance below is the exact tr Cov[ĝ] = E‖ĝ − E ĝ‖² over
# every possible batch (`report(..., cov="trace")`), not a sample estimate — except TRePO's in 3.4,
# whose continuations only Monte Carlo can average over.
#
# **Prerequisites**: notebooks 1–2. About 20 minutes. `TPG_FAST=1` (set by the tests) shrinks the sweeps.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

from tpg import TabularSoftmax, estimator, exact, random_mdp, report
from tpg.draws import TableCritic
from tpg.figures import FIGURES, Context
from tpg.figures.core import STYLE
from tpg.scores import token_scores
from tpg.verify import RTOL

plt.style.use(str(STYLE))
FAST = bool(os.environ.get("TPG_FAST"))
print(f"TPG_FAST={FAST}: exact variances; 'unbiased' means rel. bias ≤ {RTOL:g}")

mdp = random_mdp(1, vocab_size=3, horizon=3, eos=True, n_prompts=2, reward="gaussian")
policy = TabularSoftmax(mdp, seed=1)
tab = exact.tables(mdp, policy)
grad = exact.gradient(mdp, policy)
prompt_of_state = torch.as_tensor(mdp.state_table()["prompt"])              # (S,) the prompt of every state
roots = prompt_of_state * mdp.states_per_prompt                              # (S,) the root state x of every state
print(mdp)


def with_baseline(table):
    """RM − b(s_(t−1)) on every token, b a per-state table (S,)."""
    return estimator("baseline", baseline=TableCritic(mdp, torch.as_tensor(table, dtype=torch.float64)))


# %% [markdown]
# ## 3.1 Lemma 2: which baselines are free
#
# Lemma 2 (PAPER §2; proofs/02-lemmas.md §2.2): for any function c of the prefix, E[Σ_t c(y_<t) ∇ℓ_t] = 0,
# because E[∇ℓ_t | y_<t] = Σ_a π(a|y_<t) ∇log π(a|y_<t) = ∇ Σ_a π(a|y_<t) = 0. So A_t = RM − b(y_<t) has
# E[ĝ] = ∇J for **every** table b, whatever its size. A "baseline" that reads the action it scores,
# b(y_<t, y_t), has no such protection: its E[ĝ] moves linearly with its size. Below, the same random
# table, scaled by λ, once indexed by the state and once by (state, action).

# %%
T = torch.randn(mdp.num_states, mdp.vocab_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
lams = np.logspace(-3, 1, 3 if FAST else 9)
state_bias, action_bias = [], []
for lam in lams:
    r_s = report(with_baseline(lam * T[:, 0]), mdp, policy, cov=None)
    r_a = report(estimator("baseline", baseline=lambda ro, lam=lam: lam * T[ro.states, ro.tokens] * ro.mask),
                 mdp, policy, cov=None)
    state_bias.append(r_s.rel_bias)
    action_bias.append(r_a.rel_bias)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.loglog(lams, np.maximum(state_bias, 1e-17), "o-", label="b(y_<t): a function of the prefix (Lemma 2)")
ax.loglog(lams, action_bias, "s-", label="b(y_<t, y_t): reads the scored token")
ax.axhline(RTOL, color="k", ls=":", lw=0.8, label=f"'unbiased' threshold {RTOL:g}")
ax.set_xlabel("baseline size λ (the same random table, scaled)")
ax.set_ylabel("exact ‖E ĝ − ∇J‖ / ‖∇J‖")
ax.set_title("A baseline is free only if it cannot see the action")
ax.legend(fontsize=7)
plt.show()

# %%
assert max(state_bias) <= RTOL                                             # any prefix table: unbiased
slope = np.polyfit(np.log(lams), np.log(action_bias), 1)[0]
assert abs(slope - 1) < 1e-6 and min(action_bias) > 1e-4                   # peeking: bias exactly ∝ λ

# %% [markdown]
# ## 3.2 Theorem 2's baseline: the value of the prefix
#
# Theorem 2 (PAPER Eq. 28; proofs/04-theorem2.md) takes b = U(y_<t), the expected final reward of the prefix,
# so that each token is weighted by its own ΔU_t = U(y_≤t) − U(y_<t). GRPO, RLOO and ReMax use a
# **prompt-level** baseline, at best U(x) for every position. The paper calls the per-position one
# "near-optimal" but proves no variance bound (PAPER §6); here is the exact comparison (claim N1),
# one sampled response per update.

# %%
tables = {"none": torch.zeros(mdp.num_states, dtype=torch.float64), "U(x)": tab.U[roots], "U(y_<t)": tab.U}
var = {k: report(with_baseline(v), mdp, policy, cov="trace") for k, v in tables.items()}
for k, r in var.items():
    print(f"baseline {k:<8} {r.verdict:<9} tr Cov[ĝ] = {r.cov_trace:.5f}")

# %%
assert all(r.verdict == "unbiased" for r in var.values())
assert var["U(y_<t)"].cov_trace < var["U(x)"].cov_trace < var["none"].cov_trace      # here, N1 holds

# %% [markdown]
# ## 3.3 The variance-optimal baseline
#
# Since E[ĝ] does not depend on b, minimising tr Cov[ĝ] is minimising the second moment
# E‖Σ_t (RM − b(s_(t−1))) ∇ℓ_t‖², a **quadratic** in the table b. For a constant b_x per prompt the minimiser is
#
#     b*_x = E[RM ‖S‖² | x] / E[‖S‖² | x],      S = Σ_t ∇ℓ_t (the score of the whole response),
#
# the reward averaged with weights ‖S‖² — not U(x) = E[RM | x], unless RM and ‖S‖² are uncorrelated. For
# a per-state table the normal equations (Σ_n P_n B_nᵀB_n) b = Σ_n P_n B_nᵀ (RM_n S_n), with
# B_n[:, s] = Σ_t 1[s_(t−1) = s] ∇ℓ_t(y_n), give the best b(s); for the tabular softmax the scores of
# different states are orthogonal and b*(s) is the ‖∇ℓ_t‖²-weighted mean of RM through s. We solve
# both from the exact per-token scores (`tpg.scores.token_scores`) and let the engine confirm the variance.

# %%
enum, P = tab.enum, tab.prob                                                 # (N,) P(x, y)
sc = token_scores(policy, enum)                                              # (N, L, D) ∇ℓ_t(y_n)
S_resp = sc.sum(1)                                                           # (N, D)
w = (S_resp ** 2).sum(1)                                                     # (N,) ‖S‖²
x_of = enum.prompt_idx
b_const = torch.zeros(len(mdp.prompts), dtype=torch.float64)
for x in range(len(mdp.prompts)):
    m = x_of == x
    b_const[x] = (P[m] * enum.rm[m] * w[m]).sum() / (P[m] * w[m]).sum()
st = mdp.state_index(enum.prompt_idx, enum.tokens, enum.mask)               # (N, L) s_(t−1) of token t
B = torch.zeros(len(enum.rm), sc.shape[2], mdp.num_states, dtype=torch.float64)   # (N, D, S)
for t in range(mdp.horizon):
    B[torch.arange(len(enum.rm)), :, st[:, t]] += sc[:, t, :] * enum.mask[:, t:t + 1]
lhs = torch.einsum("n,nds,ndr->sr", P, B, B)                                 # (S, S)
rhs = torch.einsum("n,nds,nd->s", P, B, enum.rm[:, None] * S_resp)           # (S,)
b_state = torch.linalg.lstsq(lhs, rhs[:, None]).solution[:, 0]               # (S,); unreachable states: 0
second = lambda b: float(torch.einsum("n,nd->", P, (enum.rm[:, None] * S_resp - torch.einsum("nds,s->nd", B, b)) ** 2))  # noqa: E731
tables["b* per prompt"] = b_const[prompt_of_state]
tables["b*(s) per state"] = b_state
for k in ("b* per prompt", "b*(s) per state"):
    var[k] = report(with_baseline(tables[k]), mdp, policy, cov="trace")
predicted = second(b_state) - float(grad @ grad)
print(f"{'baseline':<16} {'tr Cov[ĝ]':>10}  (one response per update)")
for k, r in var.items():
    print(f"{k:<16} {r.cov_trace:10.5f}")
print(f"b*(s): normal equations predict {predicted:.5f}, the engine measures {var['b*(s) per state'].cov_trace:.5f}")
print("U(x) vs b*_x:", [f"{float(u):+.4f} vs {float(b):+.4f}" for u, b in zip(tab.J_prompt, b_const)])

# %% [markdown]
# Along a line of constant baselines on prompt 0 (prompt 1 keeps U(x)) tr Cov is a parabola; its
# minimum is at b*_0, and U(x) sits beside it, not at it:

# %%
b0 = float(b_const[0])
grid = np.linspace(b0 - 2.0, b0 + 2.0, 3 if FAST else 9)      # 3 points fix a parabola
line = []
for b in grid:
    tb = tab.U[roots].clone()
    tb[prompt_of_state == 0] = b
    line.append(report(with_baseline(tb), mdp, policy, cov="trace").cov_trace)
coef = np.polyfit(grid, line, 2)
fig, (a, c) = plt.subplots(1, 2, figsize=(10, 3.6))
a.plot(grid, line, "o", label="exact tr Cov[ĝ] (engine)")
fine = np.linspace(grid[0], grid[-1], 200)
a.plot(fine, np.polyval(coef, fine), "-", lw=1, color="0.4", label="the quadratic through them")
a.axvline(b0, color="C2", label=f"b*_0 = E[RM‖S‖²]/E[‖S‖²] = {b0:.3f}")
a.axvline(float(tab.J_prompt[0]), color="C1", ls="--", label=f"U(x_0) = {float(tab.J_prompt[0]):.3f}")
a.set_xlabel("constant baseline b on prompt 0")
a.set_ylabel("tr Cov[ĝ]")
a.set_title("One constant: the optimum is a weighted mean")
a.legend(fontsize=7)
names = list(var)
c.bar(range(len(names)), [var[k].cov_trace for k in names], color=["0.6", "C1", "C0", "C2", "C3"])
c.set_xticks(range(len(names)), names, rotation=20, fontsize=7.5)
c.set_ylabel("tr Cov[ĝ] (exact)")
c.set_title("Every baseline unbiased, variances differ")
plt.show()

# %%
assert all(r.verdict == "unbiased" for r in var.values())
assert abs(predicted - var["b*(s) per state"].cov_trace) <= 1e-9 * predicted        # the algebra is the engine's
assert abs(-coef[1] / (2 * coef[0]) - b0) < 1e-8                                     # the parabola's minimum is b*_0
assert var["b* per prompt"].cov_trace <= var["U(x)"].cov_trace                      # b* beats U(x) ...
assert var["b*(s) per state"].cov_trace <= min(r.cov_trace for r in var.values()) + 1e-12   # ... and b*(s) beats all
assert float((b_const - tab.J_prompt).abs().max()) > 1e-3                           # and b* ≠ U(x)

# %% [markdown]
# ## 3.4 Variance against compute
#
# A fair comparison charges each estimator for the tokens it samples: RLOO with G responses costs G·H
# tokens; TRePO's continuations cost more per response (PAPER §4). `tpg.figures`'s `variance_compute`
# experiment (the same code as `tpg figures variance_compute`, here at its `--fast` size in fast mode)
# plots exact tr Cov[ĝ] for RLOO (prompt baseline), the per-position baseline U(y_<t), GAE with an exact
# and a noisy critic, and Monte Carlo estimates (95 % intervals) for TRePO.

# %% tags=["thumbnail"]
vc = FIGURES["variance_compute"]
vdata = vc.compute(Context(fast=FAST, progress=False))
fig = vc.plot(vdata)
plt.show()
print(vc.caption(vdata))

# %%
pts = vdata["points"]
rl = {p["tokens"]: p["trace"] for p in pts if p["family"].startswith("RLOO")}
pp = {p["tokens"]: p["trace"] for p in pts if p["family"].startswith("per-position")}
common = sorted(set(rl) & set(pp))
assert common and all(pp[t] < rl[t] for t in common)      # at equal tokens the per-position baseline wins
assert all(p["rel_bias"] <= 1e-8 for p in pts if "noisy" not in p["family"])   # all unbiased but the noisy critic

# %% [markdown]
# ## Exercises
#
# **1. The baseline after the token.** Replace b = U(y_<t) by U(y_≤t), the value *after* the scored token.
# Predict E[ĝ] before computing it.
#
# *Solution.* Then A_t = RM − U(y_≤t), and by Theorem 1 term by term (notebook 1, exercise 1)
# E[RM ∇ℓ_t] = E[U(y_≤t) ∇ℓ_t] for each t: the expected update is exactly **zero** — biased, with c = 0.

# %%
after = report(estimator("baseline", baseline=lambda ro: tab.prefix_values(ro)[:, 1:] * ro.mask),  # U(y_≤t)
               mdp, policy, cov=None)
print(after.summary())
assert after.verdict == "biased" and float(after.mean.norm()) <= RTOL * float(grad.norm())

# %% [markdown]
# **2. More responses or a better baseline?** With the prompt baseline U(x), how many responses per update
# (G, variance ∝ 1/G since responses are independent) match one response with the per-position baseline?
#
# *Solution.* G = tr Cov[U(x)] / tr Cov[U(y_<t)], rounded up: the per-position value is worth that many
# sampled responses — if it were free. Learning it is the critic's job (notebook 4).

# %%
G_equiv = var["U(x)"].cov_trace / var["U(y_<t)"].cov_trace
print(f"one response with U(y_<t) ≈ {G_equiv:.2f} responses with U(x)")
assert 1 < G_equiv < 10
print("All checks of notebook 3 passed.")
