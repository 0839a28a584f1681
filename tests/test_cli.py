"""The ``tpg`` command's shell: help, info, and errors without tracebacks (DESIGN §5)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import tpg.cli as cli
from tpg.validate import TPGError, check_output_path


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "tpg.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("info", "verify", "prove", "train"):
        assert cmd in out.stdout


def test_info_prints_versions_and_passes_the_float64_check(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "numpy", "sympy", "float64 check: ok"):
        assert name in out


def test_bad_arguments_exit_nonzero_without_traceback():
    out = subprocess.run([sys.executable, "-m", "tpg.cli", "verify", "--claims", "T99"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "T99" in out.stderr


def test_unexpected_exception_is_one_line_unless_debugging(monkeypatch, capsys):
    """A bug surfaces as a one-line internal error (exit 3); TPG_DEBUG=1 re-raises it."""
    def boom(args):
        raise RuntimeError("boom")
    monkeypatch.setattr(cli, "_info", boom)
    monkeypatch.delenv("TPG_DEBUG", raising=False)
    assert cli.main(["info"]) == 3
    assert "internal error: RuntimeError: boom" in capsys.readouterr().err
    monkeypatch.setenv("TPG_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["info"])


# ------------------------------------------------------------------------------------ bad input (DESIGN §5)
def _one_line_error(capsys, status: int, *fragments: str) -> str:
    out, err = capsys.readouterr()
    assert status == 2, (status, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    return out


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", "", "99999"])
def test_bad_tpg_threads_is_a_one_line_error(monkeypatch, capsys, value):
    monkeypatch.setenv("TPG_THREADS", value)
    monkeypatch.delenv("TPG_DEBUG", raising=False)
    _one_line_error(capsys, cli.main(["info"]), "tpg info: error: TPG_THREADS must be an int in [1, 1024], got")


def test_tpg_debug_shows_the_traceback_of_bad_input(monkeypatch):
    monkeypatch.setenv("TPG_THREADS", "abc")
    monkeypatch.setenv("TPG_DEBUG", "1")
    with pytest.raises(TPGError, match="TPG_THREADS"):
        cli.main(["info"])


@pytest.mark.parametrize("argv,fragment", [
    (["--seed", str(10**30)], f"--seed must be an int in [0, 2**63 − 1] (numpy and torch seeds), got {10**30}"),
    (["--seed", str(2**63)], "--seed must be an int in [0, 2**63 − 1]"),
    (["--seed", "-1"], "--seed must be an int ≥ 0, got -1"),
    (["--seeds", "0"], "--seeds must be an int in [1, 10000], got 0"),
    (["--seeds", str(10**9)], "--seeds must be an int in [1, 10000]"),
    (["--seed", str(2**63 - 1), "--seeds", "2"], "the last seed) must be an int in [0, 9223372036854775807]"),
])
def test_verify_refuses_bad_seeds_up_front(capsys, argv, fragment):
    """A seed torch or numpy cannot take was a DISAGREE row (exit 1); now it is bad input (exit 2)
    before any claim runs, and the message gives the valid range."""
    out = _one_line_error(capsys, cli.main(["verify", "--claims", "T1"] + argv), fragment)
    assert out == ""


def test_train_refuses_a_huge_seed_before_pretraining(capsys):
    out = _one_line_error(capsys, cli.main(["train", "--steps", "1", "--seed", str(10**30)]), "--seed must be an int in")
    assert "pretrained" not in out


def test_train_json_path_that_cannot_be_created_is_refused_before_pretraining(tmp_path, capsys):
    """The check creates (and removes) the file, so a directory that exists but refuses new files
    (here a regular file standing where the directory should be, and /proc) is caught too."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = _one_line_error(capsys, cli.main(["train", "--steps", "1", "--json", str(blocker / "log.json")]),
                          "does not exist")
    assert "pretrained" not in out
    if os.path.isdir("/proc/self"):
        _one_line_error(capsys, cli.main(["train", "--steps", "1", "--json", "/proc/self/log.json"]),
                        "cannot create a file in /proc/self")
    assert list(tmp_path.iterdir()) == [blocker]                     # nothing left behind


def test_check_output_path_leaves_no_file_and_accepts_an_existing_one(tmp_path):
    target = tmp_path / "new.json"
    check_output_path(str(target))
    assert not target.exists()
    target.write_text("{}")
    check_output_path(target)                                        # an existing writable file is fine
    with pytest.raises(TPGError, match="--json must be a file path, got 3"):
        check_output_path(3)


def test_closed_stdout_exits_quietly():
    """``tpg verify --list | head -1``: the reader goes away; no BrokenPipeError, nothing on stderr,
    exit 141 (as for a process killed by SIGPIPE). The pipe's read end is closed before tpg writes,
    so the broken pipe is certain, not a race."""
    r, w = os.pipe()
    os.close(r)
    try:
        out = subprocess.run([sys.executable, "-m", "tpg.cli", "verify", "--list"], stdout=w,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert out.returncode == 141 and out.stderr == "", out.stderr


def test_entry_point_reports_bad_threads_in_one_line():
    """The installed ``tpg`` script (or ``python -m tpg.cli``) prints one line, exit 2, no traceback."""
    exe = shutil.which("tpg")
    cmd = [exe] if exe else [sys.executable, "-m", "tpg.cli"]
    env = {**os.environ, "TPG_THREADS": "abc"}
    env.pop("TPG_DEBUG", None)
    out = subprocess.run(cmd + ["verify", "--claims", "T1"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "tpg verify: error: TPG_THREADS must be an int in [1, 1024], got 'abc'\n"


# ---------------------------------------------------------------------------------- tpg check
CHECK_SRC = '''
import torch
from tpg.estimators.core import group_stats

def loo(ro):                                  # leave-one-out baseline, per response: unbiased
    mean, _, cnt = group_stats(ro.rm, ro.group, ddof=0)
    return torch.where(cnt > 1, cnt / (cnt - 1).clamp(min=1) * (ro.rm - mean), ro.rm)

def centred(ro):                              # mean includes the row itself: scaled by 1 − 1/G
    mean, _, _ = group_stats(ro.rm, ro.group, ddof=0)
    return (ro.rm - mean)[:, None] * ro.mask

def token_mean_loss(ro):                      # a loss: RLOO with a batch token-mean (biased)
    adv = loo(ro)[:, None] * ro.mask
    n = torch.zeros(ro.n_batches, dtype=torch.float64).index_add(0, ro.batch, ro.mask.sum(1))[ro.batch]
    return -(adv / n[:, None] * ro.logp).sum()

def broken(ro):
    return "not a tensor"
'''


@pytest.fixture
def check_file(tmp_path):
    p = tmp_path / "mine.py"
    p.write_text(CHECK_SRC)
    return p


def test_check_verdicts_kinds_and_exit_status(check_file, tmp_path, capsys):
    """`tpg check FILE:FN`: advantages and losses are told apart by their output; exit 0 only when
    every verdict is unbiased; the probe notes are printed; --json writes one report per seed."""
    out = tmp_path / "r.json"
    assert cli.main(["check", f"{check_file}:loo", "--seeds", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("UNBIASED") == 2 and "(advantage, agg seq-mean-token-sum)" in text
    assert "note: probed local: holds" in text and "route 'multiset'" in text
    import json
    rows = json.loads(out.read_text())
    assert [r["verdict"] for r in rows] == ["unbiased", "unbiased"] and rows[0]["kind"] == "advantage"
    assert cli.main(["check", f"{check_file}:centred", "--seeds", "1", "--G", "3"]) == 1
    assert "SCALED (scale c = 0.666667)" in capsys.readouterr().out
    assert cli.main(["check", f"{check_file}:token_mean_loss", "--seeds", "1", "--policy", "loglinear"]) == 1
    text = capsys.readouterr().out
    assert "(loss)" in text and "BIASED" in text
    assert cli.main(["check", f"{check_file}:loo", "--seeds", "1", "--agg", "token-sum"]) == 1
    assert "SCALED (scale c = 3)" in capsys.readouterr().out


def test_check_imports_a_module_by_name(check_file, monkeypatch, capsys):
    monkeypatch.chdir(check_file.parent)
    monkeypatch.delitem(sys.modules, "mine", raising=False)
    assert cli.main(["check", "mine:loo", "--seeds", "1", "--G", "2"]) == 0
    assert "UNBIASED" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["check", "no_colon"], "expected MODULE:FUNCTION"),
    (["check", "no_such_module_xyz:fn"], "cannot import module 'no_such_module_xyz'"),
    (["check", "/no/such/file.py:fn"], "no such file"),
    (["check", "{file}:nope"], "has no attribute 'nope'"),
    (["check", "{file}:broken"], "must return a tensor"),
    (["check", "{file}:token_mean_loss", "--kind", "advantage"], "returned shape ()"),
    (["check", "{file}:loo", "--G", "0"], "--G"),
    (["check", "{file}:loo", "--agg", "nope"], "unknown --agg 'nope'"),
])
def test_check_refuses_bad_input_in_one_line(check_file, capsys, argv, message):
    argv = [a.replace("{file}", str(check_file)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
