"""The exact engine (float64): J(θ), ∇J(θ) and the value tables of a token MDP under a policy.

Everything is computed by enumerating every response with its probability (PAPER §7 setup):
- J = Σ_x ρ(x) Σ_y π(y|x) RM(x, y), and ∇J by autograd through that sum, for any policy;
- per prefix state s: reach probability ρ(s), U(s) = E[RM | s], V(s), Q(s, a), A = Q − V in the
  MDP's own token-reward decomposition (``tables(mdp.zra(), policy)`` gives the Zero-Reward one);
- the tabular closed form ∂J/∂θ[s, a] = ρ(s) π(a|s) (U(s⊕a) − U(s)) (PAPER §2).

``expected_score(policy, enum, W)`` is the one primitive every exact expectation reduces to:
∇_θ Σ_{n,t} W[n, t] log π(y_{n,t} | s_{n,t}) = E[Σ_t c_t ∇ℓ_t] when W[n, t] = P(y_n) E[c_t | y_n]
(DESIGN §2, linearity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tpg.mdp import TokenMDP, TPGError
from tpg.rollouts import Rollouts, check_budget, enumerate_responses, response_log_prob


def _params(policy) -> list[torch.Tensor]:
    ps = [p for p in policy.parameters() if p.requires_grad]
    if not ps:
        raise TPGError(f"{type(policy).__name__} has no parameters that require grad")
    return ps


def flat(grads, params) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def check_compatible(mdp: TokenMDP, policy) -> None:
    pm = policy.mdp
    if (pm.prompts, pm.vocab_size, pm.horizon, pm.eos) != (mdp.prompts, mdp.vocab_size, mdp.horizon, mdp.eos):
        raise TPGError("the policy was built for a different MDP structure (prompts, vocab, horizon or EOS differ)")


def prompt_weights(mdp: TokenMDP, enum: Rollouts) -> torch.Tensor:
    """(N,) ρ(x_n) of each enumerated response."""
    return torch.as_tensor(mdp.prompt_probs)[enum.prompt_idx]


def objective(mdp: TokenMDP, policy, enum: Rollouts | None = None) -> torch.Tensor:
    """J(θ) = Σ_x ρ(x) Σ_y π(y|x) RM(x, y), a scalar with autograd to θ."""
    check_compatible(mdp, policy)
    enum = enumerate_responses(mdp) if enum is None else enum
    return (prompt_weights(mdp, enum) * response_log_prob(policy, enum).exp() * enum.rm).sum()


def gradient(mdp: TokenMDP, policy, enum: Rollouts | None = None) -> torch.Tensor:
    """∇J(θ) as one flat vector over ``policy.parameters()`` (autograd through the enumeration)."""
    params = _params(policy)
    return flat(torch.autograd.grad(objective(mdp, policy, enum), params, allow_unused=True), params)


def expected_score(policy, enum: Rollouts, W: torch.Tensor) -> torch.Tensor:
    """∇_θ Σ_{n,t} W[n,t] log π(y_{n,t}|s_{n,t}): flat vector. W (N, L) is detached weights."""
    params = _params(policy)
    logp = policy.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask   # (N, L)
    return flat(torch.autograd.grad((W.detach() * logp).sum(), params, allow_unused=True), params)


@dataclass
class Tables:
    """Exact per-state tables of an MDP under a policy (index = TokenMDP state index).

    pi (S, V) next-token probabilities; r (S, V) token rewards of this decomposition; U (S,)
    E[RM | s]; Uc (S, V) U(s⊕a) (RM of the response for terminal pairs); V (S,), Q (S, V),
    A (S, V) = Q − V; visit (S,) reach probability ρ(s) (prompt probability included); prob (N,)
    P(x, y) = ρ(x) π(y|x) of every enumerated response; J_prompt (P,).
    """
    mdp: TokenMDP
    enum: Rollouts
    pi: torch.Tensor
    r: torch.Tensor
    U: torch.Tensor
    Uc: torch.Tensor
    V: torch.Tensor
    Q: torch.Tensor
    A: torch.Tensor
    visit: torch.Tensor
    prob: torch.Tensor
    J: float
    J_prompt: torch.Tensor

    def closed_form(self) -> torch.Tensor:
        """(S, V) ∂J/∂θ[s, a] = ρ(s) π(a|s) (U(s⊕a) − U(s)) for the tabular softmax (PAPER §2)."""
        return self.visit[:, None] * self.pi * (self.Uc - self.U[:, None])

    def along(self, table: torch.Tensor, ro: Rollouts | None = None) -> torch.Tensor:
        """Read a per-state (S,) or per-(state, token) (S, V) table along responses: (B, L)."""
        ro = self.enum if ro is None else ro
        s = self.mdp.state_index(ro.prompt_idx, ro.tokens, ro.mask)              # (B, L)
        vals = table[s] if table.dim() == 1 else table[s, ro.tokens]
        return vals * ro.mask

    def prefix_values(self, ro: Rollouts) -> torch.Tensor:
        """(B, L+1) U(y_<=t) for t = 0..L along each response; RM(y) at and after its end."""
        B, L = ro.tokens.shape
        out = torch.empty(B, L + 1, dtype=torch.float64)
        out[:, :L] = self.along(self.U, ro)                                       # U of state before token t
        out[:, L] = ro.rm
        t = torch.arange(L + 1)[None, :]
        return torch.where(t >= ro.lengths[:, None], ro.rm[:, None], out)


def state_log_probs(mdp: TokenMDP, policy) -> torch.Tensor:
    """(S, V) log π(·|s) for every prefix state, with autograd to θ (any policy: one call per level)."""
    st = mdp.state_table()
    A = mdp.arity
    level, code, prompt = (torch.as_tensor(st[k]) for k in ("level", "code", "prompt"))
    parts, order = [], []
    for lvl in range(mdp.horizon):
        idx = torch.nonzero(level == lvl)[:, 0]
        digits = (code[idx, None] // A ** torch.arange(lvl - 1, -1, -1)) % A        # (n, lvl), MSB first
        toks = digits + (digits >= mdp.eos).long() if mdp.eos is not None else digits
        toks = torch.cat([toks, torch.zeros(len(idx), 1, dtype=torch.long)], 1)       # (n, lvl+1), last is a dummy
        parts.append(policy.log_probs(prompt[idx], toks)[:, lvl])                    # (n, V)
        order.append(idx)
    return torch.cat(parts)[torch.argsort(torch.cat(order))]                          # (S, V)


def tables(mdp: TokenMDP, policy, enum: Rollouts | None = None) -> Tables:
    """All exact tables (detached, float64) of ``mdp`` under ``policy``."""
    check_compatible(mdp, policy)
    enum = enumerate_responses(mdp) if enum is None else enum
    st = mdp.state_table()
    S, V, H, g = mdp.num_states, mdp.vocab_size, mdp.horizon, mdp.gamma
    with torch.no_grad():
        pi = state_log_probs(mdp, policy).exp().to(torch.float64)               # (S, V)
        # Token rewards and terminal RM per (state, token), read off the enumeration: each pair
        # occurs in some response and its reward depends on the pair only.
        s_idx = mdp.state_index(enum.prompt_idx, enum.tokens, enum.mask)          # (N, L)
        m = enum.mask.bool()
        r = torch.zeros(S, V, dtype=torch.float64)
        r[s_idx[m], enum.tokens[m]] = enum.token_rewards[m]
        last = enum.lengths - 1
        rows = torch.arange(enum.batch_size)
        rm_term = torch.zeros(S, V, dtype=torch.float64)
        rm_term[s_idx[rows, last], enum.tokens[rows, last]] = enum.rm
        child = torch.as_tensor(st["child"])                                      # (S, V)
        level = torch.as_tensor(st["level"])
        Vt = torch.zeros(S, dtype=torch.float64)
        U = torch.zeros(S, dtype=torch.float64)
        Q = torch.zeros(S, V, dtype=torch.float64)
        Uc = torch.zeros(S, V, dtype=torch.float64)
        for lvl in reversed(range(H)):                                           # backward over the tree
            idx = torch.nonzero(level == lvl)[:, 0]
            ch = child[idx]                                                      # (n, V)
            term = ch < 0
            chc = ch.clamp(min=0)
            Q[idx] = r[idx] + g * torch.where(term, 0.0, Vt[chc])
            Uc[idx] = torch.where(term, rm_term[idx], U[chc])
            Vt[idx] = (pi[idx] * Q[idx]).sum(1)
            U[idx] = (pi[idx] * Uc[idx]).sum(1)
        visit = torch.zeros(S, dtype=torch.float64)
        roots = torch.nonzero(level == 0)[:, 0]
        visit[roots] = torch.as_tensor(mdp.prompt_probs)[torch.as_tensor(st["prompt"])[roots]]
        for lvl in range(H - 1):                                                 # forward over the tree
            idx = torch.nonzero(level == lvl)[:, 0]
            ch = child[idx]
            ok = ch >= 0
            visit[ch[ok]] = (visit[idx][:, None] * pi[idx])[ok]
        logp = response_log_prob(policy, enum).to(torch.float64)
        prob = prompt_weights(mdp, enum) * logp.exp()
        J_prompt = torch.zeros(len(mdp.prompts), dtype=torch.float64).index_add(0, enum.prompt_idx,
                                                                                logp.exp() * enum.rm)
    return Tables(mdp, enum, pi, r, U, Uc, Vt, Q, Q - Vt[:, None], visit, prob, float((prob * enum.rm).sum()),
                  J_prompt)


# ====================================================================================== moments
def multisets(n: int, k: int) -> np.ndarray:
    """All non-decreasing k-tuples over range(n): (C(n+k-1, k), k), vectorised."""
    rows = np.arange(n)[:, None]
    for _ in range(k - 1):
        last = rows[:, -1]
        reps = n - last                                                  # each row extends with last..n-1
        rep_rows = np.repeat(rows, reps, axis=0)
        starts = np.repeat(last - np.cumsum(np.concatenate([[0], reps[:-1]])), reps)
        ext = np.arange(len(rep_rows)) + starts                         # = last_i + offset within block
        rows = np.concatenate([rep_rows, ext[:, None]], 1)
    return rows


def multinomial_coef(rows: np.ndarray) -> np.ndarray:
    """G!/∏ m_j! for sorted rows (the number of orderings of each multiset)."""
    G = rows.shape[1]
    k = np.ones(len(rows))
    run = np.ones(len(rows))
    for i in range(1, G):
        run = np.where(rows[:, i] == rows[:, i - 1], run + 1, 1)
        k *= run
    return math.factorial(G) / k


def batch_outcomes(tab: Tables, G: int, n_prompts: int = 1, route: str = "multiset", budget: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every possible batch of ``n_prompts`` prompt draws (i.i.d. from ρ) × G responses each.

    route="multiset": each group is an unordered multiset of responses with its multinomial
    probability (estimators are symmetric within a group); route="joint": ordered G-tuples (the
    cross-check). Returns response ids (n_out, n_prompts·G) and probabilities (n_out,).
    """
    if not isinstance(G, int) or G < 1:
        raise TPGError(f"group size G must be an int ≥ 1, got {G!r}")
    if route not in ("multiset", "joint"):
        raise TPGError(f"route must be 'multiset' or 'joint', got {route!r}")
    mdp, enum = tab.mdp, tab.enum
    rho = torch.as_tensor(mdp.prompt_probs)
    sizes = torch.bincount(enum.prompt_idx, minlength=len(mdp.prompts)).tolist()
    n_groups = sum(math.comb(n + G - 1, G) if route == "multiset" else n**G for n in sizes)
    check_budget(n_groups**n_prompts * n_prompts * G, budget, f"{n_prompts} prompt(s) × G={G} batches ({route})")
    cond = (tab.prob / rho[enum.prompt_idx]).numpy()                     # π(y|x)
    ids, probs, off = [], [], 0
    for x, n in enumerate(sizes):
        if route == "multiset":
            local = multisets(n, G)
            coef = multinomial_coef(local)
        else:
            local = np.stack(np.meshgrid(*[np.arange(n)] * G, indexing="ij"), -1).reshape(-1, G)
            coef = np.ones(len(local))
        ids.append(local + off)
        probs.append(float(rho[x]) * coef * cond[local + off].prod(1))
        off += n
    ids, probs = torch.as_tensor(np.concatenate(ids)), torch.as_tensor(np.concatenate(probs))
    keep = probs > 0
    ids, probs = ids[keep], probs[keep]
    if n_prompts > 1:                                                   # ordered slots, independent draws
        grid = torch.cartesian_prod(*[torch.arange(len(ids))] * n_prompts).reshape(-1, n_prompts)
        return ids[grid].reshape(len(grid), -1), probs[grid].prod(1)
    return ids, probs


@dataclass
class Moments:
    """Exact first (and second) moments of an estimator ĝ over every possible batch."""
    mean: torch.Tensor                # (D,) E[ĝ]
    W: torch.Tensor                   # (N, L) E-weights: E[ĝ] = ∇ Σ W·ℓ (P(y)·E[c_t | y], summed over members)
    n_outcomes: int
    cov_trace: float | None = None    # E‖ĝ − E ĝ‖²
    cov: torch.Tensor | None = None   # (D, D) where requested and small
    notes: tuple = ()


def token_scores(policy, enum: Rollouts, budget: int = 50_000_000) -> torch.Tensor:
    """(N, L, D) per-token score vectors ∇_θ log π(y_t|s_t) (zero after the end): one batched
    backward (vmap over one-hot output directions)."""
    ps = _params(policy)
    D = sum(p.numel() for p in ps)
    check_budget(enum.tokens.numel() * D, budget, f"per-token score Jacobian ({enum.tokens.numel()} tokens × {D} params)")
    lp = (policy.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).reshape(-1)   # (N·L,)
    eye = torch.eye(lp.numel(), dtype=lp.dtype)
    grads = torch.autograd.grad(lp, ps, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
    out = torch.cat([(torch.zeros(lp.numel(), p.numel(), dtype=lp.dtype) if g is None else g.reshape(lp.numel(), -1))
                     for g, p in zip(grads, ps)], 1)                                        # (N·L, D)
    return out.reshape(*enum.tokens.shape, D)


def moments(est, mdp: TokenMDP, policy, G: int = 1, *, n_prompts: int = 1, route: str = "multiset",
            old_policy=None, critic=None, ref=None, cov: str | None = None, budget: int | None = None,
            chunk_rows: int = 200_000) -> Moments:
    """Exact E[ĝ] (and Cov[ĝ] on request: cov="trace" or "full") of an estimator.

    ``est`` is any callable ``est(rollouts) -> EstimatorOutput | loss`` (an ``Estimator`` or a user
    function); its optional ``needs``/``multilinear`` attributes say which extra draws it reads.
    Batches are drawn from ``old_policy`` (default: ``policy``) and scored under ``policy``, so
    θ ≠ θ_old (PPO after an update) is covered. By linearity (DESIGN §2) the estimator is evaluated
    once per distinct batch, its coefficients c = −∂loss/∂logp are averaged per response into W, and
    E[ĝ] = ∇_θ Σ W·ℓ is one backward pass through the enumeration.
    """
    from tpg.draws import ExactDraws
    from tpg.estimators.core import coefficients
    behaviour = policy if old_policy is None else old_policy
    tab = tables(mdp, behaviour)
    enum = tab.enum
    ids, probs = batch_outcomes(tab, G, n_prompts, route, budget)
    n_out, width = ids.shape
    needs = dict(getattr(est, "needs", {}) or {})
    draws = ExactDraws(tab, policy, critic=critic, ref=ref)
    with torch.no_grad():
        logp_new = (policy.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).to(torch.float64)
        logp_old = (behaviour.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).to(torch.float64)
    N, L = enum.tokens.shape
    W = torch.zeros(N, L, dtype=torch.float64)
    want_cov = cov is not None
    scores = token_scores(policy, enum) if want_cov else None                      # (N, L, D)
    sq, notes = 0.0, []
    second = None
    per_chunk = max(1, chunk_rows // width)
    for lo in range(0, n_out, per_chunk):
        sub_ids, sub_p = ids[lo: lo + per_chunk], probs[lo: lo + per_chunk]
        b = len(sub_ids)
        rows = sub_ids.reshape(-1)                                                   # (b·width,)
        slot = torch.arange(width) // G
        ro = enum.select(rows)
        ro.group = (torch.arange(b)[:, None] * n_prompts + slot[None, :]).reshape(-1)
        ro.batch = torch.arange(b).repeat_interleave(width)
        ro.n_batches = b
        ro.logp, ro.logp_old, ro.response_id = logp_new[rows], logp_old[rows], rows
        ro.extras = {"_row_prob": sub_p.repeat_interleave(width)}
        ro, w = draws.fill(ro, needs, multilinear=bool(getattr(est, "multilinear", True)))
        c = coefficients(est, ro)                                                    # (rows, L)
        pw = ro.extras["_row_prob"] * w                                              # (rows,)
        W.index_add_(0, ro.response_id, pw[:, None] * c)
        if want_cov:
            g = torch.einsum("rl,rld->rd", c, scores[ro.response_id])                # (rows, D)
            g_b = torch.zeros(ro.n_batches, g.shape[1], dtype=g.dtype).index_add(0, ro.batch, g)
            p_b = torch.zeros(ro.n_batches, dtype=g.dtype).index_add(0, ro.batch, pw) / \
                torch.zeros(ro.n_batches, dtype=g.dtype).index_add(0, ro.batch, torch.ones_like(pw))
            sq += float((p_b * (g_b**2).sum(1)).sum())
            if cov == "full":
                m2 = (g_b * p_b[:, None]).T @ g_b
                second = m2 if second is None else second + m2
    mean = expected_score(policy, enum, W)
    out = Moments(mean, W, n_out)
    if needs.get("continuations"):
        notes.append("continuation returns substituted by their exact expectation (exact for the mean only)")
    if want_cov and not needs.get("continuations"):
        out.cov_trace = sq - float(mean @ mean)
        if cov == "full":
            out.cov = second - torch.outer(mean, mean)
    out.notes = tuple(notes)
    return out
