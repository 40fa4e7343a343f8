"""The parts of transferlab-serve's exposure that need no server: keys, the rate limit, TLS and host checks, the
pixel budget read from headers, the reduced decode, and secrets from the config (in-process, fast)."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from PIL import Image

from transferlab.core import redaction
from transferlab.core.errors import ConfigError
from transferlab.data.images import PixelBudgetError, decode_rgb, open_image, pixels_to_decode
from transferlab.data.preprocessing import Preprocessing
from transferlab.deploy.access import Keys, RateLimit, check_tls, exposure_warning, is_loopback, read_keys


def encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def test_keys_from_the_config_and_a_file_and_their_refusals(tmp_path):
    good = "k" * 16
    assert read_keys(None, None) == ()
    (tmp_path / "keys").write_text(f"# ops team\n\n  {'a' * 20}  \n{'b' * 24}\n")
    assert read_keys(good, str(tmp_path / "keys")) == (good, "a" * 20, "b" * 24)
    with pytest.raises(ConfigError, match=r"^api_key \(or TRANSFERLAB_API_KEY\): a key needs at least 16 characters"):
        read_keys("short", None)
    (tmp_path / "bad").write_text(f"{'a' * 20}\n# comment\ntiny\n")
    with pytest.raises(ConfigError, match="^api_keys_file line 3: a key needs"):
        read_keys(None, str(tmp_path / "bad"))
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="holds no key"):
        read_keys(None, str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="is not a file"):
        read_keys(None, str(tmp_path / "missing"))
    keys = Keys((good, "a" * 20))
    assert keys.allows(good) and keys.allows("a" * 20) and not keys.allows("a" * 19) and not keys.allows(None) and not keys.allows("")
    assert not Keys(()) and Keys((good,))


def test_a_bad_key_setting_stops_the_command_before_the_model_loads(tmp_path):
    from conftest import run

    with pytest.raises(ConfigError, match=r"^api_key \(or TRANSFERLAB_API_KEY\): a key needs at least 16"):
        run("serve", f"ckpt_path={tmp_path / 'no-model-needed'}", "api_key=short", f"hydra.run.dir={tmp_path / 'run'}")
    (tmp_path / "c.pem").write_text("a certificate")
    with pytest.raises(ConfigError, match="^ssl_keyfile: missing"):
        run("serve", f"ckpt_path={tmp_path}", f"ssl_certfile={tmp_path / 'c.pem'}", f"hydra.run.dir={tmp_path / 'run'}")


def test_the_rate_limit_is_a_bucket_per_address_that_refills():
    now = [0.0]
    limit = RateLimit(per_minute=3, max_clients=2, clock=lambda: now[0])
    assert [limit.wait("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.wait("a") == pytest.approx(20.0)  # one request per 20 s refills
    assert limit.wait("b") == 0.0  # another address has its own bucket
    now[0] = 20.0
    assert limit.wait("a") == 0.0 and limit.wait("a") > 0
    limit.wait("c")
    assert len(limit.buckets) == 2 and "b" not in limit.buckets  # the least recently seen address is forgotten


def test_tls_needs_both_files_and_exposure_is_warned(tmp_path):
    assert check_tls(None, None) is False
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match="^ssl_keyfile: missing"):
        check_tls(str(tmp_path / "c.pem"), None)
    with pytest.raises(ConfigError, match="^ssl_keyfile: .* is not a file"):
        check_tls(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org"))
    assert exposure_warning("127.0.0.1", False, False) is None and exposure_warning("0.0.0.0", True, True) is None
    assert "No API key is set" in exposure_warning("0.0.0.0", False, True)
    assert "clear text" in exposure_warning("10.0.0.5", True, False)


def test_the_pixel_budget_is_read_from_the_header_and_counts_what_is_decoded():
    jpeg = encoded(Image.new("RGB", (6000, 4000), (90, 120, 60)), "JPEG")
    with open_image(jpeg) as img:
        assert pixels_to_decode(img, 256) == 750 * 500  # decoded at 1/8 scale in the DCT domain
    with open_image(jpeg) as img:
        assert pixels_to_decode(img, None) == 6000 * 4000
    png = encoded(Image.new("RGB", (3000, 2000), (90, 120, 60)), "PNG")
    with pytest.raises(PixelBudgetError, match=r"PNG of 3000x2000 = 6,000,000 pixels is over max_image_pixels=5,000,000"):
        decode_rgb(png, 256, max_pixels=5_000_000)
    assert decode_rgb(png, 256, max_pixels=6_000_000).shape[0] == 3
    assert decode_rgb(jpeg, 256, max_pixels=400_000).shape[1:] == (500, 750)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L"])
def test_a_reduced_decode_gives_the_model_nearly_the_same_input(mode):
    """Large non-JPEG images are box-reduced in Pillow before the resize (memory); the model input moves by a
    under one 8-bit level on average (JPEG re-encoding moves it more), transparency included."""
    torch.manual_seed(0)
    noise = torch.rand(3, 40, 60) * 255
    base = Image.fromarray(
        torch.nn.functional.interpolate(noise[None], size=(1200, 1800), mode="bicubic")[0].clamp(0, 255).byte().permute(1, 2, 0).numpy()
    )
    img = base.convert(mode, dither=Image.Dither.NONE) if mode == "P" else base.convert(mode)  # dithering: pixel-level noise
    if mode == "RGBA":
        img.putalpha(Image.linear_gradient("L").resize(img.size))
    data = encoded(img, "PNG")
    transform = Preprocessing(input_size=224).eval_transform()
    reduced, whole = transform(decode_rgb(data, 256)), transform(decode_rgb(data))
    assert decode_rgb(data, 256).shape[1:] == (600, 900)  # reduced by 2, to between two and four times 256
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    levels = ((reduced - whole) * std * 255).abs()
    assert levels.mean() < 0.4 and levels.max() < 3.5, (levels.mean(), levels.max())


def test_secret_named_config_values_are_masked_but_interpolations_are_not(caplog):
    config = {
        "serve": {"api_key": "literal-key-1234567890", "hf_token": "${oc.env:HF_TOKEN}", "port": 8000},
        "items": [{"db_password": "pw-0987654321"}],
    }
    found = redaction.config_secrets(config)
    assert found == ("literal-key-1234567890", "pw-0987654321")
    assert redaction.redact("key=literal-key-1234567890 pw-0987654321", redaction.secret_values(found)) == "key=*** ***"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "serving with %s", ("literal-key-1234567890",), None)
    redaction.RedactingFilter(found).filter(record)
    assert record.getMessage() == "serving with ***"
