"""The training demo: pretraining on the synthetic language, RL fine-tuning with every algorithm,
the learned critic, the JSON log and the ``tpg train`` command line.

"J increases" is asserted with a margin that is exact, not tuned: the fraction of the achievable
improvement J* − J₀ that a run closes, where J* = Σ_x ρ(x) max_y RM(x, y) is computed by
enumeration. Seeds are fixed; the runs are short (tabular policy, 30 steps).
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_close
from tpg import TabularSoftmax, TPGError, exact, random_mdp
from tpg.cli import main
from tpg.lm import GPT2Policy
from tpg.policies import make_policy
from tpg.rollouts import enumerate_responses, sample
from tpg.train import (ALGOS, LearnedTableCritic, algo_names, cross_entropy, get_algo, pretrain_reference,
                       synthetic_language, train)

STEPS = 30
MIN_FRACTION = 0.3          # of the achievable gap J* − J₀ that each short run must close


@pytest.fixture(scope="module")
def small():
    return random_mdp(0, vocab_size=3, horizon=3, eos=True, n_prompts=2)


def best_J(mdp) -> float:
    """J* = Σ_x ρ(x) max_y RM(x, y): the objective of the best deterministic policy."""
    e = enumerate_responses(mdp)
    return sum(float(mdp.prompt_probs[x]) * float(e.rm[e.prompt_idx == x].max()) for x in range(len(mdp.prompts)))


def test_every_algorithm_is_available():
    """TRePO and VinePPO come from tpg.estimators.continuation: every recipe resolves to a registered estimator."""
    assert algo_names() == list(ALGOS)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_short_run_increases_exact_J(small, algo):
    policy = TabularSoftmax(small, seed=0)
    log = train(small, policy, algo, STEPS, G=4, lr=0.1, seed=0, eval_every=10)
    J = log.J
    J0, J1, Jstar = J[0][1], J[-1][1], best_J(small)
    assert [s for s, _ in J] == [0, 10, 20, 30]
    assert_close(J1, float(exact.objective(small, policy).detach()), what="logged J_exact is the policy's J")
    assert J1 - J0 >= MIN_FRACTION * (Jstar - J0), f"{algo}: J {J0:.4f} → {J1:.4f}, J* = {Jstar:.4f}"


def test_kl_to_reference_and_bad_arguments(small):
    ref = TabularSoftmax(small, seed=1).requires_grad_(False)
    log = train(small, TabularSoftmax(small, seed=0), "rloo", 3, ref=ref, kl=0.01)
    assert log.config["kl"] == {"coef": 0.01, "kind": "k1", "where": "reward"}
    with pytest.raises(TPGError, match="both"):
        train(small, TabularSoftmax(small), "rloo", 3, ref=ref)
    with pytest.raises(TPGError, match="G ≥ 2"):
        train(small, TabularSoftmax(small), "grpo", 3, G=1)
    with pytest.raises(TPGError, match="no critic"):
        train(small, TabularSoftmax(small), "grpo", 3, critic="exact")
    with pytest.raises(TPGError, match="unknown algorithm 'ppoo'"):
        get_algo("ppoo")


def test_learned_critic_regresses_on_returns(small):
    """With lr = 1 one update sets V̂(s) to the mean return-to-go observed from s (naive loop)."""
    ro = sample(small, TabularSoftmax(small, seed=2), 8, torch.Generator().manual_seed(0), n_prompts=4)
    critic = LearnedTableCritic(small, lr=1.0)
    critic.update(ro)
    seen: dict[int, list[float]] = {}
    s = small.state_index(ro.prompt_idx, ro.tokens, ro.mask)
    for i in range(ro.batch_size):
        n = int(ro.lengths[i])
        for t in range(n):
            ret = sum(float(ro.token_rewards[i, k]) * small.gamma ** (k - t) for k in range(t, n))
            seen.setdefault(int(s[i, t]), []).append(ret)
    for state, rets in seen.items():
        assert_close(critic.table[state], sum(rets) / len(rets), what=f"V̂ of state {state}")
    untouched = torch.ones(small.num_states, dtype=torch.bool)
    untouched[list(seen)] = False
    assert bool((critic.table[untouched] == 0).all())


def test_pretraining_fits_the_synthetic_language(small):
    """Maximum likelihood on samples of the bigram language closes most of the exact KL(lang ‖ π)."""
    lang = synthetic_language(small)
    policy = GPT2Policy(small, seed=0)
    ce0, H = cross_entropy(small, lang, policy)
    losses = pretrain_reference(small, policy, 30, torch.Generator().manual_seed(0), lr=0.03, language=lang)
    ce1, _ = cross_entropy(small, lang, policy)
    assert len(losses) == 30
    assert ce1 - H <= 0.25 * (ce0 - H), f"KL(lang‖π) {ce0 - H:.4f} → {ce1 - H:.4f}"


def test_gpt2_trains_for_a_few_steps(small):
    policy = make_policy("gpt2", small, seed=0)
    log = train(small, policy, "ppo", 2, G=2, lr=0.005, seed=0, eval_every=1)
    assert len(log.J) == 3 and all(r["loss"] is not None for r in log.records[1:])


def test_cli_writes_a_parseable_json_log(tmp_path, capsys):
    path = tmp_path / "log.json"
    assert main(["train", "--policy", "gpt2", "--algo", "grpo", "--steps", "2", "--G", "2", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["config"]["algo"] == "grpo" and data["config"]["policy"] == "GPT2Policy"
    assert [r["step"] for r in data["log"]] == [0, 1, 2]
    assert set(data["log"][-1]) == {"step", "J_exact", "rm_mean", "loss", "seconds"}
    assert isinstance(data["log"][-1]["J_exact"], float)
    assert "exact J" in capsys.readouterr().out


def test_cli_bad_algorithm_is_a_clean_error(capsys):
    assert main(["train", "--algo", "nope", "--steps", "2"]) != 0
    err = capsys.readouterr().err
    assert "unknown algorithm 'nope'" in err and "rloo" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["--seed", "-1"], "--seed must be an int ≥ 0, got -1"),
    (["--lr", "0"], "learning rate must be a finite number > 0, got 0.0"),
    (["--lr", "nan"], "learning rate must be a finite number > 0, got nan"),
    (["--lr", "-0.1"], "learning rate must be a finite number > 0, got -0.1"),
    (["--G", "0"], "G must be an int ≥ 1, got 0"),
    (["--algo", "grpo", "--G", "1"], "grpo compares responses within a group: use G ≥ 2 (got G=1)"),
    (["--steps", "0"], "steps must be an int ≥ 1, got 0"),
])
def test_cli_bad_hyperparameters_fail_before_pretraining(argv, message, capsys):
    """Bad input exits 2 with one line naming the rule, and no pretraining has run."""
    assert main(["train", "--steps", "2"] + argv) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"tpg train: error: {message}"
    assert "pretrained" not in out


@pytest.mark.parametrize("cmd", ["train", "verify"])
def test_cli_unwritable_json_path_fails_before_any_work(cmd, tmp_path, capsys):
    """A --json path in a missing directory, or naming a directory, is refused up front (exit 2)."""
    args = [cmd, "--json"] + (["--steps", "2"] if cmd == "train" else ["--claims", "T1"])
    missing = tmp_path / "no" / "log.json"
    assert main(args[:2] + [str(missing)] + args[2:]) == 2
    out, err = capsys.readouterr()
    assert f"directory {missing.parent} does not exist; create it first" in err and out == ""
    assert main(args[:2] + [str(tmp_path)] + args[2:]) == 2
    out, err = capsys.readouterr()
    assert f"--json {tmp_path} is a directory" in err and out == ""


def test_cli_verify_refuses_a_negative_seed(capsys):
    """tpg verify --seed -5 is bad input (exit 2), not a claim disagreement or an internal error."""
    assert main(["verify", "--claims", "T1", "--seed", "-5"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == "tpg verify: error: --seed must be an int ≥ 0, got -5" and out == ""
