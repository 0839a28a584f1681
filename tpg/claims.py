"""The paper's testable claims (PAPER.md §7) as executable checks, and the ``tpg verify`` command.

Every item of PAPER §7 is a ``Claim`` in ``CLAIMS``: T1–T18 (TRUE in exact arithmetic), F1–F11
(FALSE: a bias the formulas predict exactly) and N1–N2 (no exact truth value: measured, never a
disagreement). ``claim.check(mdp_seed, policy_kind) -> Result`` builds small seeded random MDPs
(``tpg.random_mdp``), a policy (``tpg.policies.make_policy``) and measures the claim with the
estimator registry and the exact engine (``tpg.verify.report``, ``tpg.exact``): an estimator is
never re-implemented here. Identities about exact quantities (U, Q, A along responses) are
expectations E Σ_t c_t ∇ℓ_t = ``tpg.exact.expected_score`` with weights P(y)·c_t.

Verdict vocabulary (``EXPECTED``):

- "holds"    an identity between exact quantities: relative gap ≤ RTOL (1e-10, ``tpg.verify``);
- "fails"    an identity that is false: relative gap > the claim's margin;
- "unbiased", "scaled", "biased"  ``tpg.verify``'s verdicts of an exact expectation against its
             target (∇J unless the claim says otherwise); "scaled"/"biased" only count when the
             relative bias exceeds the margin;
- "measured" a number with no exact truth value (PAPER §7, last list).

A gap in (RTOL, margin] is "unclear", which never agrees: TRUE claims must hold to float64
round-off, FALSE claims must show a bias far above it. ``MARGIN = 1e-4`` (relative) is 10^6 times
RTOL. Measured over seeds 0–199 with the tabular and log-linear policies: the smallest bias of any
FALSE check was 1.2e-3 (12× the margin; 4.1e-3 = 41× with the tabular policy) and the largest gap
of any equality check 5.5e-14 (1800× below RTOL); the tests re-measure this over
hypothesis-generated MDPs. Besides its verdict each claim states secondary ``Check``s (e.g. F1's
Eq. 26 equality); it agrees only if all of them pass.

``tpg verify`` runs every claim on ``--seeds`` seeded MDPs (default sizes: V = 3 with EOS, H = 3,
one or two prompts; each claim picks its own), prints one row per claim (the seed closest to
contradicting it), writes ``--json`` and exits 1 on any disagreement.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from tpg import exact
from tpg.draws import ExactDraws, TableCritic, exact_critic, perturbed_critic
from tpg.estimators import KL, estimator
from tpg.mdp import TokenMDP, TPGError, check_output_path, random_mdp
from tpg.policies import make_policy
from tpg.rollouts import greedy, response_log_prob
from tpg.verify import RTOL, report, roundoff_floor, verdict_of

MARGIN = 1e-4
FD_TOL = (1e-5, 1e-7)                 # central finite differences (rtol, atol): DESIGN §4
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
    """One item of PAPER §7.

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
        return {"T": "true", "F": "false"}.get(self.id[0], "none")

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
    return exact.flat(torch.autograd.grad(value, ps, allow_unused=True), ps)


def scored(tab, policy):
    """The enumeration with log-probs attached (for reading an estimator's advantages pathwise)."""
    return tab.enum.score(policy)


def moved(policy, seed: int, scale: float = 0.5):
    """A copy of the policy with every parameter moved by scale·rms(p)·N(0, 1) (seeded): θ ≠ θ_old."""
    import copy
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


# ====================================================================================== TRUE claims
def t1(ex: Exact) -> Outcome:
    rep = ex.report(estimator("reinforce"))
    fd = fd_error(ex.mdp, ex.pol, ex.grad, ex.seed)
    checks = [equal("E[RM Σ∇ℓ] = ∇J", rep.rel_bias), Check("finite differences (error / tolerance)", fd, "<=", 1.0)]
    return true_outcome(est_verdict(rep), checks,
                        f"rel. gap {rep.rel_bias:.1e}; FD err/tol {fd:.1e} (γ = {ex.mdp.gamma:g})",
                        {"rel_bias": rep.rel_bias, "fd_error_over_tol": fd, "gamma": ex.mdp.gamma})


def t2(ex: Exact) -> Outcome:
    gap = rel(ex.tab.closed_form().reshape(-1), ex.grad)
    return true_outcome(identity_verdict(gap), [equal("closed form = ∇J", gap)], f"rel. gap {gap:.1e}",
                        {"rel_gap": gap})


def t3(ex: Exact) -> Outcome:
    gamma = ex.mdp.gamma
    direct = rel(ex.expect(discount(ex.tab) * ex.tab.along(ex.tab.Q)), ex.grad)
    rep = ex.report(estimator("reinforce_oracle", gamma=gamma))
    checks = [equal(f"E Σ γ^(t−1) Q_t ∇ℓ_t = ∇J (γ={gamma:g})", direct),
              equal(f"reinforce_oracle unbiased (γ={gamma:g})", rep.rel_bias)]
    gap = max(direct, rep.rel_bias)
    return true_outcome(identity_verdict(gap), checks, f"max rel. gap {gap:.1e}",
                        {"gamma": gamma, "lemma1_gap": direct, "oracle_rel_bias": rep.rel_bias})


def merge(outs: dict[str, Outcome], truth: str) -> Outcome:
    """One Outcome from the same check on several MDPs (labels prefix the checks)."""
    checks = [Check(f"{label}: {c.name}", c.value, c.op, c.bound) for label, o in outs.items() for c in o.checks]
    score = (max if truth == "true" else min)(o.score for o in outs.values())
    return Outcome(combine([o.verdict for o in outs.values()]), "; ".join(f"{k}: {o.figure}" for k, o in outs.items()), score,
                   {label: o.measured for label, o in outs.items()}, checks)


def t3_seeded(seed: int, kind: str) -> Outcome:
    return merge({f"γ={g}": t3(setup(seed, kind, gamma=g)) for g in (0.8, 1.0)}, "true")


def t4(ex: Exact) -> Outcome:
    c = torch.randn(ex.mdp.num_states, generator=torch.Generator().manual_seed(ex.seed), dtype=torch.float64)  # (S,)
    zero = float(ex.expect(ex.tab.along(c)).norm() / ex.grad.norm())
    rep = ex.report(estimator("baseline", baseline=TableCritic(ex.mdp, c)))
    checks = [equal("‖E Σ c(s_{t−1}) ∇ℓ_t‖ / ‖∇J‖", zero), equal("RM − c(s_{t−1}) unbiased", rep.rel_bias)]
    return true_outcome(identity_verdict(max(zero, rep.rel_bias)), checks,
                        f"‖E Σ c∇ℓ‖/‖∇J‖ {zero:.1e}; baseline est. {rep.rel_bias:.1e}",
                        {"baseline_term_rel": zero, "baseline_estimator_rel_bias": rep.rel_bias})


def onehot(L: int, t: int) -> torch.Tensor:
    """(1, L) indicator of column t (position t + 1)."""
    e = torch.zeros(1, L, dtype=torch.float64)
    e[0, t] = 1.0
    return e


def t5(ex: Exact) -> Outcome:
    Ut, _ = prefix_U(ex.tab)
    gap = rel(ex.expect(Ut), ex.grad)
    checks = [equal("E Σ U(W_{0,t}) ∇ℓ_t = ∇J", gap)]
    L = Ut.shape[1]
    for t in range(L):                                                       # term by term
        lhs = ex.expect(ex.tab.enum.rm[:, None] * onehot(L, t))
        checks.append(equal(f"E[RM ∇ℓ_{t + 1}] = E[U(W_0,{t + 1}) ∇ℓ_{t + 1}] (rel. to max(‖·‖, ‖∇J‖))",
                            rel(ex.expect(Ut * onehot(L, t)), lhs, ex.grad.norm())))
    worst = max(c.value for c in checks)
    return true_outcome(identity_verdict(worst), checks,
                        f"rel. gap {gap:.1e}; term by term ≤ {worst:.1e} (γ = {ex.mdp.gamma:g})",
                        {"rel_gap": gap, "max_term_gap": worst})


def t6(ex: Exact) -> Outcome:
    Ut, Uprev = prefix_U(ex.tab)
    diff = Ut - Uprev                                                        # (N, L)
    gap = rel(ex.expect(diff), ex.grad)
    path = float((diff - discount(ex.tab) * ex.tab.along(ex.tab.A)).abs().max() / diff.abs().max())
    rep = ex.report(estimator("trepo", variant="all", K=1))
    checks = [equal("E Σ (U_t − U_{t−1}) ∇ℓ_t = ∇J", gap),
              equal("pathwise U_t − U_{t−1} = γ^(t−1) A_t (max abs / max)", path),
              equal("TRePO 'all' (exact continuations) unbiased", rep.rel_bias)]
    return true_outcome(identity_verdict(max(gap, path)), checks,
                        f"rel. gap {gap:.1e}; pathwise {path:.1e} (γ = {ex.mdp.gamma:g})",
                        {"rel_gap": gap, "pathwise_gap": path, "trepo_all_rel_bias": rep.rel_bias})


def gae_advantages_on(tab, policy, lam: float) -> torch.Tensor:
    """(N, L) the registry's GAE(γ, λ) advantages along every response with the exact critic."""
    est = estimator("gae", gamma=tab.mdp.gamma, lam=lam)
    ro, _ = ExactDraws(tab, policy, critic=exact_critic(tab)).fill(scored(tab, policy), est.needs)
    return est(ro).advantages.detach()


def t7(ex: Exact) -> Outcome:
    ez = Exact(ex.mdp.zra(), ex.pol)
    tab, tz = ex.tab, ez.tab
    grad_gap = rel(ez.grad, ex.grad)
    A, Az = tab.along(tab.A), tz.along(tz.A)
    a_gap = float((A - Az).abs().max() / A.abs().max())
    checks = [equal("∇J (true r) = ∇J (ZRA)", grad_gap), equal("A_t equal pathwise", a_gap)]
    for lam in (0.0, 0.5, 1.0):                                              # λ = 0 is the TD error δ_t
        g, gz = gae_advantages_on(tab, ex.pol, lam), gae_advantages_on(tz, ex.pol, lam)
        checks.append(equal(f"GAE(λ={lam}) advantages equal pathwise", float((g - gz).abs().max() / g.abs().max())))
    reach = tab.visit > 0
    v_gap = float((tab.V - tz.V)[reach].abs().max() / tab.V[reach].abs().max())
    checks.append(differ("V differs (max |V − V_ZRA| / max |V|)", v_gap))
    worst = max(c.value for c in checks if c.op == "<=")
    return true_outcome(identity_verdict(worst), checks,
                        f"max gap {worst:.1e}; V differs by {v_gap:.2g} (γ = {ex.mdp.gamma:g})",
                        {"grad_gap": grad_gap, "advantage_gap": a_gap, "value_difference": v_gap})


def t8(ex: Exact) -> Outcome:
    if ex.mdp.gamma != 1.0:
        raise TPGError("T8 (telescoping Σ_t A_t = RM − U(w_0)) is a statement for γ = 1")
    tab = ex.tab
    total = tab.along(tab.A).sum(1)                                          # (N,) Σ_t A_t
    target = tab.enum.rm - tab.along(tab.U)[:, 0]                            # RM − U(w_0)
    gap = float((total - target).abs().max() / target.abs().max())
    return true_outcome(identity_verdict(gap), [equal("Σ_t A_t = RM − U(w_0) for every W", gap)],
                        f"max pathwise gap {gap:.1e}", {"pathwise_gap": gap})


def t8_seeded(seed: int, kind: str) -> Outcome:
    return merge({"token rewards": t8(setup(seed, kind)), "ZRA": t8(setup(seed, kind, reward="zra"))}, "true")


def many(ex: Exact, cases: list) -> list:
    """[(label, report)] for cases [(label, estimator, G, moments kwargs)]."""
    return [(label, ex.report(est, G, **kw)) for label, est, G, kw in cases]


def unbiased_outcome(reps: list, what: str) -> Outcome:
    """A TRUE claim that several estimators are unbiased: each is an equality check."""
    checks = [equal(f"{label}: unbiased", r.rel_bias) for label, r in reps]
    worst = max(r.rel_bias for _, r in reps)
    return true_outcome(combine([est_verdict(r) for _, r in reps]), checks, f"max rel. bias {worst:.1e} ({what})",
                        {label: {"rel_bias": r.rel_bias} for label, r in reps})


def t9(ex: Exact) -> Outcome:
    exact_c, wrong = exact_critic(ex.tab), perturbed_critic(ex.tab, bias=0.3, noise=0.5, seed=ex.seed)
    cases = [(f"exact critic, λ={lam}", estimator("gae", lam=lam), 1, {"critic": exact_c}) for lam in (0.0, 0.3, 0.7, 1.0)]
    cases.append(("wrong critic, λ=1", estimator("gae", lam=1.0), 1, {"critic": wrong}))
    return unbiased_outcome(many(ex, cases), "5 configs")


def t10(ex: Exact) -> Outcome:
    return unbiased_outcome(many(ex, [(f"RLOO G={G}", estimator("rloo"), G, {}) for G in (2, 4)]), "G = 2, 4")


def t11(ex: Exact) -> Outcome:
    return unbiased_outcome(many(ex, [(f"ReMax G={G}", estimator("remax"), G, {}) for G in (1, 2)]), "G = 1, 2")


def scale_checks(reps: list, expected_c: Callable[[int], float], what: str) -> tuple[list[Check], dict]:
    checks = [equal(f"c = {what}, G={G}", abs(r.scale - expected_c(G))) for G, r in reps]
    return checks, {f"G={G}": {"c": r.scale, "expected_c": expected_c(G), "rel_bias": r.rel_bias,
                               "residual": r.residual} for G, r in reps}


def mean_only_grpo(ex: Exact, Gs: tuple) -> tuple[list, list[Check], dict]:
    reps = [(G, ex.report(estimator("grpo", std=False), G)) for G in Gs]
    checks, m = scale_checks(reps, lambda G: 1 - 1 / G, "1 − 1/G")
    return reps, checks, m


def t12(ex: Exact, Gs: tuple = (2, 3, 4)) -> Outcome:
    reps, checks, m = mean_only_grpo(ex, Gs)
    cs = ", ".join(f"{r.scale:.6g}" for _, r in reps)
    return true_outcome(combine([est_verdict(r) for _, r in reps]), checks,
                        f"c = {cs} for G = {', '.join(map(str, Gs))}; |c − (1 − 1/G)| ≤ {max(c.value for c in checks):.1e}", m)


def grpo_kappa(p: float, G: int, eps: float, ddof: int = 1) -> float:
    """κ = h(1) − h(0), h(r) = E_{R_−i}[(r − R̄)/(σ + ε)] for binary rewards with success rate p:
    the other G − 1 rewards are enumerated as k successes ~ Binomial(G − 1, p), independently of
    the estimator code (PAPER §3.2, claim T13). σ uses ``ddof``; an all-equal group gives 0."""
    def h(r: int) -> float:
        total = 0.0
        for k in range(G):
            n1 = r + k                                                       # successes in the group
            mean = n1 / G
            ss = n1 * (1 - mean) ** 2 + (G - n1) * mean**2
            sd = math.sqrt(ss / max(G - ddof, 1))
            total += math.comb(G - 1, k) * p**k * (1 - p) ** (G - 1 - k) * (r - mean) / (sd + eps)
        return total
    return h(1) - h(0)


def t13(ex: Exact) -> Outcome:
    eps = 1e-4
    p = ex.tab.J                                                             # P(RM = 1)
    reps = [(G, ex.report(estimator("grpo", eps=eps, ddof=1), G)) for G in (2, 3)]
    checks, m = [], {"success_rate": p, "eps": eps}
    for G, r in reps:
        kappa = grpo_kappa(p, G, eps)
        checks += [equal(f"κ (engine) = h(1) − h(0) (formula), G={G}", abs(r.scale - kappa) / abs(kappa)),
                   Check(f"κ ≥ 0, G={G}", -r.scale, "<=", 0.0)]
        m[f"G={G}"] = {"kappa": r.scale, "kappa_formula": kappa, "cosine": r.cosine, "residual": r.residual}
    fig = "; ".join(f"G={G}: κ = {r.scale:.6g} (formula {m[f'G={G}']['kappa_formula']:.6g})" for G, r in reps)
    return true_outcome(combine([est_verdict(r) for _, r in reps]), checks, fig + ", cosine 1", m)


def t14(ex: Exact) -> Outcome:
    wrong = perturbed_critic(ex.tab, bias=0.3, noise=0.5, seed=ex.seed)
    cases = [("RLOO G=2", "rloo", {}, 2, {}, {}),
             ("GAE λ=0.5, wrong critic, dual clip 3", "gae", {"lam": 0.5}, 1, {"critic": wrong}, {"dual_clip": 3.0})]
    checks = []
    for label, name, opts, G, kw, clip_kw in cases:
        ppo = exact.moments(estimator(name, loss="ppo", **clip_kw, **opts), ex.mdp, ex.pol, G, **kw).mean
        pg = exact.moments(estimator(name, loss="pg", **opts), ex.mdp, ex.pol, G, **kw).mean
        checks.append(equal(f"∇L_clip = PG form at θ = θ_old ({label})", rel(ppo, pg)))
    worst = max(c.value for c in checks)
    return true_outcome(identity_verdict(worst), checks, f"max rel. gap {worst:.1e} (2 estimators)",
                        {c.name: c.value for c in checks})


def t15(ex: Exact) -> Outcome:
    cases = [(f"TRePO 'all' K={K}", estimator("trepo", variant="all", K=K), 1, {}) for K in (1, 3)]
    return unbiased_outcome(many(ex, cases), "K = 1, 3")


def t16(ex: Exact) -> Outcome:
    cases = [("chunk, anchors {2} + T", estimator("trepo", variant="chunk", K=2,
                                                  anchors={"kind": "fixed", "positions": [2]}), 1, {}),
             ("chunk, every 2nd + T", estimator("trepo", variant="chunk", K=1, anchors={"kind": "every", "k": 2}), 1, {}),
             ("VinePPO step 2, unwhitened", estimator("vineppo", K=2, step=2, whiten=False), 1, {})]
    return unbiased_outcome(many(ex, cases), "3 configs, H = 4")


def t17(ex: Exact) -> Outcome:
    cases = [(f"subset q={q}, 1/q reweighting", estimator("trepo", variant="subset", K=1,
                                                         anchors={"kind": "bernoulli", "q": q}), 1, {})
             for q in (0.5, 0.3)]
    return unbiased_outcome(many(ex, cases), "q = 0.5, 0.3")


def t18(ex: Exact, G: int = 4) -> Outcome:
    """Binary RM with 0 < J < 1 (``binary_mdp``): along any RM = 0 response Σ_t A_t = −J ≠ 0 (T8)."""
    tab = ex.tab
    zero = torch.nonzero((tab.enum.rm == 0) & (tab.prob > 0))[:, 0]
    if len(zero) == 0:
        return Outcome("fails", "no response with RM = 0 in this MDP", 0.0, {"n_zero_responses": 0})
    A = tab.along(tab.A)                                                     # (N, L) exact A_t (γ = 1)
    rows = zero[torch.argsort(tab.prob[zero], descending=True)][:G]         # the likeliest RM = 0 responses
    rows = rows.repeat(G)[:G]                                                # (G,) with repeats if fewer
    ro = scored(tab, ex.pol).select(rows, group=torch.zeros(G, dtype=torch.long),
                                    batch=torch.zeros(G, dtype=torch.long), n_batches=1)
    adv = {name: float(estimator(name)(ro).advantages.abs().max()) for name in ("grpo", "rloo")}
    a_max = float(A[rows].abs().max())
    checks = [equal("every GRPO advantage is 0", adv["grpo"]), equal("every RLOO advantage is 0", adv["rloo"]),
              differ("max |A_t| along the group", a_max)]
    verdict = "holds" if all(c.ok for c in checks) else "fails"
    return Outcome(verdict, f"group of {G} with RM = 0: GRPO/RLOO weights 0, max |A_t| = {a_max:.3g}", a_max,
                   {"max_abs_A": a_max, "grpo_max_abs_adv": adv["grpo"], "rloo_max_abs_adv": adv["rloo"],
                    "group_probability": float(torch.prod(tab.prob[rows])), "responses": rows.tolist()}, checks)


# ====================================================================================== FALSE claims
def false_outcome(verdict: str, bias: float, checks: list[Check], figure: str, measured: dict) -> Outcome:
    """Outcome of a FALSE claim: its score is the (smallest) relative bias it shows."""
    return Outcome(verdict, figure, bias, measured, checks)


def f1(ex: Exact) -> Outcome:
    gamma = ex.mdp.gamma
    Ut, _ = prefix_U(ex.tab)
    q_form = ex.expect(ex.tab.along(ex.tab.Q))                               # E Σ Q_t ∇ℓ_t
    eq26 = ex.expect(Ut / discount(ex.tab))                                  # E Σ γ^−(t−1) U(W_0,t) ∇ℓ_t
    rep = ex.report(estimator("reinforce_oracle", gamma=gamma, discount_weight=False))
    v, rb, _, _ = ex.vs(q_form)
    checks = [differ("E Σ Q_t ∇ℓ_t vs ∇J (rel. bias)", rb), equal("E Σ Q_t ∇ℓ_t = Eq. 26", rel(q_form, eq26)),
              equal("practical estimator (G_t, no γ^(t−1)) = E Σ Q_t ∇ℓ_t", rel(rep.mean, q_form))]
    return false_outcome(combine([v, est_verdict(rep)]), rb, checks,
                         f"rel. bias {rb:.3g}; Eq. 26 gap {checks[1].value:.1e} (γ = {gamma:g})",
                         {"rel_bias": rb, "eq26_gap": checks[1].value, "estimator_gap": checks[2].value})


def f2(ex: Exact) -> Outcome:
    gamma = ex.mdp.gamma
    blog = ex.expect(discount(ex.tab) * ex.tab.enum.rm[:, None])             # E Σ γ^(t−1) RM ∇ℓ_t
    va, rba, _, _ = ex.vs(blog)
    # Part 2: the same RM under ZRA with an UNdiscounted final reward r_T = RM, i.e. a token-reward
    # MDP with RM on the terminal (state, token) pairs (``zra().response_rewards``): its RM' = γ^(T−1) RM.
    z = ex.mdp.zra()
    undisc = Exact(TokenMDP(z.prompts, z.vocab_size, z.horizon, z.eos, gamma, z.prompt_probs,
                            token_rewards=z.response_rewards), ex.pol)
    rep = undisc.report(estimator("reinforce_oracle", gamma=gamma), target=ex.grad)   # ∇E[RM]
    shifted = rel(rep.mean, undisc.grad)                                     # ∇E[γ^(T−1) RM]
    checks = [differ("E Σ γ^(t−1) RM ∇ℓ_t vs ∇J", rba),
              differ("E Σ γ^(t−1) G_t ∇ℓ_t vs ∇E[RM] (ZRA, r_T = RM)", rep.rel_bias),
              equal("E Σ γ^(t−1) G_t ∇ℓ_t = ∇E[γ^(T−1) RM]", shifted)]
    return false_outcome(combine([va, est_verdict(rep)]), min(rba, rep.rel_bias), checks,
                         f"rel. bias {rba:.3g} (blog form), {rep.rel_bias:.3g} (ZRA, γ^(T−1)); eq. gap {shifted:.1e}",
                         {"blog_rel_bias": rba, "zra_rel_bias": rep.rel_bias, "discounted_objective_gap": shifted})


def f3(ex: Exact, Gs: tuple = (2, 3)) -> Outcome:
    reps, checks, m = mean_only_grpo(ex, Gs)
    checks += [differ(f"rel. bias, G={G}", r.rel_bias) for G, r in reps]
    fig = ", ".join(f"G={G}: rel. bias {r.rel_bias:.4g} (c = {r.scale:.4g})" for G, r in reps)
    return false_outcome(combine([est_verdict(r) for _, r in reps]), min(r.rel_bias for _, r in reps), checks, fig, m)


# F4 measures non-parallelism by the residual after the best scale, ‖E ĝ − c∇J‖/‖∇J‖, against
# MARGIN. 1 − cos is reported too but not thresholded separately: it is a function of the same two
# numbers, 1 − cos = 1 − c/√(c² + residual²), so a second margin would add no information.


def two_rate_mdp(seed: int, kind: str, G: int = 6) -> Exact:
    """Two prompts with clearly different success rates under the policy (binary RM; V = 3 with
    EOS, H = 2: 7 responses per prompt). The policy depends only on the MDP's structure, so it is
    built first; then every pair of correct sets (both outcomes present in each prompt) is
    enumerated and the pair maximising |κ(J_0) − κ(J_1)|·√(J_0(1−J_0)J_1(1−J_1)) is kept: the
    per-prompt scales differ while both prompts keep gradient signal (∝ the RM variance)."""
    base = random_mdp(seed, vocab_size=3, horizon=2, eos=True, n_prompts=2, reward="binary")
    ex = with_policy(base, seed, kind)
    enum = ex.tab.enum
    cond = (ex.tab.prob / exact.prompt_weights(base, enum)).numpy()          # (N,) π(y|x)
    last = enum.lengths - 1
    rows_all = torch.arange(enum.batch_size)
    s_last = base.state_index(enum.prompt_idx, enum.tokens, enum.mask)[rows_all, last].numpy()
    t_last = enum.tokens[rows_all, last].numpy()
    rows = [np.nonzero(enum.prompt_idx.numpy() == x)[0] for x in range(2)]
    masks = np.array(list(itertools.product([0, 1], repeat=len(rows[0]))))[1:-1]  # (126, 7) correct sets
    J = np.stack([masks @ cond[r] for r in rows])                           # (2, 126) success rates
    kap = np.vectorize(lambda p: grpo_kappa(float(p), G, 1e-6))(J)          # (2, 126)
    sig = np.sqrt(J * (1 - J))
    score = np.abs(kap[0][:, None] - kap[1][None, :]) * sig[0][:, None] * sig[1][None, :]   # (126, 126)
    i, j = np.unravel_index(np.argmax(score), score.shape)
    table = np.zeros((base.num_states, base.vocab_size))
    for r, mk in ((rows[0], masks[i]), (rows[1], masks[j])):
        table[s_last[r], t_last[r]] = mk
    mdp = TokenMDP(base.prompts, base.vocab_size, base.horizon, base.eos, base.gamma,
                   response_rewards=table, name=f"two-rate-binary(seed={seed})")
    return Exact(mdp, ex.pol)


def f4_seeded(seed: int, kind: str) -> Outcome:
    cases = [("1 prompt, continuous RM, G=2", dict(reward="zra"), 2),
             ("1 prompt, continuous RM, G=3", dict(reward="zra"), 3),
             ("2 prompts, binary RM, different success rates, G=6", None, 6)]
    checks, m, verdicts = [], {}, []
    for label, kw, G in cases:
        # κ(p) of std-GRPO depends on the success rate p only for G ≥ 4, and only through |p − 1/2|
        # (κ = 1/√2 for G = 2, 2/√3 for G = 3 with ddof 1): hence G = 6.
        ex = setup(seed, kind, **kw) if kw else two_rate_mdp(seed, kind, G)
        r = ex.report(estimator("grpo"), G)
        verdicts.append(est_verdict(r))
        checks.append(differ(f"residual after best scale ({label})", r.residual))
        m[label] = {"residual": r.residual, "cosine": r.cosine, "scale": r.scale, "rel_bias": r.rel_bias}
        if kw is None:                                                      # per-prompt κ_x differ
            kx = [grpo_kappa(float(ex.tab.J_prompt[x]), G, 1e-6) for x in range(2)]
            checks.append(differ("|κ_0 − κ_1| (per-prompt scales)", abs(kx[0] - kx[1])))
            m[label]["kappa_per_prompt"] = kx
    fig = "; ".join(f"{k}: 1 − cos {1 - v['cosine']:.2g}" for k, v in m.items())
    return false_outcome(combine(verdicts), min(v["residual"] for v in m.values()), checks, fig, m)


def f5(ex: Exact, b: float = 0.5) -> Outcome:
    enum = ex.tab.enum
    est = estimator("baseline", baseline=lambda ro: torch.full_like(ro.mask, b), agg="seq-mean-token-mean")
    # Target ∇_θ E[(R − b)/|y|] with b fixed, by autograd through the enumeration; |y| + 1e-8 is
    # verl's seq-mean-token-mean normaliser exactly.
    p = exact.prompt_weights(ex.mdp, enum) * response_log_prob(ex.pol, enum).exp()
    target = grad_of((p * (enum.rm - b) / (enum.mask.sum(1) + 1e-8)).sum(), ex.pol)   # float64 lengths
    rep = ex.report(est, target=target)
    v, rb, _, _ = ex.vs(rep.mean)
    checks = [equal("E[(R − b)/|y| Σ∇ℓ] = ∇E[(R − b)/|y|]", rep.rel_bias), differ("vs ∇J (rel. bias)", rb)]
    return false_outcome(v, rb, checks, f"rel. bias {rb:.3g}; = ∇E[(R−b)/|y|] to {rep.rel_bias:.1e} (b = {b})",
                         {"rel_bias": rb, "target_gap": rep.rel_bias, "b": b})


def f6(ex: Exact, beta: float = 0.1) -> Outcome:
    ref = moved(ex.pol, ex.seed + 7919)                                      # a different policy of the same kind
    enum = ex.tab.enum
    logp = response_log_prob(ex.pol, enum)                                    # (N,) with autograd
    with torch.no_grad():
        ref_logp = response_log_prob(ref, enum)
    rho = exact.prompt_weights(ex.mdp, enum)
    # J − β KL(π‖π_ref), sequence level, by autograd through the enumeration.
    target = grad_of((rho * logp.exp() * (enum.rm - beta * (logp - ref_logp))).sum(), ex.pol)
    rep = ex.report(estimator("reinforce", kl=KL(coef=beta, kind="k1", where="reward")), target=target, ref=ref)
    v, rb, _, _ = ex.vs(rep.mean)
    checks = [equal("E[ĝ] = ∇(J − β KL(π‖π_ref))", rep.rel_bias), differ("vs ∇J (rel. bias)", rb)]
    return false_outcome(v, rb, checks, f"rel. bias {rb:.3g}; = ∇(J − βKL) to {rep.rel_bias:.1e} (β = {beta})",
                         {"rel_bias": rb, "kl_objective_gap": rep.rel_bias, "beta": beta})


def f7(old: Exact) -> Outcome:
    ex = Exact(old.mdp, moved(old.pol, old.seed), old.seed)                  # θ after an update; θ_old samples
    rep = ex.report(estimator("rloo", loss="ppo", clip=0.2), 2, old_policy=old.pol)
    checks = [differ("PPO-clip gradient at θ ≠ θ_old vs ∇J(θ)", rep.rel_bias)]
    return false_outcome(est_verdict(rep), rep.rel_bias, checks, f"rel. bias {rep.rel_bias:.3g} (RLOO G=2, ε = 0.2)",
                         {"rel_bias": rep.rel_bias, "cosine": rep.cosine})


def f8(ex: Exact) -> Outcome:
    wrong = perturbed_critic(ex.tab, bias=0.3, noise=0.5, seed=ex.seed)
    bad = ex.report(estimator("gae", lam=0.5), critic=wrong)
    ok_exact = ex.report(estimator("gae", lam=0.5), critic=exact_critic(ex.tab))
    ok_lam1 = ex.report(estimator("gae", lam=1.0), critic=wrong)
    checks = [differ("GAE λ=0.5, wrong critic vs ∇J", bad.rel_bias),
              equal("GAE λ=0.5, exact critic unbiased (T9)", ok_exact.rel_bias),
              equal("GAE λ=1, wrong critic unbiased (T9)", ok_lam1.rel_bias)]
    return false_outcome(est_verdict(bad), bad.rel_bias, checks, f"rel. bias {bad.rel_bias:.3g} (λ = 0.5)",
                         {"rel_bias": bad.rel_bias, "exact_critic_rel_bias": ok_exact.rel_bias,
                          "lambda1_rel_bias": ok_lam1.rel_bias})


def anchored(tab, positions: list[int]) -> torch.Tensor:
    """(N, L) indicator of t ∈ S(W): the fixed positions that lie in the response, plus the end T."""
    L = tab.enum.tokens.shape[1]
    t = torch.arange(1, L + 1)[None, :]
    T = tab.enum.lengths[:, None]
    fixed = torch.zeros_like(t, dtype=torch.bool)
    for p in positions:
        fixed |= t == p
    return ((fixed & (t <= T)) | (t == T)).to(torch.float64)


def chunk_lengths(tab, positions: list[int]) -> torch.Tensor:
    """(N, L) length L_j = t_j − t_{j−1} of the chunk (t_{j−1}, t_j] holding position t; the
    anchors are 0, the fixed positions and the end T (fixed-length responses: T = H)."""
    L = tab.enum.tokens.shape[1]
    bounds = sorted({0, *positions})
    T = tab.enum.lengths
    out = torch.zeros(tab.enum.tokens.shape, dtype=torch.float64)
    for t in range(1, L + 1):
        lo = max(b for b in bounds if b < t)
        hi = torch.clamp(T, max=min([b for b in bounds if b >= t] + [L]))   # (N,)
        out[:, t - 1] = (hi - lo).to(torch.float64)
    return out


def f9_seeded(seed: int, kind: str) -> Outcome:
    interp = estimator("trepo", variant="interp", K=1, anchors={"kind": "fixed", "positions": [1]})
    # (a) fixed length: E[ĝ] = E Σ_{t∈S} A_t ∇ℓ_t, S = {1, H}: positions 2..H−1 are interpolated.
    ex = setup(seed, kind, eos=False, vocab_size=2, horizon=4)
    Ut, Uprev = prefix_U(ex.tab)
    fixed = ex.report(interp)
    only = rel(fixed.mean, ex.expect((Ut - Uprev) * anchored(ex.tab, [1])))
    # (c) value interpolation, anchors {1, H}: E[ĝ] = Σ_t E[A_t ∇ℓ_t] / L_j(t) on fixed lengths.
    val = ex.report(estimator("trepo", variant="value_interp", K=1, anchors={"kind": "fixed", "positions": [1]}))
    val_gap = rel(val.mean, ex.expect((Ut - Uprev) / chunk_lengths(ex.tab, [1])))
    # (b) variable length (EOS), T always an anchor: the interpolation weight x = (t − 1)/(T − 1)
    # depends on the future end T, so not even the anchors-only gradient.
    ev = setup(seed, kind, horizon=4)
    Ut_v, Uprev_v = prefix_U(ev.tab)
    var = ev.report(interp)
    var_only = rel(var.mean, ev.expect((Ut_v - Uprev_v) * anchored(ev.tab, [1])))
    checks = [differ("interp, fixed length vs ∇J", fixed.rel_bias),
              equal("interp, fixed length = anchors-only E Σ_{t∈S} A_t ∇ℓ_t", only),
              differ("interp, variable length vs anchors-only", var_only),
              differ("interp, variable length vs ∇J", var.rel_bias),
              differ("value interpolation vs ∇J", val.rel_bias),
              equal("value interpolation = Σ_t E[A_t ∇ℓ_t] / L_j", val_gap)]
    bias = min(fixed.rel_bias, var_only, var.rel_bias, val.rel_bias)
    return false_outcome(combine([est_verdict(fixed), est_verdict(var), est_verdict(val)]), bias, checks,
                         f"rel. bias {fixed.rel_bias:.3g} (fixed), {var.rel_bias:.3g} (EOS), {val.rel_bias:.3g} "
                         f"(value interp.); anchors-only gap {only:.1e}",
                         {"fixed_rel_bias": fixed.rel_bias, "fixed_anchors_only_gap": only,
                          "variable_rel_bias": var.rel_bias, "variable_vs_anchors_only": var_only,
                          "value_interp_rel_bias": val.rel_bias, "value_interp_formula_gap": val_gap})


def f10(ex: Exact, K: int = 2) -> Outcome:
    est = estimator("trepo", variant="all", K=K, self_inclusive=True)
    rep = ex.report(est)
    fresh = exact.moments(estimator("trepo", variant="all", K=K), ex.mdp, ex.pol, 1)
    checks = [differ("self-inclusive baseline vs ∇J", rep.rel_bias), equal("c = K/(K+1)", abs(rep.scale - K / (K + 1)))]
    selfW = exact.moments(est, ex.mdp, ex.pol, 1).W
    L = ex.tab.enum.tokens.shape[1]
    for t in range(L):                                                       # the baseline term alone, per position
        bias_t = exact.expected_score(ex.pol, ex.tab.enum, (selfW - fresh.W) * onehot(L, t))
        want = -ex.expect(ex.tab.enum.rm[:, None] * onehot(L, t)) / (K + 1)
        checks.append(equal(f"baseline-term bias at t={t + 1} = −E[RM ∇ℓ_t]/(K+1)", rel(bias_t, want, ex.grad.norm())))
    return false_outcome(est_verdict(rep), rep.rel_bias, checks,
                         f"rel. bias {rep.rel_bias:.4g}: c = {rep.scale:.6g} = K/(K+1), K = {K}",
                         {"rel_bias": rep.rel_bias, "scale": rep.scale, "K": K})


def f11(ex: Exact) -> Outcome:
    tab = ex.tab
    g_rm = float(greedy(ex.mdp, ex.pol, torch.arange(1)).rm[0])
    U0 = float(tab.J_prompt[0])
    sd = float((tab.prob * (tab.enum.rm - U0) ** 2).sum().sqrt())            # sd of RM under π
    gap = abs(g_rm - U0) / sd
    rep = ex.report(estimator("remax"))
    checks = [differ("|RM(ŷ) − U(x)| / sd(RM)", gap), equal("ReMax unbiased", rep.rel_bias)]
    return false_outcome(identity_verdict(gap), gap, checks,
                         f"|RM(ŷ) − U(x)| = {gap:.3g} sd(RM); ReMax rel. bias {rep.rel_bias:.1e}",
                         {"rm_greedy": g_rm, "U_x": U0, "gap_in_sd": gap, "remax_rel_bias": rep.rel_bias})


# ====================================================================================== no exact truth value
def n1(ex: Exact) -> Outcome:
    roots = torch.as_tensor(ex.mdp.state_table()["prompt"]) * ex.mdp.states_per_prompt
    out = {}
    for label, table in (("U(s_{t−1})", ex.tab.U), ("U(x)", ex.tab.U[roots])):
        r = ex.report(estimator("baseline", baseline=TableCritic(ex.mdp, table)), cov="trace")
        out[label] = {"cov_trace": r.cov_trace, "rel_bias": r.rel_bias}
    ratio = out["U(s_{t−1})"]["cov_trace"] / out["U(x)"]["cov_trace"]
    out["ratio"], out["per_position_lower"] = ratio, ratio < 1
    return Outcome("measured", f"tr Cov: per-position / prompt baseline = {ratio:.4g}", ratio, out)


def n2(ex: Exact, G: int = 2) -> Outcome:
    cases = [("RLOO (MC sample)", estimator("rloo"), {}),
             ("GAE λ=0, exact critic", estimator("gae", lam=0.0), {"critic": exact_critic(ex.tab)}),
             ("GAE λ=0, critic noise 0.5", estimator("gae", lam=0.0), {"critic": perturbed_critic(ex.tab, 0.0, 0.5, ex.seed)})]
    out = {}
    for label, est, kw in cases:
        r = ex.report(est, G, cov="trace", **kw)
        out[label] = {"mse": r.cov_trace + float(r.bias @ r.bias), "cov_trace": r.cov_trace, "rel_bias": r.rel_bias}
    base = out["RLOO (MC sample)"]["mse"]
    fig = "; ".join(f"{k}: {v['mse'] / base:.3g}" for k, v in list(out.items())[1:]) + " (MSE / RLOO's, G = 2)"
    return Outcome("measured", fig, 0.0, out)


# ====================================================================================== the registry
TABULAR_ONLY = "the closed form is a statement about the tabular softmax's per-state logits"


def binary6(seed: int, kind: str) -> Exact:
    """One prompt, binary RM, exactly 6 of its 15 responses correct (so 0 < J < 1 surely)."""
    return with_policy(binary_mdp(seed, (6,)), seed, kind)


C = Claim
CLAIMS: dict[str, Claim] = {c.id: c for c in [
    C("T1", "Score function: ∇J = E[RM(W) Σ_t ∇ℓ_t], matching finite differences, for any γ",
      "PAPER §2 Thm 1 / §7.1", "unbiased", t1, {"gamma": 0.8}),
    C("T2", "Closed form for the tabular softmax: ∂J/∂θ[s,a] = ρ(s) π(a|s) (U(s⊕a) − U(s))",
      "PAPER §2 (extra identities), §7.2", "holds", t2, {"gamma": 0.9}, policies=("tabular",), why_not=TABULAR_ONLY),
    C("T3", "Lemma 1: E Σ_t γ^(t−1) Q_t ∇ℓ_t = ∇J for every γ ∈ (0, 1]", "PAPER Eq. 4", "holds", t3,
      seeded=t3_seeded),
    C("T4", "Lemma 2: E Σ_t c(W_{0,t−1}) ∇ℓ_t = 0 for any prefix function c", "PAPER Lemma 2", "holds", t4),
    C("T5", "Theorem 1: E Σ_t U(W_{0,t}) ∇ℓ_t = ∇J, and term by term E[RM ∇ℓ_t] = E[U(W_{0,t}) ∇ℓ_t]",
      "PAPER Eq. 21", "holds", t5, {"gamma": 0.8}),
    C("T6", "Theorem 2: E Σ_t (U(W_{0,t}) − U(W_{0,t−1})) ∇ℓ_t = ∇J; pathwise U_t − U_{t−1} = γ^(t−1) A_t",
      "PAPER Eq. 28", "holds", t6, {"gamma": 0.8}),
    C("T7", "Decomposition invariance (true r vs ZRA): ∇J, A_t, δ_t and GAE(λ) advantages equal; V differs",
      "PAPER §2 (extra identities), §7.7", "holds", t7, {"gamma": 0.8}),
    C("T8", "Telescoping (γ = 1): Σ_t A_t = RM(W) − U(w_0) for every W", "PAPER §7.8", "holds", t8,
      seeded=t8_seeded),
    C("T9", "Exact-critic GAE (γ = 1) is unbiased for every λ; a wrong critic is unbiased at λ = 1",
      "PAPER §3.2 (PPO), §7.9", "unbiased", t9),
    C("T10", "RLOO is unbiased", "PAPER §3.2, §7.10", "unbiased", t10, {"n_prompts": 2}),
    C("T11", "ReMax (greedy baseline) is unbiased", "PAPER §3.2, §7.11", "unbiased", t11),
    C("T12", "GRPO mean-only, self-inclusive: E[ĝ] = (1 − 1/G) ∇J exactly", "PAPER §3.2 (1), §7.12",
      "scaled", t12, {"n_prompts": 2}),
    C("T13", "GRPO with std, one prompt, binary RM: E[ĝ] = κ∇J, κ = h(1) − h(0) ≥ 0, cosine 1",
      "PAPER §3.2 (2), §7.13", "scaled", t13, build=binary6),
    C("T14", "PPO clipped surrogate at θ = θ_old: ∇L_clip = E Σ_t Â_t ∇ℓ_t (clipping inactive)",
      "PAPER §7.14", "holds", t14),
    C("T15", "MC advantages at every position, Â_t = v̂_t − v̂_{t−1} from K ≥ 1 fresh rollouts: unbiased",
      "PAPER §4 reading 1, §7.15", "unbiased", t15),
    C("T16", "Chunk (value-anchored, VinePPO-like) advantages, fixed anchors or stopping times: unbiased",
      "PAPER §4 reading 4, §7.16", "unbiased", t16, {"horizon": 4}),
    C("T17", "Random anchor subset with 1/q_t reweighting: unbiased", "PAPER §4 reading 2, §7.17",
      "unbiased", t17),
    C("T18", "All-zero rewards: a group with every RM = 0 (GRPO/RLOO weights 0) where exact A_t ≠ 0",
      "PAPER §3.1 (Perplexity), §7.18", "holds", t18, build=binary6),
    C("F1", "Dropping γ^(t−1) (γ < 1): E Σ_t Q_t ∇ℓ_t ≠ ∇J; it equals Eq. 26, E Σ_t γ^−(t−1) U(W_{0,t}) ∇ℓ_t",
      "PAPER Eq. 26, §7 F1", "biased", f1, {"gamma": 0.8}),
    C("F2", "Blog form E Σ γ^(t−1) RM ∇ℓ_t ≠ ∇J (γ < 1); ZRA with undiscounted r_T gives ∇E[γ^(T−1) RM] ≠ ∇E[RM]",
      "PAPER §2 (Thm 1, blog), §7 F2", "biased", f2, {"gamma": 0.8}),
    C("F3", "GRPO mean-only is not unbiased: the factor is 1 − 1/G (direction right)", "PAPER §7 F3",
      "scaled", f3, {"n_prompts": 2}),
    C("F4", "Std normalisation is not a smaller learning rate: not parallel to ∇J for ≥ 3 reward values "
      "or for two prompts with different success rates", "PAPER §3.1, §7 F4", "biased", seeded=f4_seeded),
    C("F5", "Length normalisation: E[(R − b)/|y| Σ∇ℓ] = ∇E[(R − b)/|y|] (b fixed) ≠ ∇J when |y| varies",
      "PAPER §3.2 (3), §7 F5", "biased", f5),
    C("F6", "KL in reward (k1, sequence level): expected update = ∇(J − β KL(π‖π_ref)) ≠ ∇J",
      "PAPER §3.2 (4), §7 F6", "biased", f6),
    C("F7", "PPO after the policy moved (θ ≠ θ_old): clipped-surrogate gradient ≠ ∇J(θ)",
      "PAPER §3.2 (5), §7 F7", "biased", f7),
    C("F8", "GAE with λ < 1 and a wrong critic is biased (exact critic, or λ = 1, are not)",
      "PAPER §3.2 (PPO), §7 F8", "biased", f8),
    C("F9", "TRePO linear interpolation of anchor advantages: interpolated positions contribute 0 (fixed "
      "length), not even anchors-only with EOS; value interpolation / L_j biased", "PAPER §4 readings 3, 5; "
      "§7 F9", "biased", seeded=f9_seeded),
    C("F10", "Self-inclusive MC baseline ((Σ_k R_k + RM)/(K+1)): baseline term biased by −E[RM ∇ℓ_t]/(K+1), "
      "so E[ĝ] = K/(K+1) ∇J", "PAPER §4 reading 1, §7 F10", "scaled", f10),
    C("F11", "ReMax's baseline does not estimate U(w_0): RM(greedy) ≠ U(x), yet ReMax is unbiased",
      "PAPER §3.2 (ReMax), §7 F11", "fails", f11),
    C("N1", "Variance: per-position baseline U(W_{0,t−1}) vs prompt baseline U(w_0) (exact tr Cov)",
      "PAPER §6, §7 (no exact truth value)", "measured", n1),
    C("N2", "Error: critic estimate of Q (GAE λ = 0) vs a single MC sample (RLOO), exact MSE",
      "PAPER §3.1, §7 (no exact truth value)", "measured", n2),
]}
del C


# ====================================================================================== running
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny tensors: thread hand-offs cost more than they save (≈ 5× here)
    try:
        return _run(claims, args, seeds)
    finally:
        torch.set_num_threads(threads)


def _run(claims: list[Claim], args, seeds: list[int]) -> int:
    t0 = time.perf_counter()
    print(f"tpg verify: {len(claims)} claims × {len(seeds)} seeded MDPs (seeds {seeds[0]}–{seeds[-1]}), "
          f"policy {args.policy}; TRUE claims to rtol {RTOL:g}, FALSE claims need a bias > {MARGIN:g}")
    print(f"{'id':<4} {'expected':<9} {'verdict':<9} {'result':<8} measured (worst seed)")
    runs, skipped = [], []
    for c in claims:
        if args.policy not in c.policies:
            skipped.append({"id": c.id, "reason": c.why_not})
            print(f"{c.id:<4} {c.expected:<9} {'-':<9} {'skipped':<8} not for --policy {args.policy}: {c.why_not}")
            continue
        run = run_claim(c, args.policy, seeds)
        runs.append(run)
        print(format_row(run), flush=True)
    n_ok = sum(r.agree for r in runs)
    n_bad = len(runs) - n_ok
    secs = time.perf_counter() - t0
    extra = f", {len(skipped)} skipped" if skipped else ""
    print(f"{len(runs)} claims: {n_ok} agree, {n_bad} disagree{extra} ({secs:.1f} s)")
    if args.json:
        write_json(args.json, runs, skipped, args.policy, seeds, secs)
    return 0 if n_bad == 0 else 1


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
