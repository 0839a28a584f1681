"""Injected bugs make ``tpg verify`` disagree (tpg issue 9: "bugs injected into any estimator, the exact
engine or the sampler make tpg verify disagree").

Each mutant is the library's own function with ONE line changed: its source is read with
``inspect.getsource``, the line is replaced (the test fails loudly if the line is gone, so the mutant
follows the code it mutates) and compiled in the module's namespace. It is then patched in EVERY place
the original is bound — module attributes (``from x import f`` copies the name) and registries (dicts
of functions or of specs holding one) — and the claims that cover that path are run through
``tpg.claims.run_claim``, the function ``tpg verify`` uses, on one seed: at least one must DISAGREE.
The control runs the same claims unpatched: all agree. (d) wraps ``tpg.exact.tables`` instead.
"""
from __future__ import annotations

import __future__
import dataclasses
import inspect
import sys
import textwrap

import pytest
import torch

from tpg import exact
from tpg.claims import CLAIMS, run_claim

SEEDS = [0]


# ====================================================================================== plumbing
def mutant(fn, old: str, new: str):
    """``fn`` recompiled with the one line containing ``old`` changed to contain ``new``."""
    src = textwrap.dedent(inspect.getsource(fn))
    lines = src.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("def "))   # drop decorators
    body = "\n".join(lines[start:]) + "\n"
    assert body.count(old) == 1, f"mutation target {old!r} not found once in {fn.__module__}.{fn.__name__}"
    ns = dict(sys.modules[fn.__module__].__dict__)
    code = compile(body.replace(old, new), f"<mutant of {fn.__qualname__}>", "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, ns)
    return ns[fn.__name__]


def patch_everywhere(monkeypatch, original, replacement) -> int:
    """Replace ``original`` by ``replacement`` in every tpg module attribute and registry entry (a dict
    value that is the function, or a dataclass in a dict with a field holding it). Returns the count."""
    n = 0
    for name, mod in list(sys.modules.items()):
        if not (name == "tpg" or name.startswith("tpg.")) or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                monkeypatch.setattr(mod, attr, replacement)
                n += 1
            elif isinstance(value, dict):
                for k, v in list(value.items()):
                    if v is original:
                        monkeypatch.setitem(value, k, replacement)
                        n += 1
                    elif dataclasses.is_dataclass(v) and not isinstance(v, type):
                        held = {f.name: replacement for f in dataclasses.fields(v) if getattr(v, f.name) is original}
                        if held:
                            monkeypatch.setitem(value, k, dataclasses.replace(v, **held))
                            n += 1
    return n


def verdicts(ids: list[str]) -> dict[str, bool]:
    return {cid: run_claim(CLAIMS[cid], "tabular", SEEDS).agree for cid in ids}


# ====================================================================================== the bugs
def ppo_min_max_swapped(monkeypatch):
    """(a) PPO clip: min where verl takes the max of the two branches."""
    from tpg.estimators import core
    bad = mutant(core.ppo_clip_loss, "loss = torch.maximum(l1, l2)", "loss = torch.minimum(l1, l2)")
    return patch_everywhere(monkeypatch, core.ppo_clip_loss, bad)


def gae_lambda_for_gamma_lambda(monkeypatch):
    """(b) GAE: λ where γλ belongs in Â_t = δ_t + γλ Â_(t+1)."""
    from tpg.estimators import gae
    bad = mutant(gae.gae_advantages, "a = delta + gamma * lam * last", "a = delta + lam * last")
    return patch_everywhere(monkeypatch, gae.gae_advantages, bad)


def interp_weights_swapped(monkeypatch):
    """(c) TRePO interp: weights (x, 1 − x) where (1 − x, x) belong."""
    from tpg.estimators import continuation
    bad = mutant(continuation.trepo, "((1 - x) * a_hat.gather(1, t_a) + x * a_hat.gather(1, t_b))",
                 "(x * a_hat.gather(1, t_a) + (1 - x) * a_hat.gather(1, t_b))")
    return patch_everywhere(monkeypatch, continuation.trepo, bad)


def root_visit_one(monkeypatch, propagate: bool):
    """(d) ρ(root) = 1 instead of ρ(x): the roots only, or (as the bug in the forward sweep would)
    their whole subtrees, ρ(s) / ρ(x_s)."""
    orig = exact.tables

    def bad(mdp, policy, *args, **kw):
        tab = orig(mdp, policy, *args, **kw)
        st = mdp.state_table()
        rho = torch.as_tensor(mdp.prompt_probs, dtype=torch.float64)[torch.as_tensor(st["prompt"])]
        roots = torch.as_tensor(st["level"]) == 0
        tab.visit = tab.visit / rho if propagate else torch.where(roots, torch.ones_like(tab.visit), tab.visit)
        return tab
    return patch_everywhere(monkeypatch, orig, bad)


def continuations_peek(monkeypatch):
    """(e) the sampler's continuations start one token later than the prefix (length p + 1)."""
    from tpg import rollouts
    bad = mutant(rollouts.continuation_rm, "r_idx, p_len = r_idx.repeat_interleave(K), p_len.repeat_interleave(K)",
                 "r_idx, p_len = r_idx.repeat_interleave(K), p_len.repeat_interleave(K) + 1")
    return patch_everywhere(monkeypatch, rollouts.continuation_rm, bad)


# bug → (injector, the claims that cover its path)
BUGS = {
    "a_ppo_min_max": (ppo_min_max_swapped, ["T14", "T19", "F7"]),
    "b_gae_lambda": (gae_lambda_for_gamma_lambda, ["T7", "T9", "T20", "F8"]),
    "c_interp_weights": (interp_weights_swapped, ["T21", "F9"]),
    "d_root_visit_roots": (lambda mp: root_visit_one(mp, False), ["T2", "T22"]),
    "d_root_visit_subtree": (lambda mp: root_visit_one(mp, True), ["T2", "T22"]),
    "e_continuations_peek": (continuations_peek, ["T15", "M2", "M3"]),
}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)              # as tpg verify runs the claims
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("bug", list(BUGS))
def test_injected_bug_makes_verify_disagree(bug, monkeypatch):
    inject, ids = BUGS[bug]
    assert inject(monkeypatch) >= 1, "the mutant was patched nowhere"
    agree = verdicts(ids)
    assert not all(agree.values()), f"bug {bug}: every claim still agrees: {agree}"


@pytest.mark.parametrize("bug", list(BUGS))
def test_the_same_claims_agree_without_the_bug(bug):
    _, ids = BUGS[bug]
    agree = verdicts(ids)
    assert all(agree.values()), f"control for {bug}: {agree}"


def test_the_mutants_are_one_line_changes():
    """A mutant differs from its original in the one replaced line only, and the replacement is
    required to exist: a renamed target fails here, naming the function."""
    from tpg.estimators import core
    with pytest.raises(AssertionError, match="not found"):
        mutant(core.ppo_clip_loss, "this line is not in the function", "x")
    bad = mutant(core.ppo_clip_loss, "loss = torch.maximum(l1, l2)", "loss = torch.minimum(l1, l2)")
    logp = torch.tensor([[0.5, -0.5]], dtype=torch.float64)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    good_loss, bad_loss = core.ppo_clip_loss(logp, old, adv), bad(logp, old, adv)
    assert torch.equal(torch.maximum(good_loss, bad_loss), good_loss) and not torch.equal(good_loss, bad_loss)
