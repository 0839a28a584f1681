"""The ``tpg`` command: info | verify | prove | train. Errors print one line, no traceback."""
from __future__ import annotations

import argparse
import os
import sys


def _info(args) -> int:
    import platform

    import numpy, scipy, sympy, torch
    import tpg
    print(f"tpg {tpg.__version__}  python {platform.python_version()}")
    for mod in (numpy, scipy, sympy, torch):
        print(f"  {mod.__name__:12s} {mod.__version__}")
    try:
        import transformers
        print(f"  {'transformers':12s} {transformers.__version__}")
    except ImportError:
        print("  transformers  not installed (needed only for --policy gpt2: pip install -e '.[lm]')")
    x = torch.ones(1, dtype=torch.float64)
    eps = torch.finfo(torch.float64).eps
    ok = x.dtype == torch.float64 and float((x + eps) - x) == eps
    print(f"  float64 check: {'ok' if ok else 'FAILED'} (eps = {eps:.3e}); CUDA available: {torch.cuda.is_available()}")
    return 0 if ok else 1


def _verify(args) -> int:
    from tpg.claims import run_cli
    return run_cli(args)


def _prove(args) -> int:
    from tpg.symbolic import run_cli
    return run_cli(args)


def _train(args) -> int:
    from tpg.train import run_cli
    return run_cli(args)


def _figures(args) -> int:
    from tpg.figures import run_cli
    return run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpg", description="Exact verification of LLM policy-gradient estimators "
                                "on small token MDPs (PAPER: 'Response-Level Rewards Are All You Need').")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("info", help="versions and a float64 check")
    s.set_defaults(fn=_info)
    s = sub.add_parser("verify", help="check the paper's claims exactly on seeded random MDPs (the main job)")
    s.add_argument("--claims", nargs="+", metavar="ID", help="only these claim ids (e.g. T1 T12 F3)")
    s.add_argument("--policy", default="tabular", choices=["tabular", "loglinear", "gpt2"])
    s.add_argument("--seeds", type=int, default=2, help="random MDPs per claim (default 2)")
    s.add_argument("--seed", type=int, default=0, help="first seed")
    s.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    s.add_argument("--list", action="store_true", help="list the claims and exit")
    s.set_defaults(fn=_verify)
    s = sub.add_parser("prove", help="prove the identities symbolically (sympy)")
    s.add_argument("ids", nargs="*", metavar="ID", help="identity ids (default: all)")
    s.add_argument("--list", action="store_true", help="list the identities and exit")
    s.set_defaults(fn=_prove)
    s = sub.add_parser("train", help="RL fine-tuning demo with exact J tracking")
    s.add_argument("--policy", default="tabular", choices=["tabular", "loglinear", "gpt2"])
    s.add_argument("--algo", default="rloo")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--G", type=int, default=4, help="responses per prompt")
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", metavar="PATH", help="write the training log as JSON")
    s.set_defaults(fn=_train)
    s = sub.add_parser("figures", help="regenerate the paper figures (PNG, PDF and their JSON data)")
    s.add_argument("names", nargs="*", metavar="NAME", help="figure names (default: all; --list shows them)")
    s.add_argument("--fast", action="store_true", help="reduced sizes, for CI (default out: figures/fast/)")
    s.add_argument("--jobs", type=int, default=1, help="parallel workers for the sweeps (joblib)")
    s.add_argument("--backend", default="loky", choices=["loky", "ray"], help="joblib backend (ray: if installed)")
    s.add_argument("--out", metavar="DIR", help="output folder (default: figures/ at the repository root)")
    s.add_argument("--replot", action="store_true", help="redraw from the saved JSON data, no recomputation")
    s.add_argument("--list", action="store_true", help="list the figures and exit")
    s.set_defaults(fn=_figures)
    from tpg.zoo import add_parser as _zoo_parser        # `tpg zoo` (tpg/zoo.py owns its options)
    _zoo_parser(sub)
    from tpg.check import add_parser as _check_parser    # `tpg check MODULE:FUNCTION` (tpg/check.py)
    _check_parser(sub)
    return p


MAX_SEEDS = 10_000          # --seeds: more random MDPs per claim than any run could finish
MAX_THREADS = 1024


def _threads() -> int:
    """TPG_THREADS (default 1): tpg's tensors are small, and intra-op threads cost more in hand-offs
    than they save (3–10× on 2 cores, benchmarks/bench_sampler.py)."""
    from tpg import validate
    raw = os.environ.get("TPG_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        raise validate.TPGError(f"TPG_THREADS must be an int in [1, {MAX_THREADS}], got {raw!r}") from None
    return validate.integer("TPG_THREADS", n, 1, MAX_THREADS)


def _check_args(args) -> None:
    """What can be refused before any work: seeds (torch and numpy need [0, 2**63); a claim runs
    seeds seed … seed + seeds − 1) and the output path (a long run must not fail at its end).
    The subcommands check their other options themselves, also before any work."""
    from tpg import validate
    if args.cmd in ("verify", "train"):
        validate.seed("--seed", args.seed)
        validate.check_output_path(args.json)
    if args.cmd == "verify":
        validate.integer("--seeds", args.seeds, 1, MAX_SEEDS)
        validate.integer("--seed + --seeds − 1 (the last seed)", args.seed + args.seeds - 1, 0, validate.SEED_MAX)


def _quiet_stdout() -> None:
    """The reader of our stdout went away (``tpg verify --list | head -1``): send what is still
    buffered to /dev/null, so the interpreter's final flush cannot raise BrokenPipeError again
    (the recipe of the Python docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):     # stdout replaced by an object without a file
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit status: 0 ok, 1 a claim disagrees, 2 bad input (one line on stderr),
    3 a bug in tpg, 130 interrupted, 141 stdout closed early (as for a process killed by SIGPIPE).
    TPG_DEBUG=1 re-raises instead, with the traceback."""
    args = build_parser().parse_args(argv)
    from tpg.validate import TPGError
    try:
        import torch
        torch.set_num_threads(_threads())
        _check_args(args)
        status = int(args.fn(args) or 0)
        sys.stdout.flush()                            # a closed pipe surfaces here, not at exit
        return status
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except TPGError as e:
        if os.environ.get("TPG_DEBUG"):
            raise
        print(f"tpg {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: say so in one line unless the user asks for more
        if os.environ.get("TPG_DEBUG"):
            raise
        print(f"tpg {args.cmd}: internal error: {type(e).__name__}: {e} "
              "(this is a bug in tpg; rerun with TPG_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
