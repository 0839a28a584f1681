"""Running the claims: ``select``, ``run_claim`` (the one function ``tpg verify`` and the tests use),
the terminal table, ``--json``, and ``render_table`` (the table as text, for the README)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from tpg.claims.base import ALL_POLICIES, CLAIMS, MARGIN, Claim, Result
from tpg.mdp import TPGError, check_output_path
from tpg.verify import RTOL


@dataclass
class ClaimRun:
    claim: Claim
    results: list[Result]

    @property
    def agree(self) -> bool:
        return all(r.agree for r in self.results)

    def worst(self) -> Result:
        """The seed that came closest to contradicting the claim (largest gap / smallest bias)."""
        bad = [r for r in self.results if not r.agree]
        if bad:
            return bad[0]
        if self.claim.truth == "true":
            return max(self.results, key=lambda r: r.score)
        if self.claim.truth == "false":
            return min(self.results, key=lambda r: r.score)
        return self.results[0]


def select(ids: list[str] | None) -> list[Claim]:
    if not ids:
        return list(CLAIMS.values())
    want = [i.upper() for i in ids]
    unknown = [i for i in want if i not in CLAIMS]
    if unknown:
        raise TPGError(f"unknown claim id(s) {', '.join(unknown)}; valid ids: {' '.join(CLAIMS)}")
    return [CLAIMS[i] for i in dict.fromkeys(want)]


def run_claim(claim: Claim, policy: str, seeds: list[int]) -> ClaimRun:
    """Run one claim on several seeds; an exception in a check is a disagreement, reported."""
    results = []
    for s in seeds:
        t0 = time.perf_counter()
        try:
            results.append(claim.check(s, policy))
        except Exception as e:  # noqa: BLE001 — reported as a disagreement with its message
            results.append(Result(claim.id, s, policy, claim.expected, f"error: {type(e).__name__}", False,
                                  str(e).split("\n")[0][:200], math.nan, {}, [], time.perf_counter() - t0))
    return ClaimRun(claim, results)


def format_row(run: ClaimRun) -> str:
    r = run.worst()
    note = f"  [failed: {'; '.join(r.failed())}]" if r.failed() else ""
    return (f"{run.claim.id:<4} {run.claim.expected:<9} {r.verdict:<9} {'agree' if run.agree else 'DISAGREE':<8} "
            f"{r.figure}{note}")


def run_cli(args) -> int:
    """``tpg verify``: the claims on seeded random MDPs, a table, optional JSON; exit 1 on any disagreement."""
    claims = select(args.claims)
    if args.list:
        for c in claims:
            only = "" if c.policies == ALL_POLICIES else f"  [{', '.join(c.policies)} only]"
            print(f"{c.id:<4} {c.expected:<9} {c.statement} ({c.equation}){only}")
        return 0
    if not isinstance(args.seeds, int) or args.seeds < 1:
        raise TPGError(f"--seeds must be ≥ 1, got {args.seeds!r}")
    if not isinstance(args.seed, int) or args.seed < 0:
        raise TPGError(f"--seed must be an int ≥ 0, got {args.seed!r}")
    check_output_path(args.json)
    if args.policy == "gpt2":
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise TPGError(f"--policy gpt2 needs transformers ({e}); install with: pip install -e '.[lm]'") from e
    seeds = list(range(args.seed, args.seed + args.seeds))
    with _one_thread():
        return _run(claims, args, seeds)


def table_lines(claims: list[Claim], policy: str, seeds: list[int], runs: list | None = None,
                skipped: list | None = None) -> Iterable[str]:
    """The ``tpg verify`` table line by line (header, one row per claim, summary), running each claim
    as its row is reached; ``runs``/``skipped`` collect the ClaimRuns and the skipped claims."""
    runs = [] if runs is None else runs
    skipped = [] if skipped is None else skipped
    t0 = time.perf_counter()
    yield (f"tpg verify: {len(claims)} claims × {len(seeds)} seeded MDPs (seeds {seeds[0]}–{seeds[-1]}), "
           f"policy {policy}; TRUE claims to rtol {RTOL:g}, FALSE claims need a bias > {MARGIN:g}")
    yield f"{'id':<4} {'expected':<9} {'verdict':<9} {'result':<8} measured (worst seed)"
    for c in claims:
        if policy not in c.policies:
            skipped.append({"id": c.id, "reason": c.why_not})
            yield f"{c.id:<4} {c.expected:<9} {'-':<9} {'skipped':<8} not for --policy {policy}: {c.why_not}"
            continue
        run = run_claim(c, policy, seeds)
        runs.append(run)
        yield format_row(run)
    n_ok = sum(r.agree for r in runs)
    extra = f", {len(skipped)} skipped" if skipped else ""
    yield (f"{len(runs)} claims: {n_ok} agree, {len(runs) - n_ok} disagree{extra} "
           f"({time.perf_counter() - t0:.1f} s)")


def render_table(policy: str = "tabular", seeds: Iterable[int] = (0, 1), ids: list[str] | None = None) -> str:
    """The ``tpg verify`` table as text (as the README shows it), without printing."""
    with _one_thread():
        return "\n".join(table_lines(select(ids), policy, list(seeds))) + "\n"


class _one_thread:
    """Tiny tensors: thread hand-offs cost more than they save (≈ 5× here), so claims run on one thread."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _run(claims: list[Claim], args, seeds: list[int]) -> int:
    t0 = time.perf_counter()
    runs, skipped = [], []
    for line in table_lines(claims, args.policy, seeds, runs, skipped):
        print(line, flush=True)
    if args.json:
        write_json(args.json, runs, skipped, args.policy, seeds, time.perf_counter() - t0)
    return 0 if all(r.agree for r in runs) else 1


def write_json(path: str, runs: list[ClaimRun], skipped: list[dict], policy: str, seeds: list[int], secs: float):
    doc = {"policy": policy, "seeds": seeds, "rtol": RTOL, "margin": MARGIN, "seconds": secs,
           "summary": {"claims": len(runs), "agree": sum(r.agree for r in runs),
                       "disagree": sum(not r.agree for r in runs), "skipped": len(skipped)},
           "claims": [{"id": r.claim.id, "statement": r.claim.statement, "equation": r.claim.equation,
                       "expected": r.claim.expected, "agree": r.agree, "verdict": r.worst().verdict,
                       "figure": r.worst().figure, "results": [x.to_dict() for x in r.results]} for r in runs],
           "skipped": skipped}
    try:
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, default=_json_default)
    except OSError as e:
        raise TPGError(f"cannot write --json {path}: {e}") from e
    print(f"wrote {path}")


def _json_default(x):
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
