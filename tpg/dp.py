"""Dynamic programming over the prefix tree: J, ∇J and the exact tables without listing responses.

The states of a token MDP form a tree (PAPER §1.2), so every exact quantity is a sweep over its
levels: U(s) = Σ_a π(a|s) U(s⊕a) backward from the RM of the terminal pairs, ρ(s) forward from
ρ(x). The enumeration route reads r(s, a) and RM off all N responses, (N, H) arrays; here they come
from the MDP itself, per (state, token) pair: the reward table (or one callable call per pair),
and RM at each terminal pair built from the state's prefix (a running sum for token rewards; the
response callable on blocks of prefixes for response rewards, never an (N, H) array beyond a
block). Work and memory are O(S·V), about V/(V − 1) float64 entries per response and no factor H,
so the issue's 10^8-response MDPs fit.

Within a prompt's block of mdp.py's index, the non-EOS children of the states of levels 0..H−2 are
the states 1, 2, …, S − 1 in order (state i's child by digit d is 1 + A·i + d: bijective base A).
So "U of the child" for every non-terminal pair at once is the view U[1:].view(−1, A), and each
sweep step is a contiguous slice of one level: no gathers, no child table.

∇J for any policy that gives its (S, V) log π(·|s) with autograd (``state_log_probs``): the closed
form ∂J/∂log π(a|s) = ρ(s) π(a|s) (U(s⊕a) − U(s)) (PAPER §2) as detached weights on the log-prob
table, one backward pass. The −U(s) term has zero sum over a (Σ_a π ∇log π = 0), so it changes
nothing in exact arithmetic; it makes the weights the tabular gradient itself.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from tpg import validate
from tpg.mdp import TABLE_BUDGET, TokenMDP, TPGError, host_empty
from tpg.rollouts import MONTE_CARLO, check_budget, log10_sizes, sized

# The DP holds a few (S, V) float64 tables (8 bytes per entry each; measured peaks over the inputs:
# ∇J 3.4 tables, all of ``tables`` 5.5), so its budget counts state-table entries S·V, which predicts
# its memory; a state count alone would admit V = 50, H = 5 (6·10^6 states, 3·10^8 entries, 2.5 GB
# per table). 10^8 entries admit V = 4, H = 13 (6.7·10^7 responses, 2.2·10^7 states, 9·10^7
# entries): ∇J peaks at 2.4 GB over the reward table and logits (0.7 GB each), all tables at 3.9 GB.
DP_BUDGET = TABLE_BUDGET
DP_UNIT = "state-table entries (prefix states × V)"
_CALL_BLOCK = 4096              # states per block when a reward callable is evaluated


def check_dp_budget(mdp: TokenMDP, budget: int | None = None) -> None:
    """Refuse, in O(1) and before anything is allocated, a DP over more than ``budget`` entries."""
    log10_entries = log10_sizes(mdp)[0] + math.log10(mdp.vocab_size)
    check_budget(budget=DP_BUDGET if budget is None else budget, what=f"{mdp!r}", unit=DP_UNIT,
                 kind="dynamic programming over the prefix states",
                 instead=MONTE_CARLO, **sized(log10_entries, lambda: mdp.num_states * mdp.vocab_size))


# ------------------------------------------------------------------------------ the tree
def _levels(mdp: TokenMDP) -> list[slice]:
    """Level t's states within a prompt's block: a slice of A^t rows."""
    start = mdp.level_start()
    return [slice(int(start[t]), int(start[t + 1])) for t in range(mdp.horizon)]


def _kids(mdp: TokenMDP) -> slice | torch.Tensor:
    """Token columns of the non-EOS tokens in digit order (a slice, i.e. a view, when EOS is last or absent)."""
    V, eos = mdp.vocab_size, mdp.eos
    if eos is None or eos == V - 1:
        return slice(0, mdp.arity)
    return torch.tensor([a for a in range(V) if a != eos])


def _discounts(mdp: TokenMDP) -> torch.Tensor:
    """(H,) γ^t for t = 0..H−1: the same numbers the enumeration route uses (γ ** arange, float64)."""
    return mdp.gamma ** torch.arange(mdp.horizon, dtype=torch.float64)


def backward_values(mdp: TokenMDP, pi: torch.Tensor, base: torch.Tensor, gamma: float,
                    terminal_only: bool = False) -> torch.Tensor:
    """(S,) X(s) = Σ_a π(a|s) [base(s, a) + γ X(s⊕a)], X(s⊕a) = 0 for a terminal pair.

    U is X with base = RM at terminal pairs and γ = 1; V is X with base = r and the MDP's γ.
    pi, base (S, V). Each level is computed out of place from the level below, so autograd can
    run through it to any order (``objective``). ``terminal_only``: base is 0 off the terminal
    pairs (RM), so the levels above the last read only its EOS column. Sums over a are
    matrix-vector products (1.6× faster than sum(-1) at V = 4).
    """
    P, Sp, V, A, H, eos = len(mdp.prompts), mdp.states_per_prompt, mdp.vocab_size, mdp.arity, mdp.horizon, mdp.eos
    pi3, b3 = pi.view(P, Sp, V), base.view(P, Sp, V)
    kids, levels = _kids(mdp), _levels(mdp)
    ones_V, ones_A = pi.new_ones(V), pi.new_ones(A)
    out: list[torch.Tensor | None] = [None] * H
    for t in reversed(range(H)):
        p, b = pi3[:, levels[t]], b3[:, levels[t]]                           # (P, A^t, V) views
        if t == H - 1 or not terminal_only:
            x = (p * b) @ ones_V                                             # (P, A^t) Σ_a π base
        elif eos is not None:
            x = p[..., eos] * b[..., eos]                                    # (P, A^t) only EOS ends here
        else:
            x = None
        if t < H - 1:
            cont = (p[..., kids] * out[t + 1].view(P, -1, A)) @ ones_A       # (P, A^t) Σ_kids π X(child)
            cont = cont if gamma == 1.0 else gamma * cont
            x = cont if x is None else x + cont
        out[t] = x
    return torch.cat(out, 1).reshape(-1)                                     # (S,)


def child_values(mdp: TokenMDP, X: torch.Tensor, base: torch.Tensor, gamma: float, inplace: bool = False
                 ) -> torch.Tensor:
    """(S, V) base(s, a) + γ X(s⊕a) on non-terminal pairs, base(s, a) on terminal ones: U(s⊕a) from U
    (base = RM at terminal pairs, 0 elsewhere), Q from V (base = r). One vectorised add through the
    bijective numbering: the children of all non-last-level states are the states 1..Sp−1 in order."""
    P, Sp, V, A, H = len(mdp.prompts), mdp.states_per_prompt, mdp.vocab_size, mdp.arity, mdp.horizon
    out = base if inplace else base.clone()
    inner = int(mdp.level_start()[H - 1])                                    # states with children
    child = X.view(P, Sp)[:, 1:].reshape(P, inner, A)                        # (P, inner, A) X of each child
    view = out.view(P, Sp, V)[:, :inner]                                     # (P, inner, V)
    view[..., _kids(mdp)] += child if gamma == 1.0 else gamma * child
    return out


def reach(mdp: TokenMDP, pi: torch.Tensor) -> torch.Tensor:
    """(S,) ρ(s) = ρ(x) Π π(y_k|s_k) along the prefix of s: one forward sweep, out of place per level."""
    P, Sp, V = len(mdp.prompts), mdp.states_per_prompt, mdp.vocab_size
    pi3, kids, levels = pi.view(P, Sp, V), _kids(mdp), _levels(mdp)
    out = [torch.as_tensor(mdp.prompt_probs, dtype=pi.dtype)[:, None]]       # (P, 1) the roots
    for t in range(mdp.horizon - 1):
        out.append((out[t][..., None] * pi3[:, levels[t]][..., kids]).reshape(P, -1))   # (P, A^(t+1))
    return torch.cat(out, 1).reshape(-1)                                     # (S,)


# ------------------------------------------------------------------------------ rewards per pair
def pair_rewards(mdp: TokenMDP, need_r: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(r, RM) per (state, token), both (S, V) float64, without enumerating responses.

    r(s, a): this MDP's token reward (the table itself for a token-reward table: no copy; the
    Zero-Reward form RM/γ^t on terminal pairs for response rewards). RM(s, a): the RM of the
    response that ends with the terminal pair (s, a), 0 on non-terminal pairs. ``need_r=False``
    skips r where only RM is needed (J, ∇J).
    """
    if mdp.additive:
        r = _token_table(mdp)
        return r, _collected(mdp, r)
    rm = _response_table(mdp)
    if not need_r:
        return None, rm
    P, Sp, V = len(mdp.prompts), mdp.states_per_prompt, mdp.vocab_size
    r, disc = torch.empty_like(rm), _discounts(mdp)
    r3, rm3 = r.view(P, Sp, V), rm.view(P, Sp, V)
    for t, lv in enumerate(_levels(mdp)):
        torch.div(rm3[:, lv], disc[t], out=r3[:, lv])                        # ZRA: r_T = RM / γ^(T−1)
    return r, rm


def _terminal_view(mdp: TokenMDP, table: torch.Tensor, t: int) -> list[tuple]:
    """(P, A^t, k) view of level t's terminal columns of a (S, V) table: every token at the last
    level (k = V), the EOS column above it (k = 1)."""
    P, Sp, V = len(mdp.prompts), mdp.states_per_prompt, mdp.vocab_size
    lv = _levels(mdp)[t]
    return table.view(P, Sp, V)[:, lv] if t == mdp.horizon - 1 else table.view(P, Sp, V)[:, lv, mdp.eos: mdp.eos + 1]


def _collected(mdp: TokenMDP, r: torch.Tensor) -> torch.Tensor:
    """(S, V) RM at terminal pairs of a token-reward MDP: C(s) + γ^t r(s, a), with C(s) = Σ_k γ^k r_k
    collected along the prefix of s (a forward sweep, one level of C alive at a time)."""
    P, Sp, V, H, eos = len(mdp.prompts), mdp.states_per_prompt, mdp.vocab_size, mdp.horizon, mdp.eos
    r3, disc, kids = r.view(P, Sp, V), _discounts(mdp), _kids(mdp)
    rm = torch.empty(P * Sp, V, dtype=torch.float64)
    rm.view(P, Sp, V)[:, : int(mdp.level_start()[H - 1])].zero_()           # the last level is all terminal
    C = torch.zeros(P, 1, dtype=torch.float64)                               # (P, A^t) at level t
    for t, lv in enumerate(_levels(mdp)):
        rt = r3[:, lv]                                                       # (P, A^t, V)
        if t == H - 1:
            torch.add(C[..., None], rt, alpha=float(disc[t]), out=_terminal_view(mdp, rm, t))
        else:
            if eos is not None:
                torch.add(C[..., None], rt[..., eos: eos + 1], alpha=float(disc[t]), out=_terminal_view(mdp, rm, t))
            C = (C[..., None] + disc[t] * rt[..., kids]).reshape(P, -1)      # (P, A^(t+1))
    return rm


def _prefixes(mdp: TokenMDP, t: int, lo: int, hi: int) -> np.ndarray:
    """(hi − lo, t) response-prefix tokens of codes lo..hi−1 of level t: the code's base-A digits,
    most significant first, with EOS skipped."""
    A = mdp.arity
    codes = np.arange(lo, hi, dtype=np.int64)
    digits = (codes[:, None] // A ** np.arange(t - 1, -1, -1, dtype=np.int64)[None, :]) % A   # (n, t)
    return digits + (digits >= mdp.eos) if mdp.eos is not None else digits


def _blocks(mdp: TokenMDP):
    """(prompt, level, first row of the block in the (S,) index, prefixes (n, t)) over every state, in blocks."""
    Sp = mdp.states_per_prompt
    start = mdp.level_start()
    for x in range(len(mdp.prompts)):
        for t in range(mdp.horizon):
            n = int(start[t + 1] - start[t])
            for lo in range(0, n, _CALL_BLOCK):
                hi = min(n, lo + _CALL_BLOCK)
                yield x, t, x * Sp + int(start[t]) + lo, _prefixes(mdp, t, lo, hi)


def _real(v, name: str, where: str) -> float:
    """A reward callable's value as a float: a finite real number (0-d arrays and tensors allowed)."""
    v = v.item() if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0 else v
    if not validate.is_real(v):
        raise TPGError(f"the {name} callable must return a finite float; {where} it returned "
                       f"{validate.show(v, with_type=True)}")
    return float(v)


def _token_table(mdp: TokenMDP) -> torch.Tensor:
    """(S, V) r(s, a) of a token-reward MDP: the table itself, or one callable call per pair."""
    fn = mdp.token_rewards
    if not callable(fn):
        return torch.as_tensor(fn)                                           # shares the MDP's memory
    out = np.empty((mdp.num_states, mdp.vocab_size))
    for x, t, row, pre in _blocks(mdp):
        for i, prefix in enumerate(map(tuple, pre.tolist())):
            out[row + i] = [_real(fn(x, prefix, a), "token_rewards", f"on prompt {x}, prefix {prefix}, token {a}")
                            for a in range(mdp.vocab_size)]
    return torch.as_tensor(out)


def _response_table(mdp: TokenMDP) -> torch.Tensor:
    """(S, V) RM at terminal pairs of a response-reward MDP (0 elsewhere): the table's terminal
    entries, or the callable on each terminal pair's response (prefix ⊕ token), block by block
    through mdp.rewards (its validation of the callable's values)."""
    P, Sp, V, H, eos = len(mdp.prompts), mdp.states_per_prompt, mdp.vocab_size, mdp.horizon, mdp.eos
    rm = torch.zeros(P * Sp, V, dtype=torch.float64)
    fn = mdp.response_rewards
    if not callable(fn):
        table = torch.as_tensor(fn)
        for t in range(H):
            if t == H - 1 or eos is not None:
                _terminal_view(mdp, rm, t)[...] = _terminal_view(mdp, table, t)
        return rm
    for x, t, row, pre in _blocks(mdp):
        cols = list(range(V)) if t == H - 1 else ([eos] if eos is not None else [])
        if not cols:
            continue
        n, k = len(pre), len(cols)
        tokens = torch.zeros(n * k, H, dtype=torch.long)                     # (n·k, H) prefix ⊕ a, 0-padded
        tokens[:, :t] = torch.as_tensor(pre).repeat_interleave(k, 0)
        tokens[:, t] = torch.tensor(cols).repeat(n)
        mask = (torch.arange(H) <= t).expand(n * k, H)
        _, vals = mdp.rewards(torch.full((n * k,), x), tokens, mask)         # (n·k,) RM
        rm[row: row + n, cols] = vals.view(n, k)
    return rm


# ------------------------------------------------------------------------------ J, ∇J
def _value_base(mdp: TokenMDP) -> tuple[torch.Tensor, float, bool]:
    """(base (S, V), γ', terminal_only) of the cheapest value sweep that gives J and ∇J.

    Token rewards: V with base = r (the table itself: nothing to build) and γ, since
    U(s⊕a) − U(s) = γ^t (Q(s, a) − V(s)) for s at level t (U = C + γ^t V, C the reward already
    collected: it cancels). Response rewards: U with base = RM at terminal pairs and γ' = 1."""
    if mdp.additive:
        return _token_table(mdp), mdp.gamma, False
    return _response_table(mdp), 1.0, True


def _level_discounts(mdp: TokenMDP) -> torch.Tensor:
    """(S,) γ^t of each state's level t."""
    counts = torch.as_tensor(np.diff(mdp.level_start()))                       # (H,) A^t states per level
    return _discounts(mdp).repeat_interleave(counts).repeat(len(mdp.prompts))


def closed_form_weights(mdp: TokenMDP, log_pi: torch.Tensor) -> torch.Tensor:
    """(S, V) ρ(s) π(a|s) (U(s⊕a) − U(s)) from a detached (S, V) log π table: ∂J/∂log π(a|s).

    Computed as ρ(s) γ^t π(a|s) (Q(s, a) − V(s)) for token rewards (no RM table needed) or from U
    for response rewards, in one (S, V) buffer beside π, in place (cache-sized blocks measured no
    faster on one thread, and much slower on two under load). ∇J's peak is then about three tables
    (log π, π, the weights) plus one temporary: 10^8 responses fit."""
    S, V = mdp.num_states, mdp.vocab_size
    pi = torch.exp(log_pi.to(torch.float64), out=host_empty((S, V), torch.float64))   # (S, V)
    base, g, terminal_only = _value_base(mdp)
    X = backward_values(mdp, pi, base, g, terminal_only)                       # (S,) V or U
    scale = reach(mdp, pi)                                                     # (S,) ρ(s)
    if mdp.additive:
        w = host_empty((S, V), torch.float64).copy_(base)                      # base is the MDP's own table
        if g != 1.0:
            scale.mul_(_level_discounts(mdp))                                  # ρ(s) γ^t
    else:
        w = base                                                               # fresh: filled in place
    child_values(mdp, X, w, g, inplace=True)                                   # w = Q or U(s⊕a)
    return w.sub_(X[:, None]).mul_(pi).mul_(scale[:, None])                   # scale·π·(w − X), in place


def gradient(mdp: TokenMDP, policy, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """∇J per parameter: ∇_θ Σ_{s,a} sg[ρ(s) π(a|s) (U(s⊕a) − U(s))] log π_θ(a|s), one backward pass."""
    closed = getattr(policy, "state_score_grad", None)                      # the policy protocol's closed form
    if closed is not None:
        with torch.no_grad():
            log_pi = policy.state_log_probs()                                # (S, V), no graph
            return closed(closed_form_weights(mdp, log_pi), log_pi)
    log_pi = policy.state_log_probs()                                        # (S, V) with autograd to θ
    with torch.no_grad():
        w = closed_form_weights(mdp, log_pi.detach())                        # (S, V) detached weights
    return list(torch.autograd.grad(log_pi, params, grad_outputs=w.to(log_pi.dtype), allow_unused=True))


def objective(mdp: TokenMDP, policy) -> torch.Tensor:
    """J(θ) = Σ_x ρ(x) X(root_x) (X = V or U: equal at the roots, where nothing is collected yet),
    with autograd to θ through the backward sweep (any order)."""
    pi = policy.state_log_probs().to(torch.float64).exp()                   # (S, V) with autograd
    X = backward_values(mdp, pi, *_value_base(mdp))                          # (S,)
    roots = torch.arange(len(mdp.prompts)) * mdp.states_per_prompt
    return torch.dot(torch.as_tensor(mdp.prompt_probs), X[roots])
