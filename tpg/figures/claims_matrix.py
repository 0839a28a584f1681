"""Claims matrix: every claim of ``tpg.claims`` (PAPER §7's T1–T18, F1–F11, N1–N2, and the engine checks
T19–T22 and the sampler's designed Monte Carlo checks M1–M3) × policy kind (tabular, log-linear, GPT-2).

Each cell is ``tpg.claims``' own check on seeded random MDPs (the same run as ``tpg verify``):
colour = agree / disagree / skipped (the claim does not apply to that policy, or GPT-2 needs
``transformers``); text = the claim's key number on its worst seed — the relative gap for TRUE
claims (must be ≤ 1e-10), the relative bias for FALSE ones (must exceed 1e-4), the measured ratio
for the N claims, max |z|/z* for the M claims (must stay < 1; their negative controls must exceed 1).
"""
from __future__ import annotations

import math

from tpg.figures.core import Figure, fmt, register

POLICIES = ("tabular", "loglinear", "gpt2")
COLOURS = {"agree": "#7fc97f", "disagree": "#f0027f", "skipped": "#d9d9d9"}


def _claims():
    """The claim objects, through the public names of ``tpg.claims`` (a module or a package)."""
    import tpg.claims as C
    return C.select(None)


def _cell(task):
    cid, policy, seeds = task
    import tpg.claims as C
    (claim,) = C.select([cid])
    if policy not in claim.policies:
        return dict(id=cid, policy=policy, status="skipped", text="n/a", score=None,
                    reason=getattr(claim, "why_not", ""))
    if policy == "gpt2":
        try:
            import transformers  # noqa: F401
        except ImportError:
            return dict(id=cid, policy=policy, status="skipped", text="no transformers", score=None,
                        reason="transformers is not installed")
    run = C.run_claim(claim, policy, list(seeds))
    w = run.worst()
    score = w.score if isinstance(w.score, float) and math.isfinite(w.score) else None
    return dict(id=cid, policy=policy, status="agree" if run.agree else "disagree", verdict=w.verdict,
                expected=claim.expected, score=score, text=fmt(score, 2), figure=w.figure, reason="")


def compute(ctx) -> dict:
    seeds = [0] if ctx.fast else [0, 1]
    claims = _claims()
    tasks = [(c.id, p, tuple(seeds)) for c in claims for p in POLICIES]
    cells = ctx.map(_cell, tasks, "claims × policies")
    return dict(seeds=seeds, policies=list(POLICIES),
                claims=[dict(id=c.id, expected=c.expected, statement=c.statement) for c in claims], cells=cells)


def plot(data):
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    claims, pols = data["claims"], data["policies"]
    idx = {(c["id"], c["policy"]): c for c in data["cells"]}
    n = len(claims)
    fig, ax = plt.subplots(figsize=(6.2, 0.24 * n + 1.3))
    for i, cl in enumerate(claims):
        for j, p in enumerate(pols):
            c = idx[(cl["id"], p)]
            ax.add_patch(plt.Rectangle((j, i), 1, 1, facecolor=COLOURS[c["status"]], edgecolor="white", lw=1.5))
            ax.text(j + 0.5, i + 0.5, c["text"], ha="center", va="center", fontsize=7)
    ax.set_xlim(0, len(pols))
    ax.set_ylim(n, 0)
    ax.set_xticks([j + 0.5 for j in range(len(pols))], [{"tabular": "tabular softmax", "loglinear": "log-linear",
                                                         "gpt2": "tiny GPT-2"}[p] for p in pols])
    ax.xaxis.tick_top()
    ax.set_yticks([i + 0.5 for i in range(n)], [f"{c['id']}  ({c['expected']})" for c in claims], fontsize=7.5)
    ax.tick_params(length=0)
    ax.grid(False)
    for s in ax.spines.values():
        s.set_visible(False)
    counts = {k: sum(c["status"] == k for c in data["cells"]) for k in COLOURS}
    ax.legend(handles=[Patch(facecolor=v, label=f"{k} ({counts[k]})") for k, v in COLOURS.items()],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8)
    ax.set_title(f"{n} claims × policy: cell = the check's key number, worst of seeds "
                 f"{data['seeds'][0]}–{data['seeds'][-1]}\n(TRUE: relative gap ≤ 1e-10; FALSE: relative bias > 1e-4; "
                 "T1: FD error / tolerance; T18: max |A_t|;\nN: measured ratio; M: Monte Carlo max |z| / z*, < 1)",
                 fontsize=9)
    return fig


def caption(data) -> str:
    cells = data["cells"]
    per = {p: {k: sum(c["status"] == k for c in cells if c["policy"] == p) for k in COLOURS}
           for p in data["policies"]}
    parts = "; ".join(f"{p}: {v['agree']} agree, {v['disagree']} disagree, {v['skipped']} skipped"
                      for p, v in per.items())
    # T1's score is a finite-difference error over its tolerance, T18's the |A_t| it exhibits: not gaps
    true_gaps = [c["score"] for c in cells if c["id"][0] == "T" and c["id"] not in ("T1", "T18")
                 and c["status"] != "skipped" and c["score"] is not None]
    mc = [c["score"] for c in cells if c["id"][0] == "M" and c["status"] != "skipped" and c["score"] is not None]
    ids = [c["id"] for c in data["claims"]]
    groups = {k: sum(i[0] == k for i in ids) for k in "TFNM"}
    false_bias = [c["score"] for c in cells if c["id"][0] == "F" and c["status"] != "skipped" and c["score"] is not None]
    bad = [f"{c['id']}/{c['policy']}" for c in cells if c["status"] == "disagree"]
    return (f"All {len(ids)} claims of `tpg.claims` ({groups['T']} true identities T1–T{groups['T']}, {groups['F']} false "
            f"claims, {groups['N']} measured, {groups['M']} designed Monte Carlo checks of the sampler) checked on seeded "
            f"random MDPs (seeds {', '.join(map(str, data['seeds']))}) with three policy kinds. {parts}. "
            f"Largest relative gap of a TRUE identity (T2–T17, T19–T{groups['T']}): "
            f"{fmt(max(true_gaps) if true_gaps else None)} (threshold 1e-10); smallest relative bias of a FALSE claim: "
            f"{fmt(min(false_bias) if false_bias else None)} (threshold 1e-4); Monte Carlo checks: max |z|/z* = "
            f"{fmt(max(mc) if mc else None)} (< 1). "
            + (f"Disagreements: {', '.join(bad)}." if bad else "No claim contradicts its expected verdict."))


register(Figure("claims_matrix", "Claims matrix: every claim × policy", compute, plot, caption, "≈ 1 min"))
