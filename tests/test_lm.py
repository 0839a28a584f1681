"""The tiny GPT-2 policy: the policy protocol, exactness on enumerable MDPs, and designed Monte
Carlo tests on an MDP far too large to enumerate (DESIGN §4).

Exact part (float64, tolerances from conftest): log-probs are distributions over the V MDP tokens;
padding and the KV cache change nothing; ∇J with respect to every transformer parameter agrees
with the score-function sum and with central finite differences; the unchanged exact engine gives
the tabular verdicts (RLOO unbiased, mean-only GRPO scaled by 1 − 1/G, std-GRPO biased).

Monte Carlo part: V = 64, H = 16 (≈ 10^28 responses): paired Studentized tests on projections
of ĝ (``tpg.mc``), false-fail rate ≤ 1e-6 each, smallest detectable difference asserted below the
negative control's effect, and the negative control must fail.
"""
from __future__ import annotations

import socket
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import assert_close, assert_vec_close, mc_seed
from tpg import BudgetError, TokenMDP, TPGError, estimator, exact, random_mdp, report
from tpg import mc
from tpg import scores as scores_mod
from tpg.batches import projected_estimates
from tpg.exact import flat
from tpg.lm import GPT2Policy
from tpg.policies import make_policy
from tpg.rollouts import continuation_rm, enumerate_responses, greedy, sample


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny():
    """V = 3 with EOS, H = 3, 2 prompts (30 responses): every exact check runs in well under a second."""
    m = random_mdp(3, vocab_size=3, horizon=3, eos=True, n_prompts=2)
    return m, GPT2Policy(m, seed=0, init_range=0.2)


@pytest.fixture(scope="module")
def ragged():
    """Prompts of lengths 0, 1 and 3 (left padding is exercised), additive rewards."""
    m = TokenMDP([(), (0,), (1, 0, 1)], vocab_size=3, horizon=3, eos=2, prompt_probs=[0.2, 0.3, 0.5],
                 token_rewards=lambda x, prefix, tok: float(tok == 0) - 0.3 * x + 0.1 * len(prefix))
    return m, GPT2Policy(m, seed=1, init_range=0.3)


# ------------------------------------------------------------------------------ the protocol
def test_log_probs_are_distributions_over_the_mdp_vocabulary(ragged):
    m, p = ragged
    e = enumerate_responses(m)
    lp = p.log_probs(e.prompt_idx, e.tokens)                                  # (N, L, V)
    assert lp.shape == (e.batch_size, m.horizon, m.vocab_size) and lp.dtype == torch.float64
    assert_close(lp.exp().sum(-1), torch.ones(e.batch_size, m.horizon), what="Σ_a π(a|s)")
    tl = p.token_log_probs(e.prompt_idx, e.tokens)
    assert_close(tl, lp.gather(-1, e.tokens[..., None])[..., 0], what="token_log_probs vs log_probs")


def test_left_padding_changes_nothing(ragged):
    """A batch mixing prompt lengths 0, 1, 3 equals each row run alone (no padding at all)."""
    m, p = ragged
    e = enumerate_responses(m)
    lp = p.log_probs(e.prompt_idx, e.tokens)
    for i in range(0, e.batch_size, 7):
        alone = p.log_probs(e.prompt_idx[i:i + 1], e.tokens[i:i + 1])
        assert_close(alone, lp[i:i + 1], what=f"row {i} alone vs in the padded batch")


def test_prefix_determines_the_row(ragged):
    """Row t of log_probs conditions on tokens[:, :t] only: changing later tokens changes nothing."""
    m, p = ragged
    e = enumerate_responses(m)
    lp = p.log_probs(e.prompt_idx, e.tokens)
    other = e.tokens.clone()
    other[:, 1:] = (other[:, 1:] + 1) % m.vocab_size
    lp2 = p.log_probs(e.prompt_idx, other)
    assert_close(lp2[:, 0], lp[:, 0], what="row 0 ignores every response token")
    same1 = other[:, 0] == e.tokens[:, 0]
    assert_close(lp2[same1, 1], lp[same1, 1], what="row 1 depends on token 0 only")


@pytest.mark.parametrize("kv_cache", [True, False])
def test_decoder_reproduces_teacher_forcing(ragged, kv_cache):
    """Incremental decoding (KV cache or full recompute) from prefixes of different lengths gives the
    teacher-forced log-probs at every later position."""
    m, p0 = ragged
    p = GPT2Policy(m, seed=1, init_range=0.3, kv_cache=kv_cache)
    e = enumerate_responses(m)
    lp = p.log_probs(e.prompt_idx, e.tokens)                                  # (N, H, V)
    g = torch.Generator().manual_seed(0)
    plen = torch.minimum(torch.randint(0, m.horizon, (e.batch_size,), generator=g), e.lengths - 1)   # (N,)
    assert len(set(plen.tolist())) == m.horizon                               # every prefix length occurs
    dec = p.decoder(e.prompt_idx, e.tokens, plen)
    rows = torch.arange(e.batch_size)
    for k in range(m.horizon):
        pos = plen + k
        live = pos < e.lengths
        assert_close(dec.log_probs[live], lp[rows[live], pos[live]], what=f"decoder step {k} (kv_cache={kv_cache})")
        dec.advance(e.tokens[rows, pos.clamp(max=m.horizon - 1)])


def test_probabilities_of_all_responses_sum_to_one(ragged):
    m, p = ragged
    e = enumerate_responses(m)
    with torch.no_grad():
        logp = (p.token_log_probs(e.prompt_idx, e.tokens) * e.mask).sum(1)
    per_prompt = torch.zeros(len(m.prompts), dtype=torch.float64).index_add(0, e.prompt_idx, logp.exp())
    assert_close(per_prompt, torch.ones(len(m.prompts)), what="Σ_y π(y|x) per prompt")


def test_float32_matches_float64(ragged):
    m, p64 = ragged
    p32 = GPT2Policy(m, seed=1, init_range=0.3, dtype=torch.float32)
    e = enumerate_responses(m)
    assert_close(p32.log_probs(e.prompt_idx, e.tokens).detach(), p64.log_probs(e.prompt_idx, e.tokens).detach(),
                 kind="f32", what="float32 vs float64 log-probs")


def test_init_is_seeded_and_leaves_the_global_rng_alone(tiny):
    m, _ = tiny
    state = torch.get_rng_state()
    a, b, c = GPT2Policy(m, seed=5), GPT2Policy(m, seed=5), GPT2Policy(m, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    va, vb, vc = (torch.nn.utils.parameters_to_vector(q.parameters()) for q in (a, b, c))
    assert torch.equal(va, vb) and not torch.equal(va, vc)


def test_builds_without_any_network_access(tiny, monkeypatch):
    """The model comes from a GPT2Config only: offline mode is set and any socket connection
    attempt fails the test."""
    m, _ = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*a, **k):
        raise AssertionError("tpg.lm tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    p = make_policy("gpt2", m, seed=3)                                       # the claims table's entry point
    e = enumerate_responses(m)
    assert torch.isfinite(p.log_probs(e.prompt_idx, e.tokens)).all()


@pytest.mark.parametrize("kw", [dict(n_embd=30, n_head=4), dict(dtype=torch.float16), dict(attn="flash"),
                                dict(n_layer=0), dict(activation="swish9"), dict(init_range=0.0)])
def test_bad_configuration_is_refused(tiny, kw):
    with pytest.raises(TPGError):
        GPT2Policy(tiny[0], **kw)


# ------------------------------------------------------------------------------ exact on GPT-2
def test_exact_gradient_wrt_every_parameter(tiny):
    """Autograd ∇J = score-function sum Σ P(y) RM ∇log P(y) (1e-10) = central differences (1e-5),
    and every parameter tensor of the transformer gets a non-zero gradient."""
    m, p = tiny
    tab = exact.tables(m, p)
    grad = exact.gradient(m, p)
    W = (tab.prob * tab.enum.rm)[:, None] * tab.enum.mask                    # (N, L)
    assert_vec_close(exact.expected_score(p, tab.enum, W), grad, what="score-function sum vs autograd ∇J")
    names = [n for n, _ in p.named_parameters()]
    sizes = [q.numel() for q in p.parameters()]
    blocks = dict(zip(names, torch.split(grad, sizes)))
    unused = [n for n, gb in blocks.items() if n != "model.transformer.wpe.weight" and not bool(gb.abs().max() > 0)]
    assert not unused, f"parameters with zero gradient: {unused}"
    # Positions beyond [BOS] ⊕ x ⊕ y_<H never occur: exactly those wpe rows have zero gradient.
    wpe = blocks["model.transformer.wpe.weight"].view(p.model.config.n_positions, -1)
    used = max(len(x) for x in m.prompts) + m.horizon                         # BOS..last input position
    assert bool((wpe[:used].abs().sum(1) > 0).all()) and bool((wpe[used:] == 0).all())
    d = torch.randn(grad.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d /= d.norm()
    theta = torch.nn.utils.parameters_to_vector(p.parameters()).detach().clone()
    eps, Js = 1e-4, []
    with torch.no_grad():
        for s in (1, -1):
            torch.nn.utils.vector_to_parameters(theta + s * eps * d, p.parameters())
            Js.append(float(exact.objective(m, p)))
        torch.nn.utils.vector_to_parameters(theta, p.parameters())
    assert_close((Js[0] - Js[1]) / (2 * eps), float(grad @ d), kind="fd", what="central FD of J along d")


def test_exact_engine_verdicts_carry_over(tiny):
    """The exact engine, unchanged, on GPT-2: the same verdicts as on tabular policies (PAPER §3.2)."""
    m, p = tiny
    G = 2
    r = report(estimator("rloo"), m, p, G=G)                                  # with Cov[ĝ]'s trace
    assert r.verdict == "unbiased", r.summary()
    assert r.cov_trace is not None and r.cov_trace > 0
    r = report(estimator("grpo", std=False), m, p, G=G, cov=None)
    assert r.verdict == "scaled", r.summary()
    assert_close(r.scale, 1 - 1 / G, what="mean-only GRPO scale c = 1 − 1/G")
    r = report(estimator("grpo"), m, p, G=G, cov=None)
    assert r.verdict == "biased", r.summary()


def test_sampler_greedy_and_continuations_run_on_gpt2(ragged):
    m, p = ragged
    g = torch.Generator().manual_seed(0)
    ro = sample(m, p, 3, g, n_prompts=4, n_batches=2)
    assert ro.tokens.shape == (24, m.horizon) and int(ro.tokens.max()) < m.vocab_size
    ended = ro.lengths < m.horizon                                            # short responses end in EOS
    assert bool((ro.tokens[ended, ro.lengths[ended] - 1] == m.eos).all())
    before_last = torch.arange(m.horizon)[None, :] < (ro.lengths - 1)[:, None]
    assert not bool((ro.tokens[before_last] == m.eos).any()), "EOS only as the last token"
    with torch.no_grad():
        assert_close(ro.logp_old, p.token_log_probs(ro.prompt_idx, ro.tokens) * ro.mask,
                     what="sampler log-probs (KV cache) vs teacher forcing")
    assert_close(ro.rm, m.rewards(ro.prompt_idx, ro.tokens, ro.mask)[1], what="RM of sampled responses")
    gr = greedy(m, p, torch.arange(len(m.prompts)))
    with torch.no_grad():
        lp = p.log_probs(gr.prompt_idx, gr.tokens)                            # (P, H, V)
    assert bool((lp.argmax(-1)[gr.mask.bool()] == gr.tokens[gr.mask.bool()]).all()), "greedy = argmax path"
    cont = continuation_rm(m, p, ro, 2, g)
    assert cont.shape == (24, m.horizon + 1, 2) and torch.isfinite(cont).all()
    assert_close(cont[torch.arange(24), ro.lengths], ro.rm[:, None].expand(-1, 2), what="complete prefixes: RM")


# ------------------------------------------------------------------------------ projections
def test_projected_estimates_match_a_backward_pass_per_batch(tiny):
    """z[b, k] = ⟨u_k, ĝ_b⟩ from the projected scores equals ĝ_b from a backward pass on batch b
    alone (the naive reference), for several estimators (float64, exact tolerance)."""
    m, p = tiny
    ro = sample(m, p, 3, torch.Generator().manual_seed(1), n_prompts=2, n_batches=4)
    U = scores_mod.random_directions(p, 3, torch.Generator().manual_seed(2))  # (K, D)
    scores = scores_mod.projected_scores(p, ro, U, budget=0, chunk=7)         # double backward, chunks straddle batches
    params = list(p.parameters())
    for est in (estimator("reinforce"), estimator("rloo"), estimator("grpo"), estimator("drgrpo")):
        z = projected_estimates(est, ro, scores)                           # (n_batches, K)
        for b in range(ro.n_batches):
            rows = torch.nonzero(ro.batch == b)[:, 0]
            one = ro.select(rows, batch=torch.zeros(len(rows), dtype=torch.long), n_batches=1)
            one = replace(one, group=one.group - one.group.min())
            g_b = -flat(torch.autograd.grad(est(one.score(p)).loss, params), params)
            assert_close(z[b], U @ g_b, what=f"{est.name} batch {b}")


# ------------------------------------------------------------------------------ Monte Carlo on a big GPT-2
BIG_V, BIG_H, G_BIG, PROMPTS_PER_BATCH, N_BATCHES, N_PILOT = 64, 16, 4, 2, 3000, 1000


def big_mdp() -> TokenMDP:
    """V = 64 (63 tokens + EOS), H = 16, 4 prompts; RM(x, y) = mean_t w[x, y_t] with w ~ N(0, 1)
    centred per prompt (E RM ≈ 0 under a near-uniform policy, which keeps the baseline-free
    REINFORCE's variance, and the tests' detectable differences, small)."""
    rng = np.random.default_rng(0)
    prompts = [tuple(int(t) for t in rng.integers(0, BIG_V - 1, size=2)) for _ in range(4)]
    w = rng.standard_normal((4, BIG_V))
    w[:, : BIG_V - 1] -= w[:, : BIG_V - 1].mean(1, keepdims=True)

    def rm(x, y):
        return float(w[x, list(y)].mean()) if y else 0.0
    return TokenMDP(prompts, BIG_V, BIG_H, eos=BIG_V - 1, response_rewards=rm, name="big")


def test_big_mdp_refuses_enumeration():
    m = big_mdp()
    with pytest.raises(BudgetError, match="Monte Carlo"):
        enumerate_responses(m)


@pytest.fixture(scope="module")
def mc_run():
    """One shared sample: N_BATCHES independent batches of 2 prompts × G = 4 responses from a float32
    GPT-2, projected on K = 3 fixed directions: u_0 = a pilot RLOO estimate of ∇J from an independent
    sample (so the tests have power where the gradient is), u_1, u_2 uniformly random. Every
    estimator is evaluated on the same batches (paired differences)."""
    m = big_mdp()
    p = GPT2Policy(m, seed=0, n_layer=1, n_head=2, n_embd=16, dtype=torch.float32, activation="gelu")
    seed = mc_seed(20240611)
    pilot = sample(m, p, G_BIG, torch.Generator().manual_seed(seed + 1), n_prompts=PROMPTS_PER_BATCH,
                   n_batches=N_PILOT).score(p)
    params = list(p.parameters())
    u0 = -flat(torch.autograd.grad(estimator("rloo")(pilot).loss, params), params).to(torch.float64)
    U = torch.cat([(u0 / u0.norm())[None], scores_mod.random_directions(p, 2, torch.Generator().manual_seed(seed + 2))])
    ro = sample(m, p, G_BIG, torch.Generator().manual_seed(seed), n_prompts=PROMPTS_PER_BATCH, n_batches=N_BATCHES)
    scores = scores_mod.projected_scores(p, ro, U)                            # (B, L, K)
    # GRPO with groups of 2: split every group of 4 into two (i.i.d. responses to the same prompt).
    halves = replace(ro, group=ro.group * 2 + (torch.arange(ro.batch_size) % G_BIG) // 2)
    z = {"reinforce": projected_estimates(estimator("reinforce"), ro, scores),
         "rloo": projected_estimates(estimator("rloo"), ro, scores),
         "grpo2": projected_estimates(estimator("grpo", std=False), halves, scores)}
    # The negative control's true effect is ½⟨u, ∇J⟩ per direction; lower-bound it (confidence
    # 1 − 1e-6) from the unbiased REINFORCE projections: E z_REINFORCE = ⟨u, ∇J⟩ (Theorem 1).
    effect_lb = 0.5 * mc.abs_mean_lower_bound(z["reinforce"])
    return z, effect_lb


def _assert_powered(res: mc.MCTest, effect_lb: np.ndarray) -> None:
    """The test detects (w.p. ≥ 1 − β) a difference as large as the negative control's: in some
    direction the smallest detectable difference is below the control's effect lower bound."""
    print(res.summary(), "| negative-control effect ≥", effect_lb)
    assert bool(np.any(res.mdd < effect_lb)), f"test underpowered: MDD {res.mdd} vs control effect ≥ {effect_lb}"


@pytest.mark.mc
def test_mc_reinforce_and_rloo_agree(mc_run):
    """(a) Two unbiased estimators have the same mean: E[z_REINFORCE − z_RLOO] = 0 on every direction."""
    z, effect_lb = mc_run
    res = mc.paired_test(z["reinforce"] - z["rloo"], "REINFORCE − RLOO")
    _assert_powered(res, effect_lb)
    assert res.trustworthy and res.passed, res.summary()


@pytest.mark.mc
def test_mc_mean_only_grpo_is_scaled_by_one_minus_one_over_G(mc_run):
    """(b) Self-inclusive mean-only GRPO with groups of G = 2 has mean (1 − 1/2)·∇J: it matches
    ½ × RLOO (groups of 4, unbiased) on the same responses. (Not a per-batch identity: the two use
    different groups, so this is a statement about means only.)"""
    z, effect_lb = mc_run
    res = mc.paired_test(z["grpo2"] - 0.5 * z["rloo"], "GRPO(G=2) − ½ RLOO")
    _assert_powered(res, effect_lb)
    assert res.trustworthy and res.passed, res.summary()


@pytest.mark.mc
def test_mc_negative_control_fails(mc_run):
    """(c) The same test at the wrong scale, GRPO(G=2) vs RLOO at scale 1 (true difference −½∇J),
    is rejected, and was bound to be: its detectable difference is below the effect."""
    z, effect_lb = mc_run
    res = mc.paired_test(z["grpo2"] - z["rloo"], "GRPO(G=2) − RLOO (negative control)")
    _assert_powered(res, effect_lb)
    assert not res.passed, res.summary()


def test_paired_test_refuses_tiny_samples():
    with pytest.raises(TPGError, match="n ≥ 100"):
        mc.paired_test(torch.zeros(10, 2))
