"""The README's Python examples run as written, and say what they print (the README stays true)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i, capsys):
    ns: dict = {}
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), ns)
    out = capsys.readouterr().out
    # every "# <text>" comment right after a print(...) states the start of what it prints
    for line in BLOCKS[i].splitlines():
        m = re.match(r"print\(.*\)\s+# (\w[\w ]*?: \w+)", line.strip())
        if m:
            assert m.group(1) in out, f"README says {m.group(1)!r}; printed:\n{out}"
    if "peeking_baseline" in ns:
        assert ns["r"].verdict == "biased" and ns["r"].rel_bias > 0.5
