"""scripts/benchmark.py's sections as one table. Each `Section` names its run, the markdown rows it makes of its
details, and the benchmark.json keys read from them; each target is declared once, on its row (`common.Target`),
and both the table's target cell and `targets` / `--check` come from that declaration.

The sections import nothing through sys.path: their modules import one another relatively, and the one sibling script
they use (synthetic_photos.py) is imported from its file (`common.script`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import accuracy, decode, fill, finetune, frozen, lora, peak, precision, predict, probe, tradeoff
from .common import Context, Row, fmt, meets

__all__ = ["SECTIONS", "NAMES", "Context", "Section", "check", "markdown", "run_sections", "summary", "targets"]


@dataclass(frozen=True)
class Section:
    name: str  # what --sections names, and its key in benchmark.json's `details`
    run: Callable[[Context], Optional[dict[str, Any]]]  # its details; None where this mode leaves it out
    rows: Callable[[dict[str, Any]], list[Row]]  # the markdown rows (and, on them, the targets) made of its details
    keys: dict[str, Callable[[Optional[dict[str, Any]]], Any]]  # top-level benchmark.json keys read from its details
    needs: tuple[str, ...] = ()  # sections it reads, run before it even when not asked for


SECTIONS = (
    Section("frozen", frozen.run, frozen.rows, frozen.KEYS),
    Section("finetune", finetune.run, finetune.rows, finetune.KEYS),
    Section("precision", precision.run, precision.rows, precision.KEYS),
    Section("accuracy", accuracy.run, accuracy.rows, accuracy.KEYS),
    Section("decode", decode.run, decode.rows, decode.KEYS),
    Section("peak", peak.run, peak.rows, peak.KEYS, needs=("precision",)),
    Section("probe", probe.run, probe.rows, probe.KEYS),
    Section("predict", predict.run, predict.rows, predict.KEYS),
    Section("fill", fill.run, fill.rows, fill.KEYS),
    Section("lora", lora.run, lora.rows, lora.KEYS),
    Section("tradeoff", tradeoff.run, tradeoff.rows, tradeoff.KEYS),
)
NAMES = tuple(s.name for s in SECTIONS)
HEADER = ["| measurement | baseline | transferlab | ratio | target |", "|---|---|---|---|---|"]


def run_sections(names: list[str], ctx: Context) -> dict[str, Any]:
    """The named sections and what they need, in the table's order, into ctx.details (also returned)."""
    wanted = set(names) | {need for s in SECTIONS if s.name in names for need in s.needs}
    for section in SECTIONS:
        if section.name in wanted:
            found = section.run(ctx)
            if found is not None:
                ctx.details[section.name] = found
    return ctx.details


def summary(details: dict[str, Any]) -> dict[str, Any]:
    """Every section's top-level keys (None for a section that did not run), in the table's order."""
    return {key: read(details.get(s.name)) for s in SECTIONS for key, read in s.keys.items()}


def table_rows(details: dict[str, Any]) -> list[Row]:
    return [row for s in SECTIONS if s.name in details for row in s.rows(details[s.name])]


def targets(details: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{key: {value, target, met}} for every row with a target, of the sections that ran."""
    return {row.target.key: row.target.entry() for row in table_rows(details) if row.target}


def markdown(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    footer = (
        f"Hardware: {hw['cpu_model']}, {hw['cores']} cores, flags {' '.join(hw['flags'])}; GPU {hw['gpu'] or 'none'}; "
        f"torch {hw['torch']}. Mode: {result['mode']}, {result['seconds']:.0f} s."
    )
    return "\n".join([*HEADER, *(row.line() for row in table_rows(result["details"])), "", footer])


def check(entries: dict[str, dict[str, Any]]) -> int:
    """--check: one line per missed target (re-evaluated from its value), exit status 1 if any, else 0."""
    missed = [(key, e) for key, e in entries.items() if not meets(e["value"], e["target"])]
    for key, e in missed:
        print(f"target missed: {key} = {fmt(e['value'], 3)}, target {e['target']}")
    print(f"{len(entries) - len(missed)} of {len(entries)} targets met")
    return 1 if missed else 0
