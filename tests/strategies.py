"""Hypothesis strategies for random token MDPs and policies, shared by the test files.

``mdps()`` draws ``random_mdp(...)`` over seeds, vocabularies of 2–4 tokens, horizons 1–4 with EOS
or fixed length, 1–3 prompts of length 0–2 (empty prompts included), γ = 1 or γ ∈ (0.3, 1), every
reward kind, and a non-uniform prompt distribution. The horizon is capped so that an example
enumerates at most ``max_responses`` responses, which keeps every exact identity in milliseconds.
``policies(mdp)`` draws a TabularSoftmax or LogLinear policy with a seed.
"""
from __future__ import annotations

from hypothesis import strategies as st

from tpg.mdp import REWARD_KINDS, TokenMDP, random_mdp
from tpg.policies import make_policy

MAX_RESPONSES = 300
POLICY_KINDS = ("tabular", "loglinear")


def responses_per_prompt(vocab_size: int, horizon: int, eos: bool) -> int:
    """Complete responses of one prompt: A^H of full length, plus A^0 + … + A^(H-1) ending in EOS."""
    A = vocab_size - eos
    return A**horizon + (sum(A**t for t in range(horizon)) if eos else 0)


def feasible_horizons(vocab_size: int, eos: bool, n_prompts: int, max_responses: int = MAX_RESPONSES,
                      max_horizon: int = 4) -> list[int]:
    """Horizons 1..max_horizon whose enumeration stays within ``max_responses`` responses."""
    return [H for H in range(1, max_horizon + 1)
            if n_prompts * responses_per_prompt(vocab_size, H, eos) <= max_responses]


gammas = st.one_of(st.just(1.0), st.floats(0.3, 1.0, exclude_min=True, exclude_max=True))


@st.composite
def prompt_distributions(draw, n_prompts: int) -> list[float]:
    """A non-uniform ρ(x) (weights in [0.1, 1], normalised) for n ≥ 2; [1.0] for a single prompt."""
    if n_prompts == 1:
        return [1.0]
    w = draw(st.lists(st.floats(0.1, 1.0), min_size=n_prompts, max_size=n_prompts).filter(
        lambda w: max(w) - min(w) > 0.05))
    return [x / sum(w) for x in w]


@st.composite
def mdps(draw, max_responses: int = MAX_RESPONSES, rewards=REWARD_KINDS, eos=None, gamma=None,
         min_horizon: int = 1) -> TokenMDP:
    """A random token MDP (see module docstring); ``rewards``/``eos``/``gamma`` restrict the draw."""
    vocab_size = draw(st.integers(2, 4))
    has_eos = draw(st.booleans()) if eos is None else eos
    n_prompts = draw(st.integers(1, 3))
    horizons = [H for H in feasible_horizons(vocab_size, has_eos, n_prompts, max_responses) if H >= min_horizon]
    if not horizons:                                   # e.g. min_horizon too deep for this vocabulary: shrink it
        vocab_size, n_prompts = 2, 1
        horizons = [H for H in feasible_horizons(2, has_eos, 1, max_responses) if H >= min_horizon]
    return random_mdp(draw(st.integers(0, 2**32 - 1)), vocab_size=vocab_size, horizon=draw(st.sampled_from(horizons)),
                      eos=has_eos, n_prompts=n_prompts, prompt_len=draw(st.integers(0, 2)),
                      gamma=draw(gammas) if gamma is None else gamma, reward=draw(st.sampled_from(rewards)),
                      prompt_probs=draw(prompt_distributions(n_prompts)))


@st.composite
def policies(draw, mdp: TokenMDP, kinds=POLICY_KINDS):
    """A TabularSoftmax or LogLinear policy for ``mdp`` with a drawn seed."""
    return make_policy(draw(st.sampled_from(kinds)), mdp, seed=draw(st.integers(0, 2**31 - 1)))


@st.composite
def mdp_and_policy(draw, kinds=POLICY_KINDS, **mdp_kw):
    """(mdp, policy) pairs: the unit most exact identities quantify over."""
    mdp = draw(mdps(**mdp_kw))
    return mdp, draw(policies(mdp, kinds))
