"""transferlab-serve for real: a uvicorn process on 127.0.0.1, real HTTP, real uploads, the page in Chromium.

One server per module (the species package, torch runtime); every test talks to it over loopback.
"""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import io
import signal
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, chromium_driver, needs_browser, pet_photos, run, start_server, stop_server

pytestmark = pytest.mark.shared
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def server(species_package, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.out"
    proc, url = start_server(species_package, log, "max_request_mb=2", "max_images=4")
    yield url, proc, log
    stop_server(proc)


def bomb_jpeg(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) declares width x height: what a decompression bomb looks like to a decoder."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_good_images_get_the_labels_predict_gives(server, species_package, tmp_path):
    url, _, _ = server
    files = pet_photos(True, 3) + pet_photos(False, 3)
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    run("predict", f"ckpt_path={species_package}", f"input={folder}", f"output={tmp_path / 'p.csv'}", "topk=2", f"hydra.run.dir={tmp_path / 'run'}")
    expected = {Path(line.split(",")[0]).name: line.split(",")[1:3] for line in (tmp_path / "p.csv").read_text().splitlines()[1:]}
    for f in files:
        answer = httpx.post(f"{url}/predict", files={"file": (f.name, f.read_bytes(), "image/jpeg")}, timeout=60)
        assert answer.status_code == 200, answer.text
        top = answer.json()["predictions"]
        assert [p["label"] for p in top] == sorted(["cat", "dog"], key=lambda c: -next(p["prob"] for p in top if p["label"] == c))
        assert top[0]["label"] == expected[f.name][0] and top[0]["prob"] == pytest.approx(float(expected[f.name][1]), abs=2e-3)
    # several files in one request, and base64 JSON: the same answers
    many = httpx.post(f"{url}/predict", files=[("file", (f.name, f.read_bytes(), "image/jpeg")) for f in files[:3]], timeout=60).json()
    assert [r["predictions"][0]["label"] for r in many["results"]] == [expected[f.name][0] for f in files[:3]]
    assert "predictions" not in many and "file" not in many  # several images: only `results`
    assert many["version"] == importlib.metadata.version("transferlab") == httpx.get(f"{url}/health").json()["version"]
    encoded = base64.b64encode(files[4].read_bytes()).decode()
    as_json = httpx.post(f"{url}/predict?topk=1", json={"image": encoded}, timeout=60).json()
    assert len(as_json["predictions"]) == 1 and as_json["predictions"][0]["label"] == expected[files[4].name][0]
    assert as_json["results"] == [{"file": "image 1", "predictions": as_json["predictions"]}] and as_json["file"] == "image 1"
    meta = httpx.get(f"{url}/metadata").json()
    assert meta["class_names"] == ["cat", "dog"] and meta["resize_size"] == 256 and "test/acc_ci95" in meta["metrics"]
    assert "/predict" in httpx.get(f"{url}/openapi.json").json()["paths"]
    # no key, no CORS policy by default: every client may call, no browser page of another origin may
    preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(f"{url}/predict", headers=preflight).headers
    assert meta["limits"]["api_key_required"] is False and meta["limits"]["rate_limit"] is None


def test_each_result_belongs_to_its_own_file_in_both_orders(server):
    """A cat and a dog photo in one request, then the other way round: results[i] is file i's answer, by name and
    by label, as multipart and as JSON; a client reading only `results` cannot mix them up."""
    url, _, _ = server
    cat, dog = pet_photos(True, 1)[0], pet_photos(False, 1)[0]
    for first, second in ((cat, dog), (dog, cat)):
        multipart = [("file", (f.name, f.read_bytes(), "image/jpeg")) for f in (first, second)]
        answer = httpx.post(f"{url}/predict", files=multipart, timeout=60).json()
        assert [r["file"] for r in answer["results"]] == [first.name, second.name]
        labels = ["cat" if f is cat else "dog" for f in (first, second)]
        assert [r["predictions"][0]["label"] for r in answer["results"]] == labels
        as_json = httpx.post(
            f"{url}/predict", json={"images": [base64.b64encode(f.read_bytes()).decode() for f in (first, second)]}, timeout=60
        ).json()
        assert [r["file"] for r in as_json["results"]] == ["image 1", "image 2"]
        assert [r["predictions"][0]["label"] for r in as_json["results"]] == labels


def test_bad_uploads_get_4xx_with_a_reason_and_the_server_keeps_serving(server, tmp_path):
    url, _, _ = server
    photo = pet_photos(True, 1)[0].read_bytes()
    bomb = bomb_jpeg(30_000, 30_000)  # 900 Mpx declared in a 1 KB file
    cases = {
        "not an image": ({"files": {"file": ("notes.jpg", b"hello, this is text", "image/jpeg")}}, 415, "a text file, not an image"),
        "random bytes": ({"files": {"file": ("x.jpg", bytes(range(256)) * 4, "image/jpeg")}}, 415, "not an image"),
        "truncated": ({"files": {"file": ("cut.jpg", photo[: len(photo) // 2], "image/jpeg")}}, 400, "truncated"),
        "empty": ({"files": {"file": ("empty.jpg", b"", "image/jpeg")}}, 400, "empty file"),
        "bomb": ({"files": {"file": ("bomb.jpg", bomb, "image/jpeg")}}, 413, "decompression-bomb limit"),
        "too large": ({"files": {"file": ("big.jpg", photo + b"\0" * (3 * 2**20), "image/jpeg")}}, 413, "over the limit"),
        "missing field": ({"files": {"image": ("a.jpg", photo, "image/jpeg")}}, 422, "field `file` is missing"),
        "too many images": ({"files": [("file", (f"{i}.jpg", photo, "image/jpeg")) for i in range(5)]}, 413, "at most 4"),
        "far too many images": ({"files": [("file", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(40)]}, 413, "more than 4 images"),
        "bad base64": ({"json": {"image": "not base64 !!"}}, 400, "not valid base64"),
        "unknown JSON field": ({"json": {"image": "aGVsbG8=", "label": "cat"}}, 422, "unknown JSON field 'label'"),
        "empty images": ({"json": {"images": []}}, 422, '"images" is empty'),
        "bad JSON": ({"content": b"{oops", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        "wrong content type": ({"content": b"file=1", "headers": {"content-type": "text/plain"}}, 415, "send multipart/form-data"),
        "bad topk": ({"files": {"file": ("a.jpg", photo, "image/jpeg")}, "params": {"topk": 0}}, 422, "topk"),
    }
    for name, (request, status, reason) in cases.items():
        answer = httpx.post(f"{url}/predict", timeout=60, **request)
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        error = answer.json()["error"]
        assert reason in error and "\n" not in error, (name, error)
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok", name
    assert httpx.post(f"{url}/predict", files={"file": ("ok.jpg", photo, "image/jpeg")}, timeout=60).status_code == 200


def test_a_bounded_load_test_ends_with_no_errors_and_batches_requests(server):
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "scripts" / "serve_load.py")
    assert spec and spec.loader
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    url, _, _ = server
    before = httpx.get(f"{url}/health").json()
    payloads = [(f.name, f.read_bytes()) for f in pet_photos(True, 4) + pet_photos(False, 4)]
    result = serve_load.load_test(url, payloads, requests=200, concurrency=8)
    after = httpx.get(f"{url}/health").json()
    print({k: v for k, v in result.items() if k != "labels"})
    assert result["errors"] == 0 and result["p50_ms"] <= result["p99_ms"]
    assert result["labels"][:8] == ["cat"] * 4 + ["dog"] * 4
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == 200 and batches < images  # concurrent requests shared forward passes


@needs_browser
def test_the_page_shows_the_top1_label_of_an_uploaded_image(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = server
    photo = pet_photos(False, 1)[0]
    with chromium_driver() as driver:
        driver.get(f"{url}/")
        driver.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "top1").text not in ("", "..."))
        assert driver.find_element(By.ID, "top1").text == "dog"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#rows tr")) == 2 and driver.find_element(By.ID, "error").text == ""
        errors = [m for m in driver.get_log("browser") if m["level"] == "SEVERE" and "favicon" not in m["message"]]
        assert not errors, errors


def test_sigterm_stops_the_server_gracefully(species_package, tmp_path):
    proc, url = start_server(species_package, tmp_path / "server.out", "runtime=onnx")
    assert httpx.get(f"{url}/metadata").json()["runtime"]["runtime"] == "onnx"
    photo = pet_photos(True, 1)[0].read_bytes()
    assert httpx.post(f"{url}/predict", files={"file": ("a.jpg", photo, "image/jpeg")}, timeout=60).json()["predictions"][0]["label"] == "cat"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "Stopped on SIGTERM" in (tmp_path / "server.out").read_text()
