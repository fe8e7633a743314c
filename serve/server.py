"""`cxr serve`: the application on a local (or joined) Ray cluster, in the foreground until a signal."""

import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cxrcore.decode import upload_bytes
from serve.app import _registry, build_app, check_gpus
from serve.deployments import resolve_model
from serve.schemas import ServeArgs

log = logging.getLogger(__name__)

APP_NAME = "cxr"
DRAIN_TIMEOUT_S = 10.0
SHUTDOWN_GRACE_S = 3.0
MAX_GRACE_S = 3600.0
"""Seconds of 503 `shutting_down` after the drain, before the port closes (`cxr serve --grace-s`)."""
"""How long `cxr serve`, told to stop, waits for the predictions in flight to be answered."""
START_TIMEOUT_S = 300.0
"""How long `cxr serve` and the demo wait for the app's replicas before saying why they are not up."""


def haproxy_processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every HAProxy that Ray Serve started on this machine (Linux's
    /proc; none found elsewhere, where ray[serve] bundles no HAProxy)."""
    found: list[tuple[int, int, str]] = []
    if not Path("/proc/self/stat").exists():
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
        if "haproxy" in command.split(" ", 1)[0] and ("haproxy-serve" in command or "/hsrv" in command):
            found.append((int(entry.name), parent, command))
    return found


def stop_stray_haproxy(node_id: str | None = None) -> int:
    """Stop the HAProxy processes Serve left behind; return how many.

    Ray 2.60's HAProxyManager actor runs HAProxy as a child process and stops it on a clean shutdown,
    but when Serve's controller gives up on that (or the cluster is killed) HAProxy outlives it as an
    orphan still listening on the HTTP port, and the next `cxr serve` on that port fails. With
    `node_id`, this cluster's (its files are under a folder named after the node) are stopped; without,
    orphans of any earlier cluster (their manager is gone, so their parent is init).
    """
    killed = []
    for pid, parent, command in haproxy_processes():
        if not _owned(pid):  # root's cleanup never stops another user's server, orphaned or not
            continue
        if _of_node(command, node_id) if node_id else parent == 1:
            try:
                os.kill(pid, signal.SIGKILL)  # a reload's old process ignores SIGTERM while it drains
            except OSError:
                continue
            killed.append(pid)
    _wait_gone(killed)  # SIGKILL returns before the process lets go of its port: the next check saw it taken
    if node_id:  # its config, admin socket and server state, one folder per node and cluster
        for base in _haproxy_bases():
            shutil.rmtree(base / node_id, ignore_errors=True)
    return len(killed)


STALE_FOLDER_S = 60.0
"""How old an HAProxy folder no process names must be before `cxr serve` removes it (one being set up is
named by its node's raylet, `--node_id=`, from before Serve makes it)."""


def prune_haproxy_folders(min_age_s: float = STALE_FOLDER_S) -> int:
    """Remove this user's HAProxy folders (config, server state, admin socket) whose node no process on the
    machine names; return how many. A clean stop removes its own (stop_stray_haproxy with the node); a
    `cxr serve` killed outright (an OOM kill, SIGKILL) left its folder for good, one more per kill: a
    review found 26 on this machine. Without /proc nothing is read and nothing removed."""
    import time

    if not Path("/proc/self/cmdline").exists():
        return 0
    named = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                named.add((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue  # gone meanwhile, or not ours to read
    command_lines = "\n".join(named)
    removed = 0
    for base in _haproxy_bases():
        for folder in base.iterdir() if base.is_dir() else ():
            try:
                info = folder.lstat()
            except OSError:
                continue
            if (
                folder.is_dir()
                and not folder.is_symlink()
                and info.st_uid == os.getuid()
                and time.time() - info.st_mtime >= min_age_s
                and folder.name not in command_lines
            ):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
    return removed


PORT_RELEASE_S = 5.0
"""How long `cxr serve` waits for the port of an orphaned HAProxy it stopped to be free."""


def _port_free_soon(host: str, port: int, within_s: float) -> None:
    """check_port_free, tried again for at most `within_s` seconds while the port is taken."""
    import time

    from cxrcore.config import ConfigError
    from cxrcore.runtime import check_port_free

    deadline = time.monotonic() + within_s
    while True:
        try:
            check_port_free(host, port)
            return
        except ConfigError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _owned(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout_s: float = 5.0) -> None:
    """Wait (bounded) until each process in `pids` has exited: gone, or a zombie (its sockets closed) that
    its parent has yet to reap."""
    import time

    def running(pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rpartition(")")[2].split()[:1] != ["Z"]:
                return True
            # A zombie main thread: HAProxy's other threads may still hold the port (a review's next
            # `cxr serve` found it taken a moment after the orphan was stopped)
            return len(os.listdir(f"/proc/{pid}/task")) > 1
        except OSError:
            return False

    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline and running(pid):
            time.sleep(0.02)


def _of_node(command: str, node_id: str) -> bool:
    """Whether an HAProxy command line is `node_id`'s: its files are under a folder named after the node."""
    return f"/{node_id}/" in command


def restrict_haproxy_files(node_id: str) -> bool:
    """Make this node's HAProxy folder (its config, server state and admin socket) its owner's alone; True
    when there was one to restrict.

    Ray writes the admin socket `mode 666 level admin`: any local user could point HAProxy's backends at a
    listener of their own and receive every upload, answering with forged predictions (an outside review
    did, as `nobody`). A socket in a folder only its owner may enter is out of their reach, also after
    HAProxy's reloads recreate it; Serve's manager and HAProxy run as that owner."""
    folders = [base / node_id for base in _haproxy_bases() if (base / node_id).is_dir()]
    if not folders:
        return False
    folder = folders[0]
    os.chmod(folder, 0o700)
    for entry in folder.iterdir():
        if entry.is_socket():
            os.chmod(entry, 0o600)
    return True


def _haproxy_bases() -> list[Path]:
    """Where this user's HAProxy files may be: cxr's per-user folder (a local cluster's), then Ray's default
    (a cluster started otherwise). Read here, not from Ray's constants, which this process imported with
    its own environment, not the one its local cluster was started with."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_SOCKET_PATH

    from cxrcore.runtime import haproxy_folder

    bases = [haproxy_folder(create=False), Path(RAY_SERVE_HAPROXY_SOCKET_PATH).parent]
    return list(dict.fromkeys(bases))


def _haproxy_of(node_id: str) -> bool:
    """Whether an HAProxy of this machine serves for `node_id` (Serve's front end there)."""
    return any(_of_node(command, node_id) for _, _, command in haproxy_processes())


def shutdown_serve() -> None:
    """`serve.shutdown()`, then this node's HAProxy if Serve left it running (see stop_stray_haproxy)."""
    import ray
    from ray import serve

    serve.shutdown()
    stop_stray_haproxy(ray.get_runtime_context().get_node_id())


AUDIT_IN_SESSION_NOTE = (
    "the audit trail goes to the Ray session's log folder (RAY_SESSION/logs/serve), which the next Ray "
    "session does not keep and cleaning up old sessions deletes: --arg audit_dir=DIR keeps it where you say"
)


def serve_foreground(
    app_args: dict[str, Any],
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    grace_s: float = SHUTDOWN_GRACE_S,
) -> int:
    """Start Serve on host:port, run the app, block until Ctrl-C or SIGTERM, then shut Serve down: the
    requests in flight answered first, then `grace_s` more of 503 `shutting_down` (and /readyz 503) for
    whatever still arrives, before the port closes."""
    import ray
    from ray import serve

    from cxrcore.console import is_quiet
    from cxrcore.runtime import dashboard_text, init_ray

    if not 0 <= grace_s <= MAX_GRACE_S:  # NaN too; Event.wait overflows on inf
        raise ValueError(f"--grace-s: expected 0 to {MAX_GRACE_S:g} seconds, got {grace_s}")
    args = ServeArgs.model_validate(app_args)
    app = build_app(args)  # fails here, before Ray starts, on a bad registry or model reference
    resolved = resolve_model(_registry(args), args.model)
    pinned = resolved.ref  # what the app serves until a swap
    local = not (address or os.environ.get("RAY_ADDRESS"))
    stopped = local and stop_stray_haproxy()
    if local:
        prune_haproxy_folders()  # after the strays: their folders go with them
    if stopped:
        print("stopped an HAProxy that an earlier Serve left running", file=sys.stderr, flush=True)
    if args.audit_log and not args.audit_dir:
        print(f"note: {AUDIT_IN_SESSION_NOTE}", file=sys.stderr, flush=True)
    if local:  # before Ray starts, not as HAProxy's crash after it; a port the stray held, freed in a moment
        _port_free_soon(host, port, PORT_RELEASE_S if stopped else 0.0)
    # On a cluster joined by address, Serve's controller, proxies and replicas log to this console whatever
    # they log to their files: 52 of a review's 57 lines were their INFO and access lines. A quiet `cxr
    # serve` leaves them in the files (the dashboard's Serve page), as its local cluster's replicas do.
    dashboard = init_ray(address, cluster_logs=not is_quiet())
    if local:  # nothing adds GPUs to it: an app that needs more than it has would wait out its start
        try:
            check_gpus(args, ray.cluster_resources().get("GPU", 0.0))
        except ValueError:
            ray.shutdown()
            raise
    stop, signals = threading.Event(), []

    def on_signal(*_: Any) -> None:
        signals.append(1)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    if is_quiet():  # "Started Serve", then serve.run's "New http_options ... will not be applied", which
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # reads as if --port had been ignored
    try:
        with refused_if_taken(host, port, check=local):
            serve.start(http_options={"host": host, "port": port})
            run_app(app)
        node = ray.get_runtime_context().get_node_id()
        restrict_haproxy_files(node)
        front = " through HAProxy" if _haproxy_of(node) else ""
        # an alias or a name stands for the version it names now; a checkpoint folder is itself
        moving = pinned != args.model and "/" not in args.model and ":" not in args.model
        named = f"{args.model} ({pinned})" if moving else args.model
        print(
            f"serving {named} at http://{host}:{port}{front} (API docs: /docs; Ray dashboard: "
            f"{dashboard_text(dashboard)}, replica logs on its Serve page); Ctrl-C to stop",
            flush=True,
        )
        for warning in resolved.warnings:  # as `cxr tune` said them, and GET /v1/model says them
            print(f"WARNING: {pinned}: {warning}", flush=True)
        if moving:
            print(
                f"  {args.model} is resolved now: promoting another version later does not change what this "
                f"server answers with; to swap it, `serve deploy` with `model: {pinned}` in its args "
                "(serve/README.md: Swapping the model without downtime)",
                flush=True,
            )
        stop.wait()
        print("shutting down Serve: answering the requests in flight first", file=sys.stderr, flush=True)
        left = drain_ingress(args.ingress_replicas)
        if left:
            print(f"{left} requests still in flight after {DRAIN_TIMEOUT_S:g} s are cut off", file=sys.stderr)
        # Answers on their way back through HAProxy, requests it still queues and load balancers that poll
        # /readyz: stopping Serve at once reset them. A review's SIGTERM under 32 clients cut 14 of the 32
        # requests in flight and 33 of the 38 sent after it, whose 503s the ingress had already made.
        stop.clear()
        if len(signals) < 2:  # a second Ctrl-C or SIGTERM, during the drain or the grace, ends it at once
            stop.wait(grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutdown_serve()
        ray.shutdown()
    return 0


def drain_ingress(replicas: int, timeout_s: float = DRAIN_TIMEOUT_S) -> int:
    """Have every ingress replica refuse new predictions (503 `shutting_down`, /readyz 503) and answer
    those in flight, for at most `timeout_s`; return how many were still in flight then. Serve's
    shutdown stops HAProxy first, which would cut their connections.

    A handle call reaches one replica, so calls go out until each of the `replicas` has answered: one
    still draining holds its call, and the router sends the next to another."""
    import time

    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not the handle's router start-up, at exit
    try:
        handle = serve.get_app_handle(APP_NAME)
    except Exception as exc:  # the app is gone already (a failed replica, Serve shut down): nothing to drain
        log.warning("draining the ingress: %s", exc)
        return 0
    if not handle.is_initialized:
        # Its router on a loop of its own, as a handle outside any event loop needs. In Serve's
        # throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, which the cluster manifests set on
        # every node) a handle's router runs on its caller's loop by default, and the first call failed
        # with "No event loop running": `cxr serve` on such a node ended in a traceback at Ctrl-C, draining
        # nothing.
        handle._init(_run_router_in_separate_loop=True)
    deadline = time.monotonic() + timeout_s
    left: dict[str, int] = {}
    while len(left) < replicas and (remaining := deadline - time.monotonic()) > 0:
        calls = [handle.drain.remote(remaining) for _ in range(replicas - len(left))]
        try:
            answers = [call.result(timeout_s=remaining + 5) for call in calls]
        except Exception as exc:  # a replica gone, or the app already down: nothing more to wait for
            log.warning("draining the ingress: %s", exc)
            break
        left.update((answer["replica"], answer["in_flight"]) for answer in answers)
    return sum(left.values())


def demo_predictions(
    app_args: dict[str, Any], files: list[str], host: str = "127.0.0.1", port: int = 8000
) -> list[dict[str, Any]]:
    """Serve the app on the running Ray, POST each file over HTTP, shut Serve down: the demo's last step."""
    from pathlib import Path

    import httpx
    import ray
    from ray import serve

    from cxrcore.console import is_quiet

    args = ServeArgs.model_validate(app_args)
    # The demo's console shows its four answers, not Serve's INFO and access lines (they stay in the logs).
    quiet = {"log_level": "WARNING", "enable_access_log": False} if is_quiet() else None
    if quiet:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this process's "Started Serve" lines
    # Serve's own actors (controller, proxies) only for errors: on one node their HAProxy warnings
    # (cross-node routing, autoscaling bookkeeping of the ingress) say nothing the demo's user can act on.
    system = {**quiet, "log_level": "ERROR"} if quiet else None
    try:
        with refused_if_taken(host, port, check=False):
            serve.start(http_options={"host": host, "port": port}, logging_config=system)
            run_app(build_app(args), logging_config=quiet)
        restrict_haproxy_files(ray.get_runtime_context().get_node_id())
        answers = []
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=60) as client:
            for path in files:
                # as `cxr predict` sends it: a TIFF, BMP, WebP or JPEG 2000 of the dataset as its PNG
                data, content_type = upload_bytes(Path(path).read_bytes())
                upload = (Path(path).name, data, content_type) if content_type else (Path(path).name, data)
                response = client.post("/v1/predict", files={"file": upload})
                if response.status_code != 200:  # a sentence, not an httpx traceback
                    raise ExampleRefused(
                        f"the served model refused {path}: HTTP {response.status_code} {response.text}"
                    )
                answers.append({"file": path, **response.json()})
        return answers
    finally:
        shutdown_serve()


@contextmanager
def refused_if_taken(host: str, port: int, check: bool) -> Iterator[None]:
    """Around Serve's start on host:port: where another process took the port while Ray started (two
    `cxr serve` or demos started together pass the check made before Ray, ~20 s earlier), a ConfigError
    saying so, not HAProxy's 47-line traceback after the training. `check`: look again first (the port
    is on this machine, a local cluster's)."""
    from cxrcore.config import ConfigError
    from cxrcore.runtime import check_port_free

    if check:
        check_port_free(host, port)
    try:
        yield
    except Exception as exc:
        if not _address_in_use(exc):
            raise
        raise ConfigError(
            f"--port: {host}:{port} was taken while Ray started (by a server started at the same moment?); "
            "stop what listens there, or choose another port with --port"
        ) from exc


def _address_in_use(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, says a socket's address is in use."""
    seen = 0
    while exc is not None and seen < 20:
        text = str(exc)
        if "address already in use" in text.lower():
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def run_app(
    app: Any, timeout_s: float = START_TIMEOUT_S, logging_config: dict[str, Any] | None = None
) -> None:
    """Deploy `app` as APP_NAME and wait until it runs; raise, naming each deployment's state, when it
    failed or is not up after `timeout_s` (a replica that no node has room for would wait forever).
    `logging_config` (Serve's LoggingConfig fields) applies to every deployment of the app."""
    import time

    from ray import serve

    target = serve.RunTarget(app, name=APP_NAME, route_prefix="/", logging_config=logging_config)
    serve.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(APP_NAME)
        state = str(status.status) if status else "NOT_STARTED"
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    deployments = "; ".join(
        f"{name}: {str(d.status).rsplit('.', 1)[-1]}" + (f" ({d.message})" if d.message else "")
        for name, d in (status.deployments.items() if status else [])
    )
    if state.endswith("DEPLOY_FAILED"):  # a replica raised: its log has the traceback, not the cluster
        raise ServeStartError(
            f"Serve application {APP_NAME!r} failed to deploy: {deployments or state}. The replica's own "
            "log says why (the dashboard's Serve page, or the replica's file under the session's logs/serve)"
        )
    raise ServeStartError(
        f"Serve application {APP_NAME!r} is not running after {timeout_s:.0f} s: {deployments or state}. "
        "`ray status` shows what the cluster has free; a replica needs a CPU (or GPU) that no Train run or "
        "Tune trial holds."
    )


class ServeStartError(RuntimeError):
    """The application did not come up: a replica failed, or none found room within the start timeout."""


class ExampleRefused(ServeStartError):
    """The application came up, but refused an example the demo sent it (its error answer said why)."""
