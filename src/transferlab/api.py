"""transferlab from Python (notebooks, scripts): the commands' own configs and code, so the CLI and the API cannot drift.

`train` and `evaluate` compose conf/ with Hydra's compose API and the same overrides the command line takes,
validate them and run the command's task in this process (`Command.run_in_process`); `load` gives a model
that labels PIL images or files, from a checkpoint or a model package.

    >>> from transferlab import api
    >>> result = api.train(["data=image_folder", "data.root=photos/", "trainer.max_epochs=5"])
    >>> result.metrics["test/acc"], result.metrics["test/acc_ci95"], result.best_checkpoint
    >>> model = api.load(result.best_checkpoint)          # or a package folder from transferlab-export
    >>> model.predict([PIL.Image.open("cat.jpg")])[0].label
    'cat'
    >>> api.load("models/species_tags").predict("cat_and_dog.jpg")[0].labels   # a multi-label model: the predicted set
    ['cat', 'dog']
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from PIL import Image, ImageOps

ImageInput = Union[Image.Image, str, Path]


@dataclass
class Result:
    """What a run left: its metrics.json (with intervals), its folder, its best checkpoint (None for eval)."""

    metrics: dict[str, Any]
    run_dir: Path
    best_checkpoint: Optional[Path] = None


@dataclass
class Prediction:
    """One image's answer. Single-label: `label` is the class, `prob` its probability, `top` the top-k classes and
    `labels` is `[label]`. Multi-label (`Model.multilabel`): `labels` is the predicted set, every label whose
    calibrated probability is at or over its threshold (class order; empty when none is), `label` / `prob` the most
    probable label whether or not it is in the set, `top` the top-k labels by their own (sigmoid) probability."""

    label: str
    prob: float
    top: list[tuple[str, float]] = field(default_factory=list)  # (label, probability), most probable first
    labels: list[str] = field(default_factory=list)  # the predicted set (single-label: [label])


def _run_dir(command: str, run_dir: Optional[Union[str, Path]], overrides: Sequence[str]) -> Path:
    """As Hydra names it: <paths.log_dir>/<command>/runs/<time> (a new folder; microseconds when one exists)."""
    if run_dir is not None:
        return Path(run_dir)
    log_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("paths.log_dir=")), "logs")
    now = datetime.datetime.now()
    folder = Path(log_dir) / command / "runs" / now.strftime("%Y-%m-%d_%H-%M-%S")
    return folder if not folder.exists() else folder.with_name(now.strftime("%Y-%m-%d_%H-%M-%S_%f"))


def _result(out: Path, ckpt: Optional[Path]) -> Result:
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    return Result(metrics=metrics, run_dir=out, best_checkpoint=ckpt if ckpt and ckpt.is_file() else None)


def train(overrides: Sequence[str] = (), run_dir: Optional[Union[str, Path]] = None) -> Result:
    """`transferlab-train <overrides>` in this process; errors are raised (ConfigError, DataError, ...), not printed.

    >>> api.train(["experiment=pets_lite0_frozen", "data.root=../shared/data/oxford-pets-sample"]).metrics["test/acc"]
    """
    from transferlab.cli.train import command

    out = _run_dir("train", run_dir, overrides)
    command.run_in_process(list(overrides), out)
    return _result(out, out / "checkpoints" / "best.ckpt")


def evaluate(ckpt_path: Union[str, Path], overrides: Sequence[str] = (), run_dir: Optional[Union[str, Path]] = None) -> Result:
    """`transferlab-eval ckpt_path=...`: the checkpoint (or package) on the split it was trained with, or on `data.root=...`.

    >>> api.evaluate(result.best_checkpoint).metrics["test/acc"]
    """
    from transferlab.cli.eval import command

    out = _run_dir("eval", run_dir, overrides)
    command.run_in_process([f"ckpt_path={ckpt_path}", *overrides], out)
    return _result(out, None)


def run(command: str, overrides: Sequence[str] = (), run_dir: Optional[Union[str, Path]] = None) -> Any:
    """Any command (`visualize`, `attack`, `explain`, `audit`, `export`, ...) in this process: its task's result.

    >>> api.run("attack", ["input=dog.jpg", "target=Siamese cat", "eps=1/255"])["target_prob"]
    """
    import importlib

    from transferlab.config.schema import COMMANDS

    if command not in COMMANDS or command == "report":
        raise ValueError(f"command={command!r}: use one of {', '.join(c for c in COMMANDS if c != 'report')}")
    out = _run_dir(command, run_dir, overrides)
    return importlib.import_module(f"transferlab.cli.{command}").command.run_in_process(list(overrides), out)


class Model:
    """A trained classifier with its preprocessing: `predict(images)` for PIL images or image files. `multilabel`:
    the model answers with a set of labels (a sigmoid and a threshold per label, `thresholds`), not one class."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.class_names: list[str] = list(predictor.class_names)
        self.metadata: dict[str, Any] = predictor.metadata
        self.multilabel: bool = bool(getattr(predictor, "multilabel", False))
        self.thresholds: dict[str, float] = dict(zip(self.class_names, predictor.thresholds)) if self.multilabel else {}
        prep = predictor.preprocessing
        self._transform, self._decode_size = prep.eval_transform(), prep.decode_size()

    def _tensor(self, image: ImageInput) -> torch.Tensor:
        from torchvision.transforms.v2.functional import pil_to_tensor

        from transferlab.data.images import decode_rgb, to_rgb

        if isinstance(image, Image.Image):
            return self._transform(pil_to_tensor(to_rgb(ImageOps.exif_transpose(image))))
        return self._transform(decode_rgb(Path(image).expanduser(), self._decode_size))

    def probabilities(self, images: Sequence[ImageInput], batch_size: int = 32) -> torch.Tensor:
        """[N, classes] calibrated probabilities, in the order of `images` (multi-label: each label's sigmoid)."""
        chunks = [
            self.predictor.probabilities(torch.stack([self._tensor(i) for i in images[s : s + batch_size]]))
            for s in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0, len(self.class_names))

    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], topk: int = 3) -> list[Prediction]:
        """One Prediction per image (a single image gives a list of one); a multi-label model's hold the predicted
        set in `labels` (see Prediction)."""
        batch = [images] if isinstance(images, (Image.Image, str, Path)) else list(images)
        k = max(1, min(topk, len(self.class_names)))
        probs = self.probabilities(batch)
        sets = self.predictor.label_sets(probs) if self.multilabel else None
        found = []
        for i, p in enumerate(probs):
            scores, top = p.topk(k)
            ranked = [(self.class_names[j], float(s)) for s, j in zip(scores, top.tolist())]
            chosen = sets[i] if sets is not None else [ranked[0][0]]
            found.append(Prediction(label=ranked[0][0], prob=ranked[0][1], top=ranked, labels=chosen))
        return found


def load(ckpt_or_package: Union[str, Path], runtime: str = "torch", device: str = "auto", precision: str = "auto", tta: str = "none") -> Model:
    """A checkpoint (`.ckpt`) or a model package folder (`transferlab-export`); `runtime="onnx"` needs a package.

    >>> model = api.load("models/pets")
    >>> [p.label for p in model.predict(["a.jpg", "b.jpg"])]
    """
    from omegaconf import OmegaConf

    from transferlab.config.paths import config_dir
    from transferlab.config.validation import check_arguments
    from transferlab.deploy.runtime import load_runtime

    check_arguments("predict", {"runtime": runtime, "device": device, "precision": precision, "tta": tta})  # as the config's
    predict = OmegaConf.load(Path(config_dir()) / "predict.yaml")  # the rest as transferlab-predict has them
    return Model(load_runtime(str(ckpt_or_package), runtime, device, precision, predict.channels_last, tta, predict.threads))


def predict(ckpt_or_package: Union[str, Path], images: Union[ImageInput, Sequence[ImageInput]], topk: int = 3) -> list[Prediction]:
    """`load(...).predict(images)` in one call (loads the model each time: keep `load`'s Model for many calls)."""
    return load(ckpt_or_package).predict(images, topk=topk)
