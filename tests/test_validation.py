"""A catalogue of malformed calls: each gets a TPGError naming the problem, before any work (DESIGN §5).

One table, ``CATALOGUE``: (id, call, expected error class, a fragment the message must contain).
Wrong-type arguments raise ``TPGTypeError`` (a TPGError and a TypeError, never an AttributeError
from deep inside); NaN/inf parameters, rewards and coefficients are refused instead of returning
NaN; bad options of ``report``/``mc_check``/``sample`` are refused before any enumeration. The
entries marked ``budget`` are jobs too large to run: ``test_refused_jobs_are_cheap`` measures
(peak RSS and tracemalloc, not a guess) that refusing each costs < 200 MB and < 1 s.
The unit tests of ``tpg.validate`` itself come first.
"""
from __future__ import annotations

import ctypes
import gc
import math
import re
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from tpg import exact, validate
from tpg.estimators import KL, estimator
from tpg.lm import GPT2Policy
from tpg.mdp import BudgetError, TokenMDP, TPGError, random_mdp
from tpg.policies import LogLinear, TabularSoftmax, make_policy
from tpg.rollouts import continuation_rm, enumerate_responses, greedy, sample
from tpg.train import train
from tpg.validate import TPGTypeError
from tpg.verify import mc_check, report


# ------------------------------------------------------------------------------------ the validators
@pytest.mark.parametrize("x", [0, 3, np.int64(2), np.uint8(7), 10**30])
def test_integer_accepts_python_and_numpy_ints(x):
    assert validate.integer("n", x) == int(x) and type(validate.integer("n", x)) is int


@pytest.mark.parametrize("x", [True, False, np.bool_(True), 2.0, 1.5, "2", None, [1], torch.tensor(2)])
def test_integer_refuses_bools_floats_and_other_types(x):
    with pytest.raises(TPGTypeError, match=r"n must be an int ≥ 1, got .* \(\w+\)"):
        validate.integer("n", x, 1)
    assert issubclass(TPGTypeError, TypeError) and issubclass(TPGTypeError, ValueError)


def test_integer_range_message_names_the_bounds():
    with pytest.raises(TPGError, match=r"^k must be an int in \[1, 5\], got 6$"):
        validate.integer("k", 6, 1, 5)
    with pytest.raises(TPGError, match=r"^k must be an int ≥ 1 \(a count\), got 0$"):
        validate.integer("k", 0, 1, why=" (a count)")


@pytest.mark.parametrize("x,bounds,ok", [(0.0, "[]", True), (0.0, "(]", False), (1.0, "[)", False),
                                         (1.0, "(]", True), (0.5, "()", True), (1e-300, "()", True)])
def test_real_open_and_closed_ends(x, bounds, ok):
    if ok:
        assert validate.real("x", x, 0.0, 1.0, bounds) == x
    else:
        with pytest.raises(TPGError, match=rf"x must be a number in \{bounds[0]}0, 1\{bounds[1]}, got {x}"):
            validate.real("x", x, 0.0, 1.0, bounds)


@pytest.mark.parametrize("x", [math.nan, math.inf, -math.inf, np.float64("nan"), torch.tensor(math.nan)])
def test_real_refuses_nan_and_inf_even_without_bounds(x):
    with pytest.raises(TPGError, match="x must be a finite number, got"):
        validate.real("x", x)


def test_real_accepts_numpy_and_0d_tensors_and_refuses_bools():
    assert validate.real("x", np.float32(0.25), 0, 1) == 0.25 and validate.real("x", torch.tensor(0.5)) == 0.5
    with pytest.raises(TPGTypeError, match=r"got True \(bool\)"):
        validate.real("x", True)


@pytest.mark.parametrize("x", [0, 1, 0.0, 1.0, -0.1, 2, math.nan])
def test_probability_is_the_open_unit_interval(x):
    with pytest.raises(TPGError, match=r"alpha must be a number in \(0, 1\)"):
        validate.probability("alpha", x)


def test_choice_instance_and_tensor_messages():
    with pytest.raises(TPGError, match=r"route must be one of \('multiset', 'joint'\), got 'diag'"):
        validate.choice("route", "diag", ("multiset", "joint"))
    with pytest.raises(TPGError, match="one of"):
        validate.choice("ddof", True, (0, 1))                            # True == 1, but is no option
    with pytest.raises(TPGTypeError, match=r"ro must be a Rollouts, got \[\] \(list\)"):
        validate.instance("ro", [], type("Rollouts", (), {}))
    with pytest.raises(TPGError, match=r"w has shape \(2,\), expected \(3,\)"):
        validate.finite_tensor("w", [1.0, 2.0], (3,))
    with pytest.raises(TPGError, match=r"w contains NaN or inf \(1 of 2 entries\)"):
        validate.finite_tensor("w", np.array([1.0, np.inf]))
    with pytest.raises(TPGError, match=r"idx must hold ints in \[0, 2\), got \[2\]"):
        validate.index_tensor("idx", [0, 2], 2)


def test_long_values_are_cut_in_messages():
    with pytest.raises(TPGTypeError) as e:
        validate.integer("n", "x" * 500)
    assert len(str(e.value)) < 160 and "..." in str(e.value)


# ------------------------------------------------------------------------------------ the catalogue
M = random_mdp(0, vocab_size=3, horizon=2, eos=True, n_prompts=2)             # 2 prompts, 6 states
OTHER = random_mdp(0, vocab_size=3, horizon=3, eos=True, n_prompts=2)         # same vocab, longer horizon
POL, POL_OTHER = TabularSoftmax(M), TabularSoftmax(OTHER)
EST = estimator("rloo")
GEN = torch.Generator().manual_seed(0)
HUGE = TokenMDP([()], 50, 10, eos=49, token_rewards=lambda *a: 0.0)           # ~8·10^16 responses
DEEP = TokenMDP([()], 3, 10**8, eos=2, token_rewards=lambda *a: 0.0)          # ~10^(3·10^7) responses
BIG_GROUPS = random_mdp(0, vocab_size=4, horizon=11, eos=True)                # 265,720 responses: 7·10^10 multisets
                                                                              # of G = 2 (the 2–3 GB case)
BIG_POL = TabularSoftmax(BIG_GROUPS)


def nan_policy(kind=TabularSoftmax, value=math.nan):
    """A policy whose parameters were made non-finite after construction (e.g. by a diverged update)."""
    pol = kind(M)
    with torch.no_grad():
        next(pol.parameters()).view(-1)[0] = value
    return pol


def rewards_mdp(fn, additive=True):
    return TokenMDP([()], 3, 2, 2, **({"token_rewards": fn} if additive else {"response_rewards": fn}))


def rollouts():
    return sample(M, POL, 2, torch.Generator().manual_seed(1))


E, T, B = TPGError, TPGTypeError, BudgetError
CATALOGUE = [
    # ---- wrong types: a TPGTypeError naming the argument, not an AttributeError from inside
    ("sample-mdp-list", lambda: sample([1, 2], POL, 2, GEN), T, "mdp must be a tpg.TokenMDP, got [1, 2] (list)"),
    ("sample-policy-str", lambda: sample(M, "tabular", 2, GEN), T, "policy must be a tpg policy"),
    ("sample-generator-none", lambda: sample(M, POL, 2, None), T, "must be a torch.Generator"),
    ("sample-generator-numpy", lambda: sample(M, POL, 2, np.random.default_rng(0)), T, "torch.Generator"),
    ("tabular-mdp-list", lambda: TabularSoftmax([1, 2]), T, "mdp must be a tpg.TokenMDP, got [1, 2] (list)"),
    ("tabular-mdp-none", lambda: TabularSoftmax(None), T, "mdp must be a tpg.TokenMDP, got None"),
    ("loglinear-mdp-str", lambda: LogLinear("mdp"), T, "mdp must be a tpg.TokenMDP, got 'mdp' (str)"),
    ("gpt2-mdp-dict", lambda: GPT2Policy({}), T, "mdp must be a tpg.TokenMDP, got {} (dict)"),
    ("tabular-logits-str", lambda: TabularSoftmax(M, "abc"), T, "logits must be a tensor or array of numbers"),
    ("tabular-dtype-str", lambda: TabularSoftmax(M, dtype="float64"), E, "dtype must be one of"),
    ("tabular-seed-float", lambda: TabularSoftmax(M, seed=1.5), T, "seed must be an int ≥ 0, got 1.5"),
    ("make-policy-list", lambda: make_policy(["tabular"], M), E, "unknown policy kind ['tabular']"),
    ("gradient-policy-list", lambda: exact.gradient(M, [1, 2]), T, "policy must be a tpg policy"),
    ("gradient-mdp-none", lambda: exact.gradient(None, POL), T, "mdp must be a tpg.TokenMDP, got None"),
    ("tables-policy-none", lambda: exact.tables(M, None), T, "policy must be a tpg policy"),
    ("tables-mdp-str", lambda: exact.tables("M", POL), T, "mdp must be a tpg.TokenMDP, got 'M'"),
    ("objective-policy-module", lambda: exact.objective(M, torch.nn.Linear(2, 2)), T, "policy must be a tpg policy"),
    ("report-policy-str", lambda: report(EST, M, "POL"), T, "policy must be a tpg policy"),
    ("report-mdp-list", lambda: report(EST, [1], POL), T, "mdp must be a tpg.TokenMDP"),
    ("report-estimator-str", lambda: report("rloo", M, POL), T, "est (the estimator) must be a callable"),
    ("report-critic-str", lambda: report(EST, M, POL, 2, critic="exact"), T, "critic must be a callable"),
    ("continuation-ro-str", lambda: continuation_rm(M, POL, "ro", 2, GEN), T, "ro must be a Rollouts"),
    ("continuation-K-bool", lambda: continuation_rm(M, POL, rollouts(), True, GEN), T, "K must be an int ≥ 1"),
    ("greedy-prompt-float", lambda: greedy(M, POL, [0.5]), T, "prompt_idx must be a 1-d sequence of ints"),
    ("mdp-prompts-int", lambda: TokenMDP(5, 3, 2, 2, token_rewards=np.zeros((3, 3))), T, "prompts must be a list"),
    ("random-mdp-eos-int", lambda: random_mdp(0, eos=2), T, "eos must be True or False, got 2 (int)"),
    # ---- NaN / inf: refused with a clear error instead of a NaN result
    ("tabular-logits-nan", lambda: TabularSoftmax(M, torch.full((6, 3), math.nan)), E, "logits contains NaN or inf"),
    ("gradient-nan-logits", lambda: exact.gradient(M, nan_policy()), E,
     "policy has NaN or inf parameters (TabularSoftmax.logits)"),
    ("tables-inf-loglinear", lambda: exact.tables(M, nan_policy(LogLinear, math.inf)), E,
     "policy has NaN or inf parameters (LogLinear.w_pos)"),
    ("report-nan-policy", lambda: report(EST, M, nan_policy(LogLinear), 2), E, "NaN or inf parameters"),
    ("sample-nan-policy", lambda: sample(M, nan_policy(), 2, GEN), E, "NaN or inf parameters"),
    ("loglinear-scale-nan", lambda: LogLinear(M, scale=math.nan), E, "scale must be a finite number ≥ 0"),
    ("reward-table-nan", lambda: rewards_mdp(np.full((3, 3), math.nan)), E, "token_rewards contains NaN or inf"),
    ("reward-table-inf", lambda: rewards_mdp(np.full((3, 3), math.inf), additive=False), E,
     "response_rewards contains NaN or inf"),
    ("reward-callable-nan", lambda: enumerate_responses(rewards_mdp(lambda x, p, a: math.nan)), E,
     "the token_rewards callable returned NaN or inf on prompt 0"),
    ("reward-callable-tensor-nan", lambda: enumerate_responses(rewards_mdp(lambda x, y: torch.tensor(math.nan), False)),
     E, "the response_rewards callable returned NaN or inf"),
    ("reward-callable-vector", lambda: enumerate_responses(rewards_mdp(lambda x, p, a: torch.ones(2))), E,
     "the token_rewards callable must return a float"),
    ("reward-callable-bool", lambda: enumerate_responses(rewards_mdp(lambda x, y: True, False)), E,
     "must return a float; on prompt 0, response (2,) it returned True (bool)"),
    ("reward-callable-str", lambda: rewards_mdp(lambda x, p, a: "1.0").zra(), E, "must return a float"),
    ("kl-coef-nan", lambda: KL(math.nan), E, "KL coefficient coef (β) must be a finite number ≥ 0 (verl's default is 0.001), got nan"),
    ("kl-coef-inf", lambda: KL(math.inf), E, "must be a finite number ≥ 0 (verl's default is 0.001), got inf"),
    ("kl-coef-negative", lambda: KL(-0.1), E, "must be a finite number ≥ 0 (verl's default is 0.001), got -0.1"),
    ("train-kl-nan", lambda: train(M, TabularSoftmax(M), "rloo", 1, ref=POL, kl=math.nan), E,
     "kl (the coefficient β) must be a finite number ≥ 0, got nan"),
    ("prompt-probs-nan", lambda: TokenMDP([(0,), ()], 3, 2, 2, prompt_probs=[math.nan, 1.0],
                                          token_rewards=lambda *a: 0.0), E, "prompt_probs must be finite and ≥ 0"),
    ("random-mdp-prompt-probs-nan", lambda: random_mdp(0, n_prompts=2, prompt_probs=[math.nan, 0.5]), E,
     "prompt_probs must be finite"),
    ("gamma-nan", lambda: random_mdp(0, gamma=math.nan), E, "gamma must be a number in (0, 1], got nan"),
    # ---- sample: group size, the policy's MDP, prompt indices
    ("sample-G-true", lambda: sample(M, POL, True, GEN), T, "group size G must be an int ≥ 1, got True (bool)"),
    ("sample-G-numpy-bool", lambda: sample(M, POL, np.bool_(True), GEN), T, "group size G must be an int ≥ 1"),
    ("sample-G-float", lambda: sample(M, POL, 2.0, GEN), T, "group size G must be an int ≥ 1, got 2.0"),
    ("sample-other-mdp", lambda: sample(M, POL_OTHER, 2, GEN), E,
     "the policy was built for a different MDP structure (prompts, vocab, horizon or EOS differ: horizon)"),
    ("sample-prompt-out-of-range", lambda: sample(M, POL, 2, GEN, prompt_idx=[0, 5]), E,
     "prompt_idx must hold ints in [0, 2), got [5]"),
    ("sample-prompt-negative", lambda: sample(M, POL, 2, GEN, prompt_idx=torch.tensor([-1])), E,
     "prompt_idx must hold ints in [0, 2), got [-1]"),
    ("sample-prompt-float", lambda: sample(M, POL, 2, GEN, prompt_idx=[0.0, 1.0]), T, "(dtype torch.float64 is not"),
    ("sample-prompt-2d", lambda: sample(M, POL, 2, GEN, prompt_idx=[[0, 1]]), E,
     "prompt_idx must be a non-empty 1-d sequence of ints in [0, 2), got shape (1, 2)"),
    ("sample-prompt-empty", lambda: sample(M, POL, 2, GEN, prompt_idx=[]), E, "non-empty 1-d"),
    ("sample-prompt-str", lambda: sample(M, POL, 2, GEN, prompt_idx="0"), T, "prompt_idx must be a 1-d sequence"),
    ("greedy-other-mdp", lambda: greedy(M, POL_OTHER, torch.tensor([0])), E, "different MDP structure"),
    ("continuation-other-mdp", lambda: continuation_rm(M, POL_OTHER, rollouts(), 2, GEN), E, "different MDP"),
    # ---- report / mc_check options, refused before any enumeration
    ("mc-alpha-zero", lambda: mc_check(EST, M, POL, 2, 1000, GEN, alpha=0), E, "alpha must be a number in (0, 1)"),
    ("mc-alpha-above-one", lambda: mc_check(EST, M, POL, 2, 1000, GEN, alpha=1.5), E, "alpha must be a number in (0, 1)"),
    ("mc-alpha-nan", lambda: mc_check(EST, M, POL, 2, 1000, GEN, alpha=math.nan), E, "alpha must be a number in (0, 1)"),
    ("mc-beta-zero", lambda: mc_check(EST, M, POL, 2, 1000, GEN, beta=0.0), E, "beta must be a number in (0, 1)"),
    ("mc-beta-one", lambda: mc_check(EST, M, POL, 2, 1000, GEN, beta=1), E, "beta must be a number in (0, 1)"),
    ("mc-directions-zero", lambda: mc_check(EST, M, POL, 2, 1000, GEN, n_directions=0), E,
     "n_directions must be an int ≥ 1, got 0"),
    ("mc-directions-negative", lambda: mc_check(EST, M, POL, 2, 1000, GEN, n_directions=-3), E,
     "n_directions must be an int ≥ 1, got -3"),
    ("mc-directions-bool", lambda: mc_check(EST, M, POL, 2, 1000, GEN, n_directions=True), T,
     "n_directions must be an int ≥ 1, got True (bool)"),
    ("mc-directions-shape", lambda: mc_check(EST, M, POL, 2, 1000, GEN, directions=torch.ones(2, 5)), E,
     "directions must have shape (K, D) with K ≥ 1 and D = 18 parameters, got (2, 5)"),
    ("mc-generator-none", lambda: mc_check(EST, M, POL, 2, 1000, None), T, "generator must be a torch.Generator"),
    ("mc-G-zero", lambda: mc_check(EST, M, POL, 0, 1000, GEN), E, "group size G must be an int ≥ 1, got 0"),
    ("mc-other-mdp", lambda: mc_check(EST, M, POL_OTHER, 2, 1000, GEN), E, "different MDP structure"),
    ("report-rtol-nan", lambda: report(EST, M, POL, 2, rtol=math.nan), E, "rtol must be a number in (0, 1)"),
    ("report-rtol-zero", lambda: report(EST, M, POL, 2, rtol=0.0), E, "rtol must be a number in (0, 1)"),
    ("report-rtol-negative", lambda: report(EST, M, POL, 2, rtol=-1e-10), E, "rtol must be a number in (0, 1)"),
    ("report-G-zero", lambda: report(EST, M, POL, 0), E, "group size G must be an int ≥ 1, got 0"),
    ("report-G-float", lambda: report(EST, M, POL, 2.0), T, "group size G must be an int ≥ 1, got 2.0"),
    ("report-route", lambda: report(EST, M, POL, 2, route="diagonal"), E,
     "route must be one of ('multiset', 'joint'), got 'diagonal'"),
    ("report-n-prompts-float", lambda: report(EST, M, POL, 2, n_prompts=1.5), T, "n_prompts (prompt draws per batch)"),
    ("report-cov", lambda: report(EST, M, POL, 2, cov="diag"), E, "cov must be one of ('trace', 'full') or None"),
    ("report-old-policy", lambda: report(EST, M, POL, 2, old_policy=POL_OTHER), E,
     "the old_policy was built for a different MDP structure"),
    ("report-target-nan", lambda: report(EST, M, POL, 2, target=torch.full((18,), math.nan)), E,
     "target contains NaN or inf"),
    ("report-roundoff-negative", lambda: report(EST, M, POL, 2, roundoff=-1.0), E, "roundoff must be None or"),
    # ---- jobs too large to run: refused in O(1), before allocating (budget entries)
    ("budget-random-mdp-table", lambda: random_mdp(0, vocab_size=50, horizon=10), B, "above the table budget"),
    ("budget-tabular-table", lambda: TabularSoftmax(HUGE), B, "use LogLinear"),
    ("budget-enumeration", lambda: enumerate_responses(HUGE), B, "Use Monte Carlo"),
    ("budget-gradient", lambda: exact.gradient(HUGE, LogLinear(HUGE)), B, "Monte Carlo"),
    ("budget-zra-astronomical", lambda: DEEP.zra(), B, "needs ~10^30103000 responses, above the budget"),
    ("budget-deep-repr", lambda: enumerate_responses(DEEP), B, "Monte Carlo"),
    ("budget-sample-rows", lambda: sample(M, POL, 10**4, GEN, n_prompts=10**4), B,
     "sampling 1 batch(es) × 10000 prompt draw(s) × G=10000 = 100,000,000 responses"),
    ("budget-sample-batches", lambda: sample(M, POL, 2, GEN, n_batches=10**12), B, "above the budget"),
    ("budget-continuation-K", lambda: estimator("trepo", K=10**9).needs, B, "K=1,000,000,000 continuation rollouts"),
    ("budget-continuation-rows", lambda: continuation_rm(M, POL, rollouts(), 10**7, GEN), B, "continuations"),
    ("budget-gpt2-size", lambda: GPT2Policy(M, n_layer=1000, n_embd=1024), B, "parameters, above the budget"),
    ("budget-moments-groups", lambda: exact.moments(estimator("grpo"), BIG_GROUPS, BIG_POL, 2, route="multiset"), B,
     "response slots, above the budget"),
    ("budget-moments-n-prompts", lambda: exact.moments(estimator("grpo"), M, POL, 2, n_prompts=10**8), B,
     "response slots, above the budget"),
    ("budget-moments-joint", lambda: exact.moments(estimator("grpo"), M, POL, 30, route="joint"), B, "(joint)"),
    ("budget-report-n-prompts", lambda: report(estimator("grpo"), M, POL, 2, n_prompts=10**8), B, "response slots"),
    ("budget-report-groups", lambda: report(estimator("grpo"), BIG_GROUPS, BIG_POL, 2, route="multiset"), B,
     "response slots, above the budget"),
]
BUDGET_XFAIL: dict[str, str] = {}   # id → why a refusal is known to cost too much (strict: a fix removes it)


@pytest.mark.parametrize("call,error,fragment", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_malformed_call_raises_a_clear_tpg_error(call, error, fragment):
    """Every entry raises the expected TPGError subclass, and the message names the problem."""
    with pytest.raises(error) as e:
        call()
    assert isinstance(e.value, TPGError)
    assert fragment in str(e.value), f"expected {fragment!r} in {str(e.value)!r}"


def test_catalogue_ids_are_unique():
    ids = [c[0] for c in CATALOGUE]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]


# ------------------------------------------------------------------------------------ refusals are cheap
MEMORY_LIMIT_MB, TIME_LIMIT_S = 200, 1.0
_STATUS = Path("/proc/self/status")


def _rss_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text()).group(1)) / 1024


def _release_freed_memory() -> None:
    """Hand memory freed by earlier tests back to the kernel (glibc malloc_trim): otherwise a job could
    reuse it without raising the peak RSS, and the measurement would depend on what ran before."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


BUDGET = [pytest.param(c[1], c[2], id=c[0], marks=pytest.mark.xfail(strict=True, reason=BUDGET_XFAIL[c[0]])
                       if c[0] in BUDGET_XFAIL else ()) for c in CATALOGUE if c[0].startswith("budget-")]


@pytest.fixture(scope="module")
def warm_process():
    """The baseline is a process that has used tpg once: torch.autograd.grad imports torch.fx's
    symbolic shapes and sympy on first use (~1 s, ~50 MB), mc_check imports scipy. One-time imports
    are not the cost of a refusal."""
    import scipy.stats  # noqa: F401
    import torch.fx.experimental.symbolic_shapes  # noqa: F401


@pytest.mark.parametrize("call,error", BUDGET)
def test_refused_jobs_are_cheap(call, error, warm_process):
    """A refused job costs < 200 MB above the baseline and < 1 s. Memory is measured twice: the peak
    resident set (the kernel's VmHWM, reset before the call: counts torch's buffers too) and
    tracemalloc's peak (Python and numpy allocations, even untouched ones). The MDPs' cached state
    tables are dropped and freed memory is returned to the kernel first, so every job is measured
    cold whatever ran before it."""
    if not _STATUS.exists() or not _reset_peak_rss():
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak RSS")
    for mdp in (M, OTHER, HUGE, DEEP, BIG_GROUPS):
        mdp._derived.clear()
    gc.collect()
    _release_freed_memory()
    _reset_peak_rss()
    base = _rss_mb("VmRSS")
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with pytest.raises(error):
            call()
    finally:
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    rss = _rss_mb("VmHWM") - base
    # CPU time, not wall time, is asserted: other jobs on a loaded test machine stretch the latter.
    assert rss < MEMORY_LIMIT_MB and py_peak / 2**20 < MEMORY_LIMIT_MB and cpu < TIME_LIMIT_S, \
        f"refusal cost {rss:.0f} MB peak RSS, {py_peak / 2**20:.0f} MB traced, {cpu:.2f} s CPU ({wall:.2f} s wall)"


def test_huge_ints_are_shown_by_their_size():
    """repr() refuses ints beyond 4,300 digits; the message shows the order of magnitude instead."""
    with pytest.raises(TPGError, match=r"seed must be an int in \[0, 2\*\*63 − 1\] .*got ~10\^5000$"):
        validate.seed("seed", 10**5000)


def test_ints_beyond_float_range_are_not_finite_reals():
    assert not validate.is_real(10**400)
    with pytest.raises(TPGError, match=r"x must be a number in \[0, 1\], got ~10\^400"):
        validate.real("x", 10**400, 0.0, 1.0)
