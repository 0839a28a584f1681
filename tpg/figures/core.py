"""The plumbing of ``tpg figures``: registry, sweeps, deterministic saving, captions.

A figure is three plain functions (STYLE.md, "one function per figure"):

- ``compute(ctx) -> dict``: the experiment. Returns plain data (dicts, lists, floats, strings), which
  is saved as ``<name>.json`` beside the figure, so ``--replot`` redraws without recomputing.
  Sweeps go through ``ctx.map(fn, tasks)`` (joblib: loky locally, Ray through joblib's Ray backend),
  with a tqdm bar on stderr; ``ctx.fast`` shrinks the work for CI.
- ``plot(data) -> matplotlib.figure.Figure``: reads only the data.
- ``caption(data) -> str``: one paragraph for ``figures/README.md`` whose numbers are read from the
  data (never typed by hand).

Outputs are byte-identical on rerun: Agg backend, the shipped style, fixed seeds in every experiment,
PNG saved without the "Software" chunk, PDF without creation date / producer, JSON with sorted keys.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tpg.mdp import TPGError

STYLE = Path(__file__).with_name("tpg.mplstyle")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "figures"
PNG_META = {"Software": None}
PDF_META = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}
BACKENDS = ("loky", "ray")
PNG_LIMIT = 280_000                   # bytes: larger PNGs are re-saved with a 256-colour palette


@dataclass(frozen=True)
class Figure:
    name: str
    title: str
    compute: Callable
    plot: Callable
    caption: Callable
    cost: str = ""                    # rough full-mode run time, for --list


FIGURES: dict[str, Figure] = {}


def register(fig: Figure) -> Figure:
    FIGURES[fig.name] = fig
    return fig


# ====================================================================================== sweeps
def _worker(fn, task):
    import torch
    torch.set_num_threads(1)          # tiny tensors: thread hand-offs cost more than they save
    return fn(task)


def code_hash() -> str:
    """SHA-256 of every source file of the tpg package: a cached task result is valid only for the
    exact code that computed it (any edit anywhere in tpg invalidates the cache)."""
    import hashlib
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@dataclass
class Context:
    """What a compute function gets: the mode and a parallel map. With ``cache`` (a folder), every
    task's result is stored under a key of (tpg's code, the task function, the task), so an
    interrupted sweep resumes where it stopped and a rerun recomputes nothing."""
    fast: bool = False
    jobs: int = 1
    backend: str = "loky"
    progress: bool = True
    cache: Path | None = None

    def _key(self, fn: Callable, task) -> str:
        import hashlib
        if not hasattr(self, "_code"):
            self._code = code_hash()
        return hashlib.sha256(f"{self._code}|{fn.__module__}.{fn.__qualname__}|{self.fast}|{task!r}".encode()).hexdigest()

    def map(self, fn: Callable, tasks: list, desc: str = "") -> list:
        """[fn(t) for t in tasks], in order, through joblib (``fn`` must be a module-level function
        and the tasks picklable). Results do not depend on --jobs or --backend: every task seeds
        its own randomness."""
        import pickle
        tasks = list(tasks)
        if self.cache is None:
            return self._map(fn, tasks, desc)
        self.cache.mkdir(parents=True, exist_ok=True)
        paths = [self.cache / f"{self._key(fn, t)}.pkl" for t in tasks]
        todo = [i for i, p in enumerate(paths) if not p.exists()]
        for i, r in zip(todo, self._map(fn, [tasks[i] for i in todo], desc)):
            tmp = paths[i].with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(r))
            tmp.replace(paths[i])                                       # atomic: a killed run leaves no half file
        return [pickle.loads(p.read_bytes()) for p in paths]

    def _map(self, fn: Callable, tasks: list, desc: str) -> list:
        from tqdm import tqdm
        bar = dict(total=len(tasks), desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                   disable=not self.progress or len(tasks) < 2)
        if self.jobs == 1 and self.backend == "loky":
            return [_worker(fn, t) for t in tqdm(tasks, **bar)]
        from joblib import Parallel, delayed, parallel_config
        if self.backend == "ray":
            from ray.util.joblib import register_ray
            register_ray()
        # joblib's Ray backend cannot stream results (return_as="generator"): collect them as a list there.
        streaming = self.backend != "ray"
        with parallel_config(backend=self.backend, n_jobs=self.jobs):
            out = Parallel(return_as="generator" if streaming else "list")(delayed(_worker)(fn, t) for t in tasks)
            return list(tqdm(out, **bar))


def check_backend(backend: str, jobs) -> None:
    if backend not in BACKENDS:
        raise TPGError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or (jobs < 1 and jobs != -1):
        raise TPGError(f"--jobs must be an int ≥ 1 (or -1 for every core), got {jobs!r}")
    if backend == "ray":
        try:
            import ray  # noqa: F401
            import ray.util.joblib  # noqa: F401
        except ImportError:
            raise TPGError("--backend ray needs Ray (pip install 'ray[default]'); use --backend loky") from None


# ====================================================================================== saving
def _clean(x):
    """Plain JSON data: floats rounded-trip exactly (repr), NaN/inf as None, tuples as lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return _clean(x.tolist())
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    raise TypeError(f"figure data must be plain (dict/list/float/str), got {type(x).__name__}")


def write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(_clean(doc), indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def save_figure(fig, stem: Path) -> list[Path]:
    """PNG (README) and PDF (papers), deterministic bytes."""
    import matplotlib.pyplot as plt
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    fig.savefig(png, metadata=PNG_META)
    if png.stat().st_size > PNG_LIMIT:
        _palette_png(png)
    fig.savefig(pdf, metadata=PDF_META)
    plt.close(fig)
    return [png, pdf]


def _palette_png(png: Path) -> None:
    """Re-save a dense figure (many cells of text) as a 256-colour palette PNG: the README's
    < 300 KB, deterministic (median cut, no dithering, no metadata)."""
    from PIL import Image
    with Image.open(png) as im:
        pal = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    pal.save(png, optimize=True)


def style():
    """A context manager: Agg-safe matplotlib with tpg's style."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt.style.context(str(STYLE))


# ====================================================================================== formatting
def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a caption: 3 significant digits, scientific when tiny or huge."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if x == 0:
        return "0"
    a = abs(x)
    return f"{x:.{digits - 1}e}" if a < 1e-3 or a >= 1e5 else f"{x:.{digits}g}"


def floor(x: float, lo: float = 1e-17) -> float:
    """For log axes: exact zeros (and round-off) drawn at ``lo``."""
    return max(abs(float(x)), lo)
