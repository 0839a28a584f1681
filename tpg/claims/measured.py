"""Claims with no exact truth value (PAPER §7, last list): measured exactly, never a disagreement."""
from __future__ import annotations

import torch

from tpg.claims.base import Exact, Outcome, claim
from tpg.draws import TableCritic, exact_critic, perturbed_critic
from tpg.estimators import estimator


@claim("N1", "Variance: per-position baseline U(W_{0,t−1}) vs prompt baseline U(w_0) (exact tr Cov)",
       "PAPER §6, §7 (no exact truth value)", "measured")
def n1(ex: Exact) -> Outcome:
    roots = torch.as_tensor(ex.mdp.state_table()["prompt"]) * ex.mdp.states_per_prompt
    out = {}
    for label, table in (("U(s_{t−1})", ex.tab.U), ("U(x)", ex.tab.U[roots])):
        r = ex.report(estimator("baseline", baseline=TableCritic(ex.mdp, table)), cov="trace")
        out[label] = {"cov_trace": r.cov_trace, "rel_bias": r.rel_bias}
    ratio = out["U(s_{t−1})"]["cov_trace"] / out["U(x)"]["cov_trace"]
    out["ratio"], out["per_position_lower"] = ratio, ratio < 1
    return Outcome("measured", f"tr Cov: per-position / prompt baseline = {ratio:.4g}", ratio, out)


@claim("N2", "Error: critic estimate of Q (GAE λ = 0) vs a single MC sample (RLOO), exact MSE",
       "PAPER §3.1, §7 (no exact truth value)", "measured")
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
