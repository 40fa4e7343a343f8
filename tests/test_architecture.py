"""The shape of the code (docs/architecture.md): packages by responsibility, dependencies one way, small modules,
and every patched third-party internal still shaped the way it was checked.

The import graph is read from the AST of src/, function-local imports included (a lazy import is a dependency).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED, cli_env
from transferlab.core import compat
from transferlab.core.errors import IncompatibleLibrary

PACKAGE = REPO / "src" / "transferlab"
# Lower imports from higher, never the other way: commands -> training / sweeps -> callbacks -> insight -> models ->
# data / config -> core. `config` (the schema and its one validation) needs nothing but core, so every layer may use it.
LAYERS = {"core": 0, "config": 1, "data": 1, "models": 2, "insight": 3, "callbacks": 4, "training": 6, "sweeps": 6, "deploy": 6, "cli": 7}
MAX_ROOT_MODULES, MAX_LINES, SHIM_LINES = 6, 300, 15


def modules() -> dict[str, Path]:
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def imports(name: str, file: Path) -> set[str]:
    """transferlab modules `name` imports anywhere in its file."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [node.module])])
            targets |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    known = modules()
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target.startswith("transferlab") and target != name and not name.startswith(target + "."):
            resolved.add(target)
    return resolved


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYERS), f"add new packages to LAYERS (and docs/architecture.md): {packages ^ set(LAYERS)}"


def test_dependencies_point_one_way():
    wrong = []
    for name, file in modules().items():
        for target in imports(name, file):
            if layer(name) is not None and layer(target) is not None and layer(target) > layer(name):  # type: ignore[operator]
                wrong.append(f"{name} -> {target}")
    assert not wrong, f"a module imports from a package above it: {wrong}"


def test_no_import_cycles():
    graph = {name: imports(name, file) for name, file in modules().items()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in graph.get(node, ()):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_module_sizes_and_root_modules():
    sizes = {name: len(file.read_text().splitlines()) for name, file in modules().items()}
    assert max(sizes.values()) <= MAX_LINES, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    root = [f.name for f in PACKAGE.glob("*.py") if f.name != "__init__.py" and sizes[f"transferlab.{f.stem}"] > SHIM_LINES]
    assert len(root) <= MAX_ROOT_MODULES, root


def test_every_root_shim_only_hands_over_to_its_command():
    for shim in PACKAGE.glob("*.py"):
        if shim.name in ("__init__.py", "api.py"):  # api.py: the Python API, a real module (docs/architecture.md)
            continue
        assert f"from transferlab.cli.{shim.stem} import main" in shim.read_text(), shim.name
        assert (PACKAGE / "cli" / shim.name).is_file(), shim.name


@pytest.mark.skipif(not (SHARED.parent / "tools" / "structure.py").is_file(), reason="../shared/tools/structure.py is not here")
def test_the_shared_structure_tool_agrees():
    proc = subprocess.run(
        [
            sys.executable,
            str(SHARED.parent / "tools" / "structure.py"),
            str(PACKAGE),
            "--max-root",
            str(MAX_ROOT_MODULES),
            "--max-lines",
            str(MAX_LINES),
            "--shim-lines",
            str(SHIM_LINES),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "cycles 0" in proc.stdout, proc.stdout + proc.stderr


# -- state and private APIs ----------------------------------------------------------------------------------------
SOURCE_FILES = sorted([*PACKAGE.rglob("*.py"), *(REPO / "src" / "hydra_plugins").rglob("*.py")])
MUTATORS = {"append", "extend", "insert", "add", "update", "clear", "pop", "popitem", "remove", "setdefault", "discard"}
# Module-level containers that may change after import, and why (each is written only by import-time registration).
REGISTRIES = {"transferlab.models.sources.registry.SOURCES": "backbone sources, filled by @register when their modules load"}
# Underscore attributes that are public API by convention (namedtuple's methods).
PUBLIC_BY_CONVENTION = {"_replace", "_asdict", "_fields", "_make"}


def module_containers(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level to a list, dict or set (displays, comprehensions, constructor calls)."""
    found = set()
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = node.value
            mutable = isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in {"list", "dict", "set", "defaultdict", "deque"}
            )
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found |= {t.id for t in targets if isinstance(t, ast.Name) and mutable and t.id != "__all__"}
    return found


def test_no_module_keeps_state_that_changes_after_import():
    """Information passes between layers as arguments and return values, never through module globals: no `global`
    statement, no lower-case module-level container, and no module-level container changed after import (imported
    names included), except the declared registries."""
    containers = {}
    for file in SOURCE_FILES:
        tree = ast.parse(file.read_text())
        name = ".".join(file.relative_to(REPO / "src").with_suffix("").parts)
        containers[file] = {(name, c) for c in module_containers(tree)}
    every = {c for found in containers.values() for _, c in found}
    wrong = []
    for file in SOURCE_FILES:
        tree = ast.parse(file.read_text())
        where = file.relative_to(REPO)
        wrong += [f"{where}:{n.lineno}: global" for n in ast.walk(tree) if isinstance(n, ast.Global)]
        wrong += [f"{where}: {c} (module-level state is UPPER_CASE and never changed)" for _, c in containers[file] if not c.isupper()]
        for node in ast.walk(tree):
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
                target = node.func.value
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                for t in node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]:
                    target = t.value if isinstance(t, ast.Subscript) else target
            if isinstance(target, ast.Name) and target.id in every and target.id.isupper():
                owners = [f"{m}.{c}" for found in containers.values() for m, c in found if c == target.id]
                if not set(owners) & set(REGISTRIES) and not any(isinstance(a, ast.arg) and a.arg == target.id for a in ast.walk(tree)):
                    wrong.append(f"{where}:{node.lineno}: changes {target.id} after import")
    assert not wrong, wrong


def declared_private_names() -> set[str]:
    names = set()
    for internal in compat.ALL:
        for dotted in (*internal.parameters, *internal.attributes, *internal.instance_attributes):
            names |= {part for part in dotted.split(".") if part.startswith("_")}
    return names


def test_every_private_attribute_of_a_library_that_is_used_is_declared():
    """`obj._name` on anything but self/cls, and `from lib._private import ...`: each must be declared (and so
    version-checked) in transferlab.core.compat, or the code must use a public API instead."""
    declared, modules_declared = declared_private_names(), {i.module for i in compat.ALL}
    undeclared = []
    for file in SOURCE_FILES:
        for node in ast.walk(ast.parse(file.read_text())):
            where = f"{file.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    if node.attr not in declared | PUBLIC_BY_CONVENTION:
                        undeclared.append(f"{where}: {ast.unparse(node)}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for module in names:
                    if any(part.startswith("_") and not part.startswith("__") for part in module.split(".")) and module not in modules_declared:
                        undeclared.append(f"{where}: import {module}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(("hydra._", "lightning.")):
                if "._" in node.value and node.value not in modules_declared:
                    undeclared.append(f"{where}: {node.value!r}")
    assert not undeclared, undeclared
    assert {"_hydra_subprocess_cmd", "_launch_process_observer", "_get_root", "_fingerprint"} <= declared  # the scan sees them


# -- patched internals (transferlab.core.compat; docs/architecture.md lists them with their upstream issues) -------
@pytest.mark.parametrize("internal", compat.ALL, ids=[i.module for i in compat.ALL])
def test_patched_internals_have_the_shape_they_were_checked_against(internal):
    """Fails when an installed library renamed or reshaped an internal transferlab patches or reads. An optional
    extra's (datasets: `hf`) is checked where it is installed (the main CI venv), skipped where it is not (the floors')."""
    import tomllib

    core = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    if internal.installed_version() == "(not installed)" and not any(d.startswith(internal.distribution) for d in core):
        pytest.skip(f"{internal.distribution} is an optional extra, not installed here")
    assert internal.problem() is None, internal.problem()
    assert internal.installed_version() != "(not installed)"


def test_a_reshaped_internal_is_one_line_naming_the_library_and_its_version(monkeypatch):
    import lightning.fabric.strategies.launchers.subprocess_script as launcher
    import lightning.pytorch.strategies.launchers.subprocess_script as pytorch_launcher

    from transferlab.sweeps import ddp

    before = pytorch_launcher._hydra_subprocess_cmd
    monkeypatch.delattr(launcher, "_hydra_subprocess_cmd")
    with pytest.raises(IncompatibleLibrary) as info:
        ddp.install("transferlab.cli.train", spare_host=False)
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"lightning {compat.LIGHTNING_DDP_LAUNCH[0].installed_version()}: ")
    assert "_hydra_subprocess_cmd is gone" in line and "checked with lightning 2.6.0 - 2.6.6" in line and "pip install" in line
    assert pytorch_launcher._hydra_subprocess_cmd is before  # every internal is checked before any is patched


def test_a_changed_signature_is_reported_too(monkeypatch):
    import hydra._internal.utils as hydra_utils

    monkeypatch.setattr(hydra_utils, "run_and_report", lambda func, verbose: func())
    problem = compat.HYDRA_ERROR_REPORTING[0].problem()
    assert problem == "hydra._internal.utils.run_and_report now takes (func, verbose) instead of (func)"


def test_the_command_line_says_so_with_exit_code_1(tmp_path):
    """The CLI, started against a Hydra whose run_and_report is gone: one line, exit 1, before any work."""
    script = (
        "import sys, hydra._internal.utils as u; del u.run_and_report; sys.argv = ['transferlab-train', "
        f"'hydra.run.dir={tmp_path}']; from transferlab.train import main; main()"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env(), timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors[0].startswith("error: hydra-core ") and "run_and_report is gone" in errors[0]
    assert not (tmp_path / "config.yaml").exists()
