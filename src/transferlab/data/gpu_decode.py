"""data.decode=gpu: the loader workers only read each JPEG's bytes; decoding and the backbone's preprocessing run
on the training device, after the batch is transferred.

Why: a fast GPU trains ResNet-50 faster than a few CPU cores can decode and resize JPEGs. With decode=gpu the
workers read bytes (and the header, for the format and the EXIF orientation), torchvision's batched
`decode_jpeg(device=...)` (nvjpeg on CUDA) decodes the batch, and the same transform the CPU path applies (the
backbone's eval transform, or its train transform with the augmentation) runs per image on the device; the
final scaling and normalisation run once on the stacked batch. The hooks sit on the datamodule
(`on_after_batch_transfer`), so the model's code is the same for both settings. "gpu" means the training
device: on a CPU run the same code decodes on the CPU, in the main process (what the tests exercise).

Files the device decoder cannot take are decoded by the worker as before (`images.decode_rgb`) and travel as
3-D uint8 tensors; the batch function only decodes the 1-D (encoded) ones. That covers non-JPEG files, CMYK
and YCCK JPEGs, anything decode_jpeg refuses at batch time (then decoded on the CPU from the same bytes), and
images already in the decoded-image cache (data.image_cache). The CUDA decoder ignores EXIF orientation, so
the worker reads it from the header and it is applied on the device (flips and transposes).

The CPU path's reduced decoding of large JPEGs (Pillow's `draft`) has no counterpart here: the device decodes
at full size and resizes with antialiasing, so for photos over twice the decode size the pixels differ a little.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from transferlab.data.images import ImageDataset, decode_rgb, open_image
from transferlab.data.preprocessing import Preprocessing

DECODE_CHOICES = ("cpu", "gpu")
_DEVICE_MODES = ("RGB", "L")  # JPEG colour modes decode_jpeg converts to RGB (CMYK / YCCK: the CPU path, Pillow)
_ORIENTATION_TAG = 0x0112

# EXIF orientation -> what turns the stored pixels upright (C, H, W tensors), as PIL.ImageOps.exif_transpose does.
_UPRIGHT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda t: t.flip(-1),
    3: lambda t: t.flip(-2, -1),
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-2, -1),
    6: lambda t: t.transpose(-2, -1).flip(-1),
    7: lambda t: t.transpose(-2, -1).flip(-2, -1),
    8: lambda t: t.transpose(-2, -1).flip(-2),
}


class EncodedItem(NamedTuple):
    """One image for the device: JPEG bytes (1-D uint8) or a CPU-decoded image (3-D uint8), its label, its
    EXIF orientation (1 = upright; only meaningful for bytes)."""

    image: torch.Tensor
    label: Any  # a class index, or a multi-hot vector (data.labels.target)
    orientation: int = 1


class EncodedBatch(NamedTuple):
    """A collated batch before decoding: images as a list (bytes have different lengths, decoded images sizes)."""

    images: list[torch.Tensor]
    labels: torch.Tensor
    orientations: list[int]
    train: bool  # which transform to apply on the device: the train (augmented) or the eval one


def orientation_of(img: Image.Image) -> int:
    """The EXIF orientation in an opened image's header (1 when absent or out of range)."""
    value = img.getexif().get(_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """The image as EXIF orientation `orientation` says it should be shown."""
    turn = _UPRIGHT.get(orientation)
    return turn(image) if turn is not None else image


def collate_encoded(items: Sequence[EncodedItem], train: bool = False) -> EncodedBatch:
    """Keep the variable-length tensors as a list (the default collate would try to stack them)."""
    return EncodedBatch(
        images=[item.image for item in items],
        labels=torch.stack([torch.as_tensor(item.label) for item in items]) if items else torch.zeros(0, dtype=torch.long),
        orientations=[item.orientation for item in items],
        train=train,
    )


class EncodedImageDataset(Dataset):
    """What the loader workers do with decode=gpu: read the bytes of a JPEG the device can decode, else decode
    the file here (ImageDataset.decode, the CPU path); images from the decoded-image cache pass through."""

    def __init__(self, images: ImageDataset, train: bool) -> None:
        self.images, self.train = images, train
        self.collate = functools.partial(collate_encoded, train=train)  # ImageClassificationDataModule.loader's collate_fn

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> EncodedItem:
        label = self.images.target(index)
        if self.images.decoded is not None:
            return EncodedItem(self.images.decoded[index], label)
        path = self.images.samples[index][0]
        try:
            with open_image(path) as img:  # the header only: format, colour mode, orientation
                if img.format == "JPEG" and img.mode in _DEVICE_MODES:
                    orientation = orientation_of(img)
                    return EncodedItem(torch.from_numpy(np.fromfile(path, dtype=np.uint8)), label, orientation)
        except Exception:  # noqa: BLE001 - ImageDataset.decode below says what is wrong with the file
            pass
        return EncodedItem(self.images.decode(index), label)


def split_transform(transform: v2.Compose) -> tuple[v2.Compose, v2.Compose]:
    """(per-image steps, batch steps): the trailing ToDtype / Normalize are elementwise, so they run once on the
    stacked batch (the same values, a few kernel launches instead of a few per image)."""
    steps = list(transform.transforms)
    cut = len(steps)
    while cut > 0 and isinstance(steps[cut - 1], (v2.ToDtype, v2.Normalize)):
        cut -= 1
    return v2.Compose(steps[:cut]), v2.Compose(steps[cut:])


def _decode_one(data: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, bool]:
    """(image, already upright): decode_jpeg on the device, or the CPU path (Pillow, orientation applied) when it refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device), False
    except Exception:  # noqa: BLE001 - what nvjpeg / libjpeg-turbo refuse, Pillow decodes (the integrity scan passed it)
        return decode_rgb(data.numpy().tobytes()).to(device, non_blocking=True), True


def decode_jpegs(encoded: Sequence[torch.Tensor], device: torch.device) -> list[tuple[torch.Tensor, bool]]:
    """[(uint8 [3, H, W] image on `device`, already upright)]: one batched decode_jpeg call; when it fails (the
    CUDA decoder returns nothing if one image fails), one call per image, falling back to the CPU per image."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not encoded:
        return []
    data = [t.cpu() for t in encoded]  # decode_jpeg reads from host memory on every device
    try:
        return [(image, False) for image in decode_jpeg(data, mode=ImageReadMode.RGB, device=device)]
    except Exception:  # noqa: BLE001 - decided per image below
        return [_decode_one(t, device) for t in data]


def decode_batch(
    images: Sequence[torch.Tensor],
    device: Union[torch.device, str],
    transform: v2.Compose,
    orientations: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """The float [N, 3, H, W] batch on `device`: 1-D uint8 tensors (JPEG bytes) decoded there in one batched call,
    3-D uint8 tensors (decoded on the CPU) moved there, EXIF orientation applied (read from the bytes when
    `orientations` is not given), then `transform` (an eval or train transform of Preprocessing) per image."""
    device = torch.device(device)
    if orientations is None:
        orientations = [_orientation_of_bytes(t) if t.ndim == 1 else 1 for t in images]
    encoded = [i for i, t in enumerate(images) if t.ndim == 1]
    upright_images: list[torch.Tensor] = [t if t.ndim == 1 else t.to(device, non_blocking=True) for t in images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders (for TorchCodec) on every call
        decoded = decode_jpegs([images[i] for i in encoded], device)
    for i, (image, done) in zip(encoded, decoded):
        upright_images[i] = image if done else upright(image, orientations[i])
    per_image, batched = split_transform(transform)
    return batched(torch.stack([per_image(image) for image in upright_images]))


def _orientation_of_bytes(data: torch.Tensor) -> int:
    try:
        with open_image(data.cpu().numpy().tobytes()) as img:
            return orientation_of(img)
    except Exception:  # noqa: BLE001 - not an image Pillow reads: decoding decides
        return 1


class DeviceDecoding(pl.LightningDataModule):
    """The batch hooks behind data.decode=gpu, for ImageClassificationDataModule (which sets the attributes)."""

    preprocessing: Optional[Preprocessing]
    augment: dict[str, Any]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Encoded batches: only the labels move (decode_jpeg reads the bytes from host memory, pinned when the
        loader pins); everything else as Lightning moves it."""
        if isinstance(batch, EncodedBatch):
            return batch._replace(labels=batch.labels.to(device, non_blocking=True))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Encoded batches become (images, labels) on the labels' device, as the model expects them."""
        if not isinstance(batch, EncodedBatch):
            return batch
        if self.preprocessing is None:
            raise RuntimeError("datamodule.preprocessing must be set (from the backbone) before batches are decoded")
        prep = self.preprocessing
        transform = prep.train_transform(self.augment) if batch.train else prep.eval_transform()
        return decode_batch(batch.images, batch.labels.device, transform, batch.orientations), batch.labels
