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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    # tpg's tensors are small: intra-op threads cost more in hand-offs than they save (3–10× on
    # 2 cores, benchmarks/bench_sampler.py). TPG_THREADS overrides.
    torch.set_num_threads(int(os.environ.get("TPG_THREADS", "1")))
    from tpg.mdp import TPGError
    try:
        return int(args.fn(args) or 0)
    except TPGError as e:
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
