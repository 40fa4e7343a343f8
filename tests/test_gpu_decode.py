"""data.decode=gpu on the CPU: the device path (bytes in the workers, batched decode_jpeg and the transform after
the transfer) gives the CPU path's tensors, for JPEGs, oriented JPEGs, grey JPEGs, CMYK JPEGs and PNGs, through
the datamodule's hooks and in a real fine-tuning run. (On CUDA, nvjpeg's decode differs by a few grey levels from
libjpeg-turbo's; that is measured by scripts/gpu_profile.py on a GPU machine, not here.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import FAST, PETS, make_datamodule, read_metrics, require_shared, run
from transferlab.core.errors import ConfigError
from transferlab.data import gpu_decode
from transferlab.data.gpu_decode import EncodedBatch, EncodedImageDataset, collate_encoded, decode_batch
from transferlab.data.images import ImageDataset
from transferlab.data.preprocessing import Preprocessing

PREP = Preprocessing()  # the 224 px ImageNet pipeline: resize 256, centre crop 224
# On the CPU both paths run the same libjpeg-turbo decode and the same uint8 resize: measured identical (0 grey
# levels on every image here). One grey level of slack, in normalised units, for other CPUs' SIMD paths.
GREY = 1 / 255 / min(PREP.std)


def small_photos(n: int) -> list[Path]:
    """Shared photos the CPU path decodes at full size (short side under twice the decode size: no draft)."""
    require_shared()
    found = []
    for path in sorted(PETS.glob("*.jpg")):
        with Image.open(path) as img:
            if min(img.size) < 2 * PREP.decode_size():
                found.append(path)
        if len(found) == n:
            return found
    raise AssertionError(f"fewer than {n} small photos in {PETS}")


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory) -> list[Path]:
    """Every EXIF orientation (a non-square photo), a grey JPEG, a CMYK JPEG, a PNG with transparency."""
    folder = tmp_path_factory.mktemp("odd")
    with Image.open(small_photos(1)[0]) as opened:
        photo = opened.convert("RGB").resize((300, 200))
    files = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files.append(folder / f"oriented_{orientation}.jpg")
        photo.save(files[-1], quality=90, exif=exif)
    files.append(folder / "grey.jpg")
    photo.convert("L").save(files[-1], quality=90)
    files.append(folder / "cmyk.jpg")
    photo.convert("CMYK").save(files[-1], quality=90)
    files.append(folder / "alpha.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(files[-1])
    return files


def cpu_path(files: list[Path], prep: Preprocessing = PREP, min_short_side: int | None = -1) -> torch.Tensor:
    dataset = ImageDataset([(f, 0) for f in files], prep.eval_transform(), prep.decode_size() if min_short_side == -1 else min_short_side)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def device_path(files: list[Path], prep: Preprocessing = PREP) -> tuple[torch.Tensor, EncodedBatch]:
    dataset = EncodedImageDataset(ImageDataset([(f, 0) for f in files], prep.eval_transform(), prep.decode_size()), train=False)
    batch = collate_encoded([dataset[i] for i in range(len(dataset))])
    return decode_batch(batch.images, "cpu", prep.eval_transform(), batch.orientations), batch


def assert_close(a: torch.Tensor, b: torch.Tensor, names: list) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    worst = (a - b).abs().flatten(1).max(1).values
    bad = [(str(name), round(float(w) / GREY, 1)) for name, w in zip(names, worst) if w > GREY + 1e-6]
    assert not bad, f"differ by more than one grey level (name, grey levels): {bad}"


@pytest.mark.shared
def test_decode_batch_matches_the_cpu_path(odd_files):
    files = small_photos(6) + odd_files
    out, batch = device_path(files)
    kinds = ["bytes" if t.ndim == 1 else "decoded" for t in batch.images]
    assert kinds == ["bytes"] * (len(files) - 2) + ["decoded", "decoded"]  # CMYK and PNG: decoded in the worker
    assert batch.orientations[6 : 6 + 8] == list(range(1, 9))
    assert_close(out, cpu_path(files), [f.name for f in files])


@pytest.mark.shared
def test_large_photo_matches_the_full_size_cpu_decode():
    """Photos over twice the decode size: the CPU path reduces them in the DCT domain (draft), the device path does
    not; against the CPU path's full-size decode they agree."""
    big = max(PETS.glob("*.jpg"), key=lambda p: min(Image.open(p).size))
    assert min(Image.open(big).size) >= 2 * PREP.decode_size()
    assert_close(device_path([big])[0], cpu_path([big], min_short_side=None), [big.name])


@pytest.mark.shared
def test_what_decode_jpeg_refuses_is_decoded_on_the_cpu_per_image(odd_files):
    """A PNG's bytes handed over as if they were a JPEG: the batched call fails, the others still decode on the
    device, that one through Pillow."""
    files = [*small_photos(2), odd_files[-1]]
    images = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    out = decode_batch(images, "cpu", PREP.eval_transform())  # orientations read from the bytes
    assert_close(out, cpu_path(files), [f.name for f in files])


def batches(dm, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What the model gets from a loader: each batch through the datamodule's transfer hooks, as Lightning does."""
    loader = dm.val_dataloader() if split == "val" else dm.train_dataloader()
    out = []
    for batch in loader:
        batch = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
        out.append(dm.on_after_batch_transfer(batch, 0))
    return out


@pytest.mark.parametrize("image_cache", [False, True])
def test_datamodule_gives_the_same_eval_batches(tiny_folder, image_cache):
    prep = Preprocessing().resized(64)
    made = {}
    for decode, workers in (("cpu", 0), ("gpu", 1)):  # one worker: the encoded items cross a process boundary
        dm = make_datamodule("image_folder", root=str(tiny_folder), decode=decode, num_workers=workers, batch_size=4, image_cache=image_cache)
        dm.preprocessing = prep
        dm.setup()
        made[decode] = dm
    plain, device = (batches(made[d], "val") for d in ("cpu", "gpu"))
    assert len(plain) == len(device) > 0
    for (x, y), (x2, y2) in zip(plain, device):
        assert torch.equal(y, y2)
        assert_close(x2, x, list(range(len(y))))
    train = batches(made["gpu"], "train")
    assert all(x.shape[1:] == (3, 64, 64) and x.dtype == torch.float32 for x, _ in train)
    assert sum(len(y) for _, y in train) == len(made["gpu"].splits["train"])
    # The pixels the frozen feature cache and the adversarial evaluation read stay decoded on the CPU.
    assert type(made["gpu"].samples_dataset(made["gpu"].splits["val"])) is ImageDataset
    images, _ = next(iter(made["gpu"].image_loader("val")))
    assert images.shape[1:] == (3, 64, 64)


def test_a_bad_decode_value_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        run("train", "data=image_folder", f"data.root={tmp_path}", "data.decode=tpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert "\n" not in str(info.value) and str(info.value).startswith("data.decode: ") and "'tpu'" in str(info.value)
    with pytest.raises(Exception) as built:  # constructed directly (Hydra's instantiate wraps what the class raises)
        make_datamodule("image_folder", root=str(tmp_path), decode="tpu")
    assert isinstance(built.value.__cause__, ConfigError) and str(built.value.__cause__) == "data.decode: expected cpu or gpu, got 'tpu'"


def test_fine_tuning_with_decode_gpu_on_the_cpu(tiny_folder, tmp_path, monkeypatch):
    calls = {"batches": 0}
    real = gpu_decode.decode_batch

    def counted(*args, **kwargs):
        calls["batches"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_batch", counted)
    run(
        "train",
        "data=image_folder",
        f"data.root={tiny_folder}",
        "finetune=full",
        "trainer.max_epochs=1",
        "interpret.enabled=false",
        f"hydra.run.dir={tmp_path}",
        *FAST,
        "data.decode=gpu",
        "data.num_workers=1",
    )
    metrics = read_metrics(tmp_path)
    assert "test/acc" in metrics and calls["batches"] >= 3  # train, validation and test batches came encoded
