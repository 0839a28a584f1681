# ---
# jupyter:
#   jupytext:
#     formats: py:percent
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
# Runs as a notebook (`jupytext --to ipynb`) or a plain script in a few seconds on a CPU. Set
# `TPG_FAST=1` to use fewer group sizes (the test suite does this).

# %%
import os

from tpg import TabularSoftmax, estimator, random_mdp, report
from tpg.verify import RTOL

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
print("All checks of notebook 2 passed.")
