"""Policies behind one protocol: validation, teacher forcing vs incremental decoding, parameter sharing.

The sampler, greedy decoding and continuation rollouts only use ``decoder``; the exact engine and
the estimators only use ``log_probs``/``token_log_probs``. These tests pin the two together, so
every policy that passes them is interchangeable (DESIGN §2).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import assert_close, assert_vec_close
from strategies import mdp_and_policy, mdps
from tpg import exact
from tpg.mdp import BudgetError, TokenMDP, TPGError, random_mdp
from tpg.policies import LogLinear, Policy, TabularSoftmax, make_policy
from tpg.rollouts import enumerate_responses


# ------------------------------------------------------------------------------------ validation
def small_mdp() -> TokenMDP:
    return random_mdp(0, vocab_size=3, horizon=2, eos=True, n_prompts=2)          # num_states = 2·3 = 6


@pytest.mark.parametrize("logits,message", [
    (torch.zeros(5, 3), r"logits has shape \(5, 3\), expected \(num_states, V\) = \(6, 3\)"),
    (torch.zeros(6, 3, 1), r"logits has shape \(6, 3, 1\), expected"),
    (torch.full((6, 3), float("nan")), r"logits contains NaN or inf"),
    (torch.tensor([[0.0, float("inf"), 0.0]] * 6), r"logits contains NaN or inf"),
    ("abc", r"logits must be a tensor or array of numbers"),
])
def test_tabular_rejects_bad_logits(logits, message):
    """DESIGN §5: the tabular policy validates the shape and finiteness of user logits."""
    with pytest.raises(TPGError, match=message):
        TabularSoftmax(small_mdp(), logits)


def test_make_policy_unknown_kind():
    """DESIGN §5: an unknown --policy names the valid kinds."""
    with pytest.raises(TPGError, match=r"unknown policy kind 'mlp'; choose one of \('tabular', 'loglinear', 'gpt2'\)"):
        make_policy("mlp", small_mdp())


def test_tabular_refuses_a_table_above_the_budget():
    """DESIGN §5: a tabular policy for V=50, H=10 would need ~4·10^18 logits: refused at once, with the
    size and the shared-parameter alternative, instead of an allocation failure."""
    m = TokenMDP([()], 50, 10, eos=49, token_rewards=lambda *a: 0.0)
    with pytest.raises(BudgetError, match=rf"needs num_states × V = {m.num_states * 50:,} logits.*use LogLinear"):
        TabularSoftmax(m)
    assert LogLinear(m).w_pos.shape == (10, 50)                                    # shared parameters stay small


def test_base_policy_names_the_missing_method():
    class Incomplete(Policy):
        pass

    with pytest.raises(TypeError, match=r"Incomplete must implement log_probs\(prompt_idx, tokens\)"):
        Incomplete().log_probs(torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(TypeError, match=r"Incomplete must implement decoder"):
        Incomplete().decoder(None, None, None)


def test_make_policy_kinds_and_seeds():
    """make_policy builds the named class; the seed fixes the parameters (same seed, same θ)."""
    m = small_mdp()
    assert isinstance(make_policy("tabular", m, seed=1), TabularSoftmax)
    assert isinstance(make_policy("loglinear", m, seed=1), LogLinear)
    for kind in ("tabular", "loglinear"):
        a, b, c = (torch.nn.utils.parameters_to_vector(make_policy(kind, m, seed=s).parameters()) for s in (1, 1, 2))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.dtype == torch.float64


# -------------------------------------------------------------------------- the protocol's two calls
@given(mdp_and_policy())
def test_log_probs_are_normalised_and_causal(case):
    """log_probs rows are distributions, token_log_probs gathers them, and row t ignores tokens[t:]."""
    mdp, pol = case
    enum = enumerate_responses(mdp)
    lp = pol.log_probs(enum.prompt_idx, enum.tokens)                              # (N, H, V)
    assert_close(lp.exp().sum(-1), torch.ones(lp.shape[:2]), what="Σ_a π(a|s) = 1")
    assert_close(pol.token_log_probs(enum.prompt_idx, enum.tokens), lp.gather(-1, enum.tokens[..., None])[..., 0],
                 what="token_log_probs = gather(log_probs)")
    for t in range(mdp.horizon):
        changed = enum.tokens.clone()
        changed[:, t:] = (changed[:, t:] + 1) % mdp.vocab_size                    # rewrite the future
        assert_close(pol.log_probs(enum.prompt_idx, changed)[:, : t + 1], lp[:, : t + 1], what=f"rows ≤ {t}")


@given(mdp_and_policy(), st.data())
def test_decoder_reproduces_log_probs(case, data):
    """Stepping the decoder along each enumerated response, from the empty prefix or from a random
    non-terminal prefix of each row, reproduces the teacher-forced log_probs row by row."""
    mdp, pol = case
    enum = enumerate_responses(mdp)
    N, H = enum.tokens.shape
    lp = pol.log_probs(enum.prompt_idx, enum.tokens).detach()                     # (N, H, V)
    lengths = enum.lengths
    start = torch.tensor([data.draw(st.integers(0, n - 1)) for n in lengths.tolist()])   # (N,) prefix lengths
    rows = torch.arange(N)
    for first in (torch.zeros(N, dtype=torch.long), start):
        width = int(first.max())
        prefix = enum.tokens[:, :width] * (torch.arange(width)[None, :] < first[:, None])  # (N, width) right-padded
        dec = pol.decoder(enum.prompt_idx, prefix, first)
        for k in range(H):
            pos = first + k                                                      # (N,) position each row decodes
            live = pos < lengths
            at = pos.clamp(max=H - 1)
            assert_close(dec.log_probs.detach()[live], lp[rows[live], at[live]], what=f"decoder step {k}")
            dec.advance(enum.tokens[rows, at])                                   # finished rows: ignored later


# ------------------------------------------------------------------------------ parameter sharing
@given(mdps())
def test_loglinear_gradient_mixes_states(mdp):
    """LogLinear shares parameters: with z(s) = W_pos[t] + W_prev[prev] + W_prompt[x] and the per-state
    logit gradient G[s] = ρ(s) π(·|s) (U(s⊕·) − U(s)) (PAPER §2), ∂J/∂W_pos[t] = Σ_{level(s)=t} G[s],
    ∂J/∂W_prompt[x] = Σ_{s in x} G[s], ∂J/∂W_prev[v] = Σ_{prev(s)=v} G[s]: sums over many states."""
    pol = LogLinear(mdp, seed=5)
    tab = exact.tables(mdp, pol)
    G = tab.closed_form()                                                         # (S, V)
    st_ = mdp.state_table()
    level, prompt = torch.as_tensor(st_["level"]), torch.as_tensor(st_["prompt"])
    V = mdp.vocab_size
    prev = torch.empty(mdp.num_states, dtype=torch.long)                          # previous token of each state
    for s in range(mdp.num_states):
        x, p = mdp.prefix_of(s)
        prev[s] = p[-1] if p else (mdp.prompts[x][-1] if mdp.prompts[x] else V)
    expected = torch.cat([
        torch.zeros(mdp.horizon, V, dtype=torch.float64).index_add(0, level, G).reshape(-1),
        torch.zeros(V + 1, V, dtype=torch.float64).index_add(0, prev, G).reshape(-1),
        torch.zeros(len(mdp.prompts), V, dtype=torch.float64).index_add(0, prompt, G).reshape(-1)])
    assert [n for n, _ in pol.named_parameters()] == ["w_pos", "w_prev", "w_prompt"]
    assert_vec_close(exact.gradient(mdp, pol), expected, what="LogLinear ∇J as sums of per-state gradients")


def test_tabular_gradient_is_local_and_loglinear_is_not():
    """Perturbing one reward r(s, a) moves the tabular gradient only at s and its ancestors (whose
    U(s⊕a) changes), but moves every shared LogLinear block (position, previous token, prompt)."""
    m = random_mdp(1, vocab_size=3, horizon=3, eos=True, n_prompts=2, reward="gaussian")
    s = m.num_states - 1                                                          # a deepest state of prompt 1
    bumped = m.token_rewards.copy()
    bumped[s, 0] += 1.0                                                           # r(s, token 0) only
    m2 = TokenMDP(m.prompts, m.vocab_size, m.horizon, m.eos, m.gamma, m.prompt_probs, token_rewards=bumped)
    tab_pol = TabularSoftmax(m, seed=2)
    diff = (exact.gradient(m2, tab_pol) - exact.gradient(m, tab_pol)).reshape(m.num_states, -1).abs().sum(1)
    x, p = m.prefix_of(s)
    ancestors = {m.state_index(torch.tensor([x]), torch.tensor([list(p) + [0]]))[0, t].item() for t in range(len(p) + 1)}
    assert {i for i in range(m.num_states) if diff[i] > 1e-9} == ancestors       # s and its ancestors
    assert float(diff[[i for i in range(m.num_states) if i not in ancestors]].max()) == 0.0
    ll = LogLinear(m, seed=2)
    d = exact.gradient(m2, ll) - exact.gradient(m, ll)
    H, V = m.horizon, m.vocab_size
    blocks = torch.split(d, [H * V, (V + 1) * V, len(m.prompts) * V])
    assert all(float(b.abs().max()) > 1e-6 for b in blocks)


def test_every_policy_kind_is_registered_by_the_package():
    """make_policy's kinds come from a registry: "gpt2" is registered by tpg.lm, which the package
    imports, so tpg.policies never imports the layer above it (tests/test_layering.py)."""
    from tpg.policies import POLICY_BUILDERS
    assert tuple(POLICY_BUILDERS) == ("tabular", "loglinear", "gpt2")


@pytest.mark.parametrize("kw,error,message", [
    (dict(seed=-1), TPGError, r"seed must be an int ≥ 0, got -1"),
    (dict(seed=2**64), TPGError, r"seed must be an int in \[0, 2\*\*63 − 1\]"),
    (dict(scale=float("inf")), TPGError, r"scale must be a finite number ≥ 0"),
    (dict(scale=-1.0), TPGError, r"scale must be a finite number ≥ 0"),
    (dict(dtype=torch.int64), TPGError, r"dtype must be one of"),
])
@pytest.mark.parametrize("cls", [TabularSoftmax, LogLinear])
def test_policy_constructor_arguments_are_validated(cls, kw, error, message):
    with pytest.raises(error, match=message):
        cls(small_mdp(), **kw)


def test_tabular_closed_form_score_grad_equals_autograd():
    """TabularSoftmax.state_score_grad(w) = ∇_logits Σ w·log π for ANY weights w (rows not summing
    to 0, unlike ∇J's), against autograd through state_log_probs."""
    mdp = random_mdp(3, vocab_size=4, horizon=3, eos=True)
    pol = TabularSoftmax(mdp, seed=3)
    w = torch.randn(mdp.num_states, mdp.vocab_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (auto,) = torch.autograd.grad((w * pol.state_log_probs()).sum(), [pol.logits])
    with torch.no_grad():
        (closed,) = pol.state_score_grad(w.clone(), pol.state_log_probs())
    assert_vec_close(closed, auto, what="closed-form softmax VJP vs autograd")
