"""Overhead of the engine's shortcut probes (``tpg.batches``) on the main job, ``tpg verify``.

Runs every default claim (2 seeds, tabular) with the probes as shipped, and with every probe
replaced by "trust the shortcut" (what the engine did before it checked anything), alternating,
in this process, single-threaded; prints both totals and the ratio.

    python benchmarks/bench_probes.py
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from tpg import batches
from tpg.claims import CLAIMS, run_claim

torch.set_num_threads(1)


@contextmanager
def trusting():
    """Every probe answers "holds" at no cost."""
    saved = {k: getattr(batches.Evaluator, k) for k in ("_probe_local", "_probe_exchangeable", "_probe_multilinear")}
    saved_key = batches.KeyedGroups.probe

    def holds(prop):
        def f(self, *a, **k):
            self.state[prop] = True
            return True
        return f
    batches.Evaluator._probe_local = holds("local")
    batches.Evaluator._probe_exchangeable = holds("exchangeable")
    batches.Evaluator._probe_multilinear = holds("multilinear")
    batches.KeyedGroups.probe = lambda self, ev: None
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(batches.Evaluator, k, v)
        batches.KeyedGroups.probe = saved_key


def run_all() -> float:
    t = time.perf_counter()
    for c in (CLAIMS.values() if isinstance(CLAIMS, dict) else CLAIMS):
        run_claim(c, "tabular", [0, 1])
    return time.perf_counter() - t


def main() -> None:
    run_all()                                                                 # warm-up (imports, caches)
    probed, trusted = [], []
    for _ in range(3):
        probed.append(run_all())
        with trusting():
            trusted.append(run_all())
    p, q = min(probed), min(trusted)
    print(f"tpg verify claims (tabular, seeds 0–1): with probes {p:.2f} s, probes disabled {q:.2f} s, "
          f"overhead {100 * (p / q - 1):+.1f} % (best of 3 each)")


if __name__ == "__main__":
    main()
