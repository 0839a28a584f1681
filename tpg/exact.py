"""The exact engine (float64): J(θ), ∇J(θ) and the value tables of a token MDP under a policy.

Two routes give the same numbers (to float64 round-off; tests/test_dp.py cross-checks them):
- "dp" (the default for any policy with ``state_log_probs``): sweeps over the state table,
  never listing responses (tpg/dp.py). U(s) = E[RM | s] backward from the terminal pairs' RM,
  ρ(s) forward from ρ(x), V/Q in the MDP's own decomposition; ∇J as the closed form
  ∂J/∂log π(a|s) = ρ(s) π(a|s) (U(s⊕a) − U(s)) (PAPER §2) on the score of the (S, V) log-prob table,
  one backward pass for any policy. Budgeted in state-table entries S·V (dp.DP_BUDGET).
- "enumerate": every response with its probability (PAPER §7 setup), J = Σ_x ρ(x) Σ_y π(y|x) RM(x, y)
  and ∇J by autograd through that sum; budgeted in responses (10^7 by default). Passing an
  enumeration to ``objective``/``gradient`` takes this route over exactly those responses.
``tables(mdp.zra(), policy)`` gives the Zero-Reward decomposition's tables. Per-response arrays
(``Tables.enum``, ``Tables.prob``) are built only when read.

``expected_score(policy, enum, W)`` is the one primitive every exact expectation reduces to:
∇_θ Σ_{n,t} W[n, t] log π(y_{n,t} | s_{n,t}) = E[Σ_t c_t ∇ℓ_t] when W[n, t] = P(y_n) E[c_t | y_n]
(DESIGN §2, linearity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tpg import dp
from tpg import validate
from tpg.mdp import DEFAULT_BUDGET, BudgetError, TokenMDP, TPGError
from tpg.rollouts import Rollouts, check_budget, enumerate_responses, log10_sizes, sized
from tpg.batches import Evaluator, ExactBatches, KeyedGroups, PropertyError, check_batch_budget
from tpg.scores import flat, params as _params


def check_compatible(mdp: TokenMDP, policy) -> None:
    validate.mdp_and_policy(mdp, policy)


def prompt_weights(mdp: TokenMDP, enum: Rollouts) -> torch.Tensor:
    """(N,) ρ(x_n) of each enumerated response."""
    return torch.as_tensor(mdp.prompt_probs)[enum.prompt_idx]


# ------------------------------------------------------------------------------ route choice
EXACT_ROUTES = ("auto", "dp", "enumerate")


def choose_route(mdp: TokenMDP, policy, route: str = "auto", enum: Rollouts | None = None,
                 budget: int | None = None) -> str:
    """"dp" or "enumerate" for this job, refusing (in O(1), before allocating) a job above the budget.

    auto: the enumeration when one is passed (the job is about those responses), else the DP when
    the policy gives ``state_log_probs`` and the state table fits ``budget`` (entries, default
    dp.DP_BUDGET), else the enumeration (responses, default 10^7). ``budget`` is read in the unit of
    the route it is checked for. A refusal by both names both sizes.
    """
    check_compatible(mdp, policy)
    return _route(mdp, policy, route, enum, budget)


def _route(mdp: TokenMDP, policy, route: str, enum: Rollouts | None, budget: int | None) -> str:
    """choose_route for an MDP and policy already validated together."""
    if route not in EXACT_ROUTES:
        raise TPGError(f"route must be one of {EXACT_ROUTES}, got {route!r}")
    has_table = callable(getattr(policy, "state_log_probs", None))
    if route == "dp" and enum is not None:
        raise TPGError("route='dp' does not read an enumeration; drop enum, or pass route='enumerate'")
    if route == "dp" and not has_table:
        raise TPGError(f"route='dp' needs policy.state_log_probs() (the (S, V) log π table); "
                       f"{type(policy).__name__} has none: use route='enumerate'")
    if route == "dp" or (route == "auto" and enum is None and has_table):
        try:
            dp.check_dp_budget(mdp, budget)
            return "dp"
        except BudgetError as refused:
            if route == "dp":
                raise
            try:
                check_budget(budget=budget, what=f"{mdp!r}", **sized(log10_sizes(mdp)[1], lambda: mdp.num_responses))
            except BudgetError as e:
                raise BudgetError(f"{e} (The dynamic-programming route was refused too: {refused})") from None
    return "enumerate"


# ------------------------------------------------------------------------------ J and ∇J
def objective(mdp: TokenMDP, policy, enum: Rollouts | None = None, *, route: str = "auto",
              budget: int | None = None) -> torch.Tensor:
    """J(θ) = Σ_x ρ(x) Σ_y π(y|x) RM(x, y), a scalar with autograd to θ (any order).

    With ``enum``: the sum over those responses only."""
    if choose_route(mdp, policy, route, enum, budget) == "dp":
        return dp.objective(mdp, policy)
    return _enumerated_objective(mdp, policy, enumerate_responses(mdp, budget) if enum is None else enum)


def _enumerated_objective(mdp: TokenMDP, policy, enum: Rollouts) -> torch.Tensor:
    """Σ_n ρ(x_n) π(y_n|x_n) RM(x_n, y_n) over the given responses, with autograd to θ."""
    logp = _response_log_prob(mdp, policy, enum).to(torch.float64)                # (N,) log π(y|x)
    return torch.dot(prompt_weights(mdp, enum) * enum.rm, logp.exp())


def _response_log_prob(mdp: TokenMDP, policy, enum: Rollouts) -> torch.Tensor:
    """(N,) log π(y|x) = Σ_t log π(y_t|s_t) with autograd to θ (without EOS every response has
    length H, so the mask pass is skipped)."""
    lp = policy.token_log_probs(enum.prompt_idx, enum.tokens)                  # (N, L)
    fixed_length = mdp.eos is None and enum.tokens.shape[1] == mdp.horizon
    return lp.sum(1) if fixed_length else (lp * enum.mask).sum(1)


def gradient(mdp: TokenMDP, policy, enum: Rollouts | None = None, *, route: str = "auto",
             budget: int | None = None) -> torch.Tensor:
    """∇J(θ) as one flat vector over ``policy.parameters()``.

    dp: ∇_θ Σ_{s,a} sg[ρ(s) π(a|s) (U(s⊕a) − U(s))] log π_θ(a|s), one backward pass through the
    policy's (S, V) log-prob table (for the tabular softmax: exactly the closed form).
    enumerate: autograd through Σ_y P(y) RM(y) (over ``enum`` when given)."""
    validate.mdp_and_policy(mdp, policy)
    params = _params(policy)
    if _route(mdp, policy, route, enum, budget) == "dp":                      # validated above
        return flat(dp.gradient(mdp, policy, params), params)
    J = _enumerated_objective(mdp, policy, enumerate_responses(mdp, budget) if enum is None else enum)
    return flat(torch.autograd.grad(J, params, allow_unused=True), params)


def expected_score(policy, enum: Rollouts, W: torch.Tensor, lp: torch.Tensor | None = None) -> torch.Tensor:
    """∇_θ Σ_{n,t} W[n,t] log π(y_{n,t}|s_{n,t}): flat vector. W (N, L) is detached weights.
    ``lp``: the policy's (N, L) token log-probs with their autograd graph, if already computed."""
    params = _params(policy)
    if lp is None:
        lp = policy.token_log_probs(enum.prompt_idx, enum.tokens)             # (N, L)
    Wm = (W.detach().to(torch.float64) * enum.mask).reshape(-1)               # (N·L,) zero after the end
    total = torch.dot(Wm, lp.reshape(-1).to(torch.float64))                   # Σ W·ℓ without an (N, L) product
    return flat(torch.autograd.grad(total, params, allow_unused=True), params)


# ------------------------------------------------------------------------------ tables
@dataclass
class ResponseProbs:
    """The part of ``Tables`` that batch enumeration needs: every response and its P(x, y)."""
    mdp: TokenMDP
    enum: Rollouts
    prob: torch.Tensor


@dataclass(eq=False)
class Tables:
    """Exact per-state tables of an MDP under a policy (index = TokenMDP state index).

    pi (S, V) next-token probabilities; r (S, V) token rewards of this decomposition; U (S,)
    E[RM | s]; Uc (S, V) U(s⊕a) (RM of the response for terminal pairs); V (S,), Q (S, V),
    A (S, V) = Q − V; visit (S,) reach probability ρ(s) (prompt probability included); J_prompt (P,).
    Per response, built on first access (so a DP over 10^8 responses never holds them): enum,
    every response (``enumerate_responses``, refused above ``budget`` responses), and prob (N,)
    P(x, y) = ρ(x) π(y|x).
    """
    mdp: TokenMDP
    pi: torch.Tensor
    r: torch.Tensor
    U: torch.Tensor
    Uc: torch.Tensor
    V: torch.Tensor
    Q: torch.Tensor
    A: torch.Tensor
    visit: torch.Tensor
    J: float
    J_prompt: torch.Tensor
    route: str = "dp"
    log_pi: torch.Tensor | None = None          # (S, V): prob is built from it, as the enumeration route did
    budget: int | None = None                   # responses, for the lazy enumeration
    _enum: Rollouts | None = None
    _prob: torch.Tensor | None = None

    @property
    def enum(self) -> Rollouts:
        """Every response of the MDP (built on first access)."""
        if self._enum is None:
            self._enum = enumerate_responses(self.mdp, self.budget)
        return self._enum

    @property
    def prob(self) -> torch.Tensor:
        """(N,) P(x, y) = ρ(x) π(y|x) of every response of ``enum`` (built on first access)."""
        if self._prob is None:
            self._prob = _response_probs(self.mdp, self.enum, self.log_pi)
        return self._prob

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


def _response_probs(mdp: TokenMDP, enum: Rollouts, log_pi: torch.Tensor, flat: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(N,) P(x, y) = ρ(x) exp Σ_t log π(y_t|s_t) from the (S, V) log-prob table (a spare 0 after the end)."""
    flat = _pair_index(mdp, enum) if flat is None else flat                          # (N, L)
    logp = torch.cat([log_pi.reshape(-1), log_pi.new_zeros(1)])[flat].sum(1)         # (N,)
    return prompt_weights(mdp, enum) * logp.exp()


def _enumerated_rewards(mdp: TokenMDP, enum: Rollouts, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, RM at terminal pairs), both (S, V), read off an enumeration (the reference for dp.pair_rewards)."""
    S, V = mdp.num_states, mdp.vocab_size
    r = _per_pair(flat, enum.token_rewards, S * V).view(S, V)                       # this decomposition's r(s, a)
    last = flat.gather(1, (enum.lengths - 1).clamp(min=0)[:, None])                 # (N, 1) the pair (s_T, y_T)
    return r, _per_pair(last, enum.rm[:, None], S * V).view(S, V)


def tables(mdp: TokenMDP, policy, enum: Rollouts | None = None, *, route: str = "auto",
           budget: int | None = None) -> Tables:
    """All exact tables (detached, float64) of ``mdp`` under ``policy``.

    dp: r(s, a) and the terminal pairs' RM come from the MDP (dp.pair_rewards); a passed ``enum``
    is kept as ``.enum`` (and ``.prob`` is built from it on access). enumerate: both are read off
    the enumeration. Either way U, V, Q then follow by backward sweeps over the levels of the tree
    and ρ(s) by one forward sweep (tpg/dp.py), O(S·V) work.
    """
    chosen = choose_route(mdp, policy, route, None, budget)                          # a passed enum is kept either way
    S, V, P = mdp.num_states, mdp.vocab_size, len(mdp.prompts)
    with torch.no_grad():
        log_pi = state_log_probs(mdp, policy).detach().to(torch.float64)             # (S, V)
        pi = log_pi.exp()
        prob = None
        if chosen == "dp":
            r, rm = dp.pair_rewards(mdp)                                             # (S, V) each
        else:
            enum = enumerate_responses(mdp, budget) if enum is None else enum
            flat = _pair_index(mdp, enum)                                            # (N, L)
            r, rm = _enumerated_rewards(mdp, enum, flat)
            prob = _response_probs(mdp, enum, log_pi, flat)
        U = dp.backward_values(mdp, pi, rm, 1.0, terminal_only=True)                # (S,) E[RM | s]
        Uc = dp.child_values(mdp, U, rm, 1.0, inplace=True)                          # (S, V) U(s⊕a)
        Vt = dp.backward_values(mdp, pi, r, mdp.gamma)                               # (S,)
        Q = dp.child_values(mdp, Vt, r, mdp.gamma)                                   # (S, V) r may be the MDP's own table
        visit = dp.reach(mdp, pi)                                                    # (S,)
        if prob is None:
            J_prompt = U[torch.arange(P) * mdp.states_per_prompt].clone()            # (P,) U(root_x)
            J = float(torch.dot(torch.as_tensor(mdp.prompt_probs), J_prompt))
        else:
            cond = prob / prompt_weights(mdp, enum)                                  # π(y|x)
            J_prompt = torch.zeros(P, dtype=torch.float64).index_add(0, enum.prompt_idx, cond * enum.rm)
            J = float((prob * enum.rm).sum())
    return Tables(mdp, pi, r, U, Uc, Vt, Q, Q - Vt[:, None], visit, J, J_prompt, route=chosen, log_pi=log_pi,
                  budget=budget if chosen == "enumerate" else None, _enum=enum, _prob=prob)


# ====================================================================================== moments
@dataclass
class Moments:
    """Exact first (and second) moments of an estimator ĝ over every possible batch."""
    mean: torch.Tensor                # (D,) E[ĝ]
    W: torch.Tensor                   # (N, L) E-weights: E[ĝ] = ∇ Σ W·ℓ (P(y)·E[c_t | y], summed over members)
    n_outcomes: int
    cov_trace: float | None = None    # E‖ĝ − E ĝ‖²
    cov: torch.Tensor | None = None   # (D, D) where requested and small
    notes: tuple = ()
    route: str = "multiset"           # how the batches were enumerated ("multiset" | "joint")
    skew: torch.Tensor | None = None  # (K,) exact skewness of each projection ⟨u_k, ĝ⟩ (with ``directions``)
    exkurt: torch.Tensor | None = None  # (K,) its exact excess kurtosis


ROUTES = ("auto", "keyed", "multiset", "joint")
KEYED_FROM = 200_000     # route="auto" takes the keyed route only when the multiset route needs more slots


def precheck(needs: dict, mdp: TokenMDP, G: int, n_prompts: int = 1, route: str = "auto", cov=None,
             directions=None, budget: int | None = None) -> bool:
    """Before anything is enumerated: whether the keyed route may apply, and, where only the
    multiset or joint route can run, their O(1) batch-budget check (``tpg.batches.check_batch_budget``)."""
    keyed_ok = G > 1 and not needs.get("continuations") and not needs.get("anchors") \
        and directions is None and cov != "full"
    if route == "keyed" and not keyed_ok:
        raise TPGError("route='keyed' needs G ≥ 2, no continuations or random anchors, and cov None or 'trace' "
                       "without directions")
    if route in ("multiset", "joint") or not keyed_ok:
        check_batch_budget(mdp, G, n_prompts, "joint" if route == "joint" else "multiset", budget)
    return keyed_ok


def moments(est, mdp: TokenMDP, policy, G: int = 1, *, n_prompts: int = 1, route: str = "auto",
            old_policy=None, critic=None, ref=None, cov: str | None = None, budget: int | None = None,
            chunk_rows: int = 200_000, directions: torch.Tensor | None = None, rollout_policy=None) -> Moments:
    """Exact E[ĝ] (and Cov[ĝ] on request: cov="trace" or "full") of an estimator:

        E[ĝ] = Σ_batches P(batch) ĝ(batch),   ĝ(batch) = Σ_{i,t} c[i,t] ∇ℓ_{i,t}.

    ``est`` is any callable ``est(rollouts) -> EstimatorOutput | loss`` (an ``Estimator`` or a user
    function); its optional ``needs`` attribute requests extra draws. Batches come from
    ``tpg.batches.ExactBatches`` (drawn from ``rollout_policy`` μ, default ``old_policy``, default
    ``policy``, and scored under ``policy`` and ``old_policy``: three policies, ``ro.logp`` /
    ``ro.logp_old`` / ``ro.logp_rollout``, so θ ≠ θ_old and a rollout engine μ ≠ θ_old are
    covered); ``tpg.batches.Evaluator`` gives each batch's coefficients
    with the engine's shortcuts checked on this estimator (batch-locality, exchangeability for the
    multiset route — else the joint route runs —, multilinearity when continuation returns are
    replaced by U). By linearity the per-response sums W[n, t] = Σ P(batch) c (DESIGN §2) give
    E[ĝ] = ∇_θ Σ W·ℓ in one backward pass through the enumeration.

    Second moments need each batch's ĝ, from the per-token scores (N, L, D); with ``directions``
    (K, D) only the projections ⟨u_k, ĝ⟩ are formed (``tpg.scores.projected_scores``), so the exact
    variances a designed Monte Carlo test needs are available for any D. Estimators that read
    continuation returns get no covariance (the substitution is exact for the mean only).
    """
    from tpg.draws import ExactDraws
    from tpg.estimators.core import check_needs
    from tpg.scores import projected_scores, token_scores
    if cov not in (None, "trace", "full"):
        raise TPGError(f"cov must be None, 'trace' or 'full', got {cov!r}")
    if route not in ROUTES:
        raise TPGError(f"route must be one of {ROUTES}, got {route!r}")
    if not callable(est):
        raise TPGError(f"est must be an estimator (tpg.estimator(...)) or a callable est(rollouts) -> loss, got {est!r}")
    behaviour = rollout_policy if rollout_policy is not None else (policy if old_policy is None else old_policy)
    needs = check_needs(dict(getattr(est, "needs", {}) or {}), f"estimator {getattr(est, 'name', est)!r}")
    check_compatible(mdp, policy)
    keyed_ok = precheck(needs, mdp, G, n_prompts, route, cov, directions, budget)
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
    logp_rollout = logp_old                                                            # (N, L) log μ
    if rollout_policy is not None:
        check_compatible(mdp, rollout_policy)
        if route == "keyed":
            raise TPGError("route='keyed' does not take a rollout_policy (its key probe assumes μ = θ_old)")
        keyed_ok = False
        with torch.no_grad():
            logp_rollout = (rollout_policy.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).to(torch.float64)
    # Full tables (U for the continuation returns) only when the estimator reads continuations.
    tab = tables(mdp, behaviour, enum) if needs.get("continuations") else \
        ResponseProbs(mdp, enum, prompt_weights(mdp, enum) * logp_rollout.sum(1).exp())
    draws = ExactDraws(tab, policy, critic=critic, ref=ref)
    want_cov = cov is not None and not needs.get("continuations")
    scores = None
    if want_cov:
        scores = token_scores(policy, enum) if directions is None else projected_scores(policy, enum, directions)
    ev = Evaluator(est, exchangeable_needed=route != "joint" and G > 1,
                   multilinear_needed=bool(needs.get("continuations")))
    if route in ("auto", "keyed") and keyed_ok:
        done = _keyed(ev, tab, logp_new, logp_old, draws, needs, G, scores, cov, budget, chunk_rows,
                      force=route == "keyed", n_prompts=n_prompts)
        if done is not None:
            W, sq, n_out, knotes = done
            mean = expected_score(policy, enum, W, lp_graph)
            out = Moments(mean, W, n_out, route="keyed", notes=tuple(ev.notes + knotes))
            if cov is not None and sq is not None:
                out.cov_trace = sq - float(mean @ mean)
            return out
        try:
            check_batch_budget(mdp, G, n_prompts, "multiset", budget)
        except BudgetError as e:
            raise BudgetError(f"{e} ({'; '.join(ev.notes) or 'the keyed route does not apply'})") from None
    route = "multiset" if route in ("auto", "keyed") else route
    if route == "multiset" and G > 1 and ev.state["exchangeable"] is False:
        route = "joint"
    while True:
        try:
            source = ExactBatches(tab, logp_new, logp_old, draws, needs, G, n_prompts, route, budget, chunk_rows,
                                  logp_rollout=logp_rollout)
            W, sq, second, raw = _accumulate(source, ev, enum, scores, cov, route)
            break
        except _Reroute:
            route = "joint"
            ev.notes.append("group members are not exchangeable for this estimator: batches enumerated as "
                            "ordered tuples (route='joint')")
        except BudgetError as e:
            if route == "joint" and ev.state["exchangeable"] is False:
                raise PropertyError(f"the estimator treats group members differently (not exchangeable), so the "
                                    f"multiset route does not apply, and the ordered-tuple route is too big: {e}") from e
            raise
    mean = expected_score(policy, enum, W, lp_graph)
    notes = list(ev.notes)
    out = Moments(mean, W, source.n_outcomes, route=route)
    if needs.get("continuations"):
        notes.append("continuation returns substituted by their exact expectation (exact for the mean only)")
        if cov is not None:
            notes.append("no covariance: it would need the continuations' own randomness (use Monte Carlo)")
    if want_cov:
        m = mean if directions is None else torch.as_tensor(directions, dtype=torch.float64) @ mean   # (D,) or (K,)
        out.cov_trace = sq - float(m @ m)
        if cov == "full":
            out.cov = second - torch.outer(m, m)
        if directions is not None:                                  # central moments from the raw ones
            e2, e3, e4 = raw
            var = (e2 - m**2).clamp(min=0)
            mu3 = e3 - 3 * m * e2 + 2 * m**3
            mu4 = e4 - 4 * m * e3 + 6 * m**2 * e2 - 3 * m**4
            ok = var > 1e-300
            out.skew = torch.where(ok, mu3 / var.clamp(min=1e-300) ** 1.5, torch.zeros_like(m))
            out.exkurt = torch.where(ok, mu4 / var.clamp(min=1e-300) ** 2 - 3, torch.zeros_like(m))
    out.notes = tuple(notes)
    return out


def _keyed(ev, tab, logp_new, logp_old, draws, needs, G, scores, cov, budget, chunk_rows, force, n_prompts=1):
    """The keyed route (``tpg.batches.KeyedGroups``), or None when it does not apply to this
    estimator (key not sufficient, not exchangeable) or is not smaller than the multiset route —
    the caller then takes the multiset route. Returns (W, E‖ĝ‖², n_groups, notes)."""
    from math import comb
    budget = DEFAULT_BUDGET if budget is None else budget
    n_resp = [int(len(pr)) for pr in [torch.nonzero(tab.enum.prompt_idx == x)[:, 0] for x in range(len(tab.mdp.prompts))]]
    P = n_prompts
    multiset_size = float("inf")
    if max(n_resp) < 10**6:
        per_slot = sum(comb(n + G - 1, G) for n in n_resp)
        multiset_size = float(per_slot) ** P * P * G if P * math.log10(max(per_slot, 1)) < 300 else float("inf")
    if P > 1 and cov is not None and multiset_size <= budget and not force:
        return None                                         # several slots: keyed gives the mean only
    for others in KeyedGroups.KEYS:
        kg = KeyedGroups(tab, logp_new, logp_old, draws, needs, G, others, n_prompts=P)
        size = kg.n_rows() + (kg.n_rows(pairs=True) if cov is not None and P == 1 else 0.0)
        # auto: keyed only where the multiset route is big (its key probe costs a few dozen evaluations)
        if size > budget or (not force and (size >= multiset_size or multiset_size < KEYED_FROM)):
            if force and size > budget:
                check_budget(size, budget, f"keyed groups G={G} (keys: {others})", "response slots")
            if size > budget:
                ev.notes.append(f"the keyed route with keys {others!r} would need {size:.3g} response slots")
            continue
        why = kg.probe(ev) if P == 1 else kg.probe_batches(ev)
        if why is None:
            break
        ev.notes.append(f"keyed route with keys {others!r} refused: {why}")
    else:
        if force:
            raise PropertyError("route='keyed' does not apply: " + "; ".join(ev.notes[-2:]))
        return None
    N, L = tab.enum.tokens.shape
    if P > 1:
        res = _keyed_slots(ev, kg, N, L, G, P, chunk_rows)
        if res is None:
            ev.notes.append("keyed route refused: group members are not exchangeable")
            return None
        return res + ([f"keyed route: others' key {others!r}, {P} prompt slots (mean only: no covariance)"],)
    W = torch.zeros(N, L, dtype=torch.float64)
    sq, n_out = 0.0, 0
    for pr in kg.prompts:
        ids, pm, own = kg.mean_groups(pr)                                           # (n, G), (n,), (n,)
        C = torch.zeros(pr["n_own"], L, dtype=torch.float64)                        # Σ_M P(M) c_0 per own class
        Q = torch.zeros(pr["n_own"], L, L, dtype=torch.float64)                     # Σ_M P(M) c_0 c_0ᵀ
        for c0, p, a in _row_coefficients(ev, kg, ids, pm, own, G, chunk_rows, rows=(0,)):    # c0: [(n, L)]
            C.index_add_(0, a, p[:, None] * c0[0])
            Q.index_add_(0, a, p[:, None, None] * c0[0][:, :, None] * c0[0][:, None, :])
        if not ev.check_exchangeable():
            ev.notes.append("keyed route refused: group members are not exchangeable")
            return None
        rows, cond = pr["rows"], kg.cond[pr["rows"]]
        W[rows] = G * pr["rho"] * cond[:, None] * C[pr["own_id"]]                # (n_rows, L)
        n_out += len(ids)
        if cov is not None:
            s = scores[rows]                                                        # (n, L, D)
            S = torch.zeros(pr["n_own"], L, L, dtype=torch.float64).index_add(
                0, pr["own_id"], cond[:, None, None] * torch.einsum("nld,nmd->nlm", s, s))
            mu = torch.zeros((pr["n_own"],) + s.shape[1:], dtype=torch.float64).index_add(
                0, pr["own_id"], cond[:, None, None] * s)                           # (n_own, L, D) Σ π s_t
            pair = 0.0
            pids, ppm, a1, a2 = kg.pair_groups(pr)
            for cc, p, ab in _row_coefficients(ev, kg, pids, ppm, torch.stack([a1, a2], 1), G, chunk_rows,
                                               rows=(0, 1)):
                e1 = torch.einsum("nl,nld->nd", cc[0], mu[ab[:, 0]])                # (n, D) E v_1 given the classes
                e2 = torch.einsum("nl,nld->nd", cc[1], mu[ab[:, 1]])
                pair += float((p * (e1 * e2).sum(1)).sum())
            sq += pr["rho"] * (G * float((Q * S).sum()) + G * (G - 1) * pair)
    return W, sq, n_out, [f"keyed route: others' key {others!r}, {n_out:,} (own class, multiset) groups"]


def _keyed_slots(ev, kg, N: int, L: int, G: int, P: int, chunk_rows: int):
    """The keyed mean with P prompt slots per batch: every slot j in turn holds (own class, others'
    multiset) while the other slots run over their configurations; the coefficient of slot j's row 0
    stands for its G members (exchangeability within a group). Returns (W, None, n_batches)."""
    W = torch.zeros(N, L, dtype=torch.float64)
    n_out = 0
    per = max(1, chunk_rows // (P * G))
    for pr in kg.prompts:
        C = torch.zeros(pr["n_own"], L, dtype=torch.float64)
        for j in range(P):
            ids, pm, own = kg.mean_batches(pr, j)
            for lo in range(0, len(ids), per):
                chunk = kg.chunk(ids[lo: lo + per], pm[lo: lo + per])
                c = ev.coefficients(chunk).reshape(len(ids[lo: lo + per]), P * G, -1)[:, j * G]   # (n, L)
                C.index_add_(0, own[lo: lo + per], pm[lo: lo + per, None] * c)
            n_out += len(ids)
        if not ev.check_exchangeable():
            return None
        rows = pr["rows"]
        W[rows] = G * pr["rho"] * kg.cond[rows][:, None] * C[pr["own_id"]]
    return W, None, n_out


def _row_coefficients(ev, kg, ids, pm, tag, G, chunk_rows, rows):
    """Yield (coefficients of the given rows of each group, P(multiset), tag) chunk by chunk."""
    per = max(1, chunk_rows // G)
    for lo in range(0, len(ids), per):
        chunk = kg.chunk(ids[lo: lo + per], pm[lo: lo + per])
        c = ev.coefficients(chunk).reshape(len(ids[lo: lo + per]), G, -1)           # (n, G, L)
        yield [c[:, r] for r in rows], pm[lo: lo + per], tag[lo: lo + per]


class _Reroute(Exception):
    """The multiset route was found not to apply (exchangeability fails): start again with 'joint'."""


def _accumulate(source, ev, enum: Rollouts, scores, cov, route: str):
    """Σ over the source's chunks: W (N, L) = Σ P(batch) c per response, and for second moments
    Σ P(batch) ‖ĝ_b‖² (and Σ P(batch) ĝ_b ĝ_bᵀ; and E ĝ_b^j per coordinate, j = 2, 3, 4)."""
    N, L = enum.tokens.shape
    W = torch.zeros(N, L, dtype=torch.float64)
    sq, second, raw = 0.0, None, [0.0, 0.0, 0.0]
    for chunk in source:
        ro, p_b = chunk.ro, chunk.weight                                              # p_b (n_batches,)
        c = ev.coefficients(chunk)                                                     # (rows, L)
        if route == "multiset" and not ev.check_exchangeable():
            raise _Reroute()
        W.index_add_(0, ro.response_id, p_b[ro.batch][:, None] * c)
        if scores is not None:
            g = torch.einsum("rl,rld->rd", c, scores[ro.response_id])                # (rows, D or K)
            g_b = torch.zeros(ro.n_batches, g.shape[1], dtype=g.dtype).index_add(0, ro.batch, g)   # ĝ per batch
            sq += float((p_b * (g_b**2).sum(1)).sum())
            raw = [r + (p_b[:, None] * g_b**j).sum(0) for r, j in zip(raw, (2, 3, 4))]
            if cov == "full":
                m2 = (g_b * p_b[:, None]).T @ g_b
                second = m2 if second is None else second + m2
    return W, sq, second, raw
