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

from tpg import exact, validate
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


def label_of(est) -> str:
    return getattr(est, "name", None) or getattr(est, "__name__", None) or "estimator"


def float64_reason(*policies) -> str | None:
    """Why exact verdicts are impossible for these policies (parameters not float64), or None."""
    for pol in policies:
        if pol is None:
            continue
        bad = sorted({str(p.dtype) for p in pol.parameters() if p.is_floating_point() and p.dtype != torch.float64})
        if bad:
            return (f"{type(pol).__name__} has {'/'.join(bad)} parameters: exact verdicts need float64 "
                    "(round-off would pass for bias); convert with policy.double()")
    return None


def roundoff_floor(mdp: TokenMDP, policy, grad: torch.Tensor | None = None) -> float:
    """δ: the relative gap between genuinely different float64 computations of ∇J.

    (a) the score-function sum over responses, Σ_y P(y) RM(y) ∇log P(y) (one backward through the
        enumerated token log-probs), and
    (b) the state-table form Σ_{s,a} ρ(s) π(a|s) (U(s⊕a) − U(s)) ∇log π(a|s) (U and ρ by sweeps over
        the prefix tree, one backward through the per-state log-probs),
    plus ``grad`` (the ∇J a report compares with) against (b). The routes share no summation order,
    so their gap measures the round-off the engine's numbers carry; a policy whose arithmetic is
    float32 shows δ ≈ 1e-7 and every verdict on it becomes "inconclusive".
    """
    from tpg.scores import grad as flat_grad
    tab = exact.tables(mdp, policy)
    W = (tab.prob * tab.enum.rm)[:, None] * tab.enum.mask                              # (N, L)
    a = exact.expected_score(policy, tab.enum, W)                                      # (D,) route (a)
    w_sa = (tab.visit[:, None] * tab.pi * (tab.Uc - tab.U[:, None])).detach()         # (S, V) route (b) weights
    b = flat_grad((w_sa * policy.state_log_probs().to(torch.float64)).sum(), policy)   # (D,)
    scale = float(b.norm().clamp(min=1e-300))
    gaps = [float((a - b).norm()) / scale]
    if grad is not None:
        gaps.append(float((grad - b).norm()) / scale)
    return max(gaps)


def report(est, mdp: TokenMDP, policy, G: int = 1, *, name: str | None = None, cov: str | None = "trace",
           rtol: float = RTOL, target: torch.Tensor | None = None, roundoff: float | None = None, **kw) -> Report:
    """Exact verdict for any estimator on an MDP, a policy and a group size G: bias vector, relative
    bias, best scale, residual, cosine and "unbiased" / "scaled" / "biased" (or "inconclusive",
    with the reason in ``notes``, when round-off or non-float64 parameters forbid a verdict).

    Bring your own estimator: ``est`` is a registry ``Estimator`` or ANY callable
    ``est(ro: Rollouts) -> loss`` (a scalar tensor, or an ``EstimatorOutput``) whose gradient with
    respect to ``ro.logp`` (B, L) is −Σ c ∇logπ, as in verl/TRL (``-(adv.detach() * ro.logp).sum()``).
    The engine hands it many possible batches stacked in one ``Rollouts`` (``ro.batch`` numbers
    them, ``ro.group`` the G responses of one prompt draw); a batch-local loss (the sum over batches
    of each batch's own loss) is evaluated fast, anything else is detected and evaluated batch by
    batch (``tpg.batches``). An optional attribute ``needs`` (e.g. ``{"greedy": True}``,
    ``{"continuations": K}``) requests extra draws. ``report(...).notes`` says what was probed and
    which route ran. Example, a baseline that wrongly reads the action w_t::

        def mine(ro):                                  # G = 1
            adv = (ro.rm[:, None] - b[ro.states, ro.tokens]) * ro.mask
            return -(adv * ro.logp).sum()
        report(mine, mdp, policy, 1).verdict           # "biased", with .bias = E[ĝ] − ∇J

    ``target`` replaces ∇J when a claim compares with another exact vector (e.g. ∇(J − β KL)).
    ``roundoff`` passes a δ already measured by ``roundoff_floor(mdp, policy)`` (callers that make
    many reports on one MDP and policy measure it once).
    Other keyword arguments go to ``tpg.exact.moments`` (n_prompts, route, old_policy, rollout_policy,
    critic, ref).
    """
    validate.report_options(est, mdp, policy, G, rtol=rtol, target=target, roundoff=roundoff, cov=cov, **kw)
    from tpg.estimators.core import check_needs
    exact.precheck(check_needs(dict(getattr(est, "needs", {}) or {}), f"estimator {label_of(est)!r}"), mdp, G,
                   kw.get("n_prompts", 1), kw.get("route", "auto"), cov, kw.get("directions"), kw.get("budget"))
    grad = exact.gradient(mdp, policy) if target is None else target
    delta = roundoff_floor(mdp, policy, None if target is not None else grad) if roundoff is None else float(roundoff)
    mo = exact.moments(est, mdp, policy, G, cov=cov, **kw)
    why = float64_reason(policy, kw.get("old_policy"), kw.get("rollout_policy"))
    v, rel, c, resid, cos = verdict_of(mo.mean, grad, delta, rtol)
    notes = list(mo.notes) + [f"batches enumerated by route {mo.route!r} ({mo.n_outcomes:,} batches)"]
    if why is not None:
        v = "inconclusive"
        notes.append(why)
    elif v == "inconclusive":
        notes.append(f"round-off δ = {delta:.1e} exceeds rtol/100 = {rtol / 100:.0e}: no verdict to rtol {rtol:g}")
    label = name or label_of(est)
    return Report(label, grad, mo.mean, mo.mean - grad, rel, c, resid, cos, v, delta, mo.cov_trace, tuple(notes))


# ====================================================================================== designed Monte Carlo
# For jobs too big to enumerate, and to test the sampler path itself: n independent batches are
# sampled (tpg.batches.SampledBatches), each batch's ĝ_b = −∇loss is projected on K fixed
# directions u_k, and H0: E⟨u_k, ĝ⟩ = ⟨u_k, target⟩ for every k is tested (DESIGN §4). The number
# of batches is chosen by the design (``required_batches``), not by hand.
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
    needed_batches: int = 0       # what the design asks for (``required_batches``) at these moments

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
        return (f"{self.name}: {v}; n = {self.n_batches} (design: {self.needed_batches}), K = {len(self.stat)}, "
                f"α = {self.alpha:g}, {self.variance} variance; worst u{k}: (mean − target)/se = {self.stat[k]:+.2f} "
                f"vs ±{self.threshold:.2f}, detectable bias {self.detectable[k]:.2e} (power 1 − {self.beta:g}){ex}")

    def to_dict(self) -> dict:
        d = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}
        d.update(trustworthy=self.trustworthy, bias_detectable=self.bias_detectable)
        return d


DEFAULT_DIRECTIONS = 8    # the unit target and 7 directions orthogonal to it (a complete basis when D ≤ 8)


def default_directions(policy, target: torch.Tensor, K: int | None = None, seed: int = 0) -> torch.Tensor:
    """(K, D) directions fixed before any sampling: the unit target (where a scale bias lives), then
    K − 1 seeded random unit directions ORTHOGONAL to it (where every other bias lives: a bias b
    orthogonal to ∇J projects ≈ ‖b‖/√D on each). When D ≤ K they are a complete orthonormal basis.
    Random mixtures rather than coordinates: a coordinate of a rarely visited state has a heavy-tailed
    projection, which would make the design ask for far more batches."""
    from tpg.scores import n_params, random_directions
    D = n_params(policy)
    K = DEFAULT_DIRECTIONS if K is None else K
    t = target.to(torch.float64)
    tn = float(t.norm())
    if D <= K:
        basis = torch.cat([(t / tn)[:, None] if tn > 0 else torch.zeros(D, 1, dtype=torch.float64),
                           torch.eye(D, dtype=torch.float64)], 1)                          # (D, D+1)
        q, r = torch.linalg.qr(basis)                                                      # Gram–Schmidt order
        u = q.T                                                                            # (D, D), u[0] ∥ target
        return u * torch.where(u[:1] @ t < 0, -1.0, 1.0) if tn > 0 else u
    rnd = random_directions(policy, K, torch.Generator().manual_seed(seed), orthogonal_to=t if tn > 0 else None)
    return torch.cat([(t / tn)[None, :], rnd[: K - 1]]) if tn > 0 else rnd


def mc_batches(est, mdp: TokenMDP, policy, G: int, n_batches: int, generator: torch.Generator,
               directions: torch.Tensor, *, n_prompts: int = 1, critic=None, ref=None,
               chunk_batches: int = 4096, old_policy=None, rollout_policy=None) -> np.ndarray:
    """(n_batches, K) ⟨u_k, ĝ_b⟩ for independent sampled batches b: the sampler path end to end
    (``tpg.batches.SampledBatches`` with ``MonteCarloDraws``, the estimator's coefficients with its
    batch-locality checked, ``tpg.scores.projected_scores``); batches drawn from ``rollout_policy``
    (default ``old_policy``, default ``policy``), as in ``tpg.exact.moments``."""
    from tpg.batches import Evaluator, SampledBatches
    from tpg.draws import MonteCarloDraws
    from tpg.estimators.core import check_needs
    from tpg.scores import projected_scores
    needs = check_needs(dict(getattr(est, "needs", {}) or {}), f"estimator {getattr(est, 'name', est)!r}")
    draws = MonteCarloDraws(mdp, policy, generator, critic=critic, ref=ref)
    ev, out = Evaluator(est), []
    for chunk in SampledBatches(mdp, policy, draws, needs, G, n_batches, generator, n_prompts, chunk_batches,
                                old_policy=old_policy, rollout_policy=rollout_policy):
        ro = chunk.ro
        c = ev.coefficients(chunk)                                                           # (B, L)
        s = projected_scores(policy, ro, directions)                                         # (B, L, K)
        per_row = torch.einsum("bl,blk->bk", c, s)                                           # (B, K)
        out.append(torch.zeros(ro.n_batches, s.shape[2], dtype=torch.float64).index_add(0, ro.batch, per_row))
    return torch.cat(out).numpy()


def _edgeworth_known_variance(x: float, skew: float, exkurt: float, n: int) -> float:
    """Relative error of the two-sided normal tail at x for a standardized mean with KNOWN variance:
    P(|Z_n| > x) = 2(1 − Φ(x)) − 2 p₂(x) φ(x)/n + …, p₂(x) = −x[κ(x² − 3)/24 + γ²(x⁴ − 10x² + 15)/72]
    (Hall 1992, §2.4); the O(n^{-1/2}) skewness term is even in x and cancels between the tails."""
    from scipy import stats
    p2 = x * (exkurt * (x**2 - 3) / 24 + skew**2 * (x**4 - 10 * x**2 + 15) / 72)
    return abs(p2) * float(stats.norm.pdf(x) / stats.norm.sf(x)) / n


MIN_BATCHES = 100
TAIL_MARGIN = 0.5          # the design keeps the estimated tail error ≤ 50 % of the α/2 margin


def required_batches(threshold: float, skew, exkurt, *, known_variance: bool, sd=None, detect: float | None = None,
                     beta: float = 1e-6) -> int:
    """The number of batches a designed check needs (TFP ``min_num_samples`` style): enough that the
    Edgeworth estimate of the tail error at ``threshold`` is ≤ ``TAIL_MARGIN`` for every direction
    (error ∝ 1/n, so n = error(1)/margin), and, with ``detect`` and per-direction ``sd``, that a bias
    of that size is detected with probability ≥ 1 − β: n ≥ ((threshold + z_β)·sd/detect)²."""
    from scipy import stats
    from tpg.mc import _edgeworth_rel_error
    err1 = _edgeworth_known_variance if known_variance else _edgeworth_rel_error
    n = max(err1(threshold, float(g), float(k), 1) for g, k in zip(np.atleast_1d(skew), np.atleast_1d(exkurt)))
    need = max(MIN_BATCHES, math.ceil(n / TAIL_MARGIN))
    if detect is not None and sd is not None:
        z = threshold + float(stats.norm.isf(beta))
        need = max(need, math.ceil(float(np.max((z * np.asarray(sd) / detect) ** 2))))
    return int(need)


def mc_check(est, mdp: TokenMDP, policy, G: int, n_batches: int | None = None, generator: torch.Generator | None = None,
             target: torch.Tensor | None = None, *, directions: torch.Tensor | None = None,
             n_directions: int | None = None, alpha: float = 1e-6, beta: float = 1e-6, variance: str = "auto",
             n_prompts: int = 1, critic=None, ref=None, name: str | None = None, direction_seed: int = 0,
             budget: int | None = None, detect: float | None = None, max_batches: int = 1_000_000,
             pilot: int = 2000) -> MCReport:
    """Designed Monte Carlo check that E[ĝ] = ``target`` (default ∇J), on the sampler path.

    Independent batches (``n_prompts`` prompt draws × G responses each) are sampled with
    ``generator``; each ĝ_b is projected on K directions (``default_directions``: the unit target and
    directions orthogonal to it — a complete basis for D ≤ 64). Per direction a two-sided test of
    the mean at level α/(2K): total false-fail rate ≤ α (Bonferroni), the other half of each share
    α/K covering the tail error of the normal/t approximation (Edgeworth estimate, ``trustworthy``).

    ``n_batches=None`` (default): the design chooses n (``required_batches``) from the exact skewness
    and kurtosis of the projections when the job enumerates, or from a pilot sample of ``pilot``
    batches (discarded) when it does not, and from ``detect`` (a bias to detect with power 1 − β)
    when given; above ``max_batches`` it refuses, saying how many are needed. A given n_batches is
    used as is; ``needed_batches`` says what the design would have asked.

    Variance: "exact" (default when the MDP enumerates and the estimator reads no continuation
    returns): σ_k² = u_kᵀ Cov[ĝ] u_k from ``tpg.exact.moments`` → a z-test whose tolerance is known
    before sampling, and the exact bias ⟨u_k, E ĝ − target⟩ is reported; "sample": the sample
    variance, Student t with n − 1 degrees of freedom (``tpg.mc.paired_test``). Beside the verdict,
    ``detectable`` = (threshold + z_β)·se: a negative control whose exact bias exceeds it fails
    except with probability β. ``budget`` caps the exact enumerations.
    """
    from scipy import stats
    from tpg.mc import paired_test
    validate.report_options(est, mdp, policy, G, alpha=alpha, beta=beta, n_directions=n_directions,
                            n_batches=n_batches, generator=generator, target=target, n_prompts=n_prompts,
                            critic=critic, ref=ref, budget=budget, directions=directions)
    validate.generator("generator", generator)
    validate.choice("variance", variance, ("auto", "exact", "sample"))
    validate.integer("max_batches", max_batches, MIN_BATCHES)
    validate.integer("pilot", pilot, MIN_BATCHES)
    if detect is not None:
        validate.real("detect", detect, 0.0, None, "()", why=" (the bias the check must detect)")
    if n_batches is not None and n_batches < MIN_BATCHES:
        raise TPGError(f"a designed check at α = {alpha:g} needs n_batches ≥ {MIN_BATCHES} independent batches, "
                       f"got {n_batches!r} (or pass n_batches=None to let the design choose)")
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
    shift = (u @ target).numpy()[None, :]
    exact_bias = None if mo is None else (u @ (mo.mean - target)).numpy()
    if use_exact:
        thr = float(stats.norm.isf(alpha / (4 * K)))                                          # α/(2K) two-sided
        sd = np.sqrt(np.clip(np.diag(mo.cov.numpy()), 0.0, None))                             # (K,) exact
        need = required_batches(thr, mo.skew.numpy(), mo.exkurt.numpy(), known_variance=True, sd=sd,
                                detect=detect, beta=beta)
    else:
        thr = None
        d0 = mc_batches(est, mdp, policy, G, pilot, generator, u, n_prompts=n_prompts, critic=critic, ref=ref)
        thr0 = float(stats.t.isf(alpha / (2 * K) / 2, pilot - 1))
        need = required_batches(thr0, np.nan_to_num(stats.skew(d0, axis=0, bias=False)),
                                np.nan_to_num(stats.kurtosis(d0, axis=0, bias=False)), known_variance=False,
                                sd=d0.std(0, ddof=1), detect=detect, beta=beta)
        notes.append(f"design from a pilot of {pilot} batches (discarded)")
    n = need if n_batches is None else n_batches
    if n > max_batches:
        raise TPGError(f"the designed check {label!r} needs {n:,} batches (tail error and detectable bias at "
                       f"α = {alpha:g}), above max_batches = {max_batches:,}: raise max_batches, relax alpha/detect, "
                       "or use fewer directions")
    d = mc_batches(est, mdp, policy, G, n, generator, u, n_prompts=n_prompts, critic=critic, ref=ref) - shift  # (n, K)
    if use_exact:
        se = sd / math.sqrt(n)
        mean = d.mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            stat = np.where(se > 0, mean / se, np.where(np.abs(mean) <= 1e-12, 0.0, np.inf))
        err = max(_edgeworth_known_variance(thr, float(g), float(k), n)
                  for g, k in zip(mo.skew.numpy(), mo.exkurt.numpy()))
        passed = bool(np.all(np.abs(stat) <= thr))
        det = (thr + float(stats.norm.isf(beta))) * se
        return MCReport(label, n, "exact", alpha, beta, shift[0], mean + shift[0], se, stat, thr, det, exact_bias,
                        err, passed, tuple(notes), need)
    t = paired_test(d, label, alpha, beta)
    return MCReport(label, n, "sample", alpha, beta, shift[0], t.mean + shift[0], t.se, t.t, t.threshold, t.mdd,
                    exact_bias, t.edgeworth_rel_error, t.passed, tuple(notes), need)
