"""Rollouts: one batch type for enumerated, sampled and GPT-2 responses; the sampler; the enumerator.

A ``Rollouts`` holds B responses padded to L = H tokens. Responses are grouped by prompt draw
(``group``: G responses per prompt, the GRPO/RLOO group) and by independent batch (``batch``: the
exact engine stacks many possible batches into one tensor, and every batch-level reduction, e.g.
token-mean aggregation or whitening, is a segment reduction over ``batch``). Nothing in it assumes
a tabular policy: ``logp`` comes from any policy's ``token_log_probs``.

Estimators may ask for extra draws (``needs``, checked against ``tpg.estimators.NEEDS``), found in
``extras`` (all float64 unless noted; reading one that was not requested raises a TPGError naming
the request to add):
- ``greedy_rm`` (B,): RM of the greedy response to the row's prompt (ReMax).
- ``cont_rm`` (B, L+1, K): RM of K continuation rollouts from each prefix y_<=t, t = 0..L; at and
  after the end of the response every entry is RM(y) (TRePO, VinePPO).
- ``values`` (B, L): a critic's V̂ of the state before token t (PPO/GAE, verl's convention).
- ``ref_logp`` (B, L): log π_ref of the sampled tokens (KL terms).
- ``anchors`` (B, L) bool: TRePO anchor positions.

Context an estimator may read without closures: ``ro.mdp`` (so ``ro.gamma``), ``ro.states`` (B, L)
the state index of the prefix before each token, ``ro.positions`` (1, L) = 1..L, ``ro.lengths``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from tpg import validate
from tpg.mdp import DEFAULT_BUDGET, BudgetError, TokenMDP, TPGError, host_empty


EXTRAS = ("greedy_rm", "cont_rm", "values", "ref_logp", "anchors")
_REQUEST = {"greedy_rm": "needs={'greedy': True}", "cont_rm": "needs={'continuations': K}",
            "values": "needs={'values': True} (and a critic=)", "ref_logp": "needs={'ref': True} (and a ref=)",
            "anchors": "needs={'anchors': spec}"}


class Extras(dict):
    """The extra draws of a batch: a dict of the keys in ``EXTRAS`` whose missing entries explain
    which request would have filled them (instead of a bare KeyError)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        for k in self:
            self._check(k)

    @staticmethod
    def _check(key):
        if key not in EXTRAS:
            raise TPGError(f"unknown extra draw {key!r}; the extras are {EXTRAS}")

    def __setitem__(self, key, value):
        self._check(key)
        super().__setitem__(key, value)

    def __missing__(self, key):
        self._check(key)
        raise TPGError(f"this estimator reads extras[{key!r}], which was not drawn: declare it with "
                       f"{_REQUEST[key]} (register_advantage(..., needs=...) or an attribute ``needs`` on a callable)")


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
    kl_reward: torch.Tensor | None = None  # (B, L) β·kl_t subtracted from the rewards (KL in the reward)
    mdp: TokenMDP | None = None         # the MDP the responses come from (context for estimators)
    logp_rollout: torch.Tensor | None = None  # (B, L) log μ of the policy that sampled them (the rollout engine), detached

    def __post_init__(self):
        if not isinstance(self.extras, Extras):
            self.extras = Extras(self.extras)

    @property
    def gamma(self) -> float:
        if self.mdp is None:
            raise TPGError("these rollouts carry no MDP (ro.mdp is None), so no γ")
        return self.mdp.gamma

    @property
    def states(self) -> torch.Tensor:
        """(B, L) state index (``TokenMDP.state_index``) of the prefix before each token, 0 after the end."""
        if self.mdp is None:
            raise TPGError("these rollouts carry no MDP (ro.mdp is None), so no state index")
        return self.mdp.state_index(self.prompt_idx, self.tokens, self.mask)

    @property
    def positions(self) -> torch.Tensor:
        """(1, L) token positions t = 1..L (broadcast against (B, L))."""
        return torch.arange(1, self.tokens.shape[1] + 1)[None, :]

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
        ex = Extras({k: v[rows] for k, v in self.extras.items()})
        out = replace(self, prompt_idx=self.prompt_idx[rows], tokens=self.tokens[rows], mask=self.mask[rows],
                      token_rewards=self.token_rewards[rows], rm=self.rm[rows], group=self.group[rows],
                      batch=self.batch[rows], logp=pick(self.logp), logp_old=pick(self.logp_old),
                      response_id=pick(self.response_id), extras=ex, kl_reward=pick(self.kl_reward),
                      logp_rollout=pick(self.logp_rollout))
        return replace(out, **changes)

    def score(self, policy) -> "Rollouts":
        """Attach log π_θ of the sampled tokens (with autograd to θ); logp_old defaults to it, detached,
        and logp_rollout to logp_old (the batch was sampled by θ_old)."""
        logp = policy.token_log_probs(self.prompt_idx, self.tokens) * self.mask   # (B, L)
        old = logp.detach() if self.logp_old is None else self.logp_old
        return replace(self, logp=logp, logp_old=old, logp_rollout=old if self.logp_rollout is None else self.logp_rollout)


def _finish(mdp: TokenMDP, prompt_idx, tokens, mask, group, batch, n_batches, logp_old=None, response_id=None):
    tokens = tokens * mask.long()
    r, rm = mdp.rewards(prompt_idx, tokens, mask)
    return Rollouts(prompt_idx, tokens, mask.to(torch.float64), r, rm, group, batch, n_batches,
                    logp_old=logp_old, response_id=response_id, mdp=mdp)


# ---------------------------------------------------------------------------------- enumeration
MONTE_CARLO = "Use Monte Carlo instead (tpg.rollouts.sample, tpg.verify.mc_check, tpg.mc) or pass a larger budget=."
EXACT_DIGITS = 18   # sizes below 10^18 are computed exactly (cheap) and printed with separators


def format_size(n: int | float | None = None, log10_n: float | None = None) -> str:
    """A size for a message: 1,398,101 when exact and moderate, else 6.71e+07 (from log10 if given).

    Never formats a huge exact integer (Python refuses beyond 4,300 digits, and it is slow)."""
    if log10_n is None and isinstance(n, (int, np.integer)) and not isinstance(n, bool) \
            and abs(int(n)) < 10**EXACT_DIGITS:
        return f"{int(n):,}"
    lg = _log10(n) if log10_n is None else log10_n
    if lg == -math.inf:
        return "0"
    if not math.isfinite(lg):
        return "inf"
    e = math.floor(lg)
    m = 10 ** (lg - e)
    if m >= 9.995:                                                 # 9.9996e+07 rounds up to 1.00e+08
        m, e = m / 10, e + 1
    return f"{m:.2f}e+{e:02d}" if e >= 0 else f"{m:.2f}e-{-e:02d}"


def _log10(n) -> float:
    """log10 of a count given as an int (any size: math.log10 reads big ints in O(1) digits) or float."""
    if n <= 0:
        return -math.inf
    return math.log10(n) if not (isinstance(n, float) and math.isinf(n)) else math.inf


def check_budget(n: int | float | None, budget: int | None, what: str, unit: str = "responses", *,
                 log10_n: float | None = None, kind: str = "enumeration", instead: str = MONTE_CARLO) -> None:
    """Refuse, before anything is allocated, an exact job of ``n`` units above ``budget``.

    O(1) in the size: ``n`` may be an exact int, a float estimate, or be given as ``log10_n``
    (for sizes a float cannot hold, e.g. n_groups ** n_prompts: pass n_prompts · log10 n_groups).
    Exact ints compare exactly (so budget=N admits N and refuses N + 1); estimates compare in log
    space. The message gives the size in ``unit`` and the way out (``instead``).
    """
    budget = DEFAULT_BUDGET if budget is None else budget
    if log10_n is None and isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        over = int(n) > budget
    else:
        lg = _log10(n) if log10_n is None else log10_n
        over = lg > _log10(budget) if budget > 0 else lg > -math.inf
    if over:
        raise BudgetError(f"exact {kind} of {what} needs {format_size(n, log10_n)} {unit}, above the budget of "
                          f"{format_size(budget)}. {instead}")


def log10_sizes(mdp: TokenMDP) -> tuple[float, float]:
    """(log10 num_states, log10 num_responses) of ``mdp`` in O(1), without the exact big integers.

    With A non-EOS tokens and horizon H, a prompt has S = (A^H − 1)/(A − 1) prefix states
    (H when A = 1) and A^H + S·[EOS] responses (mdp.py's counts)."""
    A, H, P = mdp.arity, mdp.horizon, len(mdp.prompts)
    if A == 1:
        states, per_state = math.log10(H), (math.log10(1 + H) if mdp.eos is not None else 0.0)
        return math.log10(P) + states, math.log10(P) + per_state
    lnA = math.log(A)
    frac = -math.expm1(-H * lnA)                                   # 1 − A^−H, exact for large H too
    states = H * math.log10(A) + math.log10(frac) - math.log10(A - 1)
    full = H * math.log10(A)                                       # the A^H length-H responses
    responses = full + (math.log10(1 + frac / (A - 1)) if mdp.eos is not None else 0.0)
    return math.log10(P) + states, math.log10(P) + responses


def sized(log10_n: float, exact) -> dict:
    """check_budget's size arguments: the exact count (``exact()``, cheap) when it is below 10^18,
    else only its log10 (the exact big integer is never formed)."""
    return dict(n=exact()) if log10_n < EXACT_DIGITS else dict(n=None, log10_n=log10_n)


def enumerate_responses(mdp: TokenMDP, budget: int | None = None) -> Rollouts:
    """Every complete response of every prompt, in a fixed order (prompt-major), padded to H.

    Within a prompt: the responses that end with EOS at position 1, 2, …, H (EOS MDPs only), then
    the responses of length H; each block in lexicographic order of its digits (token ids with EOS
    skipped). Refuses, before allocating, an MDP with more than ``budget`` responses (default 10^7).
    """
    check_budget(budget=budget, what=f"{mdp!r}", **sized(log10_sizes(mdp)[1], lambda: mdp.num_responses))
    N = mdp.num_responses
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


SAMPLE_BUDGET = DEFAULT_BUDGET   # responses one sampling call may decode (its (B, H) buffers) before it refuses


def _check_sample_size(n: int, what: str) -> None:
    if n > SAMPLE_BUDGET:
        raise BudgetError(f"sampling {what} = {n:,} responses at once is above the budget of {SAMPLE_BUDGET:,}; "
                          "sample in several calls (e.g. fewer batches per call)")


def sample(mdp: TokenMDP, policy, G: int, generator: torch.Generator, *, n_prompts: int = 1,
           prompt_idx: torch.Tensor | None = None, n_batches: int = 1) -> Rollouts:
    """``n_batches`` independent batches of ``n_prompts`` prompt draws (i.i.d. from ρ, or the given
    ``prompt_idx`` for every batch), each with G responses sampled from the policy."""
    validate.mdp_and_policy(mdp, policy)
    G = validate.integer("group size G", G, 1)
    validate.generator("sample()'s generator", generator)
    n_prompts, n_batches = validate.integer("n_prompts", n_prompts, 1), validate.integer("n_batches", n_batches, 1)
    if prompt_idx is not None:
        prompt_idx = validate.index_tensor("prompt_idx", prompt_idx, len(mdp.prompts))
        n_prompts = len(prompt_idx)
    _check_sample_size(n_batches * n_prompts * G, f"{n_batches} batch(es) × {n_prompts} prompt draw(s) × G={G}")
    if prompt_idx is None:
        rho = torch.as_tensor(mdp.prompt_probs)
        prompt_idx = torch.multinomial(rho, n_prompts * n_batches, replacement=True, generator=generator)
    else:
        prompt_idx = prompt_idx.repeat(n_batches)
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
    validate.mdp_and_policy(mdp, policy)
    prompt_idx = validate.index_tensor("prompt_idx", prompt_idx, len(mdp.prompts))
    _check_sample_size(len(prompt_idx), f"{len(prompt_idx)} greedy responses")
    B = len(prompt_idx)
    tokens, mask, logp = decode(mdp, policy, prompt_idx, torch.zeros(B, 0, dtype=torch.long),
                                torch.zeros(B, dtype=torch.long), greedy_pick)
    ids = torch.arange(B)
    return _finish(mdp, prompt_idx, tokens, mask, ids, ids, B, logp_old=logp)


def continuation_rm(mdp: TokenMDP, policy, ro: Rollouts, K: int, generator: torch.Generator) -> torch.Tensor:
    """(B, L+1, K) RM of K fresh continuations from every prefix y_<=t, t = 0..L, of every row.

    Prefixes at or past the end of the response are complete: their entries are RM(y) exactly.
    """
    validate.mdp_and_policy(mdp, policy)
    validate.instance("ro", ro, Rollouts)
    K = validate.integer("number of continuation rollouts K", K, 1)
    validate.generator("continuation_rm()'s generator", generator)
    B, L = ro.tokens.shape
    t = torch.arange(L + 1)
    plen = torch.minimum(t[None, :].expand(B, L + 1), ro.lengths[:, None])  # (B, L+1) prefix lengths
    rows = torch.arange(B)[:, None].expand(B, L + 1)
    open_ = plen < ro.lengths[:, None]                                         # (B, L+1) prefixes to roll out
    r_idx, p_len = rows[open_], plen[open_]
    _check_sample_size(len(r_idx) * K, f"{len(r_idx)} open prefixes × K={K} continuations")
    out = ro.rm[:, None, None].expand(B, L + 1, K).clone()                     # complete prefixes: RM(y)
    if len(r_idx):
        r_idx, p_len = r_idx.repeat_interleave(K), p_len.repeat_interleave(K)  # (n·K,)
        prefix = ro.tokens[r_idx] * (torch.arange(L)[None, :] < p_len[:, None])
        tok, mask, _ = decode(mdp, policy, ro.prompt_idx[r_idx], prefix, p_len, categorical(generator))
        _, rm = mdp.rewards(ro.prompt_idx[r_idx], tok * mask, mask)
        out[open_] = rm.view(-1, K)
    return out
