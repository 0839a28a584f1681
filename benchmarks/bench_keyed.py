"""Exact group moments at practitioners' G: the keyed route vs the multiset route (issue 10).

Prints, for std-GRPO, RLOO and Dr. GRPO on an MDP with 177,147 responses (V = 3, H = 11, fixed
length) with binary and with 5-valued response rewards:
- E[ĝ] at G = 8, 16, 64: seconds (and the route that ran);
- agreement of the keyed and multiset routes where both run (G ≤ 4, on an 81-response MDP,
  where the multiset route fits the budget): max relative gap of E[ĝ];
- tr Cov[ĝ] at G = 16 by the keyed route against the multiset route, and against the joint route
  (ordered tuples) where it runs: one response per reward value (G = 16 binary, G = 6 5-valued).
Both sides of each comparison run in this process, back to back, single-threaded.

    python benchmarks/bench_keyed.py
"""
from __future__ import annotations

import time

import numpy as np
import torch

from tpg import TabularSoftmax, TokenMDP, estimator, exact

torch.set_num_threads(1)
ESTIMATORS = {"std-GRPO": estimator("grpo"), "RLOO": estimator("rloo"), "Dr. GRPO": estimator("drgrpo")}


def table_mdp(values, H: int, V: int = 3, seed: int = 0) -> TokenMDP:
    """Fixed-length MDP whose RM is drawn from ``values`` per terminal pair (a table: no Python callback)."""
    shape = TokenMDP(prompts=[[]], vocab_size=V, horizon=H, response_rewards=np.zeros(((V**H - 1) // (V - 1), V)))
    rng = np.random.default_rng(seed)
    return TokenMDP(prompts=[[]], vocab_size=V, horizon=H, response_rewards=rng.choice(values, size=(shape.num_states, V)))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    rewards = {"binary": [0.0, 1.0], "5-valued": [0.0, 0.25, 0.5, 0.75, 1.0]}
    for rname, vals in rewards.items():
        mdp = table_mdp(vals, H=11)
        pol = TabularSoftmax(mdp, seed=0)
        print(f"{rname} rewards, {mdp.num_responses:,} responses")
        for G in (8, 16, 64):
            for name, est in ESTIMATORS.items():
                try:
                    mo, s = timed(lambda: exact.moments(est, mdp, pol, G))
                    print(f"  G={G:2d} {name:9s} E[ĝ] {s:6.2f} s  route {mo.route}, {mo.n_outcomes:,} groups")
                except Exception as e:                                         # noqa: BLE001 (reported)
                    print(f"  G={G:2d} {name:9s} refused: {str(e)[:110]}")
        small = table_mdp(vals, H=4)
        spol = TabularSoftmax(small, seed=0)
        gap = 0.0
        for G in (2, 3, 4):
            for est in ESTIMATORS.values():
                (k, tk), (m, tm) = timed(lambda: exact.moments(est, small, spol, G, route="keyed")), \
                    timed(lambda: exact.moments(est, small, spol, G, route="multiset"))
                gap = max(gap, float((k.mean - m.mean).norm() / m.mean.norm()))
        print(f"  keyed vs multiset, G ≤ 4 on {small.num_responses:,} responses: max rel. gap {gap:.1e} "
              f"(G=4 Dr. GRPO: keyed {tk:.2f} s, multiset {tm:.2f} s, {tm / tk:.0f}×)")
        tiny = TokenMDP(prompts=[[]], vocab_size=len(vals), horizon=1, response_rewards=np.array([vals]))  # one response per value
        tpol = TabularSoftmax(tiny, seed=0)
        for G, other in ((16, "multiset"), (16 if len(vals) == 2 else 6, "joint")):
            (k, tk), (o, to) = timed(lambda: exact.moments(estimator("grpo"), tiny, tpol, G, route="keyed", cov="trace")), \
                timed(lambda: exact.moments(estimator("grpo"), tiny, tpol, G, route=other, cov="trace"))
            print(f"  tr Cov std-GRPO G={G} on {tiny.num_responses} responses: keyed {k.cov_trace:.10g} ({tk:.2f} s), "
                  f"{other} {o.cov_trace:.10g} ({to:.2f} s), rel. gap {abs(k.cov_trace - o.cov_trace) / o.cov_trace:.1e}")


if __name__ == "__main__":
    main()
