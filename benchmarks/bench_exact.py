"""Exact ∇J of a tabular policy on ~10^6 responses, against a naive loop and a streaming pass.

    python benchmarks/bench_exact.py [--threads N] [--repeats 5] [--naive 2000] [--json]

Two MDPs (issue 2, item 7): V=4, H=10 fixed length (4^10 = 1,048,576 responses) and V=5 with EOS,
H=10 (4^10 + (4^10 − 1)/3 = 1,398,101 responses). For each it times (median of ``--repeats``):

- enum+grad: ``enumerate_responses`` (with rewards) followed by ``exact.gradient`` (autograd);
- grad: ``exact.gradient`` on an existing enumeration (the cost of every further ∇J at a new θ);
- naive: one autograd call per response (gather the response's H logit rows, log-softmax,
  log π(y|x), P(y)·RM, grad w.r.t. those rows, add into the table), timed on a random subsample and
  extrapolated to N; the subsample's gradient is checked against ``exact.gradient`` on the same rows;
- stream: one pass over the N×H log-prob array with precomputed indices, no autograd
  (log-softmax of the table, gather, masked sum over H: what computing log π(y|x) for every
  response costs at least). "2-D" gathers with (state, token) index pairs as written in the
  issue; "flat" gathers a precomputed s·V + y index (faster; the ratio target uses it).

Times are wall-clock; on a shared machine compare the ratios (both sides of each ratio are timed
back to back). Large fresh tensors cost first-touch page faults comparable to the arithmetic here;
PyTorch's THP_MEM_ALLOC_ENABLE=1 (transparent huge pages for large tensors) lowers them for ∇J and
the streaming pass alike: run with and without it to see the effect on a given machine.

Peak memory is the growth of the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs before each phase; ru_maxrss deltas where that is unavailable). The exact
gradient is also compared with the tabular closed form ρ(s) π(a|s) (U(s⊕a) − U(s)).
Targets: grad < 1 s, ≥ 100× faster than the naive loop, ≤ 5× the streaming pass.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runnable from a checkout without installing
from tpg import TabularSoftmax, exact, random_mdp
from tpg.rollouts import enumerate_responses

CASES = {  # name: random_mdp arguments
    "V=4 H=10 fixed": dict(vocab_size=4, horizon=10, eos=False),
    "V=5 H=10 EOS": dict(vocab_size=5, horizon=10, eos=True),
}
TARGET_S, TARGET_NAIVE, TARGET_STREAM = 1.0, 100.0, 5.0


# ------------------------------------------------------------------------------------ measurement
def median_time(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls (the machine may be shared) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise OSError("no VmHWM")


def _rss_kib() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() // 1024


def peak_mib(fn) -> tuple[float, object]:
    """(growth of the resident-set high-water mark during fn() in MiB, fn's result)."""
    try:                                             # Linux ≥ 4.0: writing 5 resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        before, out = _rss_kib(), fn()
        return (_hwm_kib() - before) / 1024, out
    except OSError:                                  # fall back on ru_maxrss (a lower bound if an earlier peak was higher)
        before, out = _rss_kib(), fn()
        return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, 0) / 1024, out


# --------------------------------------------------------------------------------------- baselines
def naive_gradient(mdp, pol: TabularSoftmax, enum, rows: torch.Tensor) -> torch.Tensor:
    """Σ over ``rows`` of ∇[ρ(x) π(y|x) RM(y)], one response and one autograd call at a time.

    Autograd differentiates w.r.t. the response's own H logit rows (a small leaf), which are then
    added into the table: a per-response loop that does not also pay a dense (S, V) gradient per
    backward (letting autograd accumulate into the full table is much slower). Runs on one thread:
    on tensors of H×V entries, waking a second thread costs more than the arithmetic.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # tiny tensors: thread wake-ups would dominate, not the loop
    logits = pol.logits.detach()
    grad = torch.zeros_like(logits)                                                # (S, V)
    lengths = enum.lengths
    rho = torch.as_tensor(mdp.prompt_probs)
    for i in rows.tolist():
        n = int(lengths[i])
        y = enum.tokens[i, :n]                                                     # (n,)
        s = mdp.state_index(enum.prompt_idx[i: i + 1], enum.tokens[i: i + 1])[0, :n]   # (n,) states before y_t
        z = logits[s].requires_grad_()                                            # (n, V) leaf
        logp = torch.log_softmax(z, -1)[torch.arange(n), y].sum()                 # log π(y|x)
        (g,) = torch.autograd.grad(rho[enum.prompt_idx[i]] * logp.exp() * enum.rm[i], z)
        grad.index_add_(0, s, g)
    torch.set_num_threads(threads)
    return grad.reshape(-1)


def streaming_pass(pol: TabularSoftmax, index, tokens, mask, fixed_length: bool) -> torch.Tensor:
    """(N,) log π(y|x) in one gather over the (N, H) array: ``index`` is (s, y) or the flat s·V + y."""
    with torch.no_grad():
        table = torch.log_softmax(pol.logits, -1)                                   # (S, V)
        if isinstance(index, tuple):
            lp = table[index]                                                       # (N, H) 2-D gather
        else:
            lp = table.view(-1).index_select(0, index.view(-1)).view(tokens.shape)  # (N, H) flat gather
        return lp.sum(1) if fixed_length else (lp * mask).sum(1)                    # (N,)


# ------------------------------------------------------------------------------------------ a case
def run_case(name: str, kw: dict, repeats: int, n_naive: int) -> dict:
    mdp = random_mdp(0, **kw)
    pol = TabularSoftmax(mdp, seed=0)
    N = mdp.num_responses
    mem_total, (enum, grad) = peak_mib(lambda: (lambda e: (e, exact.gradient(mdp, pol, e)))(enumerate_responses(mdp)))
    mem_grad, _ = peak_mib(lambda: exact.gradient(mdp, pol, enum))
    t_total, _ = median_time(lambda: exact.gradient(mdp, pol, enumerate_responses(mdp)), repeats)
    t_enum, _ = median_time(lambda: enumerate_responses(mdp), repeats)
    t_grad, _ = median_time(lambda: exact.gradient(mdp, pol, enum), repeats)

    tab = exact.tables(mdp, pol, enum)
    closed = tab.closed_form().reshape(-1)
    rel_closed = float((grad - closed).norm() / closed.norm())

    rows = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:n_naive]
    t_naive_sub, g_naive = median_time(lambda: naive_gradient(mdp, pol, enum, rows), 1)
    g_rows = exact.gradient(mdp, pol, enum.select(rows))
    rel_naive = float((g_naive - g_rows).norm() / g_rows.norm())
    t_naive = t_naive_sub * N / len(rows)                                           # extrapolated to all N

    s = mdp.state_index(enum.prompt_idx, enum.tokens)                               # (N, H), outside the timing
    flat = s * mdp.vocab_size + enum.tokens
    fixed = mdp.eos is None
    t_stream_2d, _ = median_time(lambda: streaming_pass(pol, (s, enum.tokens), enum.tokens, enum.mask, fixed), repeats)
    t_stream, lp = median_time(lambda: streaming_pass(pol, flat, enum.tokens, enum.mask, fixed), repeats)
    assert torch.allclose(lp.exp(), tab.prob / torch.as_tensor(mdp.prompt_probs)[enum.prompt_idx], rtol=1e-10)
    return dict(case=name, responses=N, enum_s=t_enum, enum_grad_s=t_total, grad_s=t_grad, peak_enum_grad_mib=mem_total,
                peak_grad_mib=mem_grad, nh_array_mib=N * mdp.horizon * 8 / 2**20, naive_s=t_naive,
                naive_rows=len(rows), stream_s=t_stream, stream_2d_s=t_stream_2d, rel_err_closed_form=rel_closed,
                rel_err_naive=rel_naive, naive_over_grad=t_naive / t_grad, naive_over_enum_grad=t_naive / t_total,
                grad_over_stream=t_grad / t_stream, grad_over_stream_2d=t_grad / t_stream_2d)


def report(r: dict) -> None:
    ok = lambda c: "met" if c else "MISSED"  # noqa: E731
    print(f"\n{r['case']}: {r['responses']:,} responses (one (N, H) float64 array = {r['nh_array_mib']:.0f} MiB)")
    print(f"  {'enumerate (with rewards)':<34}{r['enum_s']:8.3f} s")
    print(f"  {'enumerate + ∇J':<34}{r['enum_grad_s']:8.3f} s   peak +{r['peak_enum_grad_mib']:.0f} MiB")
    print(f"  {'∇J on an enumeration':<34}{r['grad_s']:8.3f} s   peak +{r['peak_grad_mib']:.0f} MiB")
    print(f"  {'naive per-response loop (extrap.)':<34}{r['naive_s']:8.1f} s   ({r['naive_rows']} responses timed)")
    print(f"  {'streaming pass, flat / 2-D gather':<34}{r['stream_s']:8.3f} s / {r['stream_2d_s']:.3f} s")
    print(f"  ratios: naive/∇J {r['naive_over_grad']:,.0f}× (naive/(enum+∇J) {r['naive_over_enum_grad']:,.0f}×), "
          f"∇J/stream {r['grad_over_stream']:.2f}× (vs 2-D gather {r['grad_over_stream_2d']:.2f}×)")
    print(f"  checks: ‖∇J − closed form‖/‖closed form‖ = {r['rel_err_closed_form']:.1e}; "
          f"naive subsample vs exact on the same rows {r['rel_err_naive']:.1e}")
    print(f"  targets: ∇J < {TARGET_S:g} s {ok(r['grad_s'] < TARGET_S)} (enum+∇J {ok(r['enum_grad_s'] < TARGET_S)}); "
          f"≥ {TARGET_NAIVE:g}× naive {ok(r['naive_over_grad'] >= TARGET_NAIVE)}; "
          f"≤ {TARGET_STREAM:g}× stream {ok(r['grad_over_stream'] <= TARGET_STREAM)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--naive", type=int, default=2000, help="responses in the naive-loop subsample")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), float64, median of {args.repeats} "
          f"runs, THP_MEM_ALLOC_ENABLE={thp}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = [run_case(name, kw, args.repeats, args.naive) for name, kw in CASES.items()]
    for r in results:
        report(r)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
