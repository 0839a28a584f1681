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
# # 5. TRePO: its readings, and the sampling-budget frontier
#
# TRePO (PAPER §4) estimates Theorem 2's weight U(y_≤t) − U(y_<t) by Monte Carlo: K fresh continuations from
# a prefix give v̂, and Â_t = v̂_t − v̂_(t−1). The paper says only that "a number of timesteps" get such
# advantages and the rest are "interpolated", so tpg implements every reading (`estimator("trepo",
# variant=...)`; proofs/06-trepo.md). This notebook asks which readings are unbiased — exactly: the engine
# replaces each continuation's return by its expectation U(prefix), which is exact for the mean because
# the estimators are linear in those returns (the engine *probes* that multilinearity) — and then what
# the unbiased ones cost: variance per sampled token, against spending the same tokens on more responses.
#
# **Prerequisites**: notebooks 1–3. About 15 minutes. `TPG_FAST=1` shrinks the sweeps and Monte Carlo sizes.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from tpg import TabularSoftmax, estimator, exact, random_mdp, report
from tpg.figures import FIGURES, Context
from tpg.figures.common import mc_cov_trace
from tpg.figures.core import STYLE
from tpg.verify import RTOL

plt.style.use(str(STYLE))
FAST = bool(os.environ.get("TPG_FAST"))
print(f"TPG_FAST={FAST}: 'unbiased' means rel. bias ≤ {RTOL:g}")

# %% [markdown]
# ## 5.1 The readings, exactly
#
# With anchor positions every k tokens (and the end T):
#
# - `all` (k = 1): Â_t at every position — unbiased for every K, because fresh continuations are
#   independent of y_t given the prefix (T15; proofs §6.3);
# - `chunk`: every token of a chunk gets v̂(end) − v̂(start) — unbiased: v̂(start) is a baseline and
#   E[v̂(end) | y_≤t] = U(y_≤t) by optional stopping (T16; §6.5);
# - `subset`: Bernoulli anchors with probability q, advantages reweighted by 1/q — unbiased (T17; §6.4);
# - `interp`, the literal reading: anchor advantages linearly interpolated in between — the in-between
#   tokens get a mix of a past advantage (a baseline) and a future one (mean zero given y_≤t), so their
#   share of ∇J is lost (F9; §6.6);
# - `value_interp`: the chunk advantage divided by the chunk length — ∇J/L for equal chunks, biased
#   otherwise (F9).
#
# `tpg.figures`'s `trepo_readings` experiment computes each reading's exact relative bias against the
# spacing k, for fixed-length responses and with EOS (the same code as `tpg figures trepo_readings`).

# %% tags=["thumbnail"]
tr = FIGURES["trepo_readings"]
tdata = tr.compute(Context(fast=FAST, progress=False))
fig = tr.plot(tdata)
plt.show()
print(tr.caption(tdata))

# %%
pts = tdata["points"]
assert all(p["rel_bias"] <= RTOL for p in pts if p["variant"] in ("chunk", "subset"))      # T16, T17
assert all(p["rel_bias"] <= RTOL for p in pts if p["variant"] == "interp" and p["k"] == 1)  # k = 1 is `all`
assert all(p["rel_bias"] > 1e-3 for p in pts if p["variant"] == "interp" and p["k"] >= 2)   # F9

# %% [markdown]
# ## 5.2 K continuations, and the self-inclusive baseline
#
# More continuations K make v̂ a better estimate of U; they never change the mean of `all`. Including the
# sampled response itself in the baseline's average (K continuations plus y) is the GRPO mistake again: the
# response enters its own baseline with weight 1/(K+1), and E[ĝ] = K/(K+1) ∇J exactly (F10; §6.8).

# %%
mdp = random_mdp(0, vocab_size=3, horizon=3, eos=True, n_prompts=2, reward="gaussian")
policy = TabularSoftmax(mdp, seed=0)
Ks = (1, 2, 4) if FAST else (1, 2, 3, 4, 6, 8)
alls = {K: report(estimator("trepo", variant="all", K=K), mdp, policy, cov=None) for K in Ks}
selfs = {K: report(estimator("trepo", variant="all", K=K, self_inclusive=True), mdp, policy, cov=None) for K in Ks}
print(f"{'K':>2} {'all: verdict':>13} {'self-inclusive: c':>18} {'K/(K+1)':>8}")
for K in Ks:
    print(f"{K:>2} {alls[K].verdict:>13} {selfs[K].scale:18.6f} {K / (K + 1):8.6f}")
print("engine notes:", alls[Ks[0]].notes[0])

# %%
assert all(r.verdict == "unbiased" for r in alls.values())
assert all(r.verdict == "scaled" and abs(r.scale - K / (K + 1)) < 1e-12 for K, r in selfs.items())

# %% [markdown]
# ## 5.3 The sampling-budget frontier
#
# Unbiased is not the end of it: TRePO's continuations cost tokens. With horizon H, one response costs H
# tokens; `all` with K continuations from each of its H prefixes adds K·Σ_t (H − t) = K·H(H+1)/2 tokens;
# chunks every 2 tokens only pay at the anchors. RLOO with G responses costs G·H. Below, every
# **unbiased** configuration as (tokens per update, tr Cov[ĝ]): exact for RLOO, Monte Carlo (95 %
# intervals) for TRePO, whose continuations only sampling can average over
# (`tpg.figures.common.mc_cov_trace`). The frontier is the lower envelope: for a given budget, the
# least variance any of them achieves.

# %%
H = 4
fm = random_mdp(1, vocab_size=2, horizon=H, eos=False, reward="gaussian")
fp = TabularSoftmax(fm, seed=1)
n_mc = 1500 if FAST else 20000
configs = [("RLOO", G, 0) for G in ((2, 3, 4) if FAST else (2, 3, 4, 6))]
configs += [("TRePO all", 1, K) for K in ((1, 2) if FAST else (1, 2, 4))]
configs += [("TRePO chunks of 2", 1, K) for K in ((1, 2) if FAST else (1, 2, 4))]
front = []
for fam, G, K in configs:
    if fam == "RLOO":
        r = report(estimator("rloo"), fm, fp, G=G, cov="trace")
        front.append((fam, G, K, G * H, r.cov_trace, 0.0, r.rel_bias))
        continue
    est = estimator("trepo", K=K) if fam == "TRePO all" else \
        estimator("trepo", variant="chunk", K=K, anchors={"kind": "every", "k": 2})
    tokens = H + K * (sum(H - t for t in range(H)) if fam == "TRePO all" else sum(H - t for t in range(0, H, 2)))
    trc, se = mc_cov_trace(est, fm, fp, 1, n_mc, seed=7 + K)
    front.append((fam, G, K, tokens, trc, se, report(est, fm, fp, cov=None).rel_bias))
for f in front:
    print(f"{f[0]:<18} G={f[1]} K={f[2]}: {f[3]:>3} tokens, tr Cov {f[4]:.3f} ± {1.96 * f[5]:.3f}, rel. bias {f[6]:.0e}")

# %%
fig, ax = plt.subplots(figsize=(6.4, 3.8))
for i, fam in enumerate(("RLOO", "TRePO all", "TRePO chunks of 2")):
    rows = sorted([f for f in front if f[0] == fam], key=lambda f: f[3])
    ax.errorbar([f[3] for f in rows], [f[4] for f in rows], yerr=[1.96 * f[5] for f in rows], marker="os^"[i],
                capsize=3, color=f"C{i}", label=fam + (" (exact)" if fam == "RLOO" else f" (MC, {n_mc} batches)"))
order = sorted(front, key=lambda f: f[3])
env, best = [], np.inf
for f in order:
    if f[4] < best:
        best = f[4]
        env.append(f)
ax.step([f[3] for f in env], [f[4] for f in env], where="post", color="k", lw=0.8, ls=":", label="frontier")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("sampled tokens per update (responses + continuations)")
ax.set_ylabel("tr Cov[ĝ]")
ax.set_title(f"Unbiased estimators at a token budget (H = {H}, tokens {{0, 1}})")
ax.legend(fontsize=7)
plt.show()

# %%
assert all(f[6] <= RTOL for f in front)                                   # every point is unbiased
rl = {f[3]: f[4] for f in front if f[0] == "RLOO"}
assert all(a > b for a, b in zip(list(rl.values()), list(rl.values())[1:]))   # more responses, less variance
assert env[0][0] in ("RLOO", "TRePO chunks of 2")                        # the cheapest end of the frontier

# %% [markdown]
# On this task, continuations buy **exact credit** (notebook 3's credit picture) but not lower variance per
# token: the frontier is RLOO's. That is a statement about this MDP and these K — run the sweep on yours.
#
# ## Exercises
#
# **1. Where the frontier bends.** Which configuration is on the frontier at the largest budget, and how
# much variance does it save over the cheapest point?
#
# *Solution.* Read it off `env` (the lower envelope, sorted by tokens).

# %%
print(f"cheapest: {env[0][0]} at {env[0][3]} tokens (tr Cov {env[0][4]:.3f}); "
      f"largest budget on the frontier: {env[-1][0]} at {env[-1][3]} tokens (tr Cov {env[-1][4]:.3f})")
assert env[-1][4] < env[0][4]

# %% [markdown]
# **2. The literal reading at k = H.** With one anchor at the end only, `interp` gives every token the
# interpolation between Â at position 0 (none: 0) and the last token's advantage. Predict the scale of its
# expected update on a fixed-length MDP.
#
# *Solution.* Only the last position keeps its share of ∇J: E[ĝ] = E[A_T ∇ℓ_T] — biased in direction,
# and *not* a scaled ∇J: the engine's residual after the best scale is far from 0.

# %%
r_end = report(estimator("trepo", variant="interp", K=1, anchors={"kind": "fixed", "positions": []}), fm, fp, cov=None)
print(r_end.summary())
assert r_end.verdict == "biased" and r_end.residual > 1e-3
print("All checks of notebook 5 passed.")
