"""The building blocks of every claim: results, the ``Claim`` type and its registry, ``Exact``
(an MDP and a policy with ∇J, the tables and δ computed once), the seeded set-ups and the verdict
helpers. The checks themselves are in ``tpg.claims.true`` (T), ``false`` (F), ``measured`` (N) and
``montecarlo`` (M); each is registered where it is defined, with ``@claim(id, statement, ...)``.

Verdict vocabulary (``EXPECTED``):

- "holds"    an identity between exact quantities: relative gap ≤ RTOL (1e-10, ``tpg.verify``);
             for a Monte Carlo claim (M): every designed test that must pass passed, every negative
             control that must fail failed, with its power stated;
- "fails"    an identity that is false: relative gap > the claim's margin;
- "unbiased", "scaled", "biased"  ``tpg.verify``'s verdicts of an exact expectation against its
             target (∇J unless the claim says otherwise); "scaled"/"biased" only count when the
             relative bias exceeds the margin;
- "measured" a number with no exact truth value (PAPER §7, last list).

A gap in (RTOL, margin] is "unclear", which never agrees: TRUE claims must hold to float64
round-off, FALSE claims must show a bias far above it. ``MARGIN = 1e-4`` (relative) is 10^6 times
RTOL.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from tpg import exact
from tpg.estimators import estimator
from tpg.mdp import TokenMDP, TPGError, random_mdp
from tpg.policies import make_policy
from tpg.verify import RTOL, report, roundoff_floor, verdict_of


MARGIN = 1e-4
FD_TOL = (1e-5, 1e-7)                 # central finite differences (rtol, atol): DESIGN §4
TRUTH = {"T": "true", "F": "false", "M": "true"}
EXPECTED = ("holds", "fails", "unbiased", "scaled", "biased", "measured")
ALL_POLICIES = ("tabular", "loglinear", "gpt2")
MDP_DEFAULTS = dict(vocab_size=3, horizon=3, eos=True, n_prompts=1)
# GPT-2's default init (std 0.02) gives an almost uniform π; a wider init makes the checks sharper.
POLICY_OPTIONS = {"gpt2": {"init_range": 0.5}}


# ====================================================================================== results
@dataclass(frozen=True)
class Check:
    """One measured condition ``value op bound``: "<=" for an equality to round-off (bound RTOL),
    ">" for a gap that must exceed a margin."""
    name: str
    value: float
    op: str
    bound: float

    @property
    def ok(self) -> bool:
        return self.value <= self.bound if self.op == "<=" else self.value > self.bound

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "op": self.op, "bound": self.bound, "ok": self.ok}


def equal(name: str, gap: float) -> Check:
    return Check(name, float(gap), "<=", RTOL)


def differ(name: str, gap: float, margin: float = MARGIN) -> Check:
    return Check(name, float(gap), ">", margin)


@dataclass
class Outcome:
    """What a claim's checker measures: its verdict, a one-line figure, the key number (a gap for
    TRUE claims, a bias for FALSE ones), every measured number and the secondary checks."""
    verdict: str
    figure: str
    score: float
    measured: dict
    checks: list[Check] = field(default_factory=list)


@dataclass
class Result:
    claim: str
    seed: int
    policy: str
    expected: str
    verdict: str
    agree: bool
    figure: str
    score: float
    measured: dict
    checks: list[Check]
    seconds: float

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {"claim": self.claim, "seed": self.seed, "policy": self.policy, "expected": self.expected,
                "verdict": self.verdict, "agree": self.agree, "figure": self.figure,
                "score": self.score if math.isfinite(self.score) else None,
                "measured": self.measured, "checks": [c.to_dict() for c in self.checks],
                "failed_checks": self.failed(), "seconds": self.seconds}


@dataclass(frozen=True)
class Claim:
    """One item of PAPER §7 (or a check of the engine beyond it, T19+ and M).

    ``on(Exact) -> Outcome`` checks it on one MDP and policy (the hypothesis tests call it on drawn
    MDPs); the seeded run builds that MDP with ``setup(seed, kind, **mdp)`` or ``build(seed, kind)``.
    Claims that compare several MDPs (e.g. T3 at two discounts) give ``seeded(seed, kind)`` instead.
    """
    id: str
    statement: str
    equation: str
    expected: str
    on: Callable | None = None
    mdp: dict = field(default_factory=dict)
    build: Callable | None = None
    seeded: Callable | None = None
    policies: tuple = ALL_POLICIES
    why_not: str = ""                 # printed when a policy kind is not supported

    @property
    def truth(self) -> str:
        """"true" (T: exact identities; M: designed Monte Carlo checks of true statements),
        "false" (F) or "none" (N: measured)."""
        return TRUTH.get(self.id[0], "none")

    def measure(self, mdp_seed: int, policy_kind: str) -> Outcome:
        if self.seeded is not None:
            return self.seeded(mdp_seed, policy_kind)
        ex = self.build(mdp_seed, policy_kind) if self.build else setup(mdp_seed, policy_kind, **self.mdp)
        return self.on(ex)

    def check(self, mdp_seed: int = 0, policy_kind: str = "tabular") -> Result:
        """The claim on the seeded MDP(s) with a policy of ``policy_kind``."""
        if policy_kind not in self.policies:
            raise TPGError(f"claim {self.id} does not apply to policy {policy_kind!r}: {self.why_not}")
        t0 = time.perf_counter()
        return self._result(self.measure(int(mdp_seed), policy_kind), int(mdp_seed), policy_kind, t0)

    def check_on(self, mdp: TokenMDP, policy, seed: int = 0) -> Result:
        """The claim on a given MDP and policy (``seed`` seeds its auxiliary random tables)."""
        if self.on is None:
            raise TPGError(f"claim {self.id} compares several MDPs of its own: use check(seed, kind)")
        t0 = time.perf_counter()
        return self._result(self.on(Exact(mdp, policy, seed)), seed, type(policy).__name__, t0)

    def _result(self, out: Outcome, seed: int, policy: str, t0: float) -> Result:
        agree = out.verdict == self.expected and all(c.ok for c in out.checks)
        return Result(self.id, seed, policy, self.expected, out.verdict, agree, out.figure, float(out.score),
                      out.measured, out.checks, time.perf_counter() - t0)




# ====================================================================================== the registry
CLAIMS: dict[str, Claim] = {}       # id ↦ Claim, in registration order (= ``tpg verify``'s order)


def claim(id: str, statement: str, equation: str, expected: str, *, mdp: dict | None = None,
          build: Callable | None = None, seeded: Callable | bool | None = None,
          policies: tuple = ALL_POLICIES, why_not: str = "") -> Callable:
    """Register the decorated checker as claim ``id`` (in ``CLAIMS``, in definition order).

    The checker is ``on(ex: Exact) -> Outcome``, run on ``setup(seed, kind, **mdp)`` or on
    ``build(seed, kind)``; ``seeded=f`` adds a seeded run ``f(seed, kind)`` that replaces them (a
    claim comparing several MDPs); ``seeded=True`` says the decorated function IS that seeded run.
    """
    if expected not in EXPECTED:
        raise TPGError(f"claim {id}: expected verdict must be one of {EXPECTED}, got {expected!r}")

    def deco(fn: Callable) -> Callable:
        if id in CLAIMS:
            raise TPGError(f"claim id {id} is registered twice")
        if seeded is True:
            c = Claim(id, statement, equation, expected, seeded=fn, policies=policies, why_not=why_not)
        else:
            c = Claim(id, statement, equation, expected, fn, dict(mdp or {}), build, seeded, policies, why_not)
        CLAIMS[id] = c
        return fn
    return deco

# ====================================================================================== helpers
class Exact:
    """An MDP and a policy with ∇J, the tables and the round-off floor δ each computed once."""

    def __init__(self, mdp: TokenMDP, policy, seed: int = 0):
        self.mdp, self.pol, self.seed = mdp, policy, int(seed)   # seed: for auxiliary random tables
        self._cache: dict = {}

    def _get(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def tab(self):
        return self._get("tab", lambda: exact.tables(self.mdp, self.pol))

    @property
    def grad(self) -> torch.Tensor:
        return self._get("grad", lambda: exact.gradient(self.mdp, self.pol, self.tab.enum))

    @property
    def delta(self) -> float:
        return self._get("delta", lambda: roundoff_floor(self.mdp, self.pol, self.grad))

    def report(self, est, G: int = 1, *, cov: str | None = None, **kw):
        """``tpg.verify.report`` against ∇J (or ``target=``), δ measured once, no covariance by default."""
        kw.setdefault("target", self.grad)
        return report(est, self.mdp, self.pol, G, cov=cov, roundoff=self.delta, **kw)

    def expect(self, coef: torch.Tensor) -> torch.Tensor:
        return expect(self.tab, self.pol, coef)

    def vs(self, mean: torch.Tensor, target: torch.Tensor | None = None, margin: float = MARGIN):
        return vs(mean, self.grad if target is None else target, margin, self.delta)


def prompt_weights(mdp: TokenMDP, enum) -> torch.Tensor:
    """(N,) ρ(x_n) of each enumerated response, read off the MDP."""
    return torch.as_tensor(mdp.prompt_probs, dtype=torch.float64)[enum.prompt_idx]


def setup(seed: int, kind: str, **mdp_kw) -> Exact:
    """A seeded random MDP (MDP_DEFAULTS overridden by ``mdp_kw``) and a policy of ``kind`` for it."""
    mdp = random_mdp(seed, **{**MDP_DEFAULTS, **mdp_kw})
    return Exact(mdp, make_policy(kind, mdp, seed, **POLICY_OPTIONS.get(kind, {})), seed)


def binary_mdp(seed: int, successes: tuple = (6,), **size) -> TokenMDP:
    """A binary-reward MDP (RM ∈ {0, 1}) where prompt x has exactly ``successes[x]`` correct
    responses, chosen by ``seed`` (sizes as MDP_DEFAULTS unless given). Unlike independent coin
    flips, every prompt surely has both outcomes, so 0 < J_x < 1 and ∇J ≠ 0 on every seed."""
    kw = {**MDP_DEFAULTS, **size, "n_prompts": len(successes), "reward": "binary"}
    base = random_mdp(seed, **kw)
    st = base.state_table()
    rng = np.random.default_rng([seed, 4])
    table = np.zeros((base.num_states, base.vocab_size))
    for x, n_ok in enumerate(successes):
        pairs = np.argwhere((st["child"] < 0) & (st["prompt"][:, None] == x))   # terminal (state, token) pairs
        if not 0 < n_ok < len(pairs):
            raise TPGError(f"prompt {x} has {len(pairs)} responses; successes must be in [1, {len(pairs) - 1}]")
        ok = rng.permutation(len(pairs))[:n_ok]
        table[pairs[ok, 0], pairs[ok, 1]] = 1.0
    return TokenMDP(base.prompts, base.vocab_size, base.horizon, base.eos, base.gamma,
                    response_rewards=table, name=f"binary(seed={seed}, successes={successes})")


def with_policy(mdp: TokenMDP, seed: int, kind: str) -> Exact:
    return Exact(mdp, make_policy(kind, mdp, seed, **POLICY_OPTIONS.get(kind, {})), seed)


def rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float | None = None) -> float:
    """‖a − b‖ / ‖b‖, or / max(‖b‖, scale) for terms that may vanish (scale: e.g. ‖∇J‖)."""
    den = b.norm() if scale is None else max(float(b.norm()), float(scale))
    return float((a - b).norm() / den)


def identity_verdict(gap: float, margin: float = MARGIN) -> str:
    return "holds" if gap <= RTOL else "fails" if gap > margin else "unclear"


def vs(mean: torch.Tensor, target: torch.Tensor, margin: float = MARGIN, roundoff: float = 0.0
       ) -> tuple[str, float, float, float]:
    """(verdict, rel. bias, scale c, cosine) of an exact expectation against a target vector."""
    v, rb, c, _, cos = verdict_of(mean, target, roundoff)
    return ("unclear" if v in ("scaled", "biased") and rb <= margin else v), rb, c, cos


def est_verdict(rep, margin: float = MARGIN) -> str:
    """A report's verdict, with "scaled"/"biased" demoted to "unclear" when the bias is ≤ margin."""
    return "unclear" if rep.verdict in ("scaled", "biased") and rep.rel_bias <= margin else rep.verdict


def combine(verdicts: list[str]) -> str:
    """One verdict for several measurements of the same statement (all must say the same)."""
    return verdicts[0] if len(set(verdicts)) == 1 else "mixed (" + ", ".join(verdicts) + ")"


def expect(tab, policy, coef: torch.Tensor) -> torch.Tensor:
    """E Σ_t coef[y, t] ∇ℓ_t over the enumeration (coef (N, L), any per-token function of y)."""
    return exact.expected_score(policy, tab.enum, tab.prob[:, None] * coef * tab.enum.mask)


def prefix_U(tab) -> tuple[torch.Tensor, torch.Tensor]:
    """(U(W_{0,t}), U(W_{0,t−1})) along every response, each (N, L), t = 1..L (0 after the end)."""
    pv = tab.prefix_values(tab.enum)                                         # (N, L+1)
    m = tab.enum.mask
    return pv[:, 1:] * m, pv[:, :-1] * m


def discount(tab) -> torch.Tensor:
    """(1, L) γ^(t−1)."""
    return tab.mdp.gamma ** torch.arange(tab.enum.tokens.shape[1], dtype=torch.float64)[None, :]


def params_of(policy) -> list[torch.Tensor]:
    return [p for p in policy.parameters() if p.requires_grad]


def grad_of(value: torch.Tensor, policy) -> torch.Tensor:
    """Flat ∇_θ of a scalar built with autograd through the enumeration."""
    ps = params_of(policy)
    gs = torch.autograd.grad(value, ps, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, ps)])


def scored(tab, policy):
    """The enumeration with log-probs attached (for reading an estimator's advantages pathwise)."""
    return tab.enum.score(policy)


def moved(policy, seed: int, scale: float = 0.5):
    """A copy of the policy with every parameter moved by scale·rms(p)·N(0, 1) (seeded): θ ≠ θ_old."""
    new = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(10_007 + seed)
    with torch.no_grad():
        for p in params_of(new):
            rms = float(p.pow(2).mean().sqrt()) or 1.0
            p.add_(scale * rms * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return new


def fd_error(mdp: TokenMDP, policy, grad: torch.Tensor, seed: int, n_dirs: int = 3, h: float = 1e-5) -> float:
    """max over random unit directions v of |central FD of J along v − ⟨∇J, v⟩| / (atol + rtol|⟨∇J, v⟩|):
    ≤ 1 means finite differences agree within DESIGN §4's tolerance."""
    rtol, atol = FD_TOL
    ps = params_of(policy)
    theta = parameters_to_vector(ps).detach().clone()
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    try:
        for _ in range(n_dirs):
            v = torch.randn(theta.shape, generator=g, dtype=theta.dtype)
            v /= v.norm()
            vals = []
            for s in (1.0, -1.0):
                vector_to_parameters(theta + s * h * v, ps)
                with torch.no_grad():
                    vals.append(float(exact.objective(mdp, policy)))
            an = float(grad @ v)
            worst = max(worst, abs((vals[0] - vals[1]) / (2 * h) - an) / (atol + rtol * abs(an)))
    finally:
        vector_to_parameters(theta, ps)
    return worst


def true_outcome(verdict: str, checks: list[Check], figure: str, measured: dict) -> Outcome:
    """Outcome of a TRUE claim: its score is the largest gap among its equality checks."""
    gaps = [c.value for c in checks if c.op == "<="]
    return Outcome(verdict, figure, max(gaps) if gaps else 0.0, measured, checks)


def false_outcome(verdict: str, bias: float, checks: list[Check], figure: str, measured: dict) -> Outcome:
    """Outcome of a FALSE claim: its score is the (smallest) relative bias it shows."""
    return Outcome(verdict, figure, bias, measured, checks)


def merge(outs: dict[str, Outcome], truth: str) -> Outcome:
    """One Outcome from the same check on several MDPs (labels prefix the checks)."""
    checks = [Check(f"{label}: {c.name}", c.value, c.op, c.bound) for label, o in outs.items() for c in o.checks]
    score = (max if truth == "true" else min)(o.score for o in outs.values())
    return Outcome(combine([o.verdict for o in outs.values()]), "; ".join(f"{k}: {o.figure}" for k, o in outs.items()), score,
                   {label: o.measured for label, o in outs.items()}, checks)


def onehot(L: int, t: int) -> torch.Tensor:
    """(1, L) indicator of column t (position t + 1)."""
    e = torch.zeros(1, L, dtype=torch.float64)
    e[0, t] = 1.0
    return e


def many(ex: Exact, cases: list) -> list:
    """[(label, report)] for cases [(label, estimator, G, moments kwargs)]."""
    return [(label, ex.report(est, G, **kw)) for label, est, G, kw in cases]


def unbiased_outcome(reps: list, what: str) -> Outcome:
    """A TRUE claim that several estimators are unbiased: each is an equality check."""
    checks = [equal(f"{label}: unbiased", r.rel_bias) for label, r in reps]
    worst = max(r.rel_bias for _, r in reps)
    return true_outcome(combine([est_verdict(r) for _, r in reps]), checks, f"max rel. bias {worst:.1e} ({what})",
                        {label: {"rel_bias": r.rel_bias} for label, r in reps})


def scale_checks(reps: list, expected_c: Callable[[int], float], what: str) -> tuple[list[Check], dict]:
    checks = [equal(f"c = {what}, G={G}", abs(r.scale - expected_c(G))) for G, r in reps]
    return checks, {f"G={G}": {"c": r.scale, "expected_c": expected_c(G), "rel_bias": r.rel_bias,
                               "residual": r.residual} for G, r in reps}


def mean_only_grpo(ex: Exact, Gs: tuple) -> tuple[list, list[Check], dict]:
    reps = [(G, ex.report(estimator("grpo", std=False), G)) for G in Gs]
    checks, m = scale_checks(reps, lambda G: 1 - 1 / G, "1 − 1/G")
    return reps, checks, m
