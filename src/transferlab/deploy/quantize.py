"""int8 for a model package: which of the run's images calibrate and check it, and onnxruntime's static quantisation.

Static quantisation fixes each activation's int8 range from the images it is shown, so those images decide how
good the int8 model is. They are a seeded sample of the run's **training** images (the split stored in the
checkpoint, a package's splits.csv), never val or test images: the check that follows runs on every other stored
image, and test figures stay untouched by anything the int8 model was fitted on. Images are read with the
checkpoint's own eval preprocessing, exactly what predict feeds the model. The images must still be where the run
found them (data.root, config.json's splits.root) or where `data_root` says they are now; without them there is
nothing honest to calibrate on, and the export stops with one line.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from transferlab.core.errors import DataError
from transferlab.data.images import decode_rgb
from transferlab.data.preprocessing import Preprocessing
from transferlab.data.splits import split_key

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8  # images per calibration pass (onnxruntime's MinMax keeps the running min / max, any batch works)
CHECK_BATCH = 32  # images decoded and run at once by the check over the run's images


@dataclass(frozen=True)
class Int8Settings:
    """conf/export.yaml's quantize=int8 keys: how many training images calibrate, the agreement the int8 model must
    reach, and where the run's images are now when they moved from data.root (None: where the run found them)."""

    calibration_images: int
    min_agreement: float
    data_root: Optional[str]


@dataclass(frozen=True)
class RunImages:
    """The run's stored images that are still there: the calibration sample (split-table paths, relative to `root`)
    and every other one with its split (what the int8 model is checked on)."""

    root: Path
    calibration: list[str]
    evaluation: list[tuple[str, str]]
    missing: int
    seed: int


def run_images(table: Optional[Mapping[str, Any]], settings: Int8Settings, seed: int) -> RunImages:
    """The calibration sample and the check images of a checkpoint's split table; one actionable line when the
    table or the images are gone. A stored file whose size changed is not the run's image any more: left out."""
    if not table:
        raise DataError(
            "quantize=int8: this checkpoint stores no split, so its training images are unknown and nothing can calibrate the int8 model; "
            "export with quantize=none, or retrain with this release"
        )
    root = Path(settings.data_root or table.get("root") or "").expanduser()
    rows = table["rows"]
    train = [row for row in rows if row[1] == "train"]
    where = "data_root" if settings.data_root else "data.root"
    if not str(root) or not root.is_dir():
        raise DataError(
            f"{where}: the run's images are gone ({root or 'no folder recorded'} does not exist); quantize=int8 calibrates on its "
            f"{len(train)} stored training images: restore them there, give data_root=<the folder they are in now>, or export with quantize=none"
        )
    present = [row for row in rows if _unchanged(root / row[0], int(row[2]))]
    usable_train = sorted(row[0] for row in present if row[1] == "train")
    if not usable_train:
        raise DataError(
            f"{where}: none of the run's {len(train)} stored training images is under {root} with its stored size; quantize=int8 "
            f"calibrates on them: restore them there, give data_root=<the folder they are in now>, or export with quantize=none"
        )
    calibration = sorted(random.Random(seed).sample(usable_train, min(settings.calibration_images, len(usable_train))))
    chosen = set(calibration)
    evaluation = [(row[0], row[1]) for row in present if row[0] not in chosen]
    if len(present) < len(rows):
        log.warning(
            "%d of the run's %d stored images are gone or changed under %s: left out of int8 calibration and check",
            len(rows) - len(present),
            len(rows),
            root,
        )
    if not evaluation:
        raise DataError(f"int8_calibration_images={settings.calibration_images}: no stored image is left to check the int8 model on; use fewer")
    return RunImages(root, calibration, evaluation, len(rows) - len(present), seed)


def _unchanged(file: Path, size: int) -> bool:
    try:
        return file.is_file() and (size < 0 or file.stat().st_size == size)
    except OSError:
        return False


def load_batch(root: Path, paths: Sequence[str], preprocessing: Preprocessing) -> torch.Tensor:
    """[N, 3, S, S] normalised images, decoded and transformed as predict does (reduced JPEG decode, eval transform)."""
    transform = preprocessing.eval_transform()
    return torch.stack([transform(decode_rgb(root / path, preprocessing.decode_size())) for path in paths])


def batches(root: Path, paths: Sequence[str], preprocessing: Preprocessing, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(paths), size):
        yield load_batch(root, paths[start : start + size], preprocessing)


def calibration_batches(images: RunImages, preprocessing: Preprocessing) -> list[torch.Tensor]:
    return list(batches(images.root, images.calibration, preprocessing, CALIBRATION_BATCH))


def true_labels(run_data: Mapping[str, Any], root: Path, class_names: Sequence[str]) -> Optional[dict[str, int]]:
    """{split-table path: class index} as the run's dataset labels its files today (its own discover(), no split
    and no scan), or None when the dataset cannot say (then the accuracies are null, the agreement still holds)."""
    from hydra.utils import instantiate

    try:
        datamodule = instantiate({**dict(run_data), "root": str(root)})
        found = datamodule.discover()
    except Exception as exc:  # noqa: BLE001 - any dataset's failure only costs the accuracy figures
        log.warning(
            "quantize=int8: the run's dataset could not label its files (%s): int8 and fp32 accuracy are not measured",
            " ".join(str(exc).split())[:200],
        )
        return None
    if list(found.class_names) != list(class_names):
        log.warning("quantize=int8: the data's classes %s differ from the model's: int8 and fp32 accuracy are not measured", found.class_names[:5])
        return None
    samples = [*found.samples, *(found.test_samples or [])]
    return {split_key(Path(path), root): int(label) for path, label in samples if isinstance(label, int)}


def quantize_onnx(fp32_file: Path, int8_file: Path, calibration: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Static int8 quantisation (QDQ, int8 weights per output channel, uint8 activations: the u8s8 kernels x86 runs
    fastest) calibrated with MinMax on `calibration` (normalised [N, 3, S, S] batches); onnxruntime's pre-processing
    (shape inference and graph optimisation, folded batch norms) first, so every convolution gets quantised."""
    from onnxruntime.quantization import CalibrationDataReader

    arrays = iter([x.detach().float().contiguous().numpy() for x in calibration])

    class Reader(CalibrationDataReader):  # one pass over the batches already in memory: all MinMax needs
        def get_next(self) -> Optional[dict[str, Any]]:
            array = next(arrays, None)
            return None if array is None else {"images": array}

    quiet = _RootInfo()
    logging.getLogger().addFilter(quiet)  # quantize_static logs a line per rescaled bias on the root logger: hundreds
    try:
        _quantize(fp32_file, int8_file, Reader())
    finally:
        logging.getLogger().removeFilter(quiet)
    return {
        "quantization": "static, onnxruntime quantize_static",
        "format": "QDQ",
        "weights": "int8, per output channel",
        "activations": "uint8, per tensor",
        "calibration_method": "MinMax",
        "calibration_images": sum(len(x) for x in calibration),
    }


class _RootInfo(logging.Filter):
    """Drops INFO and below logged straight on the root logger (onnxruntime.quantization's notices); transferlab's
    own loggers are named, and warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root" or record.levelno >= logging.WARNING


def _quantize(fp32_file: Path, int8_file: Path, reader: Any) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=int8_file.parent) as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32_file), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_file),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


def write_calibration_list(file: Path, images: RunImages) -> None:
    """int8_calibration.txt: one split-table path per line, exactly as splits.csv has it."""
    file.write_text("".join(f"{path}\n" for path in images.calibration))
