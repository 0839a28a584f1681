"""TokenMDP: validation of every field, the state index, rewards in every form, the budget guard.

Each validation rule has a bad-input test that checks the message (DESIGN §5). The state index is
checked against an independent itertools construction of the documented layout; callable rewards
against the equivalent arrays; non-additive response rewards through the whole exact engine.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import tpg.mdp as mdp_module
from conftest import assert_close, assert_vec_close
from strategies import mdps, policies
from tpg import exact
from tpg.mdp import BudgetError, TokenMDP, TPGError, random_mdp
from tpg.policies import LogLinear
from tpg.rollouts import enumerate_responses, sample

ZERO = lambda *args: 0.0  # noqa: E731  (a valid reward callable)


def make(**changes) -> TokenMDP:
    """A valid MDP (V=3 with EOS=2, H=2, two prompts: num_states = 2·(1 + 2) = 6) with fields changed."""
    kw = dict(prompts=[(0,), ()], vocab_size=3, horizon=2, eos=2, gamma=0.9, token_rewards=ZERO)
    kw.update(changes)
    return TokenMDP(**kw)


# ------------------------------------------------------------------------------------ validation
BAD_FIELDS = [
    (dict(vocab_size=0), r"vocab_size must be an int ≥ 1, got 0"),
    (dict(vocab_size=2.5), r"vocab_size must be an int ≥ 1, got 2.5"),
    (dict(vocab_size=True), r"vocab_size must be an int ≥ 1, got True"),
    (dict(horizon=0), r"horizon must be an int ≥ 1, got 0"),
    (dict(horizon=1.5), r"horizon must be an int ≥ 1, got 1.5"),
    (dict(eos=3), r"eos=3 is not a token id in \[0, 3\); pass eos=None"),
    (dict(eos=-1), r"eos=-1 is not a token id in \[0, 3\)"),
    (dict(eos=1.0), r"eos=1.0 is not a token id"),
    (dict(vocab_size=1, eos=0, prompts=[()]), r"a vocabulary with EOS needs at least one other token"),
    (dict(gamma=0.0), r"gamma must be a number in \(0, 1\], got 0.0"),
    (dict(gamma=1.5), r"gamma must be a number in \(0, 1\], got 1.5"),
    (dict(gamma=-0.2), r"gamma must be a number in \(0, 1\]"),
    (dict(gamma=float("nan")), r"gamma must be a number in \(0, 1\], got nan"),
    (dict(gamma="0.9"), r"gamma must be a number in \(0, 1\], got '0.9'"),
    (dict(prompts=[]), r"an MDP needs at least one prompt \(an empty prompt \(\) is allowed\)"),
    (dict(prompts=5), r"prompts must be a list of token sequences"),
    (dict(prompts=[(0,), (3,)]), r"prompt 1 has token 3: prompt tokens must be ints in \[0, 3\) and not EOS"),
    (dict(prompts=[(0, -1)]), r"prompt 0 has token -1"),
    (dict(prompts=[(2,)]), r"prompt 0 has token 2: .* not EOS"),
    (dict(prompts=[(0.5,)]), r"prompt 0 has token 0.5: prompt tokens must be ints"),
    (dict(prompt_probs=[1.0]), r"prompt_probs has shape \(1,\), expected \(2,\)"),
    (dict(prompt_probs=[[0.5, 0.5]]), r"prompt_probs has shape \(1, 2\), expected \(2,\)"),
    (dict(prompt_probs=[1.5, -0.5]), r"prompt_probs must be finite and ≥ 0"),
    (dict(prompt_probs=[float("nan"), 1.0]), r"prompt_probs must be finite and ≥ 0"),
    (dict(prompt_probs=[0.3, 0.3]), r"prompt_probs must sum to 1, sum is 0.6"),
    (dict(prompt_probs=["a", "b"]), r"prompt_probs must be 2 numbers"),
    (dict(token_rewards=None), r"give exactly one of token_rewards \(additive RM\) or response_rewards"),
    (dict(response_rewards=ZERO), r"give exactly one of token_rewards"),
    (dict(token_rewards=np.zeros((2, 3))), r"token_rewards has shape \(2, 3\), expected \(num_states, V\) = \(6, 3\)"),
    (dict(token_rewards=None, response_rewards=np.zeros((6, 2))),
     r"response_rewards has shape \(6, 2\), expected \(num_states, V\) = \(6, 3\)"),
    (dict(token_rewards=np.full((6, 3), np.nan)), r"token_rewards contains NaN or inf"),
    (dict(token_rewards=None, response_rewards=np.full((6, 3), np.inf)), r"response_rewards contains NaN or inf"),
    (dict(token_rewards=[["a"] * 3] * 6), r"token_rewards must be a \(num_states, V\) array of numbers or a callable"),
]


@pytest.mark.parametrize("changes,message", BAD_FIELDS, ids=[m[:40] for _, m in BAD_FIELDS])
def test_bad_field_is_refused_with_actionable_message(changes, message):
    """DESIGN §5: every TokenMDP field is validated; the TPGError (a ValueError) says what to fix."""
    with pytest.raises(TPGError, match=message):
        make(**changes)
    assert issubclass(TPGError, ValueError)


def test_valid_edge_cases_are_accepted():
    """The boundaries of the rules: γ = 1, an empty prompt, a zero-probability prompt, EOS id 0,
    numpy integer fields, V = 1 without EOS (a single response per prompt)."""
    m = make(gamma=1.0, prompt_probs=[0.0, 1.0], eos=np.int64(0), prompts=[(1,), ()], vocab_size=np.int64(3))
    assert m.gamma == 1.0 and m.prompts == ((1,), ()) and m.arity == 2
    single = TokenMDP([()], 1, 3, None, token_rewards=lambda x, p, a: 1.0)
    enum = enumerate_responses(single)
    assert enum.batch_size == 1 and float(enum.rm) == 3.0


@pytest.mark.parametrize("fn,message", [
    (lambda x, p, a: float("nan"), r"the token_rewards callable returned NaN or inf on prompt 0, response \(2,\)"),
    (lambda x, p, a: "high", r"the token_rewards callable must return a float; on prompt 0, response \(2,\)"),
])
def test_token_callable_returning_bad_values_is_refused(fn, message):
    """DESIGN §5 (finite rewards): a token-reward callable is checked where it is evaluated."""
    m = make(token_rewards=fn, prompts=[()])
    with pytest.raises(TPGError, match=message):
        enumerate_responses(m)


def test_response_callable_returning_inf_is_refused():
    """DESIGN §5 (finite rewards): the response callable's value is checked, naming the response."""
    m = make(token_rewards=None, response_rewards=lambda x, y: math.inf if y == (1, 0) else 0.0, prompts=[()])
    with pytest.raises(TPGError, match=r"response_rewards callable returned NaN or inf on prompt 0, response \(1, 0\)"):
        enumerate_responses(m)


@pytest.mark.parametrize("kw,message", [
    (dict(reward="dense"), r"reward must be one of \('gaussian', 'sparse', 'binary', 'zra'\), got 'dense'"),
    (dict(vocab_size=1, eos=True), r"vocab_size must be an int ≥ 2 \(eos=True needs one token besides EOS\), got 1"),
    (dict(vocab_size=0, eos=False), r"vocab_size must be an int ≥ 1"),
    (dict(n_prompts=0), r"n_prompts must be an int ≥ 1, got 0"),
    (dict(prompt_len=-1), r"prompt_len must be an int ≥ 0, got -1"),
    (dict(sparsity=1.5), r"sparsity must be a number in \[0, 1\], got 1.5"),
    (dict(gamma=0.0), r"gamma must be a number in \(0, 1\]"),
    (dict(n_prompts=2, prompt_probs=[0.9, 0.2]), r"prompt_probs must sum to 1"),
])
def test_random_mdp_validates_its_arguments(kw, message):
    """DESIGN §5: the random MDP factory refuses bad arguments with a TPGError naming the argument."""
    with pytest.raises(TPGError, match=message):
        random_mdp(0, **kw)


# ------------------------------------------------------------------------------------ the budget
def test_enumeration_above_budget_is_refused_before_allocating():
    """DESIGN §5: V=50, H=10 has ~8·10^16 responses; enumeration and every exact computation refuse
    at once (no allocation: it could not succeed), naming the size and pointing to Monte Carlo."""
    m = TokenMDP([()], 50, 10, eos=49, token_rewards=ZERO)
    n = f"{m.num_responses:,}"
    for job in (lambda: enumerate_responses(m), lambda: exact.gradient(m, LogLinear(m)),
                lambda: exact.tables(m, LogLinear(m)), lambda: exact.objective(m, LogLinear(m)), m.zra):
        with pytest.raises(BudgetError, match=rf"needs {n} responses, above the budget of 10,000,000\. Use Monte Carlo"):
            job()   # allocating first would raise MemoryError/RuntimeError here, not BudgetError


def test_budget_is_configurable():
    """The budget is an argument: exactly N responses fit in budget=N and not in budget=N−1."""
    m = make()
    assert enumerate_responses(m, budget=m.num_responses).batch_size == m.num_responses
    with pytest.raises(BudgetError, match=rf"needs {m.num_responses} responses, above the budget of {m.num_responses - 1}"):
        enumerate_responses(m, budget=m.num_responses - 1)


def test_random_mdp_refuses_a_huge_reward_table():
    """DESIGN §5: random_mdp would draw a (num_states, V) table; above the table budget it refuses
    with BudgetError instead of asking numpy for exabytes."""
    with pytest.raises(BudgetError, match=r"random_mdp would draw a reward table of num_states × V = .* callable reward"):
        random_mdp(0, vocab_size=50, horizon=10)


def test_state_index_refuses_indices_beyond_int64():
    """A vocabulary of 2^21 tokens with H = 4 has ~2^63 prefix states: the state index (int64) refuses
    with a message instead of overflowing silently."""
    m = TokenMDP([()], 2**21, 4, None, token_rewards=ZERO)
    with pytest.raises(TPGError, match=r"has too many states to index in int64"):
        m.state_index(torch.zeros(1, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------------------- the state index
def naive_prefixes(mdp: TokenMDP) -> list[tuple[int, tuple]]:
    """Every (prompt, prefix) in the documented order: prompt-major, then level (prefix length 0..H-1),
    then lexicographic over the non-EOS tokens, built with itertools (independent of the index math)."""
    non_eos = [a for a in range(mdp.vocab_size) if a != mdp.eos]
    return [(x, p) for x in range(len(mdp.prompts)) for t in range(mdp.horizon)
            for p in itertools.product(non_eos, repeat=t)]


@given(mdps())
def test_state_index_matches_documented_layout(mdp):
    """state_index, prefix_of and state_table agree with the itertools order of (prompt, prefix), and
    every enumerated response's states are its own prefixes."""
    order = naive_prefixes(mdp)
    assert len(order) == mdp.num_states
    index = {key: s for s, key in enumerate(order)}
    assert [mdp.prefix_of(s) for s in range(mdp.num_states)] == order
    st_ = mdp.state_table()
    for s, (x, p) in enumerate(order):
        assert (st_["prompt"][s], st_["level"][s]) == (x, len(p))
        for a in range(mdp.vocab_size):
            terminal = a == mdp.eos or len(p) + 1 == mdp.horizon
            assert st_["child"][s, a] == (-1 if terminal else index[(x, p + (a,))])
    enum = enumerate_responses(mdp)
    s = mdp.state_index(enum.prompt_idx, enum.tokens)
    for i, (x, row, n) in enumerate(zip(enum.prompt_idx.tolist(), enum.tokens.tolist(), enum.lengths.tolist())):
        assert s[i, :n].tolist() == [index[(x, tuple(row[:t]))] for t in range(n)]


def loop_state_index(mdp: TokenMDP, prompt_idx, tokens) -> torch.Tensor:
    """Reference: prompt·S + level_start[t] + (digits of tokens[:t] in base A), one column at a time."""
    start = mdp.level_start()
    d = tokens - (tokens > mdp.eos).long() if mdp.eos is not None else tokens
    code = torch.zeros(len(tokens), dtype=torch.long)
    cols = []
    for t in range(tokens.shape[1]):
        cols.append(prompt_idx * mdp.states_per_prompt + int(start[t]) + code)
        code = code * mdp.arity + d[:, t]
    return torch.stack(cols, 1)


@given(mdps(), st.integers(1, 50))
def test_state_index_blocks_and_padding(mdp, block_rows):
    """The blocked, column-major state index equals the one-column-at-a-time reference for every block
    size; positions after the end get a valid row (0 under ``mask``), also past the horizon."""
    enum = enumerate_responses(mdp)
    m = enum.mask.bool()
    ref = loop_state_index(mdp, enum.prompt_idx, enum.tokens)
    saved = mdp_module._BLOCK_ROWS
    try:
        mdp_module._BLOCK_ROWS = block_rows
        s = mdp.state_index(enum.prompt_idx, enum.tokens)
        masked = mdp.state_index(enum.prompt_idx, enum.tokens, enum.mask)
        wide = mdp.state_index(enum.prompt_idx, torch.cat([enum.tokens, enum.tokens], 1))   # L = 2H > H
    finally:
        mdp_module._BLOCK_ROWS = saved
    assert torch.equal(s[m], ref[m])
    assert torch.equal(masked, torch.where(m, ref, 0))
    assert torch.equal(wide[:, : mdp.horizon][m], ref[m])
    for t in (s, wide):
        assert int(t.min()) >= 0 and int(t.max()) < mdp.num_states


# ------------------------------------------------------------------------------------------- rewards
def as_token_callable(mdp: TokenMDP, table: np.ndarray):
    """r(x, prefix, a) read from a (num_states, V) table through itertools' prefix order."""
    index = {key: s for s, key in enumerate(naive_prefixes(mdp))}
    return lambda x, prefix, a: float(table[index[(x, tuple(prefix))], a])


def tables_equal(a, b, fields=("U", "Uc", "V", "Q", "A", "visit", "r")):
    for name in fields:
        assert_close(getattr(a, name), getattr(b, name), what=name)
    assert_close(a.enum.rm, b.enum.rm, what="RM")
    assert_close(a.J, b.J, what="J")


@given(mdps(rewards=("gaussian", "sparse")), st.data())
def test_token_callable_gives_the_same_tables_as_the_array(mdp, data):
    """A token-reward callable r(x, y_<t, a) equal to the table gives identical rewards, RM, tables and ∇J."""
    pol = data.draw(policies(mdp))
    same = TokenMDP(mdp.prompts, mdp.vocab_size, mdp.horizon, mdp.eos, mdp.gamma, mdp.prompt_probs,
                    token_rewards=as_token_callable(mdp, mdp.token_rewards))
    tables_equal(exact.tables(same, pol), exact.tables(mdp, pol))
    assert_close(enumerate_responses(same).token_rewards, enumerate_responses(mdp).token_rewards, what="r_t")
    assert_vec_close(exact.gradient(same, pol), exact.gradient(mdp, pol), what="∇J")


@given(mdps(), st.data())
def test_response_callable_gives_the_zra_tables_of_the_same_rm(mdp, data):
    """A response callable returning the same RM(x, y) gives the ZRA form of the MDP: the same U, J,
    ∇J and A, and V/Q equal to ``tables(mdp.zra())`` (PAPER §1.4)."""
    pol = data.draw(policies(mdp))
    enum = enumerate_responses(mdp)
    lengths = enum.lengths.tolist()
    rm = {(x, tuple(row[:n])): v for x, row, n, v in
          zip(enum.prompt_idx.tolist(), enum.tokens.tolist(), lengths, enum.rm.tolist())}
    same = TokenMDP(mdp.prompts, mdp.vocab_size, mdp.horizon, mdp.eos, mdp.gamma, mdp.prompt_probs,
                    response_rewards=lambda x, y: rm[(x, tuple(y))])
    tables_equal(exact.tables(same, pol), exact.tables(mdp.zra(), pol))
    assert_vec_close(exact.gradient(same, pol), exact.gradient(mdp, pol), what="∇J")


def distinct_tokens_reward(x: int, y: tuple) -> float:
    """A non-additive RM: 1 if every token differs, else −0.5, scaled by the prompt."""
    return (1.0 if len(set(y)) == len(y) else -0.5) * (1 + x)


@given(mdps(rewards=("gaussian",)), st.data())
def test_non_additive_response_reward_works_everywhere(mdp, data):
    """PAPER §1.3–1.4 (only RM matters): a response reward that is no discounted sum of token rewards
    goes through enumeration, sampling, tables, the closed form, Theorem 2 and finite differences."""
    m = TokenMDP(mdp.prompts, mdp.vocab_size, mdp.horizon, mdp.eos, mdp.gamma, mdp.prompt_probs,
                 response_rewards=distinct_tokens_reward)
    assert m.zra() is m and not m.additive
    pol = data.draw(policies(m, kinds=("tabular",)))
    tab = exact.tables(m, pol)
    enum = tab.enum
    ys = [(x, tuple(r[:n])) for x, r, n in zip(enum.prompt_idx.tolist(), enum.tokens.tolist(), enum.lengths.tolist())]
    assert_close(enum.rm, torch.tensor([distinct_tokens_reward(*k) for k in ys], dtype=torch.float64), what="RM")
    grad = exact.gradient(m, pol)
    assert_vec_close(grad, tab.closed_form(), what="closed form")
    adv = tab.prob[:, None] * (tab.along(tab.Uc) - tab.along(tab.U))
    assert_vec_close(exact.expected_score(pol, enum, adv), grad, what="Theorem 2")
    ro = sample(m, pol, 3, torch.Generator().manual_seed(0), n_prompts=2)
    for x, row, n, v in zip(ro.prompt_idx.tolist(), ro.tokens.tolist(), ro.lengths.tolist(), ro.rm.tolist()):
        assert v == distinct_tokens_reward(x, tuple(row[:n]))


@given(mdps())
def test_rewards_decomposition(mdp):
    """PAPER §1.3–1.4: additive MDPs have RM = Σ_t γ^(t-1) r_t; response-level MDPs put RM/γ^(T-1) on
    the last token and 0 elsewhere; both are zero after the end of the response."""
    enum = enumerate_responses(mdp)
    disc = mdp.gamma ** torch.arange(mdp.horizon, dtype=torch.float64)
    assert_close((enum.token_rewards * disc).sum(1), enum.rm, what="Σ γ^(t-1) r_t = RM")
    assert bool((enum.token_rewards[enum.mask == 0] == 0).all())
    if not mdp.additive:
        T = enum.lengths
        before_last = enum.mask.clone()
        before_last[torch.arange(enum.batch_size), T - 1] = 0
        assert bool((enum.token_rewards[before_last.bool()] == 0).all())


def test_repr_names_the_size():
    m = make()
    assert repr(m) == "TokenMDP(P=2, V=3, H=2, eos=2, γ=0.9, token rewards, 14 responses)"


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True, None])
def test_random_mdp_refuses_a_bad_seed(seed):
    """A negative or non-int seed is a TPGError naming the rule, not numpy's raw ValueError."""
    with pytest.raises(TPGError, match=f"seed must be an int ≥ 0.*got {seed!r}"):
        random_mdp(seed)


@given(mdps())
def test_prefix_tokens_invert_the_state_index(mdp):
    """prefix_tokens(s) is the response prefix of state s: indexing it back gives s (every state)."""
    S = mdp.num_states
    st = mdp.state_table()
    toks = mdp.prefix_tokens(np.arange(S))                                     # (S, H)
    level = torch.as_tensor(st["level"])
    assert bool((toks[torch.arange(mdp.horizon)[None, :] >= level[:, None]] == 0).all())   # 0-padded
    idx = mdp.state_index(torch.as_tensor(st["prompt"]), torch.cat([toks, torch.zeros(S, 1, dtype=torch.long)], 1))
    assert torch.equal(idx.gather(1, level[:, None])[:, 0], torch.arange(S))
    for s in range(0, S, max(1, S // 7)):                                     # against prefix_of, one by one
        p, prefix = mdp.prefix_of(s)
        assert tuple(toks[s, : len(prefix)].tolist()) == prefix


@given(mdps(rewards=("gaussian", "sparse")))
def test_zra_table_holds_each_responses_rm_at_its_last_pair(mdp):
    """zra() builds its table without the enumerator (mdp.py sits below rollouts.py); against the
    enumeration, read naively one response at a time, every terminal pair holds its response's RM
    and every other entry is 0."""
    z = mdp.zra().response_rewards
    enum = enumerate_responses(mdp)
    expect = np.zeros_like(z)
    for i in range(enum.batch_size):
        T = int(enum.lengths[i])
        s = int(mdp.state_index(enum.prompt_idx[i: i + 1], enum.tokens[i: i + 1])[0, T - 1])
        expect[s, int(enum.tokens[i, T - 1])] = float(enum.rm[i])
    assert_close(z, expect, what="ZRA table vs enumerated RM")


def test_callable_reward_values_must_be_real_numbers():
    """Rewards returned as 0-d tensors or numpy scalars are numbers; bools, strings and vectors are not."""
    ok = TokenMDP([()], 3, 2, 2, token_rewards=lambda x, p, a: torch.tensor(0.5, dtype=torch.float64))
    assert_close(enumerate_responses(ok).rm[:1], [0.5])
    for bad in (lambda x, p, a: True, lambda x, p, a: "0.5", lambda x, p, a: np.ones(2)):
        with pytest.raises(TPGError, match="the token_rewards callable must return a float"):
            enumerate_responses(TokenMDP([()], 3, 2, 2, token_rewards=bad))


def test_astronomical_mdps_are_refused_without_big_integers():
    """H = 10^8 has ~10^(4.8·10^7) responses: repr, a reward table and zra() answer at once."""
    deep = TokenMDP([()], 4, 10**8, eos=3, token_rewards=ZERO)
    assert "~10^47712125 responses" in repr(deep)
    with pytest.raises(BudgetError, match=r"needs ~10\^47712125 responses, above the budget"):
        deep.zra()
    with pytest.raises(TPGError, match=r"token_rewards has shape \(3, 4\), expected .*more than 10\^18"):
        TokenMDP([()], 4, 10**8, eos=3, token_rewards=np.zeros((3, 4)))


def test_integer_fields_become_python_ints():
    """numpy ints are accepted and stored as Python ints (A**H must not overflow int64 silently)."""
    m = make(vocab_size=np.int64(3), horizon=np.int32(2), eos=np.int64(2))
    assert all(type(v) is int for v in (m.vocab_size, m.horizon, m.eos))
