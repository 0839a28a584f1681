"""The paper's testable claims (PAPER.md §7) as executable checks, and the ``tpg verify`` command.

Every item of PAPER §7 is a ``Claim`` in ``CLAIMS``: T1–T18 (TRUE in exact arithmetic), F1–F11
(FALSE: a bias the formulas predict exactly) and N1–N2 (no exact truth value: measured, never a
disagreement). Beyond §7, T19–T22 check the engine's and the estimators' paths that T1–T18 only
reach at special values (clipping at ratio ≠ 1, GAE at γ < 1, TRePO's interpolation weights,
several prompts with unequal ρ), and M1–M3 run the real sampler (continuations included) against
the exact engine with designed Monte Carlo tests. ``claim.check(mdp_seed, policy_kind) -> Result``
builds small seeded random MDPs (``tpg.random_mdp``), a policy (``tpg.policies.make_policy``) and
measures the claim with the estimator registry and the exact engine (``tpg.verify.report``,
``tpg.exact``): an estimator is never re-implemented here, and the independent formulas a claim
compares with are in ``tpg.claims.oracles``. Identities about exact quantities (U, Q, A along
responses) are expectations E Σ_t c_t ∇ℓ_t = ``tpg.exact.expected_score`` with weights P(y)·c_t.

Layout: ``base`` (Check, Outcome, Result, Claim, the ``@claim`` registry, Exact, set-ups, verdict
helpers), ``oracles`` (independent formulas), ``true`` (T), ``false`` (F), ``measured`` (N),
``montecarlo`` (M), ``run`` (select, run_claim, the table, JSON, the CLI). Each claim is registered
next to its check with ``@claim(id, statement, equation, expected, ...)``; the registration order is
the order of ``tpg verify``.

Verdicts: see ``tpg.claims.base``. ``MARGIN = 1e-4`` (relative) is 10^6 times RTOL. Measured over
seeds 0–199 with the tabular and log-linear policies: the smallest bias of any FALSE check was
1.2e-3 (12× the margin; 4.1e-3 = 41× with the tabular policy) and the largest gap of any equality
check 5.5e-14 (1800× below RTOL); the tests re-measure this over hypothesis-generated MDPs. Besides
its verdict each claim states secondary ``Check``s (e.g. F1's Eq. 26 equality); it agrees only if
all of them pass.

``tpg verify`` runs every claim on ``--seeds`` seeded MDPs (default sizes: V = 3 with EOS, H = 3,
one or two prompts; each claim picks its own), prints one row per claim (the seed closest to
contradicting it), writes ``--json`` and exits 1 on any disagreement.
"""
from tpg.claims.base import (ALL_POLICIES, CLAIMS, EXPECTED, FD_TOL, MARGIN, MDP_DEFAULTS, POLICY_OPTIONS, RTOL,
                             Check, Claim, Exact, Outcome, Result, binary_mdp, claim, combine, differ, discount,
                             equal, est_verdict, expect, false_outcome, fd_error, grad_of, identity_verdict, many,
                             mean_only_grpo, merge, moved, onehot, params_of, prefix_U, prompt_weights, rel,
                             scale_checks, scored, setup, true_outcome, unbiased_outcome, vs, with_policy)
from tpg.claims.oracles import grpo_kappa
from tpg.claims import true, false, measured, montecarlo  # noqa: F401  (registration, in this order)
from tpg.claims.true import *  # noqa: F401,F403  (t1 … t22 and their helpers)
from tpg.claims.false import *  # noqa: F401,F403  (f1 … f11, two_rate_mdp, …)
from tpg.claims.measured import n1, n2  # noqa: F401
from tpg.claims.montecarlo import N_BATCHES, m1, m2, m3, run_mc_check  # noqa: F401
from tpg.claims.run import ClaimRun, format_row, render_table, run_claim, run_cli, select, table_lines, write_json
from tpg.mdp import TPGError  # noqa: F401  (tests match claims.TPGError)

__all__ = ["ALL_POLICIES", "CLAIMS", "EXPECTED", "MARGIN", "RTOL", "Check", "Claim", "ClaimRun", "Exact", "Outcome",
           "Result", "binary_mdp", "claim", "grpo_kappa", "render_table", "run_claim", "run_cli", "select", "setup",
           "table_lines", "write_json"]
