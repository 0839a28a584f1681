"""Policies behind one protocol: next-token log-probs for a batch of prefixes.

Every policy is a ``torch.nn.Module`` whose parameters are the θ of ∇J(θ). Two calls are all the
rest of tpg uses, so a tabular softmax, a log-linear model and a GPT-2 are interchangeable:

- ``log_probs(prompt_idx, tokens)``: teacher forcing. (B,) prompt indices and (B, L) response
  tokens → (B, L, V) log π(· | prompt ⊕ tokens[:, :t]) for every t (row t ignores tokens[t:]).
- ``decoder(prompt_idx, prefix, prefix_len)``: incremental decoding from (B, L0) right-padded
  prefixes; the returned object has ``.log_probs`` (B, V) and ``.advance(tokens)``. The sampler,
  greedy decoding and continuation rollouts only use this.

``token_log_probs`` (B, L) is the sampled-token log-prob every estimator is built on, and
``state_log_probs`` (S, V) the next-token distribution at every prefix state (the exact tables'
input); both have generic implementations on top of ``log_probs``, which a policy may override
with a faster form (the tabular softmax does: its rows are the states).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from tpg import validate
from tpg.mdp import TABLE_BUDGET, BudgetError, TokenMDP, TPGError

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class Policy(nn.Module):
    """Base class. Subclasses implement ``log_probs`` and ``decoder``."""

    mdp: TokenMDP

    @property
    def vocab_size(self) -> int:
        return self.mdp.vocab_size

    def log_probs(self, prompt_idx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must implement log_probs(prompt_idx, tokens)")

    def decoder(self, prompt_idx: torch.Tensor, prefix: torch.Tensor, prefix_len: torch.Tensor):
        raise TypeError(f"{type(self).__name__} must implement decoder(prompt_idx, prefix, prefix_len)")

    # Optional closed form of ∇_θ Σ_{s,a} w[s, a] log π(a|s) (one tensor per trainable parameter, in
    # ``parameters()`` order); None: the exact engine takes autograd through ``state_log_probs``.
    state_score_grad = None

    def token_log_probs(self, prompt_idx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) log π(y_t | s_t) of the given tokens."""
        return self.log_probs(prompt_idx, tokens).gather(-1, tokens[..., None])[..., 0]

    def state_log_probs(self) -> torch.Tensor:
        """(S, V) log π(·|s) for every prefix state of ``self.mdp`` (the exact tables' input).

        Any policy: one batched ``log_probs`` call per level, on the prefixes of that level's states
        (rebuilt from the state index: digits of the state's code, EOS skipped).
        """
        mdp = self.mdp
        st = mdp.state_table()
        level, prompt = torch.as_tensor(st["level"]), torch.as_tensor(st["prompt"])
        parts, order = [], []
        for lvl in range(mdp.horizon):
            idx = torch.nonzero(level == lvl)[:, 0]
            toks = mdp.prefix_tokens(idx.numpy())[:, : lvl + 1]                        # (n, lvl+1), last a dummy 0
            parts.append(self.log_probs(prompt[idx], toks)[:, lvl])                   # (n, V)
            order.append(idx)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]                       # (S, V)

    def flat_grad(self, grads=None) -> torch.Tensor:
        """Concatenate the .grad of every parameter (or the given list) into one vector."""
        ps = list(self.parameters())
        grads = [p.grad for p in ps] if grads is None else grads
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(ps, grads)])


class _TableDecoder:
    """Incremental decoding for policies whose next-token logits depend on a state index."""

    def __init__(self, policy: "TabularSoftmax", state: torch.Tensor):
        self.policy, self.state = policy, state                   # (B,)
        self.child = torch.as_tensor(policy.mdp.state_table()["child"])

    @property
    def log_probs(self) -> torch.Tensor:
        return torch.log_softmax(self.policy.logits[self.state], -1)  # (B, V)

    def advance(self, tokens: torch.Tensor) -> None:
        nxt = self.child[self.state, tokens]                      # (B,), −1 when terminal
        self.state = torch.where(nxt >= 0, nxt, self.state)       # finished rows stay put (masked by caller)

    def select(self, rows: torch.Tensor) -> "_TableDecoder":
        """Keep only ``rows`` (the sampler drops finished rows)."""
        self.state = self.state[rows]
        return self


class TabularSoftmax(Policy):
    """π(a|s) = softmax(θ[s])_a with one free logit vector per prefix state (num_states, V)."""

    def __init__(self, mdp: TokenMDP, logits: torch.Tensor | np.ndarray | None = None, *, seed: int | None = 0,
                 scale: float = 1.0, dtype=torch.float64):
        super().__init__()
        _check_common(mdp, seed, scale, dtype, seed_none_ok=True)
        self.mdp = mdp
        shape = (mdp.num_states, mdp.vocab_size)
        if shape[0] * shape[1] > TABLE_BUDGET:
            raise BudgetError(f"a tabular policy for {mdp!r} needs num_states × V = {shape[0] * shape[1]:,} logits, "
                              f"above the table budget of {TABLE_BUDGET:,}; use LogLinear (shared parameters) "
                              "or a smaller vocabulary / horizon")
        if logits is None:
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            logits = scale * torch.randn(shape, generator=g, dtype=dtype) if seed is not None else torch.zeros(shape)
        logits = validate.finite_tensor("logits", logits, shape, shape_name="(num_states, V)").to(dtype)
        self.logits = nn.Parameter(logits.clone())

    def log_probs(self, prompt_idx, tokens):
        s = self.mdp.state_index(prompt_idx, tokens)              # (B, L)
        return torch.log_softmax(self.logits, -1)[s]              # (B, L, V)

    def token_log_probs(self, prompt_idx, tokens):
        # One gather from the flattened (S·V,) log-softmax table: index_select's backward is a
        # single index_add, and the (B, L) index is built in place (never builds (B, L, V)).
        B, L = tokens.shape
        flat = self.mdp.state_index(prompt_idx, tokens)           # (B, L) fresh: overwritten below
        torch.add(tokens, flat, alpha=self.mdp.vocab_size, out=flat)  # (B, L) s·V + y_t
        table = torch.log_softmax(self.logits, -1).reshape(-1)    # (S·V,)
        return table.index_select(0, flat.view(-1)).view(B, L)    # (B, L)

    def state_log_probs(self):
        # (S, V): the rows are the states. logits − logsumexp is the same stable log-softmax, and
        # about 1.7× faster than torch.log_softmax on tpg's narrow rows (V ≤ 8).
        return self.logits - torch.logsumexp(self.logits, -1, keepdim=True)

    def state_score_grad(self, w: torch.Tensor, log_pi: torch.Tensor) -> list[torch.Tensor]:
        """∇_logits Σ_{s,a} w[s, a] log π(a|s) in closed form, w − π·Σ_a w (the softmax's Jacobian):
        the exact engine's ∇J without a backward pass (``tpg.dp.gradient``). w, log_pi (S, V), detached;
        w is overwritten (the caller hands over a fresh buffer)."""
        row = w.sum(1, keepdim=True)                                # (S, 1) Σ_a w (0 for ∇J's weights)
        return [w.sub_(log_pi.exp().mul_(row)).to(self.logits.dtype)]   # in place: w is a fresh buffer

    def decoder(self, prompt_idx, prefix, prefix_len):
        # Prefixes must be non-terminal (length < H, no EOS); terminal rows are clamped to a valid state.
        s = self.mdp.state_index(prompt_idx, torch.cat([prefix, prefix.new_zeros(len(prefix), 1)], 1))  # (B, L0+1)
        state = s.gather(1, prefix_len.long()[:, None])[:, 0].clamp(0, self.mdp.num_states - 1)  # (B,)
        return _TableDecoder(self, state)


class _LogLinearDecoder:
    def __init__(self, policy: "LogLinear", prompt_idx, pos, prev):
        self.policy, self.prompt_idx, self.pos, self.prev = policy, prompt_idx, pos, prev

    @property
    def log_probs(self):
        return torch.log_softmax(self.policy._logits(self.prompt_idx, self.pos, self.prev), -1)  # (B, V)

    def advance(self, tokens):
        self.pos = (self.pos + 1).clamp(max=self.policy.mdp.horizon - 1)
        self.prev = tokens

    def select(self, rows):
        """Keep only ``rows`` (the sampler drops finished rows)."""
        self.prompt_idx, self.pos, self.prev = self.prompt_idx[rows], self.pos[rows], self.prev[rows]
        return self


class LogLinear(Policy):
    """Shared-parameter policy: logits(s, ·) = W_pos[t] + W_prev[previous token] + W_prompt[x].

    Parameters are shared across all states with the same position / previous token / prompt, so
    ∂J/∂θ mixes many states (unlike the tabular closed form): a stepping stone to GPT-2. The
    previous token of the first response position is the prompt's last token, or a start marker
    (index V) for an empty prompt.
    """

    def __init__(self, mdp: TokenMDP, *, seed: int = 0, scale: float = 1.0, dtype=torch.float64):
        super().__init__()
        _check_common(mdp, seed, scale, dtype)
        self.mdp = mdp
        V, H, P = mdp.vocab_size, mdp.horizon, len(mdp.prompts)
        g = torch.Generator().manual_seed(seed)
        self.w_pos = nn.Parameter(scale * torch.randn(H, V, generator=g, dtype=dtype))
        self.w_prev = nn.Parameter(scale * torch.randn(V + 1, V, generator=g, dtype=dtype))
        self.w_prompt = nn.Parameter(scale * torch.randn(P, V, generator=g, dtype=dtype))
        self.register_buffer("first_prev", torch.tensor([p[-1] if p else V for p in mdp.prompts]))

    def _logits(self, prompt_idx, pos, prev):
        return self.w_pos[pos] + self.w_prev[prev] + self.w_prompt[prompt_idx]   # (..., V)

    def log_probs(self, prompt_idx, tokens):
        B, L = tokens.shape
        pos = torch.arange(L).clamp(max=self.mdp.horizon - 1).expand(B, L)           # (B, L)
        prev = torch.cat([self.first_prev[prompt_idx][:, None], tokens[:, :-1]], 1)  # (B, L)
        return torch.log_softmax(self._logits(prompt_idx[:, None], pos, prev), -1)  # (B, L, V)

    def decoder(self, prompt_idx, prefix, prefix_len):
        prev_all = torch.cat([self.first_prev[prompt_idx][:, None], prefix], 1)      # (B, L0+1)
        prev = prev_all.gather(1, prefix_len.long()[:, None])[:, 0]
        return _LogLinearDecoder(self, prompt_idx, prefix_len.long().clamp(max=self.mdp.horizon - 1), prev)


def _check_common(mdp, seed, scale, dtype, seed_none_ok: bool = False) -> None:
    """The constructor arguments every built-in policy shares."""
    validate.mdp("mdp", mdp)
    if not (seed_none_ok and seed is None):
        validate.seed("seed", seed)
    validate.real("scale", scale, 0.0, None, why=" (the std of the random initial parameters)")
    validate.choice("dtype", dtype, FLOAT_DTYPES)


# ------------------------------------------------------------------------------------ by name
# The CLI's --policy. Each module registers the policies it defines ("gpt2" comes from tpg.lm,
# which the package imports), so this module never imports a layer above it.
POLICY_BUILDERS: dict[str, Callable[..., Policy]] = {}


def register_policy(kind: str, build: Callable[..., Policy]) -> None:
    """Make ``make_policy(kind, mdp, seed, **kw)`` call ``build(mdp, seed=seed, **kw)``."""
    POLICY_BUILDERS[kind] = build


def make_policy(kind: str, mdp: TokenMDP, seed: int = 0, **kw) -> Policy:
    """A policy of the named kind for ``mdp`` (the CLI's ``--policy``). GPT-2 needs transformers."""
    if not (isinstance(kind, str) and kind in POLICY_BUILDERS):
        raise TPGError(f"unknown policy kind {kind!r}; choose one of {tuple(POLICY_BUILDERS)}")
    return POLICY_BUILDERS[kind](mdp, seed=seed, **kw)


register_policy("tabular", TabularSoftmax)
register_policy("loglinear", LogLinear)
