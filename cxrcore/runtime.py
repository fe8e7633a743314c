"""Connecting to Ray: an existing cluster when an address is given, else a local embedded one."""

from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> str | None:
    """Connect to (or start) Ray once per process and return the dashboard URL, if there is one.

    `address` (or RAY_ADDRESS) joins a running cluster, as `ray job submit` entrypoints do; without
    one a local cluster is started in-process with the dashboard on (Tune's cleanup of stopped
    trials needs it) and bound to loopback. Token authentication is left as Ray 2.60 sets it (on,
    token from RAY_AUTH_TOKEN or ~/.ray/auth_token); cxr never reads, prints or logs the token.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(
                # At least 4 logical CPUs: a Tune trial's driver, its Train workers and Ray Data's read
                # tasks must all fit at once, even on a 2-core laptop (they take turns on the cores).
                num_cpus=num_cpus or max(4, os.cpu_count() or 1),
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                logging_level=logging.WARNING,
            )
    from ray._private.worker import get_dashboard_url  # the public API has no getter for an existing session

    url: str | None = get_dashboard_url()
    return f"http://{url}" if url and not url.startswith("http") else url
