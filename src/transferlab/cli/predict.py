"""transferlab-predict: label image files with a checkpoint or model package; a file that cannot be used gets a row with its reason.

Given a folder, every non-hidden file in it gets exactly one row: the unreadable, the non-images and the
refused (decompression bombs) with their reason, so nothing is silently left out.

Columns: a single-label model's `path,label,score,error,top1_label,top1_score,...` (top-k); a multi-label model's
`path,labels,error,prob_<label>...`, where `labels` is the predicted set (each label whose calibrated probability
is at or over its threshold, `;`-joined, blank for none) and every label's probability follows (topk unused).
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from transferlab.cli.app import Command
from transferlab.core.errors import DataError
from transferlab.core.hardware import default_workers
from transferlab.core.progress import progress
from transferlab.data.images import decode_rgb, describe_failure, list_files
from transferlab.data.labels import SEPARATOR
from transferlab.deploy.runtime import Predictor, load_runtime

log = logging.getLogger(__name__)


class _Files(Dataset):
    """Yields (index, image tensor or None, error or '')."""

    def __init__(self, files: list[Path], transform: Any, size: int, decode_size: int) -> None:
        self.files, self.transform, self.size, self.decode_size = files, transform, size, decode_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        try:
            return i, self.transform(decode_rgb(self.files[i], self.decode_size)), ""
        except Exception as exc:  # noqa: BLE001 - each failure becomes that row's error
            return i, torch.zeros(3, self.size, self.size), describe_failure(exc, self.files[i])


def collect_inputs(input_path: str) -> list[Path]:
    path = Path(input_path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return list_files(path)
    raise DataError(f"input: {path} is neither a file nor a folder")


def header(predictor: Predictor, k: int) -> list[str]:
    if predictor.multilabel:
        return ["path", "labels", "error", *(f"prob_{name}" for name in predictor.class_names)]
    return ["path", "label", "score", "error"] + [f"top{j}_{kind}" for j in range(1, k + 1) for kind in ("label", "score")]


def rows(predictor: Predictor, k: int, paths: list[str], errors: list[str], probs: torch.Tensor) -> list[list[str]]:
    """The CSV rows of one batch (header's columns); a file that could not be used gets blanks and its reason."""
    names = predictor.class_names
    found: list[list[str]] = []
    if predictor.multilabel:
        sets = predictor.label_sets(probs)
        for path, err, chosen, p in zip(paths, errors, sets, probs.tolist()):
            found.append(([path, "", err] + [""] * len(names)) if err else [path, SEPARATOR.join(chosen), "", *(f"{v:.6f}" for v in p)])
        return found
    scores, labels = probs.topk(k, dim=-1)
    for path, err, s, top in zip(paths, errors, scores.tolist(), labels.tolist()):
        if err:
            found.append([path, "", "", err] + [""] * (2 * k))
            continue
        ranked = [v for j in range(k) for v in (names[top[j]], f"{s[j]:.6f}")]
        found.append([path, names[top[0]], f"{s[0]:.6f}", ""] + ranked)
    return found


def predict(cfg: DictConfig) -> dict[str, Any]:
    """One CSV row per input file: top-k labels and scores (multi-label: the predicted set and every label's
    probability), or the reason the file could not be used; returns how many were labelled and how fast (the
    labelling loop: decode, transform, forward, CSV)."""
    predictor = load_runtime(str(cfg.ckpt_path), cfg.runtime, cfg.device, cfg.precision, cfg.channels_last, cfg.tta, cfg.threads)
    files = collect_inputs(cfg.input)
    if not files:
        raise DataError(f"input: no files under {cfg.input}; give an image file or a folder of images")
    prep = predictor.preprocessing
    gpu = predictor.settings["device"].startswith("cuda")
    workers = default_workers(gpu=gpu) if str(cfg.num_workers) == "auto" else int(cfg.num_workers)
    loader = DataLoader(
        _Files(files, prep.eval_transform(), prep.input_size, prep.decode_size()),
        batch_size=cfg.batch_size,
        num_workers=workers,
        pin_memory=gpu,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    k = min(cfg.topk, len(predictor.class_names))  # topk >= 1: the schema's range
    output = Path(cfg.output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    rows_ok, started = 0, time.perf_counter()
    with open(output, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header(predictor, k))
        for indices, images, errors in progress(loader, len(files), "Labelling images", size=lambda batch: len(batch[0])):
            writer.writerows(rows(predictor, k, [str(files[i]) for i in indices.tolist()], list(errors), predictor.probabilities(images)))
            rows_ok += sum(1 for err in errors if not err)
    seconds = time.perf_counter() - started
    log.info(
        "Wrote %s: %d image(s) labelled, %d not usable (their reason is in the error column); %.1f s, %.1f img/s with %d worker(s)",
        output,
        rows_ok,
        len(files) - rows_ok,
        seconds,
        len(files) / max(seconds, 1e-9),
        workers,
    )
    return {
        "output": str(output),
        "images": len(files),
        "labelled": rows_ok,
        "seconds": seconds,
        "images_per_second": len(files) / max(seconds, 1e-9),
    }


command = Command("predict", predict)
main = command.main


if __name__ == "__main__":
    main()
