"""Std normalisation is not a smaller learning rate (PAPER §3.1, claims T13 / F4), at practitioners' G.

Task: tokens {0, 1, 2}, fixed length H = 9 (19,683 responses per prompt; H = 6 and 729 in
``--fast``). RM counts the zeros z(y) of the response: binary RM = [z ≥ 5]; 3-valued RM = 1 if
z ≥ 5, ½ if z ≥ 3, else 0. The policy is a tabular softmax with seeded N(0, 0.5²) logits plus one
shift b_x added to token 0's logit at every state of prompt x; b_x is found by bisection so that
the prompt's success rate J_x = E[RM | x] is exactly the value swept (RM is monotone in z, so J_x is
monotone in b_x). Two prompts (ρ = ½ each) of different difficulty get their own shifts
(J = 0.2 and 0.7).

Every E[ĝ] is exact, by the keyed route of ``tpg.exact.moments`` (``route="keyed"``: the others in a
group seen through their reward, C(K + G − 2, G − 1) multisets of K reward values instead of
C(N + G − 1, G) groups of responses), for G = 2 … 64. The route that ran is recorded for every point
and must be "keyed". Estimators: std-GRPO (verl: Bessel std, ε = 1e-6), Dr. GRPO (mean only,
constant normalisation: κ = (1 − 1/G)/H exactly) and RLOO (κ = 1). κ = ⟨E ĝ, ∇J⟩/‖∇J‖².
"""
from __future__ import annotations

import functools
import math

import numpy as np

from tpg.figures.core import Figure, floor, fmt, register

V = 3
H_FULL, H_FAST = 9, 6
NOISE, NOISE_SEED = 0.5, 0
LEVELS = {"binary": ((5, 1.0),), "3-valued": ((5, 1.0), (3, 0.5))}   # (min zeros, RM), first match wins
ESTIMATORS = {"std-GRPO": ("grpo", {}), "Dr. GRPO": ("drgrpo", {}), "RLOO": ("rloo", {})}
P_TWO = (0.2, 0.7)                    # success rates of the two prompts
P_FIXED = 0.35                        # the policy of the 1 − cos sweep (one prompt)
GS_FULL = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
GS_FAST = (2, 4)


def rm_of_zeros(kind: str, z: np.ndarray) -> np.ndarray:
    out = np.zeros(z.shape)
    for k, v in reversed(LEVELS[kind]):
        out = np.where(z >= k, v, out)
    return out


def _mdp(kind: str, n_prompts: int, H: int):
    """Fixed-length MDP whose RM is a function of the number of zeros, as a (num_states, V) table."""
    from tpg import TokenMDP
    S = (V**H - 1) // (V - 1)
    off, n = (V ** (H - 1) - 1) // (V - 1), V ** (H - 1)                   # last level: H − 1 tokens so far
    code = np.arange(n)
    z = np.zeros(n, dtype=int)
    c = code.copy()
    for _ in range(H - 1):
        z += c % V == 0
        c //= V
    table = np.zeros((S * n_prompts, V))
    for x in range(n_prompts):
        for a in range(V):
            table[x * S + off + code, a] = rm_of_zeros(kind, z + (a == 0))
    prompts = [(x,) for x in range(n_prompts)]
    return TokenMDP(prompts, V, H, None, 1.0, response_rewards=table,
                    name=f"zeros({kind}, H={H}, {n_prompts} prompt{'s' * (n_prompts > 1)})")


@functools.lru_cache(maxsize=32)
def build(kind: str, rates: tuple, H: int):
    """(mdp, policy, shifts): one prompt per success rate in ``rates``."""
    import torch
    from tpg import TabularSoftmax, exact
    mdp = _mdp(kind, len(rates), H)
    S = mdp.states_per_prompt
    noise = NOISE * torch.randn(mdp.num_states, V, generator=torch.Generator().manual_seed(NOISE_SEED),
                                dtype=torch.float64)
    shifts = []
    for x, p in enumerate(rates):
        lo, hi = -12.0, 12.0
        for _ in range(80):                                                  # bisection on b_x
            mid = 0.5 * (lo + hi)
            lg = noise.clone()
            lg[x * S:(x + 1) * S, 0] += mid
            Jx = float(exact.tables(mdp, TabularSoftmax(mdp, lg)).J_prompt[x])
            lo, hi = (mid, hi) if Jx < p else (lo, mid)
        shifts.append(0.5 * (lo + hi))
    lg = noise.clone()
    for x, b in enumerate(shifts):
        lg[x * S:(x + 1) * S, 0] += b
    return mdp, TabularSoftmax(mdp, lg), tuple(shifts)


def _point(task):
    kind, rates, est_label, G, H = task
    from tpg import estimator, exact
    from tpg.verify import roundoff_floor, verdict_of
    mdp, pol, shifts = build(kind, tuple(rates), H)
    name, opts = ESTIMATORS[est_label]
    grad = exact.gradient(mdp, pol)
    mo = exact.moments(estimator(name, **opts), mdp, pol, G, route="keyed")
    if mo.route != "keyed":
        raise AssertionError(f"std_normalisation: the keyed route did not run ({mo.route})")
    delta = roundoff_floor(mdp, pol, grad)
    verdict, rel, scale, resid, cos = verdict_of(mo.mean, grad, delta)
    Jx = [float(v) for v in exact.tables(mdp, pol).J_prompt]
    return dict(kind=kind, rates=list(rates), estimator=est_label, G=G, scale=scale, one_minus_cos=1.0 - cos,
                residual=resid, rel_bias=rel, roundoff=delta, verdict=verdict, route=mo.route,
                n_groups=mo.n_outcomes, J_prompt=Jx, shifts=list(shifts))


def compute(ctx) -> dict:
    Gs = GS_FAST if ctx.fast else GS_FULL
    H = H_FAST if ctx.fast else H_FULL
    ps = (0.2, 0.7) if ctx.fast else tuple(round(0.1 * k, 1) for k in range(1, 10))
    tasks = [("binary", (p,), "std-GRPO", G, H) for p in ps for G in Gs]
    configs = [("binary", (P_FIXED,)), ("3-valued", (P_FIXED,)), ("binary", P_TWO), ("3-valued", P_TWO)]
    tasks += [(k, r, e, G, H) for k, r in configs for e in ESTIMATORS for G in Gs]
    pts = ctx.map(_point, tasks, "std normalisation")
    mdp = _mdp("binary", 1, H)
    return dict(Gs=list(Gs), ps=list(ps), p_two=list(P_TWO), p_fixed=P_FIXED, points=pts, H=H, V=V,
                responses_per_prompt=mdp.num_responses, levels={k: [list(t) for t in v] for k, v in LEVELS.items()})


def _pick(data, **kw):
    return [q for q in data["points"] if all((list(q[k]) if isinstance(q[k], list) else q[k]) == v
                                             for k, v in kw.items())]


def _config_label(kind, rates):
    return f"2 prompts (J = {rates[0]:g}, {rates[1]:g}), {kind}" if len(rates) == 2 else f"1 prompt, {kind}"


def plot(data):
    import matplotlib.pyplot as plt
    Gs, ps = data["Gs"], data["ps"]
    fig, axs = plt.subplots(1, 3, figsize=(12.5, 3.9))
    # (a) κ vs success rate, one prompt, binary
    ax = axs[0]
    cmap = plt.get_cmap("viridis")
    for i, G in enumerate(Gs):
        ys = [_pick(data, kind="binary", rates=[p], estimator="std-GRPO", G=G)[0]["scale"] for p in ps]
        ax.plot(ps, ys, marker="o", color=cmap(i / max(1, len(Gs) - 1)), label=f"G = {G}")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="RLOO (κ = 1)")
    ax.set_xlabel("success rate p = J (probability that RM = 1)")
    ax.set_ylabel("scale κ of std-GRPO's E[ĝ] = κ ∇J")
    ax.set_title("(a) 1 prompt, binary RM: κ depends on p and G")
    top = max(q["scale"] for q in _pick(data, kind="binary", estimator="std-GRPO") if len(q["rates"]) == 1)
    ax.set_ylim(0, top * 1.45)                                   # room for the legend above the curves
    ax.legend(ncol=4, fontsize=6.3, loc="upper center")
    # (b) 1 − cos vs G
    ax = axs[1]
    configs = [("binary", [data["p_fixed"]]), ("3-valued", [data["p_fixed"]]), ("binary", data["p_two"]),
               ("3-valued", data["p_two"])]
    for i, (k, r) in enumerate(configs):
        ys = [floor(_pick(data, kind=k, rates=r, estimator="std-GRPO", G=G)[0]["one_minus_cos"]) for G in Gs]
        ax.plot(Gs, ys, marker="o" if len(r) == 1 else "s", ls="-" if k == "binary" else "--", color=f"C{i}",
                label="std-GRPO, " + _config_label(k, r))
    for est, mk in (("Dr. GRPO", "x"), ("RLOO", "+")):
        ys = [max(floor(q["one_minus_cos"]) for q in _pick(data, estimator=est, G=G)) for G in Gs]
        ax.plot(Gs, ys, ls="none", marker=mk, color="0.35", label=f"{est}, every setting (max)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(1e-17, 1.0)
    ax.set_xticks(Gs, [str(G) for G in Gs], fontsize=7)
    ax.set_xlabel("group size G (responses per prompt)")
    ax.set_ylabel("1 − cos(E[ĝ], ∇J)   (0 drawn at 1e-17)")
    ax.set_title("(b) direction error: 0 only for binary, 1 prompt")
    ax.legend(fontsize=6.3, loc="center right")
    # (c) κ vs G: std-GRPO per success rate, Dr. GRPO, RLOO
    ax = axs[2]
    for i, p in enumerate(data["p_two"]):
        ys = [_pick(data, kind="binary", rates=[p], estimator="std-GRPO", G=G)[0]["scale"] for G in Gs]
        ax.plot(Gs, ys, marker="o", color=f"C{i + 4}", label=f"std-GRPO, 1 prompt with p = {p:g}")
    two = [_pick(data, kind="binary", rates=data["p_two"], estimator="std-GRPO", G=G)[0]["scale"] for G in Gs]
    ax.plot(Gs, two, marker="s", color="C2", label="std-GRPO, both prompts (best scale)")
    dr = [_pick(data, kind="binary", rates=[data["p_fixed"]], estimator="Dr. GRPO", G=G)[0]["scale"] for G in Gs]
    ax.plot(Gs, dr, marker="x", color="0.35", label=f"Dr. GRPO: (1 − 1/G)/H, H = {data['H']}")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="RLOO (κ = 1)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(Gs, [str(G) for G in Gs], fontsize=7)
    ax.set_xlabel("group size G (responses per prompt)")
    ax.set_ylabel("scale κ = ⟨E ĝ, ∇J⟩ / ‖∇J‖²")
    ax.set_title("(c) per-prompt κ differ → 2 prompts not parallel")
    ax.legend(fontsize=6.3, loc="upper left")
    fig.suptitle(f"Std normalisation is not a smaller learning rate (exact E[ĝ] by the keyed route; tabular softmax, "
                 f"V = {data['V']}, H = {data['H']}, {data['responses_per_prompt']:,} responses per prompt)",
                 fontsize=10)
    return fig


def caption(data) -> str:
    Gs = data["Gs"]
    Gmax = Gs[-1]
    pf, two, ps = data["p_fixed"], data["p_two"], data["ps"]
    kap = lambda p, G: _pick(data, kind="binary", rates=[p], estimator="std-GRPO", G=G)[0]["scale"]
    omc = lambda k, r, G: _pick(data, kind=k, rates=r, estimator="std-GRPO", G=G)[0]["one_minus_cos"]
    k_lo, k_hi = min(kap(p, Gmax) for p in ps), max(kap(p, Gmax) for p in ps)
    k2 = [kap(p, Gs[0]) for p in ps]
    bin1 = max(abs(omc("binary", [pf], G)) for G in Gs)
    first_two = next((G for G in Gs if omc("binary", two, G) > 1e-12), None)
    others = max(abs(q["one_minus_cos"]) for q in data["points"] if q["estimator"] != "std-GRPO")
    H = data["H"]
    dr_err = max(abs(q["scale"] - (1 - 1 / q["G"]) / H) for q in data["points"] if q["estimator"] == "Dr. GRPO")
    rl_err = max(abs(q["scale"] - 1) for q in data["points"] if q["estimator"] == "RLOO")
    routes = sorted({q["route"] for q in data["points"]})
    ngroups = max(q["n_groups"] for q in data["points"])
    par2 = [G for G in Gs if omc("binary", two, G) <= 1e-12]
    t3 = lambda G: omc("3-valued", two, G)
    return (f"Tokens {{0, 1, 2}}, fixed length H = {H} ({data['responses_per_prompt']:,} responses per prompt); "
            f"binary RM = [at least 5 zeros], 3-valued RM ∈ {{0, ½, 1}}. Every E[ĝ] is exact for G = {Gs[0]}…{Gmax} "
            f"by the keyed route (route of all {len(data['points'])} points: {', '.join(routes)}; at most "
            f"{ngroups:,} (own reward, others' multiset) groups per point). "
            f"One prompt, binary RM: std-GRPO is exactly a scaled gradient (1 − cos ≤ {fmt(bin1)} at p = {pf:g}), "
            f"but the scale is not a constant: at G = {Gmax}, κ ranges from {fmt(k_lo)} to {fmt(k_hi)} over success "
            f"rates p = {ps[0]:g}…{ps[-1]:g} (" + (f"G = {Gs[0]}: κ = {fmt(k2[0])} for every p" if fmt(min(k2)) == fmt(max(k2))
                                                 else f"G = {Gs[0]}: {fmt(min(k2))}…{fmt(max(k2))}") + "). "
            f"3-valued RM, one prompt: 1 − cos = {fmt(omc('3-valued', [pf], Gs[0]))} (G = {Gs[0]}) … "
            f"{fmt(omc('3-valued', [pf], Gmax))} (G = {Gmax}). Two binary prompts with J = {two[0]:g} and {two[1]:g} "
            f"get different per-prompt scales (κ = {fmt(kap(two[0], Gmax))} vs {fmt(kap(two[1], Gmax))} at G = {Gmax}), "
            f"so the stacked update leaves the gradient direction from G = {first_two} on (1 − cos = "
            f"{fmt(omc('binary', two, Gmax))} at G = {Gmax}"
            + (f"; parallel at G = {', '.join(map(str, par2))}" if par2 else "") + "); two 3-valued prompts: "
            f"1 − cos = {fmt(t3(Gs[0]))} (G = {Gs[0]}) … {fmt(t3(Gmax))} (G = {Gmax}). Dr. GRPO is exactly "
            f"(1 − 1/G)/H · ∇J (max deviation {fmt(dr_err)}) and RLOO is ∇J (max |κ − 1| = {fmt(rl_err)}); their "
            f"1 − cos ≤ {fmt(others)} in every setting.")


register(Figure("std_normalisation", "Std normalisation is not a smaller learning rate", compute, plot, caption,
                "≈ 2 min"))
