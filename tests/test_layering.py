"""Import layering: a module of tpg never imports one above it in the data flow (DESIGN §2–3).

Layers, lowest first: validate → mdp → policies → lm → rollouts → draws → estimators →
(dp, scores, batches) → exact (and mc) → verify → claims / symbolic / train / zoo (and the
package's own ``__init__``) → figures → cli. Modules are ranked by their top-level name under tpg/ (so a package
such as tpg/figures/ is one entry); an import of a module of equal or lower rank is fine, an upward
one is a defect even inside a function (a local import only hides the cycle). Every file is parsed
with ``ast``, nothing is imported, so the test is fast and a broken module cannot hide a violation.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tpg"
PACKAGE = "tpg"          # the package's __init__ (``import tpg``, ``from tpg import TabularSoftmax``)

RANK = {
    "validate": 0,
    "mdp": 1,
    "policies": 2,
    "lm": 3,
    "rollouts": 4,
    "draws": 5,
    "estimators": 6,
    "dp": 7, "scores": 7, "batches": 7,
    "exact": 8, "mc": 8,
    "verify": 9,
    "claims": 10, "symbolic": 10, "train": 10, "zoo": 10, "check": 10, PACKAGE: 10,
    "figures": 11,
    "cli": 12,
}


def layer_of(path: Path) -> str:
    """The ranked name of a file under tpg/: its top-level module or package ("tpg" for __init__)."""
    rel = path.relative_to(ROOT)
    return PACKAGE if rel.parts == ("__init__.py",) else rel.parts[0].removesuffix(".py")


def _submodule(name: str) -> bool:
    return (ROOT / f"{name}.py").exists() or (ROOT / name / "__init__.py").exists()


def imported_layers(tree: ast.AST, path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module as written, its ranked name) of every tpg import in ``tree``, at any
    depth (function-local imports included)."""
    package = ".".join((PACKAGE,) + path.relative_to(ROOT).parent.parts)   # for relative imports
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                               # from . import x, from ..mdp import y
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [(base, a.name) for a in node.names]
        else:
            continue
        for mod, attr in names:
            parts = mod.split(".")
            if parts[0] != PACKAGE:
                continue
            if len(parts) > 1:
                layer = parts[1]
            elif attr is not None and _submodule(attr):                  # from tpg import exact
                layer = attr
            else:                                                        # import tpg / from tpg import TokenMDP
                layer = PACKAGE
            shown = mod + (f" ({attr})" if attr and len(parts) == 1 else "")
            out.append((node.lineno, shown, layer))
    return out


def violations(source: str, path: Path) -> list[str]:
    """Messages for every upward or unranked import in one file's source."""
    me = layer_of(path)
    if me not in RANK:
        return [f"{path.relative_to(ROOT.parent)} is not in the layering table: add {me!r} to RANK in "
                f"tests/test_layering.py at its place in the data flow (DESIGN §2)"]
    found = []
    for line, mod, layer in imported_layers(ast.parse(source, str(path)), path):
        if layer not in RANK:
            found.append(f"{path.relative_to(ROOT.parent)}:{line} imports {mod}, whose layer {layer!r} is not in "
                         "the layering table (RANK in tests/test_layering.py)")
        elif RANK[layer] > RANK[me]:
            found.append(f"{path.relative_to(ROOT.parent)}:{line} imports {mod} (layer {layer!r}, rank {RANK[layer]}) "
                         f"from layer {me!r} (rank {RANK[me]}): a lower layer must not import a higher one")
    return found


def test_no_module_imports_a_higher_layer():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 10, f"found only {files} under {ROOT}"
    bad = [v for f in files for v in violations(f.read_text(encoding="utf-8"), f)]
    assert not bad, "import layering violated:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("source,path,fragment", [
    ("def zra(self):\n    from tpg.rollouts import enumerate_responses\n", "mdp.py",
     "tpg/mdp.py:2 imports tpg.rollouts (layer 'rollouts', rank 4) from layer 'mdp' (rank 1)"),
    ("from tpg import exact\n", "estimators/core.py", "imports tpg (exact) (layer 'exact', rank 8)"),
    ("from .. import verify\n", "estimators/outcome.py", "layer 'verify', rank 9"),
    ("import tpg\n", "policies.py", "imports tpg (layer 'tpg', rank 10)"),
    ("from tpg.nowhere import x\n", "cli.py", "layer 'nowhere' is not in the layering table"),
    ("x = 1\n", "brand_new.py", "tpg/brand_new.py is not in the layering table"),
])
def test_the_checker_catches_upward_and_unranked_imports(source, path, fragment):
    """The checker itself can fail: function-local, relative and package-level upward imports and
    unranked modules are all reported, with the file, the line and both layers."""
    found = violations(source, ROOT / path)
    assert any(fragment in v for v in found), found


def test_downward_and_same_layer_imports_are_allowed():
    assert violations("from tpg.mdp import TokenMDP\nfrom tpg.estimators.core import KL\n",
                      ROOT / "estimators" / "outcome.py") == []
