"""Learning curves (the seed paper's third experiment): exact J(θ) during RL on a binary-reward task.

``tpg.train.train`` on ``tpg.train.demo_mdp(0)`` (3 tokens + EOS, H = 4, two prompts, RM ∈ {0, 1};
242 responses, so J is exact at every evaluation), tabular softmax from one seeded random init
(the same for every run; the seed varies the sampling only), G = 4 responses × 2 prompts per step, Adam lr 0.1, no
KL. Algorithms: PPO (4 epochs, GAE λ = 0.95, exact critic), PPO with a learned per-state critic,
GRPO, RLOO, ReMax, TRePO (K = 2). Mean and a 95 % t-interval of J over the seeds (sampling noise of
the training runs; J itself is exact).
"""
from __future__ import annotations

import math

from tpg.figures.core import Figure, fmt, register

ALGOS = ("ppo", "ppo-learned", "grpo", "rloo", "remax", "trepo")
LABELS = {"ppo": "PPO (exact critic)", "ppo-learned": "PPO (learned critic)", "grpo": "GRPO", "rloo": "RLOO",
          "remax": "ReMax", "trepo": "TRePO (K = 2)"}
G, LR, EVAL = 4, 0.1, 2


def _run(task):
    algo, seed, steps = task
    from tpg import TabularSoftmax
    from tpg.train import demo_mdp, train
    mdp = demo_mdp(0)
    pol = TabularSoftmax(mdp, seed=0)          # one initial policy: the band is the training noise
    log = train(mdp, pol, algo, steps, G=G, lr=LR, seed=seed, eval_every=EVAL)
    return dict(algo=algo, seed=seed, J=[[s, j] for s, j in log.J])


def t975(n: int) -> float:
    from scipy import stats
    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else 0.0


def compute(ctx) -> dict:
    seeds = tuple(range(3)) if ctx.fast else tuple(range(10))
    steps = 10 if ctx.fast else 40
    runs = ctx.map(_run, [(a, s, steps) for a in ALGOS for s in seeds], "learning curves")
    curves = {}
    for a in ALGOS:
        rs = [r for r in runs if r["algo"] == a]
        xs = [s for s, _ in rs[0]["J"]]
        cols = list(zip(*[[j for _, j in r["J"]] for r in rs]))
        n = len(rs)
        mean = [sum(c) / n for c in cols]
        sd = [math.sqrt(sum((v - m) ** 2 for v in c) / (n - 1)) if n > 1 else 0.0 for c, m in zip(cols, mean)]
        half = [t975(n) * s / math.sqrt(n) for s in sd]
        curves[a] = dict(steps=xs, mean=mean, half_width=half)
    return dict(seeds=list(seeds), steps=steps, G=G, lr=LR, tokens_per_step_note="2 prompts × G responses",
                curves=curves, runs=runs)


def plot(data):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, a in enumerate(ALGOS):
        c = data["curves"][a]
        lo = [max(0.0, m - h) for m, h in zip(c["mean"], c["half_width"])]
        hi = [min(1.0, m + h) for m, h in zip(c["mean"], c["half_width"])]
        ax.plot(c["steps"], c["mean"], color=f"C{i}", label=LABELS[a])
        ax.fill_between(c["steps"], lo, hi, color=f"C{i}", alpha=0.18, lw=0)
    ax.set_xlabel(f"RL step (each: 2 prompts × G = {data['G']} sampled responses)")
    ax.set_ylabel("exact J(θ) = P(correct response)")
    ax.set_title(f"Learning curves, binary-reward task, tabular softmax\n(mean and 95 % band over "
                 f"{len(data['seeds'])} seeds; Adam lr {data['lr']:g})", fontsize=9.5)
    ax.legend(loc="lower right")
    return fig


def caption(data) -> str:
    n = len(data["seeds"])
    fin = {a: (data["curves"][a]["mean"][-1], data["curves"][a]["half_width"][-1]) for a in ALGOS}
    order = sorted(ALGOS, key=lambda a: -fin[a][0])
    j0 = data["curves"][ALGOS[0]]["mean"][0]
    parts = ", ".join(f"{LABELS[a]} {fmt(fin[a][0])} ± {fmt(fin[a][1])}" for a in order)
    return (f"Exact J(θ) (probability of a correct response) while training with each algorithm from the same "
            f"initial policy (J = {fmt(j0)} at step 0), {data['steps']} steps, {n} seeds. Final mean J ± "
            f"95 % half-width: {parts}. PPO takes 4 Adam steps (epochs) per sampled batch, the others one. One task and one learning rate: a demonstration that the verified "
            f"estimators train, not a benchmark.")


register(Figure("learning_curves", "Learning curves on a binary-reward task (exact J)", compute, plot, caption,
                "≈ 90 s"))
