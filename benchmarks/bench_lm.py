"""Benchmarks for the tiny GPT-2 policy (issue 6). Prints ratios against bare baselines.

1. Exact ∇J over 4096 responses (V = 4, no EOS, H = 6, one prompt; float64): tpg's path
   (``tpg.exact.gradient``: one teacher-forced forward through the enumeration, J = Σ P(y) RM(y),
   one backward) and the exact REINFORCE expectation (``tpg.exact.moments``, the estimator path:
   tables + per-batch coefficients + one weighted backward) versus a bare forward + backward of
   the same ``GPT2LMHeadModel`` on the same 4096 token sequences (HF forward over [BOS] ⊕ x ⊕ y,
   cross-entropy on the response tokens, backward). Target for ``exact.gradient``: ≤ 1.2×.
2. Sampling with the KV cache versus recomputing the whole sequence at every step (the same
   decoder with ``kv_cache=False``), same seed, identical samples (asserted).

Timings are the minimum over ``--repeat`` runs after a warm-up. Usage:
    python benchmarks/bench_lm.py [--threads 1] [--repeat 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runnable from a checkout without installing
from tpg import estimator, exact, random_mdp
from tpg.lm import GPT2Policy
from tpg.rollouts import enumerate_responses, sample


def best_times(fns: dict, repeat: int) -> dict:
    """Minimum wall time of each function over ``repeat`` rounds, the functions interleaved within
    each round (so drifting machine load hits all of them alike), after one warm-up round."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def bare_forward_backward(policy: GPT2Policy, enum) -> None:
    """What any LM trainer does on these tokens: HF forward over the full sequences, cross-entropy
    of the response tokens, backward. No tpg code on the path."""
    model = policy.model
    ctx = policy.ctx_ids[enum.prompt_idx]                                  # (N, C) [BOS] ⊕ x
    ids = torch.cat([ctx, enum.tokens], 1)                                 # (N, C + H)
    C = ctx.shape[1]
    logits = model(ids).logits[:, C - 1:-1]                                # (N, H, V + 1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), enum.tokens.reshape(-1))
    model.zero_grad(set_to_none=True)
    loss.backward()


def tpg_gradient(mdp, policy, enum) -> None:
    exact.gradient(mdp, policy, enum)


def tpg_moments(mdp, policy) -> None:
    exact.moments(estimator("reinforce"), mdp, policy, G=1)


def bench_exact(repeat: int) -> None:
    mdp = random_mdp(0, vocab_size=4, horizon=6, eos=False, n_prompts=1)
    policy = GPT2Policy(mdp, seed=0)
    enum = enumerate_responses(mdp)
    assert enum.batch_size == 4096
    t = best_times({"bare": lambda: bare_forward_backward(policy, enum),
                    "grad": lambda: tpg_gradient(mdp, policy, enum),
                    "grad_enum": lambda: exact.gradient(mdp, policy),
                    "moments": lambda: tpg_moments(mdp, policy)}, repeat)
    t_bare, t_grad, t_grad_enum, t_mom = t["bare"], t["grad"], t["grad_enum"], t["moments"]
    D = sum(p.numel() for p in policy.parameters())
    print(f"exact ∇J over {enum.batch_size} responses, GPT-2 (2 layers, n_embd 32, {D} parameters, float64):")
    print(f"  bare HF forward+backward          {t_bare * 1e3:8.1f} ms   (1.00×)")
    print(f"  tpg.exact.gradient (enum given)   {t_grad * 1e3:8.1f} ms   ({t_grad / t_bare:.2f}×, target ≤ 1.2×)")
    print(f"  tpg.exact.gradient (enumerating)  {t_grad_enum * 1e3:8.1f} ms   ({t_grad_enum / t_bare:.2f}×)")
    print(f"  tpg.exact.moments(REINFORCE, G=1) {t_mom * 1e3:8.1f} ms   ({t_mom / t_bare:.2f}×)")


def bench_sampling(repeat: int, horizon: int, n: int) -> None:
    mdp = _big(horizon)
    kw = dict(seed=0, dtype=torch.float32)
    cached, full = GPT2Policy(mdp, **kw), GPT2Policy(mdp, kv_cache=False, **kw)
    run = lambda p: sample(mdp, p, 8, torch.Generator().manual_seed(0), n_prompts=n // 8)   # noqa: E731
    a, b = run(cached), run(full)
    assert torch.equal(a.tokens, b.tokens), "KV-cached and uncached sampling drew different responses"
    t = best_times({"kv": lambda: run(cached), "full": lambda: run(full)}, repeat)
    t_kv, t_full = t["kv"], t["full"]
    print(f"sampling {n} responses, V = 64, H = {horizon} (mean length {float(a.lengths.float().mean()):.1f}), "
          f"GPT-2 float32: KV cache {t_kv * 1e3:.0f} ms, full recompute {t_full * 1e3:.0f} ms, "
          f"speed-up {t_full / t_kv:.2f}×")


def _big(horizon: int):
    """V = 64 with EOS, 4 prompts of 4 tokens, a response-level reward (cheap callable)."""
    from tpg import TokenMDP
    prompts = [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16)]
    return TokenMDP(prompts, 64, horizon, eos=63, response_rewards=lambda x, y: float(len(y)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    bench_exact(args.repeat)
    for H in (16, 64):
        bench_sampling(args.repeat, H, 512)


if __name__ == "__main__":
    main()
