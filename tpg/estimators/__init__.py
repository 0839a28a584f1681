"""Every LLM-RL policy-gradient estimator, each written once (see core.py for the contract)."""
from tpg.estimators.core import (ADVANTAGES, AGG_MODES, KL, PRESETS, Estimator, EstimatorOutput, agg_weights,
                                 coefficients, estimator, kl_penalty, register_advantage)
from tpg.estimators import outcome, gae, mc  # noqa: F401  (registration)

__all__ = ["ADVANTAGES", "AGG_MODES", "KL", "PRESETS", "Estimator", "EstimatorOutput", "agg_weights",
           "coefficients", "estimator", "kl_penalty", "register_advantage"]
