"""tpg: exact verification of policy-gradient estimators for LLM RL on small token MDPs.

The pieces, in the order data flows (DESIGN.md §2):
TokenMDP (mdp) → Policy (policies, lm) → Rollouts (rollouts: sampler / enumerator) →
Estimator (estimators) → coefficients → exact moments (exact) → verdict (verify, claims).
"""
from tpg.mdp import BudgetError, TokenMDP, TPGError, random_mdp
from tpg.policies import LogLinear, Policy, TabularSoftmax
from tpg import lm  # noqa: F401  (registers make_policy's "gpt2" kind; transformers loads only when used)
from tpg.rollouts import Rollouts, enumerate_responses, sample
from tpg.estimators import KL, Estimator, EstimatorOutput, estimator, register_advantage
from tpg import exact
from tpg.verify import Report, report

__version__ = "0.1.0"
__all__ = ["BudgetError", "TokenMDP", "TPGError", "random_mdp", "LogLinear", "Policy", "TabularSoftmax",
           "Rollouts", "enumerate_responses", "sample", "KL", "Estimator", "EstimatorOutput", "estimator",
           "register_advantage", "exact", "Report", "report"]
