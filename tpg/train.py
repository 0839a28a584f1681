"""Training demo: pretrain a reference model on a synthetic language, then RL fine-tune it with the
very estimators the exact engine verifies, tracking the exact objective J(θ) as it goes.

- ``synthetic_language(mdp, seed)``: a fixed random BIGRAM language over the MDP's tokens (the
  next token depends only on the previous one; the first response token on the prompt's last
  token, or a start marker). It is a ``LogLinear`` policy with only its previous-token table set,
  so it samples with ``tpg.rollouts.sample`` and its exact distribution is enumerable.
- ``pretrain_reference(mdp, policy, steps, generator)``: maximum likelihood on samples of that
  language (seconds on CPU for the tiny GPT-2): the reference model π_ref of the KL terms.
- ``train(mdp, policy, algo, ...)``: RL with sampling (``tpg.rollouts.sample``), extra draws
  (``tpg.draws.MonteCarloDraws``: greedy response, continuations, critic values, reference
  log-probs), the loss of a registry ``Estimator`` and Adam. PPO runs several epochs on each batch
  (the clipped ratio matters from the second epoch on) with the exact critic V of the current
  policy (``tpg.exact.tables``) or a learned per-state table regressed on sampled returns.
  J is computed exactly every ``eval_every`` steps whenever the MDP is enumerable.

``tpg train --policy tabular|loglinear|gpt2 --algo NAME`` runs it on a small enumerable MDP.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch

from tpg import exact, validate
from tpg.draws import MonteCarloDraws, TableCritic, exact_critic
from tpg.estimators import KL, estimator
from tpg.estimators.core import ADVANTAGES, PRESETS
from tpg.estimators.outcome import rewards_to_go
from tpg.mdp import TokenMDP, TPGError, random_mdp
from tpg.policies import LogLinear, make_policy
from tpg.rollouts import Rollouts, response_log_prob, sample

EXACT_J_BUDGET = 200_000          # responses: above this J is not tracked (Monte Carlo RM only)


# ================================================================================ algorithms
@dataclass(frozen=True)
class Algo:
    """A training recipe: a registry estimator (name + options), epochs per batch, critic."""
    name: str
    advantage: str
    options: dict = field(default_factory=dict)
    epochs: int = 1
    critic: str | None = None           # "exact" | "learned" for estimators that read values
    doc: str = ""


ALGOS: dict[str, Algo] = {a.name: a for a in [
    Algo("reinforce", "reinforce", doc="REINFORCE with the response reward RM"),
    Algo("rloo", "rloo", doc="RLOO: leave-one-out group baseline"),
    Algo("grpo", "grpo", doc="GRPO: group-normalised advantages (mean and std)"),
    Algo("drgrpo", "drgrpo", doc="Dr. GRPO: group mean only, constant-normalised aggregation"),
    Algo("remax", "remax", doc="ReMax: greedy-response baseline"),
    Algo("ppo", "gae", dict(lam=0.95), epochs=4, critic="exact",
         doc="PPO-clip, 4 epochs per batch, GAE(λ=0.95) with the exact critic V of the current policy"),
    Algo("ppo-learned", "gae", dict(lam=0.95), epochs=4, critic="learned",
         doc="PPO-clip, 4 epochs per batch, GAE(λ=0.95) with a learned per-state critic"),
    Algo("trepo", "trepo", dict(K=2), doc="TRePO: advantages from K = 2 continuation rollouts per prefix"),
    Algo("vineppo", "vineppo", dict(K=4, step=1, whiten=False),
         doc="VinePPO: MC values from K = 4 rollouts per step (1 token per step)"),
]}
DEFAULT_LR = {"tabular": 0.1, "loglinear": 0.05, "gpt2": 0.005}
PRETRAIN_STEPS = 50         # CLI: leaves ≤ 5 % of the initial KL(language ‖ π) for every policy kind


def algo_names() -> list[str]:
    """The algorithms available now (TRePO/VinePPO need their estimators registered)."""
    return [n for n, a in ALGOS.items() if a.advantage in ADVANTAGES or a.advantage in PRESETS]


def get_algo(name: str) -> Algo:
    if not (isinstance(name, str) and name in algo_names()):
        raise TPGError(f"unknown algorithm {name!r}; choose one of {algo_names()} "
                       "(e.g. tpg train --algo rloo)")
    return ALGOS[name]


GROUP_ADVANTAGES = ("grpo", "rloo", "drgrpo")      # compare responses within a group: need G ≥ 2


def check_hyper(algo: str, steps, G, lr, min_steps: int = 0) -> Algo:
    """Validate the training hyperparameters (shared by ``train`` and the CLI, which checks them
    before pretraining so bad input never costs a pretraining run). Returns the algorithm."""
    spec = get_algo(algo)
    validate.integer("steps", steps, min_steps)
    validate.integer("G", G, 1)
    validate.real("learning rate", lr, 0.0, None, "(]")
    if spec.advantage in GROUP_ADVANTAGES and G < 2:
        raise TPGError(f"{algo} compares responses within a group: use G ≥ 2 (got G={G})")
    return spec


# ================================================================================ critic
class LearnedTableCritic(TableCritic):
    """A per-state value table (S,) learned by regression on sampled returns.

    ``update(ro)`` moves V̂(s) towards the mean return-to-go G_t = Σ_{k≥t} γ^(k−t) r_k observed
    from s in the batch (the MDP's own token rewards, which GAE reads): V̂ ← V̂ + lr (Ḡ(s) − V̂),
    the exact minimiser of the batch's squared error when lr = 1. Unvisited states keep their value.
    """

    def __init__(self, mdp: TokenMDP, lr: float = 0.5, init: float = 0.0):
        validate.real("critic learning rate", lr, 0.0, 1.0, "(]")
        validate.real("critic init", init)
        super().__init__(mdp, torch.full((mdp.num_states,), float(init), dtype=torch.float64))
        self.lr = float(lr)

    def update(self, ro: Rollouts) -> None:
        G = rewards_to_go(ro.token_rewards * ro.mask, self.mdp.gamma)                 # (B, L)
        s = self.mdp.state_index(ro.prompt_idx, ro.tokens, ro.mask)                  # (B, L)
        m = ro.mask.bool()
        S = self.mdp.num_states
        tot = torch.zeros(S, dtype=torch.float64).index_add(0, s[m], G[m])          # (S,)
        cnt = torch.zeros(S, dtype=torch.float64).index_add(0, s[m], torch.ones_like(G[m]))
        seen = cnt > 0
        target = tot[seen] / cnt[seen]
        self.table[seen] += self.lr * (target - self.table[seen])


def _critic(kind: str | None, mdp: TokenMDP, policy, learned: LearnedTableCritic | None):
    if kind is None:
        return None
    if kind == "exact":
        return exact_critic(exact.tables(mdp, policy))
    if kind == "learned":
        return learned
    raise TPGError(f"critic must be 'exact' or 'learned', got {kind!r}")


# ================================================================================ language
def synthetic_language(mdp: TokenMDP, seed: int = 0, sharpness: float = 2.0) -> LogLinear:
    """A fixed random bigram language over the MDP's tokens, as a policy (module docstring).

    logits(next | prev) = sharpness · ε[prev], ε ~ N(0, 1) per (prev, next); no position or
    prompt terms. Sample it with ``tpg.rollouts.sample``; enumerate it with ``tpg.exact``.
    """
    validate.real("sharpness", sharpness, 0.0, None)
    lang = LogLinear(mdp, seed=seed, scale=sharpness)
    with torch.no_grad():
        lang.w_pos.zero_()
        lang.w_prompt.zero_()
    return lang.requires_grad_(False)


def pretrain_reference(mdp: TokenMDP, policy, steps: int, generator: torch.Generator, *, lr: float = 0.01,
                       batch_size: int = 64, language=None, progress: bool = False) -> list[float]:
    """Fit ``policy`` (in place) to the synthetic language by maximum likelihood.

    Each step samples ``batch_size`` responses (prompts from ρ) from the language (default:
    ``synthetic_language(mdp)``, seed 0) and takes an Adam step on the mean negative log-likelihood
    per response. Returns the per-step losses.
    """
    validate.mdp_and_policy(mdp, policy)
    validate.integer("pretraining steps", steps, 0)
    validate.generator("generator", generator)
    validate.real("pretraining lr", lr, 0.0, None, "(]")
    validate.integer("batch_size", batch_size, 1)
    language = synthetic_language(mdp) if language is None else language
    validate.mdp_and_policy(mdp, language, "language")
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    losses = []
    for _ in _progress(range(steps), progress, "pretrain"):
        with torch.no_grad():
            ro = sample(mdp, language, 1, generator, n_prompts=batch_size)
        nll = -(policy.token_log_probs(ro.prompt_idx, ro.tokens) * ro.mask).sum() / batch_size
        opt.zero_grad()
        nll.backward()
        opt.step()
        losses.append(float(nll.detach()))
    return losses


def cross_entropy(mdp: TokenMDP, language, policy) -> tuple[float, float]:
    """Exact (E_lang[−log π(y|x)], E_lang[−log lang(y|x)]) over every response (enumerable MDPs):
    their difference is KL(lang ‖ π) ≥ 0, the pretraining objective's excess."""
    tab = exact.tables(mdp, language)
    with torch.no_grad():
        lp = response_log_prob(policy, tab.enum).to(torch.float64)            # (N,)
        lq = response_log_prob(language, tab.enum).to(torch.float64)
    return float(-(tab.prob * lp).sum()), float(-(tab.prob * lq).sum())


# ================================================================================ RL
@dataclass
class TrainLog:
    """What ``train`` returns: one record per step (J_exact is None on steps it was not computed)."""
    config: dict
    records: list = field(default_factory=list)

    @property
    def J(self) -> list[tuple[int, float]]:
        return [(r["step"], r["J_exact"]) for r in self.records if r["J_exact"] is not None]

    def to_json(self, path: str) -> None:
        try:
            with open(path, "w") as f:
                json.dump({"config": self.config, "log": self.records}, f, indent=1)
        except OSError as e:
            raise TPGError(f"cannot write the training log to {path}: {e}") from e


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


def enumerable(mdp: TokenMDP, budget: int = EXACT_J_BUDGET) -> bool:
    return mdp.num_responses <= budget


def train(mdp: TokenMDP, policy, algo: str, steps: int, G: int = 4, lr: float = 0.05, seed: int = 0, *,
          ref=None, kl: KL | float | None = None, critic: str | None = None, n_prompts: int = 2,
          eval_every: int = 5, critic_lr: float = 0.5, log_path: str | None = None,
          progress: bool = False) -> TrainLog:
    """RL fine-tuning of ``policy`` (in place) on ``mdp`` with the named algorithm.

    Args:
      algo: a name in ``ALGOS`` (``algo_names()``); its estimator comes from the registry.
      steps: RL steps; each samples ``n_prompts`` prompts × G responses from the current policy.
      ref, kl: reference policy and KL(π‖π_ref) term (a ``KL`` or a coefficient β for k1 in the
        reward, verl's ``use_kl_in_reward``); both or neither.
      critic: "exact" or "learned" for estimators that read values (default: the algo's own).
      eval_every: steps between exact J evaluations (also before the first and after the last).
    Returns the ``TrainLog``; writes it as JSON to ``log_path`` when given.
    """
    spec = check_hyper(algo, steps, G, lr, min_steps=0)
    validate.mdp_and_policy(mdp, policy)
    validate.seed("seed", seed)
    validate.integer("n_prompts", n_prompts, 1)
    validate.integer("eval_every", eval_every, 1)
    validate.real("critic_lr", critic_lr, 0.0, 1.0, "(]")
    validate.choice("critic", critic, (None, "exact", "learned"))
    validate.check_output_path(log_path, "log_path")
    if (ref is None) != (kl is None):
        raise TPGError("pass both ref= (a reference policy) and kl= (a KL or a coefficient β), or neither")
    if ref is not None:
        validate.mdp_and_policy(mdp, ref, "ref")
        kl = kl if isinstance(kl, KL) else KL(validate.real("kl (the coefficient β)", kl, 0.0, None))
    crit_kind = spec.critic if critic is None else critic
    if spec.critic is None and critic is not None:
        raise TPGError(f"{algo} uses no critic; critic= applies to ppo")
    track = enumerable(mdp)
    if crit_kind is not None and not track:
        raise TPGError(f"{algo} with a {crit_kind} critic needs a per-state table: the MDP has "
                       f"{mdp.num_responses:,} responses; use an outcome estimator (grpo, rloo, remax) instead")
    opts = dict(spec.options)
    if spec.advantage == "gae":
        opts.setdefault("gamma", mdp.gamma)
    est = estimator(spec.advantage, kl=kl, **opts)
    gen = torch.Generator().manual_seed(seed)
    learned = LearnedTableCritic(mdp, critic_lr) if crit_kind == "learned" else None
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    config = dict(algo=algo, steps=steps, G=G, lr=lr, seed=seed, n_prompts=n_prompts, critic=crit_kind,
                  kl=None if kl is None else asdict(kl), policy=type(policy).__name__, mdp=repr(mdp),
                  estimator=est.name, epochs=spec.epochs)
    log = TrainLog(config)
    t0 = time.perf_counter()

    def J_now():
        with torch.no_grad():
            return float(exact.objective(mdp, policy)) if track else None

    J = J_now()
    log.records.append(dict(step=0, J_exact=J, rm_mean=None, loss=None, seconds=0.0))
    bar = _progress(range(1, steps + 1), progress, f"train {algo}")
    for step in bar:
        crit = _critic(crit_kind, mdp, policy, learned)
        with torch.no_grad():
            ro = sample(mdp, policy, G, gen, n_prompts=n_prompts)
        ro, _ = MonteCarloDraws(mdp, policy, gen, critic=crit, ref=ref).fill(ro, est.needs)
        for _ in range(spec.epochs):
            loss = est(ro.score(policy)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        if learned is not None:
            learned.update(ro)
        J = J_now() if (step % eval_every == 0 or step == steps) else None
        log.records.append(dict(step=step, J_exact=J, rm_mean=float(ro.rm.mean()), loss=float(loss.detach()),
                                seconds=round(time.perf_counter() - t0, 4)))
        if progress and J is not None:
            bar.set_postfix(J=f"{J:.4f}", rm=f"{float(ro.rm.mean()):.3f}")
    if log_path:
        log.to_json(log_path)
    return log


# ================================================================================ CLI
def demo_mdp(seed: int = 0) -> TokenMDP:
    """The CLI's MDP: 3 tokens + EOS, H = 4, 2 prompts, binary (correct/incorrect) rewards:
    242 responses, so J is exact at every evaluation."""
    return random_mdp(seed, vocab_size=4, horizon=4, eos=True, n_prompts=2, reward="binary")


def run_cli(args) -> int:
    """``tpg train``: pretrain a reference on the synthetic language, RL fine-tune from it with a
    small KL (β = 0.001, verl's default) to it, print J before/after, write the JSON log."""
    kind = args.policy
    lr = DEFAULT_LR[kind] if args.lr is None else args.lr
    algo = check_hyper(args.algo, args.steps, args.G, lr, min_steps=1).name   # validate before any work
    validate.seed("--seed", args.seed)
    validate.check_output_path(args.json)
    mdp = demo_mdp(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    ref = make_policy(kind, mdp, seed=args.seed)
    t0 = time.perf_counter()
    pre = pretrain_reference(mdp, ref, steps=PRETRAIN_STEPS, generator=gen, lr=DEFAULT_LR[kind], progress=True)
    print(f"pretrained the {kind} reference on a bigram language: NLL {pre[0]:.3f} → {pre[-1]:.3f} "
          f"({time.perf_counter() - t0:.1f} s)")
    policy = make_policy(kind, mdp, seed=args.seed)
    policy.load_state_dict(ref.state_dict())
    ref.requires_grad_(False)
    log = train(mdp, policy, algo, args.steps, G=args.G, lr=lr, seed=args.seed, ref=ref, kl=0.001,
                log_path=args.json, progress=True)
    J = log.J
    took = log.records[-1]["seconds"]
    print(f"{algo} on {mdp!r} with the {kind} policy: exact J {J[0][1]:.4f} → {J[-1][1]:.4f} "
          f"in {args.steps} steps ({took:.1f} s)" + (f"; log written to {args.json}" if args.json else ""))
    return 0
