"""How numbers read, in one place: every "value [low,high]" cell of the console tables, the
report and `factlab compare` goes through `interval`; probe kinds are ordered by
evaluate.probes.order_kinds everywhere."""

from __future__ import annotations

from collections.abc import Mapping

from factlab.evaluate.probes import order_kinds

__all__ = ["interval", "value", "change", "number", "order_kinds"]


def value(x: Mapping | None) -> float | None:
    """The point value of a rate summary ("rate") or a bootstrap summary ("mean")."""
    if not x or not x.get("n"):
        return None
    return x["rate"] if "rate" in x else x["mean"]


def interval(x: Mapping | float | None, signed: bool = False) -> str:
    """"value [low,high]" of a rate or bootstrap summary (2 decimals; with `signed`, every
    number carries its sign, for differences); a plain number as is; "-" when empty (None, or
    a summary of n = 0)."""
    fmt = "{:+.2f}" if signed else "{:.2f}"
    if x is None:
        return "-"
    if not isinstance(x, Mapping):
        return fmt.format(x)
    v = value(x)
    if v is None:
        return "-"
    return f"{fmt.format(v)} [{fmt.format(x['ci_low'])},{fmt.format(x['ci_high'])}]"


def change(x: Mapping | None, base: Mapping | None) -> str | None:
    """The change of a summary's value against `base` ("+0.25"), or None when either is empty."""
    v, b = value(x), value(base)
    return None if v is None or b is None else f"{v - b:+.2f}"


def number(x: float | None, fmt: str = "{:.2f}", prefix: str = "") -> str:
    """A plain number, "-" when missing."""
    return "-" if x is None else prefix + fmt.format(x)
