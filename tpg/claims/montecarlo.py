"""Monte Carlo claims (M): the real sampler against the exact engine, by designed tests.

The exact claims never run the sampler: ``tpg.exact`` enumerates responses and substitutes U(prefix)
for continuation returns. These claims run ``tpg.verify.mc_check``, which samples independent batches
with ``tpg.rollouts.sample`` (prompts from ρ, responses from π) and fills the extra draws with
``tpg.draws.MonteCarloDraws`` (fresh continuation rollouts from every prefix), and compares the mean
of the estimates with an exact target along fixed directions (the unit target and random ones).

Design (DESIGN §4, ``mc_check``): total false-fail rate α = 1e-6 per test (Bonferroni over the
directions), tolerances from the exact variance where the engine has it (Student t on the sample
variance for continuation estimators), and the smallest detectable bias at power 1 − 1e-6 stated
beside each test. A negative control is the same batches tested against a wrong target (e.g. ∇J
for an estimator whose mean is ½∇J): it must fail AND its exact bias must exceed the detectable
bias along some direction, so its failure was guaranteed, not lucky; it costs no extra sampling.
The number of batches is chosen by ``mc_check``'s design (``N_BATCHES = None``): enough that the
Edgeworth estimate of the tail-approximation error stays within its margin (from the exact skewness
and kurtosis where the engine has them, from a discarded pilot of 2000 batches otherwise) — from
~700 batches (REINFORCE, exact variance) to ~3·10⁴ (TRePO with K = 2, sample variance). Each test
must also be ``trustworthy`` (estimated tail error < 100 %), a gated check. The detectable bias
along the target is 0.2–0.4 ‖target‖, far below the biases the claims must see (a sampler whose
continuations peek one token ahead has E[ĝ] = 0, a bias of 1·‖∇J‖).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch

from tpg.claims.base import Check, Exact, Outcome, claim, equal, rel
from tpg.estimators import estimator
from tpg.mdp import TPGError
from tpg.verify import mc_check

N_BATCHES = None      # chosen by mc_check's design (tail error and detectable bias), never by hand
MC_POLICIES = ("tabular", "loglinear")
MC_WHY_NOT = ("a designed Monte Carlo test here samples thousands of batches per estimator; the GPT-2 Monte "
              "Carlo tests are in tests/test_lm.py")
UNEQUAL_RHO = {"n_prompts": 2, "prompt_probs": (0.3, 0.7)}


def directions(target: torch.Tensor, seed: int, K: int = 4) -> torch.Tensor:
    """(K, D) the unit target (where a scale bias lives) and K − 1 seeded random unit directions
    orthogonal to it (which see a bias orthogonal to the target), fixed before any sampling."""
    g = torch.Generator().manual_seed(90_001 + seed)
    t = (target / target.norm()).to(torch.float64)
    rnd = torch.randn(K - 1, target.numel(), generator=g, dtype=torch.float64)
    rnd = rnd - (rnd @ t)[:, None] * t[None, :]
    return torch.cat([t[None, :], rnd / rnd.norm(dim=1, keepdim=True)])


def run_mc_check(est, ex: Exact, G: int, target: torch.Tensor, seed: int, n_batches: int | None = N_BATCHES, **kw):
    """``tpg.verify.mc_check`` on the claim's MDP and policy with a generator seeded by ``seed``.

    ``n_batches`` is passed when given; ``None`` leaves the choice to ``mc_check`` where its
    signature allows that (a design that picks the number of batches itself)."""
    params = inspect.signature(mc_check).parameters
    args = dict(generator=torch.Generator().manual_seed(seed), target=target, **kw)
    if n_batches is not None:
        args["n_batches"] = n_batches
    elif "n_batches" in params and params["n_batches"].default is inspect.Parameter.empty:
        raise TPGError("this tpg.verify.mc_check needs n_batches: pass a number of batches")
    return mc_check(est, ex.mdp, ex.pol, G, **args)


@dataclass
class Test:
    """A designed test that must pass (``rep``, on directions ``u``) and, optionally, the wrong
    target its negative control tests the same batches against."""
    label: str
    rep: object
    u: torch.Tensor
    wrong: torch.Tensor | None = None
    wrong_label: str = ""

    def z(self) -> float:
        return float(np.max(np.abs(self.rep.stat)) / self.rep.threshold)

    def control(self) -> tuple[float, float]:
        """(max |z| / threshold, detectable / |exact bias| along the best direction) against ``wrong``:
        z = (mean − ⟨u, wrong⟩)/se on the same batches, exact bias = ⟨u, E ĝ − wrong⟩."""
        r = self.rep
        shift = np.asarray(r.target) - (self.u @ self.wrong).numpy()                   # ⟨u, target − wrong⟩
        z = (np.asarray(r.mean) - (self.u @ self.wrong).numpy()) / np.asarray(r.se)
        if r.exact_bias is None:
            return float(np.max(np.abs(z)) / r.threshold), math.inf
        bias = np.abs(np.asarray(r.exact_bias) + shift)
        return float(np.max(np.abs(z)) / r.threshold), float(np.min(np.asarray(r.detectable) / np.maximum(bias, 1e-300)))


def designed(label: str, est, ex: Exact, G: int, target: torch.Tensor, seed: int, n_batches: int | None,
             wrong: torch.Tensor | None = None, wrong_label: str = "", **kw) -> Test:
    u = directions(target, seed)
    rep = run_mc_check(est, ex, G, target, seed, n_batches, directions=u, **kw)
    return Test(label, rep, u, wrong, wrong_label)


def _plain(x):
    """JSON-ready copy of an MCReport's dict (numpy scalars and arrays → Python numbers and lists)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x.item() if isinstance(x, np.generic) else x


def mc_outcome(tests: list[Test], extra: list[Check], what: str) -> Outcome:
    """Every test passes (|z| within its threshold); every negative control fails, with power."""
    checks, measured, zc = [], {}, []
    for t in tests:
        checks.append(Check(f"{t.label}: max |z| / threshold", t.z(), "<=", 1.0))
        checks.append(Check(f"{t.label}: estimated tail error of the approximation ≤ 100 % (trustworthy)",
                            float(t.rep.edgeworth_rel_error), "<=", 1.0))
        measured[t.label] = _plain(t.rep.to_dict())
        if t.wrong is not None:
            z, power = t.control()
            checks += [Check(f"{t.wrong_label} (negative control): max |z| / threshold", z, ">", 1.0),
                       Check(f"{t.wrong_label} (negative control): detectable bias / exact bias (best direction)",
                             power, "<=", 1.0)]
            measured[t.wrong_label] = {"z_over_threshold": z, "detectable_over_exact_bias": power}
            zc.append(z)
    checks += extra
    z = max(t.z() for t in tests)
    det = max(float(t.rep.detectable[0] / abs(t.rep.target[0])) for t in tests)     # u_0 = target / ‖target‖
    fig = f"max |z|/z* {z:.2f} over {len(tests)} tests ({what}), detectable bias ≤ {det:.2g}‖target‖"
    if zc:
        fig += f"; negative control |z|/z* {min(zc):.3g}"
    measured["n_batches"] = tests[0].rep.n_batches
    measured["max_tail_error"] = max(float(t.rep.edgeworth_rel_error) for t in tests)
    return Outcome("holds" if all(c.ok for c in checks) else "fails", fig + f"; n = {measured['n_batches']}", z,
                   measured, checks)


@claim("M1", "The sampler draws prompts from ρ and responses from π: designed MC tests (α = 1e-6) of REINFORCE "
       "(2 prompt draws per batch) against ∇J and mean-only GRPO G=2 against ½∇J, ρ = (0.3, 0.7); GRPO vs ∇J is "
       "detected", "DESIGN §4; PAPER §7.12", "holds", mdp=UNEQUAL_RHO, policies=MC_POLICIES, why_not=MC_WHY_NOT)
def m1(ex: Exact, n_batches: int | None = N_BATCHES) -> Outcome:
    s = 1_000 * ex.seed
    tests = [designed("REINFORCE, 2 prompt draws", estimator("reinforce"), ex, 1, ex.grad, s + 1, n_batches,
                      n_prompts=2),
             designed("mean-only GRPO G=2 vs ½∇J", estimator("grpo", std=False), ex, 2, 0.5 * ex.grad, s + 2,
                      n_batches, wrong=ex.grad, wrong_label="mean-only GRPO G=2 vs ∇J")]
    return mc_outcome(tests, [], "sampled prompts and responses")


@claim("M2", "Sampled continuations are fresh rollouts from each prefix: TRePO 'all' (K = 2) and 'subset' (random "
       "anchors, q = 0.5) with MonteCarloDraws are unbiased by designed MC tests, ρ = (0.3, 0.7)",
       "PAPER §4 readings 1, 2; §7.15, §7.17", "holds", mdp=UNEQUAL_RHO, policies=MC_POLICIES, why_not=MC_WHY_NOT)
def m2(ex: Exact, n_batches: int | None = N_BATCHES) -> Outcome:
    s = 1_000 * ex.seed
    tests = [designed("TRePO 'all' K=2", estimator("trepo", variant="all", K=2), ex, 1, ex.grad, s + 4, n_batches),
             designed("TRePO 'subset' q=0.5, K=1", estimator("trepo", variant="subset", K=1,
                                                             anchors={"kind": "bernoulli", "q": 0.5}),
                      ex, 1, ex.grad, s + 5, n_batches)]
    return mc_outcome(tests, [], "sampled continuations")


@claim("M3", "K matters: self-inclusive TRePO with K sampled continuations has E[ĝ] = K/(K+1) ∇J, K = 1, 3 "
       "(exact engine and designed MC tests); K = 1 against ∇J is detected",
       "PAPER §4 reading 1, §7 F10", "holds", policies=MC_POLICIES, why_not=MC_WHY_NOT)
def m3(ex: Exact, n_batches: int | None = N_BATCHES) -> Outcome:
    s = 1_000 * ex.seed
    tests, extra = [], []
    for K in (1, 3):
        est = estimator("trepo", variant="all", K=K, self_inclusive=True)
        target = K / (K + 1) * ex.grad
        extra.append(equal(f"K={K}: exact E[ĝ] = K/(K+1) ∇J", rel(ex.report(est).mean, target)))
        tests.append(designed(f"self-inclusive K={K} vs K/(K+1) ∇J", est, ex, 1, target, s + 6 + K, n_batches,
                              **({"wrong": ex.grad, "wrong_label": "self-inclusive K=1 vs ∇J"} if K == 1 else {})))
    return mc_outcome(tests, extra, "targets K/(K+1) ∇J")
