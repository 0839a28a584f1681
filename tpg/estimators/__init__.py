"""Every LLM-RL policy-gradient estimator, each written once (see core.py for the contract)."""
from tpg.estimators.core import (ADVANTAGES, AGG_MODES, AGGREGATIONS, KL, NEEDS, POLICY_LOSSES, PRESETS, Estimator,
                                 EstimatorOutput, agg_weights, coefficients, estimator, kl_penalty, register_advantage,
                                 register_aggregation, register_policy_loss)
from tpg.estimators import outcome, gae, continuation, verl, trl, openrlhf  # noqa: F401  (registration)

__all__ = ["ADVANTAGES", "AGG_MODES", "AGGREGATIONS", "KL", "NEEDS", "POLICY_LOSSES", "PRESETS", "Estimator",
           "EstimatorOutput", "agg_weights", "coefficients", "estimator", "kl_penalty", "register_advantage",
           "register_aggregation", "register_policy_loss"]
