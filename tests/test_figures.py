"""`tpg figures`: --fast runs are byte-identical on rerun, write their data, replot from it, and
refuse bad input in one line (issue 12)."""
from __future__ import annotations

import json
from importlib.util import find_spec

import pytest

from tpg.cli import main

CHEAP = ["std_normalisation", "trepo_readings"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")
    for out in (a, b):
        assert main(["figures", *CHEAP, "--fast", "--out", str(out)]) == 0
    return a, b


def test_fast_run_writes_png_pdf_json_and_readme(two_runs):
    a, _ = two_runs
    for name in CHEAP:
        for ext in ("png", "pdf", "json"):
            assert (a / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext} missing"
        doc = json.loads((a / f"{name}.json").read_text())
        assert doc["figure"] == name and doc["fast"] is True and doc["data"]
        assert (a / f"{name}.png").stat().st_size < 300_000
    readme = (a / "README.md").read_text()
    assert all(f"![{n}]({n}.png)" in readme for n in CHEAP)


def test_rerun_is_byte_identical(two_runs):
    a, b = two_runs
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), f"{n} differs between two identical runs"


def test_replot_redraws_the_same_bytes_without_recomputing(two_runs, tmp_path, monkeypatch):
    a, _ = two_runs
    for n in CHEAP:
        (tmp_path / f"{n}.json").write_bytes((a / f"{n}.json").read_bytes())
    import tpg.figures as F
    for n in CHEAP:                                   # recomputing would now raise
        monkeypatch.setitem(F.FIGURES, n, F.FIGURES[n].__class__(
            **{**F.FIGURES[n].__dict__, "compute": lambda ctx: (_ for _ in ()).throw(AssertionError("recomputed"))}))
    assert main(["figures", *CHEAP, "--replot", "--out", str(tmp_path)]) == 0
    for n in CHEAP:
        assert (tmp_path / f"{n}.png").read_bytes() == (a / f"{n}.png").read_bytes()
        assert (tmp_path / f"{n}.pdf").read_bytes() == (a / f"{n}.pdf").read_bytes()


def test_std_normalisation_numbers_match_the_theory(two_runs):
    """The data behind the captions: Dr. GRPO's scale is (1 − 1/G)/H exactly, RLOO's is 1, and
    std-GRPO is parallel to ∇J on one binary prompt."""
    a, _ = two_runs
    pts = json.loads((a / "std_normalisation.json").read_text())["data"]["points"]
    for p in pts:
        if p["estimator"] == "Dr. GRPO":
            assert abs(p["scale"] - (1 - 1 / p["G"]) / 2) < 1e-12
        if p["estimator"] == "RLOO":
            assert abs(p["scale"] - 1) < 1e-12 and p["rel_bias"] < 1e-12
        if p["estimator"] == "std-GRPO" and p["kind"] == "binary" and len(p["rates"]) == 1:
            assert p["residual"] < 1e-12
        if p["estimator"] == "std-GRPO" and p["kind"] == "ternary":
            assert p["residual"] > 1e-4


def test_unknown_figure_is_a_one_line_error(tmp_path, capsys):
    assert main(["figures", "no_such_figure", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no_such_figure" in err and "Traceback" not in err


def test_replot_without_data_is_a_one_line_error(tmp_path, capsys):
    assert main(["figures", "std_normalisation", "--replot", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--replot" in err


@pytest.mark.skipif(find_spec("ray") is not None, reason="ray is installed")
def test_ray_backend_without_ray_is_a_one_line_error(tmp_path, capsys):
    assert main(["figures", "std_normalisation", "--fast", "--backend", "ray", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ray" in err.lower()


def test_list_names_every_figure(capsys):
    assert main(["figures", "--list"]) == 0
    out = capsys.readouterr().out
    from tpg.figures import FIGURES
    assert all(n in out for n in FIGURES)
