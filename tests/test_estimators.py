"""Estimators: replay tests (Pyro style, no randomness), exact expectations, naive-loop references.

Replay: every estimator runs on one hand-built batch (5 responses of lengths 3, 1, 4, 2, 4; two
groups; two independent batches) and is compared, at float64 round-off, with a formula written
out here in plain Python loops: its advantages, its coefficients c = −∂loss/∂logp (DESIGN §2) and
the autograd gradient through a tabular policy, rebuilt by hand as Σ c (e_y − π(·|s)).
"""
from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import assert_close, assert_vec_close
from tpg import KL, TabularSoftmax, TokenMDP, TPGError, estimator, exact, random_mdp, report
from tpg.batches import multinomial_coef, multisets
from tpg.draws import MonteCarloDraws, deterministic_anchors, exact_critic
from tpg.estimators import agg_weights, coefficients, kl_penalty, register_advantage
from tpg.estimators.core import ADVANTAGES, group_stats, masked_whiten
from tpg.estimators.gae import gae_advantages
from tpg.estimators.outcome import rewards_to_go
from tpg.rollouts import Rollouts, enumerate_responses, sample

# =================================================================================== the hand batch
# V = 3 with EOS = 2, H = 4, two prompts. Ragged lists hold each response's valid positions only.
MDP = TokenMDP([(0,), (1,)], 3, 4, eos=2, token_rewards=np.zeros((2 * 15, 3)))
TOKENS = [[0, 1, 2], [2], [1, 1, 0, 1], [1, 2], [0, 0, 1, 0]]
LENS = [len(y) for y in TOKENS]                       # 3, 1, 4, 2, 4
PROMPT, GROUP, BATCH = [0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]
RM = [1.0, -0.5, 2.0, 0.25, 3.0]                      # independent of R on purpose: catches a wrong field
R = [[0.5, -1.0, 1.5], [-0.5], [1.0, 0.0, -2.0, 0.5], [0.25, 0.75], [1.0, 1.0, -1.0, 2.0]]
VALUES = [[0.3, 0.1, -0.2], [0.4], [0.2, 0.6, -0.1, 0.9], [0.5, -0.3], [1.1, 0.7, 0.2, -0.4]]
BASE = [[0.1, 0.2, 0.3], [-0.2], [0.5, 0.4, 0.3, 0.2], [1.0, -1.0], [0.0, 0.5, 1.0, 1.5]]
GREEDY = [0.5, 0.5, 0.5, -1.0, -1.0]
K = 2
CONT = [[[0.2, 1.0], [-0.4, 0.6], [1.5, 0.5]],       # K = 2 continuation returns from each open prefix t < T
        [[0.0, -1.0]],
        [[1.0, 3.0], [2.5, 0.5], [0.0, 2.0], [1.75, 2.25]],
        [[0.5, 0.0], [1.0, 0.25]],
        [[2.0, 4.0], [3.5, 1.5], [0.0, 3.0], [2.5, 3.5]]]
ANCHORS = [{2}, {2}, {1, 3}, {1}, {3, 4}]            # row 1's anchor lies past its end: must be ignored
B, L = 5, 4
W_SEQ = [1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2]           # seq-mean-token-sum: 1/B per independent batch


def pad(rows, fill=0.0, dtype=torch.float64) -> torch.Tensor:
    """(B, L) tensor from ragged rows, padded with ``fill``."""
    return torch.tensor([list(r) + [fill] * (L - len(r)) for r in rows], dtype=dtype)


def hand_batch(rm=RM) -> Rollouts:
    """The hand batch, built directly from tensors (no sampler, no MDP rewards)."""
    mask = pad([[1.0] * n for n in LENS])
    cont = torch.tensor([[CONT[i][t] if t < LENS[i] else [rm[i]] * K for t in range(L + 1)] for i in range(B)],
                        dtype=torch.float64)                                              # (B, L+1, K)
    extras = {"greedy_rm": torch.tensor(GREEDY, dtype=torch.float64), "values": pad(VALUES), "cont_rm": cont,
              "anchors": torch.tensor([[t in ANCHORS[i] for t in range(1, L + 1)] for i in range(B)])}
    return Rollouts(torch.tensor(PROMPT), pad(TOKENS, 0, torch.long), mask, pad(R), torch.tensor(rm, dtype=torch.float64),
                    torch.tensor(GROUP), torch.tensor(BATCH), 2, extras=extras)


def naive_state_index(mdp: TokenMDP) -> dict:
    """{(prompt, prefix tuple): index} by listing the states in the documented order (mdp.py)."""
    idx, A, eos = {}, mdp.arity, mdp.eos
    for p in range(len(mdp.prompts)):
        for t in range(mdp.horizon):
            for digits in itertools.product(range(A), repeat=t):          # lexicographic = base A, MSB first
                idx[(p, tuple(d + (eos is not None and d >= eos) for d in digits))] = len(idx)
    return idx


def naive_tabular_grad(policy: TabularSoftmax, c) -> torch.Tensor:
    """Σ_i Σ_t c[i][t] ∇log π(y_it | s_it) for a tabular softmax: row s gets c (e_y − π(·|s))."""
    index = naive_state_index(policy.mdp)
    pi = torch.softmax(policy.logits.detach(), -1)
    g = torch.zeros_like(pi)
    for i in range(B):
        for t in range(LENS[i]):
            s, a = index[(PROMPT[i], tuple(TOKENS[i][:t]))], TOKENS[i][t]
            g[s] -= c[i][t] * pi[s]
            g[s, a] += c[i][t]
    return g


def replay(est, adv, w=W_SEQ, coef=None, ro=None):
    """est on the hand batch: advantages == adv, c == adv·w (or ``coef``), −∇loss == Σ c ∇logπ."""
    policy = TabularSoftmax(MDP, seed=0)
    sc = (hand_batch() if ro is None else ro).score(policy)
    out = est(sc)
    assert_close(out.advantages, pad(adv), what="advantages")
    expected_c = pad([[a * w[i] for a in adv[i]] for i in range(B)]) if coef is None else pad(coef)
    assert_close(coefficients(est, sc), expected_c, what="coefficients")
    out.loss.backward()
    assert_vec_close(-policy.logits.grad, naive_tabular_grad(policy, expected_c.tolist()), what="autograd ĝ")
    return out


# ------------------------------------------------------------------------------ hand formulas
def tile(vals):
    return [[vals[i]] * LENS[i] for i in range(B)]


def members(i, key=GROUP):
    return [j for j in range(B) if key[j] == key[i]]


def naive_whiten(adv, batch=BATCH, shift=True):
    """verl masked_whiten per independent batch: (x − μ)/√(var + 1e-8), Bessel variance."""
    out = [list(a) for a in adv]
    for b in set(batch):
        xs = [x for i in range(B) if batch[i] == b for x in adv[i]]
        mu = statistics.fmean(xs)
        var = sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)
        for i in range(B):
            if batch[i] == b:
                out[i] = [((x - mu) if shift else x) / math.sqrt(var + 1e-8) for x in adv[i]]
    return out


def v_hat(i, t):
    return statistics.fmean(CONT[i][t]) if t < LENS[i] else RM[i]


def v_base(i, t, self_inclusive):
    if self_inclusive and t < LENS[i]:
        return (sum(CONT[i][t]) + RM[i]) / (K + 1)
    return v_hat(i, t)


def hand_trepo(variant, si, q=0.5):
    out = []
    for i in range(B):
        T = LENS[i]
        a_hat = lambda t: 0.0 if t == 0 else v_hat(i, t) - v_base(i, t - 1, si)
        S = sorted({t for t in ANCHORS[i] if t <= T} | {T})
        row = []
        for t in range(1, T + 1):
            if variant == "all":
                row.append(a_hat(t))
            elif variant == "subset":
                row.append(a_hat(t) / q if t in ANCHORS[i] else 0.0)
            elif variant == "interp":
                if t in S:
                    row.append(a_hat(t))
                else:
                    ta, tb = max([0] + [s for s in S if s < t]), min(s for s in S if s > t)
                    x = (t - ta) / (tb - ta)
                    row.append((1 - x) * a_hat(ta) + x * a_hat(tb))
            else:
                tj, tp = min(s for s in S if s >= t), max([0] + [s for s in S if s < t])
                a = v_hat(i, tj) - v_base(i, tp, si)
                row.append(a if variant == "chunk" else a / (tj - tp))
        out.append(row)
    return out


def hand_vineppo(step, max_steps, whiten):
    """VinePPO's own _compute_step_advantages, transcribed: values with None, filled from the end."""
    out = []
    for i in range(B):
        T = LENS[i]
        bounds = list(range(0, T, step)) + [T]
        n = len(bounds) - 1
        values = [v_hat(i, bounds[k]) if max_steps is None or k <= max_steps else None for k in range(n)] + [0.0]
        rewards = [0.0] * (n - 1) + [RM[i]]
        for k in range(n - 1, -1, -1):
            if values[k] is not None:
                break
            values[k] = rewards[k] + values[k + 1]
        step_adv = [rewards[k] + values[k + 1] - values[k] for k in range(n)]
        out.append([step_adv[(t - 1) // step] for t in range(1, T + 1)])
    return naive_whiten(out) if whiten else out


def hand_gae(gamma, lam, whiten=False, dw=False):
    out = []
    for i in range(B):
        T, r, V = LENS[i], R[i], VALUES[i] + [0.0]
        delta = [r[t] + gamma * V[t + 1] - V[t] for t in range(T)]
        row = [sum((gamma * lam) ** l * delta[t + l] for l in range(T - t)) for t in range(T)]
        out.append([a * gamma**t for t, a in enumerate(row)] if dw else row)
    return naive_whiten(out) if whiten else out


# =================================================================================== replay tests
def test_reinforce_replay():
    replay(estimator("reinforce"), tile(RM))


@pytest.mark.parametrize("gamma,dw", [(1.0, True), (0.9, True), (0.9, False)])
def test_reinforce_oracle_replay(gamma, dw):
    adv = [[(gamma**t if dw else 1.0) * sum(gamma ** (k - t) * R[i][k] for k in range(t, LENS[i]))
            for t in range(LENS[i])] for i in range(B)]
    replay(estimator("reinforce_oracle", gamma=gamma, discount_weight=dw), adv)


def test_baseline_replay():
    adv = [[RM[i] - BASE[i][t] for t in range(LENS[i])] for i in range(B)]
    replay(estimator("baseline", baseline=lambda ro: pad(BASE)), adv)


@pytest.mark.parametrize("std,eps,ddof", [(True, 1e-6, 1), (True, 1e-4, 1), (True, 1e-6, 0), (False, 1e-6, 1)])
def test_grpo_replay(std, eps, ddof):
    sd = statistics.stdev if ddof == 1 else statistics.pstdev
    a = []
    for i in range(B):
        g = [RM[j] for j in members(i)]
        a.append((RM[i] - statistics.fmean(g)) / ((sd(g) + eps) if std else 1.0))
    replay(estimator("grpo", std=std, eps=eps, ddof=ddof), tile(a))


@pytest.mark.parametrize("C", [None, 7.0])
def test_drgrpo_preset_replay(C):
    """Dr. GRPO = mean-only GRPO with seq-mean-token-sum-norm: w = 1/(B·C), C = L = 4 by default."""
    a = [RM[i] - statistics.fmean([RM[j] for j in members(i)]) for i in range(B)]
    n_b = [3, 3, 3, 2, 2]
    w = [1 / (n_b[i] * (4.0 if C is None else C)) for i in range(B)]
    est = estimator("drgrpo") if C is None else estimator("drgrpo", agg_constant=C)
    assert est.agg == "seq-mean-token-sum-norm" and est.options == {"std": False}
    replay(est, tile(a), w)


def test_rloo_replay():
    a = [RM[i] - statistics.fmean([RM[j] for j in members(i) if j != i]) for i in range(B)]
    replay(estimator("rloo"), tile(a))


def test_singleton_group_rloo_keeps_r_and_grpo_is_reinforce():
    """verl: a singleton group has mean 0, std 1 (GRPO → R/(1+ε)) and RLOO's loop form keeps A = R."""
    ro = replace(hand_batch(), group=torch.tensor([0, 0, 0, 1, 2]))      # rows 3 and 4 alone
    a_rloo = [RM[i] - statistics.fmean([RM[j] for j in range(3) if j != i]) if i < 3 else RM[i] for i in range(B)]
    replay(estimator("rloo"), tile(a_rloo), ro=ro)
    mu, sd = statistics.fmean(RM[:3]), statistics.stdev(RM[:3])
    a_grpo = [(RM[i] - mu) / (sd + 1e-6) if i < 3 else RM[i] / (1 + 1e-6) for i in range(B)]
    replay(estimator("grpo"), tile(a_grpo), ro=ro)


def test_remax_replay():
    replay(estimator("remax"), tile([RM[i] - GREEDY[i] for i in range(B)]))


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_reinforce_pp_replay(gamma):
    """RM on the last token, discounted reward-to-go γ^(T−1−t)·RM, whitened per batch."""
    G = [[gamma ** (LENS[i] - 1 - t) * RM[i] for t in range(LENS[i])] for i in range(B)]
    replay(estimator("reinforce_pp", gamma=gamma), naive_whiten(G))


def test_reinforce_pp_baseline_replay():
    a = [RM[i] - statistics.fmean([RM[j] for j in members(i)]) for i in range(B)]
    replay(estimator("reinforce_pp_baseline"), naive_whiten(tile(a)))


@pytest.mark.parametrize("gamma,lam,whiten,dw", [(1.0, 1.0, False, False), (1.0, 0.7, False, False),
                                                 (0.9, 0.8, False, False), (0.9, 0.8, False, True),
                                                 (1.0, 0.95, True, False)])
def test_gae_replay(gamma, lam, whiten, dw):
    """Â_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} − V_t, V_T = 0 (closed form, not the recursion)."""
    if lam == 1.0 and gamma == 1.0:      # the λ = 1 form is the reward-to-go minus the critic
        assert_close(pad(hand_gae(1.0, 1.0)), pad([[sum(R[i][t:]) - VALUES[i][t] for t in range(LENS[i])]
                                                   for i in range(B)]))
    replay(estimator("gae", gamma=gamma, lam=lam, whiten=whiten, discount_weight=dw), hand_gae(gamma, lam, whiten, dw))


TREPO_CASES = [("all", None), ("subset", {"kind": "bernoulli", "q": 0.5}), ("interp", {"kind": "fixed", "positions": [2]}),
               ("chunk", {"kind": "every", "k": 2}), ("value_interp", {"kind": "bernoulli", "q": 0.3})]


@pytest.mark.parametrize("si", [False, True], ids=["fresh", "self_inclusive"])
@pytest.mark.parametrize("variant,anchors", TREPO_CASES, ids=[c[0] for c in TREPO_CASES])
def test_trepo_replay(variant, anchors, si):
    """The anchors actually used are the batch's extras (the draw), whatever the spec says."""
    est = estimator("trepo", variant=variant, K=K, anchors=anchors, self_inclusive=si)
    replay(est, hand_trepo(variant, si))


@pytest.mark.parametrize("step,max_steps,whiten", [(1, None, False), (2, None, False), (3, None, True),
                                                   (1, 1, False), (2, 0, True)])
def test_vineppo_replay(step, max_steps, whiten):
    replay(estimator("vineppo", K=K, step=step, max_steps=max_steps, whiten=whiten),
           hand_vineppo(step, max_steps, whiten))


def test_vineppo_unwhitened_is_trepo_chunk_every_step():
    ro = replace(hand_batch(), extras={**hand_batch().extras,
                                       "anchors": deterministic_anchors({"kind": "every", "k": 2}, B, L)})
    sc = ro.score(TabularSoftmax(MDP, seed=0))
    a = estimator("vineppo", K=K, step=2, whiten=False)(sc).advantages
    b = estimator("trepo", variant="chunk", K=K, anchors={"kind": "every", "k": 2})(sc).advantages
    assert_close(a, b)


# =================================================================================== PPO
def test_torch_maximum_splits_a_tie_evenly():
    """Pin PyTorch: at a tie, maximum/minimum send half the gradient to each branch. PPO-clip at
    ratio 1 is a tie of two branches with the same derivative, so any split gives −A ∇logπ."""
    x = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.maximum(2 * x, x + 1), x)       # branches 2x, x+1: slopes 2, 1
    assert float(g) == 1.5
    (g,) = torch.autograd.grad(torch.minimum(2 * x, x + 1), x)
    assert float(g) == 1.5


@pytest.mark.parametrize("name,opts", [("grpo", {}), ("gae", {"lam": 0.9}), ("reinforce_pp", {}),
                                       ("trepo", {"variant": "chunk", "K": K, "anchors": {"kind": "every", "k": 2}})])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_ppo_clip_at_ratio_one_equals_pg(name, opts, agg):
    """At θ = θ_old the clipped surrogate's gradient is the REINFORCE-form gradient (ESTIMATORS §1.3)."""
    grads = []
    for loss in ("ppo", "pg"):
        policy = TabularSoftmax(MDP, seed=0)
        est = estimator(name, loss=loss, agg=agg, dual_clip=3.0 if loss == "ppo" else None, **opts)
        est(hand_batch().score(policy)).loss.backward()
        grads.append(policy.logits.grad.clone())
    assert_vec_close(grads[0], grads[1], what="ppo vs pg at ratio 1")
    assert float(grads[1].norm()) > 0


RATIO = [[0.5, 1.1, 1.5], [0.5], [1.5, 0.7, 4.0, 1.0], [0.9, 1.25], [0.6, 1.1, 3.5, 1.21]]
RM_SIGNED = [1.0, -0.5, -2.0, 0.25, -3.0]


@pytest.mark.parametrize("clip_high,dual", [(None, None), (0.28, None), (None, 3.0)])
def test_ppo_clip_active_outside_the_trust_region(clip_high, dual):
    """Per token: A > 0 → loss −A·min(ρ, clip ρ); A < 0 → −A·max(ρ, clip ρ), then min with −A·c
    (dual clip). c = w·A·ρ where the ratio branch is active, 0 where a constant is."""
    hi = 0.2 if clip_high is None else clip_high
    policy = TabularSoftmax(MDP, seed=0)
    sc = hand_batch(RM_SIGNED).score(policy)
    ro = replace(sc, logp=sc.logp + torch.log(pad(RATIO, 1.0)) * sc.mask)          # ρ = RATIO exactly
    loss_h, coef = 0.0, []
    for i in range(B):
        A, row = RM_SIGNED[i], []
        for rho in RATIO[i]:
            clipped = min(max(rho, 0.8), 1 + hi)
            val = -A * (min(rho, clipped) if A > 0 else max(rho, clipped))
            active = (rho == min(rho, clipped)) if A > 0 else (rho == max(rho, clipped))
            if dual is not None and A < 0 and -A * dual < val:
                val, active = -A * dual, False
            loss_h += W_SEQ[i] * val
            row.append(W_SEQ[i] * A * rho if active else 0.0)
        coef.append(row)
    est = estimator("reinforce", clip=0.2, clip_high=clip_high, dual_clip=dual)
    assert_close(est(ro).loss, loss_h, what="clipped loss")
    assert_close(coefficients(est, ro), pad(coef), what="clipped coefficients")
    n_active = sum(c != 0.0 for r in coef for c in r)
    assert {None: 9, 0.28: 10, 3.0: 7}[clip_high if dual is None else dual] == n_active   # the cases differ


# =================================================================================== aggregation
def hand_agg(mode, C=None):
    n_b = {0: 3, 1: 2}
    tok_b = {0: sum(LENS[:3]), 1: sum(LENS[3:])}                                      # 8 and 6 tokens
    w = {"token-mean": lambda i: 1 / tok_b[BATCH[i]], "token-sum": lambda i: 1.0,
         "seq-mean-token-sum": lambda i: 1 / n_b[BATCH[i]],
         "seq-mean-token-mean": lambda i: 1 / (n_b[BATCH[i]] * (LENS[i] + 1e-8)),
         "seq-mean-token-sum-norm": lambda i: 1 / (n_b[BATCH[i]] * (L if C is None else C))}[mode]
    return [w(i) for i in range(B)]


@pytest.mark.parametrize("mode,C", [("token-mean", None), ("token-sum", None), ("seq-mean-token-sum", None),
                                    ("seq-mean-token-mean", None), ("seq-mean-token-sum-norm", None),
                                    ("seq-mean-token-sum-norm", 16.0)])
def test_aggregation_weights(mode, C):
    """verl agg_loss per-token weights (ESTIMATORS §2.9), counted per independent batch."""
    w = hand_agg(mode, C)
    assert_close(agg_weights(hand_batch(), mode, C), pad(tile(w)))
    replay(estimator("reinforce", agg=mode, agg_constant=C), tile(RM), w)


def test_aggregation_is_per_batch():
    """Merging the two batches into one changes token-mean to 1/14 for every token."""
    ro = replace(hand_batch(), batch=torch.zeros(B, dtype=torch.long), n_batches=1)
    assert_close(agg_weights(ro, "token-mean"), pad(tile([1 / 14] * B)))
    assert_close(agg_weights(ro, "seq-mean-token-sum"), pad(tile([1 / 5] * B)))


# =================================================================================== KL
D = [[0.3, -0.2, 0.5], [0.1], [-0.4, 0.2, 0.0, 0.7], [0.25, -0.5], [0.6, -0.1, 0.35, -0.3]]   # log π − log π_ref
KL_VALUE = {"k1": lambda d: d, "k2": lambda d: 0.5 * d * d, "k3": lambda d: math.exp(-d) + d - 1}
KL_DERIV = {"k1": lambda d: 1.0, "k2": lambda d: d, "k3": lambda d: 1 - math.exp(-d)}   # ∂k/∂log π


def with_ref(policy):
    sc = hand_batch().score(policy)
    return replace(sc, extras={**sc.extras, "ref_logp": (sc.logp_old - pad(D)) * sc.mask})


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_values(kind):
    d = pad(D)
    got = kl_penalty(d, torch.zeros_like(d), kind)
    assert_close(got * pad(tile([1.0] * B)), pad([[KL_VALUE[kind](x) for x in row] for row in D]))


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_in_loss_coefficients(kind):
    """In-loss KL adds c = −β·w·∂k/∂logπ: k1 → −β, k2 → −β·d, k3 → −β(1 − e^{ref − logp})."""
    beta = 0.1
    coef = [[W_SEQ[i] * (RM[i] - beta * KL_DERIV[kind](d)) for d in D[i]] for i in range(B)]
    replay(estimator("reinforce", kl=KL(beta, kind, "loss")), tile(RM), coef=coef, ro=with_ref(TabularSoftmax(MDP, seed=0)))


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_in_reward(kind):
    """In-reward KL (on the behaviour log-probs) lowers r_t by β k_t and RM by β Σ_t k_t."""
    beta = 0.1
    ro = with_ref(TabularSoftmax(MDP, seed=0))
    rm = [RM[i] - beta * sum(KL_VALUE[kind](d) for d in D[i]) for i in range(B)]
    replay(estimator("reinforce", kl=KL(beta, kind, "reward")), tile(rm), ro=ro)
    r = [[R[i][t] - beta * KL_VALUE[kind](D[i][t]) for t in range(LENS[i])] for i in range(B)]
    replay(estimator("reinforce_oracle", kl=KL(beta, kind, "reward")),
           [[sum(r[i][t:]) for t in range(LENS[i])] for i in range(B)], ro=ro)
    # ReMax (verl): reward-to-go of [−β k_1, …, −β k_{T−1}, RM − β k_T], minus the greedy score —
    # token t does not carry the KL of earlier tokens.
    out = [[RM[i] - beta * sum(KL_VALUE[kind](d) for d in D[i][t:LENS[i]]) - GREEDY[i] for t in range(LENS[i])]
           for i in range(B)]
    replay(estimator("remax", kl=KL(beta, kind, "reward")), out, ro=ro)


# =================================================================================== GRPO edge case
@pytest.mark.parametrize("eps,ddof", [(1e-6, 1), (1e-4, 1), (1e-6, 0)])
def test_grpo_equal_rewards_give_exactly_zero(eps, ddof):
    """A group of equal rewards has std 0 and advantage exactly 0 (never NaN), even for values like
    0.1 whose plain mean Σx/n is off by an ulp."""
    rm = [0.1, 0.1, 0.1, 0.7, 0.7]
    ro = hand_batch(rm).score(TabularSoftmax(MDP, seed=0))
    for std in (True, False):
        adv = estimator("grpo", std=std, eps=eps, ddof=ddof)(ro).advantages
        assert torch.equal(adv, torch.zeros(B, L, dtype=torch.float64))
    for name in ("rloo", "reinforce_pp_baseline"):
        assert torch.equal(estimator(name)(ro).advantages, torch.zeros(B, L, dtype=torch.float64))


# =================================================================================== exact expectations
def tiny(eos=True, reward="gaussian", H=3, seed=3):
    m = random_mdp(seed, vocab_size=3, horizon=H, eos=eos, reward=reward)
    return m, TabularSoftmax(m, seed=seed)


@pytest.mark.parametrize("variant,anchors", [("all", None), ("subset", {"kind": "bernoulli", "q": 0.4}),
                                             ("chunk", {"kind": "bernoulli", "q": 0.4}),
                                             ("chunk", {"kind": "fixed", "positions": [2]})])
@pytest.mark.parametrize("Kc", [1, 3])
def test_trepo_unbiased_and_self_inclusion_scales(variant, anchors, Kc):
    """T15–T17 unbiased; F10: with RM(y) in the baseline average, the baseline term's bias is
    −E[RM ∇ℓ_t]/(K+1) at every token, so E[ĝ] = K/(K+1) ∇J exactly."""
    m, p = tiny()
    g = exact.gradient(m, p)
    rep = report(estimator("trepo", variant=variant, K=Kc, anchors=anchors), m, p, G=1, cov=None)
    assert rep.verdict == "unbiased", rep.summary()
    mean = exact.moments(estimator("trepo", variant=variant, K=Kc, anchors=anchors, self_inclusive=True), m, p).mean
    assert_vec_close(mean, Kc / (Kc + 1) * g, what="self-inclusive TRePO")


def anchor_weights(tab, keep):
    """W[n, t] = P(y_n)·A_t(y_n)·keep[n, t], A_t = U(y_≤t) − U(y_<t): the exact E-weights of Σ keep·A ∇ℓ."""
    v = tab.prefix_values(tab.enum)                                           # (N, L+1)
    return tab.prob[:, None] * (v[:, 1:] - v[:, :-1]) * keep * tab.enum.mask


def test_trepo_interp_fixed_length_is_anchors_only():
    """F9: on fixed-length responses the interpolated positions contribute 0: E[ĝ] = E Σ_{t∈S} A_t ∇ℓ_t ≠ ∇J."""
    m, p = tiny(eos=False, H=4)
    tab = exact.tables(m, p)
    S = [2, 4]                                                                # T = H = 4 is an anchor anyway
    keep = torch.tensor([[t in S for t in range(1, 5)]], dtype=torch.float64)
    want = exact.expected_score(p, tab.enum, anchor_weights(tab, keep))
    est = estimator("trepo", variant="interp", anchors={"kind": "fixed", "positions": [2]})
    assert_vec_close(exact.moments(est, m, p).mean, want)
    assert report(est, m, p, cov=None).verdict == "biased"


def test_trepo_interp_variable_length_is_not_even_anchors_only():
    """F9, variable length (T forced as an anchor, and whether t = T depends on w_t = EOS): the
    literal interpolation differs from both ∇J and the anchors-only gradient."""
    m, p = tiny(eos=True, H=3)
    tab = exact.tables(m, p)
    t = torch.arange(1, 4)[None, :]
    keep = ((t == 1) | (t == tab.enum.lengths[:, None])).to(torch.float64)  # S = {1} plus T
    anchors_only = exact.expected_score(p, tab.enum, anchor_weights(tab, keep))
    mean = exact.moments(estimator("trepo", variant="interp", anchors={"kind": "fixed", "positions": [1]}), m, p).mean
    assert float((mean - anchors_only).norm()) > 1e-3 * float(anchors_only.norm())
    assert float((mean - exact.gradient(m, p)).norm()) > 1e-3 * float(mean.norm())


def test_trepo_value_interp_fixed_length_divides_by_chunk_length():
    """F9 (values): E[ĝ] = Σ_t E[A_t ∇ℓ_t]/L_{j(t)}; chunks (0,1] and (1,4] → weights 1, 1/3, 1/3, 1/3."""
    m, p = tiny(eos=False, H=4)
    tab = exact.tables(m, p)
    keep = torch.tensor([[1.0, 1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    est = estimator("trepo", variant="value_interp", anchors={"kind": "fixed", "positions": [1]})
    assert_vec_close(exact.moments(est, m, p).mean, exact.expected_score(p, tab.enum, anchor_weights(tab, keep)))
    assert report(est, m, p, cov=None).verdict == "biased"


@pytest.mark.parametrize("step,max_steps,cut", [(1, None, 3), (2, None, 3), (1, 0, 1), (1, 1, 2)])
def test_vineppo_unwhitened_expectation(step, max_steps, cut):
    """Unwhitened VinePPO: E[ĝ] = E Σ_{t ≤ cut} A_t ∇ℓ_t, cut = (max_steps + 1)·step (all of it without a cap)."""
    m, p = tiny(reward="zra")
    tab = exact.tables(m, p)
    keep = torch.tensor([[t <= cut for t in range(1, 4)]], dtype=torch.float64)
    mean = exact.moments(estimator("vineppo", K=2, step=step, max_steps=max_steps, whiten=False), m, p, G=2).mean
    assert_vec_close(mean, exact.expected_score(p, tab.enum, anchor_weights(tab, keep)))


# =================================================================================== joint enumeration
def joint_continuation_mean(est, mdp, policy, substitute=False) -> torch.Tensor:
    """E[ĝ] (G = 1, K = 1) by enumerating, for every response y, every joint outcome of its
    continuations (one complete response z ⊐ y_≤t per open prefix t < T, with probability
    π(z | y_≤t)) and every anchor subset, and evaluating the estimator on each explicit cont_rm.
    ``substitute=True`` puts U(y_≤t) in place of the continuations instead (the engine's shortcut)."""
    tab = exact.tables(mdp, policy)
    enum = tab.enum
    N = enum.batch_size
    toks, lens, prob, rm = enum.tokens.tolist(), enum.lengths.tolist(), tab.prob.tolist(), enum.rm.tolist()
    U = tab.prefix_values(enum).tolist()
    with torch.no_grad():
        logp = (policy.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).to(torch.float64)
    spec = est.needs.get("anchors")
    W = torch.zeros(N, L_of(enum), dtype=torch.float64)
    for n in range(N):
        opts = []
        for t in range(lens[n]):
            ext = [z for z in range(N) if toks[z][:t] == toks[n][:t]]     # responses extending y_≤t
            tot = sum(prob[z] for z in ext)
            opts.append([(U[n][t], 1.0)] if substitute else [(rm[z], prob[z] / tot) for z in ext])
        anchor_sets = [(None, 1.0)]
        if spec is not None and spec["kind"] == "bernoulli":
            q = spec["q"]
            anchor_sets = [(a, math.prod(q if x else 1 - q for x in a))
                           for a in itertools.product([False, True], repeat=L_of(enum))]
        rows, p_rows = [], []
        for combo in itertools.product(*opts):
            for a, pa in anchor_sets:
                rows.append((combo, a))
                p_rows.append(math.prod(pc for _, pc in combo) * pa)
        nr = len(rows)
        ro = enum.select(torch.full((nr,), n))
        ids = torch.arange(nr)
        ro.group, ro.batch, ro.n_batches, ro.logp, ro.logp_old = ids, ids, nr, logp[[n] * nr], logp[[n] * nr]
        cont = torch.full((nr, L_of(enum) + 1, 1), rm[n], dtype=torch.float64)
        for r, (combo, _) in enumerate(rows):
            cont[r, : lens[n], 0] = torch.tensor([z for z, _ in combo], dtype=torch.float64)
        ro.extras = {"cont_rm": cont}
        if spec is not None:
            det = deterministic_anchors(spec, nr, L_of(enum))
            ro.extras["anchors"] = (det if det is not None else torch.tensor([a for _, a in rows])) & ro.mask.bool()
        c = coefficients(est, ro)                                              # (nr, L)
        W[n] = prob[n] * (torch.tensor(p_rows, dtype=torch.float64)[:, None] * c).sum(0)
    return exact.expected_score(policy, enum, W)


def L_of(enum):
    return enum.tokens.shape[1]


JOINT_CASES = [dict(variant="all"), dict(variant="all", self_inclusive=True),
               dict(variant="subset", anchors={"kind": "bernoulli", "q": 0.4}),
               dict(variant="subset", anchors={"kind": "bernoulli", "q": 0.4}, self_inclusive=True),
               dict(variant="interp", anchors={"kind": "bernoulli", "q": 0.6}),
               dict(variant="interp", anchors={"kind": "fixed", "positions": [1]}, self_inclusive=True),
               dict(variant="chunk", anchors={"kind": "bernoulli", "q": 0.3}),
               dict(variant="chunk", anchors={"kind": "every", "k": 1}, self_inclusive=True),
               dict(variant="value_interp", anchors={"kind": "bernoulli", "q": 0.5}),
               dict(variant="value_interp", anchors={"kind": "fixed", "positions": [1]}, self_inclusive=True)]


@pytest.fixture(scope="module")
def joint_mdp():
    m = random_mdp(11, vocab_size=3, horizon=2, eos=True, reward="gaussian")   # 7 responses, one prompt
    return m, TabularSoftmax(m, seed=2)


def case_id(o):
    a = o.get("anchors") or {}
    return "-".join([o["variant"], a.get("kind", "none")] + (["self_inclusive"] if o.get("self_inclusive") else []))


@pytest.mark.parametrize("opts", JOINT_CASES, ids=[case_id(o) for o in JOINT_CASES])
def test_continuation_substitution_is_exact_for_trepo(joint_mdp, opts):
    """The exact engine replaces K = 1 continuations by U(prefix); for an estimator linear in them
    that equals the expectation over every joint continuation outcome."""
    m, p = joint_mdp
    est = estimator("trepo", K=1, **opts)
    assert est.declared("multilinear") is not False        # advantage declared; the PPO loss is probed
    assert_vec_close(exact.moments(est, m, p).mean, joint_continuation_mean(est, m, p), what=str(opts))


@pytest.mark.parametrize("max_steps", [None, 0])
def test_continuation_substitution_vineppo(joint_mdp, max_steps):
    """Unwhitened VinePPO: substitution exact. Whitened: not linear in the rollouts, the joint
    expectation differs from the substituted one, and the engine refuses it."""
    m, p = joint_mdp
    plain = estimator("vineppo", K=1, step=1, max_steps=max_steps, whiten=False)
    assert_vec_close(exact.moments(plain, m, p).mean, joint_continuation_mean(plain, m, p))
    white = estimator("vineppo", K=1, step=1, max_steps=max_steps)
    assert white.declared("multilinear") is False
    joint, subst = joint_continuation_mean(white, m, p), joint_continuation_mean(white, m, p, substitute=True)
    assert float((joint - subst).norm()) > 1e-3 * float(joint.norm())
    with pytest.raises(TPGError, match="not multilinear"):
        exact.moments(white, m, p)


# =================================================================================== sampled batches
@pytest.mark.parametrize("name,opts", [("reinforce", {}), ("reinforce_oracle", {"gamma": 0.9}), ("grpo", {}),
                                       ("drgrpo", {}), ("rloo", {}), ("remax", {}), ("reinforce_pp", {}),
                                       ("reinforce_pp_baseline", {}), ("gae", {"lam": 0.9, "whiten": True}),
                                       ("trepo", {"variant": "interp", "K": 2, "anchors": {"kind": "bernoulli", "q": 0.5}}),
                                       ("vineppo", {"K": 2})])
def test_every_estimator_runs_unchanged_on_a_sampled_batch(name, opts):
    """The same code on a sampled batch (2 batches × 2 prompts × G = 3) with MC extra draws."""
    m = random_mdp(1, vocab_size=3, horizon=4, eos=True, n_prompts=2)
    policy, ref = TabularSoftmax(m, seed=0), TabularSoftmax(m, seed=1)
    gen = torch.Generator().manual_seed(0)
    ro = sample(m, policy, 3, gen, n_prompts=2, n_batches=2)
    est = estimator(name, kl=KL(0.05, "k3", "loss"), **opts)
    draws = MonteCarloDraws(m, policy, gen, critic=exact_critic(exact.tables(m, policy)), ref=ref)
    ro, _ = draws.fill(ro, est.needs)
    loss = est(ro.score(policy)).loss
    loss.backward()
    assert torch.isfinite(policy.logits.grad).all() and float(policy.logits.grad.norm()) > 0


# =================================================================================== naive loops
def rand_batch(seed, B_=6, L_=5, n_batches=2):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, L_ + 1, (B_,), generator=g)
    mask = (torch.arange(L_)[None, :] < lens[:, None]).to(torch.float64)
    x = torch.randn(B_, L_, generator=g, dtype=torch.float64) * mask
    batch = torch.arange(B_) % n_batches
    return x, mask, batch, g


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.7), (0.5, 0.0)])
def test_gae_advantages_vs_naive(seed, gamma, lam):
    """Including masks with holes (multi-turn observation tokens): sum over the valid positions."""
    x, mask, _, g = rand_batch(seed)
    mask = mask * (torch.rand(mask.shape, generator=g) > 0.2)              # holes
    values = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    got = gae_advantages(x, values, mask, gamma, lam)
    want = torch.zeros_like(x)
    for i in range(x.shape[0]):
        pos = [t for t in range(x.shape[1]) if mask[i, t] > 0]
        Vn = [float(values[i, t]) for t in pos] + [0.0]
        delta = [float(x[i, t]) + gamma * Vn[j + 1] - Vn[j] for j, t in enumerate(pos)]
        for j, t in enumerate(pos):
            want[i, t] = sum((gamma * lam) ** l * delta[j + l] for l in range(len(pos) - j))
    assert_close(got, want)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("gamma", [1.0, 0.7])
def test_rewards_to_go_vs_naive(seed, gamma):
    x, *_ = rand_batch(seed)
    want = [[sum(gamma ** (k - t) * float(x[i, k]) for k in range(t, x.shape[1])) for t in range(x.shape[1])]
            for i in range(x.shape[0])]
    assert_close(rewards_to_go(x, gamma), torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ddof", [0, 1])
def test_group_stats_vs_naive(seed, ddof):
    g = torch.Generator().manual_seed(seed)
    group = torch.randint(0, 4, (9,), generator=g)
    x = torch.randn(9, generator=g, dtype=torch.float64)
    mean, sd, cnt = group_stats(x, group, ddof)
    for i in range(9):
        vals = [float(x[j]) for j in range(9) if group[j] == group[i]]
        if len(vals) == 1:
            want = (0.0, 1.0)
        else:
            want = (statistics.fmean(vals), (statistics.stdev if ddof else statistics.pstdev)(vals))
        assert_close(torch.stack([mean[i], sd[i]]), want)
        assert int(cnt[i]) == len(vals)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shift", [True, False])
def test_masked_whiten_vs_naive(seed, shift):
    x, mask, batch, _ = rand_batch(seed, B_=7, n_batches=3)
    got = masked_whiten(x, mask, batch, 3, shift_mean=shift)
    want = torch.zeros_like(x)
    for b in range(3):
        vals = [float(x[i, t]) for i in range(7) for t in range(5) if batch[i] == b and mask[i, t] > 0]
        mu = statistics.fmean(vals)
        sd = math.sqrt(statistics.variance(vals) + 1e-8)
        for i in range(7):
            for t in range(5):
                if batch[i] == b and mask[i, t] > 0:
                    want[i, t] = ((float(x[i, t]) - mu) if shift else float(x[i, t])) / sd
    assert_close(got, want)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
def test_agg_weights_vs_naive(seed, mode):
    x, mask, batch, _ = rand_batch(seed, B_=7, n_batches=3)
    ro = Rollouts(torch.zeros(7, dtype=torch.long), torch.zeros(7, 5, dtype=torch.long), mask, x, x.sum(1),
                  torch.arange(7), batch, 3)
    want = torch.zeros_like(x)
    for i in range(7):
        rows = [j for j in range(7) if batch[j] == batch[i]]
        n_tok = sum(float(mask[j].sum()) for j in rows)
        n_i = float(mask[i].sum())
        w = {"token-mean": 1 / n_tok, "token-sum": 1.0, "seq-mean-token-sum": 1 / len(rows),
             "seq-mean-token-mean": 1 / (len(rows) * (n_i + 1e-8)), "seq-mean-token-sum-norm": 1 / (len(rows) * 3.5)}[mode]
        for t in range(5):
            want[i, t] = w * float(mask[i, t])
    assert_close(agg_weights(ro, mode, 3.5 if mode == "seq-mean-token-sum-norm" else None), want)


@pytest.mark.parametrize("n,k", [(1, 3), (3, 1), (4, 3), (5, 2), (3, 4)])
def test_multisets_and_multinomial_coef_vs_itertools(n, k):
    rows = multisets(n, k)
    want = list(itertools.combinations_with_replacement(range(n), k))
    assert [tuple(int(v) for v in r) for r in rows] == want
    coef = multinomial_coef(rows)
    for r, c in zip(want, coef):
        assert c == math.factorial(k) / math.prod(math.factorial(m) for m in Counter(r).values())
    assert coef.sum() == n**k                                                  # every ordered k-tuple once


@pytest.mark.parametrize("mdp", [random_mdp(0, vocab_size=3, horizon=3), random_mdp(0, vocab_size=2, horizon=4, eos=False),
                                 random_mdp(0, vocab_size=4, horizon=2, n_prompts=2),
                                 TokenMDP([(1,)], 3, 3, eos=0, token_rewards=np.zeros((7, 3)))],
                         ids=["V3H3", "V2H4-noeos", "V4H2-P2", "eos0"])
def test_state_index_vs_naive_dict(mdp):
    """mdp.state_index and state_table's child table vs a dict built by listing the states."""
    index = naive_state_index(mdp)
    assert len(index) == mdp.num_states and sorted(index.values()) == list(range(mdp.num_states))
    enum = enumerate_responses(mdp)
    got = mdp.state_index(enum.prompt_idx, enum.tokens, enum.mask)
    for n, (p, y, T) in enumerate(zip(enum.prompt_idx.tolist(), enum.tokens.tolist(), enum.lengths.tolist())):
        assert got[n, :T].tolist() == [index[(p, tuple(y[:t]))] for t in range(T)]
    child = mdp.state_table()["child"]
    for (p, prefix), s in index.items():
        for a in range(mdp.vocab_size):
            assert child[s, a] == index.get((p, prefix + (a,)), -1)


# =================================================================================== bad input
def test_unknown_names_are_refused():
    with pytest.raises(TPGError, match="unknown estimator"):
        estimator("nope")
    with pytest.raises(TPGError, match="unknown aggregation"):
        estimator("grpo", agg="mean")
    with pytest.raises(TPGError, match="unknown policy loss"):
        estimator("grpo", loss="dpo")
    with pytest.raises(TPGError, match="unknown KL"):
        KL(0.1, "k4")
    with pytest.raises(TPGError, match="KL.where"):
        KL(0.1, "k1", "advantage")
    with pytest.raises(TPGError, match="unknown KL"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "abs")
    with pytest.raises(TPGError, match="unknown TRePO variant"):
        estimator("trepo", variant="linear").needs


@pytest.mark.parametrize("c", [1.0, 0.5])
def test_dual_clip_must_exceed_one(c):
    sc = hand_batch().score(TabularSoftmax(MDP, seed=0))
    with pytest.raises(TPGError, match="dual clip"):
        estimator("grpo", dual_clip=c)(sc)


def test_missing_critic_ref_baseline_and_agg_constant():
    m, p = tiny()
    with pytest.raises(TPGError, match="critic"):
        exact.moments(estimator("gae"), m, p)
    with pytest.raises(TPGError, match="ref="):
        exact.moments(estimator("grpo", kl=KL(0.1)), m, p, G=2)
    sc = hand_batch().score(TabularSoftmax(MDP, seed=0))
    with pytest.raises(TPGError, match="baseline=callable"):
        estimator("baseline")(sc)
    with pytest.raises(TPGError, match="shape"):
        estimator("baseline", baseline=lambda ro: torch.zeros(B))(sc)
    with pytest.raises(TPGError, match="positive constant"):
        estimator("grpo", agg="seq-mean-token-sum-norm", agg_constant=0.0)(sc)


@pytest.mark.parametrize("variant,anchors,match", [
    ("chunk", {"kind": "random"}, "anchors must be"), ("chunk", [2], "anchors must be"),
    ("interp", {"kind": "bernoulli", "q": 0.0}, "0 < q"), ("chunk", {"kind": "bernoulli", "q": 1.5}, "0 < q"),
    ("chunk", {"kind": "every", "k": 0}, "k ≥ 1"), ("subset", {"kind": "every", "k": 2}, "bernoulli"),
    ("chunk", None, "needs anchors"), ("all", {"kind": "every", "k": 2}, "takes no anchors")])
def test_bad_anchor_specs(variant, anchors, match):
    with pytest.raises(TPGError, match=match):                   # refused when the estimator is built
        estimator("trepo", variant=variant, anchors=anchors)
    from tpg.estimators.continuation import trepo
    with pytest.raises(TPGError, match=match):                   # and by the advantage function itself
        trepo(hand_batch(), variant=variant, anchors=anchors)


@pytest.mark.parametrize("name,opts", [("trepo", {"K": 0}), ("trepo", {"K": 1.5}), ("vineppo", {"K": 0}),
                                       ("vineppo", {"K": -2})])
def test_K_below_one_is_refused(name, opts):
    m, p = tiny()
    with pytest.raises(TPGError, match="K must be an int ≥ 1"):
        exact.moments(estimator(name, **opts), m, p)


def test_vineppo_bad_step_and_cont_shape():
    sc = hand_batch().score(TabularSoftmax(MDP, seed=0))
    with pytest.raises(TPGError, match="step size"):
        estimator("vineppo", K=K, step=0)(sc)
    with pytest.raises(TPGError, match="max_steps"):
        estimator("vineppo", K=K, max_steps=-1)(sc)
    with pytest.raises(TPGError, match=r"expected \(B, L\+1, K\)"):
        estimator("trepo", K=3)(sc)                                           # the batch carries K = 2
    with pytest.raises(TPGError, match="cont_rm"):
        estimator("trepo", K=K)(replace(sc, extras={}))


# =================================================================================== user estimators
def test_user_estimator_plugs_into_the_registry():
    """A user advantage registered with needs/multilinear gets exact verdicts like a built-in."""
    @register_advantage("test_prefix_baseline", needs={"continuations": 1})
    def prefix_baseline(ro):
        """A_t = RM − v̂_0: REINFORCE with an MC prompt baseline (unbiased)."""
        return (ro.rm[:, None] - ro.extras["cont_rm"][:, 0, 0][:, None]) * ro.mask

    try:
        m, p = tiny()
        assert report(estimator("test_prefix_baseline"), m, p, cov=None).verdict == "unbiased"
    finally:
        ADVANTAGES.pop("test_prefix_baseline")


@pytest.mark.parametrize("kw,message", [
    (dict(clip=0.0), r"clip must be a number in \(0, 1\).*got 0.0"),
    (dict(clip=1.0), r"clip must be a number in \(0, 1\).*got 1.0"),
    (dict(clip=float("nan")), r"clip must be a number in \(0, 1\).*got nan"),
    (dict(clip_high=-0.1), r"clip_high must be a number in \(0, 1\).* or None, got -0.1"),
    (dict(clip_high=float("inf")), r"clip_high must be a number in \(0, 1\).* or None, got inf"),
    (dict(dual_clip=1.0), r"dual clip constant c \(dual_clip\) must be None or a number > 1.*got 1.0"),
    (dict(dual_clip="3"), r"dual clip constant c \(dual_clip\) must be None or a number > 1.*got '3'"),
])
def test_clip_constants_are_checked_at_construction(kw, message):
    """PPO clip constants are validated when the estimator is built, before any rollouts exist."""
    with pytest.raises(TPGError, match=message):
        estimator("grpo", **kw)


def test_misspelled_advantage_option_names_the_valid_ones():
    with pytest.raises(TPGError, match=r"estimator 'grpo' got invalid options \['stdd'\].*"
                                       r"its options are \['std', 'eps', 'ddof'\]"):
        estimator("grpo", stdd=False)
    with pytest.raises(TPGError, match=r"estimator 'rloo' got invalid options \['K'\].*its options are none"):
        estimator("rloo", K=2)
    with pytest.raises(TPGError, match=r"estimator 'grpo' got invalid options \['eps', 'std', 'stdd'\]"):
        estimator("drgrpo", stdd=True, eps=0.1)          # the preset's std=False is listed too


@pytest.mark.parametrize("name,opts,message", [
    ("reinforce_oracle", dict(gamma=0.0), r"discount gamma must be a number in \(0, 1\], got 0.0"),
    ("reinforce_oracle", dict(gamma=1.5), r"discount gamma must be a number in \(0, 1\], got 1.5"),
    ("reinforce_pp", dict(gamma=-0.5), r"discount gamma must be a number in \(0, 1\], got -0.5"),
    ("gae", dict(gamma=float("nan")), r"discount gamma must be a number in \(0, 1\], got nan"),
    ("gae", dict(lam=1.2), r"GAE lam \(λ\) must be a number in \[0, 1\].*got 1.2"),
    ("gae", dict(lam=-0.1), r"GAE lam \(λ\) must be a number in \[0, 1\].*got -0.1"),
    ("grpo", dict(eps=-1e-6), r"grpo eps .* must be a number ≥ 0, got -1e-06"),
    ("grpo", dict(ddof=2), r"grpo ddof must be 0 .* or 1 .*got 2"),
    ("grpo", dict(ddof=True), r"grpo ddof must be 0 .* or 1 .*got True"),
])
def test_advantage_option_ranges_are_refused(name, opts, message):
    """Out-of-range advantage options raise where the advantage function first sees them."""
    est = estimator(name, **opts)
    sc = hand_batch().score(TabularSoftmax(MDP, seed=0))
    sc.extras["values"] = torch.zeros_like(sc.mask)                          # (B, L) a critic, for gae
    with pytest.raises(TPGError, match=message):
        est(sc)


@pytest.mark.parametrize("name,opts,message", [
    ("trepo", dict(variant="interp", anchors={"kind": "fixed", "positions": [0, 2]}),
     r"'fixed' anchors need positions = a list of ints ≥ 1.*got \[0, 2\]"),
    ("trepo", dict(variant="chunk", anchors={"kind": "fixed", "positions": [1.5]}),
     r"'fixed' anchors need positions = a list of ints ≥ 1.*got \[1.5\]"),
    ("trepo", dict(variant="chunk", anchors={"kind": "fixed"}),
     r"'fixed' anchors need positions = a list of ints ≥ 1.*got None"),
    ("vineppo", dict(step=0), r"VinePPO step size must be an int ≥ 1 .*got 0"),
    ("vineppo", dict(max_steps=-1), r"max_steps must be None or an int ≥ 0 .*got -1"),
    ("vineppo", dict(max_steps=1.0), r"max_steps must be None or an int ≥ 0 .*got 1.0"),
])
def test_anchor_and_step_options_are_refused(name, opts, message):
    """Building the estimator (its needs are resolved then, before any extra draw is made) and the
    advantage function both refuse them."""
    with pytest.raises(TPGError, match=message):
        estimator(name, **opts)
    with pytest.raises(TPGError, match=message):
        ADVANTAGES[name].fn(hand_batch(), **opts)
