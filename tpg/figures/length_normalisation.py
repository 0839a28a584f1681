"""Length normalisation: the exact bias of each loss aggregation (PAPER §3.2 (3), claim F5).

Task: seeded random token MDP, tokens {a, b, EOS}, H = 4 (31 responses), Gaussian token rewards.
The policy is a tabular softmax (seeded logits) whose EOS logit is set so that π(EOS | s) = q at
every prefix state: q sweeps the spread of response lengths (sd of |y| under π, exact). The
advantage is RLOO's (an unbiased baseline), so every bias comes from the aggregation alone:
verl's five ``loss_agg_mode``s (TRL's names in brackets). Exact E[ĝ] from ``tpg.report``.
"""
from __future__ import annotations

import math

from tpg.figures.core import Figure, floor, fmt, register

AGGS = ("seq-mean-token-sum", "token-sum", "seq-mean-token-sum-norm", "token-mean", "seq-mean-token-mean")
TRL = {"token-mean": " (TRL bnpo / dapo)", "seq-mean-token-mean": " (TRL grpo)",
       "seq-mean-token-sum-norm": " (Dr. GRPO, TRL dr_grpo)", "seq-mean-token-sum": " (REINFORCE average)",
       "token-sum": ""}
SEED, H = 3, 4
G_FIXED, Q_FIXED = 4, 0.3


def build(q: float):
    import torch
    from tpg import TabularSoftmax, random_mdp
    mdp = random_mdp(SEED, vocab_size=3, horizon=H, eos=True, reward="gaussian")
    base = TabularSoftmax(mdp, seed=SEED).logits.detach().clone()           # (S, V)
    eos = mdp.eos
    others = torch.cat([base[:, :eos], base[:, eos + 1:]], 1)
    base[:, eos] = math.log(q / (1 - q)) + torch.logsumexp(others, 1)       # π(EOS | s) = q exactly
    return mdp, TabularSoftmax(mdp, base)


def length_stats(mdp, pol) -> tuple[float, float]:
    from tpg import exact
    tab = exact.tables(mdp, pol)
    L = tab.enum.lengths.double()
    m = float((tab.prob * L).sum())
    return m, math.sqrt(max(0.0, float((tab.prob * L**2).sum()) - m * m))


def _point(task):
    q, G, agg = task
    from tpg import estimator, report
    mdp, pol = build(q)
    r = report(estimator("rloo", agg=agg), mdp, pol, G=G, cov=None)
    mean_len, sd_len = length_stats(mdp, pol)
    return dict(q=q, G=G, agg=agg, rel_bias=r.rel_bias, residual=r.residual, scale=r.scale, cosine=r.cosine,
                mean_len=mean_len, sd_len=sd_len)


def compute(ctx) -> dict:
    # q ≤ 0.3: the length sd grows monotonically with q (it peaks near q = 0.3 for H = 4, then falls
    # again as responses get short), so the x axis of the figure reads as "more spread".
    qs = (0.02, 0.1, 0.3) if ctx.fast else (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
    Gs = (1, 2, 4) if ctx.fast else (1, 2, 3, 4, 5)
    tasks = [(q, G_FIXED, a) for q in qs for a in AGGS] + [(Q_FIXED, G, a) for G in Gs for a in AGGS]
    pts = ctx.map(_point, tasks, "length normalisation")
    return dict(qs=list(qs), Gs=list(Gs), G_fixed=G_FIXED, q_fixed=Q_FIXED, H=H, seed=SEED, points=pts)


def _get(data, q, G, agg):
    return next(p for p in data["points"] if p["q"] == q and p["G"] == G and p["agg"] == agg)


def plot(data):
    import matplotlib.pyplot as plt
    qs, Gs, Gf, qf = data["qs"], data["Gs"], data["G_fixed"], data["q_fixed"]
    fig, axs = plt.subplots(1, 3, figsize=(11.5, 3.7))
    order = sorted(qs)
    for i, a in enumerate(AGGS):
        st = dict(marker="o", color=f"C{i}", label=a + TRL[a])
        xs = [_get(data, q, Gf, a)["sd_len"] for q in order]
        axs[0].plot(xs, [floor(_get(data, q, Gf, a)["rel_bias"]) for q in order], **st)
        axs[1].plot(xs, [floor(_get(data, q, Gf, a)["residual"]) for q in order], **st)
        axs[2].plot(Gs, [floor(_get(data, qf, G, a)["residual"]) for G in Gs], **st)
    for ax in axs:
        ax.set_yscale("log")
    axs[0].set_xlabel("sd of response length |y| under π (tokens)")
    axs[1].set_xlabel("sd of response length |y| under π (tokens)")
    axs[0].set_ylabel("relative bias ‖E ĝ − ∇J‖ / ‖∇J‖   (0 at 1e-17)")
    axs[1].set_ylabel("residual after best scale ‖E ĝ − κ∇J‖ / ‖∇J‖")
    axs[2].set_ylabel("residual after best scale ‖E ĝ − κ∇J‖ / ‖∇J‖")
    axs[2].set_xlabel("group size G (responses per prompt)")
    axs[2].set_xticks(Gs)
    axs[0].set_title(f"(a) relative bias, RLOO advantage, G = {Gf}")
    axs[1].set_title(f"(b) direction error (no learning rate fixes it), G = {Gf}")
    axs[2].set_title(f"(c) direction error vs G, π(EOS|s) = {qf:g}")
    axs[0].legend(fontsize=6.5)
    fig.suptitle(f"Loss aggregation under variable length (exact; random MDP seed {data['seed']}, V = 3 with EOS, "
                 f"H = {data['H']}; length spread set by π(EOS|s) = q)", fontsize=10)
    return fig


def caption(data) -> str:
    qs, Gf, qf, Gs = data["qs"], data["G_fixed"], data["q_fixed"], data["Gs"]
    sd = sorted(_get(data, q, Gf, AGGS[0])["sd_len"] for q in qs)
    worst = lambda a, key: max(_get(data, q, Gf, a)[key] for q in qs)
    sc = lambda a: _get(data, qf, Gf, a)["scale"]
    return (f"RLOO advantages aggregated five ways, exact E[ĝ] at G = {Gf} while π(EOS|s) = q sweeps the "
            f"length sd from {fmt(sd[0])} to {fmt(sd[-1])} tokens (q = {qs[0]:g}…{qs[-1]:g}). "
            f"seq-mean-token-sum is unbiased (relative bias ≤ {fmt(worst('seq-mean-token-sum', 'rel_bias'))}); "
            f"token-sum and seq-mean-token-sum-norm are exactly scaled (κ = {fmt(sc('token-sum'))} = G and "
            f"{fmt(sc('seq-mean-token-sum-norm'))} = 1/H; residual ≤ "
            f"{fmt(max(worst('token-sum', 'residual'), worst('seq-mean-token-sum-norm', 'residual')))}). "
            f"The length-normalised modes are biased in direction: residual after the best scale up to "
            f"{fmt(worst('token-mean', 'residual'))} for token-mean and {fmt(worst('seq-mean-token-mean', 'residual'))} "
            f"for seq-mean-token-mean (relative bias up to {fmt(worst('seq-mean-token-mean', 'rel_bias'))}). "
            f"At q = {qf:g}, token-mean's residual goes from {fmt(_get(data, qf, Gs[0], 'token-mean')['residual'])} "
            f"(G = {Gs[0]}) to {fmt(_get(data, qf, Gs[-1], 'token-mean')['residual'])} (G = {Gs[-1]}), "
            f"seq-mean-token-mean's stays {fmt(_get(data, qf, Gs[-1], 'seq-mean-token-mean')['residual'])} "
            f"(the 1/|y| weight does not average out with G).")


register(Figure("length_normalisation", "Length normalisation: bias of each loss aggregation", compute, plot,
                caption, "≈ 30 s"))
