"""One HTTP client for the tests' requests to the servers they start on loopback.

httpx builds an SSL context for every client, `httpx.get` and `httpx.post` included, loading certifi's CA
bundle: 28 ms of CPU each time. The e2e tests' polling loops made about 500 of them, 15 CPU-seconds of the
Ray tests' run (py-spy, session 55). The tests speak plain HTTP, so one client serves them all. It keeps no
connection alive, so each request opens its own connection, as `httpx.get` does; its default timeout is
httpx's (5 s), and it is safe to share between threads.
"""

from __future__ import annotations

import httpx

HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
