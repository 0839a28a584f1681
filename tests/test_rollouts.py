"""The sampler, greedy decoding, continuation rollouts, and the enumerator they must agree with.

The Monte Carlo tests are designed (TFP style): exact per-cell binomial tests against the exact
probabilities of ``tpg.exact.tables``, Bonferroni-split so the whole test falsely fails with
probability ≤ 1e-6, a fixed seed (``mc_seed``; fresh ones under TPG_MC_FRESH=1), the smallest
detectable discrepancy asserted beside each check, and a negative control (draws from another
policy) that must be rejected.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import assert_close, mc_seed
from tpg import TabularSoftmax, TokenMDP, TPGError, exact, random_mdp
from tpg.policies import LogLinear
from tpg.rollouts import categorical, continuation_rm, decode, enumerate_responses, greedy, greedy_pick, sample

FALSE_FAIL = 1e-6


# ------------------------------------------------------------------------------ helpers
def response_ids(enum, prompt_idx, tokens) -> np.ndarray:
    """Row of the enumeration holding each (prompt, response); −1 if none does."""
    key = {(p, tuple(y)): n for n, (p, y) in enumerate(zip(enum.prompt_idx.tolist(), enum.tokens.tolist()))}
    return np.array([key.get((p, tuple(y)), -1) for p, y in zip(prompt_idx.tolist(), tokens.tolist())])


def binomial_pvalues(counts: np.ndarray, n: int, p: np.ndarray) -> np.ndarray:
    """Exact two-sided binomial p-value of every cell (counts ~ Binomial(n, p) marginally)."""
    return np.array([stats.binomtest(int(k), n, float(q)).pvalue for k, q in zip(counts, p)])


def acceptance_halfwidth(n: int, p: np.ndarray, alpha: float) -> np.ndarray:
    """Half-width, in counts, of each cell's acceptance interval at level alpha (for power checks)."""
    lo = stats.binom.ppf(alpha / 2, n, p)
    hi = stats.binom.isf(alpha / 2, n, p)
    return (hi - lo) / 2


def assert_powered(n: int, p0: np.ndarray, p1: np.ndarray, alpha: float) -> None:
    """The negative control is detectable by design: some cell's mean shift exceeds its acceptance
    half-width by ≥ 6 standard deviations of the alternative count (miss probability < 1e-9)."""
    margin = n * np.abs(p1 - p0) - acceptance_halfwidth(n, p0, alpha) - 6 * np.sqrt(n * p1 * (1 - p1))
    assert margin.max() > 0, "negative control too close to the null: raise n"


# ------------------------------------------------------------------------------ sampler basics
@pytest.fixture(scope="module")
def m2():
    m = random_mdp(5, vocab_size=3, horizon=3, eos=True, n_prompts=2, prompt_probs=[0.3, 0.7])
    return m, TabularSoftmax(m, seed=4)


def test_sample_is_reproducible(m2):
    m, p = m2
    a = sample(m, p, 3, torch.Generator().manual_seed(7), n_prompts=4, n_batches=2)
    b = sample(m, p, 3, torch.Generator().manual_seed(7), n_prompts=4, n_batches=2)
    c = sample(m, p, 3, torch.Generator().manual_seed(8), n_prompts=4, n_batches=2)
    for f in ("prompt_idx", "tokens", "mask", "rm", "logp_old", "group", "batch"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not (torch.equal(a.tokens, c.tokens) and torch.equal(a.prompt_idx, c.prompt_idx))


@pytest.mark.parametrize("eos", [True, False])
def test_sampled_responses_are_valid(eos):
    """Each response ends at its first EOS or at H; tokens after the end are 0 and masked; the
    behaviour log-probs, rewards, groups and batches are those of the rows."""
    m = random_mdp(2, vocab_size=4, horizon=5, eos=eos, n_prompts=3)
    p = TabularSoftmax(m, seed=1)
    ro = sample(m, p, 4, torch.Generator().manual_seed(mc_seed(3)), n_prompts=3, n_batches=2)
    B, L = ro.tokens.shape
    assert (B, L) == (2 * 3 * 4, 5) and ro.mask.dtype == torch.float64 and ro.tokens.dtype == torch.long
    for y, msk in zip(ro.tokens.tolist(), ro.mask.tolist()):
        T = int(sum(msk))
        assert msk == [1.0] * T + [0.0] * (L - T) and 1 <= T <= L
        assert y[T:] == [0] * (L - T)
        if eos:
            assert m.eos not in y[: T - 1] and (y[T - 1] == m.eos or T == L)
        else:
            assert T == L
    assert_close(ro.logp_old, p.token_log_probs(ro.prompt_idx, ro.tokens).detach() * ro.mask)
    r, rm = m.rewards(ro.prompt_idx, ro.tokens, ro.mask)
    assert_close(ro.rm, rm)
    assert_close(ro.token_rewards, r)
    assert ro.group.tolist() == [g for g in range(6) for _ in range(4)]
    assert ro.batch.tolist() == [b for b in range(2) for _ in range(12)] and ro.n_batches == 2


def test_sample_with_given_prompts_repeats_them_per_batch(m2):
    m, p = m2
    ro = sample(m, p, 2, torch.Generator().manual_seed(0), prompt_idx=torch.tensor([1, 0]), n_batches=3)
    assert ro.prompt_idx.tolist() == [1, 1, 0, 0] * 3
    assert ro.batch.tolist() == [b for b in range(3) for _ in range(4)]


@pytest.mark.parametrize("G", [0, -1, 1.5, "2"])
def test_sample_refuses_bad_group_size(m2, G):
    m, p = m2
    with pytest.raises(TPGError, match="group size"):
        sample(m, p, G, torch.Generator())


@pytest.mark.parametrize("gen", [None, 0, np.random.default_rng(0)])
def test_sample_refuses_a_non_generator(m2, gen):
    m, p = m2
    with pytest.raises(TPGError, match="torch.Generator"):
        sample(m, p, 2, gen)


# ------------------------------------------------------------------------------ designed MC tests
@pytest.mark.mc
def test_sampled_frequencies_match_exact_probabilities(m2):
    """Counts of every (prompt, response) vs n·P(x, y) from the exact engine (30 cells).

    Per-cell exact binomial test at α = 1e-6/30: false-fail ≤ 1e-6 in total. With n = 40 000 the
    smallest detectable shift of a probability p is about 5.3·√(p(1−p)/n) (≈ 0.012 at p = 0.2).
    Negative control: the same test on draws from another policy must reject.
    """
    m, p = m2
    tab = exact.tables(m, p)
    n, cells = 40_000, tab.enum.batch_size
    alpha = FALSE_FAIL / cells
    ro = sample(m, p, 1, torch.Generator().manual_seed(mc_seed(11)), n_prompts=n)
    ids = response_ids(tab.enum, ro.prompt_idx, ro.tokens)
    assert (ids >= 0).all(), "a sampled response is not in the enumeration"
    p0 = tab.prob.numpy()
    assert abs(p0.sum() - 1) < 1e-12
    pv = binomial_pvalues(np.bincount(ids, minlength=cells), n, p0)
    assert pv.min() > alpha, f"cell {pv.argmin()} rejected: p-value {pv.min():.2e} ≤ {alpha:.1e}"

    other = TabularSoftmax(m, seed=9)
    p1 = exact.tables(m, other).prob.numpy()
    assert_powered(n, p0, p1, alpha)
    ro1 = sample(m, other, 1, torch.Generator().manual_seed(mc_seed(12)), n_prompts=n)
    pv1 = binomial_pvalues(np.bincount(response_ids(tab.enum, ro1.prompt_idx, ro1.tokens), minlength=cells), n, p0)
    assert pv1.min() <= alpha, "negative control: draws from another policy were not rejected"


@pytest.mark.mc
def test_continuations_follow_the_policy_from_each_prefix():
    """continuation_rm from every open prefix of every response: the continuation is identified by
    its RM (response-level Gaussian rewards are distinct), must extend the prefix, and its
    frequency must match π(z | prefix). Exact binomial per (prefix, z) cell, Bonferroni to 1e-6;
    negative control: the frequencies under another policy's conditional probabilities reject."""
    m = random_mdp(6, vocab_size=3, horizon=3, eos=True, reward="zra")
    p = TabularSoftmax(m, seed=2)
    tab = exact.tables(m, p)
    enum, prob = tab.enum, tab.prob.numpy()
    rm = enum.rm.numpy()
    assert len(np.unique(rm)) == len(rm)
    K = 3000
    cont = continuation_rm(m, p, enum, K, torch.Generator().manual_seed(mc_seed(13))).numpy()   # (N, L+1, K)
    toks, lens = enum.tokens.tolist(), enum.lengths.tolist()
    cells_p, cells_k, cells_alt = [], [], []
    alt = exact.tables(m, TabularSoftmax(m, seed=7)).prob.numpy()
    for n in range(enum.batch_size):
        assert (cont[n, lens[n]:] == rm[n]).all()                                # complete prefixes: RM(y)
        for t in range(lens[n]):
            ext = [z for z in range(len(rm)) if toks[z][:t] == toks[n][:t]]      # responses extending y_≤t
            z_of = {float(rm[z]): i for i, z in enumerate(ext)}
            drawn = np.array([z_of.get(float(r), -1) for r in cont[n, t]])
            assert (drawn >= 0).all(), "a continuation does not extend its prefix"
            cells_k.append(np.bincount(drawn, minlength=len(ext)))
            cells_p.append(prob[ext] / prob[ext].sum())
            cells_alt.append(alt[ext] / alt[ext].sum())
    counts, p0, p1 = np.concatenate(cells_k), np.concatenate(cells_p), np.concatenate(cells_alt)
    alpha = FALSE_FAIL / len(counts)
    pv = binomial_pvalues(counts, K, p0)
    assert pv.min() > alpha, f"continuation cell {pv.argmin()} rejected: p-value {pv.min():.2e}"
    assert_powered(K, p1, p0, alpha)                                             # the counts (∼p0) vs null p1
    assert binomial_pvalues(counts, K, p1).min() <= alpha, "negative control not rejected"


# ------------------------------------------------------------------------------ greedy
def hand_greedy(mdp, logits, prompt):
    """Follow argmax (lowest id on ties) by hand, reading the child table."""
    child = mdp.state_table()["child"]
    s, y = prompt * mdp.states_per_prompt, []
    while True:
        row = logits[s].tolist()
        a = row.index(max(row))                                  # list.index: the first maximum
        y.append(a)
        if child[s, a] < 0:
            return y
        s = child[s, a]


@pytest.mark.parametrize("tie_winner", [0, 1])
def test_greedy_is_the_argmax_path_with_lowest_id_tie_break(tie_winner):
    """Root logits (2, 2, 0) tie tokens 0 and 1: greedy takes 0. The control (2, 2.5, 0) takes 1."""
    m = random_mdp(4, vocab_size=3, horizon=4, eos=True, n_prompts=2)
    logits = torch.randn(m.num_states, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits[0] = torch.tensor([2.0, 2.0 + 0.5 * tie_winner, 0.0])
    p = TabularSoftmax(m, logits=logits)
    ro = greedy(m, p, torch.tensor([0, 1]))
    assert ro.tokens[0, 0] == tie_winner
    for i in range(2):
        y = hand_greedy(m, logits, i)
        assert ro.tokens[i].tolist() == y + [0] * (m.horizon - len(y)) and int(ro.lengths[i]) == len(y)
    again = greedy(m, p, torch.tensor([0, 1]))
    assert torch.equal(ro.tokens, again.tokens) and torch.equal(ro.rm, again.rm)
    assert_close(ro.rm, m.rewards(ro.prompt_idx, ro.tokens, ro.mask)[1])


def test_greedy_works_for_a_shared_parameter_policy():
    m = random_mdp(4, vocab_size=4, horizon=4, eos=True)
    p = LogLinear(m, seed=3)
    ro = greedy(m, p, torch.tensor([0]))
    lp = p.log_probs(ro.prompt_idx, ro.tokens)[0]                                # (L, V) teacher forcing
    T = int(ro.lengths[0])
    assert ro.tokens[0, :T].tolist() == lp[:T].argmax(-1).tolist()


# ------------------------------------------------------------------------------ decode
class _NoSelect:
    """A policy whose decoder cannot drop finished rows (like a KV-cached LM without ``select``)."""

    class _Dec:
        def __init__(self, dec):
            self.dec = dec

        @property
        def log_probs(self):
            return self.dec.log_probs

        def advance(self, tokens):
            self.dec.advance(tokens)

    def __init__(self, policy):
        self.policy = policy

    def decoder(self, *args):
        return self._Dec(self.policy.decoder(*args))


def mixed_prefixes(m, n=64, seed=0):
    """Prefixes of enumerated responses cut at every length 0..T (complete ones included)."""
    enum = enumerate_responses(m)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, enum.batch_size, (n,), generator=g)
    cut = (torch.rand(n, generator=g) * (enum.lengths[rows] + 1)).long()          # 0..T
    prefix = enum.tokens[rows] * (torch.arange(m.horizon)[None, :] < cut[:, None])
    return enum.prompt_idx[rows], prefix, cut, enum.lengths[rows]


@pytest.mark.parametrize("eos", [True, False])
def test_decode_completes_prefixes_and_keeps_complete_rows(eos):
    """Complete prefixes come back unchanged with their own mask; open ones are extended, with the
    behaviour log-probs of the new tokens only; dropping finished rows (``select``) changes
    nothing for a deterministic pick."""
    m = random_mdp(8, vocab_size=3, horizon=4, eos=eos, n_prompts=2)
    p = TabularSoftmax(m, seed=3)
    pidx, prefix, cut, T = mixed_prefixes(m)
    tok, mask, lp = decode(m, p, pidx, prefix, cut, greedy_pick)
    tok2, mask2, lp2 = decode(m, _NoSelect(p), pidx, prefix, cut, greedy_pick)
    assert torch.equal(tok, tok2) and torch.equal(mask, mask2) and torch.equal(lp, lp2)
    complete = cut == T
    assert complete.any() and (~complete).any()
    new = (torch.arange(m.horizon)[None, :] >= cut[:, None]) & mask                 # (n, H) tokens chosen here
    assert torch.equal(tok * (~new), prefix * (~new))
    assert torch.equal(mask[complete], (torch.arange(m.horizon)[None, :] < cut[complete, None]))
    assert_close(lp, p.token_log_probs(pidx, tok).detach() * new)
    for y, msk in zip(tok.tolist(), mask.long().tolist()):
        n_tok = sum(msk)
        assert y[n_tok:] == [0] * (m.horizon - n_tok) and (not eos or n_tok == m.horizon or y[n_tok - 1] == m.eos)


def test_decode_without_select_samples_the_same_law():
    """The no-select path with categorical draws: same rows complete, every response valid and its
    log-prob that of the policy (the frequency test covers the select path)."""
    m = random_mdp(8, vocab_size=3, horizon=4, eos=True)
    p = TabularSoftmax(m, seed=3)
    pidx, prefix, cut, T = mixed_prefixes(m, n=200, seed=1)
    tok, mask, lp = decode(m, _NoSelect(p), pidx, prefix, cut, categorical(torch.Generator().manual_seed(0)))
    new = (torch.arange(m.horizon)[None, :] >= cut[:, None]) & mask
    assert_close(lp, p.token_log_probs(pidx, tok).detach() * new)
    ids = response_ids(enumerate_responses(m), pidx, tok * mask)
    assert (ids >= 0).all()


# ------------------------------------------------------------------------------ continuations
def test_continuation_rm_shape_and_terminal_prefixes(m2):
    m, p = m2
    gen = torch.Generator().manual_seed(mc_seed(21))
    ro = sample(m, p, 3, gen, n_prompts=2)
    out = continuation_rm(m, p, ro, 5, gen)
    B, L = ro.tokens.shape
    assert out.shape == (B, L + 1, 5) and out.dtype == torch.float64
    for i in range(B):
        T = int(ro.lengths[i])
        assert (out[i, T:] == ro.rm[i]).all()                 # at and after the end: RM(y) exactly
    with pytest.raises(TPGError, match="K must be an int ≥ 1"):
        continuation_rm(m, p, ro, 0, gen)


# ------------------------------------------------------------------------------ exact ↔ sampled
def test_enumeration_rows_have_the_sampled_format(m2):
    """The exact engine enumerates the same draws the sampler makes, in the same format, with
    probabilities summing to ρ(x) per prompt."""
    m, p = m2
    enum = enumerate_responses(m)
    ro = sample(m, p, 4, torch.Generator().manual_seed(mc_seed(5)), n_prompts=8)
    assert enum.tokens.shape[1] == ro.tokens.shape[1] == m.horizon
    for f in ("prompt_idx", "tokens", "mask", "token_rewards", "rm", "group", "batch"):
        assert getattr(enum, f).dtype == getattr(ro, f).dtype, f
    ids = response_ids(enum, ro.prompt_idx, ro.tokens)
    assert (ids >= 0).all()
    sel = torch.as_tensor(ids)
    for f in ("mask", "token_rewards", "rm"):
        assert torch.equal(getattr(enum, f)[sel], getattr(ro, f)), f
    tab = exact.tables(m, p)
    per_prompt = torch.zeros(2, dtype=torch.float64).index_add(0, enum.prompt_idx, tab.prob)
    assert_close(per_prompt, m.prompt_probs)
    assert len(set(map(tuple, enum.tokens.tolist()))) == m.responses_per_prompt     # rows distinct per prompt


def test_enumeration_is_refused_above_budget():
    m = TokenMDP([()], 3, 6, eos=2, token_rewards=lambda *a: 0.0)
    from tpg.mdp import BudgetError
    with pytest.raises(BudgetError, match="budget"):
        enumerate_responses(m, budget=10)


@pytest.mark.parametrize("name", ["n_prompts", "n_batches"])
@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_sample_refuses_bad_prompt_and_batch_counts(m2, name, value):
    """n_prompts and n_batches are counts ≥ 1: a TPGError, not torch's raw RuntimeError."""
    m, p = m2
    with pytest.raises(TPGError, match=f"{name} must be an int ≥ 1, got {value!r}"):
        sample(m, p, 2, torch.Generator(), **{name: value})
