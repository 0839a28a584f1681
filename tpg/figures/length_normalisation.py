"""Length normalisation: the exact bias of each loss aggregation (PAPER §3.2 (3), claim F5).

Task: seeded random token MDP, tokens {a, b, EOS}, H = 4 (31 responses), Gaussian token rewards.
The policy is a tabular softmax (seeded logits) whose EOS logit is set so that π(EOS | s) = q at
every prefix state: q sweeps the spread of response lengths (sd of |y| under π, exact). The
advantage is RLOO's (an unbiased baseline), so every bias comes from the aggregation alone:
verl's five ``loss_agg_mode``s. Beside them TRL's ``GRPOTrainer`` loss types grpo / bnpo / dr_grpo / dapo
(``tpg.estimators.trl.trl_estimator(loss_type, scale_rewards="none")``: TRL's mean-only advantage
R − mean_g R, so their scale carries the self-inclusive mean's factor 1 − 1/G; G ≥ 2). Exact E[ĝ]
from ``tpg.report``.
"""
from __future__ import annotations

import math

from tpg.figures.core import Figure, floor, fmt, register

AGGS = ("seq-mean-token-sum", "token-sum", "seq-mean-token-sum-norm", "token-mean", "seq-mean-token-mean")
TRL_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SERIES = tuple(f"verl {a}" for a in AGGS) + tuple(f"TRL {t}" for t in TRL_TYPES)
NOTE = {"verl seq-mean-token-sum": " (unbiased)", "verl seq-mean-token-sum-norm": " (Dr. GRPO)",
        "TRL grpo": " (seq-mean-token-mean)", "TRL bnpo": " (token-mean, local)",
        "TRL dr_grpo": " (÷ B·max_len)", "TRL dapo": " (token-mean, global)", "verl token-sum": "",
        "verl token-mean": "", "verl seq-mean-token-mean": ""}
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


def make(series: str):
    from tpg import estimator
    from tpg.estimators.trl import trl_estimator
    lib, name = series.split(" ", 1)
    return estimator("rloo", agg=name) if lib == "verl" else trl_estimator(name, scale_rewards="none")


def _point(task):
    q, G, agg = task
    from tpg import report
    mdp, pol = build(q)
    r = report(make(agg), mdp, pol, G=G, cov=None)
    mean_len, sd_len = length_stats(mdp, pol)
    return dict(q=q, G=G, agg=agg, rel_bias=r.rel_bias, residual=r.residual, scale=r.scale, cosine=r.cosine,
                mean_len=mean_len, sd_len=sd_len)


def compute(ctx) -> dict:
    # q ≤ 0.3: the length sd grows monotonically with q (it peaks near q = 0.3 for H = 4, then falls
    # again as responses get short), so the x axis of the figure reads as "more spread".
    qs = (0.02, 0.1, 0.3) if ctx.fast else (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
    Gs = (1, 2, 4) if ctx.fast else (1, 2, 3, 4, 5)
    tasks = [(q, G_FIXED, a) for q in qs for a in SERIES] + [(Q_FIXED, G, a) for G in Gs for a in SERIES
                                                            if G >= 2 or a.startswith("verl")]
    pts = ctx.map(_point, tasks, "length normalisation")
    return dict(qs=list(qs), Gs=list(Gs), G_fixed=G_FIXED, q_fixed=Q_FIXED, H=H, seed=SEED, points=pts,
                series=list(SERIES))


def _get(data, q, G, agg):
    return next(p for p in data["points"] if p["q"] == q and p["G"] == G and p["agg"] == agg)


def plot(data):
    import matplotlib.pyplot as plt
    qs, Gs, Gf, qf = data["qs"], data["Gs"], data["G_fixed"], data["q_fixed"]
    fig, axs = plt.subplots(1, 3, figsize=(12.5, 4.0))
    order = sorted(qs)
    trl_style = {"TRL grpo": ("C3", "s"), "TRL bnpo": ("C5", "^"), "TRL dr_grpo": ("C2", "x"), "TRL dapo": ("C6", "v")}
    for i, a in enumerate(data["series"]):
        if a.startswith("verl"):
            st = dict(marker="o", color=f"C{i}", label=a + NOTE[a], ms=3.5)
        else:
            c, mk = trl_style[a]
            st = dict(marker=mk, color=c, ls="--", label=a + NOTE[a], ms=5, mfc="none", lw=1.1)
        xs = [_get(data, q, Gf, a)["sd_len"] for q in order]
        axs[0].plot(xs, [floor(_get(data, q, Gf, a)["rel_bias"]) for q in order], **st)
        axs[1].plot(xs, [floor(_get(data, q, Gf, a)["residual"]) for q in order], **st)
        gs = [G for G in Gs if G >= 2 or a.startswith("verl")]
        axs[2].plot(gs, [floor(_get(data, qf, G, a)["residual"]) for G in gs], **st)
    for ax in axs:
        ax.set_yscale("log")
    axs[0].set_xlabel("sd of response length |y| under π (tokens)")
    axs[1].set_xlabel("sd of response length |y| under π (tokens)")
    axs[0].set_ylabel("relative bias ‖E ĝ − ∇J‖ / ‖∇J‖   (0 at 1e-17)")
    axs[1].set_ylabel("residual after best scale ‖E ĝ − κ∇J‖ / ‖∇J‖")
    axs[2].set_ylabel("residual after best scale ‖E ĝ − κ∇J‖ / ‖∇J‖")
    axs[2].set_xlabel("group size G (responses per prompt)")
    axs[2].set_xticks(Gs)
    axs[0].set_title(f"(a) relative bias, G = {Gf}")
    axs[1].set_title(f"(b) direction error (no learning rate fixes it), G = {Gf}")
    axs[2].set_title(f"(c) direction error vs G, π(EOS|s) = {qf:g}")
    axs[0].set_ylim(1e-17, 10)
    axs[1].set_ylim(1e-17, 1)
    axs[2].set_ylim(1e-17, 1)
    axs[0].legend(fontsize=6, ncol=2, loc="lower left", bbox_to_anchor=(0.0, 0.12))
    fig.suptitle(f"Loss aggregation under variable length (exact; random MDP seed {data['seed']}, V = 3 with EOS, "
                 f"H = {data['H']}; length spread set by π(EOS|s) = q; verl: RLOO advantage, TRL: mean-only)", fontsize=10)
    return fig


def caption(data) -> str:
    qs, Gf, qf, Gs = data["qs"], data["G_fixed"], data["q_fixed"], data["Gs"]
    v = lambda a: "verl " + a
    sd = sorted(_get(data, q, Gf, v(AGGS[0]))["sd_len"] for q in qs)
    worst = lambda a, key: max(_get(data, q, Gf, a)[key] for q in qs)
    sc = lambda a: _get(data, qf, Gf, a)["scale"]
    bd = max(abs(_get(data, q, G, "TRL bnpo")["residual"] - _get(data, q, G, "TRL dapo")["residual"])
             for q, G in {(p["q"], p["G"]) for p in data["points"] if p["agg"] == "TRL dapo"})
    g2 = min(G for G in Gs if G >= 2)
    return (f"RLOO advantages aggregated verl's five ways, and TRL's grpo / bnpo / dr_grpo / dapo loss types (with "
            f"TRL's mean-only advantage, scale_rewards=\"none\"), exact E[ĝ] at G = {Gf} while π(EOS|s) = q sweeps "
            f"the length sd from {fmt(sd[0])} to {fmt(sd[-1])} tokens (q = {qs[0]:g}…{qs[-1]:g}). "
            f"seq-mean-token-sum is unbiased (relative bias ≤ {fmt(worst(v('seq-mean-token-sum'), 'rel_bias'))}); "
            f"token-sum, seq-mean-token-sum-norm and TRL dr_grpo are exactly scaled (κ = {fmt(sc(v('token-sum')))} = G, "
            f"{fmt(sc(v('seq-mean-token-sum-norm')))} = 1/H and {fmt(sc('TRL dr_grpo'))} = (1 − 1/G)/H; residual ≤ "
            f"{fmt(max(worst(v('token-sum'), 'residual'), worst(v('seq-mean-token-sum-norm'), 'residual'), worst('TRL dr_grpo', 'residual')))}). "
            f"The length-normalised modes are biased in direction: residual after the best scale up to "
            f"{fmt(worst(v('token-mean'), 'residual'))} for token-mean and {fmt(worst(v('seq-mean-token-mean'), 'residual'))} "
            f"for seq-mean-token-mean (relative bias up to {fmt(worst(v('seq-mean-token-mean'), 'rel_bias'))}); TRL grpo "
            f"(per-sequence 1/|o_i|) up to {fmt(worst('TRL grpo', 'residual'))}, TRL bnpo and dapo (token-mean) up to "
            f"{fmt(worst('TRL dapo', 'residual'))} — bnpo and dapo coincide on an unsplit batch (max gap {fmt(bd)}; "
            f"they differ under micro-batching, see the zoo map). "
            f"At q = {qf:g}, token-mean's residual goes from {fmt(_get(data, qf, Gs[0], v('token-mean'))['residual'])} "
            f"(G = {Gs[0]}) to {fmt(_get(data, qf, Gs[-1], v('token-mean'))['residual'])} (G = {Gs[-1]}), "
            f"seq-mean-token-mean's stays {fmt(_get(data, qf, Gs[-1], v('seq-mean-token-mean'))['residual'])} and TRL grpo's "
            f"goes {fmt(_get(data, qf, g2, 'TRL grpo')['residual'])} (G = {g2}) → "
            f"{fmt(_get(data, qf, Gs[-1], 'TRL grpo')['residual'])} (G = {Gs[-1]}): the 1/|y| weight does not average out with G.")


register(Figure("length_normalisation", "Length normalisation: bias of each loss aggregation", compute, plot,
                caption, "≈ 30 s"))
