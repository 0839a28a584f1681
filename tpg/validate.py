"""Argument validation for every public entry point: one definition of "an int", "a number in (0, 1]", …

Every check raises a ``TPGError`` (a ``ValueError``) whose message names the argument, says what is
allowed and shows what was passed: ``"group size G must be an int ≥ 1, got 1.5 (float)"``. A value
of the wrong *type* raises ``TPGTypeError``, which is also a ``TypeError``, so callers catching
either keep working. Checks run before any work is done, so a refused call costs nothing.

This is the lowest layer of tpg (DESIGN §3, tests/test_layering.py): it imports no other tpg module.
The checks of tpg objects (an MDP, a policy) therefore test their interface (the attributes the rest
of tpg reads), which also admits a user's own ``nn.Module`` policy that follows the protocol.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Sequence

import numpy as np
import torch

SEED_MAX = 2**63 - 1      # torch.Generator.manual_seed and numpy both accept every seed in [0, 2**63)


class TPGError(ValueError):
    """A user-facing error: the message says what is wrong and what to do."""


class TPGTypeError(TPGError, TypeError):
    """An argument of the wrong type (a ``TypeError`` too, as Python's own checks raise)."""


class BudgetError(TPGError):
    """An exact computation was refused before allocating because it is too large."""


# ------------------------------------------------------------------------------ predicates
def is_int(x) -> bool:
    """An integer that is not a bool (numpy integers included; numpy bools and floats are not)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_real(x) -> bool:
    """A finite real number that is not a bool (numpy scalars included; an int beyond float range
    is not finite as a float)."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) and _finite(x)


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:                                             # an int of more than ~308 digits
        return False


def in_interval(x: float, lo: float | None, hi: float | None, bounds: str = "[]") -> bool:
    """lo ≤ x ≤ hi with each end open or closed as ``bounds`` says: "[]", "(]", "[)" or "()"."""
    above = lo is None or (x > lo if bounds[0] == "(" else x >= lo)
    below = hi is None or (x < hi if bounds[1] == ")" else x <= hi)
    return above and below


def show(x: Any, with_type: bool = False) -> str:
    """A short repr of a passed value for an error message (long ones are cut)."""
    if isinstance(x, int) and x.bit_length() > 256:                  # repr refuses ints beyond 4,300 digits
        r = f"~{'-' if x < 0 else ''}10^{x.bit_length() * math.log10(2):.0f}"
    else:
        r = repr(x)
    r = r if len(r) <= 80 else r[:77] + "..."
    return f"{r} ({type(x).__name__})" if with_type else r


def _fail(name: str, allowed: str, x, why: str = "", type_error: bool = False):
    cls = TPGTypeError if type_error else TPGError
    raise cls(f"{name} must be {allowed}{why}, got {show(x, with_type=type_error)}")


def _number_text(lo, hi, bounds: str) -> str:
    """"a number in (0, 1]", "a finite number ≥ 0", "a finite number": what ``real`` allows."""
    if lo is not None and hi is not None:
        return f"a number in {bounds[0]}{lo:g}, {hi:g}{bounds[1]}"
    if lo is not None:
        return f"a finite number {'>' if bounds[0] == '(' else '≥'} {lo:g}"
    if hi is not None:
        return f"a finite number {'<' if bounds[1] == ')' else '≤'} {hi:g}"
    return "a finite number"


# ------------------------------------------------------------------------------ scalars
def integer(name: str, x, min: int | None = None, max: int | None = None, *, why: str = "",
            none_ok: bool = False) -> int | None:
    """``x`` as a Python int, checked to lie in [min, max]. Bools and floats (even 2.0) are refused:
    a count given as a float is a bug at the call site."""
    if none_ok and x is None:
        return None
    allowed = ("None or " if none_ok else "") + "an int" + (
        f" in [{min}, {max}]" if min is not None and max is not None else
        f" ≥ {min}" if min is not None else f" ≤ {max}" if max is not None else "")
    if not is_int(x):
        _fail(name, allowed, x, why, type_error=True)
    if (min is not None and x < min) or (max is not None and x > max):
        _fail(name, allowed, x, why)
    return int(x)


def real(name: str, x, lo: float | None = None, hi: float | None = None, bounds: str = "[]", *, why: str = "",
         none_ok: bool = False) -> float | None:
    """``x`` as a finite float in the interval lo..hi, each end open or closed as ``bounds`` says
    ("[]", "(]", "[)", "()"); NaN and ±inf are always refused."""
    if none_ok and x is None:
        return None
    allowed = ("None or " if none_ok else "") + _number_text(lo, hi, bounds)
    if torch.is_tensor(x) and x.dim() == 0 and x.dtype != torch.bool:
        x = x.item()                                                   # a 0-d tensor is a number too
    if not (isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))):
        _fail(name, allowed, x, why, type_error=True)
    if not (_finite(x) and in_interval(x, lo, hi, bounds)):
        _fail(name, allowed, x, why)
    return float(x)


def probability(name: str, x, why: str = "") -> float:
    """A number in the OPEN interval (0, 1): error rates α, β, a quantile level."""
    return real(name, x, 0.0, 1.0, "()", why=why)


def seed(name: str, x) -> int:
    """A seed for numpy and torch generators: an int in [0, 2**63 − 1] (numpy refuses negative
    seeds; torch's manual_seed overflows above 2**64)."""
    if is_int(x) and x > SEED_MAX:
        _fail(name, "an int in [0, 2**63 − 1]", x, " (numpy and torch seeds)")
    return integer(name, x, 0)


def boolean(name: str, x) -> bool:
    """A flag: True/False (numpy bools included), not 0/1 or a string such as "False"."""
    if not isinstance(x, (bool, np.bool_)):
        _fail(name, "True or False", x, type_error=True)
    return bool(x)


def choice(name: str, x, options: Sequence, why: str = ""):
    """One of ``options`` (compared with ==; unhashable values are simply not among them)."""
    try:                                                              # True == 1, but True is no option 1
        ok = any(x is o or (not isinstance(x, bool) and not isinstance(o, bool) and bool(x == o)) for o in options)
    except Exception:                                                 # e.g. an array compared with a str
        ok = False
    if not ok:
        _fail(name, f"one of {tuple(options)}", x, why)
    return x


def instance(name: str, x, cls: type | tuple, what: str | None = None):
    """``x`` is an instance of ``cls``; ``what`` describes it in the message (default: the class name)."""
    if not isinstance(x, cls):
        names = what or " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        _fail(name, f"a {names}", x, type_error=True)
    return x


def function(name: str, x, why: str = ""):
    """A callable (a function, or an object with ``__call__``)."""
    if not callable(x):
        _fail(name, "a callable", x, why, type_error=True)
    return x


def generator(name: str, x) -> torch.Generator:
    """An explicit ``torch.Generator``: tpg never draws from the global RNG."""
    if not isinstance(x, torch.Generator):
        _fail(name, "a torch.Generator", x, " (tpg never seeds globally: pass torch.Generator().manual_seed(0))",
              type_error=True)
    return x


_check_generator = generator        # report_options has an argument of that name


# ------------------------------------------------------------------------------ tensors
def finite_tensor(name: str, x, shape: tuple | None = None, dtype: torch.dtype | None = None,
                  shape_name: str = "") -> torch.Tensor:
    """``x`` (a tensor, array or nested list of numbers) as a tensor of ``shape`` with no NaN/inf;
    ``shape_name`` says what the shape means, e.g. "(num_states, V)"."""
    try:
        t = torch.as_tensor(x, dtype=dtype) if not torch.is_tensor(x) or dtype is not None else x
    except (TypeError, ValueError, RuntimeError):
        _fail(name, "a tensor or array of numbers" + (f" of shape {shape}" if shape else ""), x, type_error=True)
    if t.dtype == torch.bool or t.is_complex():
        _fail(name, "a real-valued tensor", x, type_error=True)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise TPGError(f"{name} has shape {tuple(t.shape)}, expected "
                       f"{shape_name + ' = ' if shape_name else ''}{tuple(shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise TPGError(f"{name} contains NaN or inf ({int((~torch.isfinite(t)).sum())} of {t.numel()} entries)")
    return t


def index_tensor(name: str, x, n: int) -> torch.Tensor:
    """A non-empty 1-d tensor of integer indices in [0, n) (e.g. prompt indices), as int64."""
    try:
        t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError):
        _fail(name, f"a 1-d sequence of ints in [0, {n})", x, type_error=True)
    if t.dim() != 1 or t.numel() == 0:
        raise TPGError(f"{name} must be a non-empty 1-d sequence of ints in [0, {n}), got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype in (torch.bool, torch.complex64, torch.complex128):
        _fail(name, f"a 1-d sequence of ints in [0, {n})", x, f" (dtype {t.dtype} is not an integer type)",
              type_error=True)
    if bool((t < 0).any() or (t >= n).any()):
        bad = t[(t < 0) | (t >= n)][:5].tolist()
        raise TPGError(f"{name} must hold ints in [0, {n}), got {bad}{' …' if len(bad) == 5 else ''}")
    return t.long()


# ------------------------------------------------------------------------------ tpg objects
_MDP_ATTRS = ("prompts", "vocab_size", "horizon", "eos", "num_states", "state_index")
_POLICY_ATTRS = ("mdp", "token_log_probs", "parameters")


def mdp(name: str, x):
    """A ``tpg.TokenMDP`` (checked by the attributes tpg reads: this module sits below mdp.py)."""
    if not all(hasattr(type(x), a) or a in getattr(x, "__dict__", {}) for a in _MDP_ATTRS):  # no property runs
        _fail(name, "a tpg.TokenMDP", x, type_error=True)
    return x


def policy(name: str, x):
    """A policy: an ``nn.Module`` with ``.mdp`` and ``token_log_probs`` (tpg.policies' protocol),
    whose parameters are all finite (NaN/inf parameters would turn every result into NaN)."""
    if not (isinstance(x, torch.nn.Module) and all(hasattr(x, a) for a in _POLICY_ATTRS)):
        _fail(name, "a tpg policy (e.g. tpg.TabularSoftmax(mdp))", x, type_error=True)
    for pname, p in x.named_parameters():
        # one reduction (a NaN/inf makes the sum non-finite); the elementwise test only confirms
        if (p.is_floating_point() or p.is_complex()) and not bool(torch.isfinite(p.detach().sum())) \
                and not bool(torch.isfinite(p.detach()).all()):
            raise TPGError(f"{name} has NaN or inf parameters ({type(x).__name__}.{pname}); "
                           "rebuild it or reset the parameters")
    return x


def mdp_and_policy(m, pol, name: str = "policy") -> None:
    """``m`` is an MDP and ``pol`` a finite policy built for an MDP of the same structure (prompts,
    vocabulary, horizon, EOS): its per-state tables and decoder index the same tree."""
    mdp("mdp", m)
    policy(name, pol)
    pm = pol.mdp
    mine = (m.prompts, m.vocab_size, m.horizon, m.eos)
    theirs = tuple(getattr(pm, a, None) for a in ("prompts", "vocab_size", "horizon", "eos"))
    if mine != theirs:
        diff = [a for a, u, v in zip(("prompts", "vocab_size", "horizon", "eos"), mine, theirs) if u != v]
        raise TPGError(f"the {name} was built for a different MDP structure (prompts, vocab, horizon or EOS "
                       f"differ: {', '.join(diff)}); build it for this MDP, e.g. TabularSoftmax(mdp)")


def report_options(est, m, pol, G, *, rtol=None, alpha=None, beta=None, n_directions=None, n_batches=None,
                   generator=None, target=None, roundoff=None, **kw) -> None:
    """Every argument of ``tpg.verify.report`` / ``mc_check`` that can be checked before any work:
    a refused verdict must not cost an enumeration first. Keyword arguments these functions pass
    on to ``tpg.exact.moments`` are checked by name when known (n_prompts, route, cov, old_policy,
    ref, critic, budget, chunk_rows); others are left to the callee."""
    function("est (the estimator)", est, " (an Estimator, or a function of a Rollouts returning a loss)")
    mdp_and_policy(m, pol)
    integer("group size G", G, 1)
    if rtol is not None:
        real("rtol", rtol, 0.0, 1.0, "()", why=" (the relative tolerance under which a bias counts as zero)")
    for nm, v in (("alpha", alpha), ("beta", beta)):
        if v is not None:
            probability(nm, v, why=" (an error rate)")
    if n_directions is not None:
        integer("n_directions", n_directions, 1)
    if n_batches is not None:
        integer("n_batches", n_batches, 1)
    if generator is not None:
        _check_generator("generator", generator)
    if target is not None:
        finite_tensor("target", target)
    real("roundoff", roundoff, 0.0, None, none_ok=True)
    if "n_prompts" in kw:
        integer("n_prompts (prompt draws per batch)", kw["n_prompts"], 1)
    if "route" in kw:
        choice("route", kw["route"], ("multiset", "joint"))
    if kw.get("cov", "trace") is not None:
        choice("cov", kw.get("cov", "trace"), ("trace", "full"), " or None")
    for nm in ("old_policy", "ref"):
        if kw.get(nm) is not None:
            mdp_and_policy(m, kw[nm], nm)
    if kw.get("critic") is not None:
        function("critic", kw["critic"], " (e.g. tpg.draws.exact_critic(tables))")
    if "direction_seed" in kw:
        seed("direction_seed", kw["direction_seed"])
    for nm in ("budget", "chunk_rows"):
        if kw.get(nm) is not None:
            integer(nm, kw[nm], 1)
    if kw.get("directions") is not None:
        u = finite_tensor("directions", kw["directions"])
        D = sum(p.numel() for p in pol.parameters())
        if u.dim() != 2 or u.shape[0] < 1 or u.shape[1] != D:
            raise TPGError(f"directions must have shape (K, D) with K ≥ 1 and D = {D} parameters, "
                           f"got {tuple(u.shape)}")


# ------------------------------------------------------------------------------ files
def check_output_path(path, flag: str = "--json") -> None:
    """Refuse, before any work, an output file that could not be written (missing or read-only
    directory, a directory given as the file, an unwritable file), so a long run never fails at its
    very end. The test is to create the file (and remove it again) when it does not exist yet."""
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)):
        _fail(flag, "a file path", path, type_error=True)
    full = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise TPGError(f"{flag} {path} is a directory: give a file path, e.g. {flag} out.json")
    if not os.path.isdir(folder):
        raise TPGError(f"{flag} {path}: directory {folder} does not exist; create it first")
    if os.path.exists(full):
        if not os.access(full, os.W_OK):
            raise TPGError(f"{flag} {path}: the file exists and is not writable; choose another path")
        return
    try:
        with open(full, "x"):
            pass
        os.remove(full)
    except OSError as e:
        raise TPGError(f"{flag} {path}: cannot create a file in {folder} ({e.strerror}); choose another path") from e
