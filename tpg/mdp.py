"""Token MDPs: prompts, a vocabulary with optional EOS, a horizon, a discount and KNOWN rewards.

A state is (prompt, response prefix). Transitions append the chosen token, so the states form a
tree: every state is reached by exactly one path (PAPER §1.2), which is what turns the policy
gradient theorem into an equality. A response ends when EOS is emitted or when it reaches the
horizon H.

The prefix states of one prompt are indexed level by level: the state after t non-EOS tokens with
digits d_1..d_t (a token's digit is its id with EOS skipped) has index
``prompt * S + (A^0 + ... + A^(t-1)) + (d_1 d_2 ... d_t in base A)``, with A the number of
non-EOS tokens and S = A^0 + ... + A^(H-1). Every per-state table in tpg (logits, rewards, U, V,
Q) uses this index, so a whole batch of prefixes maps to table rows with a few vectorised ops.

Rewards come in one of two forms, and the theorems say only RM matters for J and ∇J:
- ``token_rewards``: r(s, a) for every (state, token); RM(x, y) = Σ_t γ^(t-1) r_t (PAPER §1.3).
- ``response_rewards``: RM of each complete response, any function of the whole response
  (binary correct/incorrect, non-additive scores). Its token decomposition is the Zero-Reward
  form (PAPER §1.4): r_t = 0 for t < T and r_T = RM / γ^(T-1), so Σ_t γ^(t-1) r_t = RM.
Each may be a table of shape (num_states, V) or a Python callable.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from tpg import validate
from tpg.validate import BudgetError, TPGError, check_output_path  # noqa: F401  (re-exported: tpg.mdp.TPGError)

DEFAULT_BUDGET = 10_000_000  # responses an enumeration may hold before it refuses
TABLE_BUDGET = 100_000_000   # entries of a per-(state, token) table (800 MB in float64) before refusing
_BLOCK_ROWS = 1 << 14        # rows per block in state_index: the (L, rows) work buffer stays in cache


def host_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.long) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory numpy allocates.

    numpy asks the kernel for transparent huge pages on large arrays (madvise), torch's default
    allocator does not, so first-touch page faults cost several times the arithmetic on an
    (N, H) index array of a million-response enumeration. Used for tpg's own large buffers.
    """
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


@dataclass(eq=False)
class TokenMDP:
    """A tabular autoregressive token MDP (see module docstring).

    Args:
      prompts: token sequences, one per prompt (may be empty), tokens in [0, V) and not EOS.
      vocab_size: V, number of tokens including EOS.
      horizon: H ≥ 1, the maximum response length.
      eos: the EOS token id, or None for fixed-length responses (every response has length H).
      gamma: discount γ ∈ (0, 1].
      prompt_probs: ρ(x), defaults to uniform.
      token_rewards: (num_states, V) array or callable ``f(prompt_idx, prefix_tuple, token) -> float``.
      response_rewards: (num_states, V) array whose entry at the last (state, token) of a complete
        response is RM(x, y), or callable ``f(prompt_idx, response_tuple) -> float``.
    Exactly one of token_rewards / response_rewards is given.
    """

    prompts: Sequence[Sequence[int]]
    vocab_size: int
    horizon: int
    eos: int | None = None
    gamma: float = 1.0
    prompt_probs: Sequence[float] | None = None
    token_rewards: np.ndarray | Callable | None = None
    response_rewards: np.ndarray | Callable | None = None
    name: str = ""
    _derived: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Python ints: a numpy int64 would overflow silently in A**H.
        V = self.vocab_size = validate.integer("vocab_size", self.vocab_size, 1)
        self.horizon = validate.integer("horizon", self.horizon, 1)
        if self.eos is not None:
            if not (validate.is_int(self.eos) and 0 <= self.eos < V):
                raise TPGError(f"eos={self.eos!r} is not a token id in [0, {V}); pass eos=None for fixed-length "
                               "responses")
            if V < 2:
                raise TPGError("a vocabulary with EOS needs at least one other token (vocab_size ≥ 2)")
            self.eos = int(self.eos)
        self.gamma = validate.real("gamma", self.gamma, 0.0, 1.0, "(]")
        self.prompts = self._check_prompts(V)
        self.prompt_probs = self._check_prompt_probs()
        if (self.token_rewards is None) == (self.response_rewards is None):
            raise TPGError("give exactly one of token_rewards (additive RM) or response_rewards "
                           "(RM of the whole response)")
        for name in ("token_rewards", "response_rewards"):
            table = getattr(self, name)
            if table is not None and not callable(table):
                setattr(self, name, self._check_table(name, table))

    def _check_prompts(self, V: int) -> tuple[tuple[int, ...], ...]:
        try:
            prompts = tuple(tuple(p) for p in self.prompts)
        except TypeError:
            raise validate.TPGTypeError(f"prompts must be a list of token sequences, e.g. [(0, 1), ()], "
                                        f"got {validate.show(self.prompts)}") from None
        if not prompts:
            raise TPGError("an MDP needs at least one prompt (an empty prompt () is allowed)")
        for i, p in enumerate(prompts):
            for t in p:
                if not (validate.is_int(t) and 0 <= t < V and t != self.eos):
                    raise TPGError(f"prompt {i} has token {t!r}: prompt tokens must be ints in [0, {V}) and not EOS")
        return tuple(tuple(int(t) for t in p) for p in prompts)

    def _check_prompt_probs(self) -> np.ndarray:
        P = len(self.prompts)
        if self.prompt_probs is None:
            return np.full(P, 1.0 / P)
        try:
            rho = np.asarray(self.prompt_probs, dtype=np.float64)
        except (TypeError, ValueError):
            raise TPGError(f"prompt_probs must be {P} numbers, got {validate.show(self.prompt_probs)}") from None
        if rho.shape != (P,):
            raise TPGError(f"prompt_probs has shape {rho.shape}, expected ({P},)")
        if not (np.all(np.isfinite(rho)) and np.all(rho >= 0)):
            raise TPGError(f"prompt_probs must be finite and ≥ 0, got {rho.tolist()}")
        if abs(rho.sum() - 1.0) >= 1e-9:
            raise TPGError(f"prompt_probs must sum to 1, sum is {rho.sum():.6g}")
        return rho

    def _check_table(self, name: str, table) -> np.ndarray:
        shape = ("more than 10^18", self.vocab_size) if self._astronomical() else (self.num_states, self.vocab_size)
        try:
            table = np.asarray(table, dtype=np.float64)
        except (TypeError, ValueError):
            raise validate.TPGTypeError(f"{name} must be a (num_states, V) array of numbers or a callable, "
                                        f"got {validate.show(table, with_type=True)}") from None
        if table.shape != shape:
            raise TPGError(f"{name} has shape {table.shape}, expected (num_states, V) = {shape}")
        if not np.all(np.isfinite(table)):
            raise TPGError(f"{name} contains NaN or inf ({int((~np.isfinite(table)).sum())} entries); "
                           "rewards must be finite")
        return table

    # ------------------------------------------------------------------ tree structure
    @property
    def arity(self) -> int:
        """A: the number of non-EOS tokens (children of a state that are states again)."""
        return self.vocab_size - (self.eos is not None)

    @property
    def states_per_prompt(self) -> int:
        A, H = self.arity, self.horizon
        return H if A == 1 else (A**H - 1) // (A - 1)

    @property
    def num_states(self) -> int:
        """Number of non-terminal prefix states (prompt ⊕ y_<t with t < H, no EOS)."""
        return len(self.prompts) * self.states_per_prompt

    @property
    def responses_per_prompt(self) -> int:
        A, H = self.arity, self.horizon
        return A**H + (self.states_per_prompt if self.eos is not None else 0)

    @property
    def num_responses(self) -> int:
        return len(self.prompts) * self.responses_per_prompt

    def _astronomical(self) -> bool:
        """More than 10^18 states or responses per prompt: no table or enumeration can exist, and the
        exact counts (big integers of up to H·log10 A digits) are not worth forming."""
        return self.arity > 1 and self.horizon * math.log10(self.arity) > 18

    @property
    def additive(self) -> bool:
        """True when RM is the discounted sum of token rewards; False for response-level RM (ZRA)."""
        return self.token_rewards is not None

    def level_start(self) -> np.ndarray:
        """(H + 1,) index of the first state of each level within a prompt's block."""
        A, H = self.arity, self.horizon
        return np.concatenate([[0], np.cumsum([A**t for t in range(H)])]).astype(np.int64)

    def digits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token id → digit in [0, A): EOS is skipped (EOS itself maps to a junk digit)."""
        if self.eos is None:
            return tokens
        return tokens - (tokens > self.eos).long()

    def state_index(self, prompt_idx: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Index of the state before each token: row i, column t ↦ state (prompt_i, tokens[i, :t]).

        prompt_idx (B,), tokens (B, L) → (B, L) int64, a fresh tensor the caller may overwrite.
        Positions after the end of a response (after EOS, or t ≥ H) get some valid row (0 where
        ``mask`` is given); callers mask them out.

        Within a prompt's block the state after digits d_1..d_t is the bijective base-A numeral
        c_t = Σ_k (d_k + 1) A^(t-k), because level_start[t] = 1 + A + … + A^(t-1); so
        c_{t+1} = A·c_t + d_{t+1} + 1 is one fused multiply-add per column. Rows are processed in
        blocks held column-major (L, rows) so every step streams contiguous, cache-resident memory
        and the only large allocation is the output.
        """
        B, L = tokens.shape
        A, H, S = self.arity, self.horizon, self.states_per_prompt
        if self.num_states >= 2**62:
            raise TPGError(f"{self!r} has too many states to index in int64")
        out = host_empty((B, L))                                              # (B, L) int64
        if B == 0 or L == 0:
            return out
        o, tok = out.numpy(), tokens.cpu().numpy()                            # numpy views (no copy)
        base = prompt_idx.cpu().numpy().astype(np.int64) * S                  # (B,) first state of each prompt
        live = min(L, H)                                                      # columns that name real states
        shift = len(self.prompts) > 1                                         # prompt offsets to carry
        for lo in range(0, B, _BLOCK_ROWS):
            hi = min(lo + _BLOCK_ROWS, B)
            buf = np.empty((live, hi - lo), dtype=np.int64)                   # (live, n) column-major block
            buf[0] = base[lo:hi]
            dig = buf[1:]                                                     # (live-1, n): d_t + 1 of token t-1
            dig[...] = tok[lo:hi, : live - 1].T
            if self.eos is not None:
                dig -= dig > self.eos                                         # skip EOS in the numbering
            dig += 1
            np.clip(dig, 1, A, out=dig)                                       # EOS / junk → a valid digit
            step = base[lo:hi] * (1 - A) if shift else None                   # keeps the prompt offset
            for t in range(live - 1):                                         # c_{t+1} = A c_t + d_{t+1} + 1
                buf[t + 1] += buf[t] * A
                if step is not None:
                    buf[t + 1] += step
            o[lo:hi, :live] = buf.T                                           # (n, live)
        if L > live:                                                          # past the horizon: any valid row
            o[:, live:] = base[:, None]
        if mask is not None:
            out.masked_fill_(~mask.bool(), 0)
        return out

    def state_table(self) -> dict[str, np.ndarray]:
        """Per-state (prompt, level, code) and the child table (num_states, V), −1 for terminal."""
        if "states" in self._derived:
            return self._derived["states"]
        A, H, V = self.arity, self.horizon, self.vocab_size
        start = self.level_start()
        level = np.concatenate([np.full(A**t, t) for t in range(H)])
        code = np.concatenate([np.arange(A**t) for t in range(H)])
        P, S = len(self.prompts), self.states_per_prompt
        prompt = np.repeat(np.arange(P), S)
        level, code = np.tile(level, P), np.tile(code, P)
        tok = np.arange(V)
        dig = tok - (tok > self.eos) if self.eos is not None else tok
        child = prompt[:, None] * S + start[np.minimum(level + 1, H)][:, None] + code[:, None] * A + dig[None, :]
        terminal = (level[:, None] == H - 1) | (tok[None, :] == (self.eos if self.eos is not None else -1))
        child = np.where(terminal, -1, child)
        self._derived["states"] = dict(prompt=prompt, level=level, code=code, child=child)
        return self._derived["states"]

    def prefix_of(self, state: int) -> tuple[int, tuple[int, ...]]:
        """(prompt index, response prefix tokens) of a state index (for callables and printing)."""
        st = self.state_table()
        p, t, c = int(st["prompt"][state]), int(st["level"][state]), int(st["code"][state])
        digits = [(c // self.arity**k) % self.arity for k in reversed(range(t))]
        toks = [d + (self.eos is not None and d >= self.eos) for d in digits]
        return p, tuple(int(x) for x in toks)

    def prefix_tokens(self, states: np.ndarray) -> torch.Tensor:
        """(n, H) response-prefix tokens of the given states (0-padded after the prefix): the digits
        of each state's code, most significant first, with EOS skipped (the inverse of state_index)."""
        st = self.state_table()
        states = np.asarray(states, dtype=np.int64)
        level, code = st["level"][states], st["code"][states]                  # (n,) each
        A, H = self.arity, self.horizon
        power = A ** np.clip(level[:, None] - 1 - np.arange(H)[None, :], 0, None)      # (n, H) A^(t-1-k)
        digits = np.where(np.arange(H)[None, :] < level[:, None], code[:, None] // power % A, 0)
        toks = digits + (digits >= self.eos) if self.eos is not None else digits
        return torch.as_tensor(np.where(np.arange(H)[None, :] < level[:, None], toks, 0))

    # ------------------------------------------------------------------ rewards
    def rewards(self, prompt_idx: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rewards (B, L) of this MDP's decomposition and RM (B,), float64.

        Additive MDPs: r from ``token_rewards`` and RM = Σ_t γ^(t-1) r_t. Response-level MDPs:
        RM from ``response_rewards`` and the Zero-Reward decomposition r_T = RM / γ^(T-1).
        """
        B, L = tokens.shape
        m = mask.to(torch.float64)                                                 # (B, L)
        disc = self.gamma ** torch.arange(L, dtype=torch.float64)                  # (L,) γ^(t-1)
        table = self.token_rewards if self.additive else self.response_rewards
        if callable(table) or not self.additive:
            lengths = m.sum(1).long()                                              # (B,)
            last = (lengths - 1).clamp(min=0)                                      # (B,) position of y_T
        if callable(table):
            vals = self._call_rewards(table, prompt_idx, tokens, lengths)          # (B, L), 0 after the end
        elif self.additive:
            flat = self.state_index(prompt_idx, tokens)                            # (B, L) state before token t
            torch.add(tokens, flat, alpha=self.vocab_size, out=flat)               # (B, L) row of (s, y_t) in (S·V,)
            vals = host_empty((B, L), torch.float64)                               # (B, L) r(s_t, y_t)
            torch.index_select(torch.as_tensor(table).reshape(-1), 0, flat.view(-1), out=vals.view(-1))
        if self.additive:
            r = vals.mul_(m)                                                       # (B, L) zero after the end
            return r, r @ disc                                                     # RM = Σ_t γ^(t-1) r_t
        if callable(table):
            rm = vals.gather(1, last[:, None])[:, 0]                              # (B,)
        else:                                                                      # only (s_T, y_T) is read
            s_last = self.state_index(prompt_idx, tokens).gather(1, last[:, None])[:, 0]     # (B,)
            rm = torch.as_tensor(table)[s_last, tokens.gather(1, last[:, None])[:, 0]]      # (B,)
        rm = rm * (lengths > 0)                                                    # an empty row has RM 0
        r = torch.zeros(B, L, dtype=torch.float64)
        if L:
            r[torch.arange(B), last] = rm / disc[last]                            # ZRA: all on the last token
        return r.mul_(m), rm

    def _call_rewards(self, fn: Callable, prompt_idx, tokens, lengths) -> torch.Tensor:
        """(B, L) values of a reward callable: r(x, y_<t, y_t) per token, or RM(x, y) at the last token.
        Every value must be a finite real number (a bool, a string or a vector is refused)."""
        B, L = tokens.shape
        out = np.zeros((B, L))
        toks, lens, pidx = tokens.tolist(), lengths.tolist(), prompt_idx.tolist()
        name = "token_rewards" if self.additive else "response_rewards"
        for i in range(B):
            y = tuple(toks[i][: lens[i]])
            if self.additive:
                vals = [fn(pidx[i], y[:t], y[t]) for t in range(lens[i])]
            else:
                vals = [fn(pidx[i], y)] if lens[i] else []
            for v in map(_scalar, vals):
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
                    raise TPGError(f"the {name} callable must return a float; on prompt {pidx[i]}, response {y} "
                                   f"it returned {validate.show(v, with_type=True)}")
                if not math.isfinite(v):
                    raise TPGError(f"the {name} callable returned NaN or inf on prompt {pidx[i]}, response {y}; "
                                   "rewards must be finite")
            if self.additive:
                out[i, : lens[i]] = [_scalar(v) for v in vals]
            elif lens[i]:
                out[i, lens[i] - 1] = _scalar(vals[0])
        return torch.as_tensor(out)

    def zra(self) -> "TokenMDP":
        """The same MDP with the Zero-Reward decomposition of the same RM (PAPER §1.4).

        J, ∇J and γ^(t-1)A_t are unchanged; V and Q change (PAPER §7 item 7). Each complete
        response ends at exactly one terminal (state, token) pair (the tree of §1.2), so the RM of
        the response ⊕-built from each terminal pair fills the table: one row per response, as many
        as an enumeration, refused above the same budget.
        """
        if not self.additive:
            return self
        if self._astronomical() or self.num_responses > DEFAULT_BUDGET:
            n = f"~10^{self.horizon * math.log10(self.arity):.0f}" if self._astronomical() else f"{self.num_responses:,}"
            raise BudgetError(f"the Zero-Reward table of {self!r} needs {n} responses, above the budget of "
                              f"{DEFAULT_BUDGET:,}. Use Monte Carlo instead, or the additive MDP itself")
        N = self.num_responses
        st = self.state_table()
        s_last, y_last = np.nonzero(st["child"] < 0)                               # (N,) terminal pairs
        level = st["level"][s_last]                                                # (N,) position of y_T − 1
        tokens = self.prefix_tokens(s_last)                                        # (N, H)
        tokens[torch.arange(N), torch.as_tensor(level)] = torch.as_tensor(y_last)
        mask = torch.arange(self.horizon)[None, :] <= torch.as_tensor(level)[:, None]  # (N, H)
        _, rm = self.rewards(torch.as_tensor(st["prompt"][s_last]), tokens, mask)
        table = np.zeros((self.num_states, self.vocab_size))
        table[s_last, y_last] = rm.numpy()
        return TokenMDP(self.prompts, self.vocab_size, self.horizon, self.eos, self.gamma, self.prompt_probs,
                        response_rewards=table, name=(self.name + " (ZRA)").strip())

    def __repr__(self) -> str:
        kind = "token rewards" if self.additive else "response rewards"
        digits = self.horizon * math.log10(self.arity)                 # str(int) refuses beyond 4,300 digits
        n = self.num_responses if digits < 4000 else f"~10^{digits:.0f}"
        return (f"TokenMDP({self.name + ', ' if self.name else ''}P={len(self.prompts)}, V={self.vocab_size}, "
                f"H={self.horizon}, eos={self.eos}, γ={self.gamma:g}, {kind}, "
                f"{n} responses)")


def _scalar(v):
    """A 0-d tensor or array returned by a reward callable, as its Python number."""
    return v.item() if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0 else v


REWARD_KINDS = ("gaussian", "sparse", "binary", "zra")


def random_mdp(seed: int = 0, *, vocab_size: int = 3, horizon: int = 3, eos: bool = True, n_prompts: int = 1,
               prompt_len: int = 1, gamma: float = 1.0, reward: str = "gaussian", sparsity: float = 0.7,
               prompt_probs: Sequence[float] | None = None) -> TokenMDP:
    """A seeded random token MDP for tests, hypothesis strategies and figures.

    reward kinds: "gaussian" (dense N(0,1) token rewards), "sparse" (token rewards zero with
    probability ``sparsity``), "binary" (response-level RM ∈ {0, 1}, correct/incorrect, with a
    per-prompt success rate), "zra" (response-level N(0,1) RM: the Zero-Reward-Assumption form).
    With eos=True the EOS id is vocab_size - 1.
    """
    validate.seed("seed", seed)
    validate.choice("reward", reward, REWARD_KINDS)
    validate.boolean("eos", eos)
    validate.integer("vocab_size", vocab_size, 1 + bool(eos), why=f" (eos={eos} needs one token besides EOS)"
                     if eos else "")
    validate.integer("n_prompts", n_prompts, 1)
    validate.integer("prompt_len", prompt_len, 0)
    validate.real("sparsity", sparsity, 0.0, 1.0)
    rng = np.random.default_rng(seed)
    eos_id = vocab_size - 1 if eos else None
    A = vocab_size - (eos_id is not None)
    prompts = [tuple(int(t) for t in rng.integers(0, A, size=prompt_len)) for _ in range(n_prompts)]
    probe = TokenMDP(prompts, vocab_size, horizon, eos_id, gamma, prompt_probs, token_rewards=lambda *a: 0.0)
    shape = (probe.num_states, vocab_size)
    if shape[0] * shape[1] > TABLE_BUDGET:
        raise BudgetError(f"random_mdp would draw a reward table of num_states × V = {shape[0] * shape[1]:,} entries "
                          f"for {probe!r}, above the table budget of {TABLE_BUDGET:,}; build a TokenMDP with a "
                          "callable reward instead, or use a smaller vocabulary / horizon")
    if reward == "gaussian":
        return TokenMDP(prompts, vocab_size, horizon, eos_id, gamma, prompt_probs,
                        token_rewards=rng.standard_normal(shape), name=f"random(seed={seed})")
    if reward == "sparse":
        r = rng.standard_normal(shape) * (rng.random(shape) >= sparsity)
        return TokenMDP(prompts, vocab_size, horizon, eos_id, gamma, prompt_probs,
                        token_rewards=r, name=f"random-sparse(seed={seed})")
    if reward == "binary":
        rate = rng.uniform(0.2, 0.8, size=n_prompts)[probe.state_table()["prompt"]]  # (num_states,)
        r = (rng.random(shape) < rate[:, None]).astype(float)
        return TokenMDP(prompts, vocab_size, horizon, eos_id, gamma, prompt_probs,
                        response_rewards=r, name=f"random-binary(seed={seed})")
    return TokenMDP(prompts, vocab_size, horizon, eos_id, gamma, prompt_probs,
                    response_rewards=rng.standard_normal(shape), name=f"random-zra(seed={seed})")
