"""Regenerate the README's generated tables in place (never type them): the text between
``<!-- gen:NAME -->`` and ``<!-- /gen:NAME -->`` is replaced by the output of NAME's generator.

    python benchmarks/readme_tables.py            # every table
    python benchmarks/readme_tables.py zoo        # only some
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def claims(policy: str, seeds) -> str:
    from tpg.claims import render_table
    body = render_table(policy, seeds)
    return f"```\n$ tpg verify{'' if policy == 'tabular' else ' --policy ' + policy}" \
           f"{'' if list(seeds) == [0, 1] else ' --seeds ' + str(len(list(seeds)))}\n{body}```"


def zoo() -> str:
    from tpg.zoo import run_zoo, to_markdown
    return to_markdown(run_zoo())


GENERATORS = {
    "claims-tabular": lambda: claims("tabular", [0, 1]),
    "claims-gpt2": lambda: claims("gpt2", [0]),
    "zoo": zoo,
}


def main(names: list[str]) -> None:
    text = README.read_text()
    for name in names or list(GENERATORS):
        pat = re.compile(rf"(<!-- gen:{name} -->\n).*?(<!-- /gen:{name} -->)", re.S)
        if not pat.search(text):
            raise SystemExit(f"README has no <!-- gen:{name} --> block")
        out = GENERATORS[name]()
        text = pat.sub(lambda m: m.group(1) + out.rstrip("\n") + "\n" + m.group(2), text)
        print(f"regenerated {name}")
    README.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
