"""Shared test helpers: the real photos in ../shared, small image trees made from them, the commands run in this
process (`run`: Hydra's compose API, the same validation and task as the CLI) or as a real subprocess (`run_cli`,
for what is about the process: exit codes, DDP, kills, sweeps, launchers)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFERLAB_SHARED", REPO.parent / "shared")) / "data"
PETS = SHARED / "oxford-pets-sample"
SEED_IMAGES = SHARED / "seed-images"


def pytest_configure(config: pytest.Config) -> None:
    """Compile transferlab (and the test helpers the CLI subprocesses import) once: with PYTHONDONTWRITEBYTECODE set,
    each of the suite's many `python -m transferlab...` processes would otherwise compile every module again."""
    import compileall

    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # the controlling process did it
    for folder in (REPO / "src", REPO / "tests"):
        compileall.compile_dir(str(folder), quiet=2, workers=1)


def require_shared() -> None:
    """Skip a test that reads the shared photos when they are missing (fail instead under .ci/run)."""
    if not PETS.is_dir():
        message = f"the shared photos are missing: expected {PETS} (set TRANSFERLAB_SHARED=<path to shared>)"
        if os.environ.get("TRANSFERLAB_REQUIRE_SHARED"):
            pytest.fail(message)
        pytest.skip(message)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("shared"):
        require_shared()


# Worker seconds per test module, from `pytest --durations=70` on 2026-12-07 (a busy 2-core machine: only the
# relative sizes matter). A module not listed counts 2 s per test. Refresh it when a module grows by minutes.
MODULE_SECONDS = {
    "test_sweeps.py": 590,
    "test_crash_safety.py": 500,
    "test_insight.py": 375,
    "test_slurm.py": 300,
    "test_train_e2e.py": 225,
    "test_distill.py": 90,
    "test_evaluation.py": 185,
    "test_export.py": 185,
    "test_performance.py": 165,
    "test_api.py": 165,
    "test_optuna_parallel.py": 155,
    "test_rank.py": 155,
    "test_ray.py": 150,
    "test_mlflow.py": 145,
    "test_multilabel.py": 145,
    "test_presets.py": 130,
    "test_notebook.py": 125,
    "test_int8.py": 120,
    "test_audit.py": 100,
    "test_feature_cache.py": 100,
    "test_few_shot.py": 100,
    "test_security.py": 100,
    "test_serve_exposed.py": 75,
    "test_few_shot_heads.py": 70,
    "test_serve.py": 60,
    "test_config_errors.py": 60,
    "test_configs.py": 60,
    "test_backbones.py": 60,
    "test_token_backbones.py": 60,
    "test_config_schema.py": 40,  # 150 quick checks
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first (longest-processing-time-first scheduling): pytest-xdist (`-n auto --dist loadscope
    --no-loadscope-reorder`, pyproject's addopts) hands out whole modules in the order they first appear, so no
    worker starts a five-minute module while the other has nothing left to do. (xdist's own reordering sorts by the
    number of tests, which puts one-test modules such as the notebook's last.)"""
    tests_per_module = Counter(module_file(item) for item in items)

    def cost(item: pytest.Item) -> float:
        name = module_file(item)
        return MODULE_SECONDS.get(name, 2.0 * tests_per_module[name])

    items.sort(key=lambda item: (-cost(item), module_file(item)))  # stable: each module's own order stays


def module_file(item: pytest.Item) -> str:
    """The test module's file name: xdist's loadscope unit (the part of the node id before the first ::)."""
    return Path(item.nodeid.split("::")[0]).name


# Under pytest-xdist every worker (and the commands it starts) gets its share of the cores, not all of them: two
# workers each running torch on every core make the cores wait for each other (measured: the suite took longer).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Small and fast for the mechanics tests: 64 px inputs instead of 224.
FAST = ["backbone.input_size=64", "data.num_workers=0", "data.batch_size=8", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false"]


def deterministic_run(epochs: int) -> list[str]:
    """Full fine-tuning with augmentation, dropout and a DataLoader worker, deterministic: every source of randomness
    in play, so a resumed run (a kill, a SLURM requeue) must reproduce the uninterrupted one exactly."""
    return [
        "data=image_folder",
        "finetune=full",
        "finetune.head_dropout=0.2",
        "trainer.deterministic=true",
        "trainer.precision=32-true",
        f"trainer.max_epochs={epochs}",
        "optimizer.lr=3e-3",
        "seed=7",
        *FAST,
        "data.batch_size=2",
        "data.num_workers=1",
    ]


# The real 224 px pipeline on the shared sample, bf16 for speed.
PETS_ARGS = [
    f"data.root={PETS}",
    "backbone=tf_efficientnet_lite0",
    "finetune=frozen",
    "finetune.head_solver=sgd",  # the head trained by epochs (learning rates, curves, resuming); the L-BFGS probe has its own tests
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.precision=bf16-mixed",
]


def pet_photos(prefix_cat: bool, n: int) -> list[Path]:
    """n photos of cats (capitalised breeds) or dogs from the shared sample, spread over breeds."""
    require_shared()
    files = sorted(p for p in PETS.glob("*.jpg") if p.name[0].isupper() == prefix_cat)
    return files[:: max(1, len(files) // n)][:n]


def make_small_copy(src: Path, dst: Path, size: int = 96) -> None:
    """A downscaled JPEG copy (tests never ship the shared photos; they derive fixtures from them)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as img:
        img = img.convert("RGB")
        img.thumbnail((size, size))
        img.save(dst, quality=90)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """image_folder layout: cat/ and dog/, 8 small photos each."""
    require_shared()
    root = tmp_path_factory.mktemp("tiny") / "images"
    for label, is_cat in (("cat", True), ("dog", False)):
        for src in pet_photos(is_cat, 8):
            make_small_copy(src, root / label / src.name)
    return root


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    cache = session_root(tmp_path_factory) / "cache"  # one per test session, shared by its workers (caches are safe to share)
    monkeypatch.setenv("TRANSFERLAB_CACHE_DIR", str(cache))
    monkeypatch.setenv("TRANSFERLAB_DATA_DIR", str(tmp_path_factory.getbasetemp() / "data"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment CLI subprocesses get; the tests folder is importable (fault-injection callbacks)."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": os.environ.get("HYDRA_FULL_ERROR_TESTS", "0"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])),
        **extra,
    }


def run(command: str, *overrides: str) -> Any:
    """`transferlab-<command> overrides...` in this process: the command's config composed from conf/ with Hydra's
    compose API, validated and run exactly as the CLI does (errors are raised, not printed); `hydra.run.dir=<dir>`
    is the run folder. Process-wide state a run changes (deterministic mode, environment, Hydra's config) is
    restored afterwards, so runs do not leak into each other."""
    import importlib

    from hydra.core.hydra_config import HydraConfig

    out = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), None)
    assert out is not None, "give hydra.run.dir=<run folder>"
    rest = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    environ, deterministic = dict(os.environ), torch.are_deterministic_algorithms_enabled()
    try:
        return importlib.import_module(f"transferlab.cli.{command}").command.run_in_process(rest, out)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        os.environ.clear()
        os.environ.update(environ)
        HydraConfig.instance().cfg = None  # type: ignore[assignment]


def make_datamodule(option: str, **values: Any) -> Any:
    """A datamodule as `data=<option>` builds it (conf/data/<option>.yaml), with `values` replacing its keys."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from transferlab.config.paths import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={option}", "paths.output_dir=unused"])
    data = {**OmegaConf.to_container(cfg.data, resolve=True), **values}
    return instantiate(OmegaConf.create(data))


def run_cli(
    module: str,
    *overrides: str,
    cwd: Path | None = None,
    timeout: int = 900,
    check: bool = True,
    prefix: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python -m transferlab.<module> overrides...` as a user runs it (`prefix`: e.g. a privilege-dropping wrapper)."""
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", f"transferlab.{module}", *overrides],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"transferlab.{module} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


# Many commands' real `main()` in one process (one import of torch instead of one per case): argv as a shell gives
# it, SystemExit's code (the process's exit code), everything written to stdout/stderr.
MAINS_DRIVER = """
import contextlib, importlib, io, json, sys
result_file, calls, results = sys.argv[1], json.loads(sys.argv[2]), []
for command, argv in calls:
    sys.argv = [f"transferlab-{command}", *argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            importlib.import_module(f"transferlab.{command}").main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # an escaped exception is a failure of the case, shown with its traceback
            import traceback
            traceback.print_exc(file=err)
            code = "raised"
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
open(result_file, "w").write(json.dumps(results))
"""


def run_mains(
    calls: list[tuple[str, list[str]]], workdir: Path, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """[(command, argv)] through `transferlab.<command>.main()` in one fresh process: [{code, stdout, stderr}].
    `prefix`: e.g. a privilege-dropping wrapper for that process."""
    workdir.mkdir(parents=True, exist_ok=True)
    result_file = workdir / "results.json"
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", MAINS_DRIVER, str(result_file), json.dumps(calls)],
        timeout=900,
        capture_output=True,
        text=True,
        env=env or cli_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(result_file.read_text())


def corrupt_copy_tree(folder: Path) -> list[Path]:
    """Inject what the real Cats-vs-Dogs archive holds: a zero-byte, a truncated and a text-named-.jpg file."""
    cat, dog = folder / "Cat", folder / "Dog"
    empty, truncated, text = cat / "666.jpg", dog / "11702.jpg", dog / "readme.jpg"
    good = next(cat.glob("*.jpg")).read_bytes()
    empty.write_bytes(b"")
    truncated.write_bytes(good[: len(good) // 2])
    text.write_text("not an image")
    return [empty, truncated, text]


@pytest.fixture()
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def read_splits(run_dir: Path) -> dict[str, str]:
    """{path relative to data.root: split} of a run's (or package's) splits.csv, whose columns it checks."""
    import csv

    with open(run_dir / "splits.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["path", "split", "size", "sha256"]
        return {row["path"]: row["split"] for row in reader}


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This test session's temporary folder, the same for all its pytest-xdist workers (each has its own below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


# The species run the suite shares (and the DDP test repeats with two processes): it must match to the image.
SPECIES_RUN = [
    "data=oxford_pets",
    "finetune.head_solver=sgd",
    "data.task=species",
    "data.class_weights=balanced",
    "trainer.max_epochs=4",
    "optimizer.lr=3e-3",
    "seed=1",
    *PETS_ARGS,
]


@pytest.fixture(scope="session")
def species_run(tmp_path_factory) -> Path:
    """Cats vs dogs on the shared sample (bundled Lite0, frozen, 4 epochs): one run shared by several tests, trained
    once per session (the first worker to need it trains, the others wait for it and reuse it)."""
    from filelock import FileLock

    require_shared()
    root = session_root(tmp_path_factory)
    out = root / "species"
    with FileLock(str(root / "species.lock")):
        if not (out / "metrics.json").is_file():
            run("train", *SPECIES_RUN, f"hydra.run.dir={out}")
    return out


def read_wandb_log(path: Path) -> list:
    """Records of a W&B transaction log (.wandb: LevelDB-style 32 KiB blocks of protobuf `Record`s)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


needs_browser = pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists() and not os.environ.get("TRANSFERLAB_REQUIRE_BROWSER"),
    reason="Debian chromium + chromium-driver not installed (.ci/run installs them; CI never skips this)",
)


@contextlib.contextmanager
def chromium_driver(*flags: str) -> Iterator[Any]:
    """Headless Debian Chromium through selenium, with the flags this closed network needs (and `flags`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
        "--window-size=1280,1600",
        *flags,
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def chromium_render(page: Path, screenshot: Path) -> tuple[list[dict], list[int]]:
    """Open `page` in headless Chromium: (console messages, naturalWidth of every image)."""
    with chromium_driver() as driver:
        driver.get(page.resolve().as_uri())
        widths = driver.execute_script("return Array.from(document.images, i => i.complete ? i.naturalWidth : -1)")
        driver.save_screenshot(str(screenshot))
        return driver.get_log("browser"), widths


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the servers the tests start: ours, MLflow, torchrun)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120, verify: Any = True) -> None:
    """Until `url` answers 200 (a server the test started as `proc`, writing to `log`); fails with its log's tail.
    `verify`: httpx's (a CA file or SSL context for a server with a certificate the test made)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s: {log.read_text()[-3000:]}")


# The multi-label runs the suite shares: canvases of 1 to 3 shared photos (tests/canvases.py), labelled with the
# species (and, second task, the breeds) they hold; frozen bundled Lite0 + the one-vs-rest probe.
CANVAS_RUN = [
    "data=image_index",
    "data.task=multilabel",
    "backbone=tf_efficientnet_lite0",
    "finetune=frozen",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "seed=1",
]


@pytest.fixture(scope="session")
def canvas_runs(tmp_path_factory) -> dict[str, Path]:
    """{"canvases": the canvas folder, "species" / "breeds": the two runs, "two_animals": a held-out cat beside a
    held-out dog}: built and trained once per session (the first worker to need them; the others wait and reuse)."""
    from filelock import FileLock

    from canvases import write_canvases, write_two_animal_canvas

    require_shared()
    root = session_root(tmp_path_factory)
    found = {"canvases": root / "canvases", "two_animals": root / "canvases" / "two_animals.jpg"}
    with FileLock(str(root / "canvases.lock")):
        for task in ("species", "breeds"):
            found[task] = out = root / f"canvas_{task}"
            if not (out / "metrics.json").is_file():
                index = write_canvases(found["canvases"], seed=0, task=task)
                run("train", *CANVAS_RUN, f"data.root={found['canvases']}", f"data.index={index}", f"hydra.run.dir={out}")
        if not found["two_animals"].is_file():
            write_two_animal_canvas(found["two_animals"], seed=0)
    return found


@pytest.fixture(scope="session")
def species_package(species_run, tmp_path_factory) -> Path:
    """The species run's best checkpoint exported as a model package (format=all), once per test session."""
    from filelock import FileLock

    root = session_root(tmp_path_factory)
    out = root / "species_package"
    with FileLock(str(root / "species_package.lock")):
        if not (out / "config.json").is_file():
            run("export", f"ckpt_path={species_run / 'checkpoints' / 'best.ckpt'}", f"output={out}", f"hydra.run.dir={root / 'export_run'}")
    return out


def start_server(
    ckpt: Path, log: Path, *overrides: str, env: Optional[dict[str, str]] = None, scheme: str = "http", verify: Any = True
) -> tuple[subprocess.Popen, str]:
    """`python -m transferlab.serve` on a free loopback port, its output in `log`; (process, base URL) once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "transferlab.serve", f"ckpt_path={ckpt}", f"port={port}", f"hydra.run.dir={log.parent}", *overrides]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=cli_env(**(env or {})))
    url = f"{scheme}://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", proc, log, verify=verify)
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
