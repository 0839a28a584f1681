"""Rollouts: one batch type for enumerated, sampled and GPT-2 responses; the sampler; the enumerator.

A ``Rollouts`` holds B responses padded to L = H tokens. Responses are grouped by prompt draw
(``group``: G responses per prompt, the GRPO/RLOO group) and by independent batch (``batch``: the
exact engine stacks many possible batches into one tensor, and every batch-level reduction, e.g.
token-mean aggregation or whitening, is a segment reduction over ``batch``). Nothing in it assumes
a tabular policy: ``logp`` comes from any policy's ``token_log_probs``.

Estimators may ask for extra draws, stored in ``extras`` (all float64 unless noted):
- ``greedy_rm`` (B,): RM of the greedy response to the row's prompt (ReMax).
- ``cont_rm`` (B, L+1, K): RM of K continuation rollouts from each prefix y_<=t, t = 0..L; at and
  after the end of the response every entry is RM(y) (TRePO, VinePPO).
- ``values`` (B, L): a critic's V̂ of the state before token t (PPO/GAE, verl's convention).
- ``ref_logp`` (B, L): log π_ref of the sampled tokens (KL terms).
- ``anchors`` (B, L) bool: TRePO anchor positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from tpg.mdp import DEFAULT_BUDGET, BudgetError, TokenMDP, TPGError, host_empty


@dataclass
class Rollouts:
    prompt_idx: torch.Tensor            # (B,) int64
    tokens: torch.Tensor                # (B, L) int64, 0 after the end
    mask: torch.Tensor                  # (B, L) float64, 1 on response tokens (EOS included)
    token_rewards: torch.Tensor         # (B, L) float64, this MDP's decomposition
    rm: torch.Tensor                    # (B,) float64, response-level reward RM(x, y)
    group: torch.Tensor                 # (B,) int64 group id (same prompt draw), unique across batches
    batch: torch.Tensor                 # (B,) int64 independent-batch id in [0, n_batches)
    n_batches: int = 1
    logp: torch.Tensor | None = None    # (B, L) log π_θ(y_t|s_t), attached to θ (or a leaf) when scored
    logp_old: torch.Tensor | None = None  # (B, L) behaviour-policy log-probs, detached
    response_id: torch.Tensor | None = None  # (B,) row of the enumeration (exact mode)
    extras: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1).long()                                  # (B,)

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1 if self.batch_size else 0

    def select(self, rows: torch.Tensor, **changes) -> "Rollouts":
        """The rows ``rows`` of every per-row field (extras included)."""
        pick = lambda v: None if v is None else v[rows]
        ex = {k: v[rows] for k, v in self.extras.items()}
        out = replace(self, prompt_idx=self.prompt_idx[rows], tokens=self.tokens[rows], mask=self.mask[rows],
                      token_rewards=self.token_rewards[rows], rm=self.rm[rows], group=self.group[rows],
                      batch=self.batch[rows], logp=pick(self.logp), logp_old=pick(self.logp_old),
                      response_id=pick(self.response_id), extras=ex)
        return replace(out, **changes)

    def score(self, policy) -> "Rollouts":
        """Attach log π_θ of the sampled tokens (with autograd to θ); logp_old defaults to it, detached."""
        logp = policy.token_log_probs(self.prompt_idx, self.tokens) * self.mask   # (B, L)
        old = logp.detach() if self.logp_old is None else self.logp_old
        return replace(self, logp=logp, logp_old=old)


def _finish(mdp: TokenMDP, prompt_idx, tokens, mask, group, batch, n_batches, logp_old=None, response_id=None):
    tokens = tokens * mask.long()
    r, rm = mdp.rewards(prompt_idx, tokens, mask)
    return Rollouts(prompt_idx, tokens, mask.to(torch.float64), r, rm, group, batch, n_batches,
                    logp_old=logp_old, response_id=response_id)


# ---------------------------------------------------------------------------------- enumeration
def check_budget(n: int, budget: int | None, what: str, unit: str = "responses") -> None:
    """Refuse, before anything is allocated, an exact job of ``n`` units above ``budget``."""
    budget = DEFAULT_BUDGET if budget is None else budget
    if n > budget:
        raise BudgetError(f"exact enumeration of {what} needs {n:,} {unit}, above the budget of {budget:,}. "
                          "Use Monte Carlo instead (tpg.rollouts.sample, tpg.verify.mc_check, tpg.mc) "
                          "or pass a larger budget=.")


def enumerate_responses(mdp: TokenMDP, budget: int | None = None) -> Rollouts:
    """Every complete response of every prompt, in a fixed order (prompt-major), padded to H.

    Within a prompt: the responses that end with EOS at position 1, 2, …, H (EOS MDPs only), then
    the responses of length H; each block in lexicographic order of its digits (token ids with EOS
    skipped). Refuses, before allocating, an MDP with more than ``budget`` responses (default 10^7).
    """
    N = mdp.num_responses
    check_budget(N, budget, f"{mdp!r}")
    A, H, eos = mdp.arity, mdp.horizon, mdp.eos
    P, R = len(mdp.prompts), mdp.responses_per_prompt
    tokens = host_empty((N, H))                                      # (P·R, H), 0 after the end
    mask = host_empty((N, H), torch.float64)                         # (P·R, H)
    tok, msk = tokens.numpy(), mask.numpy()
    digit_token = np.arange(A) + (np.arange(A) >= eos) if eos is not None else np.arange(A)   # (A,)
    prefixes = np.zeros((1, H), dtype=np.int64)                      # (A^t, H): every t-token prefix, 0-padded
    off = 0
    for t in range(H + 1):
        n = A**t
        if t < H and eos is not None:                                # the prefix, then EOS at position t+1
            tok[off: off + n] = prefixes
            tok[off: off + n, t] = eos
            msk[off: off + n, : t + 1] = 1.0
            msk[off: off + n, t + 1:] = 0.0
            off += n
        if t < H:                                                    # extend every prefix by every digit
            nxt = np.empty((n, A, H), dtype=np.int64) if t + 1 < H else tok[off: off + n * A].reshape(n, A, H)
            nxt[...] = prefixes[:, None, :]                          # (n, A, H) rows in lexicographic order
            nxt[:, :, t] = digit_token
            prefixes = nxt.reshape(n * A, H)
    msk[off: off + A**H] = 1.0                                       # the length-H block (written in place above)
    if P > 1:                                                        # the same responses for every prompt
        tok.reshape(P, R, H)[1:] = tok[:R]
        msk.reshape(P, R, H)[1:] = msk[:R]
    prompt_idx = torch.arange(P).repeat_interleave(R)                # (P·R,)
    ids = torch.arange(N)
    r, rm = mdp.rewards(prompt_idx, tokens, mask)                    # tokens are already 0 after the end
    return Rollouts(prompt_idx, tokens, mask, r, rm, ids, ids, N, response_id=ids)


def response_log_prob(policy, ro: Rollouts) -> torch.Tensor:
    """(B,) log π(y|x) = Σ_t log π(y_t|s_t) over the response, with autograd to θ."""
    return (policy.token_log_probs(ro.prompt_idx, ro.tokens) * ro.mask).sum(1)


# ---------------------------------------------------------------------------------- decoding
def decode(mdp: TokenMDP, policy, prompt_idx: torch.Tensor, prefix: torch.Tensor, prefix_len: torch.Tensor,
           pick) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Complete each prefix to a full response with ``pick(log_probs (n, V)) -> tokens (n,)``.

    prefix (B, L0) right-padded, prefix_len (B,). Rows whose prefix is already complete (length H
    or ending in EOS) are returned unchanged. Returns tokens (B, H), mask (B, H) bool and the
    behaviour log-probs (B, H) of the tokens this call chose (0 elsewhere). Vectorised over rows:
    the only Python loop is over the ≤ H positions. ``pick`` sees the rows still being decoded,
    in row order: when the decoder has ``select(rows)`` (tabular and log-linear policies), finished
    rows are dropped once half the rows are done, so the work tracks the tokens actually sampled.
    """
    B, H = len(prompt_idx), mdp.horizon
    tokens = torch.zeros(B, H + 1, dtype=torch.long)                         # column H: sink for finished rows
    L0 = min(prefix.shape[1], H)
    tokens[:, :L0] = prefix[:, :L0]
    pos = torch.zeros(B + 1, dtype=torch.long)                               # (B+1,) lengths; entry B: sink
    pos[:B] = prefix_len.long()
    last = tokens.gather(1, (pos[:B] - 1).clamp(min=0)[:, None])[:, 0]
    done = (pos[:B] >= H) | ((pos[:B] > 0) & (last == mdp.eos) if mdp.eos is not None
                             else torch.zeros(B, dtype=torch.bool))
    logp = torch.zeros(B, H + 1, dtype=torch.float64)
    if bool(done.all()):
        return tokens[:, :H], torch.arange(H)[None, :] < pos[:B, None], logp[:, :H]
    rows = torch.nonzero(~done)[:, 0]                                        # (n,) rows being decoded
    p = pos[rows]                                                            # (n,) next position, H once finished
    dec = policy.decoder(prompt_idx[rows], tokens[rows, : int(p.max())], p)
    eos = -1 if mdp.eos is None else mdp.eos
    flat_tok, flat_lp = tokens.view(-1), logp.view(-1)
    for _ in range(H - int(p.min())):
        lp = dec.log_probs.detach()                                          # (n, V)
        tok = pick(lp)                                                       # (n,)
        fin = p >= H                                                         # (n,) finished before this step
        at = rows * (H + 1) + p                                              # (n,) flat slot; finished → sink column
        flat_tok.scatter_(0, at, tok)                                        # scatter_: index_put is ~5× slower
        flat_lp.scatter_(0, at, lp.gather(1, tok[:, None])[:, 0].to(torch.float64))
        pos.scatter_(0, torch.where(fin, B, rows), p + 1)                    # length so far
        p = torch.where(fin | (tok == eos), H, p + 1)                        # (n,) finished rows park at H
        n_open = int((p < H).sum())
        if n_open == 0:
            break
        select = getattr(dec, "select", None)
        if select is not None and 2 * n_open <= len(rows):                   # drop finished rows
            idx = torch.nonzero(p < H)[:, 0]                                 # (n_open,)
            dec = select(idx)
            rows, p, tok = rows[idx], p[idx], tok[idx]
        dec.advance(torch.where(p < H, tok, torch.zeros_like(tok)))
    return tokens[:, :H], torch.arange(H)[None, :] < pos[:B, None], logp[:, :H]


def categorical(generator: torch.Generator):
    """pick() that samples by inverse CDF with an explicit generator (one uniform per row)."""
    def pick(lp: torch.Tensor) -> torch.Tensor:
        cdf = lp.exp().cumsum(-1)                                            # (B, V)
        u = torch.rand(lp.shape[0], 1, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
        return (cdf < u).sum(-1).clamp(max=lp.shape[-1] - 1)                 # (B,)
    return pick


def greedy_pick(lp: torch.Tensor) -> torch.Tensor:
    """argmax with a fixed tie-break: the lowest token id among the maxima."""
    return torch.argmax(lp, -1)   # torch.argmax returns the first maximal index


def sample(mdp: TokenMDP, policy, G: int, generator: torch.Generator, *, n_prompts: int = 1,
           prompt_idx: torch.Tensor | None = None, n_batches: int = 1) -> Rollouts:
    """``n_batches`` independent batches of ``n_prompts`` prompt draws (i.i.d. from ρ, or the given
    ``prompt_idx`` for every batch), each with G responses sampled from the policy."""
    if not isinstance(G, int) or G < 1:
        raise TPGError(f"group size G must be an int ≥ 1, got {G!r}")
    if not isinstance(generator, torch.Generator):
        raise TPGError("sample() needs an explicit torch.Generator (tpg never seeds globally)")
    for name, v in (("n_prompts", n_prompts), ("n_batches", n_batches)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise TPGError(f"{name} must be an int ≥ 1, got {v!r}")
    if prompt_idx is None:
        rho = torch.as_tensor(mdp.prompt_probs)
        prompt_idx = torch.multinomial(rho, n_prompts * n_batches, replacement=True, generator=generator)
    else:
        prompt_idx = torch.as_tensor(prompt_idx).long().repeat(n_batches)
        n_prompts = len(prompt_idx) // n_batches
    slots = len(prompt_idx)
    pidx = prompt_idx.repeat_interleave(G)                                   # (slots·G,)
    B = len(pidx)
    tokens, mask, logp = decode(mdp, policy, pidx, torch.zeros(B, 0, dtype=torch.long),
                                torch.zeros(B, dtype=torch.long), categorical(generator))
    group = torch.arange(slots).repeat_interleave(G)
    batch = group // n_prompts
    return _finish(mdp, pidx, tokens, mask, group, batch, n_batches, logp_old=logp)


def greedy(mdp: TokenMDP, policy, prompt_idx: torch.Tensor) -> Rollouts:
    """The greedy (argmax, lowest-id tie-break) response to each prompt; deterministic given θ."""
    B = len(prompt_idx)
    tokens, mask, logp = decode(mdp, policy, prompt_idx, torch.zeros(B, 0, dtype=torch.long),
                                torch.zeros(B, dtype=torch.long), greedy_pick)
    ids = torch.arange(B)
    return _finish(mdp, prompt_idx, tokens, mask, ids, ids, B, logp_old=logp)


def continuation_rm(mdp: TokenMDP, policy, ro: Rollouts, K: int, generator: torch.Generator) -> torch.Tensor:
    """(B, L+1, K) RM of K fresh continuations from every prefix y_<=t, t = 0..L, of every row.

    Prefixes at or past the end of the response are complete: their entries are RM(y) exactly.
    """
    if not isinstance(K, int) or K < 1:
        raise TPGError(f"number of continuation rollouts K must be an int ≥ 1, got {K!r}")
    B, L = ro.tokens.shape
    t = torch.arange(L + 1)
    plen = torch.minimum(t[None, :].expand(B, L + 1), ro.lengths[:, None])  # (B, L+1) prefix lengths
    rows = torch.arange(B)[:, None].expand(B, L + 1)
    open_ = plen < ro.lengths[:, None]                                         # (B, L+1) prefixes to roll out
    r_idx, p_len = rows[open_], plen[open_]
    out = ro.rm[:, None, None].expand(B, L + 1, K).clone()                     # complete prefixes: RM(y)
    if len(r_idx):
        r_idx, p_len = r_idx.repeat_interleave(K), p_len.repeat_interleave(K)  # (n·K,)
        prefix = ro.tokens[r_idx] * (torch.arange(L)[None, :] < p_len[:, None])
        tok, mask, _ = decode(mdp, policy, ro.prompt_idx[r_idx], prefix, p_len, categorical(generator))
        _, rm = mdp.rewards(ro.prompt_idx[r_idx], tok * mask, mask)
        out[open_] = rm.view(-1, K)
    return out
