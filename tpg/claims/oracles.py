"""Independent oracles: the closed forms the claims compare the engine and the estimators with.

Each oracle is written from its equation (PAPER.md, ESTIMATORS.md) as a plain loop over the
enumerated responses, in numpy, and reads only the MDP, the enumeration and the exact per-state
tables (π, U, rewards): none calls the estimator, loss or engine code it checks
(``tpg.estimators``, ``tpg.exact.moments``), so a bug there cannot cancel in the comparison. The
one shared step is the last contraction E Σ_t c_t ∇ℓ_t = ``tpg.exact.expected_score`` with weights
P(y)·E[c_t | y], itself checked against finite differences (T1) and the closed form (T2).
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _paths(mdp, enum) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """[(prompt, states s_0..s_(T−1), tokens y_1..y_T)] of every enumerated response."""
    s = mdp.state_index(enum.prompt_idx, enum.tokens, enum.mask).numpy()           # (N, L)
    T = enum.mask.sum(1).long().numpy()
    tok, x = enum.tokens.numpy(), enum.prompt_idx.numpy()
    return [(int(x[n]), s[n, : T[n]], tok[n, : T[n]]) for n in range(len(T))]


# ====================================================================================== GRPO with std
def grpo_kappa(p: float, G: int, eps: float, ddof: int = 1) -> float:
    """κ = h(1) − h(0), h(r) = E_{R_−i}[(r − R̄)/(σ + ε)] for binary rewards with success rate p:
    the other G − 1 rewards are enumerated as k successes ~ Binomial(G − 1, p), independently of
    the estimator code (PAPER §3.2, claim T13). σ uses ``ddof``; an all-equal group gives 0."""
    def h(r: int) -> float:
        total = 0.0
        for k in range(G):
            n1 = r + k                                                       # successes in the group
            mean = n1 / G
            ss = n1 * (1 - mean) ** 2 + (G - n1) * mean**2
            sd = math.sqrt(ss / max(G - ddof, 1))
            total += math.comb(G - 1, k) * p**k * (1 - p) ** (G - 1 - k) * (r - mean) / (sd + eps)
        return total
    return h(1) - h(0)


# ====================================================================================== reach probabilities
def reach_probabilities(mdp, policy, enum) -> np.ndarray:
    """(S,) ρ(s) = Σ_{y through s} ρ(x) π(y|x): the probability that a response passes through the
    prefix state s, summed over the responses (each state lies on a path at most once), with
    π(y|x) = exp Σ_t log π(y_t|s_t) from the policy itself (not the engine's forward sweep)."""
    with torch.no_grad():
        lp = (policy.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).sum(1)   # (N,)
    cond = lp.to(torch.float64).exp().numpy()
    rho = np.asarray(mdp.prompt_probs, dtype=np.float64)
    visit = np.zeros(mdp.num_states)
    for n, (x, states, _) in enumerate(_paths(mdp, enum)):
        for s in states:
            visit[s] += rho[x] * cond[n]
    return visit


# ====================================================================================== PPO clipping
def ratios(mdp, enum, pi_new: torch.Tensor, pi_old: torch.Tensor) -> np.ndarray:
    """(N, L) ρ_t = π_θ(y_t|s_t) / π_old(y_t|s_t) along every response (1 after its end), from the
    two policies' per-state tables (S, V)."""
    new, old = pi_new.numpy(), pi_old.numpy()
    out = np.ones(tuple(enum.tokens.shape))
    for n, (_, states, tokens) in enumerate(_paths(mdp, enum)):
        for t, (s, a) in enumerate(zip(states, tokens)):
            out[n, t] = new[s, a] / old[s, a]
    return out


def clip_active(adv: np.ndarray, ratio: np.ndarray, clip_low: float, clip_high: float | None = None,
                dual_clip: float | None = None) -> np.ndarray:
    """Where verl's clipped per-token loss max(−Aρ, −A·clip(ρ, 1 − ε_l, 1 + ε_h)) (and, dual clip,
    min(·, −cA) for A < 0) has the unclipped gradient −Aρ∇ℓ; elsewhere it is constant in θ.

    A > 0: the max is −A·min(ρ, clip ρ), unclipped iff ρ ≤ 1 + ε_h. A < 0: it is |A|·max(ρ, clip ρ),
    unclipped iff ρ ≥ 1 − ε_l, and the dual clip caps it at |A|c, so also ρ ≤ c. A = 0: no gradient.
    """
    hi = 1.0 + (clip_low if clip_high is None else clip_high)
    pos = (adv > 0) & (ratio <= hi)
    neg = (adv < 0) & (ratio >= 1.0 - clip_low)
    if dual_clip is not None:
        neg &= ratio <= dual_clip
    return pos | neg


def ppo_clip_weights(p_old: np.ndarray, adv: np.ndarray, ratio: np.ndarray, mask: np.ndarray, **clip
                     ) -> np.ndarray:
    """(N, L) E-weights of the clipped-surrogate gradient for a per-response advantage (G = 1, one
    prompt draw per batch, so the aggregation weight is 1): ĝ = Σ_t A_t ρ_t 1[unclipped] ∇ℓ_t and
    W[n, t] = P_old(y_n)·A_nt·ρ_nt·1[unclipped]; responses are drawn from θ_old."""
    return p_old[:, None] * adv * ratio * clip_active(adv, ratio, **clip) * mask


def ppo_clip_weights_rloo2(p_old: np.ndarray, cond_old: np.ndarray, prompt: np.ndarray, rm: np.ndarray,
                           ratio: np.ndarray, mask: np.ndarray, **clip) -> np.ndarray:
    """(N, L) E-weights of the clipped RLOO gradient with G = 2 (A_i = R_i − R_j): each member has
    aggregation weight 1/2 and the same law, so E[ĝ] = Σ_y P_old(y) Σ_t E_{y'}[(R_y − R_y') ρ_t
    1[unclipped]] ∇ℓ_t, the partner y' ~ π_old(·|x) of the same prompt, summed by a loop."""
    W = np.zeros_like(ratio)
    for n in range(len(rm)):
        for m in np.nonzero(prompt == prompt[n])[0]:
            A = np.full(ratio.shape[1], rm[n] - rm[m])
            W[n] += p_old[n] * cond_old[m] * A * ratio[n] * clip_active(A, ratio[n], **clip)
    return W * mask


def clipped_mass_rloo2(p_old: np.ndarray, cond_old: np.ndarray, prompt: np.ndarray, rm: np.ndarray,
                       ratio: np.ndarray, mask: np.ndarray, **clip) -> float:
    """``clipped_mass`` for RLOO with G = 2: over the member y and its partner y' of the same prompt."""
    total = 0.0
    for n in range(len(rm)):
        for m in np.nonzero(prompt == prompt[n])[0]:
            A = np.full(ratio.shape[1], rm[n] - rm[m])
            off = ~clip_active(A, ratio[n], **clip) & (A != 0) & (mask[n] > 0)
            total += p_old[n] * cond_old[m] * float(off.sum())
    return total


def clipped_mass(p_old: np.ndarray, adv: np.ndarray, ratio: np.ndarray, mask: np.ndarray, **clip) -> float:
    """E Σ_t 1[token t is clipped, A_t ≠ 0]: how much of the law the clipping acts on (must be > 0
    for a check of clipping to be able to fail)."""
    off = (~clip_active(adv, ratio, **clip)) & (adv != 0) & (mask > 0)
    return float((p_old[:, None] * off).sum())


# ====================================================================================== GAE
def gae_closed_form(r: np.ndarray, values: np.ndarray, lengths: np.ndarray, gamma: float, lam: float
                    ) -> np.ndarray:
    """(N, L) Â_t = Σ_{j ≥ t} (γλ)^(j−t) δ_j, δ_j = r_j + γ V̂(s_j) − V̂(s_(j−1)), V̂ = 0 after the
    last token (PAPER §3.2, Schulman et al. 2016 Eq. 16) as an explicit sum, not a recursion.
    r, values (N, L): the token rewards and V̂ of the state before each token."""
    out = np.zeros_like(r)
    for n, T in enumerate(lengths):
        v_next = np.append(values[n, 1:T], 0.0)                                  # V̂(s_j), 0 at the end
        delta = r[n, :T] + gamma * v_next - values[n, :T]
        for t in range(T):
            out[n, t] = sum((gamma * lam) ** (j - t) * delta[j] for j in range(t, T))
    return out


# ====================================================================================== TRePO anchors
def trepo_anchor_formula(v: np.ndarray, lengths: np.ndarray, positions: list[int], variant: str) -> np.ndarray:
    """(N, L) TRePO's anchored advantages from prefix values v (N, L+1), v_t the value of the
    t-token prefix (v_T = RM), with fixed anchor positions ∪ {T} and the virtual anchor 0
    (PAPER §4, readings 3–5), one position at a time:

    - "interp": t_a = last anchor ≤ t, t_b = first anchor ≥ t, x = (t − t_a)/(t_b − t_a) (0 at an
      anchor), Â_t = (1 − x)·Â_(t_a) + x·Â_(t_b), Â_s = v_s − v_(s−1), Â_0 = 0;
    - "chunk": v_(t_j) − v_(t_(j−1)) for t ∈ (t_(j−1), t_j];
    - "value_interp": the chunk value divided by its length t_j − t_(j−1).
    """
    out = np.zeros((v.shape[0], v.shape[1] - 1))
    for n, T in enumerate(lengths):
        S = sorted({p for p in positions if p <= T} | {T})
        a_hat = lambda s: 0.0 if s == 0 else v[n, s] - v[n, s - 1]               # noqa: E731
        for t in range(1, T + 1):
            t_b = min(s for s in S if s >= t)
            if variant == "interp":
                t_a = max([0] + [s for s in S if s <= t])
                x = 0.0 if t_b == t_a else (t - t_a) / (t_b - t_a)
                out[n, t - 1] = (1 - x) * a_hat(t_a) + x * a_hat(t_b)
                continue
            t_prev = max([0] + [s for s in S if s < t])
            chunk = v[n, t_b] - v[n, t_prev]
            out[n, t - 1] = chunk if variant == "chunk" else chunk / (t_b - t_prev)
    return out
