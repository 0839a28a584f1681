"""One batch source for every mode, and the checks behind every shortcut the exact engine takes.

An estimator sees independent batches: each is ``n_prompts`` prompt draws × G responses, plus the
extra draws it requested. Both sources yield ``Chunk``s — many batches stacked in one ``Rollouts``
(``ro.batch`` numbers them) with one weight per batch:

- ``ExactBatches``: every possible batch with its probability, so E[ĝ] = Σ_batches P(batch) ĝ(batch);
- ``SampledBatches``: batches drawn by the sampler, each with weight 1/n.

Extra draws are filled by one signature, ``draws.fill(ro, needs) -> (ro, factor per batch)``
(``tpg.draws``: exact or Monte Carlo).

The exact engine is fast because of four shortcuts, each valid only for estimators with a property:

- stacking thousands of batches into one evaluation needs **batch-locality** (a batch's loss
  depends on that batch alone, reduced per ``ro.batch``/``ro.group``, never over all rows);
- enumerating each group as a multiset with multinomial weights needs **exchangeability**
  (members of a group treated alike: permuting them permutes the coefficients);
- replacing continuation returns by their expectation U(prefix) needs **multilinearity** in them;
- (``tpg.exact``'s group compression adds its key check on top of these).

``Evaluator`` never assumes them for an estimator that does not declare them (user functions are
undeclared): it probes each on the estimator at hand with cheap evaluations — some batches alone
vs stacked, group members permuted, single continuation returns moved — and on failure takes the
safe route (batches one at a time; ordered tuples instead of multisets) or refuses with a message
naming the property and the way out. Built-in declarations are checked by the same probes in the
tests. A confident wrong verdict is the worst defect tpg can have.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from tpg import validate
from tpg.mdp import DEFAULT_BUDGET, TokenMDP, TPGError
from tpg.rollouts import Rollouts, check_budget

PROPERTIES = ("local", "exchangeable", "multilinear")
PROBE_RTOL = 1e-9          # coefficients that should agree agree to round-off; a violated property moves them O(1)
MAX_ONE_AT_A_TIME = 20_000  # batches evaluated one by one when an estimator is not batch-local


@dataclass(frozen=True)
class Chunk:
    """Independent batches stacked in one ``Rollouts`` (``ro.batch`` in [0, ro.n_batches)), extra
    draws filled, and ``weight`` (n_batches,): P(batch) for exact sources, 1/n for sampled ones."""
    ro: Rollouts
    weight: torch.Tensor


class PropertyError(TPGError):
    """An estimator lacks a property a shortcut needs, and no safe route fits."""


def stack(enum: Rollouts, ids: torch.Tensor, G: int, n_prompts: int, logp: torch.Tensor,
          logp_old: torch.Tensor, logp_rollout: torch.Tensor | None = None) -> Rollouts:
    """Batches as rows of ``enum``: ids (b, n_prompts·G) response rows → one ``Rollouts`` whose
    group = (batch, prompt slot) and batch = row of ``ids``. ``logp_rollout`` (N, L): log μ of the
    policy the batches are drawn from (default ``logp_old``: drawn from θ_old)."""
    b, width = ids.shape
    rows = ids.reshape(-1)                                                   # (b·width,)
    slot = torch.arange(width) // G                                          # (width,) prompt slot
    group = (torch.arange(b)[:, None] * n_prompts + slot[None, :]).reshape(-1)
    batch = torch.arange(b).repeat_interleave(width)
    return replace(enum.select(rows), group=group, batch=batch, n_batches=b, logp=logp[rows],
                   logp_old=logp_old[rows], response_id=rows,
                   logp_rollout=(logp_old if logp_rollout is None else logp_rollout)[rows])


def take_batches(ro: Rollouts, which: list[int]) -> Rollouts:
    """The batches ``which`` of a stack, renumbered 0.. in the given order (groups renumbered too)."""
    rows = torch.cat([torch.nonzero(ro.batch == b)[:, 0] for b in which])
    sub = ro.select(rows)
    new_batch = torch.empty(ro.n_batches, dtype=torch.long)
    new_batch[torch.as_tensor(which)] = torch.arange(len(which))
    _, group = torch.unique_consecutive(sub.group, return_inverse=True)   # groups are contiguous runs of rows
    return replace(sub, batch=new_batch[sub.batch], group=group, n_batches=len(which))


# ====================================================================================== sources
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


def check_batch_budget(mdp: TokenMDP, G: int, n_prompts: int, route: str, budget: int | None,
                       sizes: list[int] | None = None) -> None:
    """Refuse, in O(1) per prompt and before anything is enumerated, a job whose batches need more
    than ``budget`` response slots: C(n+G−1, G) multisets (or n^G tuples) of the n responses of each
    prompt, over ``n_prompts`` ordered prompt slots. Sizes are compared in log space (no big integers)."""
    sizes = [mdp.responses_per_prompt] * len(mdp.prompts) if sizes is None else sizes
    log_groups = [math.lgamma(n + G) - math.lgamma(G + 1) - math.lgamma(n) if route == "multiset" else G * math.log(n)
                  for n in sizes if n > 0]
    m = max(log_groups)
    log_n = n_prompts * (m + math.log(sum(math.exp(x - m) for x in log_groups))) + math.log(n_prompts * G)
    if log_n > math.log(DEFAULT_BUDGET if budget is None else budget) + 1e-9:
        if log_n < 115:                                           # < 1e50: the exact count is cheap, and clearer
            n_groups = sum(math.comb(n + G - 1, G) if route == "multiset" else n**G for n in sizes)
            size = n_groups**n_prompts * n_prompts * G
        else:
            size = float(math.exp(min(log_n, 700.0)))
        check_budget(size, budget, f"{n_prompts} prompt(s) × G={G} batches ({route})", "response slots")


def batch_outcomes(tab: Tables, G: int, n_prompts: int = 1, route: str = "multiset", budget: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every possible batch of ``n_prompts`` prompt draws (i.i.d. from ρ) × G responses each.

    route="multiset": each group is an unordered multiset of responses with its multinomial
    probability (estimators are symmetric within a group); route="joint": ordered G-tuples (the
    cross-check). Returns response ids (n_out, n_prompts·G) and probabilities (n_out,).
    """
    G = validate.integer("group size G", G, 1)
    n_prompts = validate.integer("n_prompts (prompt draws per batch)", n_prompts, 1)
    validate.choice("route", route, ("multiset", "joint"))
    mdp, enum = tab.mdp, tab.enum
    rho = torch.as_tensor(mdp.prompt_probs)
    sizes = torch.bincount(enum.prompt_idx, minlength=len(mdp.prompts)).tolist()
    check_batch_budget(mdp, G, n_prompts, route, budget, sizes)
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


class ExactBatches:
    """Every possible batch of ``n_prompts`` prompt draws (i.i.d. from ρ) × G responses, with its
    probability, in chunks of about ``chunk_rows`` rows; responses drawn from ``tab`` (the
    behaviour policy's response probabilities), log-probs ``logp``/``logp_old`` (N, L) per response,
    and ``logp_rollout`` (N, L) of the behaviour policy μ itself (default ``logp_old``)."""

    def __init__(self, tab, logp, logp_old, draws, needs: dict, G: int, n_prompts: int = 1,
                 route: str = "multiset", budget: int | None = None, chunk_rows: int = 200_000,
                 logp_rollout: torch.Tensor | None = None):
        self.tab, self.draws, self.needs, self.G, self.n_prompts, self.route = tab, draws, needs, G, n_prompts, route
        self.enum = replace(tab.enum, mdp=tab.mdp)
        self.logp, self.logp_old, self.logp_rollout = logp, logp_old, logp_rollout
        self.ids, self.probs = batch_outcomes(tab, G, n_prompts, route, budget)
        self.per_chunk = max(1, chunk_rows // self.ids.shape[1])

    @property
    def n_outcomes(self) -> int:
        return len(self.ids)

    def __iter__(self):
        for lo in range(0, len(self.ids), self.per_chunk):
            ids, p = self.ids[lo: lo + self.per_chunk], self.probs[lo: lo + self.per_chunk]
            ro = stack(self.enum, ids, self.G, self.n_prompts, self.logp, self.logp_old, self.logp_rollout)
            ro, factor = self.draws.fill(ro, self.needs)
            yield Chunk(ro, p.repeat_interleave(ro.n_batches // len(ids)) * factor)


class SampledBatches:
    """``n_batches`` independent sampled batches (``tpg.rollouts.sample``), each of weight 1/n, drawn
    from ``rollout_policy`` μ (default ``old_policy``, default ``policy``) and scored under ``policy``
    and ``old_policy``; the sampler's log-probs are ``logp_rollout`` (as ``ExactBatches``)."""

    def __init__(self, mdp: TokenMDP, policy, draws, needs: dict, G: int, n_batches: int,
                 generator: torch.Generator, n_prompts: int = 1, chunk_batches: int | None = None,
                 old_policy=None, rollout_policy=None):
        self.mdp, self.policy, self.draws, self.needs, self.G = mdp, policy, draws, needs, G
        self.n, self.generator, self.n_prompts = n_batches, generator, n_prompts
        self.chunk = n_batches if chunk_batches is None else chunk_batches
        self.old_policy = old_policy
        self.sampler = rollout_policy if rollout_policy is not None else (policy if old_policy is None else old_policy)

    def __iter__(self):
        from tpg.rollouts import sample
        for lo in range(0, self.n, self.chunk):
            b = min(self.chunk, self.n - lo)
            ro = sample(self.mdp, self.sampler, self.G, self.generator, n_prompts=self.n_prompts, n_batches=b)
            ro = replace(ro, logp_rollout=ro.logp_old)                       # the sampler's log μ
            if self.sampler is not self.policy:                              # score under θ and θ_old
                with torch.no_grad():
                    lp = (self.policy.token_log_probs(ro.prompt_idx, ro.tokens) * ro.mask).to(torch.float64)
                    old = lp if self.old_policy is None else \
                        (self.old_policy.token_log_probs(ro.prompt_idx, ro.tokens) * ro.mask).to(torch.float64)
                ro = replace(ro, logp=lp, logp_old=old)
            ro, factor = self.draws.fill(ro, self.needs)
            yield Chunk(ro, factor / self.n)


# ====================================================================================== checked evaluation
def _close(a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    return bool(((a - b).abs() <= PROBE_RTOL * scale + 1e-300).all())


def _name(est) -> str:
    return getattr(est, "name", None) or getattr(est, "__name__", None) or type(est).__name__


class Evaluator:
    """Coefficients c = −∂loss/∂logp of ``est`` on chunks of batches, with every shortcut checked.

    ``declared(prop)`` (an ``Estimator`` method; absent on user callables) may vouch for a property;
    otherwise it is probed here on the first chunk that can show it. ``notes`` records what was
    probed and which route ran, for the report.
    """

    def __init__(self, est, *, exchangeable_needed: bool = False, multilinear_needed: bool = False, seed: int = 0):
        from tpg.estimators.core import coefficients
        self.est, self._coef = est, coefficients
        self.rng = np.random.default_rng(seed)
        decl = getattr(est, "declared", None)
        self.state = {p: (decl(p) if callable(decl) else None) for p in PROPERTIES}
        self.need = {"local": True, "exchangeable": exchangeable_needed, "multilinear": multilinear_needed}
        self.notes: list[str] = []

    # -------------------------------------------------------------------------- public
    def coefficients(self, chunk: Chunk) -> torch.Tensor:
        """(rows, L) coefficients of every row of the chunk, each batch evaluated as if alone."""
        ro = chunk.ro
        if self.state["local"] is False:
            c = self._one_at_a_time(ro)
        else:
            c = self._coef(self.est, ro)
            if self.state["local"] is None and ro.n_batches > 1 and not self._probe_local(ro, c):
                c = self._one_at_a_time(ro)
        if self.need["exchangeable"] and self.state["exchangeable"] is None:
            self._probe_exchangeable(ro)
        if self.need["multilinear"] and self.state["multilinear"] is None:
            self._probe_multilinear(ro)
        if self.need["multilinear"] and self.state["multilinear"] is False:
            self._refuse_multilinear()
        return c

    def raw(self, ro: Rollouts) -> torch.Tensor:
        """Coefficients of a stack as the estimator gives them (for probes that compare stacks)."""
        return self._coef(self.est, ro)

    def check_exchangeable(self) -> bool:
        """False when the multiset route must not be used (declared or probed not exchangeable)."""
        return self.state["exchangeable"] is not False

    # -------------------------------------------------------------------------- batch-locality
    def _pick(self, n: int, k: int = 3) -> list[int]:
        picks = {0, n - 1} | {int(i) for i in self.rng.integers(0, n, size=max(0, k - 2))}
        return sorted(picks)

    def _probe_local(self, ro: Rollouts, c: torch.Tensor) -> bool:
        """Some batches alone, and those batches stacked in reverse order, must reproduce their rows of
        the full stack (and a batch evaluated twice must agree: determinism)."""
        which = self._pick(ro.n_batches)
        scale = float(c.abs().max()) if c.numel() else 0.0
        first = take_batches(ro, [which[0]])
        alone = [self._coef(self.est, first)]
        if not _close(self._coef(self.est, first), alone[0], max(scale, float(alone[0].abs().max()))):
            raise PropertyError(f"estimator {_name(self.est)!r} is not deterministic: the same batch gave different "
                                "coefficients twice (random numbers inside the estimator?). Request randomness as "
                                "extra draws (needs=…), or test it by Monte Carlo")
        alone += [self._coef(self.est, take_batches(ro, [b])) for b in which[1:]]
        for b, cb in zip(which, alone):
            if not _close(cb, c[ro.batch == b], scale):
                self._mark("local", False, f"batch {b}'s coefficients change when other batches are stacked beside it")
                return False
        rev = list(reversed(which))
        cr = self._coef(self.est, take_batches(ro, rev))
        if not _close(cr, torch.cat(list(reversed(alone))), scale):
            self._mark("local", False, "the coefficients depend on the order in which batches are stacked")
            return False
        self._mark("local", True, None)
        return True

    def _one_at_a_time(self, ro: Rollouts) -> torch.Tensor:
        if ro.n_batches > MAX_ONE_AT_A_TIME:
            raise PropertyError(
                f"estimator {_name(self.est)!r} is not batch-local (its loss for a batch depends on rows of other "
                "batches: reduce per ro.batch / ro.group, not over all rows), so batches must be evaluated one at a "
                f"time, and this job has {ro.n_batches:,} of them (limit {MAX_ONE_AT_A_TIME:,}). Fix the reduction, "
                "use a smaller G or MDP, or Monte Carlo (tpg.verify.mc_check)")
        c = torch.zeros_like(ro.mask)
        for b in range(ro.n_batches):
            rows = torch.nonzero(ro.batch == b)[:, 0]
            c[rows] = self._coef(self.est, take_batches(ro, [b]))
        return c

    # -------------------------------------------------------------------------- exchangeability
    def _probe_exchangeable(self, ro: Rollouts) -> None:
        """Permute the members of each group (a cyclic shift) in a few batches: the coefficients
        summed per response must not change."""
        sizes = torch.bincount(ro.group)
        if int(sizes.max()) < 2:
            return                                                      # no group to permute in this chunk
        if ro.response_id is None:
            return
        cands = [b for b in range(ro.n_batches) if len(torch.unique(ro.response_id[ro.batch == b])) > 1]
        if not cands:
            return
        picks = sorted({0, len(cands) - 1} | {int(i) for i in self.rng.integers(len(cands), size=4)})
        for b in [cands[i] for i in picks]:
            sub = take_batches(ro, [b])
            members = [torch.nonzero(sub.group == g)[:, 0] for g in torch.unique(sub.group)]
            c0 = self._coef(self.est, sub)
            for shuffle in (lambda m: m.roll(1), lambda m: m.flip(0),
                            lambda m: m[torch.as_tensor(self.rng.permutation(len(m)))]):
                perm = torch.cat([shuffle(m) for m in members])
                shuffled = replace(sub.select(perm), group=sub.group[perm])
                c1 = self._coef(self.est, shuffled)
                ids0, ids1 = sub.response_id, shuffled.response_id
                n = int(torch.cat([ids0, ids1]).max()) + 1
                w0 = torch.zeros(n, c0.shape[1], dtype=c0.dtype).index_add(0, ids0, c0)
                w1 = torch.zeros(n, c1.shape[1], dtype=c1.dtype).index_add(0, ids1, c1)
                if not _close(w0, w1, float(c0.abs().max()) if c0.numel() else 0.0):
                    self._mark("exchangeable", False, "permuting the members of a group changes their coefficients")
                    return
        self._mark("exchangeable", True, None)

    # -------------------------------------------------------------------------- multilinearity
    def _probe_multilinear(self, ro: Rollouts) -> None:
        """Move single continuation returns R[r, t, k] by a ∈ {−s, s, 2s}: for an estimator multilinear
        in them every coefficient is affine in a (zero second differences). s spans the reward range,
        so a kink (max, clip, sign) between the points shows."""
        if "cont_rm" not in ro.extras:
            return
        for b in self._pick(ro.n_batches):                                             # first, last, random
            if not self._multilinear_on(take_batches(ro, [b])):
                self._mark("multilinear", False, "its coefficients are not affine in single continuation returns")
                return
        self._mark("multilinear", True, None)

    def _multilinear_on(self, sub: Rollouts) -> bool:
        """Second differences of the coefficients along every single return R[r, t, k] of one batch."""
        cont = sub.extras["cont_rm"]                                                    # (B, L+1, K)
        B, L1, K = cont.shape
        open_ = torch.arange(L1)[None, :] < sub.lengths[:, None]                       # (B, L+1) rolled-out prefixes
        coords = [(r, t, k) for r, t in torch.nonzero(open_).tolist() for k in range(K)]
        if not coords:
            return True
        s = 2.0 * float(sub.rm.abs().max() + cont.abs().max()) + 1.0
        steps = (-s, 0.0, s, 2 * s)
        copies = []
        for r, t, k in coords:
            for a in steps:
                x = cont.clone()
                x[r, t, k] += a
                copies.append(x)
        n = len(copies)
        rows = torch.arange(B).repeat(n)
        picked = sub.select(rows)
        rep = replace(picked, batch=torch.arange(n).repeat_interleave(B),
                      group=(torch.arange(n).repeat_interleave(B) * (int(sub.group.max()) + 1) + sub.group.repeat(n)),
                      n_batches=n, extras={**picked.extras, "cont_rm": torch.cat(copies)})   # (n·B, L+1, K)
        c = self._one_at_a_time(rep) if self.state["local"] is False else self._coef(self.est, rep)
        c = c.reshape(len(coords), len(steps), B, -1)                                   # (coords, 4, B, L)
        d2a = c[:, 2] - 2 * c[:, 1] + c[:, 0]                                            # steps −s, 0, s
        d2b = c[:, 3] - 2 * c[:, 2] + c[:, 1]                                            # steps 0, s, 2s
        scale = float(c.abs().max())
        return _close(d2a, torch.zeros_like(d2a), scale) and _close(d2b, torch.zeros_like(d2b), scale)

    def _refuse_multilinear(self) -> None:
        raise PropertyError(
            f"estimator {_name(self.est)!r} is not multilinear in the continuation returns (e.g. whitened, max, "
            "clipped, or PPO-clipped off-policy), so replacing them by their expectation U(prefix) is not exact and "
            "the exact engine refuses it. Use Monte Carlo: tpg.verify.mc_check")

    # -------------------------------------------------------------------------- bookkeeping
    def _mark(self, prop: str, value: bool, why: str | None) -> None:
        self.state[prop] = value
        self.notes.append(f"probed {prop}: {'holds' if value else 'FAILS — ' + why}")


def projected_estimates(est, ro: Rollouts, scores: torch.Tensor) -> torch.Tensor:
    """(n_batches, K) z[b, k] = ⟨u_k, ĝ_b⟩ from the estimator's coefficients (each batch as if alone,
    ``Evaluator``) and the projected scores (B, L, K) of ``tpg.scores.projected_scores`` (compute
    those once, reuse them for every estimator)."""
    c = Evaluator(est).coefficients(Chunk(ro, torch.ones(ro.n_batches, dtype=torch.float64)))   # (B, L)
    per_row = torch.einsum("bl,blk->bk", c, scores)                                              # (B, K)
    return torch.zeros(ro.n_batches, scores.shape[2], dtype=torch.float64).index_add(0, ro.batch, per_row)


# ====================================================================================== keyed groups
class KeyedGroups:
    """Exact group moments through per-response keys (one prompt draw per batch, G ≥ 2).

    A group estimator usually sees the other G − 1 members of a group only through a small key
    κ(y) — the reward, or the reward and the length — and its own response y only through
    (RM(y), |y|). Then, by exchangeability,

        E[ĝ] = G · Σ_y P(y) Σ_t E_M[c_0(own class of y, M)[t]] ∇ℓ_t(y),

    where M is the multiset of the others' keys: C(K + G − 2, G − 1) multisets of K key values with
    multinomial probabilities, instead of C(N + G − 1, G) multisets of N responses (65 instead of
    ~10^180 for binary rewards at G = 64 on 10^5 responses). Each (own class, M) is evaluated once,
    on representative responses. Nothing is assumed: ``probe`` swaps responses that share a key
    (own and others) and requires row 0's coefficients to stay the same; the caller then probes
    locality and exchangeability on the same groups through ``Evaluator``.
    """

    KEYS = ("rm", "rm+length")

    def __init__(self, tab, logp, logp_old, draws, needs: dict, G: int, others: str = "rm", seed: int = 0,
                 n_prompts: int = 1):
        if G < 2:
            raise TPGError("keyed groups need G ≥ 2")
        self.tab, self.logp, self.logp_old, self.draws, self.needs, self.G = tab, logp, logp_old, draws, needs, G
        self.P = n_prompts
        self.enum = replace(tab.enum, mdp=tab.mdp)
        self.others = others
        self.rng = np.random.default_rng(seed)
        rho = torch.as_tensor(tab.mdp.prompt_probs, dtype=torch.float64)
        self.cond = tab.prob / rho[self.enum.prompt_idx]                              # (N,) π(y|x)
        rm, length = self.enum.rm, self.enum.lengths
        self.prompts = []
        for x in range(len(tab.mdp.prompts)):
            rows = torch.nonzero((self.enum.prompt_idx == x) & (self.cond > 0))[:, 0]
            if len(rows) == 0 or float(rho[x]) == 0.0:
                continue
            _, rm_id = torch.unique(rm[rows], return_inverse=True)                     # 1-D uniques: fast
            own_u, own_id = torch.unique(rm_id * (int(length.max()) + 1) + length[rows], return_inverse=True)
            oth_u, oth_id = (own_u, own_id) if others == "rm+length" else torch.unique(rm_id, return_inverse=True)
            p_oth = torch.zeros(len(oth_u), dtype=torch.float64).index_add(0, oth_id, self.cond[rows])
            self.prompts.append(dict(x=x, rows=rows, own_id=own_id, oth_id=oth_id, n_own=len(own_u),
                                     n_oth=len(oth_u), p_oth=p_oth, rho=float(rho[x]),
                                     rep_own=self._first(rows, own_id, len(own_u)),
                                     rep_oth=self._first(rows, oth_id, len(oth_u))))

        N = len(self.enum.rm)                                                        # global class of every row
        self.own_cls = torch.full((N,), -1, dtype=torch.long)
        self.oth_cls = torch.full((N,), -1, dtype=torch.long)
        o1 = o2 = 0
        for pr in self.prompts:
            self.own_cls[pr["rows"]], self.oth_cls[pr["rows"]] = pr["own_id"] + o1, pr["oth_id"] + o2
            o1, o2 = o1 + pr["n_own"], o2 + pr["n_oth"]

    @staticmethod
    def _first(rows, ids, n):
        first = torch.full((n,), -1, dtype=torch.long)
        first.scatter_reduce_(0, ids, torch.arange(len(ids)), "amin", include_self=False)
        return rows[first]                                                           # (n,) representative rows

    # -------------------------------------------------------------------------- sizes
    def n_rows(self, pairs: bool = False) -> float:
        """Response slots the route evaluates (log-space safe): Σ_x n_own^(1|2) · C(K + G − 2 (−1), G − 1 (−1)) · G."""
        k = 2 if pairs else 1
        comb = lambda n, m: math.exp(min(700.0, math.lgamma(n + m) - math.lgamma(m + 1) - math.lgamma(n)))  # C(n+m−1, m)
        n_opt = sum(comb(pr["n_oth"], self.G) for pr in self.prompts)              # one other prompt slot's options
        total = 0.0
        for pr in self.prompts:
            total += pr["n_own"] ** k * comb(pr["n_oth"], self.G - k) * self.G
        log_n = math.log(total) + (self.P - 1) * math.log(max(n_opt, 1.0)) + 2 * math.log(self.P)   # P slots × P·G rows
        return math.exp(log_n) if log_n < 700 else math.inf

    # -------------------------------------------------------------------------- several prompt slots
    def slot_options(self):
        """Every configuration of one OTHER prompt slot: (prompt, multiset of its G members' keys) as
        representative rows (n_opt, G) with probability ρ(x) · P(multiset | x) (n_opt,)."""
        ids, w = [], []
        for pr in self.prompts:
            ms = torch.as_tensor(multisets(pr["n_oth"], self.G))
            pm = torch.as_tensor(multinomial_coef(ms.numpy())) * pr["p_oth"][ms].prod(1)
            ids.append(pr["rep_oth"][ms])
            w.append(pr["rho"] * pm)
        return torch.cat(ids), torch.cat(w)

    def mean_batches(self, pr, j: int):
        """Batches whose slot j holds (own class, others' multiset) of prompt ``pr`` and whose other
        P − 1 slots run over every configuration: ids (n, P·G), weight (n,) = P(M)·Π P(other slots),
        own class (n,). For P = 1 these are ``mean_groups``."""
        ids, pm, own = self.mean_groups(pr)
        if self.P == 1:
            return ids, pm, own
        oids, ow = self.slot_options()
        grid = torch.cartesian_prod(*[torch.arange(len(oids))] * (self.P - 1)).reshape(-1, self.P - 1)   # (n_c, P−1)
        other = oids[grid].reshape(len(grid), -1)                                    # (n_c, (P−1)·G)
        w_other = ow[grid].prod(1)                                                   # (n_c,)
        n, n_c = len(ids), len(grid)
        own_part, oth_part = ids.repeat_interleave(n_c, 0), other.repeat(n, 1)
        full = torch.cat([oth_part[:, : j * self.G], own_part, oth_part[:, j * self.G:]], 1)   # slot j in place
        return full, pm.repeat_interleave(n_c) * w_other.repeat(n), own.repeat_interleave(n_c)

    def probe_batches(self, ev: "Evaluator", n_batches: int = 8) -> str | None:
        """For several prompt slots: a few batches with every row swapped for random members of its
        class (own class for the probed row, others' class elsewhere); the probed row must not move."""
        for pr in self.prompts:
            for j in range(self.P):
                ids, _, _ = self.mean_batches(pr, j)
                pick = sorted({0, len(ids) - 1} | {int(i) for i in self.rng.integers(len(ids), size=n_batches)})
                base = ids[pick]                                                   # (n, P·G)
                for _ in range(3):
                    cls = self.oth_cls[base].clone()
                    cls[:, j * self.G] = self.own_cls[base[:, j * self.G]]
                    swapped = base.clone()
                    for col in range(base.shape[1]):
                        table = self.own_cls if col == j * self.G else self.oth_cls
                        members_of = torch.argsort(table, stable=True)
                        counts = torch.bincount(table[table >= 0], minlength=int(table.max()) + 1)
                        starts = torch.cumsum(counts, 0) - counts + int((table < 0).sum())
                        c = table[base[:, col]]
                        u = torch.as_tensor(self.rng.random(len(c)))
                        swapped[:, col] = members_of[starts[c] + (u * counts[c]).long().clamp(max=counts[c] - 1)]
                    r = j * self.G + torch.arange(len(base)) * base.shape[1]
                    c0 = torch.cat([ev.raw(self.chunk(b[None], torch.ones(1)).ro) for b in base])
                    c1 = torch.cat([ev.raw(self.chunk(b[None], torch.ones(1)).ro) for b in swapped])
                    if not _close(c0[r], c1[r], max(float(c0.abs().max()), float(c1.abs().max()))):
                        return (f"an estimator coefficient moved when responses were swapped for others with the "
                                f"same key (own: reward and length; others: {self.others})")
        return None

    # -------------------------------------------------------------------------- groups
    def _groups(self, pr, own_rows: torch.Tensor, m: int):
        """Every (own representatives, multiset of m others' keys): ids (n, len(own) + m) of rows and
        P(multiset) (n,). own_rows (n_own_combos, j) are the representatives heading each group."""
        ms = torch.as_tensor(multisets(pr["n_oth"], m)) if m > 0 else torch.zeros(1, 0, dtype=torch.long)
        pm = torch.as_tensor(multinomial_coef(ms.numpy()) if m > 0 else np.ones(1)) * \
            pr["p_oth"][ms].prod(1)                                                   # (nM,)
        n_o, n_m = len(own_rows), len(ms)
        ids = torch.cat([own_rows.repeat_interleave(n_m, 0), pr["rep_oth"][ms].repeat(n_o, 1)], 1)
        return ids, pm.repeat(n_o), torch.arange(n_o).repeat_interleave(n_m)

    def chunk(self, ids: torch.Tensor, weight: torch.Tensor) -> Chunk:
        ro = stack(self.enum, ids, self.G, ids.shape[1] // self.G, self.logp, self.logp_old)
        ro, factor = self.draws.fill(ro, self.needs)
        return Chunk(ro, weight * factor)

    def mean_groups(self, pr) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._groups(pr, pr["rep_own"][:, None], self.G - 1)

    def pair_groups(self, pr):
        a = torch.arange(pr["n_own"])
        a1, a2 = a.repeat_interleave(len(a)), a.repeat(len(a))
        own = torch.stack([pr["rep_own"][a1], pr["rep_own"][a2]], 1)                  # (n_own², 2)
        ids, pm, which = self._groups(pr, own, self.G - 2)
        return ids, pm, a1[which], a2[which]

    # -------------------------------------------------------------------------- the key probe
    def _alternatives(self, pr, ids_of: torch.Tensor, k: int) -> torch.Tensor:
        """Members of class k most unlike its representative: the shortest, the longest, the last in
        enumeration order and a random one (tokens and lengths differ where the class allows)."""
        members = pr["rows"][ids_of == k]
        lengths = self.enum.lengths[members]
        picks = {int(torch.argmin(lengths)), int(torch.argmax(lengths)), len(members) - 1,
                 int(self.rng.integers(len(members)))}
        return members[sorted(picks)]

    def probe(self, ev: "Evaluator") -> str | None:
        """Swap responses for others with the same key and require row 0's coefficients not to move:
        for every own class (reward, length), row 0 is replaced by its most unlike members; for every
        others' class, all G − 1 others are replaced by its most unlike members. Each group is
        evaluated alone (nothing here relies on batch-locality). Returns why the key is not
        sufficient, or None."""
        for pr in self.prompts:
            top_oth = int(torch.argmax(pr["p_oth"]))
            top_own = int(pr["own_id"][torch.argmax(self.cond[pr["rows"]])])
            tests = []                                                                  # (base ids, swapped ids)
            for a in range(pr["n_own"]):
                base = torch.cat([pr["rep_own"][a: a + 1], pr["rep_oth"][top_oth].repeat(self.G - 1)])
                for alt in self._alternatives(pr, pr["own_id"], a):
                    tests.append((base, torch.cat([alt[None], base[1:]])))
            for k in range(pr["n_oth"]):
                base = torch.cat([pr["rep_own"][top_own: top_own + 1], pr["rep_oth"][k].repeat(self.G - 1)])
                alts = self._alternatives(pr, pr["oth_id"], k)
                for shift in range(len(alts)):
                    tests.append((base, torch.cat([base[:1], alts[(torch.arange(self.G - 1) + shift) % len(alts)]])))
            for base, swapped in tests:
                if torch.equal(base, swapped):
                    continue
                c0 = ev.raw(self.chunk(base[None], torch.ones(1)).ro)[0]
                c1 = ev.raw(self.chunk(swapped[None], torch.ones(1)).ro)[0]
                scale = max(float(c0.abs().max()), float(c1.abs().max()))
                if not _close(c0, c1, scale):
                    return (f"an estimator coefficient moved when a response was swapped for another with the same "
                            f"key (own: reward and length; others: {self.others})")
        return None
