"""The ``tpg`` command's shell: help, info, and errors without tracebacks (DESIGN §5)."""
from __future__ import annotations

import subprocess
import sys

import pytest

import tpg.cli as cli


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
