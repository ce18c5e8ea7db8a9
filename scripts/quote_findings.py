#!/usr/bin/env python
"""Quote each committed report's findings into the project README, verbatim.

    .venv/bin/python scripts/quote_findings.py          # rewrite README.md's quoted blocks
    .venv/bin/python scripts/quote_findings.py --check  # exit 1 if any block differs from its report

README.md marks each quotation with ``<!-- quote: report/README.md -->`` followed by a findings block
(``<!-- findings:start -->`` ... ``<!-- findings:end -->``, as analysis.report writes it); the block is
replaced by the named report's own block, so the README states nothing the report does not.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.report import FINDINGS_END, FINDINGS_START  # noqa: E402

QUOTE = re.compile(r"<!-- quote: (\S+) -->\n" + re.escape(FINDINGS_START) + r".*?" + re.escape(FINDINGS_END), re.S)


def block(report: Path) -> str:
    text = report.read_text()
    start, end = text.index(FINDINGS_START), text.index(FINDINGS_END) + len(FINDINGS_END)
    return text[start:end]


def quoted(readme: str, root: Path = ROOT) -> str:
    """README text with every quotation replaced by its report's current findings block."""
    return QUOTE.sub(lambda m: f"<!-- quote: {m.group(1)} -->\n{block(root / m.group(1))}", readme)


def main(check: bool) -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if not QUOTE.search(text):
        print("README.md quotes no report (no '<!-- quote: PATH -->' before a findings block)", file=sys.stderr)
        return 1
    new = quoted(text)
    if check:
        if new != text:
            print("README.md's findings differ from the reports': run scripts/quote_findings.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    print(f"quoted {len(QUOTE.findall(text))} findings blocks into README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv[1:]))
