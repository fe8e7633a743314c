"""`cxr serve`: the application on a local (or joined) Ray cluster, in the foreground until a signal."""

import signal
import sys
import threading
from typing import Any

from serve.app import build_app
from serve.schemas import ServeArgs

APP_NAME = "cxr"


def serve_foreground(
    app_args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, address: str | None = None
) -> int:
    """Start Serve on host:port, run the app, block until Ctrl-C or SIGTERM, then shut Serve down."""
    import ray
    from ray import serve

    from cxrcore.runtime import init_ray

    args = ServeArgs.model_validate(app_args)
    app = build_app(args)  # fails here, before Ray starts, on a bad registry or model reference
    dashboard = init_ray(address)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(
            f"serving {args.model} at http://{host}:{port} (API docs: /docs; Ray dashboard: {dashboard}); "
            "Ctrl-C to stop",
            flush=True,
        )
        stop.wait()
        print("shutting down Serve", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.shutdown()
        ray.shutdown()
    return 0


def demo_predictions(
    app_args: dict[str, Any], files: list[str], host: str = "127.0.0.1", port: int = 8000
) -> list[dict[str, Any]]:
    """Serve the app on the running Ray, POST each file over HTTP, shut Serve down: the demo's last step."""
    from pathlib import Path

    import httpx
    from ray import serve

    args = ServeArgs.model_validate(app_args)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        answers = []
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=60) as client:
            for path in files:
                response = client.post(
                    "/v1/predict", files={"file": (Path(path).name, Path(path).read_bytes())}
                )
                response.raise_for_status()
                answers.append({"file": path, **response.json()})
        return answers
    finally:
        serve.shutdown()
