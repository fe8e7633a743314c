"""Connecting to Ray: an existing cluster when an address is given, else a local embedded one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> str | None:
    """Connect to (or start) Ray once per process and return the dashboard URL, if there is one.

    `address` (or RAY_ADDRESS) joins a running cluster, as `ray job submit` entrypoints do; without
    one a local cluster is started in-process with the dashboard on (Tune's cleanup of stopped
    trials needs it) and bound to loopback.
    """
    import ray

    if ray.is_initialized():
        return _dashboard_url()
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"logging_level": logging.WARNING if quiet else logging.INFO, "log_to_driver": True}
    if address:
        context = ray.init(address=address, **kwargs)
    else:
        context = ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    if quiet:
        ray.data.DataContext.get_current().enable_progress_bars = _is_terminal()
    url = context.dashboard_url
    return f"http://{url}" if url and not url.startswith("http") else url


def _dashboard_url() -> str | None:
    import ray

    url = ray.get_runtime_context().get_node_id() and ray.worker.get_dashboard_url()
    return f"http://{url}" if url and not url.startswith("http") else url


def _is_terminal() -> bool:
    import sys

    return sys.stderr.isatty()
