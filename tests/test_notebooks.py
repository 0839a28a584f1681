"""The teaching notebooks (notebooks/*.py, jupytext percent format) run as plain scripts.

Each notebook ends its sections with asserts that tie the prose to exact numbers (verdicts,
scales such as 1 − 1/G and K/(K+1), round-off gaps), so running it is the test: any contradicted
statement raises AssertionError. TPG_FAST=1 makes the notebooks use their smaller settings; they
run in a temporary working directory so that nothing they might write lands in the repository.
"""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.py"))


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_trajectory_policy_gradient.py", "02_what_grpo_really_estimates.py"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TPG_FAST", "1")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "TPG_FAST=True" in out                         # the notebook honoured the fast setting
    assert out.rstrip().endswith("passed.")               # and reached its last assert
