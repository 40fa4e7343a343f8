"""The third-party internals transferlab patches, each declared once with the versions it was checked against.

Hydra and Lightning offer no public hook for three things transferlab needs (docs/architecture.md, "Patches",
names the upstream issues). Each patch asks `Internal.resolve()` for the module it changes; a release that renamed
or reshaped the internal then stops the command with one line naming the library, its version and what to do
(exit code 1: the installation, not the input), instead of an AttributeError at start-up or a silently
unpatched run. tests/test_architecture.py checks every declaration against the installed libraries.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

from transferlab.core.errors import IncompatibleLibrary


@dataclass(frozen=True)
class Internal:
    distribution: str  # the pip name of the library, e.g. "hydra-core"
    module: str  # where the internal lives
    parameters: dict[str, tuple[str, ...]]  # attribute (dotted for methods) -> its parameters as checked (more only if optional)
    checked: str  # the releases it was checked against
    purpose: str  # what transferlab does with it, for the error line
    attributes: tuple[str, ...] = field(default=())  # further attributes that must exist (classes, methods)
    instance_attributes: tuple[str, ...] = field(default=())  # set on instances, so not checkable here; declared for the tests

    def installed_version(self) -> str:
        try:
            return version(self.distribution)
        except PackageNotFoundError:
            return "(not installed)"

    def problem(self) -> str | None:
        """What no longer matches, or None."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            return f"{self.module} cannot be imported ({exc})"
        for dotted in (*self.parameters, *self.attributes):
            target: object = module
            for part in dotted.split("."):
                if not hasattr(target, part):
                    return f"{self.module}.{dotted} is gone"
                target = getattr(target, part)
            wanted = self.parameters.get(dotted)
            if wanted is None:
                continue
            try:
                params = [p for p in inspect.signature(target).parameters.values() if p.name != "self"]  # type: ignore[arg-type]
            except (TypeError, ValueError):
                return f"{self.module}.{dotted} is no longer a function"
            names = [p.name for p in params]
            # The checked parameters first; anything added after them must be optional (it is called the old way).
            added = [p for p in params[len(wanted) :] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            if tuple(names[: len(wanted)]) != wanted or added:
                return f"{self.module}.{dotted} now takes ({', '.join(names)}) instead of ({', '.join(wanted)})"
        return None

    def resolve(self) -> ModuleType:
        """The module to patch, or IncompatibleLibrary with one line saying what changed and what to do."""
        problem = self.problem()
        if problem:
            raise IncompatibleLibrary(
                f"{self.distribution} {self.installed_version()}: {problem}; transferlab patches it to {self.purpose} and was "
                f"checked with {self.distribution} {self.checked}. Install one of those ('pip install \"{self.distribution}"
                f"=={self.checked.split()[-1]}\"') or a transferlab release that supports {self.installed_version()}"
            )
        return importlib.import_module(self.module)


HYDRA_ERROR_REPORTING = (
    Internal(
        "hydra-core",
        "hydra._internal.utils",
        {"run_and_report": ("func",)},
        "1.3.2 - 1.3.8",
        "print configuration errors in one line with exit code 2",
    ),
    Internal(
        "hydra-core",
        "hydra._internal.hydra",
        {"run_and_report": ("func",)},
        "1.3.2 - 1.3.8",
        "print configuration errors in one line with exit code 2",
    ),
)

_LAUNCHER_PURPOSE = "start the DDP ranks of a Hydra job in that job's folder and keep a failed rank from killing a sweep"
LIGHTNING_DDP_LAUNCH = (
    Internal(
        "lightning",
        "lightning.fabric.strategies.launchers.subprocess_script",
        {"_hydra_subprocess_cmd": ("local_rank",), "_launch_process_observer": ("child_processes",)},
        "2.6.0 - 2.6.6",
        _LAUNCHER_PURPOSE,
    ),
    Internal(
        "lightning",
        "lightning.pytorch.strategies.launchers.subprocess_script",
        {"_hydra_subprocess_cmd": ("local_rank",), "_launch_process_observer": ("child_processes",)},
        "2.6.0 - 2.6.6",
        _LAUNCHER_PURPOSE,
    ),
)

# Read, not patched: private attributes whose public equivalent does not exist.
READ_ONLY = (
    Internal(
        "omegaconf",
        "omegaconf.base",
        {"Node._get_root": ()},
        "2.3.0",
        "find close matches for a mistyped key anywhere in the config (cli.hydra_errors)",
    ),
    Internal(
        "datasets",
        "datasets.fingerprint",
        {"generate_fingerprint": ("dataset",)},
        "2.16.0 - 4.x",
        "name the on-disk copy of a Hugging Face dataset by the content fingerprint it carries as `Dataset._fingerprint` "
        "(set from generate_fingerprint; data.hf_dataset)",
        instance_attributes=("Dataset._fingerprint",),
    ),
)

ALL = (*HYDRA_ERROR_REPORTING, *LIGHTNING_DDP_LAUNCH, *READ_ONLY)
