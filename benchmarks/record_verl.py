"""Record verl 0.9.1's own outputs on seeded batches: ``tests/data/verl_0.9.1.json``.

Run by hand where verl is importable (``pip install --no-deps verl==0.9.1`` plus tensordict,
omegaconf, codetiming, …; ray is stubbed below, nothing of it is used):

    python benchmarks/record_verl.py

Every function of ``ADV_ESTIMATOR_REGISTRY`` and ``POLICY_LOSS_REGISTRY`` is called the way the trainer
calls it (``ray_trainer.compute_advantage``, ``workers/utils/losses.py::ppo_loss``: a real ``AlgoConfig``
/ ``ActorConfig``), plus ``agg_loss`` in every mode (local, and split over two data-parallel ranks with
the global counts) and ``kl_penalty`` in every type. Inputs are float64, masks int64 as the trainer's
``response_mask`` (a slice of ``attention_mask``) is; one ``agg_loss`` sweep repeats with a float64 mask
(then verl's ``n + 1e-8`` divisors are not exact counts). Policy losses record the scalar loss, the
per-token loss matrix verl hands to ``agg_loss`` (captured by wrapping it) and ∂loss/∂log_prob.
``tests/test_verl_conformance.py`` replays every case through tpg's definitions without verl.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "verl_0.9.1.json"


class _Any(types.ModuleType):                     # a stand-in for ray: verl imports it at module level only
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


sys.modules.setdefault("ray", _Any("ray"))
import verl  # noqa: E402
import verl.trainer.ppo.core_algos as ca  # noqa: E402
from verl.trainer.config.algorithm import AlgoConfig  # noqa: E402
from verl.workers.config.actor import ActorConfig, PolicyLossConfig  # noqa: E402

F64 = torch.float64


def L(x):
    """float64 (or int) nested list of a tensor/array."""
    if x is None:
        return None
    t = torch.as_tensor(x)
    return t.tolist() if not t.is_floating_point() else t.to(F64).tolist()


def actor(**pl):
    """The real ActorConfig, as the actor builds it (clip 0.2, clip_ratio_c 3.0, tau 1.0 / 1.05)."""
    return ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=4,
                       policy_loss=PolicyLossConfig(**pl))


# ----------------------------------------------------------------------------------------- batches
def make_batch(seed: int, sizes: list[int], L_: int, reward: str, kl_in_reward: bool = False) -> dict:
    """A seeded batch: groups of ``sizes`` (singletons allowed), prefix masks of random lengths 1..L,
    the outcome reward on the last valid token (verl's reward manager), optionally minus β·kl_t on every
    valid token (``use_kl_in_reward``), critic values, ReMax baselines, behaviour log-probs and Σπ²."""
    g = np.random.default_rng(seed)
    B = sum(sizes)
    index = np.repeat(np.arange(len(sizes)), sizes)
    g.shuffle(index)                                                        # groups interleaved, as uids are
    lengths = g.integers(1, L_ + 1, size=B)
    lengths[0] = L_                                                         # the padded width is reached
    mask = (np.arange(L_)[None, :] < lengths[:, None]).astype(np.int64)
    if reward == "binary":
        rm = g.integers(0, 2, size=B).astype(float)
    elif reward == "ternary":
        rm = g.integers(-1, 2, size=B).astype(float)
    else:
        rm = g.standard_normal(B)
    tlr = np.zeros((B, L_))
    tlr[np.arange(B), lengths - 1] = rm
    kl = np.zeros((B, L_))
    if kl_in_reward:
        kl = 0.05 * g.standard_normal((B, L_)) * mask
        tlr = tlr - kl
    p = g.uniform(0.05, 0.95, size=(B, L_))
    sum_pi_sq = p**2 + (1 - p) ** 2 * g.uniform(0.2, 1.0, size=(B, L_))   # p² ≤ Σπ² ≤ p² + (1 − p)²
    return dict(seed=seed, sizes=sizes, reward=reward, kl_in_reward=kl_in_reward, index=index.tolist(),
                mask=mask.tolist(), token_level_rewards=L(tlr), rm=L(rm), kl=L(kl),
                values=L(g.standard_normal((B, L_))), reward_baselines=L(g.standard_normal(B)),
                old_log_probs=L(np.log(p)), sum_pi_squared=L(sum_pi_sq),
                components=L(np.stack([rm, g.standard_normal(B)], 1)))


BATCHES = {
    "b6x5_binary": make_batch(1, [3, 3], 5, "binary"),
    "b8x6_gauss_singletons": make_batch(2, [4, 2, 1, 1], 6, "gaussian"),
    "b4x3_ternary": make_batch(3, [4], 3, "ternary"),
    "b10x7_gauss_kl": make_batch(4, [5, 5], 7, "gaussian", kl_in_reward=True),
    "b9x4_ternary_groups3": make_batch(5, [3, 3, 3], 4, "ternary"),
}


def tensors(b):
    return (torch.tensor(b["token_level_rewards"], dtype=F64), torch.tensor(b["mask"], dtype=torch.int64),
            np.array(b["index"]))


# ----------------------------------------------------------------------------------------- advantages
def adv_cases():
    cases = []

    def run(fn_name, bid, label, **kw):
        b = BATCHES[bid]
        tlr, mask, index = tensors(b)
        call = dict(kw)
        fn = ca.ADV_ESTIMATOR_REGISTRY[fn_name]
        args = {}
        if fn_name == "gae":
            args = dict(token_level_rewards=tlr, values=torch.tensor(b["values"], dtype=F64), response_mask=mask,
                        gamma=kw["gamma"], lam=kw["lam"])
        else:
            args = dict(token_level_rewards=tlr, response_mask=mask, config=kw.pop("config", AlgoConfig()))
            if fn_name not in ("reinforce_plus_plus", "remax"):
                args["index"] = index
            if fn_name == "remax":
                args["reward_baselines"] = torch.tensor(b["reward_baselines"], dtype=F64)
            if "optimal_token_baseline" in fn_name:
                args.update(old_log_probs=torch.tensor(b["old_log_probs"], dtype=F64),
                            sum_pi_squared=torch.tensor(b["sum_pi_squared"], dtype=F64), rollout_is_weights=None)
            if fn_name == "gdpo" and kw.pop("components", False):
                comps = np.array(b["components"])
                B, Lw = mask.shape
                plen = 2
                attn = torch.cat([torch.ones(B, plen, dtype=torch.int64), mask], 1)
                args.update(non_tensor_batch={"acc": comps[:, 0], "fmt": comps[:, 1]},
                            batch={"prompts": torch.zeros(B, plen, dtype=torch.int64), "attention_mask": attn})
            args.update({k: v for k, v in kw.items() if k not in ("gamma", "lam", "weights")})
        try:
            adv, ret = fn(**args)
            out = dict(advantages=L(adv), returns=L(ret))
        except Exception as e:                                                  # noqa: BLE001
            out = dict(error=f"{type(e).__name__}: {e}")
        cfg = args.get("config")
        cfg_d = None if cfg is None else {k: getattr(cfg, k) for k in ("gamma", "norm_adv_by_std_in_grpo")} | \
            {"gdpo_reward_keys": list(cfg.gdpo_reward_keys or []) or None,
             "gdpo_reward_weights": list(cfg.gdpo_reward_weights or []) or None}
        cases.append(dict(function=fn_name, qualname=fn.__name__, batch=bid, label=label, config=cfg_d,
                          kwargs={k: v for k, v in call.items() if k not in ("config",) and not callable(v)}, **out))

    for bid in BATCHES:
        for gamma, lam in ((1.0, 1.0), (1.0, 0.95), (0.9, 0.95)):
            run("gae", bid, f"gamma={gamma},lam={lam}", gamma=gamma, lam=lam)
        for std in (True, False):
            run("grpo", bid, f"std={std}", norm_adv_by_std_in_grpo=std)
            run("grpo_passk", bid, f"std={std}", config=AlgoConfig(norm_adv_by_std_in_grpo=std))
        run("grpo_vectorized", bid, "trainer call (no std flag)")
        run("gdpo", bid, "fallback: token_level_rewards")
        run("gdpo", bid, "two components, weights 1, 0.5", components=True,
            config=AlgoConfig(gdpo_reward_keys=["acc", "fmt"], gdpo_reward_weights=[1.0, 0.5]))
        for name in ("reinforce_plus_plus_baseline", "rloo", "rloo_vectorized", "opo", "remax", "gpg"):
            run(name, bid, "default")
        for gamma in (1.0, 0.9):
            run("reinforce_plus_plus", bid, f"gamma={gamma}", config=AlgoConfig(gamma=gamma))
        for tail in (True, False):
            run("optimal_token_baseline", bid, f"handle_zero_tail={tail}", handle_zero_tail=tail)
            run("tir_optimal_token_baseline", bid, f"handle_zero_tail={tail}", handle_zero_tail=tail)
    return cases


# ----------------------------------------------------------------------------------------- policy losses
def loss_batch(seed, B, L_, regime):
    g = np.random.default_rng(100 + seed)
    lengths = g.integers(1, L_ + 1, size=B)
    lengths[0] = L_
    mask = (np.arange(L_)[None, :] < lengths[:, None]).astype(np.int64)
    old = np.log(g.uniform(0.02, 0.98, size=(B, L_)))
    scale = {"equal": 0.0, "near": 0.05, "far": 0.8}[regime]
    new = np.minimum(old + scale * g.standard_normal((B, L_)), -1e-3)
    adv = 1.5 * g.standard_normal((B, L_))
    adv[g.uniform(size=(B, L_)) < 0.1] = 0.0                               # A = 0 exactly: the A > 0 branches
    row_adv = np.repeat(1.5 * g.standard_normal((B, 1)), L_, 1)            # a sequence-level advantage
    return dict(mask=mask.tolist(), old_log_prob=L(old), log_prob=L(new), advantages=L(adv),
                row_advantages=L(row_adv))


LOSS_BATCHES = {f"l{B}x{L_}_{r}": loss_batch(i, B, L_, r)
                for i, (B, L_) in enumerate(((6, 5), (8, 6))) for r in ("equal", "near", "far")}

LOSS_CONFIGS = {                       # verl name -> list of (label, PolicyLossConfig kwargs)
    "vanilla": [("default", {})], "dppo_tv": [("default", {})], "dppo_kl": [("default", {})],
    "gspo": [("default", {})], "sapo": [("default", {})], "gpg": [("default", {})],
    "clip_cov": [("clip_cov_ratio=0.2", dict(clip_cov_ratio=0.2))],
    "kl_cov": [("default", {}), ("kl_cov_ratio=0.2", dict(kl_cov_ratio=0.2))],
    "geo_mean": [("default", {})], "dro": [("dro_beta=0.1", dict(dro_beta=0.1))], "cispo": [("default", {})],
    "bypass_mode": [("default (ppo_clip)", {}),
                    ("reinforce/sequence", dict(rollout_correction={"loss_type": "reinforce", "rollout_is": "sequence",
                                                                    "rollout_is_threshold": 2.0})),
                    ("reinforce/token", dict(rollout_correction={"loss_type": "reinforce", "rollout_is": "token",
                                                                 "rollout_is_threshold": 2.0}))],
}


def loss_cases():
    cases = []
    captured = []
    orig = ca.agg_loss

    def spy(loss_mat, loss_mask, loss_agg_mode, **kw):
        captured.append((loss_mat.detach().clone(), loss_agg_mode))
        return orig(loss_mat, loss_mask, loss_agg_mode, **kw)

    ca.agg_loss = spy
    try:
        for name, configs in LOSS_CONFIGS.items():
            fn = ca.POLICY_LOSS_REGISTRY[name]
            for label, pl in configs:
                cfg = actor(**pl)
                for bid, b in LOSS_BATCHES.items():
                    for mode in ("token-mean", "seq-mean-token-sum") if bid.endswith("far") else ("token-mean",):
                        for adv_key in ("advantages", "row_advantages") if name == "geo_mean" else ("advantages",):
                            torch.manual_seed(0)                               # clip_cov's randperm
                            lp = torch.tensor(b["log_prob"], dtype=F64, requires_grad=True)
                            captured.clear()
                            loss, _ = fn(old_log_prob=torch.tensor(b["old_log_prob"], dtype=F64), log_prob=lp,
                                         advantages=torch.tensor(b[adv_key], dtype=F64),
                                         response_mask=torch.tensor(b["mask"], dtype=torch.int64),
                                         loss_agg_mode=mode, config=cfg)
                            loss.backward()
                            mat = captured[-1] if captured else (None, None)
                            cases.append(dict(function=name, qualname=fn.__name__, label=label, batch=bid,
                                              advantages=adv_key, loss_agg_mode=mode, policy_loss=pl,
                                              config=dict(clip_ratio=cfg.clip_ratio, clip_ratio_c=cfg.clip_ratio_c,
                                                          tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg,
                                                          ppo_kl_coef=cfg.policy_loss.ppo_kl_coef),
                                              loss=float(loss.detach()), grad=L(lp.grad), loss_mat=L(mat[0]),
                                              agg_mode_used=mat[1]))
    finally:
        ca.agg_loss = orig
    return cases


# ----------------------------------------------------------------------------------------- agg_loss, kl_penalty
MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def agg_cases():
    g = np.random.default_rng(7)
    cases = []
    for B, L_ in ((6, 5), (8, 7)):
        lengths = g.integers(1, L_ + 1, size=B)
        lengths[0] = L_
        mask = (np.arange(L_)[None, :] < lengths[:, None]).astype(np.int64)
        mat = g.standard_normal((B, L_))
        for mdtype in ("int64", "float64"):
            m = torch.tensor(mask, dtype=getattr(torch, mdtype))
            t = torch.tensor(mat, dtype=F64)
            for mode in MODES:
                for lsf in ((None, 4) if mode == "seq-mean-token-sum-norm" else (None,)):
                    val = ca.agg_loss(t, m, mode, loss_scale_factor=lsf)
                    # two data-parallel ranks (rows split in half), each with the global counts
                    h = B // 2
                    parts = [(slice(0, h)), (slice(h, B))]
                    ranks = [float(ca.agg_loss(t[s], m[s], mode, dp_size=2, batch_num_tokens=m.sum(),
                                               global_batch_size=B, loss_scale_factor=lsf)) for s in parts]
                    try:
                        ca.agg_loss(t[parts[0]], m[parts[0]], mode, dp_size=2, loss_scale_factor=lsf)
                        missing = None
                    except ValueError as e:
                        missing = str(e)
                    cases.append(dict(mode=mode, mask_dtype=mdtype, loss_scale_factor=lsf, loss_mat=L(mat),
                                      mask=mask.tolist(), loss=float(val), split_rows=h, dp2_global=ranks,
                                      dp2_without_global=missing))
    return cases


KL_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "kl+", "k1+", "abs+", "mse+", "k2+",
            "low_var_kl+", "k3+", "full")


def kl_cases():
    g = np.random.default_rng(11)
    cases = []
    for label, scale in (("near", 0.1), ("far", 3.0), ("clamped", 30.0)):
        lp = np.log(g.uniform(0.01, 0.99, size=(5, 4)))
        ref = lp + scale * g.standard_normal((5, 4))
        for kind in KL_TYPES:
            x = torch.tensor(lp, dtype=F64, requires_grad=True)
            try:
                val = ca.kl_penalty(x, torch.tensor(ref, dtype=F64), kind)
                val.sum().backward()
                out = dict(value=L(val), grad=L(x.grad))
            except NotImplementedError as e:
                out = dict(error=f"NotImplementedError: {e}")
            cases.append(dict(kind=kind, label=label, logprob=L(lp), ref_logprob=L(ref), **out))
    return cases


def main():
    adv, loss, agg, kl = adv_cases(), loss_cases(), agg_cases(), kl_cases()
    data = dict(
        verl_version=verl.__version__, torch_version=torch.__version__,
        source="verl/trainer/ppo/core_algos.py (ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY, agg_loss, kl_penalty)",
        recorded_by="benchmarks/record_verl.py",
        adv_functions={k: v.__name__ for k, v in ca.ADV_ESTIMATOR_REGISTRY.items()},
        loss_functions={k: v.__name__ for k, v in ca.POLICY_LOSS_REGISTRY.items()},
        not_called={
            "kl_penalty('full')": "raises NotImplementedError in verl (recorded as an error case)",
            "rollout_is_weights (every policy loss, OTB/TIR)": "not recorded: tpg applies rollout IS weights in "
            "tpg.zoo.Configured, not inside the loss; every call passes None",
            "gdpo via config without non_tensor_batch": "the fallback (components = token_level_rewards) is recorded",
        },
        batches=BATCHES, loss_batches=LOSS_BATCHES, adv_cases=adv, loss_cases=loss, agg_cases=agg, kl_cases=kl)
    missing = (set(ca.ADV_ESTIMATOR_REGISTRY) - {c["function"] for c in adv}) | \
        (set(ca.POLICY_LOSS_REGISTRY) - {c["function"] for c in loss})
    assert not missing, missing
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, separators=(",", ":")))
    print(f"{OUT}: {OUT.stat().st_size / 1e6:.2f} MB; {len(adv)} advantage, {len(loss)} policy-loss, "
          f"{len(agg)} agg_loss, {len(kl)} kl_penalty cases (verl {verl.__version__})")


if __name__ == "__main__":
    main()
