"""Verdicts: is an estimator unbiased, a scaled gradient, or biased — with the exact bias vector.

``report(est, mdp, policy, G)`` compares the exact E[ĝ] (``tpg.exact.moments``) with the exact
∇J (``tpg.exact.gradient``). The verdict thresholds are tied to float64 round-off, not to taste:

- the engine's own round-off floor δ is measured on every call, as the relative gap between two
  independent float64 routes to ∇J (autograd through J = Σ P(y) RM, and the score-function sum
  Σ P(y) RM ∇log P(y) through the estimator machinery);
- a quantity is called zero when it is below ``RTOL = 1e-10`` relative to ‖∇J‖. RTOL is about
  4.5·10^5 float64 epsilons: far above δ (≈ 1e-16 – 1e-14 on tpg's MDPs, printed in every report)
  and far below the smallest bias of any FALSE claim (≥ 1e-3 on the default MDPs). If δ ever
  exceeds RTOL/100 the verdict is "inconclusive" rather than a guess.

Verdicts: "unbiased" (‖E ĝ − ∇J‖ ≤ RTOL‖∇J‖); "scaled" (E ĝ = c∇J with c > 0, c ≠ 1: the
residual after the best scale c = ⟨E ĝ, ∇J⟩/‖∇J‖² is ≤ RTOL‖∇J‖); "biased" otherwise — including
an expected update that is zero or points against ∇J (c ≤ 0), which no learning rate can fix.

``mc_check`` is the designed Monte Carlo counterpart (DESIGN §4) for jobs too big to enumerate and
for the sampler path itself: z-tests on fixed projections of ĝ with a total false-fail rate α
(Bonferroni), tolerances from the exact variance when the job enumerates, and the smallest
detectable bias reported beside every verdict. The paper's claims are in ``tpg.claims``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from tpg import exact
from tpg.mdp import TokenMDP, TPGError
from tpg.rollouts import enumerate_responses

RTOL = 1e-10
VERDICTS = ("unbiased", "scaled", "biased", "inconclusive")


@dataclass
class Report:
    name: str
    grad: torch.Tensor           # ∇J (D,)
    mean: torch.Tensor           # E[ĝ] (D,)
    bias: torch.Tensor           # E[ĝ] − ∇J (D,)
    rel_bias: float              # ‖bias‖ / ‖∇J‖
    scale: float                 # c = ⟨E ĝ, ∇J⟩ / ‖∇J‖²
    residual: float              # ‖E ĝ − c∇J‖ / ‖∇J‖
    cosine: float
    verdict: str
    roundoff: float              # measured δ (see module docstring)
    cov_trace: float | None = None
    notes: tuple = ()
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        v = self.verdict if self.verdict != "scaled" else f"scaled (c = {self.scale:.6g})"
        return (f"{self.name}: {v}; rel. bias {self.rel_bias:.3e}, residual after scaling {self.residual:.3e}, "
                f"cosine {self.cosine:.12f}, round-off δ {self.roundoff:.1e}")

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not isinstance(v, torch.Tensor)}
        d["bias_norm"] = float(self.bias.norm())
        return d


def verdict_of(mean: torch.Tensor, grad: torch.Tensor, roundoff: float = 0.0, rtol: float = RTOL
               ) -> tuple[str, float, float, float, float]:
    """(verdict, rel_bias, scale, residual, cosine) of an expected update against ∇J."""
    gn = float(grad.norm())
    if not math.isfinite(gn) or not torch.isfinite(mean).all():
        raise TPGError("non-finite gradient or expectation: the MDP or estimator produced NaN/inf")
    if gn == 0.0:
        raise TPGError("∇J is exactly zero for this MDP and policy (e.g. constant rewards): no verdict is "
                       "possible; use another seed or reward kind")
    rel = float((mean - grad).norm()) / gn
    c = float(mean @ grad) / gn**2
    resid = float((mean - c * grad).norm()) / gn
    mn = float(mean.norm())
    cos = float(mean @ grad) / (mn * gn) if mn > 0 else 0.0
    if roundoff > rtol / 100:
        return "inconclusive", rel, c, resid, cos
    if rel <= rtol:
        return "unbiased", rel, c, resid, cos
    if resid <= rtol and c > rtol:          # parallel AND pointing the right way
        return "scaled", rel, c, resid, cos
    return "biased", rel, c, resid, cos     # incl. a zero or reversed expected update (c ≤ 0)


def roundoff_floor(mdp: TokenMDP, policy, grad: torch.Tensor | None = None) -> float:
    """δ: relative gap between autograd ∇J and the score-function sum Σ P(y) RM(y) ∇log P(y)."""
    tab = exact.tables(mdp, policy)
    grad = exact.gradient(mdp, policy, tab.enum) if grad is None else grad
    W = (tab.prob * tab.enum.rm)[:, None] * tab.enum.mask                              # (N, L)
    sf = exact.expected_score(policy, tab.enum, W)
    return float((sf - grad).norm() / grad.norm().clamp(min=1e-300))


def report(est, mdp: TokenMDP, policy, G: int = 1, *, name: str | None = None, cov: str | None = "trace",
           rtol: float = RTOL, target: torch.Tensor | None = None, roundoff: float | None = None, **kw) -> Report:
    """Exact verdict for any estimator on an MDP, a policy and a group size G: bias vector, relative
    bias, best scale, residual, cosine and "unbiased" / "scaled" / "biased".

    Bring your own estimator: ``est`` is a registry ``Estimator`` or ANY callable
    ``est(ro: Rollouts) -> loss`` (a scalar tensor, or an ``EstimatorOutput``) whose gradient with
    respect to ``ro.logp`` (B, L) is −Σ c ∇logπ, as in verl/TRL (``-(adv.detach() * ro.logp).sum()``).
    The engine hands it many possible batches stacked in one ``Rollouts``: rows carry ``ro.group``
    (G responses of one prompt draw) and ``ro.batch`` (an independent batch; ``ro.n_batches`` of them),
    so the loss must be the SUM over batches of each batch's own loss — reduce per ``ro.batch``
    (for G = 1 a plain sum over rows is right). Optional attributes ``needs`` (e.g.
    ``{"greedy": True}``, ``{"continuations": K}``) and ``multilinear`` request extra draws as
    for registered estimators. Example, a baseline that wrongly reads the action w_t::

        def mine(ro):                                  # G = 1
            s = mdp.state_index(ro.prompt_idx, ro.tokens, ro.mask)
            adv = (ro.rm[:, None] - b[s, ro.tokens]) * ro.mask
            return -(adv * ro.logp).sum()
        report(mine, mdp, policy, 1).verdict           # "biased", with .bias = E[ĝ] − ∇J

    ``target`` replaces ∇J when a claim compares with another exact vector (e.g. ∇(J − β KL)).
    ``roundoff`` passes a δ already measured by ``roundoff_floor(mdp, policy)`` (callers that make
    many reports on one MDP and policy measure it once).
    Other keyword arguments go to ``tpg.exact.moments`` (n_prompts, route, old_policy, critic, ref).
    """
    grad = exact.gradient(mdp, policy) if target is None else target
    delta = roundoff_floor(mdp, policy) if roundoff is None else float(roundoff)
    mo = exact.moments(est, mdp, policy, G, cov=cov, **kw)
    v, rel, c, resid, cos = verdict_of(mo.mean, grad, delta, rtol)
    label = name or getattr(est, "name", None) or getattr(est, "__name__", "estimator")
    return Report(label, grad, mo.mean, mo.mean - grad, rel, c, resid, cos, v, delta, mo.cov_trace, mo.notes)


# ====================================================================================== designed Monte Carlo
# For jobs too big to enumerate, and to test the sampler path itself: n independent batches are
# sampled (tpg.rollouts.sample + tpg.draws.MonteCarloDraws), each batch's ĝ_b = −∇loss is projected
# on K fixed directions u_k, and H0: E⟨u_k, ĝ⟩ = ⟨u_k, target⟩ for every k is tested (DESIGN §4).
@dataclass
class MCReport:
    """A designed Monte Carlo check (``mc_check``); per-direction arrays have shape (K,)."""
    name: str
    n_batches: int
    variance: str                 # "exact": σ_k from tpg.exact.moments (z-test); "sample": Student t (tpg.mc)
    alpha: float                  # total false-fail rate, split over the K directions (Bonferroni)
    beta: float                   # false-pass rate at the detectable bias
    target: np.ndarray            # ⟨u_k, target⟩
    mean: np.ndarray              # sample mean of ⟨u_k, ĝ_b⟩ over the batches
    se: np.ndarray                # its standard error
    stat: np.ndarray              # (mean − target) / se
    threshold: float              # the check fails when some |stat| exceeds it
    detectable: np.ndarray        # a bias ≥ this along u_k is detected with probability ≥ 1 − β
    exact_bias: np.ndarray | None  # ⟨u_k, E ĝ − target⟩ by the exact engine, when enumerable
    edgeworth_rel_error: float    # estimated relative error of the normal / t tail at the threshold
    passed: bool
    notes: tuple = ()

    @property
    def trustworthy(self) -> bool:
        """The false-fail rate is within α: half of each direction's share α/K is a margin for the
        tail error of the normal (or t) approximation, whose estimate must stay below 100 %."""
        return self.edgeworth_rel_error < 1.0

    @property
    def bias_detectable(self) -> bool | None:
        """Whether the exact bias reaches the detectable bias along some direction (None: unknown)."""
        return None if self.exact_bias is None else bool(np.any(np.abs(self.exact_bias) >= self.detectable))

    def summary(self) -> str:
        v = "PASS (consistent with the target)" if self.passed else "FAIL (differs from the target)"
        k = int(np.argmax(np.abs(self.stat)))
        ex = "" if self.exact_bias is None else f", exact bias {self.exact_bias[k]:+.2e}"
        return (f"{self.name}: {v}; n = {self.n_batches}, K = {len(self.stat)}, α = {self.alpha:g}, "
                f"{self.variance} variance; worst u{k}: (mean − target)/se = {self.stat[k]:+.2f} vs ±{self.threshold:.2f}, "
                f"detectable bias {self.detectable[k]:.2e} (power 1 − {self.beta:g}){ex}")

    def to_dict(self) -> dict:
        d = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}
        d.update(trustworthy=self.trustworthy, bias_detectable=self.bias_detectable)
        return d


def default_directions(policy, target: torch.Tensor, K: int = 4, seed: int = 0) -> torch.Tensor:
    """(K, D): the unit target direction (the direction a scale bias lives in) and K − 1 seeded
    random unit directions (``tpg.mc.random_directions``), fixed before any sampling."""
    from tpg.mc import random_directions
    rnd = random_directions(policy, K, torch.Generator().manual_seed(seed))                  # (K, D)
    tn = float(target.norm())
    return torch.cat([(target / tn)[None, :].to(torch.float64), rnd[: K - 1]]) if tn > 0 else rnd


def mc_batches(est, mdp: TokenMDP, policy, G: int, n_batches: int, generator: torch.Generator,
               directions: torch.Tensor, *, n_prompts: int = 1, critic=None, ref=None) -> np.ndarray:
    """(n_batches, K) ⟨u_k, ĝ_b⟩ for independent sampled batches b (the sampler path end to end:
    ``tpg.rollouts.sample``, extra draws from ``MonteCarloDraws``, the estimator's coefficients)."""
    from tpg.draws import MonteCarloDraws
    from tpg.mc import projected_estimates
    from tpg.rollouts import sample
    ro = sample(mdp, policy, G, generator, n_prompts=n_prompts, n_batches=n_batches)
    ro, _ = MonteCarloDraws(mdp, policy, generator, critic=critic, ref=ref).fill(ro, dict(getattr(est, "needs", {}) or {}))
    scores = exact.projected_scores(policy, ro, directions)                                   # (B, L, K)
    return projected_estimates(est, ro, scores.permute(2, 0, 1)).numpy()                      # (n, K)


def _edgeworth_known_variance(x: float, skew: float, exkurt: float, n: int) -> float:
    """Relative error of the two-sided normal tail at x for a standardized mean with KNOWN variance:
    P(|Z_n| > x) = 2(1 − Φ(x)) − 2 p₂(x) φ(x)/n + …, p₂(x) = −x[κ(x² − 3)/24 + γ²(x⁴ − 10x² + 15)/72]
    (Hall 1992, §2.4); the O(n^{-1/2}) skewness term is even in x and cancels between the tails."""
    from scipy import stats
    p2 = x * (exkurt * (x**2 - 3) / 24 + skew**2 * (x**4 - 10 * x**2 + 15) / 72)
    return abs(p2) * float(stats.norm.pdf(x) / stats.norm.sf(x)) / n


def mc_check(est, mdp: TokenMDP, policy, G: int, n_batches: int, generator: torch.Generator,
             target: torch.Tensor | None = None, *, directions: torch.Tensor | None = None, n_directions: int = 4,
             alpha: float = 1e-6, beta: float = 1e-6, variance: str = "auto", n_prompts: int = 1, critic=None,
             ref=None, name: str | None = None, direction_seed: int = 0, budget: int | None = None) -> MCReport:
    """Designed Monte Carlo check that E[ĝ] = ``target`` (default ∇J), on the sampler path.

    ``n_batches`` independent batches (``n_prompts`` prompt draws × G responses each) are sampled
    with ``generator``; each ĝ_b is projected on K directions (default ``default_directions``: the
    unit target and K − 1 random ones; pass ``directions=torch.eye(D)`` for every coordinate).
    Per direction, a two-sided test of the mean at level α/(2K): the total false-fail rate is ≤ α
    (Bonferroni), the other half of each share α/K covering the tail error of the approximation
    (estimated by an Edgeworth term, ``trustworthy``). Variance:

    - "exact" (default when the MDP enumerates and the estimator reads no continuation returns):
      σ_k² = u_kᵀ Cov[ĝ] u_k from ``tpg.exact.moments`` → a z-test whose tolerance is known before
      sampling; the exact bias ⟨u_k, E ĝ − target⟩ is reported too.
    - "sample": the sample variance, Student t with n − 1 degrees of freedom (``tpg.mc.paired_test``).

    Beside the verdict: ``detectable`` = (threshold + z_β)·se, the smallest bias along u_k that
    the check detects with probability ≥ 1 − β (β = 10⁻⁶ by default), so a negative control whose
    exact bias exceeds it fails except with probability β. ``budget`` caps the exact enumerations
    (``tpg.exact``): above it the check runs on samples alone and needs ``target``.
    """
    from scipy import stats
    from tpg.mc import paired_test
    if variance not in ("auto", "exact", "sample"):
        raise TPGError(f"variance must be 'auto', 'exact' or 'sample', got {variance!r}")
    if not isinstance(n_batches, int) or n_batches < 100:
        raise TPGError(f"a designed check at α = {alpha:g} needs n_batches ≥ 100 independent batches, got {n_batches!r}")
    needs = dict(getattr(est, "needs", {}) or {})
    label = name or getattr(est, "name", None) or getattr(est, "__name__", "estimator")
    if target is None:
        try:
            target = exact.gradient(mdp, policy, enumerate_responses(mdp, budget))
        except TPGError as e:
            raise TPGError(f"{e} — pass target= (a vector to compare with); to compare two estimators on "
                           "a model too big to enumerate use tpg.mc.paired_test") from e
    target = torch.as_tensor(target, dtype=torch.float64)
    u = default_directions(policy, target, n_directions, direction_seed) if directions is None else \
        torch.as_tensor(directions, dtype=torch.float64)
    K = u.shape[0]
    mo, notes = None, []
    try:
        mo = exact.moments(est, mdp, policy, G, n_prompts=n_prompts, critic=critic, ref=ref, budget=budget,
                           cov=None if needs.get("continuations") else "full", directions=u)
    except TPGError as e:                                    # too big to enumerate: Monte Carlo only
        notes.append(f"no exact moments ({e.__class__.__name__}): sample variance, no exact bias")
    use_exact = mo is not None and mo.cov is not None and variance != "sample"
    if variance == "exact" and not use_exact:
        raise TPGError("variance='exact' needs an enumerable MDP and an estimator without continuation "
                       "returns; use variance='sample'")
    d = mc_batches(est, mdp, policy, G, n_batches, generator, u, n_prompts=n_prompts, critic=critic, ref=ref) \
        - (u @ target).numpy()[None, :]                                                       # (n, K)
    exact_bias = None if mo is None else (u @ (mo.mean - target)).numpy()
    if use_exact:
        sd = np.sqrt(np.clip(np.diag(mo.cov.numpy()), 0.0, None))                             # (K,) exact
        se = sd / math.sqrt(n_batches)
        thr = float(stats.norm.isf(alpha / (4 * K)))                                          # α/(2K) two-sided
        mean = d.mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            stat = np.where(se > 0, mean / se, np.where(np.abs(mean) <= 1e-12, 0.0, np.inf))
        skew = np.nan_to_num(stats.skew(d, axis=0, bias=False))
        kurt = np.nan_to_num(stats.kurtosis(d, axis=0, bias=False))
        err = max(_edgeworth_known_variance(thr, float(g), float(k), n_batches) for g, k in zip(skew, kurt))
        passed = bool(np.all(np.abs(stat) <= thr))
        det = (thr + float(stats.norm.isf(beta))) * se
        return MCReport(label, n_batches, "exact", alpha, beta, (u @ target).numpy(), mean + (u @ target).numpy(),
                        se, stat, thr, det, exact_bias, err, passed, tuple(notes))
    t = paired_test(d, label, alpha, beta)
    return MCReport(label, n_batches, "sample", alpha, beta, (u @ target).numpy(), t.mean + (u @ target).numpy(),
                    t.se, t.t, t.threshold, t.mdd, exact_bias, t.edgeworth_rel_error, t.passed, tuple(notes))
