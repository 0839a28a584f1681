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
# # 6. Bring your own estimator, and the library zoo
#
# `tpg.report` judges **any** callable `est(ro) -> loss` whose gradient with respect to `ro.logp` is −Σ c ∇log π,
# the way verl and TRL write their losses (README, "Bring your own estimator"). This notebook judges losses
# written by hand, then the settings in which correct library losses go wrong — micro-batches, a rollout
# engine that is not the trainer, where the KL term sits — with the wrappers of `tpg.zoo` (the code
# behind `tpg zoo`), and finally shows what the exact engine's **probes** say when a user's code is not
# batch-local, treats group members differently, or is not linear in continuation returns.
#
# **Prerequisites**: notebooks 1–2. About 20 minutes. `TPG_FAST=1` shrinks the zoo slice.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

from tpg import TabularSoftmax, TPGError, estimator, random_mdp, register_advantage, report
from tpg.figures.core import STYLE
from tpg.verify import RTOL, roundoff_floor
from tpg.zoo import Configured, kl_objective_gradient, run_zoo

plt.style.use(str(STYLE))
FAST = bool(os.environ.get("TPG_FAST"))
print(f"TPG_FAST={FAST}: 'unbiased' means rel. bias ≤ {RTOL:g}")

# the zoo's set-up (ZOO.md): one prompt, vocabulary {a, b, EOS}, H = 3, binary reward, G = 3
mdp = random_mdp(0, vocab_size=3, horizon=3, n_prompts=1, reward="binary")
policy = TabularSoftmax(mdp, seed=0)
delta = roundoff_floor(mdp, policy)
G = 3


def moved(pol, step: float, seed: int = 12345):
    """A copy of the tabular policy with logits moved by step · N(0, 1): θ_old, a rollout engine μ, or π_ref."""
    g = torch.Generator().manual_seed(seed)
    return TabularSoftmax(pol.mdp, pol.logits.detach() + step * torch.randn(pol.logits.shape, generator=g,
                                                                           dtype=torch.float64))


# %% [markdown]
# ## 6.1 Judging a loss you wrote
#
# A loss written the way a trainer writes it: leave-one-out advantages from group sums (`ro.group` numbers
# the G responses of one prompt draw), detached, times the log-probs, averaged over the batch's responses.
# The engine hands it every possible batch stacked in one `Rollouts` (`ro.batch` numbers them) and reads
# the coefficients c = −∂loss/∂logp by autograd. A second one, registered as an advantage, lets its baseline
# peek at the token it scores (the README's example): tpg returns its exact bias vector.

# %%
def my_rloo(ro):
    """−(1/G) Σ_i (R_i − mean_{j≠i} R_j) Σ_t log π(y_it), per batch; summed over the stacked batches."""
    tot = torch.zeros(ro.n_groups, dtype=torch.float64).index_add(0, ro.group, ro.rm)        # (groups,)
    cnt = torch.bincount(ro.group, minlength=ro.n_groups).to(torch.float64)                 # (groups,)
    adv = ro.rm - (tot[ro.group] - ro.rm) / (cnt[ro.group] - 1)                             # (B,)
    return -((adv / cnt[ro.group]).detach()[:, None] * ro.logp * ro.mask).sum()


@register_advantage("peeking_baseline", overwrite=True)
def peeking_baseline(ro):
    """A_t = RM − 0.5·[y_t is token 0]: the baseline looks at the action it scores."""
    return (ro.rm[:, None] - 0.5 * (ro.tokens == 0)) * ro.mask                               # (B, L)


mine = report(my_rloo, mdp, policy, G=G, cov=None, roundoff=delta)
peek = report(estimator("peeking_baseline"), mdp, policy, G=1, cov=None, roundoff=delta)
print(mine.summary())
print(peek.summary())
print("exact bias E[ĝ] − ∇J, first entries:", [f"{v:+.5f}" for v in peek.bias[:4].tolist()])
print("what the engine probed:", "; ".join(mine.notes))

# %%
assert mine.verdict == "unbiased"
assert peek.verdict == "biased" and peek.rel_bias > 0.1

# %% [markdown]
# ## 6.2 Three traps for correct losses
#
# **Micro-batches.** A batch split into k micro-batches (or gradient-accumulation steps, or data-parallel
# ranks), each normalised by its **own** token count and the k gradients averaged (TRL's `bnpo`/`grpo` with
# `loss / gradient_accumulation_steps`), is not the unsplit loss when the normaliser depends on lengths;
# normalising by the whole batch's count (`norm="global"`, verl's `batch_num_tokens`) is.
#
# **Off-policy rollouts.** When the rollout engine samples from μ ≠ π (vLLM vs the trainer), the batch is
# drawn from μ and the target is ∇J(π). Ignoring the mismatch is biased; verl's truncated importance
# weights and rejection rules reduce, not remove, the bias; only an uncapped sequence-level ratio is
# unbiased. These rows come from `tpg.zoo.run_zoo`, the code behind `tpg zoo`, with verl's option names.
#
# **KL placement.** The target with a KL penalty is ∇(J − β KL(π‖π_ref)) (`tpg.zoo.kl_objective_gradient`).
# k1 subtracted from the **reward** (verl `use_kl_in_reward`) estimates it exactly (proofs/05-estimators.md
# §5.11); the same k1 added to the **loss** does not, nor do the other KL estimators in either place.

# %%
traps = {}
for agg in ("token-mean", "seq-mean-token-sum"):
    for norm in ("global", "local"):
        traps[("micro-batches", f"{agg}, split 3, {norm}")] = report(
            Configured(estimator("rloo", agg=agg), split=3, norm=norm), mdp, policy, G=G, cov=None, roundoff=delta)
mu = moved(policy, 0.7)                      # a rollout engine that is not the trainer (used in exercise 2)
# the rollout-mismatch rows exactly as `tpg zoo` defines them (verl's rollout_is / rollout_rs options)
zoo_rows = [r for r in run_zoo(rewards=("binary",), G=G, only="rollout") if r.lib == "verl"]
ABBREV = (("rollout_is_threshold=", "IS bounds "), ("rollout_rs_threshold=", "RS bounds "), ("rollout_is=", "IS "),
          ("rollout_rs=", "RS "), ("bypass_mode=True", "bypass"), ("loss_type=reinforce", "REINFORCE loss"),
          ("1000000.0", "1e6"), (", ", "\n"))
for r in zoo_rows:
    label = r.setting
    for a, b in ABBREV:
        label = label.replace(a, b)
    traps[("rollout mismatch", label)] = r
ref = moved(policy, 1.0)
target = kl_objective_gradient(mdp, policy, ref, 0.1)
for kind in (("k1", "k2", "k3") if FAST else ("k1", "abs", "k2", "k3")):
    for where in ("reward", "loss"):
        traps[("KL placement", f"{kind} in {where}")] = report(
            Configured(estimator("rloo"), kl=(0.1, kind, where)), mdp, policy, G=G, cov=None, ref=ref, target=target,
            roundoff=delta)
for (group, label), r in traps.items():
    print(f"{group:<17} {label:<34} {r.verdict:<9} rel. bias {r.rel_bias:9.2e}")

# %% tags=["thumbnail"]
groups = ("micro-batches", "rollout mismatch", "KL placement")
colors = {"unbiased": "C2", "scaled": "C0", "biased": "C1"}
fig, axs = plt.subplots(1, 3, figsize=(11.5, 4.2), gridspec_kw={"width_ratios": [4, len(zoo_rows), 8 if not FAST else 6]})
for ax, gname in zip(axs, groups):
    items = [(label, r) for (g, label), r in traps.items() if g == gname]
    ax.bar(range(len(items)), [max(r.rel_bias, 1e-17) for _, r in items], color=[colors[r.verdict] for _, r in items])
    ax.set_yscale("log")
    ax.set_ylim(1e-17, 10)
    ax.axhline(RTOL, color="k", ls=":", lw=0.8)
    ax.set_xticks(range(len(items)), [label for label, _ in items], rotation=60, ha="right", fontsize=6.3)
    ax.set_title(gname)
axs[0].set_ylabel("exact rel. bias (0 drawn at 1e-17)")
handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
fig.legend(handles, list(colors), ncol=3, loc="upper right", fontsize=7.5)
fig.suptitle(f"RLOO G = {G} and its settings, judged exactly (binary RM, one prompt, H = 3)", fontsize=10)
plt.show()

# %%
T_ = {label: r for (_, label), r in traps.items()}
assert T_["seq-mean-token-sum, split 3, local"].verdict == "unbiased"       # a constant normaliser: no trap
assert T_["token-mean, split 3, local"].verdict == "biased"
assert abs(T_["token-mean, split 3, local"].rel_bias - T_["token-mean, split 3, global"].rel_bias) > 1e-3
mism = [r for (g, _), r in traps.items() if g == "rollout mismatch"]
assert any(r.verdict == "unbiased" for r in mism) and sum(r.verdict == "biased" for r in mism) >= 3
assert all("1000000" in r.setting for r in mism if r.verdict == "unbiased")      # only an uncapped ratio
assert T_["k1 in reward"].verdict == "unbiased"
assert all(r.verdict == "biased" for label, r in T_.items() if label.endswith(("in loss",)) or
           (label.endswith("in reward") and not label.startswith("k1")))

# %% [markdown]
# ## 6.3 What the engine's probes say
#
# The engine's shortcuts need properties of the estimator — stacking many batches needs **batch-locality**,
# enumerating a group as a multiset needs **exchangeability** of its members, replacing continuation returns
# by U(prefix) needs **multilinearity** in them. It never assumes them of user code: it probes, takes the
# safe route (one batch at a time; ordered tuples) or refuses, naming the property. Three user estimators:
#
# - **non-local**: the baseline is the mean over *all rows it is handed* — in a real batch that is the group
#   mean including the response itself, so the truth is mean-only GRPO, (1 − 1/G)∇J;
# - **asymmetric**: each member's baseline is the *next* member's reward (cyclically) — unbiased (the
#   partner is independent), but members are treated differently, so multisets do not apply;
# - **non-multilinear**: an advantage from the *maximum* of K continuation returns — its mean is not a
#   function of U(prefix), so no exact substitution exists.

# %%
def nonlocal_baseline(ro):
    adv = ro.rm - ro.rm.mean()                                          # reduces over every row: all batches
    return -(adv.detach()[:, None] * ro.logp * ro.mask).sum() / G


def next_member(ro):
    B = ro.batch_size
    first = torch.full((ro.n_groups,), B, dtype=torch.long).scatter_reduce(0, ro.group, torch.arange(B), "amin")
    nxt = torch.arange(B) + 1
    wrap = (nxt >= B) | (ro.group[nxt.clamp(max=B - 1)] != ro.group)
    nxt = torch.where(wrap, first[ro.group], nxt)                        # (B,) the next member, cyclically
    adv = ro.rm - ro.rm[nxt]
    return -(adv.detach()[:, None] * ro.logp * ro.mask).sum() / G


@register_advantage("max_continuation", needs={"continuations": 2}, overwrite=True)
def max_continuation(ro):
    cont = ro.extras["cont_rm"]                                          # (B, L+1, K) continuation returns
    best = cont.max(-1).values                                           # (B, L+1): not multilinear
    return (best[:, 1:] - best[:, :-1]) * ro.mask


r_nl = report(nonlocal_baseline, mdp, policy, G=G, cov=None, roundoff=delta)
r_as = report(next_member, mdp, policy, G=G, cov=None, roundoff=delta)
try:
    report(estimator("max_continuation"), mdp, policy, cov=None, roundoff=delta)
    refusal = None
except TPGError as e:
    refusal = f"{type(e).__name__}: {e}"
for label, r in (("non-local", r_nl), ("asymmetric", r_as)):
    print(f"{label}: {r.summary()}\n  notes: " + "\n         ".join(r.notes))
print("non-multilinear:", refusal)

# %%
assert r_nl.verdict == "scaled" and abs(r_nl.scale - (1 - 1 / G)) < 1e-12
assert any("local" in n for n in r_nl.notes)
assert r_as.verdict == "unbiased" and any("joint" in n for n in r_as.notes)
assert refusal is not None and "multilinear" in refusal

# %% [markdown]
# ## Exercises
#
# **1. Make the non-local estimator local.** Reduce over the group (`ro.group`) instead of all rows, excluding
# the response itself. What do you get, and what do the notes say now?
#
# *Solution.* It becomes `my_rloo` of 6.1: unbiased, evaluated with the stacked-batch shortcut.

# %%
def local_fix(ro):
    tot = torch.zeros(ro.n_groups, dtype=torch.float64).index_add(0, ro.group, ro.rm)
    cnt = torch.bincount(ro.group, minlength=ro.n_groups).to(torch.float64)
    adv = ro.rm - (tot[ro.group] - ro.rm) / (cnt[ro.group] - 1)
    return -(adv.detach()[:, None] * ro.logp * ro.mask).sum() / G


r_fix = report(local_fix, mdp, policy, G=G, cov=None, roundoff=delta)
print(r_fix.summary(), "\n  notes:", "; ".join(r_fix.notes))
assert r_fix.verdict == "unbiased" and float((r_fix.mean - mine.mean).norm()) <= RTOL * float(mine.mean.norm())

# %% [markdown]
# **2. Why is the uncapped sequence ratio unbiased, and the token ratio not?** Write the target as an
# expectation under μ.
#
# *Solution.* ∇J(π) = E_μ[(P_π(y)/P_μ(y)) · A Σ_t ∇ℓ_t], and P_π/P_μ = Π_t ρ_t is the **sequence** ratio:
# importance sampling with it is exact. A per-token weight ρ_t alone corrects only the last token's
# probability, and a cap C (or a mask) changes the weights wherever the ratio exceeds C — with C = 1e6
# nothing here is capped. The largest sequence ratio on this MDP says how large C must be:

# %%
from tpg.rollouts import enumerate_responses, response_log_prob  # noqa: E402

enum = enumerate_responses(mdp)
with torch.no_grad():
    ratio = (response_log_prob(policy, enum) - response_log_prob(mu, enum)).exp()
print(f"max over responses of P_π(y)/P_μ(y) = {float(ratio.max()):.2f}  (cap C = 2 truncates, C = 1e6 does not)")
assert 2.0 < float(ratio.max()) < 1e6
print("All checks of notebook 6 passed.")
