"""Markdown rendering shared by every generated report (no tabulate dependency)."""

from __future__ import annotations

import math

import pandas as pd

# a report's findings block: the project README quotes it verbatim (scripts/quote_findings.py)
FINDINGS_START, FINDINGS_END = "<!-- findings:start -->", "<!-- findings:end -->"


def md_table(df: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table, cells as ``str`` of their values."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def fmt_num(x, digits: int = 3, sign: bool = False) -> str:
    """A figure as every report prints it: fixed decimals (``sign``: with its + or -), "–" when missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def fmt_ci(lo, hi, digits: int = 3, sign: bool = False) -> str:
    """An interval ``[lo, hi]`` as every report prints it, "–" unless both ends are finite."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "–"
    return f"[{fmt_num(lo, digits, sign)}, {fmt_num(hi, digits, sign)}]"


def fmt_p(p: float) -> str:
    """A p-value as every report prints it: three decimals, "< 0.001" below that, "–" when untested."""
    return "–" if not math.isfinite(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")
