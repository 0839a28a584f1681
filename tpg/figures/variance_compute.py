"""Variance per unit of compute (the seed paper's second experiment, PAPER §6 open question).

Task: seeded random MDP, tokens {0, 1}, fixed length H = 4, Gaussian token rewards, tabular
softmax. For each estimator, tr Cov[ĝ] of one update against the tokens it samples per update:

- prompt baseline, RLOO with G = 2, 3, 4, 6 (G·H tokens): exact (``exact.moments(cov="trace")``);
- per-position value baseline RM − U(W_{0,t−1}) (Theorem 2, exact U), and PPO's GAE(λ) with the
  exact critic (λ = 0, 0.95) and a noisy critic (σ = 0.3, λ = 0.95; biased, bias stated), over
  G = 1…4 responses: exact;
- TRePO, all positions, K = 1, 2, 4 continuations per prefix, one response (H + K·H(H+1)/2
  tokens) and value-anchored chunks every 2 or 4 tokens (continuations only at the anchors):
  Monte Carlo (the exact engine gives no covariance for continuation estimators), 95 % intervals;
  the budget frontier is the lower envelope of all TRePO (K, anchor density) points.
- Critics of graded quality: GAE(λ) for λ ∈ {0, 0.5, 0.95, 1} with critic noise σ ∈ {0, 0.1, 0.3,
  1} (V + σ·ε(s), ε fixed per state), G = 2: exact tr Cov and exact relative bias — the
  variance a critic saves against the bias it costs.
"""
from __future__ import annotations

from tpg.figures.core import Figure, fmt, register

H, SEED = 4, 1
NOISE = 0.3


def build():
    from tpg import TabularSoftmax, random_mdp
    mdp = random_mdp(SEED, vocab_size=2, horizon=H, eos=False, reward="gaussian")
    return mdp, TabularSoftmax(mdp, seed=SEED)


def _make(family: str, tab):
    from tpg import estimator
    from tpg.draws import exact_critic, perturbed_critic
    if family == "RLOO (prompt baseline)":
        return estimator("rloo"), None
    if family == "per-position baseline U(W_{0,t-1})":
        return estimator("baseline", baseline=lambda ro: tab.along(tab.U, ro)), None
    if family == "GAE λ=0, exact critic":
        return estimator("gae", lam=0.0), exact_critic(tab)
    if family == "GAE λ=0.95, exact critic":
        return estimator("gae", lam=0.95), exact_critic(tab)
    if family == f"GAE λ=0.95, noisy critic (σ={NOISE:g})":
        return estimator("gae", lam=0.95), perturbed_critic(tab, noise=NOISE, seed=2)
    if family.startswith("TRePO, every position"):
        return estimator("trepo", K=int(family.split("K=")[1].rstrip(")"))), None
    if family.startswith("TRePO, chunks"):
        K = int(family.split("K=")[1].rstrip(")"))
        k = int(family.split("every ")[1].split(" ")[0])
        return estimator("trepo", variant="chunk", K=K, anchors={"kind": "every", "k": k}), None
    if family.startswith("GAE grade"):                                   # "GAE grade λ=… σ=…"
        lam, sig = (float(x.split("=")[1]) for x in family.split()[2:4])
        return estimator("gae", lam=lam), perturbed_critic(tab, noise=sig, seed=2)
    raise KeyError(family)


def tokens(family: str, G: int, K: int = 0) -> int:
    if family.startswith("TRePO, every"):
        return G * (H + K * sum(H - t for t in range(H)))              # a continuation from every prefix t < H
    if family.startswith("TRePO, chunks"):
        k = int(family.split("every ")[1].split(" ")[0])
        return G * (H + K * sum(H - t for t in range(0, H, k)))        # continuations only at the anchors
    return G * H


def _point(task):
    family, G, K, n_mc = task
    from tpg import exact
    from tpg.figures.common import mc_cov_trace
    from tpg.verify import report
    mdp, pol = build()
    tab = exact.tables(mdp, pol)
    est, critic = _make(family, tab)
    if family.startswith("TRePO"):
        tr, se = mc_cov_trace(est, mdp, pol, G, n_mc, seed=7 + K, critic=critic)
        r = report(est, mdp, pol, G=G, cov=None, critic=critic)
        return dict(family=family, G=G, K=K, tokens=tokens(family, G, K), trace=tr, se=se, rel_bias=r.rel_bias,
                    method=f"Monte Carlo, {n_mc} batches")
    r = report(est, mdp, pol, G=G, cov="trace", critic=critic)
    return dict(family=family, G=G, K=K, tokens=tokens(family, G), trace=r.cov_trace, se=0.0, rel_bias=r.rel_bias,
                method="exact")


ANCHOR_EVERY = (2, 4)             # (every 1 token is the 'every position' reading)
LAMS, SIGMAS = (0.0, 0.5, 0.95, 1.0), (0.0, 0.1, 0.3, 1.0)
FAMILIES = ("RLOO (prompt baseline)", "per-position baseline U(W_{0,t-1})", "GAE λ=0, exact critic",
            "GAE λ=0.95, exact critic", f"GAE λ=0.95, noisy critic (σ={NOISE:g})")


def compute(ctx) -> dict:
    n_mc = 2000 if ctx.fast else 10000
    Ks = (1, 2) if ctx.fast else (1, 2, 4)
    tasks = [(FAMILIES[0], G, 0, 0) for G in ((2, 4) if ctx.fast else (2, 3, 4, 6))]
    tasks += [(f, G, 0, 0) for f in FAMILIES[1:] for G in ((1, 2) if ctx.fast else (1, 2, 3, 4))]
    tasks += [(f"TRePO, every position (K={K})", 1, K, n_mc) for K in Ks]
    tasks += [(f"TRePO, chunks every {k} tokens (K={K})", 1, K, n_mc) for k in ANCHOR_EVERY for K in Ks]
    tasks += [(f"GAE grade λ={lam:g} σ={sig:g}", 2, 0, 0) for lam in LAMS for sig in SIGMAS]
    pts = ctx.map(_point, tasks, "variance vs compute")
    return dict(H=H, seed=SEED, noise=NOISE, n_mc=n_mc, points=[p for p in pts if not p["family"].startswith("GAE grade")],
                grades=[p for p in pts if p["family"].startswith("GAE grade")])


def _groups(data):
    out = {}
    for p in data["points"]:
        key = p["family"].split(" (K=")[0] if p["family"].startswith("TRePO") else p["family"]
        if key.startswith("TRePO, chunks"):
            key = "TRePO, value-anchored chunks"
        out.setdefault(key, []).append(p)
    return {k: sorted(v, key=lambda p: p["tokens"]) for k, v in out.items()}


def frontier(points: list[dict]) -> list[dict]:
    """The budget frontier: points not beaten by any other in both tokens and variance."""
    pts = sorted(points, key=lambda p: (p["tokens"], p["trace"]))
    out, best = [], float("inf")
    for p in pts:
        if p["trace"] < best:
            out.append(p)
            best = p["trace"]
    return out


def plot(data):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(15.5, 4.8), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    groups = _groups(data)
    for i, (k, pts) in enumerate(groups.items()):
        xs, ys = [p["tokens"] for p in pts], [p["trace"] for p in pts]
        biased = max(p["rel_bias"] for p in pts) > 1e-8
        lab = k + (" [biased]" if biased else "")
        if k.startswith("TRePO"):
            ax.errorbar(xs, ys, yerr=[1.96 * p["se"] for p in pts], marker="s", capsize=3, color=f"C{i}", ls="none",
                        label=f"{lab} (MC, 95 % CI)")
            for p in pts:                                                  # which K (and anchor spacing)
                every = p["family"].split("every ")[1].split(" ")[0] if "every " in p["family"] else "1"
                ax.annotate(f"K={p['K']}, every {every}", (p["tokens"], p["trace"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=6, color=f"C{i}")
        else:
            ax.plot(xs, ys, marker="o", color=f"C{i}", ls="--" if biased else "-",
                    label=lab + f", G = {', '.join(str(p['G']) for p in pts)}")
    fr = frontier([p for k, v in groups.items() if k.startswith("TRePO") for p in v])
    ax.plot([p["tokens"] for p in fr], [p["trace"] for p in fr], color="k", lw=1, ls=":", label="TRePO budget frontier")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 4.0, 6.0)))
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(FormatStrFormatter(""))
    ax.set_xlabel("sampled tokens per update (responses + continuations)")
    ax.set_ylabel("tr Cov[ĝ]   (squared gradient units)")
    ax.set_title("(a) variance against compute", fontsize=9.5)
    ax.legend(fontsize=6.4, loc="lower left")
    for lam in LAMS:
        pts = sorted((p for p in data["grades"] if f"λ={lam:g} " in p["family"]), key=lambda p: p["family"])
        sig = [float(p["family"].split("σ=")[1]) for p in pts]
        order = sorted(range(len(pts)), key=lambda i: sig[i])
        bx.plot([sig[i] for i in order], [pts[i]["trace"] for i in order], marker="o", label=f"GAE λ = {lam:g}")
        cx.plot([sig[i] for i in order], [max(pts[i]["rel_bias"], 1e-17) for i in order], marker="o",
                label=f"GAE λ = {lam:g}")
    for a, t, y in ((bx, "(b) critic quality: variance", "tr Cov[ĝ] (G = 2)"),
                    (cx, "(c) critic quality: bias", "relative bias ‖E ĝ − ∇J‖/‖∇J‖  (0 at 1e-17)")):
        a.set_xscale("symlog", linthresh=0.1)
        a.set_xlabel("critic noise σ (V̂ = V + σ·ε(s), reward units)")
        a.set_ylabel(y)
        a.set_title(t, fontsize=9.5)
        a.legend(fontsize=7)
    cx.set_yscale("log")
    fig.suptitle(f"Variance per unit of compute (random MDP seed {data['seed']}, tokens {{0, 1}}, H = {data['H']}, "
                 "tabular softmax, exact unless marked MC)", fontsize=10.5)
    return fig


def caption(data) -> str:
    g = _groups(data)
    at = lambda fam, tok: next((p for p in g[fam] if p["tokens"] == tok), None)
    rl, pp = g["RLOO (prompt baseline)"], g["per-position baseline U(W_{0,t-1})"]
    tok = rl[-1]["tokens"] if at("per-position baseline U(W_{0,t-1})", rl[-1]["tokens"]) else pp[-1]["tokens"]
    r_at, p_at = at("RLOO (prompt baseline)", tok), at("per-position baseline U(W_{0,t-1})", tok)
    l0 = at("GAE λ=0, exact critic", tok)
    noisy = g[f"GAE λ=0.95, noisy critic (σ={data['noise']:g})"]
    tre = g["TRePO, every position"]
    ch = [p for p in g["TRePO, value-anchored chunks"] if "every 2 " in p["family"]]
    fr = frontier([p for k, v in g.items() if k.startswith("TRePO") for p in v])
    gr = {p["family"]: p for p in data["grades"]}
    pick = lambda lam, sig: gr[f"GAE grade λ={lam:g} σ={sig:g}"]
    s = (f"At {tok} sampled tokens per update, the exact tr Cov[ĝ] is {fmt(r_at['trace']) if r_at else 'n/a'} for "
         f"RLOO's prompt baseline, {fmt(p_at['trace'])} for the per-position baseline U(W_(0,t−1)) "
         f"and {fmt(l0['trace'])} for GAE(λ = 0) with the exact critic (the ideal critic, unbiased). ")
    s += (f"A critic with noise σ = {data['noise']:g} has variance {fmt(noisy[-1]['trace'])} at {noisy[-1]['tokens']} "
          f"tokens but a relative bias of {fmt(noisy[-1]['rel_bias'])}. ")
    s += ("TRePO (unbiased; Monte Carlo, " + f"{data['n_mc']} batches) with K = "
          + ", ".join(f"{p['K']}: {fmt(p['trace'])} ± {fmt(1.96 * p['se'])} at {p['tokens']} tokens" for p in tre)
          + "; value-anchored chunks every 2 tokens: "
          + ", ".join(f"K = {p['K']}: {fmt(p['trace'])} ± {fmt(1.96 * p['se'])} at {p['tokens']} tokens" for p in ch)
          + ". Continuations cost tokens that more responses would also buy. The TRePO budget frontier runs through "
          + ", ".join(f"({p['tokens']} tokens, {fmt(p['trace'])}: {p['family'].split('TRePO, ')[1]})" for p in fr) + ". ")
    s += (f"Critic quality (G = 2): GAE(λ = 0) goes from tr Cov {fmt(pick(0, 0)['trace'])} and bias "
          f"{fmt(pick(0, 0)['rel_bias'])} with the exact critic to {fmt(pick(0, 1)['trace'])} and bias "
          f"{fmt(pick(0, 1)['rel_bias'])} at σ = 1, while GAE(λ = 1) stays unbiased at every σ (largest bias "
          f"{fmt(max(pick(1, sg)['rel_bias'] for sg in SIGMAS))}) with tr Cov {fmt(pick(1, 0)['trace'])}–"
          f"{fmt(max(pick(1, sg)['trace'] for sg in SIGMAS))}.")
    return s


register(Figure("variance_compute", "Variance per unit of compute", compute, plot, caption, "≈ 30 s"))
