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
from tpg.rollouts import Rollouts, check_budget, enumerate_responses


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
    logp = _response_log_prob(mdp, policy, enum).to(torch.float64)                # (N,) log π(y|x)
    return torch.dot(prompt_weights(mdp, enum) * enum.rm, logp.exp())


def _response_log_prob(mdp: TokenMDP, policy, enum: Rollouts) -> torch.Tensor:
    """(N,) log π(y|x) = Σ_t log π(y_t|s_t) with autograd to θ (without EOS every response has
    length H, so the mask pass is skipped)."""
    lp = policy.token_log_probs(enum.prompt_idx, enum.tokens)                  # (N, L)
    fixed_length = mdp.eos is None and enum.tokens.shape[1] == mdp.horizon
    return lp.sum(1) if fixed_length else (lp * enum.mask).sum(1)


def gradient(mdp: TokenMDP, policy, enum: Rollouts | None = None) -> torch.Tensor:
    """∇J(θ) as one flat vector over ``policy.parameters()`` (autograd through the enumeration)."""
    params = _params(policy)
    return flat(torch.autograd.grad(objective(mdp, policy, enum), params, allow_unused=True), params)


def expected_score(policy, enum: Rollouts, W: torch.Tensor, lp: torch.Tensor | None = None) -> torch.Tensor:
    """∇_θ Σ_{n,t} W[n,t] log π(y_{n,t}|s_{n,t}): flat vector. W (N, L) is detached weights.
    ``lp``: the policy's (N, L) token log-probs with their autograd graph, if already computed."""
    params = _params(policy)
    if lp is None:
        lp = policy.token_log_probs(enum.prompt_idx, enum.tokens)             # (N, L)
    Wm = (W.detach().to(torch.float64) * enum.mask).reshape(-1)               # (N·L,) zero after the end
    total = torch.dot(Wm, lp.reshape(-1).to(torch.float64))                   # Σ W·ℓ without an (N, L) product
    return flat(torch.autograd.grad(total, params, allow_unused=True), params)


@dataclass
class ResponseProbs:
    """The part of ``Tables`` that batch enumeration needs: every response and its P(x, y)."""
    mdp: TokenMDP
    enum: Rollouts
    prob: torch.Tensor


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
    """(S, V) log π(·|s) for every prefix state of ``mdp``, with autograd to θ (``Policy.state_log_probs``)."""
    check_compatible(mdp, policy)
    return policy.state_log_probs()


def _pair_index(mdp: TokenMDP, enum: Rollouts, full: bool = False) -> torch.Tensor:
    """(N, L) row of (s_t, y_t) in a flattened (S·V + 1,) table; S·V (a spare slot) after the end.
    ``full``: every position is inside its response (fixed length), so there is nothing to redirect."""
    flat = mdp.state_index(enum.prompt_idx, enum.tokens)                             # (N, L) fresh
    torch.add(enum.tokens, flat, alpha=mdp.vocab_size, out=flat)                     # s·V + y
    return flat if full else flat.masked_fill_(enum.mask == 0, mdp.num_states * mdp.vocab_size)


def _per_pair(flat: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """Scatter per-token values (N, L) to a per-(state, token) table (size,): every pair's value is
    the same in every response through it (rewards depend on the pair only), so duplicates agree."""
    out = torch.zeros(size + 1, dtype=torch.float64)
    out.index_put_((flat.reshape(-1),), values.reshape(-1).to(torch.float64))
    return out[:size]


def tables(mdp: TokenMDP, policy, enum: Rollouts | None = None) -> Tables:
    """All exact tables (detached, float64) of ``mdp`` under ``policy``.

    Rewards per (state, token) are read off the enumeration; U, V, Q then follow by one backward
    sweep over the levels of the tree and ρ(s) by one forward sweep. Within a prompt's block the
    non-EOS children of level t's states are level t+1's states in order (mdp.py's index), so each
    sweep step is a reshape of a contiguous slice: O(S·V) work, no gathers.
    """
    check_compatible(mdp, policy)
    enum = enumerate_responses(mdp) if enum is None else enum
    S, V, H, g = mdp.num_states, mdp.vocab_size, mdp.horizon, mdp.gamma
    P, Sp, A, eos = len(mdp.prompts), mdp.states_per_prompt, mdp.arity, mdp.eos
    start = mdp.level_start()
    with torch.no_grad():
        log_pi = state_log_probs(mdp, policy).detach().to(torch.float64)             # (S, V)
        pi = log_pi.exp()
        flat = _pair_index(mdp, enum)                                                # (N, L)
        r = _per_pair(flat, enum.token_rewards, S * V).view(S, V)                   # this decomposition's r(s, a)
        last = flat.gather(1, (enum.lengths - 1).clamp(min=0)[:, None])             # (N, 1) the pair (s_T, y_T)
        rm_term = _per_pair(last, enum.rm[:, None], S * V).view(S, V)               # RM at terminal pairs
        # Per-prompt views (P, Sp, V); `kids` picks the non-EOS token columns in digit order.
        pi3, r3, rm3 = pi.view(P, Sp, V), r.view(P, Sp, V), rm_term.view(P, Sp, V)
        kids = slice(0, A) if eos is None or eos == V - 1 else torch.tensor([a for a in range(V) if a != eos])
        U, Vt = torch.zeros(P, Sp, dtype=torch.float64), torch.zeros(P, Sp, dtype=torch.float64)
        Q, Uc = rm3.new_empty(P, Sp, V), rm3.new_empty(P, Sp, V)
        for t in reversed(range(H)):                                                 # backward over the tree
            lv = slice(int(start[t]), int(start[t + 1]))                             # level t: A^t states
            Q[:, lv], Uc[:, lv] = r3[:, lv], rm3[:, lv]                              # terminal pairs
            if t < H - 1:                                                            # non-EOS children are states
                nxt = slice(int(start[t + 1]), int(start[t + 2]))
                q, uc = Q[:, lv], Uc[:, lv]                                          # (P, A^t, V) views
                q[..., kids] = r3[:, lv][..., kids] + g * Vt[:, nxt].reshape(P, -1, A)
                uc[..., kids] = U[:, nxt].reshape(P, -1, A)
            Vt[:, lv] = (pi3[:, lv] * Q[:, lv]).sum(-1)
            U[:, lv] = (pi3[:, lv] * Uc[:, lv]).sum(-1)
        visit = torch.zeros(P, Sp, dtype=torch.float64)
        visit[:, 0] = torch.as_tensor(mdp.prompt_probs)                              # roots: ρ(x)
        for t in range(H - 1):                                                       # forward over the tree
            lv, nxt = slice(int(start[t]), int(start[t + 1])), slice(int(start[t + 1]), int(start[t + 2]))
            visit[:, nxt] = (visit[:, lv, None] * pi3[:, lv][..., kids]).reshape(P, -1)
        # log π(y|x) from the same per-state table (a spare 0 entry after the end).
        logp = torch.cat([log_pi.reshape(-1), log_pi.new_zeros(1)])[flat].sum(1)     # (N,)
        cond = logp.exp()                                                            # π(y|x)
        prob = prompt_weights(mdp, enum) * cond
        J_prompt = torch.zeros(P, dtype=torch.float64).index_add(0, enum.prompt_idx, cond * enum.rm)
        Q, Uc, U, Vt, visit = Q.view(S, V), Uc.view(S, V), U.view(S), Vt.view(S), visit.view(S)
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
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise TPGError(f"n_prompts (prompt draws per batch) must be an int ≥ 1, got {n_prompts!r}")
    if route not in ("multiset", "joint"):
        raise TPGError(f"route must be 'multiset' or 'joint', got {route!r}")
    mdp, enum = tab.mdp, tab.enum
    rho = torch.as_tensor(mdp.prompt_probs)
    sizes = torch.bincount(enum.prompt_idx, minlength=len(mdp.prompts)).tolist()
    n_groups = sum(math.comb(n + G - 1, G) if route == "multiset" else n**G for n in sizes)
    check_budget(n_groups**n_prompts * n_prompts * G, budget, f"{n_prompts} prompt(s) × G={G} batches ({route})",
                 "response slots")
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


def token_scores(policy, enum: Rollouts, budget: int = 50_000_000, chunk: int = 2048) -> torch.Tensor:
    """(N, L, D) per-token score vectors ∇_θ log π(y_t|s_t) (zero after the end): batched backward
    passes (vmap over one-hot output directions), ``chunk`` outputs at a time so the one-hot block
    (chunk, N·L) stays small. Refused before allocating when N·L·D exceeds ``budget``."""
    ps = _params(policy)
    D = sum(p.numel() for p in ps)
    check_budget(enum.tokens.numel() * D, budget, f"per-token score Jacobian ({enum.tokens.numel()} tokens × {D} params)",
                 "entries")
    lp = (policy.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).reshape(-1)   # (N·L,)
    n = lp.numel()
    chunk = max(1, min(chunk, 4_194_304 // max(n, 1)))                                     # one-hot block ≤ 32 MiB
    out = torch.zeros(n, D, dtype=torch.float64)                                            # (N·L, D)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        onehot = torch.zeros(hi - lo, n, dtype=lp.dtype)
        onehot[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0                           # (b, N·L)
        grads = torch.autograd.grad(lp, ps, grad_outputs=onehot, is_grads_batched=True, allow_unused=True,
                                    retain_graph=hi < n)
        out[lo:hi] = torch.cat([(torch.zeros(hi - lo, p.numel(), dtype=lp.dtype) if g is None
                                 else g.reshape(hi - lo, -1)) for g, p in zip(grads, ps)], 1)
    return out.reshape(*enum.tokens.shape, D)


def directional_scores(policy, ro: Rollouts, directions: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(B, L, K) ⟨u_k, ∇_θ log π(y_t|s_t)⟩ without forming the (tokens, D) Jacobian: double backward.

    g(v) = ∇_θ Σ v·ℓ is linear in the weights v (B, L), so ∂⟨g(v), u_k⟩/∂v = J u_k: one backward
    with a graph, then one per direction, ``chunk`` rows at a time. Plain reverse mode works for every
    policy, including the tabular one whose state index is computed in numpy (``torch.func``'s
    forward mode cannot trace through numpy).
    """
    ps = _params(policy)
    sizes = [p.numel() for p in ps]
    u = torch.as_tensor(directions, dtype=torch.float64)
    B, L = ro.tokens.shape
    out = torch.zeros(B, L, u.shape[0], dtype=torch.float64)
    for lo in range(0, B, chunk):
        sl = slice(lo, min(B, lo + chunk))
        lp = policy.token_log_probs(ro.prompt_idx[sl], ro.tokens[sl]) * ro.mask[sl]         # (b, L)
        v = torch.zeros_like(lp, requires_grad=True)
        gs = torch.autograd.grad(lp, ps, grad_outputs=v, create_graph=True, allow_unused=True)
        for k, uk in enumerate(u):
            parts = torch.split(uk, sizes)
            dot = sum((g * part.reshape(p.shape).to(g.dtype)).sum() for g, part, p in zip(gs, parts, ps)
                      if g is not None)
            if torch.is_tensor(dot) and dot.requires_grad:
                out[sl, :, k] = torch.autograd.grad(dot, v, retain_graph=k + 1 < len(u))[0].to(torch.float64)
    return out * ro.mask[:, :, None]


def projected_scores(policy, ro: Rollouts, directions: torch.Tensor, budget: int = 50_000_000) -> torch.Tensor:
    """(B, L, K) ⟨u_k, ∇_θ log π(y_t|s_t)⟩ for every row of ``ro`` and direction u_k (K, D).

    Distinct (prompt, response) rows are scored once (a sampled batch from a small MDP repeats a
    few responses many times). Up to ``budget`` token × parameter entries the per-token scores are
    formed (``token_scores``) and projected; above it ``directional_scores`` avoids the Jacobian.
    """
    u = torch.as_tensor(directions, dtype=torch.float64)
    D = sum(p.numel() for p in _params(policy))
    if u.dim() != 2 or u.shape[1] != D:
        raise TPGError(f"directions must have shape (K, D) with D = {D} parameters, got {tuple(u.shape)}")
    key = torch.cat([ro.prompt_idx[:, None], ro.tokens * ro.mask.long()], 1)              # (B, 1 + L)
    uniq, inv = torch.unique(key, dim=0, return_inverse=True)
    first = torch.zeros(len(uniq), dtype=torch.long).scatter_(0, inv, torch.arange(len(inv)))
    sub = ro.select(first)                                                                 # one row per response
    if sub.tokens.numel() * D <= budget:
        s = token_scores(policy, sub, budget) @ u.T                                        # (U, L, K)
    else:
        s = directional_scores(policy, sub, u)                                             # (U, L, K)
    return s[inv]


def moments(est, mdp: TokenMDP, policy, G: int = 1, *, n_prompts: int = 1, route: str = "multiset",
            old_policy=None, critic=None, ref=None, cov: str | None = None, budget: int | None = None,
            chunk_rows: int = 200_000, directions: torch.Tensor | None = None) -> Moments:
    """Exact E[ĝ] (and Cov[ĝ] on request: cov="trace" or "full") of an estimator.

    ``est`` is any callable ``est(rollouts) -> EstimatorOutput | loss`` (an ``Estimator`` or a user
    function); its optional ``needs``/``multilinear`` attributes say which extra draws it reads.
    Batches are drawn from ``old_policy`` (default: ``policy``) and scored under ``policy``, so
    θ ≠ θ_old (PPO after an update) is covered. By linearity (DESIGN §2) the estimator is evaluated
    once per distinct batch, its coefficients c = −∂loss/∂logp are averaged per response into W, and
    E[ĝ] = ∇_θ Σ W·ℓ is one backward pass through the enumeration.

    Second moments need each batch's ĝ = Σ c ∇ℓ, from the per-token scores (N, L, D). With
    ``directions`` (K, D) only the projections ⟨u_k, ĝ⟩ are formed (``projected_scores``), and
    ``cov``/``cov_trace`` are those of the K projections: the
    exact variances a designed Monte Carlo test needs (``tpg.verify.mc_check``) for any D.
    Estimators that read continuation returns get no covariance (their substitution by U is exact
    for the mean only); a note says so.
    """
    if cov not in (None, "trace", "full"):
        raise TPGError(f"cov must be None, 'trace' or 'full', got {cov!r}")
    from tpg.draws import ExactDraws
    from tpg.estimators.core import coefficients
    behaviour = policy if old_policy is None else old_policy
    needs = dict(getattr(est, "needs", {}) or {})
    check_compatible(mdp, policy)
    enum = enumerate_responses(mdp, budget)
    # One forward pass of θ with its graph: its values are the batches' log-probs, and the final
    # backward of Σ W·ℓ reuses it (so E[ĝ] costs about one forward + backward of the policy).
    lp_graph = policy.token_log_probs(enum.prompt_idx, enum.tokens)                    # (N, L)
    logp_new = (lp_graph.detach() * enum.mask).to(torch.float64)
    if old_policy is None:
        logp_old = logp_new
    else:
        check_compatible(mdp, old_policy)
        with torch.no_grad():
            logp_old = (old_policy.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).to(torch.float64)
    # Full tables (U for the continuation returns) only when the estimator reads continuations.
    tab = tables(mdp, behaviour, enum) if needs.get("continuations") else \
        ResponseProbs(mdp, enum, prompt_weights(mdp, enum) * logp_old.sum(1).exp())
    ids, probs = batch_outcomes(tab, G, n_prompts, route, budget)
    n_out, width = ids.shape
    draws = ExactDraws(tab, policy, critic=critic, ref=ref)
    N, L = enum.tokens.shape
    W = torch.zeros(N, L, dtype=torch.float64)
    want_cov = cov is not None and not needs.get("continuations")
    scores = None
    if want_cov and directions is not None:
        u = torch.as_tensor(directions, dtype=torch.float64)
        scores = projected_scores(policy, enum, u)                                   # (N, L, K)
    elif want_cov:
        scores = token_scores(policy, enum)                                          # (N, L, D)
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
            g = torch.einsum("rl,rld->rd", c, scores[ro.response_id])                # (rows, D or K)
            g_b = torch.zeros(ro.n_batches, g.shape[1], dtype=g.dtype).index_add(0, ro.batch, g)
            p_b = torch.zeros(ro.n_batches, dtype=g.dtype).index_add(0, ro.batch, pw) / \
                torch.zeros(ro.n_batches, dtype=g.dtype).index_add(0, ro.batch, torch.ones_like(pw))
            sq += float((p_b * (g_b**2).sum(1)).sum())
            if cov == "full":
                m2 = (g_b * p_b[:, None]).T @ g_b
                second = m2 if second is None else second + m2
    mean = expected_score(policy, enum, W, lp_graph)
    out = Moments(mean, W, n_out)
    if needs.get("continuations"):
        notes.append("continuation returns substituted by their exact expectation (exact for the mean only)")
        if cov is not None:
            notes.append("no covariance: it would need the continuations' own randomness (use Monte Carlo)")
    if want_cov:
        m = mean if directions is None else u @ mean                                # (D,) or (K,)
        out.cov_trace = sq - float(m @ m)
        if cov == "full":
            out.cov = second - torch.outer(m, m)
    out.notes = tuple(notes)
    return out
