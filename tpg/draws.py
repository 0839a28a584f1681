"""Where the extra draws an estimator asks for come from: Monte Carlo or exact.

An estimator's ``needs`` (e.g. ``{"greedy": True, "continuations": 4, "anchors": {...}}``) is
filled into ``ro.extras`` by a provider with one method, ``fill(ro, needs) -> (ro, weight)``:

- ``MonteCarloDraws`` samples them with an explicit generator (weight = 1 per row).
- ``ExactDraws`` makes them exact: the greedy response is deterministic; continuation returns are
  replaced by their expectation U(prefix), which is exact for estimators multilinear in them
  (every TRePO/VinePPO reading without whitening, checked by the registry's ``multilinear`` flag
  and cross-checked against enumerated continuations in the tests); random anchor sets are
  enumerated, each row becoming one row per anchor set with weight P(anchor set).

Critics and reference policies are deterministic functions of the prefix, identical in both modes.
"""
from __future__ import annotations

import itertools
from dataclasses import replace
from numbers import Integral

import torch

from tpg import validate
from tpg.mdp import TokenMDP, TPGError
from tpg.rollouts import Rollouts, continuation_rm, greedy

ANCHOR_KINDS = ("bernoulli", "fixed", "every")


class TableCritic:
    """V̂(s) read from a per-state table (S,): values[:, t] = V̂(state before token t), (B, L)."""

    def __init__(self, mdp: TokenMDP, table: torch.Tensor):
        table = torch.as_tensor(table, dtype=torch.float64)
        if table.shape != (mdp.num_states,):
            raise TPGError(f"critic table has shape {tuple(table.shape)}, expected (num_states,) = ({mdp.num_states},)")
        self.mdp, self.table = mdp, table

    def __call__(self, ro: Rollouts) -> torch.Tensor:
        return self.table[self.mdp.state_index(ro.prompt_idx, ro.tokens, ro.mask)] * ro.mask


def exact_critic(tab) -> TableCritic:
    """The exact V of the tables' MDP decomposition (``tpg.exact.tables``)."""
    return TableCritic(tab.mdp, tab.V)


def perturbed_critic(tab, bias: float = 0.0, noise: float = 0.0, seed: int = 0) -> TableCritic:
    """V + bias + noise·ε(s), with ε(s) ~ N(0, 1) fixed per state (a deterministic wrong critic)."""
    eps = torch.randn(tab.mdp.num_states, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return TableCritic(tab.mdp, tab.V + bias + noise * eps)


def _check_anchor_spec(spec: dict) -> dict:
    if not isinstance(spec, dict) or spec.get("kind") not in ANCHOR_KINDS:
        raise TPGError(f"anchors must be a dict with kind in {ANCHOR_KINDS}, e.g. {{'kind': 'bernoulli', 'q': 0.5}}; "
                       f"got {spec!r}")
    q = spec.get("q")
    if spec["kind"] == "bernoulli" and not (validate.is_real(q) and validate.in_interval(q, 0.0, 1.0, "(]")):
        raise TPGError(f"bernoulli anchors need 0 < q ≤ 1, got {q!r}")
    if spec["kind"] == "fixed":
        pos = spec.get("positions")
        if not isinstance(pos, (list, tuple)) or not all(validate.is_int(t) and t >= 1 for t in pos):
            raise TPGError(f"'fixed' anchors need positions = a list of ints ≥ 1 (token positions, 1-based), "
                           f"e.g. {{'kind': 'fixed', 'positions': [1, 3]}}; got {pos!r}")
    if spec["kind"] == "every" and not (validate.is_int(spec.get("k")) and spec["k"] >= 1):
        raise TPGError(f"'every' anchors need k ≥ 1 (an int), got {spec.get('k')!r}")
    return spec


def deterministic_anchors(spec: dict, B: int, L: int) -> torch.Tensor | None:
    """(B, L) anchor mask for non-random specs (position t ↦ column t-1), else None."""
    t = torch.arange(1, L + 1)
    if spec["kind"] == "fixed":
        pos = torch.as_tensor(list(spec.get("positions", [])), dtype=torch.long)
        return (t[None, :] == pos[:, None]).any(0).expand(B, L).clone() if len(pos) else torch.zeros(B, L, dtype=torch.bool)
    if spec["kind"] == "every":
        return (t % int(spec["k"]) == 0).expand(B, L).clone()
    return None


class _Base:
    def __init__(self, mdp: TokenMDP, policy, critic=None, ref=None):
        self.mdp, self.policy, self.critic, self.ref = mdp, policy, critic, ref
        self._greedy = None

    def greedy_rm(self) -> torch.Tensor:
        """(P,) RM of the greedy response to each prompt (cached: deterministic given θ)."""
        if self._greedy is None:
            self._greedy = greedy(self.mdp, self.policy, torch.arange(len(self.mdp.prompts))).rm
        return self._greedy

    def _common(self, ro: Rollouts, needs: dict) -> dict:
        ex = dict(ro.extras)
        if needs.get("greedy"):
            ex["greedy_rm"] = self.greedy_rm()[ro.prompt_idx]
        if needs.get("values"):
            if self.critic is None:
                raise TPGError("this estimator needs a critic: pass critic= (e.g. tpg.draws.exact_critic(tables))")
            v = torch.as_tensor(self.critic(ro), dtype=torch.float64).detach()
            if tuple(v.shape) != tuple(ro.tokens.shape) or not torch.isfinite(v).all():
                raise TPGError(f"the critic must return finite values of shape (B, L) = {tuple(ro.tokens.shape)} "
                               f"(V̂ of the state before each token), got shape {tuple(v.shape)}")
            ex["values"] = v * ro.mask
        if needs.get("ref"):
            if self.ref is None:
                raise TPGError("this estimator uses a KL term: pass ref= (a reference policy)")
            with torch.no_grad():
                ex["ref_logp"] = (self.ref.token_log_probs(ro.prompt_idx, ro.tokens) * ro.mask).to(torch.float64)
        return ex


class MonteCarloDraws(_Base):
    """Sampled extra draws, from an explicit ``torch.Generator`` (every batch keeps factor 1)."""

    def __init__(self, mdp, policy, generator: torch.Generator, critic=None, ref=None):
        super().__init__(mdp, policy, critic, ref)
        self.generator = generator

    def fill(self, ro: Rollouts, needs: dict) -> tuple[Rollouts, torch.Tensor]:
        """(ro with the requested extras, factor (n_batches,) of ones)."""
        ex = self._common(ro, needs)
        if needs.get("continuations"):
            with torch.no_grad():
                ex["cont_rm"] = continuation_rm(self.mdp, self.policy, ro, int(needs["continuations"]), self.generator)
        if needs.get("anchors"):
            spec = _check_anchor_spec(needs["anchors"])
            B, L = ro.tokens.shape
            a = deterministic_anchors(spec, B, L)
            if a is None:
                a = torch.rand(B, L, generator=self.generator, dtype=torch.float64) < float(spec["q"])
            ex["anchors"] = a & ro.mask.bool()
        return replace(ro, extras=ex), torch.ones(ro.n_batches, dtype=torch.float64)


class ExactDraws(_Base):
    """Exact extra draws from the engine's tables (see module docstring). Substituting U(prefix) for
    the continuation returns is exact only for estimators multilinear in them: ``tpg.batches.Evaluator``
    checks that on the estimator before any of its coefficients are used."""

    def __init__(self, tab, policy, critic=None, ref=None):
        super().__init__(tab.mdp, policy, critic, ref)
        self.tab = tab

    def fill(self, ro: Rollouts, needs: dict) -> tuple[Rollouts, torch.Tensor]:
        """(ro with the requested extras, factor (n_batches,)): 1 per batch, except that a random
        anchor set turns each batch into one batch per anchor subset, with factor P(subset)."""
        ex = self._common(ro, needs)
        if needs.get("continuations"):
            K = int(needs["continuations"])
            ex["cont_rm"] = self.tab.prefix_values(ro)[:, :, None].expand(-1, -1, K).clone()  # (B, L+1, K)
        factor = torch.ones(ro.n_batches, dtype=torch.float64)
        if needs.get("anchors"):
            spec = _check_anchor_spec(needs["anchors"])
            B, L = ro.tokens.shape
            a = deterministic_anchors(spec, B, L)
            if a is None:
                return self._enumerate_anchors(replace(ro, extras=ex), float(spec["q"]), L)
            ex["anchors"] = a & ro.mask.bool()
        return replace(ro, extras=ex), factor

    @staticmethod
    def _enumerate_anchors(ro: Rollouts, q: float, L: int) -> tuple[Rollouts, torch.Tensor]:
        """Every anchor subset of the L positions, one row (and one batch) each, factor P(subset)."""
        if ro.n_batches != ro.batch_size:
            raise TPGError("random anchors are enumerated per response: use G = 1 and one prompt per batch")
        subsets = torch.tensor(list(itertools.product([False, True], repeat=L)), dtype=torch.bool)  # (2^L, L)
        qq = torch.tensor(q, dtype=torch.float64)           # a python-float q would make where() float32
        p = torch.where(subsets, qq, 1.0 - qq).prod(1)                                          # (2^L,)
        n = subsets.shape[0]
        rows = torch.arange(ro.batch_size).repeat_interleave(n)                                 # batch-major
        ids = torch.arange(len(rows))
        out = ro.select(rows)
        out = replace(out, group=ids, batch=ids, n_batches=len(rows),
                      extras={**out.extras, "anchors": subsets.repeat(ro.batch_size, 1) & out.mask.bool()})
        return out, p.repeat(ro.batch_size)
