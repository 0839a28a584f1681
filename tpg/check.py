"""``tpg check MODULE:FUNCTION``: the exact verdict on a user's own advantage or loss, from the shell.

The function is imported from a file (``path/to/file.py:fn``) or a module (``pkg.mod:fn``) and
called on a ``Rollouts`` batch (``ro.rm``, ``ro.mask``, ``ro.group``, ``ro.logp``, … as in
``tpg.report``). Its kind is decided from what it returns (or given with ``--kind``):

- an **advantage** returns ``(B, L)`` per-token or ``(B,)`` per-response values; it is judged as
  ``estimator(<it>, loss="pg", agg=--agg)``, i.e. −Σ w·A·log π (the on-policy PPO gradient);
- a **loss** returns a scalar (or an ``EstimatorOutput``) whose gradient with respect to
  ``ro.logp`` is −Σ c ∇log π; it is judged as it is.

Each verdict is the exact expectation over every possible batch of ``--G`` responses against the
exact ∇J on seeded MDPs (``--seeds``, one prompt, vocabulary {a, b, EOS}, H = 3: ZOO.md's set-up),
with the engine's probe notes (``Report.notes``). Exit status 0 when every verdict is "unbiased",
1 otherwise, 2 on bad input (one line on stderr).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

import torch

from tpg.mdp import TPGError

KINDS = ("auto", "advantage", "loss")
REWARDS = ("gaussian", "sparse", "binary")


def load_function(spec: str):
    """The callable named by ``path/to/file.py:fn`` or ``pkg.mod:fn`` (dots in fn reach attributes)."""
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rsplit(":", 1)[1]:
        raise TPGError(f"expected MODULE:FUNCTION (e.g. mymod:my_advantage or path/to/file.py:my_loss), got {spec!r}")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
        if not os.path.isfile(mod_name):
            raise TPGError(f"no such file {mod_name!r}")
        name = "tpg_check_" + os.path.splitext(os.path.basename(mod_name))[0]
        loader = importlib.util.spec_from_file_location(name, mod_name)
        if loader is None or loader.loader is None:
            raise TPGError(f"cannot import {mod_name!r} as a Python file")
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as e:
            raise TPGError(f"importing {mod_name!r} failed: {type(e).__name__}: {e}") from e
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise TPGError(f"cannot import module {mod_name!r}: {e}") from e
        except Exception as e:
            raise TPGError(f"importing {mod_name!r} failed: {type(e).__name__}: {e}") from e
    obj = module
    for part in fn_name.split("."):
        if not hasattr(obj, part):
            raise TPGError(f"{mod_name!r} has no attribute {fn_name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TPGError(f"{spec} is not callable (got {type(obj).__name__})")
    return obj


def _probe_batch(mdp, policy):
    """A small scored batch (two groups of responses) to see what the function returns."""
    from dataclasses import replace
    from tpg.rollouts import enumerate_responses
    e = enumerate_responses(mdp)
    rows = torch.arange(min(4, e.batch_size))
    ro = e.select(rows)
    ro = replace(ro, group=torch.tensor([0, 0, 1, 1][: len(rows)]), batch=torch.zeros(len(rows), dtype=torch.long),
                 n_batches=1, mdp=mdp)
    with torch.no_grad():
        lp = (policy.token_log_probs(ro.prompt_idx, ro.tokens) * ro.mask).to(torch.float64)
    return replace(ro, logp=lp.clone().requires_grad_(True), logp_old=lp, logp_rollout=lp)


def detect_kind(fn, mdp, policy) -> str:
    """"advantage" for (B, L) / (B,) outputs, "loss" for a scalar or an EstimatorOutput."""
    from tpg.estimators.core import EstimatorOutput
    ro = _probe_batch(mdp, policy)
    try:
        out = fn(ro)
    except TPGError:
        raise
    except Exception as e:
        raise TPGError(f"calling the function on a batch raised {type(e).__name__}: {e}") from e
    if isinstance(out, EstimatorOutput):
        return "loss"
    if not torch.is_tensor(out):
        raise TPGError(f"the function must return a tensor (advantages (B, L) or (B,), or a scalar loss), "
                       f"got {type(out).__name__}")
    B, L = ro.tokens.shape
    if out.numel() == 1 and B != 1:
        return "loss"
    if tuple(out.shape) in ((B, L), (B,)):
        return "advantage"
    raise TPGError(f"the function returned shape {tuple(out.shape)}: expected advantages (B, L) = ({B}, {L}) or "
                   f"(B,) = ({B},), or a scalar loss")


def as_estimator(fn, kind: str, agg: str, label: str):
    """The callable ``tpg.report`` judges: the loss itself, or the advantage composed with the
    linear policy-gradient loss and ``agg`` (registered under ``label``, undeclared: probed)."""
    if kind == "loss":
        return fn
    from tpg.estimators.core import estimator, register_advantage
    register_advantage(label, overwrite=True)(lambda ro, _fn=fn: _fn(ro))
    return estimator(label, loss="pg", agg=agg, label=label)


def _policy(kind: str, mdp, seed: int):
    from tpg.policies import LogLinear, TabularSoftmax
    return TabularSoftmax(mdp, seed=seed) if kind == "tabular" else LogLinear(mdp, seed=seed)


def run_cli(args) -> int:
    from tpg import random_mdp, validate
    from tpg.estimators.core import AGGREGATIONS
    from tpg.verify import report
    validate.check_output_path(args.json)
    validate.integer("--G", args.G, 1, 6)
    validate.integer("--seeds", args.seeds, 1, 100)
    validate.seed("--seed", args.seed)
    if args.agg not in AGGREGATIONS:
        raise TPGError(f"unknown --agg {args.agg!r}; choose one of {tuple(AGGREGATIONS)}")
    fn = load_function(args.target)
    rows, all_ok = [], True
    for seed in range(args.seed, args.seed + args.seeds):
        mdp = random_mdp(seed, vocab_size=3, horizon=3, n_prompts=1, reward=args.reward)
        pol = _policy(args.policy, mdp, seed)
        kind = detect_kind(fn, mdp, pol) if args.kind == "auto" else args.kind
        est = as_estimator(fn, kind, args.agg, f"check:{args.target}")
        r = report(est, mdp, pol, args.G, cov=None, name=args.target)
        all_ok &= r.verdict == "unbiased"
        d = dict(r.to_dict(), kind=kind, seed=seed, reward=args.reward, policy=args.policy, G=args.G)
        rows.append(d)
        print(f"{args.target} ({kind}{', agg ' + args.agg if kind == 'advantage' else ''}) on {args.reward} MDP "
              f"seed {seed}, {args.policy} policy, G = {args.G}: {r.verdict.upper()}"
              + (f" (scale c = {r.scale:.6g})" if r.verdict == "scaled" else "")
              + f"; rel. bias {r.rel_bias:.3e}, residual {r.residual:.3e}, cosine {r.cosine:.9f}, δ {r.roundoff:.1e}")
        for note in r.notes:
            print(f"    note: {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all_ok else 1


def add_parser(sub) -> None:
    s = sub.add_parser("check", help="exact verdict on your own advantage or loss function (MODULE:FUNCTION)")
    s.add_argument("target", metavar="MODULE:FUNCTION", help="pkg.mod:fn or path/to/file.py:fn; fn(ro) returns "
                   "advantages (B, L) | (B,) or a scalar loss")
    s.add_argument("--kind", default="auto", choices=KINDS, help="what fn returns (default: decided from its output)")
    s.add_argument("--agg", default="seq-mean-token-sum", help="aggregation for an advantage (default seq-mean-token-sum)")
    s.add_argument("--G", type=int, default=3, help="responses per prompt (default 3)")
    s.add_argument("--seeds", type=int, default=2, help="random MDPs (default 2)")
    s.add_argument("--seed", type=int, default=0, help="first seed")
    s.add_argument("--reward", default="gaussian", choices=REWARDS)
    s.add_argument("--policy", default="tabular", choices=["tabular", "loglinear"])
    s.add_argument("--json", metavar="PATH", help="also write the reports as JSON")
    s.set_defaults(fn=run_cli)
