"""The zoo map: the exact verdict of every verl / TRL / OpenRLHF loss × aggregation × setting.

``tpg.zoo.run_zoo`` (the ``tpg zoo`` matrix): ZOO.md's set-up — one prompt, vocabulary {a, b, EOS},
H = 3 (15 responses), tabular softmax, G = 3 responses per group, every group enumerated — on seeded
random MDPs with Gaussian and binary rewards. Each row is one library estimator (advantage × policy
loss × aggregation) or a training setting (micro-batch split with local / global normalisers,
rollout-policy mismatch with each importance-sampling correction, a second PPO epoch, KL in the
reward or the loss); the target is ∇J (∇J(π) under mismatch, ∇(J − βKL) for KL rows).

Colour = verdict (unbiased / scaled / biased); text = the relative bias ‖E ĝ − ∇J‖/‖∇J‖ for biased
cells, the scale κ for scaled ones, and the relative bias (round-off) for unbiased ones. A "≠"
marks a cell whose verdict contradicts the one ZOO.md records.
"""
from __future__ import annotations

from tpg.figures.core import Figure, fmt, register

COLOURS = {"unbiased": "#7fc97f", "scaled": "#80b1d3", "biased": "#fb8072", "inconclusive": "#d9d9d9"}
LIB_ORDER = ("verl", "trl", "openrlhf", "setting")
LIB_LABEL = {"verl": "verl 0.9.1", "trl": "TRL", "openrlhf": "OpenRLHF", "setting": "settings"}


def _column(task):
    seed, reward, G, fast = task
    from tpg.zoo import run_zoo
    rows = run_zoo(seeds=(seed,), rewards=(reward,), G=G, fast=fast)
    return [dict(lib=r.lib, name=r.name, setting=r.setting, mdp=r.mdp, verdict=r.verdict, scale=r.scale,
                 residual=r.residual, rel_bias=r.rel_bias, target=r.target, expected=r.expected,
                 agrees=r.agrees()) for r in rows]


def compute(ctx) -> dict:
    G = 3
    cols = [(0, "gaussian"), (0, "binary")] if ctx.fast else [(0, "gaussian"), (1, "gaussian"), (0, "binary"),
                                                            (1, "binary")]
    out = ctx.map(_column, [(s, r, G, ctx.fast) for s, r in cols], "zoo columns")
    cells = [c for col in out for c in col]
    mdps = [col[0]["mdp"] for col in out]
    keys = []
    for c in out[0]:
        keys.append([c["lib"], c["name"], c["setting"], c["target"]])
    return dict(G=G, mdps=mdps, rows=keys, cells=cells, fast=ctx.fast)


def cell_text(c) -> str:
    if c["verdict"] == "scaled":
        return f"×{fmt(c['scale'], 2)}"
    if c["verdict"] == "unbiased":
        return fmt(c["rel_bias"], 1)
    return fmt(c["rel_bias"], 2)


LABEL_MAX = 78                        # characters: longer settings are cut (the JSON keeps them whole)


def _label(row) -> str:
    lib, name, setting, target = row
    tail = "" if target == "∇J" else f" → {target}"
    lab = f"{name}  [{setting}]"
    if len(lab) + len(tail) > LABEL_MAX:
        lab = lab[: LABEL_MAX - len(tail) - 2] + "…]"
    return lab + tail


def plot(data):
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    rows, mdps = data["rows"], data["mdps"]
    idx = {(c["lib"], c["name"], c["setting"], c["mdp"]): c for c in data["cells"]}
    order = sorted(range(len(rows)), key=lambda i: (LIB_ORDER.index(rows[i][0]), i))
    rows = [rows[i] for i in order]
    half = (len(rows) + 1) // 2
    # split between libraries where possible: verl on the left, the rest on the right
    n_verl = sum(r[0] == "verl" for r in rows)
    if abs(n_verl - half) <= 8:
        half = n_verl
    parts = [rows[:half], rows[half:]]
    n = max(len(p) for p in parts)
    ncol = len(mdps)
    fig, axs = plt.subplots(1, 2, figsize=(15.5, 0.15 * n + 1.6), layout="constrained")
    for ax, part in zip(axs, parts):
        for i, row in enumerate(part):
            for j, m in enumerate(mdps):
                c = idx[(row[0], row[1], row[2], m)]
                ax.add_patch(plt.Rectangle((j, i), 1, 1, facecolor=COLOURS.get(c["verdict"], "#d9d9d9"),
                                           edgecolor="white", lw=1.0))
                txt = cell_text(c) + (" ≠" if c["agrees"] is False else "")
                ax.text(j + 0.5, i + 0.5, txt, ha="center", va="center", fontsize=5.6)
        prev = None
        for i, row in enumerate(part):                      # library separators and names
            if row[0] != prev:
                if i:
                    ax.axhline(i, color="k", lw=0.8)
                ax.text(ncol + 0.08, i + 0.15, LIB_LABEL[row[0]], fontsize=7, fontweight="bold", va="top")
                prev = row[0]
        ax.set_xlim(0, ncol)
        ax.set_ylim(n, 0)
        ax.set_xticks([j + 0.5 for j in range(ncol)], [m.replace("(seed=", "\nseed ").rstrip(")") for m in mdps],
                      fontsize=6.5)
        ax.xaxis.tick_top()
        ax.set_yticks([i + 0.5 for i in range(len(part))], [_label(r) for r in part], fontsize=5.3)
        ax.tick_params(length=0, pad=1.5)
        ax.grid(False)
        for s in ax.spines.values():
            s.set_visible(False)
    counts = {k: sum(c["verdict"] == k for c in data["cells"]) for k in COLOURS}
    handles = [Patch(facecolor=v, label=f"{k} ({counts[k]} cells)") for k, v in COLOURS.items() if counts[k]]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7.5)
    fig.suptitle(f"The zoo map: exact verdict of every library estimator and setting (1 prompt, V = {{a, b, EOS}}, "
                 f"H = 3, G = {data['G']}, tabular softmax)\ncell text: relative bias ‖E ĝ − ∇J‖/‖∇J‖ "
                 "(biased, unbiased) or ×κ (scaled, E ĝ = κ∇J); ≠ = contradicts ZOO.md", fontsize=8.5)
    return fig


def caption(data) -> str:
    cells, mdps = data["cells"], data["mdps"]
    n_rows = len(data["rows"])
    cnt = {k: sum(c["verdict"] == k for c in cells) for k in COLOURS}
    gauss = [c for c in cells if c["mdp"].startswith("gaussian")]
    per_lib = {}
    for lib in LIB_ORDER:
        cs = [c for c in gauss if c["lib"] == lib]
        if cs:
            per_lib[lib] = (sum(c["verdict"] == "unbiased" for c in cs), sum(c["verdict"] == "scaled" for c in cs),
                            sum(c["verdict"] == "biased" for c in cs), len(cs))
    checked = [c for c in cells if c["agrees"] is not None]
    diff = sorted({f"{c['lib']} {c['name']} [{c['setting']}]" for c in cells if c["agrees"] is False})
    # rows whose verdict changes with the reward kind (binary one prompt: std becomes a scale)
    by_row = {}
    for c in cells:
        by_row.setdefault((c["lib"], c["name"], c["setting"]), set()).add(c["verdict"])
    changes = sorted(f"{k[1]} [{k[2]}]" for k, v in by_row.items() if len(v) > 1)
    worst = max((c for c in gauss if c["verdict"] == "biased"), key=lambda c: c["rel_bias"])
    unb = [c["rel_bias"] for c in cells if c["verdict"] == "unbiased"]
    lib_txt = "; ".join(f"{LIB_LABEL[k]}: {u} unbiased, {s} scaled, {b} biased of {t}" for k, (u, s, b, t) in per_lib.items())
    return (f"{n_rows} library estimators and settings × {len(mdps)} MDPs ({', '.join(mdps)}), G = {data['G']}, every "
            f"group enumerated by `tpg.zoo.run_zoo`: {cnt['unbiased']} cells unbiased, {cnt['scaled']} scaled, "
            f"{cnt['biased']} biased" + (f", {cnt['inconclusive']} inconclusive" if cnt["inconclusive"] else "")
            + f". Gaussian-reward cells ({len({c['mdp'] for c in gauss})} MDPs) — {lib_txt}. Unbiased cells have relative bias ≤ {fmt(max(unb))} (round-off); the "
            f"largest bias is {worst['name']} [{worst['setting']}] ({fmt(worst['rel_bias'])}). "
            f"{len(changes)} rows change verdict with the reward kind or seed"
            + (f" (e.g. {'; '.join(changes[:3])})" if changes else "") + ". "
            f"{len(checked)} cells have a verdict recorded in ZOO.md; "
            + (f"{len(diff)} rows contradict it: {'; '.join(diff)}." if diff else "every one agrees."))


register(Figure("zoo_map", "The zoo map: every library loss × aggregation × setting", compute, plot, caption,
                "≈ 20 s"))
