"""Pair, check, time and thumbnail the teaching notebooks.

The jupytext percent scripts ``NN_*.py`` are the source of truth; each is paired with a committed
``NN_*.ipynb`` (same cells, outputs stripped) that opens directly in Jupyter.

    python notebooks/build.py                # write every .ipynb from its .py (outputs stripped)
    python notebooks/build.py --check        # exit 1 if a pair is out of sync (what the tests check)
    python notebooks/build.py --run [--fast] # execute every .ipynb as a notebook, print the seconds
    python notebooks/build.py --thumbs       # execute (full mode) and save each notebook's figure
                                             # tagged "thumbnail" as thumbs/NN.png (< 100 KB)

Needs the ``notebooks`` extra (``pip install -e ".[notebooks]"``).
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
THUMBS = HERE / "thumbs"
THUMB_WIDTH = 720            # pixels: legible in a README table, well under 100 KB as PNG
THUMB_MAX_BYTES = 100_000


def sources() -> list[Path]:
    """The notebook sources, in course order."""
    return sorted(HERE.glob("[0-9][0-9]_*.py"))


def cells(nb) -> list[tuple[str, str, tuple]]:
    """What a pair must agree on: each cell's type, source and tags."""
    return [(c.cell_type, c.source, tuple(c.get("metadata", {}).get("tags", ()))) for c in nb.cells]


def to_notebook(py: Path):
    """The notebook of a percent script, outputs stripped (jupytext adds none)."""
    import jupytext
    return jupytext.read(py)


def write_pair(py: Path) -> Path:
    import jupytext
    out = py.with_suffix(".ipynb")
    jupytext.write(to_notebook(py), out, fmt="ipynb")
    return out


def out_of_sync(py: Path) -> str | None:
    """None when ``py`` and its .ipynb agree cell for cell and the .ipynb holds no outputs; else why not."""
    import nbformat
    ipynb = py.with_suffix(".ipynb")
    if not ipynb.exists():
        return f"{ipynb.name} is missing"
    nb = nbformat.read(ipynb, as_version=4)
    a, b = cells(to_notebook(py)), cells(nb)
    if len(a) != len(b):
        return f"{py.name} has {len(a)} cells, {ipynb.name} has {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"cell {i} differs between {py.name} and {ipynb.name}: {x[1][:60]!r} vs {y[1][:60]!r}"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    if dirty:
        return f"{ipynb.name} holds outputs in cells {dirty} (commit it stripped: python notebooks/build.py)"
    return None


def execute(ipynb: Path, fast: bool, cwd: Path | None = None, timeout: int = 600):
    """Run a notebook top to bottom in one kernel session; returns (executed notebook, seconds)."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(ipynb, as_version=4)
    old = os.environ.get("TPG_FAST")
    if fast:
        os.environ["TPG_FAST"] = "1"
    else:
        os.environ.pop("TPG_FAST", None)
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(cwd or HERE)}})
        t0 = time.perf_counter()
        client.execute()
        return nb, time.perf_counter() - t0
    finally:
        if old is None:
            os.environ.pop("TPG_FAST", None)
        else:
            os.environ["TPG_FAST"] = old


def thumbnail_png(nb) -> bytes:
    """The PNG output of the cell tagged "thumbnail", scaled to THUMB_WIDTH and under THUMB_MAX_BYTES."""
    from PIL import Image
    for c in nb.cells:
        if "thumbnail" in c.get("metadata", {}).get("tags", ()):
            pngs = [o["data"]["image/png"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
            if pngs:
                break
    else:
        raise SystemExit("no cell tagged 'thumbnail' with a PNG output")
    img = Image.open(io.BytesIO(base64.b64decode(pngs[-1]))).convert("RGB")
    if img.width > THUMB_WIDTH:
        img = img.resize((THUMB_WIDTH, round(img.height * THUMB_WIDTH / img.width)), Image.LANCZOS)
    for colors in (None, 256, 128, 64):
        im = img if colors is None else img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        if buf.tell() < THUMB_MAX_BYTES:
            return buf.getvalue()
    raise SystemExit(f"thumbnail above {THUMB_MAX_BYTES} bytes even with 64 colours")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if a .py/.ipynb pair is out of sync")
    ap.add_argument("--run", action="store_true", help="execute every notebook and print its run time")
    ap.add_argument("--thumbs", action="store_true", help="execute and save thumbs/NN.png")
    ap.add_argument("--fast", action="store_true", help="with --run/--thumbs: TPG_FAST=1")
    ap.add_argument("names", nargs="*", help="notebook name prefixes (default: all), e.g. 03 07")
    args = ap.parse_args(argv)
    pys = [p for p in sources() if not args.names or any(p.name.startswith(n) for n in args.names)]
    if args.check:
        bad = [(p, why) for p in pys if (why := out_of_sync(p))]
        for p, why in bad:
            print(f"out of sync: {why}", file=sys.stderr)
        return 1 if bad else 0
    if not (args.run or args.thumbs):
        for p in pys:
            print(f"wrote {write_pair(p).relative_to(HERE.parent)}")
        return 0
    THUMBS.mkdir(exist_ok=True)
    for p in pys:
        nb, took = execute(p.with_suffix(".ipynb"), args.fast)
        line = f"{p.stem}: {took:.1f} s ({'fast' if args.fast else 'full'})"
        if args.thumbs:
            png = thumbnail_png(nb)
            out = THUMBS / f"{p.name[:2]}.png"
            out.write_bytes(png)
            line += f"; {out.relative_to(HERE.parent)} {len(png) / 1000:.0f} KB"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
