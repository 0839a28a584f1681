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

from tpg.mdp import DEFAULT_BUDGET, BudgetError, TokenMDP, TPGError


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
def check_budget(n: int, budget: int | None, what: str) -> None:
    budget = DEFAULT_BUDGET if budget is None else budget
    if n > budget:
        raise BudgetError(f"exact enumeration of {what} needs {n:,} items, above the budget of {budget:,}. "
                          "Use Monte Carlo (tpg.rollouts.sample / tpg.verify.mc_check) or pass a larger budget=.")


def enumerate_responses(mdp: TokenMDP, budget: int | None = None) -> Rollouts:
    """Every complete response of every prompt, in a fixed order (prompt-major), padded to H.

    Refuses, before allocating, an MDP with more than ``budget`` responses (default 10^7).
    """
    N = mdp.num_responses
    check_budget(N, budget, f"{mdp!r}")
    A, H, eos = mdp.arity, mdp.horizon, mdp.eos
    blocks, lens = [], []
    levels = range(H) if eos is not None else []
    for t in list(levels) + [H]:                      # responses ending with EOS at position t+1, then length H
        n = A**t
        digits = (np.arange(n)[:, None] // A ** np.arange(t - 1, -1, -1)[None, :]) % A  # (n, t), MSB first
        toks = digits + (digits >= eos) if eos is not None else digits
        block = np.zeros((n, H), dtype=np.int64)
        block[:, :t] = toks
        if t < H:
            block[:, t] = eos
        blocks.append(block)
        lens.append(np.full(n, t + 1 if t < H else H))
    one = torch.as_tensor(np.concatenate(blocks))                    # (R, H) responses of one prompt
    one_len = torch.as_tensor(np.concatenate(lens))                  # (R,)
    P, R = len(mdp.prompts), one.shape[0]
    tokens = one.repeat(P, 1)                                        # (P·R, H)
    lengths = one_len.repeat(P)
    prompt_idx = torch.arange(P).repeat_interleave(R)
    mask = (torch.arange(H)[None, :] < lengths[:, None])
    ids = torch.arange(P * R)
    return _finish(mdp, prompt_idx, tokens, mask, ids, ids, P * R, response_id=ids)


def response_log_prob(policy, ro: Rollouts) -> torch.Tensor:
    """(B,) log π(y|x) = Σ_t log π(y_t|s_t) over the response, with autograd to θ."""
    return (policy.token_log_probs(ro.prompt_idx, ro.tokens) * ro.mask).sum(1)


# ---------------------------------------------------------------------------------- decoding
def decode(mdp: TokenMDP, policy, prompt_idx: torch.Tensor, prefix: torch.Tensor, prefix_len: torch.Tensor,
           pick) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Complete each prefix to a full response with ``pick(log_probs (B, V)) -> tokens (B,)``.

    prefix (B, L0) right-padded, prefix_len (B,). Rows whose prefix is already complete (length H
    or ending in EOS) are returned unchanged. Returns tokens (B, H), mask (B, H) bool and the
    behaviour log-probs (B, H) of the tokens this call chose (0 elsewhere). Vectorised over rows:
    the only Python loop is over the ≤ H positions.
    """
    B, H = len(prompt_idx), mdp.horizon
    tokens = torch.zeros(B, H, dtype=torch.long)
    L0 = min(prefix.shape[1], H)
    tokens[:, :L0] = prefix[:, :L0]
    pos = prefix_len.long().clone()                                          # (B,) next position to fill
    last = tokens.gather(1, (pos - 1).clamp(min=0)[:, None])[:, 0]
    done = (pos >= H) | ((pos > 0) & (last == mdp.eos) if mdp.eos is not None else torch.zeros(B, dtype=torch.bool))
    logp = torch.zeros(B, H, dtype=torch.float64)
    if bool(done.all()):
        return tokens, torch.arange(H)[None, :] < pos[:, None], logp
    dec = policy.decoder(prompt_idx, tokens[:, : max(int(pos[~done].max()), 0)], torch.where(done, 0, pos))
    rows = torch.arange(B)
    for _ in range(H - int(pos[~done].min())):
        lp = dec.log_probs.detach()                                          # (B, V)
        tok = pick(lp)                                                       # (B,)
        live = ~done
        at = pos.clamp(max=H - 1)
        tokens[rows[live], at[live]] = tok[live]
        logp[rows[live], at[live]] = lp[live].gather(1, tok[live][:, None])[:, 0].to(torch.float64)
        pos = pos + live.long()
        done = done | (pos >= H) | ((tok == mdp.eos) & live if mdp.eos is not None else False)
        if bool(done.all()):
            break
        dec.advance(torch.where(live, tok, torch.zeros_like(tok)))
    return tokens, torch.arange(H)[None, :] < pos[:, None], logp


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
