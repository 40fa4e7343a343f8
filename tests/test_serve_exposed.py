"""transferlab-serve as an attacker, a fuzzer and a client generator see it: budgets, keys, TLS, the contract.

Three real servers on loopback (uvicorn subprocesses): one with small pixel budgets bound to 0.0.0.0 (the
hostile mix, its peak memory read from /proc), one with an API key from the environment (Schemathesis, a
generated client, the page and /docs in Chromium), one with HTTPS, a keys file, a literal key and a rate limit.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import re
import secrets
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from conftest import REPO, chromium_driver, needs_browser, pet_photos, start_server, stop_server

pytestmark = pytest.mark.shared
httpx = pytest.importorskip("httpx")

BUDGET, DECODE_WORKERS, QUEUE = 12_000_000, 2, 6
BYTES_PER_PIXEL = 26  # deploy.admission.BYTES_PER_DECODED_PIXEL, the figure docs/deploy.md's bound uses
KEY = secrets.token_urlsafe(24)


def drawing(width: int, height: int, fmt: str, mode: str = "RGBA") -> bytes:
    """A large image that compresses to a small file (shapes on a flat background): cheap to send, costly to decode."""
    img = Image.new(mode, (width, height), (200, 180, 160, 255) if mode == "RGBA" else (200, 180, 160))
    draw = ImageDraw.Draw(img)
    for i in range(0, min(width, height) // 2, 97):
        draw.ellipse((i, i, width - i, height - i), outline=(i % 255, 90, 40), width=9)
    buffer = io.BytesIO()
    img.save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def peak_rss(pid: int) -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024


def reset_peak(pid: int) -> None:
    """The kernel's high-water mark back to the current RSS (a parent may do this for its child)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def post_photo(url: str, photo: Path, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def budget_server(species_package, tmp_path_factory):
    log = tmp_path_factory.mktemp("budget") / "server.out"
    limits = [f"max_image_pixels={BUDGET}", "max_request_pixels=30000000", f"decode_workers={DECODE_WORKERS}", f"queue_size={QUEUE}"]
    proc, url = start_server(
        species_package, log, "host=0.0.0.0", *limits, "max_images=4", "max_request_mb=8", "batch_wait_ms=20", "upload_timeout_s=4"
    )
    yield url, proc, log
    stop_server(proc)


def test_the_hostile_mix_stays_under_the_documented_memory_bound(budget_server):
    url, proc, log = budget_server
    cat = pet_photos(True, 1)[0]
    assert post_photo(url, cat).json()["predictions"][0]["label"] == "cat"  # warm: the model's memory is the baseline
    assert "EVERY MACHINE THAT REACHES THIS ADDRESS CAN USE THE MODEL" in log.read_text()  # host=0.0.0.0, no key
    reset_peak(proc.pid)
    baseline = peak_rss(proc.pid)

    over = drawing(4000, 4000, "PNG")  # 16 Mpx: refused from the header
    answer = httpx.post(f"{url}/predict", files={"file": ("big.png", over, "image/png")}, timeout=60)
    assert answer.status_code == 413 and "max_image_pixels=12,000,000" in answer.json()["error"] and "not decoded" in answer.json()["error"]
    huge_jpeg = drawing(8000, 6000, "JPEG", "RGB")  # 48 Mpx declared, decoded at 1/8 scale: within the budget
    assert httpx.post(f"{url}/predict", files={"file": ("huge.jpg", huge_jpeg, "image/jpeg")}, timeout=60).status_code == 200
    under = drawing(3400, 3400, "WEBP")  # 11.6 Mpx, WebP with alpha: the most bytes per decoded pixel of 8-bit formats
    three = [("file", (f"u{i}.webp", under, "image/webp")) for i in range(3)]
    answer = httpx.post(f"{url}/predict", files=three, timeout=60)
    assert answer.status_code == 413 and "max_request_pixels=30,000,000" in answer.json()["error"]

    async def concurrently(count: int, files: list) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{url}/predict", files=files) for _ in range(count)))

    # as many images just under the budget as the queue admits, at once: the pool decodes two at a time
    answers = asyncio.run(concurrently(QUEUE, [("file", ("under.webp", under, "image/webp"))]))
    assert [a.status_code for a in answers] == [200] * QUEUE, [a.text for a in answers]
    bound = DECODE_WORKERS * BUDGET * BYTES_PER_PIXEL
    grown = peak_rss(proc.pid) - baseline
    print(f"peak RSS above the warm baseline: {grown / 2**20:.0f} MiB; documented bound {bound / 2**20:.0f} MiB")
    assert grown <= bound, (grown, bound)

    # a flood of small requests: the queue refuses what it cannot hold, with a time to come back
    flood = asyncio.run(concurrently(40, [("file", (cat.name, cat.read_bytes(), "image/jpeg"))]))
    statuses = {a.status_code for a in flood}
    assert statuses <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    busy = next(a for a in flood if a.status_code == 503)
    assert int(busy.headers["Retry-After"]) >= 1 and "queue_size" in busy.json()["error"]

    # stalled uploads hold a connection, not a place in the queue, and only until upload_timeout_s (4 s here)
    port = int(url.rsplit(":", 1)[1])
    slow = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 900000\r\n\r\n--b\r\n")
        slow.append(sock)
    try:
        assert post_photo(url, cat).json()["predictions"][0]["label"] == "cat"
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        for sock in slow:  # the server answers 408 and closes: recv returns what it sent, then b"" (EOF)
            received = b"".join(iter(lambda s=sock: s.recv(4096), b""))
            assert received.startswith(b"HTTP/1.1 408") and b"upload_timeout_s" in received, received[:300]
    finally:
        for sock in slow:
            sock.close()
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["pending"] == 0
    assert post_photo(url, pet_photos(False, 1)[0]).json()["predictions"][0]["label"] == "dog"
    assert peak_rss(proc.pid) - baseline <= bound


@pytest.fixture(scope="module")
def keyed_server(species_package, tmp_path_factory):
    log = tmp_path_factory.mktemp("keyed") / "server.out"
    proc, url = start_server(species_package, log, env={"TRANSFERLAB_API_KEY": KEY})
    yield url, proc, log
    stop_server(proc)


def test_a_key_is_needed_for_the_model_and_in_no_log_file_or_answer(keyed_server):
    url, _, log = keyed_server
    photo = pet_photos(True, 1)[0]
    for headers in ({}, {"Authorization": "Bearer " + "x" * 32}, {"Authorization": f"Basic {KEY}"}):
        for answer in (post_photo(url, photo, headers=headers), httpx.get(f"{url}/metadata", headers=headers)):
            assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer", answer.text
            assert "Authorization: Bearer" in answer.json()["error"]
    good = {"Authorization": f"Bearer {KEY}"}
    assert post_photo(url, photo, headers=good).json()["predictions"][0]["label"] == "cat"
    metadata = httpx.get(f"{url}/metadata", headers=good)
    assert metadata.status_code == 200 and metadata.json()["limits"]["api_key_required"] is True
    opened = {path: httpx.get(f"{url}{path}") for path in ("/health", "/", "/docs", "/openapi.json")}
    assert all(a.status_code == 200 for a in opened.values())
    assert opened["/openapi.json"].json()["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert 'id="key"' in opened["/"].text
    for text in [metadata.text, *(a.text for a in opened.values())]:
        assert KEY not in text
    written = [p for p in log.parent.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and any(p.suffix == ".log" for p in written)
    for path in written:
        assert KEY not in path.read_text(errors="replace"), path


def test_schemathesis_with_every_check_finds_nothing(keyed_server):
    url, _, log = keyed_server
    st = Path(sys.executable).parent / "schemathesis"
    cmd = [str(st), "run", f"{url}/openapi.json", "--checks", "all", "-H", f"Authorization: Bearer {KEY}", "--no-color"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)  # cwd: schemathesis.toml
    print(done.stdout[-1500:])
    assert done.returncode == 0 and "No issues found" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Configuration:    " in done.stdout and "schemathesis.toml" in done.stdout
    assert "Traceback" not in log.read_text() and '" 500' not in log.read_text()


def test_a_client_generated_from_the_schema_labels_photos(keyed_server, tmp_path):
    url, _, _ = keyed_server
    (tmp_path / "api.json").write_bytes(httpx.get(f"{url}/openapi.json").content)
    generator = Path(sys.executable).parent / "openapi-python-client"
    out = tmp_path / "serve_client"
    done = subprocess.run(
        [str(generator), "generate", "--path", str(tmp_path / "api.json"), "--meta", "none", "--output-path", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        client_module = importlib.import_module("serve_client")
        predict = importlib.import_module("serve_client.api.default.predict_images_predict_post")
        models = importlib.import_module("serve_client.models")
        files = importlib.import_module("serve_client.types")
        client = client_module.AuthenticatedClient(base_url=url, token=KEY, timeout=60)
        cat, dog = pet_photos(True, 1)[0], pet_photos(False, 1)[0]
        uploads = models.PredictImagesPredictPostFilesUploads(
            file=[files.File(payload=io.BytesIO(p.read_bytes()), file_name=p.name) for p in (dog, cat)]
        )
        answer = predict.sync(client=client, body=uploads, topk=1)
        assert [(r.file, r.predictions[0].label) for r in answer.results] == [(dog.name, "dog"), (cat.name, "cat")]
        as_json = predict.sync(client=client, body=models.PredictImagesPredictPostJsonBase64Images(image=base64.b64encode(cat.read_bytes()).decode()))
        assert as_json.predictions[0].label == "cat" and as_json.results[0].file == "image 1"
        refused = predict.sync(client=client_module.Client(base_url=url), body=uploads)
        assert isinstance(refused, models.Error) and "no key" in refused.error
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "serve_client" or m.startswith("serve_client.")]:
            del sys.modules[name]


@needs_browser
def test_the_page_sends_the_key_and_docs_work_with_no_outside_network(keyed_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = keyed_server
    with chromium_driver("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1") as driver:
        driver.get(f"{url}/docs")  # a CDN would not resolve: Swagger UI renders only from the package's files
        WebDriverWait(driver, 60).until(lambda d: any(e.text == "/predict" for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")))
        assert driver.find_elements(By.CSS_SELECTOR, ".btn.authorize")  # the bearer key can be entered there
        driver.get(f"{url}/")
        driver.find_element(By.ID, "file").send_keys(str(pet_photos(True, 1)[0]))
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "error").text != "")
        assert "no key" in driver.find_element(By.ID, "error").text
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "file").send_keys(str(pet_photos(False, 1)[0]))  # another file: a `change` event
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "top1").text not in ("", "..."))
        assert driver.find_element(By.ID, "top1").text == "dog" and driver.find_element(By.ID, "error").text == ""


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_file, key_file


def test_https_with_keys_from_a_file_a_literal_key_and_a_rate_limit(species_package, tmp_path):
    pytest.importorskip("cryptography")
    cert, private = self_signed_certificate(tmp_path)
    from_file, literal = [f"tl{secrets.token_hex(12)}" for _ in range(2)], f"tl{secrets.token_hex(12)}"
    (tmp_path / "keys.txt").write_text("# the team's keys\n" + "\n".join(from_file) + "\n")
    trust = ssl.create_default_context(cafile=str(cert))
    run = tmp_path / "run"
    run.mkdir()
    overrides = [f"ssl_certfile={cert}", f"ssl_keyfile={private}", f"api_keys_file={tmp_path / 'keys.txt'}", f"api_key={literal}", "rate_limit=4"]
    overrides.append("cors_origins=[https://app.example.org]")
    proc, url = start_server(species_package, run / "server.out", *overrides, scheme="https", verify=trust)
    try:
        photo = pet_photos(True, 1)[0]
        statuses = []
        for key in (from_file[1], literal, from_file[0], "wrong-" + literal, from_file[0]):
            answer = post_photo(url, photo, headers={"Authorization": f"Bearer {key}"}, verify=trust)
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                assert answer.json()["predictions"][0]["label"] == "cat"
        assert statuses == [200, 200, 200, 401, 429], statuses  # 4 per minute, wrong keys counted: guessing is limited too
        assert int(answer.headers["Retry-After"]) >= 1 and "rate_limit=4" in answer.json()["error"]
        assert httpx.get(f"{url}/health", verify=trust).status_code == 200  # health checks are never limited
        for origin, allowed in (("https://app.example.org", True), ("https://elsewhere.example", False)):
            preflight = {"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
            answer = httpx.options(f"{url}/predict", headers=preflight, verify=trust)
            assert (answer.headers.get("access-control-allow-origin") == origin) is allowed, answer.headers
        with pytest.raises(httpx.TransportError):
            httpx.get(url.replace("https", "http") + "/health", timeout=5)
    finally:
        stop_server(proc)
    for path in [p for p in run.rglob("*") if p.is_file()]:
        text = path.read_text(errors="replace")
        assert literal not in text and not any(k in text for k in from_file), path
    assert "HTTPS" in (run / "server.out").read_text()
