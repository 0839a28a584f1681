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
# # 2. What GRPO (and friends) really estimate
#
# Group-based estimators draw G responses per prompt and use the group as a baseline. Which of
# them estimate ∇J, which a **scaled** ∇J (same direction: only the learning rate changes), and
# which something **biased** (a different direction)? `tpg.report` answers exactly: it enumerates
# every possible group, computes E[ĝ] in float64 and compares it with ∇J (relative bias, best
# scale c = ⟨E ĝ, ∇J⟩/‖∇J‖², residual after scaling, cosine, verdict). Every section ends with an
# `assert` tying the prose to those exact numbers.
#
# **Prerequisites**: notebook 1 (Theorem 1, U and ∇J by enumeration). About 20 minutes. The notebook
# runs in seconds on a CPU; `TPG_FAST=1` (the test suite sets it) uses fewer group sizes. Groups up to
# G = 64 are exact too: on binary rewards `exact.moments` sees the other G − 1 members of a group
# only through their rewards (the *keyed* route), so a group of 64 costs a few hundred multisets.

# %%
import math
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

from tpg import TabularSoftmax, estimator, exact, random_mdp, report, sample
from tpg.figures.core import STYLE
from tpg.verify import RTOL

plt.style.use(str(STYLE))

FAST = bool(os.environ.get("TPG_FAST"))
GS = (2, 3) if FAST else (2, 3, 4, 5)        # group sizes (enumerated as multisets of responses)
print(f"TPG_FAST={FAST}: group sizes G = {GS}; 'unbiased' means rel. bias ≤ {RTOL:g}")


def make(seed: int = 0, **kw):
    """A seeded random token MDP (default: vocabulary {0, 1, EOS}, H = 3, 2 prompts, Gaussian
    token rewards) and a tabular softmax policy on it."""
    opts = dict(vocab_size=3, horizon=3, eos=True, n_prompts=2) | kw
    mdp = random_mdp(seed, **opts)
    return mdp, TabularSoftmax(mdp, seed=seed)


def row(label, r):
    print(f"{label:<34} {r.verdict:<9} {r.rel_bias:10.3e} {r.scale:10.6f} {r.residual:10.3e} {r.cosine:14.10f}")


HEADER = f"{'':<34} {'verdict':<9} {'rel. bias':>10} {'scale c':>10} {'residual':>10} {'cosine':>14}"
mdp, policy = make()
print(mdp)

# %% [markdown]
# ## 2.1 RLOO is unbiased
#
# RLOO's advantage is A_i = R_i − mean_{j≠i} R_j (the leave-one-out mean). The baseline of
# response i is built from the **other** G − 1 responses only, which are independent of y_i, so
# E[b_i Σ_t ∇ℓ_t(y_i)] = E[b_i] · E[Σ_t ∇ℓ_t] = 0 and E[ĝ] = ∇J for every G ≥ 2 and every
# reward (PAPER §3.2, §7 item T10; proofs/05-estimators.md §5.1).

# %%
print(HEADER)
rloo = {G: report(estimator("rloo"), mdp, policy, G=G, cov=None) for G in GS}
for G, r in rloo.items():
    row(f"RLOO, G = {G}", r)

# %%
assert all(r.verdict == "unbiased" and r.rel_bias <= RTOL for r in rloo.values())

# %% [markdown]
# ## 2.2 Mean-only GRPO is ∇J scaled by exactly 1 − 1/G
#
# GRPO without the std division uses A_i = R_i − mean_j R_j, the mean **including** R_i. Since
# mean_j R_j = R_i/G + (1 − 1/G) · mean_{j≠i} R_j,
#
#     R_i − mean_j R_j = (1 − 1/G) · (R_i − mean_{j≠i} R_j),
#
# i.e. mean-only GRPO is RLOO times the constant 1 − 1/G, so E[ĝ] = (1 − 1/G) ∇J exactly: the
# right direction, a smaller step (PAPER §7 items T12/F3; proofs/05-estimators.md §5.3).

# %%
print(f"{'G':>3} {'verdict':<8} {'scale c':>10} {'1 − 1/G':>10} {'|c − (1 − 1/G)|':>17}")
grpo_mean = {G: report(estimator("grpo", std=False), mdp, policy, G=G, cov=None) for G in GS}
for G, r in grpo_mean.items():
    print(f"{G:>3} {r.verdict:<8} {r.scale:10.6f} {1 - 1 / G:10.6f} {abs(r.scale - (1 - 1 / G)):17.1e}")

# %%
for G, r in grpo_mean.items():
    assert r.verdict == "scaled" and abs(r.scale - (1 - 1 / G)) < 1e-12

# %% [markdown]
# ## 2.3 Std-normalised GRPO is not even parallel to ∇J (continuous rewards)
#
# verl's GRPO divides by the group's standard deviation: A_i = (R_i − mean)/(std + ε). The std
# depends on R_i and on the other responses, so it does not factor out of the expectation. For a
# **continuous** response reward the result is a different direction, not a smaller learning
# rate: the cosine with ∇J is < 1 and no scale c makes c∇J match (PAPER §7 item F4;
# proofs/05-estimators.md §5.5). Binary rewards are a special case: with one prompt the
# normalised advantage of a success depends only on how many of the others succeeded, and the
# update stays exactly parallel (T13; for G ≤ 3 even across prompts) — the table shows both.

# %%
zra, zpol = make(reward="zra", n_prompts=1)            # response-level N(0, 1) reward: continuous RM
binary, bpol = make(reward="binary", n_prompts=1)      # RM ∈ {0, 1}
print(HEADER)
std_cont = {G: report(estimator("grpo"), zra, zpol, G=G, cov=None) for G in GS}
std_bin = {G: report(estimator("grpo"), binary, bpol, G=G, cov=None) for G in (2, 3)}
for G, r in std_cont.items():
    row(f"std-GRPO, continuous RM, G = {G}", r)
for G, r in std_bin.items():
    row(f"std-GRPO, binary RM, G = {G}", r)

# %%
assert all(r.verdict == "biased" and r.cosine < 1 - 1e-6 and r.residual > 1e-4 for r in std_cont.values())
assert all(r.verdict == "scaled" for r in std_bin.values())

# %% [markdown]
# ## 2.4 Length normalisation (`agg="seq-mean-token-mean"`) is biased
#
# How the per-token losses are averaged matters too. tpg's default `seq-mean-token-sum` averages
# Σ_t A ∇ℓ_t over responses: the plain REINFORCE average. verl's `seq-mean-token-mean` first
# divides each response's token sum by its own length |y| (+1e-8): that is the gradient of
# E[(R − b)/|y|], which favours short good answers and long bad ones — biased whenever lengths
# vary (PAPER §7 item F5; proofs/05-estimators.md §5.4). Dividing by a **constant** C instead
# (`seq-mean-token-sum-norm`, Dr. GRPO; here C = H, the padded length) only rescales by 1/C.
# With a fixed length (no EOS) every |y| = H and length normalisation is the constant 1/(H + 1e-8).
# We apply the modes to RLOO, which is unbiased with the default, so the modes alone make the
# difference.

# %%
G = 2
H = mdp.horizon                                          # padded length: the constant C of ...-sum-norm
fixed, fpol = make(eos=False, vocab_size=2, horizon=H)   # no EOS: every response has length H
print(HEADER)
agg = {mode: report(estimator("rloo", agg=mode), mdp, policy, G=G, cov=None)
       for mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean", "token-mean")}
for mode, r in agg.items():
    row(f"RLOO G={G}, {mode}", r)
fixed_len = report(estimator("rloo", agg="seq-mean-token-mean"), fixed, fpol, G=G, cov=None)
row(f"  same, no EOS (|y| = H = {H})", fixed_len)

# %%
assert agg["seq-mean-token-sum"].verdict == "unbiased"
assert agg["seq-mean-token-sum-norm"].verdict == "scaled" and abs(agg["seq-mean-token-sum-norm"].scale - 1 / H) < 1e-12
assert agg["seq-mean-token-mean"].verdict == "biased" and agg["seq-mean-token-mean"].cosine < 1 - 1e-6
assert fixed_len.verdict == "scaled" and abs(fixed_len.scale - 1 / (H + 1e-8)) < 1e-12

# %% [markdown]
# ## 2.5 TRePO: which readings are unbiased
#
# TRePO (PAPER §4) estimates the Theorem 2 advantage U(y_≤t) − U(y_<t) (notebook 1, section 1.3)
# by Monte Carlo: K fresh continuations from each prefix give v̂_t, and Â_t = v̂_t − v̂_{t−1}. The
# paper leaves K, the anchor positions and the interpolation unspecified, so tpg implements every
# reading (PAPER §4 "concrete reading"; proofs/06-trepo.md):
#
# - `all`: Â_t at every position. Fresh continuations are independent of y_t given the prefix,
#   so E[v̂ | prefix] = U and the estimator is unbiased for every K (T15; proofs §6.2).
# - `chunk`: anchor positions (and the end T) split the response into chunks; every token of a
#   chunk gets v̂_end − v̂_start. v̂_start is known before the token (a baseline, Lemma 2) and,
#   by optional stopping, E[v̂_end | y_≤t] = U(y_≤t): unbiased for any fixed anchor set (T16;
#   proofs §6.4).
# - `interp`, the literal reading: advantages Â at the anchors only, **linearly interpolated** in
#   between. A middle token t gets a mix of Â at an earlier anchor (fixed given y_<t, so a
#   baseline) and at a later one (conditional mean 0 given y_≤t): in expectation the in-between
#   tokens contribute nothing and their share of ∇J is lost — biased (F9; proofs §6.5).
# - `self_inclusive`: the baseline at each prefix averages the K continuations **and** the
#   sampled response itself. The sampled RM then enters its own baseline with weight 1/(K+1):
#   exactly as in section 2.2, E[ĝ] = K/(K+1) · ∇J (F10; proofs §6.7).

# %%
Ks = (1, 2) if FAST else (1, 2, 3)
anchors = {"kind": "fixed", "positions": [1]}            # anchor after token 1 (and at the end T)
tm, tpol = make(eos=False, vocab_size=2, horizon=4)      # fixed length H = 4: tokens 2..3 are interpolated
print(HEADER)
trepo = {}
for K in Ks:
    trepo[f"all, K = {K}"] = report(estimator("trepo", variant="all", K=K), mdp, policy, cov=None)
trepo["chunk, K = 2, anchors {1, T}"] = report(
    estimator("trepo", variant="chunk", K=2, anchors=anchors), tm, tpol, cov=None)
trepo["interp, K = 1, anchors {1, T}"] = report(
    estimator("trepo", variant="interp", K=1, anchors=anchors), tm, tpol, cov=None)
self_inc = {K: report(estimator("trepo", variant="all", K=K, self_inclusive=True), mdp, policy, cov=None)
            for K in Ks}
for label, r in trepo.items():
    row(label, r)
for K, r in self_inc.items():
    row(f"self-inclusive, K = {K}", r)

# %%
assert all(trepo[f"all, K = {K}"].verdict == "unbiased" for K in Ks)
assert trepo["chunk, K = 2, anchors {1, T}"].verdict == "unbiased"
assert trepo["interp, K = 1, anchors {1, T}"].verdict == "biased" and trepo["interp, K = 1, anchors {1, T}"].rel_bias > 1e-3
for K, r in self_inc.items():
    assert r.verdict == "scaled" and abs(r.scale - K / (K + 1)) < 1e-12

# %% [markdown]
# ## 2.6 Std-GRPO at practitioners' group sizes: G up to 64
#
# For one prompt and a binary reward, proofs/05-estimators.md §5.6–5.8 give std-GRPO's expected update
# in closed form: E[ĝ] = κ ∇J with κ = h(1) − h(0), h(r) = E_{R_−i}[(r − R̄)/(σ + ε)] over the other
# G − 1 rewards, a function of the success rate p = J, of G and of ε only. The formula needs no estimator
# code: the number k of successes among the others is Binomial(G − 1, p).
# So it is a learning rate — but one that **changes with p and G**: κ(G = 2) = 1/√2 whatever p is,
# and κ grows with G (here it more than triples from G = 2 to G = 64). With **two** prompts of different success rates
# each prompt gets its own κ_x, and the stacked update is no longer parallel to ∇J from G = 4 on
# (for G ≤ 3, κ does not depend on p: proofs/README.md, "Remarks"). Groups of 64 are enumerated
# exactly through the keyed route (the others seen through their reward; `report(...).notes` says so).

# %%
def grpo_kappa(p: float, G: int, eps: float = 1e-6) -> float:
    """κ = h(1) − h(0) for std-GRPO (Bessel std, + ε) on a binary reward with success rate p."""
    def h(r):
        tot = 0.0
        for k in range(G):                                               # successes among the other G − 1
            n1 = r + k
            mean = n1 / G
            sd = ((n1 * (1 - mean) ** 2 + (G - n1) * mean ** 2) / (G - 1)) ** 0.5
            tot += math.comb(G - 1, k) * p ** k * (1 - p) ** (G - 1 - k) * (r - mean) / (sd + eps)
        return tot
    return h(1) - h(0)


GS64 = (2, 4, 16, 64) if FAST else (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
one, onep = make(reward="binary", n_prompts=1)           # 15 responses, RM ∈ {0, 1}
two, twop = make(reward="binary", n_prompts=2)           # two prompts, different success rates
p1 = exact.tables(one, onep).J
p2 = exact.tables(two, twop).J_prompt.tolist()
big = {}
for G in GS64:
    big[("one", G)] = report(estimator("grpo"), one, onep, G=G, cov=None)
    big[("two", G)] = report(estimator("grpo"), two, twop, G=G, cov=None)
kappa = {G: grpo_kappa(p1, G, 1e-6) for G in GS64}
print(f"one prompt p = {p1:.4f}; two prompts p = {p2[0]:.4f}, {p2[1]:.4f}")
print(f"{'G':>3} {'κ engine':>10} {'κ formula':>10} {'1 − cos (1 prompt)':>19} {'1 − cos (2 prompts)':>20}  route")
for G in GS64:
    a, b = big[("one", G)], big[("two", G)]
    print(f"{G:>3} {a.scale:10.6f} {kappa[G]:10.6f} {1 - a.cosine:19.1e} {1 - b.cosine:20.2e}  {a.notes[-1]}")

# %% tags=["thumbnail"]
fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.5))
a.plot(GS64, [big[("one", G)].scale for G in GS64], "o", label="exact E[ĝ]: best scale κ")
a.plot(GS64, [kappa[G] for G in GS64], "-", color="0.4", lw=1, label="closed form h(1) − h(0) (§5.8)")
a.plot(GS64, [1 - 1 / G for G in GS64], "--", label="mean-only GRPO: 1 − 1/G")
a.axhline(1, color="k", lw=0.8, ls=":", label="RLOO: 1")
a.set_xscale("log", base=2)
a.set_xticks(GS64, [str(G) for G in GS64])
a.set_xlabel("group size G")
a.set_ylabel("κ in E[ĝ] = κ ∇J")
a.set_title(f"one prompt, binary RM (p = {p1:.2f}): a G-dependent step")
a.legend(fontsize=7)
b.semilogy(GS64, [max(1 - big[("two", G)].cosine, 1e-17) for G in GS64], "s-", color="C3",
           label=f"two prompts (p = {p2[0]:.2f}, {p2[1]:.2f})")
b.semilogy(GS64, [max(abs(1 - big[("one", G)].cosine), 1e-17) for G in GS64], "o-", label="one prompt")
b.set_xscale("log", base=2)
b.set_xticks(GS64, [str(G) for G in GS64])
b.set_xlabel("group size G")
b.set_ylabel("1 − cos(E[ĝ], ∇J)   (0 drawn at 1e-17)")
b.set_title("std-GRPO, binary RM: direction error")
b.legend(fontsize=7)
plt.show()

# %%
for G in GS64:
    a, b = big[("one", G)], big[("two", G)]
    assert a.verdict == "scaled" and abs(a.scale - kappa[G]) < 1e-9                   # T13 at every G
    assert (b.verdict == "scaled") if G <= 3 else (b.verdict == "biased" and 1 - b.cosine > 1e-6)   # F4
assert abs(big[("one", 2)].scale - 2 ** -0.5) < 1e-5                                 # κ(2) = 1/√2 (ε = 1e-6)
assert "keyed" in big[("one", 64)].notes[-1]                                         # G = 64 by the keyed route
assert big[("one", 64)].scale > 3 * big[("one", 2)].scale                            # κ triples from G = 2 to 64

# %% [markdown]
# ## 2.7 ReMax: a valid baseline that does not estimate U(x)
#
# ReMax uses A = RM(y) − RM(ŷ) with ŷ the **greedy** response of the current policy (ties to the lowest
# token id). ŷ is a deterministic function of θ and the prompt, so RM(ŷ) is a prompt-level constant:
# Lemma 2 makes ReMax unbiased (T11; proofs/05-estimators.md §5.3). The paper files it under "baseline
# ≈ U(x)", but RM(ŷ) is **not** an estimate of U(x) = E[RM | x] (F11): greedy decoding picks the most
# likely token at each step, which need not be a typical response at all.

# %%
tab0 = exact.tables(mdp, policy)
remax = report(estimator("remax"), mdp, policy, G=1, cov=None)
from tpg.rollouts import greedy                                          # noqa: E402  (the decoder ReMax uses)
gr = greedy(mdp, policy, torch.arange(len(mdp.prompts)))
sd = float(((tab0.enum.rm - tab0.U[tab0.enum.prompt_idx * mdp.states_per_prompt]) ** 2 * tab0.prob).sum() ** 0.5)
print(HEADER)
row("ReMax, G = 1", remax)
for x in range(len(mdp.prompts)):
    y = gr.tokens[x, : int(gr.lengths[x])].tolist()
    print(f"prompt {x}: greedy ŷ = {y}, RM(ŷ) = {float(gr.rm[x]):+.4f}, U(x) = {float(tab0.J_prompt[x]):+.4f}")
gap_remax = float((gr.rm - tab0.J_prompt).abs().max()) / sd
print(f"max |RM(ŷ) − U(x)| = {gap_remax:.3f} standard deviations of RM")

# %%
assert remax.verdict == "unbiased"
assert gap_remax > 0.1                                                   # RM(greedy) is not U(x)

# %% [markdown]
# ## Exercises
#
# **1. RLOO is rescaled mean-only GRPO, sample by sample.** Section 2.2 derived
# R_i − mean_j R_j = (1 − 1/G)(R_i − mean_{j≠i} R_j). Check it on one sampled batch of G = 5 responses
# per prompt, advantage by advantage (the estimators return `.advantages`, shape (B, L)).
#
# *Solution.* It is an identity of numbers, so it holds on every batch, not only in expectation.

# %%
ro = sample(mdp, policy, 5, torch.Generator().manual_seed(0), n_prompts=3).score(policy)
a_grpo = estimator("grpo", std=False)(ro).advantages                    # (B, L)
a_rloo = estimator("rloo")(ro).advantages
ex1 = float((a_grpo - (1 - 1 / 5) * a_rloo).abs().max())
print(f"max |A_GRPO − (1 − 1/G) A_RLOO| on a sampled batch: {ex1:.1e}")
assert ex1 < 1e-12

# %% [markdown]
# **2. κ(G = 2) does not depend on the success rate.** With G = 2 and a binary reward, a group is either
# mixed (one success, one failure: Bessel std = 1/√2, advantages ±(1/2)/(1/√2 + ε)) or uniform (both
# advantages 0). Predict κ for G = 2 and check it on the one-prompt and the two-prompt MDP of 2.6.
#
# *Solution.* In a mixed group each member's advantage is ±1/√2 (up to ε), i.e. 1/√2 times RLOO's ±1,
# and uniform groups give 0 in both: κ = 1/√2 ≈ 0.7071 on every prompt, so even two prompts stay parallel.

# %%
k2 = [big[("one", 2)].scale, big[("two", 2)].scale]
print("κ(G = 2):", [f"{k:.6f}" for k in k2], "  1/√2 =", f"{2 ** -0.5:.6f}")
assert all(abs(k - 2 ** -0.5) < 1e-5 for k in k2) and big[("two", 2)].verdict == "scaled"

# %% [markdown]
# **3. Token-sum aggregation.** verl's `token-sum` adds every token's loss of the batch without any
# normalisation. Predict the scale c of RLOO under `agg="token-sum"` for G = 3 on this section's MDP,
# then check it.
#
# *Solution.* The default `seq-mean-token-sum` divides the batch's token sum by the number of responses
# G; `token-sum` does not, so E[ĝ] = G ∇J: c = 3 (proofs/05-estimators.md §5.5).

# %%
ts = report(estimator("rloo", agg="token-sum"), mdp, policy, G=3, cov=None)
row("RLOO G=3, token-sum", ts)
assert ts.verdict == "scaled" and abs(ts.scale - 3) < 1e-12
print("All checks of notebook 2 passed.")
