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

import numbers
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

DEFAULT_BUDGET = 10_000_000  # responses an enumeration may hold before it refuses
TABLE_BUDGET = 100_000_000   # entries of a per-(state, token) table (800 MB in float64) before refusing
_BLOCK_ROWS = 1 << 14        # rows per block in state_index: the (L, rows) work buffer stays in cache


class TPGError(ValueError):
    """A user-facing error: the message says what is wrong and what to do."""


class BudgetError(TPGError):
    """An exact computation was refused before allocating because it is too large."""


def host_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.long) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory numpy allocates.

    numpy asks the kernel for transparent huge pages on large arrays (madvise), torch's default
    allocator does not, so first-touch page faults cost several times the arithmetic on an
    (N, H) index array of a million-response enumeration. Used for tpg's own large buffers.
    """
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


def _is_int(x) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise TPGError(msg)


def check_output_path(path: str | None, flag: str = "--json") -> None:
    """Refuse, before any work, an output file that could not be written (missing or read-only
    directory, or a directory given as the file), so a long run never fails at its very end."""
    if path is None:
        return
    full = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(full)
    _check(not os.path.isdir(full), f"{flag} {path} is a directory: give a file path, e.g. {flag} out.json")
    _check(os.path.isdir(folder), f"{flag} {path}: directory {folder} does not exist; create it first")
    _check(os.access(folder, os.W_OK), f"{flag} {path}: directory {folder} is not writable; choose another path")
    _check(not os.path.exists(full) or os.access(full, os.W_OK),
           f"{flag} {path}: the file exists and is not writable; choose another path")


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
        V, H = self.vocab_size, self.horizon
        _check(_is_int(V) and V >= 1, f"vocab_size must be an int ≥ 1, got {V!r}")
        _check(_is_int(H) and H >= 1, f"horizon must be an int ≥ 1, got {H!r}")
        if self.eos is not None:
            _check(_is_int(self.eos) and 0 <= self.eos < V,
                   f"eos={self.eos!r} is not a token id in [0, {V}); pass eos=None for fixed-length responses")
            _check(V >= 2, "a vocabulary with EOS needs at least one other token (vocab_size ≥ 2)")
        _check(isinstance(self.gamma, numbers.Real) and not isinstance(self.gamma, bool)
               and 0.0 < float(self.gamma) <= 1.0, f"gamma must be a number in (0, 1], got {self.gamma!r}")
        self.gamma = float(self.gamma)
        try:
            prompts = tuple(tuple(p) for p in self.prompts)
        except TypeError:
            raise TPGError(f"prompts must be a list of token sequences, e.g. [(0, 1), ()], got {self.prompts!r}") from None
        _check(len(prompts) >= 1, "an MDP needs at least one prompt (an empty prompt () is allowed)")
        for i, p in enumerate(prompts):
            for t in p:
                _check(_is_int(t) and 0 <= t < V and t != self.eos,
                       f"prompt {i} has token {t!r}: prompt tokens must be ints in [0, {V}) and not EOS")
        self.prompts = tuple(tuple(int(t) for t in p) for p in prompts)
        P = len(self.prompts)
        try:
            rho = np.full(P, 1.0 / P) if self.prompt_probs is None else np.asarray(self.prompt_probs, float)
        except (TypeError, ValueError):
            raise TPGError(f"prompt_probs must be {P} numbers, got {self.prompt_probs!r}") from None
        _check(rho.shape == (P,), f"prompt_probs has shape {rho.shape}, expected ({P},)")
        _check(bool(np.all(np.isfinite(rho)) and np.all(rho >= 0)), "prompt_probs must be finite and ≥ 0")
        _check(abs(rho.sum() - 1.0) < 1e-9, f"prompt_probs must sum to 1, sum is {rho.sum():.6g}")
        self.prompt_probs = rho
        _check((self.token_rewards is None) != (self.response_rewards is None),
               "give exactly one of token_rewards (additive RM) or response_rewards (RM of the whole response)")
        for name in ("token_rewards", "response_rewards"):
            table = getattr(self, name)
            if table is None or callable(table):
                continue
            try:
                table = np.asarray(table, dtype=np.float64)
            except (TypeError, ValueError):
                raise TPGError(f"{name} must be a (num_states, V) array of numbers or a callable") from None
            _check(table.shape == (self.num_states, V),
                   f"{name} has shape {table.shape}, expected (num_states, V) = ({self.num_states}, {V})")
            _check(bool(np.all(np.isfinite(table))), f"{name} contains NaN or inf")
            setattr(self, name, table)

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
        _check(self.num_states < 2**62, f"{self!r} has too many states to index in int64")
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
        """(B, L) values of a reward callable: r(x, y_<t, y_t) per token, or RM(x, y) at the last token."""
        B, L = tokens.shape
        out = np.zeros((B, L))
        toks, lens, pidx = tokens.tolist(), lengths.tolist(), prompt_idx.tolist()
        name = "token_rewards" if self.additive else "response_rewards"
        for i in range(B):
            y = tuple(toks[i][: lens[i]])
            try:
                if self.additive:
                    out[i, : lens[i]] = [fn(pidx[i], y[:t], y[t]) for t in range(lens[i])]
                elif lens[i]:
                    out[i, lens[i] - 1] = fn(pidx[i], y)
            except (TypeError, ValueError) as e:
                raise TPGError(f"the {name} callable must return a float; on prompt {pidx[i]}, response {y}: {e}") from e
            if not np.isfinite(out[i]).all():
                raise TPGError(f"the {name} callable returned NaN or inf on prompt {pidx[i]}, response {y}; "
                               "rewards must be finite")
        return torch.as_tensor(out)

    def zra(self) -> "TokenMDP":
        """The same MDP with the Zero-Reward decomposition of the same RM (PAPER §1.4).

        J, ∇J and γ^(t-1)A_t are unchanged; V and Q change (PAPER §7 item 7).
        """
        if not self.additive:
            return self
        from tpg.rollouts import enumerate_responses  # local import: rollouts imports mdp
        enum = enumerate_responses(self)
        s_last = self.state_index(enum.prompt_idx, enum.tokens, enum.mask)
        last = enum.lengths - 1
        rows = s_last[torch.arange(enum.batch_size), last].numpy()
        toks = enum.tokens[torch.arange(enum.batch_size), last].numpy()
        table = np.zeros((self.num_states, self.vocab_size))
        table[rows, toks] = enum.rm.numpy()
        return TokenMDP(self.prompts, self.vocab_size, self.horizon, self.eos, self.gamma, self.prompt_probs,
                        response_rewards=table, name=(self.name + " (ZRA)").strip())

    def __repr__(self) -> str:
        kind = "token rewards" if self.additive else "response rewards"
        return (f"TokenMDP({self.name + ', ' if self.name else ''}P={len(self.prompts)}, V={self.vocab_size}, "
                f"H={self.horizon}, eos={self.eos}, γ={self.gamma:g}, {kind}, "
                f"{self.num_responses} responses)")


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
    _check(_is_int(seed) and seed >= 0, f"seed must be an int ≥ 0 (numpy seeds are non-negative), got {seed!r}")
    _check(reward in REWARD_KINDS, f"reward must be one of {REWARD_KINDS}, got {reward!r}")
    _check(_is_int(vocab_size) and vocab_size >= 1 + bool(eos),
           f"vocab_size must be an int ≥ {1 + bool(eos)} (eos={eos} needs one token besides EOS), got {vocab_size!r}")
    _check(_is_int(n_prompts) and n_prompts >= 1, f"n_prompts must be an int ≥ 1, got {n_prompts!r}")
    _check(_is_int(prompt_len) and prompt_len >= 0, f"prompt_len must be an int ≥ 0, got {prompt_len!r}")
    _check(isinstance(sparsity, numbers.Real) and 0.0 <= sparsity <= 1.0, f"sparsity must be in [0, 1], got {sparsity!r}")
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
