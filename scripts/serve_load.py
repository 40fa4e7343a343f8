"""A bounded load test of a running transferlab-serve: N requests, C at a time, then p50 / p99 latency and img/s.

    python -m transferlab.serve ckpt_path=<package> port=8000 &
    python scripts/serve_load.py --url http://127.0.0.1:8000 --images ../shared/data/oxford-pets-sample \
        --requests 200 --concurrency 8 [--out load.json]

Loopback only by intent: it stops after --requests requests and never retries. tests/test_serve.py runs it too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def load_test(url: str, payloads: list[tuple[str, bytes]], requests: int = 200, concurrency: int = 8, timeout: float = 60.0) -> dict[str, Any]:
    """POST /predict `requests` times (payloads in turn), `concurrency` clients at once; latency of each in ms."""
    import httpx

    def one(i: int, client: httpx.Client) -> tuple[float, int, str]:
        name, data = payloads[i % len(payloads)]
        started = time.perf_counter()
        try:
            answer = client.post(f"{url}/predict", files={"file": (name, data, "image/jpeg")})
            label = answer.json()["results"][0]["predictions"][0]["label"] if answer.status_code == 200 else ""
            return (time.perf_counter() - started) * 1000, answer.status_code, label
        except Exception:  # noqa: BLE001 - counted as an error, the test goes on
            return (time.perf_counter() - started) * 1000, 0, ""

    clients = [httpx.Client(timeout=timeout) for _ in range(concurrency)]
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda i: one(i, clients[i % concurrency]), range(requests)))
    finally:
        for client in clients:
            client.close()
    seconds = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "requests": requests,
        "concurrency": concurrency,
        "errors": sum(1 for r in results if r[1] != 200),
        "seconds": round(seconds, 3),
        "images_per_second": round(requests / seconds, 2),
        "p50_ms": round(quantiles[49], 1),
        "p99_ms": round(quantiles[98], 1),
        "max_ms": round(latencies[-1], 1),
        "labels": [r[2] for r in results],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--images", type=Path, required=True, help="a folder of JPEGs to send in turn")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    payloads = [(p.name, p.read_bytes()) for p in sorted(args.images.glob("*.jpg"))[:64]]
    if not payloads:
        print(f"error: --images: no .jpg files in {args.images}", file=sys.stderr)
        return 2
    result = load_test(args.url, payloads, args.requests, args.concurrency)
    result.pop("labels")
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
