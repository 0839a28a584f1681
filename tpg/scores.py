"""Score vectors ∇_θ log π(y_t | s_t) and their projections: the one place tpg differentiates a policy
per token.

Every exact or sampled statement about an estimator reduces to ĝ = Σ_{i,t} c[i,t] ∇ℓ_{i,t}
(DESIGN §2), so the pieces are: the policy's trainable parameters as one flat vector (``params``,
``flat``); the per-token Jacobian (``token_scores``, for second moments over small D); projections
⟨u_k, ∇ℓ_{i,t}⟩ on fixed directions without the Jacobian (``projected_scores``, for any D); and
per-batch projected estimates z[b, k] = ⟨u_k, ĝ_b⟩ (``tpg.batches.projected_estimates``). Shapes are
(B, L, ·) for per-token quantities, so the exact engine, the Monte Carlo checks and GPT-2 share them.
"""
from __future__ import annotations

import torch

from tpg.mdp import TPGError
from tpg.rollouts import Rollouts, check_budget


def params(policy) -> list[torch.Tensor]:
    """The policy's trainable parameters, in ``policy.parameters()`` order (the flat-vector order)."""
    ps = [p for p in policy.parameters() if p.requires_grad]
    if not ps:
        raise TPGError(f"{type(policy).__name__} has no parameters that require grad")
    return ps


def n_params(policy) -> int:
    return sum(p.numel() for p in params(policy))


def flat(grads, ps) -> torch.Tensor:
    """(D,) one flat vector from per-parameter gradients (None → zeros); a single parameter's is a view."""
    parts = [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, ps)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def grad(value: torch.Tensor, policy) -> torch.Tensor:
    """(D,) ∇_θ value, flat."""
    ps = params(policy)
    return flat(torch.autograd.grad(value, ps, allow_unused=True), ps)


def random_directions(policy, K: int, generator: torch.Generator, orthogonal_to: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """(K, D) seeded random unit directions in parameter space; with ``orthogonal_to`` (D,), each is
    projected off that vector first, so it sees only the part of a bias orthogonal to it."""
    D = n_params(policy)
    u = torch.randn(K, D, generator=generator, dtype=torch.float64)                      # (K, D)
    if orthogonal_to is not None and float(orthogonal_to.norm()) > 0:
        e = (orthogonal_to / orthogonal_to.norm()).to(torch.float64)                      # (D,)
        u = u - (u @ e)[:, None] * e[None, :]
    return u / u.norm(dim=1, keepdim=True).clamp(min=1e-300)


def token_scores(policy, ro: Rollouts, budget: int = 50_000_000, chunk: int = 2048) -> torch.Tensor:
    """(B, L, D) per-token score vectors ∇_θ log π(y_t|s_t) (zero after the end): batched backward
    passes (vmap over one-hot output directions), ``chunk`` outputs at a time so the one-hot block
    (chunk, B·L) stays small. Refused before allocating when B·L·D exceeds ``budget``."""
    ps = params(policy)
    D = sum(p.numel() for p in ps)
    check_budget(ro.tokens.numel() * D, budget, f"per-token score Jacobian ({ro.tokens.numel()} tokens × {D} params)",
                 "entries")
    lp = (policy.token_log_probs(ro.prompt_idx, ro.tokens) * ro.mask).reshape(-1)        # (B·L,)
    n = lp.numel()
    chunk = max(1, min(chunk, 4_194_304 // max(n, 1)))                                   # one-hot block ≤ 32 MiB
    out = torch.zeros(n, D, dtype=torch.float64)                                          # (B·L, D)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        onehot = torch.zeros(hi - lo, n, dtype=lp.dtype)
        onehot[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0                         # (b, B·L)
        gs = torch.autograd.grad(lp, ps, grad_outputs=onehot, is_grads_batched=True, allow_unused=True,
                                 retain_graph=hi < n)
        out[lo:hi] = torch.cat([(torch.zeros(hi - lo, p.numel(), dtype=lp.dtype) if g is None
                                 else g.reshape(hi - lo, -1)) for g, p in zip(gs, ps)], 1)
    return out.reshape(*ro.tokens.shape, D)


def _double_backward(policy, ro: Rollouts, u: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, L, K) ⟨u_k, ∇ℓ⟩ without the Jacobian: g(v) = ∇_θ Σ v·ℓ is linear in v (B, L), so
    ∂⟨g(v), u_k⟩/∂v = J u_k — one backward with a graph, then one per direction, ``chunk`` rows at a
    time. Plain reverse mode works for every policy (forward mode cannot trace the tabular policy's
    numpy state index)."""
    ps = params(policy)
    sizes = [p.numel() for p in ps]
    B, L = ro.tokens.shape
    out = torch.zeros(B, L, u.shape[0], dtype=torch.float64)
    for lo in range(0, B, chunk):
        sl = slice(lo, min(B, lo + chunk))
        lp = policy.token_log_probs(ro.prompt_idx[sl], ro.tokens[sl]) * ro.mask[sl]      # (b, L)
        v = torch.zeros_like(lp, requires_grad=True)
        gs = torch.autograd.grad(lp, ps, grad_outputs=v, create_graph=True, allow_unused=True)
        for k, uk in enumerate(u):
            parts = torch.split(uk, sizes)
            dot = sum((g * part.reshape(p.shape).to(g.dtype)).sum() for g, part, p in zip(gs, parts, ps)
                      if g is not None)
            if torch.is_tensor(dot) and dot.requires_grad:
                out[sl, :, k] = torch.autograd.grad(dot, v, retain_graph=k + 1 < len(u))[0].to(torch.float64)
    return out * ro.mask[:, :, None]


def projected_scores(policy, ro: Rollouts, directions: torch.Tensor, budget: int = 50_000_000,
                     chunk: int = 4096) -> torch.Tensor:
    """(B, L, K) ⟨u_k, ∇_θ log π(y_t|s_t)⟩ for every row of ``ro`` and direction u_k (K, D).

    Distinct (prompt, response) rows are scored once (a sampled batch from a small MDP repeats a
    few responses many times). Up to ``budget`` token × parameter entries the per-token scores are
    formed (``token_scores``) and projected; above it a double backward avoids the Jacobian.
    """
    u = torch.as_tensor(directions, dtype=torch.float64)
    D = n_params(policy)
    if u.dim() != 2 or u.shape[1] != D or u.shape[0] < 1:
        raise TPGError(f"directions must have shape (K, D) with K ≥ 1 and D = {D} parameters, got {tuple(u.shape)}")
    key = torch.cat([ro.prompt_idx[:, None], ro.tokens * ro.mask.long()], 1)              # (B, 1 + L)
    uniq, inv = torch.unique(key, dim=0, return_inverse=True)
    first = torch.zeros(len(uniq), dtype=torch.long).scatter_(0, inv, torch.arange(len(inv)))
    sub = ro.select(first)                                                                 # one row per response
    if sub.tokens.numel() * D <= budget:
        s = token_scores(policy, sub, budget) @ u.T                                        # (U, L, K)
    else:
        s = _double_backward(policy, sub, u, chunk)                                        # (U, L, K)
    return s[inv]
