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
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    assert names == sorted(p.name for p in b.iterdir() if p.is_file())
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
    """The data behind the captions: every point by the keyed route; Dr. GRPO's scale is (1 − 1/G)/H
    exactly, RLOO's is 1, std-GRPO is parallel to ∇J on one binary prompt, not with 3 reward values,
    and not on two binary prompts of different difficulty once G ≥ 4."""
    a, _ = two_runs
    data = json.loads((a / "std_normalisation.json").read_text())["data"]
    H = data["H"]
    assert data["responses_per_prompt"] == 3 ** H
    for p in data["points"]:
        assert p["route"] == "keyed"
        assert all(abs(j - r) < 1e-9 for j, r in zip(p["J_prompt"], p["rates"]))   # the bisection hit J_x
        if p["estimator"] == "Dr. GRPO":
            assert abs(p["scale"] - (1 - 1 / p["G"]) / H) < 1e-12
        if p["estimator"] == "RLOO":
            assert abs(p["scale"] - 1) < 1e-12 and p["rel_bias"] < 1e-12
        if p["estimator"] == "std-GRPO" and p["kind"] == "binary" and len(p["rates"]) == 1:
            assert p["residual"] < 1e-12
        if p["estimator"] == "std-GRPO" and p["kind"] == "3-valued":
            assert p["residual"] > 1e-4
        if p["estimator"] == "std-GRPO" and p["kind"] == "binary" and len(p["rates"]) == 2 and p["G"] >= 4:
            assert p["residual"] > 1e-4
    readme = (a / "README.md").read_text()
    assert "by the keyed route" in readme and "route of all" in readme


def test_zoo_map_matches_the_zoo_and_its_caption(tmp_path):
    """The zoo map in --fast: every verdict ZOO.md records is reproduced, the caption's counts are
    the data's, and the dense PNG stays under the README's size limit."""
    assert main(["figures", "zoo_map", "--fast", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "zoo_map.json").read_text())["data"]
    cells = data["cells"]
    assert len(cells) == len(data["rows"]) * len(data["mdps"])
    assert all(c["agrees"] is not False for c in cells)
    assert sum(c["agrees"] is True for c in cells) > 20
    unb = [c for c in cells if c["verdict"] == "unbiased"]
    assert unb and max(c["rel_bias"] for c in unb) < 1e-10
    assert any(c["verdict"] == "scaled" for c in cells) and any(c["verdict"] == "biased" for c in cells)
    readme = (tmp_path / "README.md").read_text()
    n = {k: sum(c["verdict"] == k for c in cells) for k in ("unbiased", "scaled", "biased")}
    assert f"{n['unbiased']} cells unbiased, {n['scaled']} scaled, {n['biased']} biased" in readme
    assert (tmp_path / "zoo_map.png").stat().st_size < 300_000


def test_reward_decomposition_point_theorems_hold_and_the_additive_model_breaks():
    """One point of the non-decomposing-reward figure: with a pairwise-interaction RM, Theorem 1
    (RM as the return) and Theorem 2 estimators are unbiased, every estimator built on the additive
    fit is biased, and those built on the fitted token rewards are exact for the fitted objective."""
    from tpg.figures import reward_decomposition as R
    p = R._point(("pairwise", 1.0))
    assert 0.01 < p["nonadditive_share"] < 1
    for e in R.THEOREM:
        assert p["estimators"][e]["rel_bias"] < 1e-10, e
    for e in R.BROKEN:
        assert p["estimators"][e]["rel_bias"] > 1e-3, e
        if "rel_gap_to_grad_hat" in p["estimators"][e]:
            assert p["estimators"][e]["rel_gap_to_grad_hat"] < 1e-10
    assert p["zra_invariance_gap"] < 1e-10
    assert p["credit_rms_error"][0] < 1e-10 < max(p["credit_rms_error"])
    exact_fit = R._point(("global", 0.0))                       # α = 0: RM is additive, the fit is exact
    assert exact_fit["nonadditive_share"] < 1e-20
    assert all(exact_fit["estimators"][e]["rel_bias"] < 1e-10 for e in R.ESTS)


def test_token_counter_counts_generated_tokens_and_restores_the_library():
    """The learning curves' per-token axis: TokenCounter sees every decoded token, one entry per RL step,
    and puts tpg.rollouts.decode / tpg.train.sample back afterwards."""
    import tpg.rollouts as Ro
    import tpg.train as T
    from tpg import TabularSoftmax
    from tpg.figures.learning_curves import TokenCounter
    before = (Ro.decode, T.sample)
    mdp = T.demo_mdp(0)
    with TokenCounter() as tc:
        T.train(mdp, TabularSoftmax(mdp, seed=0), "rloo", 3, G=2, lr=0.1, seed=0, eval_every=1)
    assert (Ro.decode, T.sample) == before
    assert len(tc.per_step) == 4 and tc.per_step[0] == 0
    assert all(2 * 2 <= n <= 2 * 2 * mdp.horizon for n in tc.per_step[1:])      # 2 prompts × G = 2 responses


def test_unknown_figure_is_a_one_line_error(tmp_path, capsys):
    assert main(["figures", "no_such_figure", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no_such_figure" in err and "Traceback" not in err


def test_replot_without_data_is_a_one_line_error(tmp_path, capsys):
    assert main(["figures", "std_normalisation", "--replot", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--replot" in err


def _has_ray() -> bool:
    import importlib.util
    return importlib.util.find_spec("ray") is not None


@pytest.mark.skipif(_has_ray(), reason="Ray is installed here: the ray backend itself is tested instead")
def test_ray_backend_without_ray_is_a_one_line_error(tmp_path, capsys):
    assert main(["figures", "std_normalisation", "--fast", "--backend", "ray", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ray" in err.lower()


@pytest.mark.skipif(not _has_ray(), reason="Ray is optional (pip install 'ray[default]'); without it the "
                                           "backend's one-line refusal is tested instead")
def test_ray_backend_gives_the_serial_data_files(two_runs, tmp_path):
    serial = two_runs[0]
    assert main(["figures", *CHEAP, "--fast", "--jobs", "2", "--backend", "ray", "--out", str(tmp_path)]) == 0
    for name in CHEAP:
        assert (tmp_path / f"{name}.json").read_bytes() == (serial / f"{name}.json").read_bytes(), name


def test_list_names_every_figure(capsys):
    assert main(["figures", "--list"]) == 0
    out = capsys.readouterr().out
    from tpg.figures import FIGURES
    assert all(n in out for n in FIGURES)


def test_two_jobs_give_the_serial_data_files(two_runs, tmp_path):
    """Sweeps through joblib (loky, 2 workers) write the same data files, byte for byte, as a serial run."""
    serial = two_runs[0]
    assert main(["figures", *CHEAP, "--fast", "--jobs", "2", "--out", str(tmp_path)]) == 0
    for name in CHEAP:
        assert (tmp_path / f"{name}.json").read_bytes() == (serial / f"{name}.json").read_bytes(), name


def test_every_figure_runs_in_fast_mode(tmp_path):
    """`tpg figures --fast` as CI runs it: every registered figure not exercised above computes,
    plots (PNG under the size limit, PDF) and writes its data and its generated caption."""
    from tpg.figures import FIGURES
    from tpg.figures.core import PNG_LIMIT
    rest = [n for n in FIGURES if n not in CHEAP + ["zoo_map"]]
    assert main(["figures", *rest, "--fast", "--out", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    for name in rest:
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data, name
        png = tmp_path / f"{name}.png"
        assert (tmp_path / f"{name}.pdf").stat().st_size > 0 and 0 < png.stat().st_size <= PNG_LIMIT, name
        assert f"({name}.png)" in readme, name


def test_a_rerun_resumes_from_the_task_cache(tmp_path, monkeypatch):
    """Task results are cached under a key of (tpg's code, the task function, the task): a rerun
    into the same folder computes no task, and writes the same bytes."""
    from tpg.figures import core
    assert main(["figures", "trepo_readings", "--fast", "--out", str(tmp_path)]) == 0
    first = (tmp_path / "trepo_readings.json").read_bytes()
    assert any((tmp_path / ".cache").glob("*.pkl"))
    monkeypatch.setattr(core, "_worker", lambda fn, task: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert main(["figures", "trepo_readings", "--fast", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "trepo_readings.json").read_bytes() == first
