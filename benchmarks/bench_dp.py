"""∇J by dynamic programming over the state table vs by enumeration, and ∇J at ~10^8 responses.

    python benchmarks/bench_dp.py [--threads N] [--repeats 7] [--no-big] [--tables] [--json]

Issue 10, item 4. Small cases (V=4, H=10 fixed length: 1,048,576 responses, 349,525 states; V=5,
H=10 with EOS: 1,398,101 responses), tabular softmax, float64; per repeat every variant runs once,
back to back (so a change in the machine's load hits all of them), and each ratio is the median of
the per-repeat ratios:

- dp: ``exact.gradient(mdp, pol)`` (the default route: closed-form weights on the score of the
  (S, V) log-prob table, one backward pass), the public call with its argument validation;
- enumerate: ``exact.gradient(mdp, pol, route="enumerate")`` (enumeration included) and
  ``exact.gradient(mdp, pol, enum)`` on an existing enumeration (each further ∇J at a new θ);
- one pass: ``torch.log_softmax(logits, -1).gather(1, idx)`` over the (S, V) table (the issue's
  "one pass over the state table"); also the policy's own forward + backward alone
  (``state_log_probs`` and its vector-Jacobian product), which any autograd route must pay.

Targets: dp ≥ 10× faster than enumeration, dp ≤ 2× one pass.

Big case (V=4, H=13 fixed: 4^13 = 67,108,864 responses, 22,369,621 states, 89,478,484 state-table
entries, the issue's example; a tabular policy cannot hold 10^8 responses under the 10^8-entry table
budget, since S·V > N): ``exact.gradient`` wall and CPU time (target < 10 s; on a shared machine the
process's CPU time is what an idle core would take) and its peak memory: the growth of the
resident-set high-water mark over the RSS before the call (VmHWM reset through /proc/self/clear_refs),
and that plus the RSS before (the MDP's reward table and the policy's logits, 716 MB each, included). Checks: each state's gradient row sums to 0 (softmax), and ∇J·d
matches a central difference of the DP's J along a random direction. ``--tables`` also times
``exact.tables`` there.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runnable from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_exact import _rss_kib, peak_mib  # noqa: E402  (the same RSS measurement as bench_exact)

from tpg import TabularSoftmax, exact, random_mdp  # noqa: E402
from tpg.rollouts import enumerate_responses  # noqa: E402

CASES = {"V=4 H=10 fixed": dict(vocab_size=4, horizon=10, eos=False),
         "V=5 H=10 EOS": dict(vocab_size=5, horizon=10, eos=True)}
BIG = dict(vocab_size=4, horizon=13, eos=False)
TARGET_ENUM, TARGET_PASS, TARGET_BIG_S = 10.0, 2.0, 10.0


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Wall times (s) of each function, ``repeats`` rounds, every function once per round."""
    for f in fns.values():                                                       # warm-up
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of t_a / t_b (both timed in the same round)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def run_small(name: str, kw: dict, repeats: int) -> dict:
    mdp = random_mdp(0, **kw)
    pol = TabularSoftmax(mdp, seed=0)
    S, V = mdp.num_states, mdp.vocab_size
    enum = enumerate_responses(mdp)
    idx = torch.randint(0, V, (S, 1), generator=torch.Generator().manual_seed(0))      # (S, 1)
    params = [pol.logits]
    g_dp = exact.gradient(mdp, pol)
    g_en = exact.gradient(mdp, pol, enum)
    rel = float((g_dp - g_en).norm() / g_en.norm())

    def policy_fwd_bwd():
        lp = pol.state_log_probs()                                                       # (S, V)
        return torch.autograd.grad(lp, params, grad_outputs=torch.ones_like(lp))

    fns = {
        "dp": lambda: exact.gradient(mdp, pol),
        "enum_on_enum": lambda: exact.gradient(mdp, pol, enum),
        "one_pass": lambda: torch.log_softmax(pol.logits.detach(), -1).gather(1, idx),
        "policy_fwd_bwd": policy_fwd_bwd,
    }
    t = interleaved(fns, repeats)
    t_full = interleaved({"dp": fns["dp"], "enum_full": lambda: exact.gradient(mdp, pol, route="enumerate")},
                         max(3, repeats // 2))
    med = {k: statistics.median(v) for k, v in {**t, "enum_full": t_full["enum_full"]}.items()}
    return dict(case=name, responses=mdp.num_responses, states=S, entries=S * V, rel_err_dp_vs_enum=rel,
                **{f"{k}_s": v for k, v in med.items()},
                enum_over_dp=ratio(t, "enum_on_enum", "dp"), enum_full_over_dp=ratio(t_full, "enum_full", "dp"),
                dp_over_one_pass=ratio(t, "dp", "one_pass"), policy_over_one_pass=ratio(t, "policy_fwd_bwd", "one_pass"),
                dp_over_policy=ratio(t, "dp", "policy_fwd_bwd"))


def run_big(with_tables: bool) -> dict:
    t0 = time.perf_counter()
    mdp = random_mdp(0, **BIG)
    pol = TabularSoftmax(mdp, seed=0)
    t_build = time.perf_counter() - t0
    rss_inputs = _rss_kib() / 1024
    t0, c0 = time.perf_counter(), time.process_time()
    peak, g = peak_mib(lambda: exact.gradient(mdp, pol))
    t_grad, c_grad = time.perf_counter() - t0, time.process_time() - c0
    rows = g.view(mdp.num_states, mdp.vocab_size).sum(1)                                 # (S,) softmax: Σ_a = 0
    row_sum = float(rows.abs().max() / g.abs().max())
    d = torch.randn(g.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d /= d.norm()
    theta, eps = pol.logits.detach().clone(), 1e-4
    vals = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            pol.logits.copy_(theta + sign * eps * d.view_as(theta))
            vals.append(float(exact.objective(mdp, pol)))
        pol.logits.copy_(theta)
    fd, dg = (vals[0] - vals[1]) / (2 * eps), float(d @ g)
    out = dict(case="V=4 H=13 fixed", responses=mdp.num_responses, states=mdp.num_states,
               entries=mdp.num_states * mdp.vocab_size, build_s=t_build, grad_s=t_grad, grad_cpu_s=c_grad, peak_grad_mib=peak,
               rss_before_mib=rss_inputs, row_sum_rel=row_sum, fd=fd, grad_dot_d=dg,
               fd_rel_err=abs(fd - dg) / max(abs(dg), 1e-300))
    del g
    if with_tables:
        rss = _rss_kib() / 1024
        t0, c0 = time.perf_counter(), time.process_time()
        peak_t, tab = peak_mib(lambda: exact.tables(mdp, pol))
        out.update(tables_s=time.perf_counter() - t0, tables_cpu_s=time.process_time() - c0, peak_tables_mib=peak_t,
                   rss_before_tables_mib=rss)
        del tab
    return out


def report_small(r: dict) -> None:
    ok = lambda c: "met" if c else "MISSED"  # noqa: E731
    print(f"\n{r['case']}: {r['responses']:,} responses, {r['states']:,} states, {r['entries']:,} state-table entries")
    print(f"  {'∇J by DP (exact.gradient)':<44}{r['dp_s'] * 1e3:9.1f} ms")
    print(f"  {'∇J by enumeration, enumerating included':<44}{r['enum_full_s'] * 1e3:9.1f} ms")
    print(f"  {'∇J by enumeration on an enumeration':<44}{r['enum_on_enum_s'] * 1e3:9.1f} ms")
    print(f"  {'one pass: log-softmax + gather over (S, V)':<44}{r['one_pass_s'] * 1e3:9.1f} ms")
    print(f"  {'policy table forward + backward alone':<44}{r['policy_fwd_bwd_s'] * 1e3:9.1f} ms")
    print(f"  ratios: enumeration/DP {r['enum_over_dp']:.1f}× (enumerating included {r['enum_full_over_dp']:.1f}×); "
          f"DP/one pass {r['dp_over_one_pass']:.2f}×; policy fwd+bwd/one pass {r['policy_over_one_pass']:.2f}×; "
          f"DP/policy fwd+bwd {r['dp_over_policy']:.2f}×")
    print(f"  check: ‖∇J_dp − ∇J_enum‖/‖∇J_enum‖ = {r['rel_err_dp_vs_enum']:.1e}")
    print(f"  targets: ≥ {TARGET_ENUM:g}× faster than enumeration {ok(r['enum_over_dp'] >= TARGET_ENUM)}; "
          f"≤ {TARGET_PASS:g}× one pass {ok(r['dp_over_one_pass'] <= TARGET_PASS)}")


def report_big(r: dict) -> None:
    ok = lambda c: "met" if c else "MISSED"  # noqa: E731
    print(f"\n{r['case']}: {r['responses']:,} responses, {r['states']:,} states, {r['entries']:,} state-table entries")
    print(f"  build MDP (reward table) + policy: {r['build_s']:.1f} s, RSS then {r['rss_before_mib']:,.0f} MiB")
    print(f"  ∇J by DP: {r['grad_s']:.2f} s wall, {r['grad_cpu_s']:.2f} s CPU; peak +{r['peak_grad_mib']:,.0f} MiB over "
          f"that (process {r['rss_before_mib'] + r['peak_grad_mib']:,.0f} MiB)  target < {TARGET_BIG_S:g} s: "
          f"wall {ok(r['grad_s'] < TARGET_BIG_S)}, CPU {ok(r['grad_cpu_s'] < TARGET_BIG_S)}")
    if "tables_s" in r:
        print(f"  all tables by DP: {r['tables_s']:.2f} s wall, {r['tables_cpu_s']:.2f} s CPU; peak "
              f"+{r['peak_tables_mib']:,.0f} MiB (process {r['rss_before_tables_mib'] + r['peak_tables_mib']:,.0f} MiB)")
    print(f"  checks: max |Σ_a ∂J/∂θ[s, a]| / max |∂J/∂θ| = {r['row_sum_rel']:.1e}; ∇J·d = {r['grad_dot_d']:.6e} vs "
          f"central difference {r['fd']:.6e} (rel. {r['fd_rel_err']:.1e})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-big", action="store_true", help="skip the 6.7·10^7-response case")
    ap.add_argument("--tables", action="store_true", help="also time exact.tables on the big case")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), float64, {args.repeats} rounds, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    results = [run_small(name, kw, args.repeats) for name, kw in CASES.items()]
    for r in results:
        report_small(r)
    if not args.no_big:
        results.append(run_big(args.tables))
        report_big(results[-1])
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
