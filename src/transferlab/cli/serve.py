"""transferlab-serve: answer HTTP requests with a checkpoint's or package's predictions (deploy.server).

SIGTERM (a service manager, `docker stop`) stops the server gracefully: it stops accepting connections,
finishes the requests in flight, and exits 0. Ctrl-C does the same and exits 130, as a shell expects.
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import sys

from omegaconf import DictConfig

from transferlab.cli.app import Command
from transferlab.core.errors import MissingPackage, ResourceError, require_packages
from transferlab.deploy.runtime import load_runtime

log = logging.getLogger(__name__)


def serve(cfg: DictConfig) -> None:
    require_packages("transferlab-serve", "serve", "fastapi", "uvicorn", "fastapi_offline")
    if not (importlib.util.find_spec("python_multipart") or importlib.util.find_spec("multipart")):
        raise MissingPackage("transferlab-serve needs python-multipart (uploads): pip install 'transferlab[serve]'")
    import uvicorn

    from transferlab.deploy.access import check_tls, exposure_warning, read_keys
    from transferlab.deploy.admission import Budgets
    from transferlab.deploy.server import ServeSettings, create_app

    keys = read_keys(cfg.api_key, cfg.api_keys_file)  # config errors before the model loads
    tls = check_tls(cfg.ssl_certfile, cfg.ssl_keyfile)
    predictor = load_runtime(str(cfg.ckpt_path), cfg.runtime, cfg.device, cfg.precision, cfg.channels_last, cfg.tta, cfg.threads)
    settings = ServeSettings(
        topk=cfg.topk,
        max_batch=cfg.max_batch,
        batch_wait_ms=cfg.batch_wait_ms,
        max_images=cfg.max_images,
        max_request_bytes=int(cfg.max_request_mb * 2**20),
        upload_timeout_s=float(cfg.upload_timeout_s),
        budgets=Budgets(int(cfg.max_image_pixels), int(cfg.max_request_pixels), int(cfg.decode_workers), int(cfg.queue_size)),
        keys=keys,
        cors_origins=tuple(str(origin) for origin in cfg.cors_origins),
        rate_limit=cfg.rate_limit,
    )
    warning = exposure_warning(str(cfg.host), bool(keys), tls)
    if warning:
        log.warning("%s", warning)
    log.info(
        "Access: %s; %s; rate limit %s",
        f"{len(keys)} API key(s)" if keys else "open (no API key)",
        "HTTPS" if tls else "HTTP",
        f"{cfg.rate_limit:g}/min per address" if cfg.rate_limit else "off",
    )
    app = create_app(predictor, settings)
    certfile, keyfile = (str(cfg.ssl_certfile), str(cfg.ssl_keyfile)) if tls else (None, None)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=str(cfg.host), port=int(cfg.port), timeout_graceful_shutdown=10, log_config=None, ssl_certfile=certfile, ssl_keyfile=keyfile
        )
    )
    # uvicorn restores these handlers after its graceful shutdown and re-raises the signal it caught into them:
    # with ours in place that records the signal instead of killing the process with it.
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, frame: caught.append(number)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise ResourceError(f"port: the server could not start on {cfg.host}:{cfg.port} (in use? see the line above); choose another port=")
    name = signal.Signals(caught[-1]).name if caught else "a shutdown"
    log.info("Stopped on %s after finishing the requests in flight", name)
    if signal.SIGINT in caught:
        sys.exit(130)


command = Command("serve", serve)
main = command.main


if __name__ == "__main__":
    main()
