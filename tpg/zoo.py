"""The estimator zoo: every library loss, and the settings that change its verdict, judged exactly.

Settings are estimator wrappers (any callable ``est(ro) -> loss`` works with ``tpg.report``), so the
exact engine needs no change:

- ``Configured(est, split=k, norm=...)``: each batch split into k micro-batches / accumulation steps /
  data-parallel ranks (equal parts, in row order). Advantages are computed on the whole batch first
  (verl ``compute_advantage`` and TRL's scoring run before the split). ``norm="global"``: each part
  normalised by the whole batch's count (verl ``batch_num_tokens``/``global_batch_size`` with
  ``dp_size``, TRL ``dapo``'s ``num_items_in_batch``) — the update equals the unsplit one;
  ``norm="local"``: each part normalised by its own count and the k gradients averaged (TRL
  ``bnpo``/``grpo`` with ``loss / gradient_accumulation_steps``, DDP's average over ranks).
- ``Configured(est, rollout_is=mode, C=...)``: the rollout engine samples from μ ≠ π. Draw the batches
  from μ with ``report(..., old_policy=mu)``: ``ro.logp_old`` then holds μ's log-probs; the trainer
  recomputes its own old log-probs (θ_old = θ on the first mini-batch, so the PPO ratio is 1) and
  multiplies each token's loss by the detached IS weight: "token_truncate" min(ρ_t, C) (verl
  ``rollout_is="token"``, TIS), "token_mask" ρ_t·[ρ_t ≤ C] (IcePop-style; TRL "token_mask"),
  "sequence_truncate" min(Π_t ρ_t, C) (verl ``rollout_is="sequence"``), "sequence_mask"
  Π_t ρ_t·[Π ρ ≤ C] (TRL's default "sequence_mask"), or "none" (mismatch ignored); ρ_t = π/μ.
  The target is ∇J(π).
- ``Configured(est, kl=(β, kind, where))``: any verl KL type (k1, abs, k2, k3 and the "+"
  straight-through forms), in the reward (detached, on the behaviour log-probs, verl
  ``apply_kl_penalty``) or in the loss (aggregated like the policy loss, verl ``use_kl_loss``).
- several PPO epochs need no wrapper: ``report(est, mdp, policy=θ, old_policy=θ_old)``.

``run_zoo`` builds the verdict matrix (``tpg zoo``), ``to_markdown`` renders it for the README.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace

import torch

from tpg import exact
from tpg.estimators.core import AGGREGATIONS, POLICY_LOSSES, Estimator, agg_weights, estimator, kl_penalty
from tpg.estimators import verl as V
from tpg.estimators import trl as T
from tpg.estimators import openrlhf as O  # noqa: F401  (registration)
from tpg.mdp import TPGError
from tpg.rollouts import Rollouts

IS_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
NORMS = ("global", "local")


def _within_batch_position(ro: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) position of each row inside its batch (in row order) and (B,) its batch's size."""
    size = torch.bincount(ro.batch, minlength=ro.n_batches)                      # (n_batches,)
    order = torch.argsort(ro.batch, stable=True)
    start = torch.cumsum(size, 0) - size
    pos = torch.empty_like(order)
    pos[order] = torch.arange(ro.batch_size) - start[ro.batch[order]]
    return pos, size[ro.batch]


@dataclass(frozen=True)
class Configured:
    """A tpg ``Estimator`` run under a training setting (module docstring): ``split`` parts with a
    ``norm`` convention, a rollout-mismatch correction ``rollout_is`` with cap ``C``, and a verl KL
    term ``kl = (β, kind, where)``. Callable: ``est(ro) -> loss``, as ``tpg.report`` expects."""
    est: Estimator
    split: int = 1
    norm: str = "global"
    rollout_is: str | None = None
    C: float = 2.0
    kl: tuple | None = None
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.est, Estimator):
            raise TPGError(f"Configured wraps a tpg Estimator (tpg.estimator(...)), got {self.est!r}")
        if isinstance(self.split, bool) or not isinstance(self.split, int) or self.split < 1:
            raise TPGError(f"split must be an int ≥ 1 (micro-batches / accumulation steps / ranks), got {self.split!r}")
        if self.norm not in NORMS:
            raise TPGError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.rollout_is is not None and self.rollout_is not in IS_MODES:
            raise TPGError(f"rollout_is must be None or one of {IS_MODES}, got {self.rollout_is!r}")
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise TPGError(f"the IS cap C must be a number > 0, got {self.C!r}")
        if self.kl is not None:
            if self.est.kl is not None:
                raise TPGError("give the KL either to the estimator or to Configured, not both")
            beta, kind, where = self.kl
            if kind not in V.VERL_KL or where not in ("reward", "loss") or not beta >= 0:
                raise TPGError(f"kl must be (β ≥ 0, kind in {V.VERL_KL}, 'reward' | 'loss'), got {self.kl!r}")
        if not self.name:
            parts = [self.est.name]
            if self.split > 1:
                parts.append(f"split={self.split}/{self.norm}")
            if self.rollout_is is not None:
                parts.append(f"IS={self.rollout_is}(C={self.C:g})")
            if self.kl is not None:
                parts.append(f"KL={self.kl[1]}@{self.kl[2]}(β={self.kl[0]:g})")
            object.__setattr__(self, "name", " ".join(parts))

    @property
    def needs(self) -> dict:
        nd = dict(self.est.needs)
        if self.kl is not None:
            nd["ref"] = True
        return nd

    # ---------------------------------------------------------------------------------- the math
    def __call__(self, ro: Rollouts) -> torch.Tensor:
        if ro.logp is None:
            raise TPGError("the rollouts carry no log-probs: call ro.score(policy) first")
        token_w = torch.ones_like(ro.mask)
        if self.rollout_is is not None:
            token_w = self._is_weights(ro)                                           # (B, L) detached
            ro = replace(ro, logp_old=ro.logp.detach())                              # trainer's θ_old = θ
        if self.kl is not None and self.kl[2] == "reward":
            beta, kind, _ = self.kl
            kl_tok = beta * V.kl_penalty(ro.logp_old, ro.extras["ref_logp"], kind).detach() * ro.mask   # (B, L)
            ro = replace(ro, token_rewards=ro.token_rewards - kl_tok, rm=ro.rm - kl_tok.sum(1), kl_reward=kl_tok)
        adv = self.est(ro).advantages                                                # (B, L) on the whole batch
        loss_fn = POLICY_LOSSES[self.est.loss].fn
        ctx = {"ro": ro} if "ro" in __import__("inspect").signature(loss_fn).parameters else {}
        per_tok = loss_fn(ro.logp, ro.logp_old, adv, ro.mask, **self.est._loss_kwargs(), **ctx) * token_w
        w = self._weights(ro)                                                        # (B, L) aggregation
        loss = (w * per_tok).sum()
        if self.est.kl is not None and self.est.kl.where == "loss":
            loss = loss + self.est.kl.coef * (w * kl_penalty(ro.logp, ro.extras["ref_logp"], self.est.kl.kind)).sum()
        if self.kl is not None and self.kl[2] == "loss":
            loss = loss + self.kl[0] * (w * V.kl_penalty(ro.logp, ro.extras["ref_logp"], self.kl[1])).sum()
        return loss

    def _weights(self, ro: Rollouts) -> torch.Tensor:
        """Aggregation weights: the whole batch's ("global", or split = 1), or each part's own,
        averaged over the k parts ("local")."""
        if self.split == 1 or self.norm == "global":
            return agg_weights(ro, self.est.agg, self.est.agg_constant)
        pos, size = _within_batch_position(ro)
        if bool((size % self.split != 0).any()):
            raise TPGError(f"a batch of {int(size[0])} responses cannot be split into {self.split} equal parts")
        part = pos * self.split // size                                              # (B,) part index
        sub = replace(ro, batch=ro.batch * self.split + part, n_batches=ro.n_batches * self.split)
        return agg_weights(sub, self.est.agg, self.est.agg_constant) / self.split

    def _is_weights(self, ro: Rollouts) -> torch.Tensor:
        """(B, L) detached IS weight of each token for the rollout policy μ (``ro.logp_old``)."""
        with torch.no_grad():
            log_r = (ro.logp.detach() - ro.logp_old) * ro.mask                      # log π/μ per token
            if self.rollout_is == "none":
                return torch.ones_like(ro.mask)
            r = torch.exp(log_r) if self.rollout_is.startswith("token") else \
                torch.exp(log_r.sum(1, keepdim=True)).expand_as(log_r)
            if self.rollout_is.endswith("truncate"):
                return torch.clamp(r, max=self.C) * ro.mask
            return torch.where(r <= self.C, r, torch.zeros_like(r)) * ro.mask


# ====================================================================================== exact targets
def kl_objective_gradient(mdp, policy, ref, beta: float) -> torch.Tensor:
    """∇(J − β KL_seq(π‖π_ref)), KL_seq = Σ_y P(y) log P_π(y)/P_ref(y), by autograd through the enumeration."""
    from tpg.rollouts import enumerate_responses
    from tpg.scores import grad as flat_grad
    enum = enumerate_responses(mdp)
    lp = (policy.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).sum(1)            # (N,)
    with torch.no_grad():
        lr = (ref.token_log_probs(enum.prompt_idx, enum.tokens) * enum.mask).sum(1)
    rho = exact.prompt_weights(mdp, enum)
    return flat_grad((rho * lp.exp() * (enum.rm - beta * (lp - lr))).sum(), policy)


def local_kl_gradient(mdp, policy, ref, reverse: bool = False) -> torch.Tensor:
    """∇ Σ_s sg(ρ(s)) KL(π(·|s)‖π_ref(·|s)) (``reverse``: KL(π_ref‖π)), the state distribution frozen:
    what k2 (and every "+" form) resp. k3 in the loss estimate (ZOO §4)."""
    from tpg.scores import grad as flat_grad
    visit = exact.tables(mdp, policy).visit.detach()                                         # (S,)
    lp = policy.state_log_probs().to(torch.float64)                                           # (S, V)
    with torch.no_grad():
        lr = ref.state_log_probs().to(torch.float64)
    kl = (lr.exp() * (lr - lp)).sum(-1) if reverse else (lp.exp() * (lp - lr)).sum(-1)      # (S,)
    return flat_grad((visit * kl).sum(), policy)


# ====================================================================================== the matrix
@dataclass
class Row:
    lib: str
    name: str
    setting: str
    mdp: str
    verdict: str
    scale: float
    residual: float
    rel_bias: float
    target: str = "∇J"
    expected: str | None = None            # ZOO's recorded verdict, where it gives one
    seconds: float = 0.0

    def agrees(self) -> bool | None:
        return None if self.expected is None else self.expected == self.verdict


def _cases(fast: bool):
    """(lib, name, setting, builder(pol) -> est, report kwargs(pol) -> dict, target, expected on gaussian)."""
    vanilla, tm, smts = "verl.vanilla", "token-mean", "seq-mean-token-sum"
    adv_expect = {"gae": None, "grpo": "biased", "verl.grpo_vectorized": "biased", "verl.gdpo": "biased",
                  "verl.grpo_passk": "biased", "reinforce_pp_baseline": "biased", "rloo": "unbiased",
                  "verl.rloo_vectorized": "unbiased", "verl.opo": "biased", "reinforce_pp": "biased",
                  "remax": "unbiased", "verl.gpg": "scaled", "verl.optimal_token_baseline": "biased",
                  "verl.tir_optimal_token_baseline": "biased"}
    out = []
    for vname, tname in V.VERL_NAMES.items():
        if tname == "gae" and fast:
            continue
        for agg in ((smts,) if fast else (smts, tm)):
            def build(pol, tname=tname, agg=agg):
                opts = dict(pi_sq=V.sum_pi_squared(pol)) if "optimal_token" in tname else {}
                return V.verl_estimator(tname, loss=vanilla, agg=agg, label=f"verl.{vname}", **opts)
            kw = (lambda pol: {"critic": _exact_critic(pol)}) if tname == "gae" else (lambda pol: {})
            out.append(("verl", f"adv {vname}", f"vanilla/{agg}", build, kw, "∇J",
                        adv_expect[tname] if agg == smts else None))
    loss_expect = {"sapo": "biased", "geo_mean": "biased", "gspo": "biased", "clip_cov": "biased"}
    for lname in V.VERL_LOSSES:
        opts = {"beta": 0.1} if lname == "dro" else {}
        if lname == "bypass_mode":
            opts = {"loss_type": "reinforce"}
        def build(pol, lname=lname, opts=opts):
            return V.verl_estimator("rloo", loss=lname, agg=smts, loss_options=opts, label=f"verl.{lname}")
        agg = V.FORCED_AGG.get(f"verl.{lname}", smts)
        out.append(("verl", f"loss {lname}", f"rloo/{agg}", build, lambda pol: {}, "∇J",
                    loss_expect.get(lname, "unbiased")))
    for agg in AGG_ROWS:
        out.append(("verl", f"agg {agg}", "rloo/vanilla", lambda pol, agg=agg: V.verl_estimator(
            "rloo", loss=vanilla, agg=agg, label=f"verl.agg.{agg}"), lambda pol: {}, "∇J",
            {"token-mean": "biased", "token-sum": "scaled", "seq-mean-token-sum": "unbiased",
             "seq-mean-token-sum-norm": "scaled", "seq-mean-token-mean": "biased",
             "verl.seq-mean-token-mean": "biased", "verl.seq-mean-token-sum-norm-longest": "biased"}[agg]))
    for lt in T.LOSS_TYPES:
        for sr in (("group",) if fast else ("group", "none")):
            lo = {"epsilon_high": 5.0} if lt == "cispo" and sr == "none" else {}
            lvl = "sequence" if lt == "luspo" else "token"
            out.append(("trl", f"loss_type {lt}", f"scale_rewards={sr}" + (" ε_high=5" if lo else ""),
                        lambda pol, lt=lt, sr=sr, lo=lo, lvl=lvl: T.trl_estimator(
                            lt, scale_rewards=sr, importance_sampling_level=lvl, loss_options=lo),
                        lambda pol: {}, "∇J", None))
    for oname, tname in O.OPENRLHF_NAMES.items():
        if tname == "gae":
            continue
        out.append(("openrlhf", f"adv {oname}", "ppo/token-mean", lambda pol, tname=tname, oname=oname: estimator(
            tname, agg=tm, label=f"openrlhf.{oname}", **({"std": False} if oname == "dr_grpo" else {})),
            lambda pol: {}, "∇J", None))
    # ------------------------------------------------------------------ settings
    for agg in (tm, smts):
        for norm in NORMS:
            out.append(("setting", f"micro-batches rloo/{agg}", f"split=3/{norm}", lambda pol, agg=agg, norm=norm:
                        Configured(estimator("rloo", agg=agg), split=3, norm=norm), lambda pol: {}, "∇J",
                        "unbiased" if agg == smts else "biased"))
    for mode in IS_MODES:
        out.append(("setting", "rollout mismatch rloo/" + smts, f"IS={mode}", lambda pol, mode=mode: Configured(
            estimator("rloo"), rollout_is=mode, C=2.0), lambda pol: {"old_policy": _moved(pol, 0.7)}, "∇J(π)",
            None))
    out.append(("setting", "rollout mismatch rloo/" + smts, "IS=sequence_truncate(C=1e6)", lambda pol: Configured(
        estimator("rloo"), rollout_is="sequence_truncate", C=1e6), lambda pol: {"old_policy": _moved(pol, 0.7)},
        "∇J(π)", "unbiased"))
    for loss in ("ppo", "verl.vanilla", "verl.cispo", "verl.dppo_tv", "verl.gspo"):
        out.append(("setting", f"PPO epoch 2 rloo/{loss}", "θ_old ≠ θ (step 0.3)", lambda pol, loss=loss: estimator(
            "rloo", loss=loss, agg=smts, label=f"epoch2.{loss}"), lambda pol: {"old_policy": _moved(pol, 0.3)},
            "∇J(θ)", None))
    for kind in ("k1", "abs", "k2", "k3", "k1+", "k3+", "abs+"):
        for where in ("reward", "loss"):
            if where == "reward" and kind.endswith("+"):
                continue
            out.append(("setting", "KL rloo/" + smts, f"{kind} in {where} (β=0.1)", lambda pol, kind=kind, where=where:
                        Configured(estimator("rloo"), kl=(0.1, kind, where)), lambda pol: {"ref": _moved(pol, 1.0)},
                        "∇(J − βKL)", "unbiased" if (kind == "k1" and where == "reward") else "biased"))
    return out


AGG_ROWS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                       "seq-mean-token-mean", "verl.seq-mean-token-mean", "verl.seq-mean-token-sum-norm-longest")


def _moved(pol, step: float):
    """A copy of a tabular policy with its logits moved by ``step``·N(0, 1) (a fixed seed): θ_old, μ or π_ref."""
    from tpg.policies import TabularSoftmax
    g = torch.Generator().manual_seed(12345)
    return TabularSoftmax(pol.mdp, pol.logits.detach() + step * torch.randn(pol.logits.shape, generator=g,
                                                                           dtype=torch.float64))


def _exact_critic(pol):
    from tpg.draws import exact_critic
    return exact_critic(exact.tables(pol.mdp, pol))


def run_zoo(seeds=(0,), rewards=("gaussian", "binary"), G: int = 3, fast: bool = False, only: str | None = None,
            progress=None) -> list[Row]:
    """The verdict matrix on seeded MDPs (one prompt, vocab {a, b, EOS}, H = 3: ZOO.md's set-up)."""
    from tpg import random_mdp
    from tpg.policies import TabularSoftmax
    from tpg.verify import report, roundoff_floor
    rows = []
    for seed in seeds:
        for reward in rewards:
            mdp = random_mdp(seed, vocab_size=3, horizon=3, n_prompts=1, reward=reward)
            pol = TabularSoftmax(mdp, seed=seed)
            delta = roundoff_floor(mdp, pol)
            grad = exact.gradient(mdp, pol)
            for lib, name, setting, build, kw, target, expected in _cases(fast):
                if only and only not in f"{lib} {name} {setting}":
                    continue
                t0 = time.perf_counter()
                kwargs = kw(pol)
                tgt = grad
                if target == "∇(J − βKL)":
                    tgt = kl_objective_gradient(mdp, pol, kwargs["ref"], 0.1)
                r = report(build(pol), mdp, pol, G, cov=None, target=tgt, roundoff=delta, **kwargs)
                rows.append(Row(lib, name, setting, f"{reward}(seed={seed})", r.verdict, r.scale, r.residual,
                                r.rel_bias, target, expected if reward == "gaussian" else None,
                                time.perf_counter() - t0))
                if progress:
                    progress(rows[-1])
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'lib':9s} {'estimator':40s} {'setting':32s} {'mdp':20s} {'verdict':9s} {'scale':>9s} {'resid/|c|':>9s} {'ZOO':5s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        res = r.residual / abs(r.scale) if r.scale else math.inf
        z = "" if r.agrees() is None else ("ok" if r.agrees() else "DIFF")
        lines.append(f"{r.lib:9s} {r.name:40s} {r.setting:32s} {r.mdp:20s} {r.verdict:9s} {r.scale:9.4f} "
                     f"{res:9.1e} {z:5s}")
    return "\n".join(lines)


def to_markdown(rows: list[Row]) -> str:
    """The matrix as a markdown table (for the README; generated, never hand-typed)."""
    out = ["| library | estimator | setting | MDP | target | verdict | scale c | residual / c |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res = r.residual / abs(r.scale) if r.scale else math.inf
        out.append(f"| {r.lib} | `{r.name}` | {r.setting} | {r.mdp} | {r.target} | **{r.verdict}** | "
                   f"{r.scale:.4g} | {res:.1e} |")
    return "\n".join(out)


def run_cli(args) -> int:
    """``tpg zoo``: print the matrix (``--json PATH``, ``--markdown PATH``); exit 1 if a verdict
    contradicts one ZOO.md records."""
    from tpg import validate
    validate.check_output_path(args.json)
    validate.check_output_path(args.markdown, "--markdown")
    if args.G < 2:
        raise TPGError(f"--G must be ≥ 2 (group estimators need two responses), got {args.G}")
    rows = run_zoo(seeds=tuple(range(args.seed, args.seed + args.seeds)), G=args.G, fast=args.fast, only=args.only)
    if not rows:
        raise TPGError(f"--only {args.only!r} matches no row of the zoo")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(rows) + "\n")
    return 1 if any(r.agrees() is False for r in rows) else 0


def add_parser(sub) -> None:
    s = sub.add_parser("zoo", help="verdict matrix of every verl / TRL / OpenRLHF estimator × aggregation × setting")
    s.add_argument("--seeds", type=int, default=1, help="random MDPs per reward kind (default 1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--G", type=int, default=3, help="responses per prompt (default 3)")
    s.add_argument("--fast", action="store_true", help="one aggregation per advantage, no GAE (for CI)")
    s.add_argument("--only", metavar="TEXT", help="only rows whose 'lib name setting' contains TEXT")
    s.add_argument("--json", metavar="PATH")
    s.add_argument("--markdown", metavar="PATH", help="also write the matrix as a markdown table")
    s.set_defaults(fn=run_cli)
