"""Sampler throughput: ``tpg.rollouts.sample`` vs a naive per-token Python loop (tabular policy).

    python benchmarks/bench_sampler.py [--responses 65536] [--threads N] [--repeats 3]

Tokens/s counts response tokens (EOS included) of complete sampled batches, rewards and
behaviour log-probs included. The naive loop decodes one response at a time, one token at a time,
through the same policy decoder and the same inverse-CDF draw; it is timed on a subsample and
extrapolated. A tabular policy needs one logit row per prefix state, so V = 8 with H = 16
(≈ 5·10^12 states) cannot exist: the configurations below are the largest comfortable ones.
Target: ≥ 10^6 tokens/s.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runnable from a checkout without installing
from tpg import TabularSoftmax, random_mdp
from tpg.rollouts import categorical, sample

CONFIGS = [  # (vocab_size with EOS, horizon): states = (A^H − 1)/(A − 1), A = V − 1
    (3, 16),   # 65 535 states
    (8, 6),    # 19 608 states
]
TARGET = 1e6


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Shortest wall time of ``repeats`` calls (the machine may be shared) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def naive_sample(mdp, policy, n: int, generator: torch.Generator) -> int:
    """n responses, one token at a time in Python; returns the number of tokens drawn."""
    pick = categorical(generator)
    tokens = 0
    for _ in range(n):
        dec = policy.decoder(torch.zeros(1, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long),
                             torch.zeros(1, dtype=torch.long))
        for t in range(mdp.horizon):
            tok = pick(dec.log_probs.detach())                               # (1,)
            tokens += 1
            if int(tok) == mdp.eos:
                break
            dec.advance(tok)
    return tokens


def run(V: int, H: int, n: int, repeats: int, naive_n: int) -> float:
    mdp = random_mdp(0, vocab_size=V, horizon=H, eos=True)
    policy = TabularSoftmax(mdp, seed=0)
    gen = torch.Generator().manual_seed(0)
    dt, ro = best_time(lambda: sample(mdp, policy, n, gen), repeats)
    n_tok = int(ro.mask.sum())
    fast = n_tok / dt
    dt_naive, tok_naive = best_time(lambda: naive_sample(mdp, policy, naive_n, gen), 1)
    slow = tok_naive / dt_naive
    print(f"V={V} (EOS) H={H} states={mdp.num_states:,}: {n:,} responses, {n_tok:,} tokens "
          f"(mean length {n_tok / n:.2f}) in {dt * 1e3:.1f} ms -> {fast:,.0f} tokens/s; "
          f"naive loop ({naive_n} responses, extrapolated) {slow:,.0f} tokens/s; "
          f"ratio {fast / slow:,.0f}x; target 1e6 tokens/s {'met' if fast >= TARGET else 'MISSED'}")
    return fast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--responses", type=int, default=2**16)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: run with 1 and with torch's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive", type=int, default=300, help="responses in the naive-loop subsample")
    args = ap.parse_args()
    # Each decoding step works on (B, V) tensors of a few hundred kB: intra-op threads mostly wait
    # on each other, so tpg's CLI and tests run single-threaded. Both settings are printed.
    for threads in [args.threads] if args.threads else sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)")
        for V, H in CONFIGS:
            run(V, H, args.responses, args.repeats, args.naive)


if __name__ == "__main__":
    main()
