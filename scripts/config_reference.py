"""Write docs/configuration.md from the comments in conf/: every command's keys and every group option's keys,
each with its default, the range the schema declares for it (config.schema: the same declaration validation
checks) and the comment beside it (the YAML is the one source of values; this page is generated).

    python scripts/config_reference.py            # rewrite docs/configuration.md
    python scripts/config_reference.py --check    # exit 1 when it is out of date (tests/test_docs.py)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from transferlab.config.limits import ranges
from transferlab.config.schema import COMMANDS
from transferlab.core.bounds import Bounds

REPO = Path(__file__).resolve().parents[1]
CONF, OUT = REPO / "conf", REPO / "docs" / "configuration.md"
KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w\-]*):(?P<rest>.*)$")


def split_comment(rest: str) -> tuple[str, str]:
    """`value  # comment` -> (value, comment); a `#` inside quotes or `${...}` is part of the value."""
    depth, quote = 0, ""
    for i, ch in enumerate(rest):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1 :].strip()
    return rest.strip(), ""


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


def describe(file: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """(header comment, [(dotted key, default, comment)]) of one YAML file."""
    header, rows, stack, in_defaults, last_indent = [], [], [], False, 0
    for line in file.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not rows and not stack:
            text = stripped.lstrip("#").strip()
            if not text.startswith("@package"):
                header.append(text)
            continue
        if stripped.startswith("#") and rows and len(line) - len(line.lstrip()) > last_indent + 2:
            key, value, comment = rows[-1]  # a comment continued on the next lines, aligned under the first
            rows[-1] = (key, value, f"{comment} {stripped.lstrip('#').strip()}".strip())
            continue
        match = KEY.match(line)
        if not match or stripped.startswith("-"):
            continue
        indent, key = len(match["indent"]), match["key"]
        last_indent = indent
        if indent == 0:
            in_defaults = key == "defaults"
        if in_defaults:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value, comment = split_comment(match["rest"])
        dotted = ".".join([*(k for _, k in stack), key])
        if value == "":
            stack.append((indent, key))
            if comment:
                rows.append((dotted, "", comment))
            continue
        rows.append((dotted, value if len(value) <= 70 else value[:67] + "...", comment))
    return " ".join(header), rows


def table(rows: list[tuple[str, str, str]], limits: dict[str, tuple[Bounds, str]], prefix: str = "") -> list[str]:
    """One row per key: its default, its declared range (`limits`, by full key) and its comment."""
    if not rows:
        return []
    out = ["| key | default | range | what |", "| --- | --- | --- | --- |"]
    for k, v, c in rows:
        allowed = limits[prefix + k][1] if prefix + k in limits else ""
        out.append(f"| `{cell(prefix + k)}` | {('`' + cell(v) + '`') if v else ' '} | {cell(allowed)} | {cell(c)} |")
    return out + [""]


def reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the comments in `conf/` by `python scripts/config_reference.py` (do not edit by hand: edit the",
        "YAML and run it again). Every key can be set on the command line (`key=value`); a `???` default must be given.",
        "",
        "Before any work, every command checks its composed config against its schema (`src/transferlab/config/schema/`):",
        "unknown keys (with close matches), types, `???` values, and the range in the *range* column, declared on the",
        "schema's field beside its type (`Annotated[int, Bounds(ge=1)]`); a `_target_` node is checked against the",
        "signature of the class it names. The first problem stops the command with exit code 2 and one line naming the",
        "key, what it expects and what it got, e.g. `error: optimizer.lr: expected a number > 0, e.g. optimizer.lr=1e-3,",
        "got -0.01`.",
        "",
        "## Commands",
        "",
    ]
    for file in sorted(CONF.glob("*.yaml")):
        header, rows = describe(file)
        limits = ranges(COMMANDS[file.stem]) if file.stem in COMMANDS else {}
        lines += [f"### `transferlab-{file.stem}` (conf/{file.name})", "", header, "", *table(rows, limits)]
    lines += ["## Config groups", "", "Choose an option with `<group>=<option>`; its keys are then under `<group>.`.", ""]
    group_limits = ranges(COMMANDS["train"])  # a group's keys sit under the same key in every command
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in ("experiment", "hydra")):
        lines += [f"### `{group.name}`", ""]
        for file in sorted(group.rglob("*.yaml")):
            option = file.relative_to(group).with_suffix("").as_posix()
            header, rows = describe(file)
            prefix = "" if group.name in ("logger", "callbacks") else f"{group.name}."
            title = "the shared keys of every option" if option.startswith("_") else f"`{group.name}={option}`"
            lines += [f"#### {title}", "", header, "", *table(rows, group_limits, prefix)]
    lines += [
        "## Where the jobs run: `hydra/launcher`, `hydra/sweeper`",
        "",
        "Options of Hydra's own groups (`conf/hydra/`), chosen with `hydra/launcher=<option>`; their keys sit under",
        "`hydra.` (`hydra.launcher.address=...`, `hydra.sweeper.workers=4`). See [Sweeps](sweeps.md) and",
        "[From laptop to cluster](cluster.md).",
        "",
    ]
    for kind, prefix in (("launcher", "hydra."), ("sweeper", "hydra.sweeper.")):
        for file in sorted((CONF / "hydra" / kind).glob("*.yaml")):
            header, rows = describe(file)
            lines += [f"#### `hydra/{kind}={file.stem}`", "", header, "", *table(rows, {}, prefix)]
    lines += [
        "## Experiment presets (`experiment=<name>`, files in `experiments/`)",
        "",
        "| preset | what, and its measured result |",
        "| --- | --- |",
    ]
    for file in sorted((CONF / "experiment").rglob("*.yaml")):
        header, _ = describe(file)
        lines.append(f"| `{file.relative_to(CONF / 'experiment').with_suffix('').as_posix()}` | {cell(header)} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is out of date")
    args = parser.parse_args()
    text = reference()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print("docs/configuration.md is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
