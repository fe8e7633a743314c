"""The Serve application: `build_app` (`serve.app:build_app`) wires ingress, classifier and segmenter.

    serve run serve/config.yaml                  # foreground, local
    serve deploy serve/config.yaml -a URL        # a running cluster (RAY_AUTH_MODE=token)
    cxr serve --registry REG --model production  # foreground, local, same app

The model reference is pinned to a registry version here and handed to the classifier as its
`user_config`, so every replica (also those autoscaling adds later) serves the same version, and a
new `user_config` swaps it in place.
"""

# No `from __future__ import annotations`: Serve validates `args` into ServeArgs only when the
# builder's annotation is the class itself, not a string.
from pathlib import Path

from ray.serve import Application

from serve.deployments import Classifier, Segmenter, resolve_model, resolve_segmenter
from serve.ingress import Api, ApiLimits
from serve.schemas import ClassifierConfig, ServeArgs

# Requests the ingress handles (or queues) beyond what the classifier holds: quick 503 answers. The
# ingress answers the excess in milliseconds, so its own bound can be generous; at 64, a burst of 128 on
# 2 busy cores filled the ingress queue before it drained, and Serve's proxy refused in plain text.
INGRESS_HEADROOM = 256


def check_gpus(args: ServeArgs, cluster_gpus: float) -> None:
    """Refuse, at once, an app whose model replicas at their autoscaling floor need more GPUs than a
    cluster that cannot grow has: its replicas would wait for them until the start times out (300 s).

    A dual-channel model's segmenter deployment holds `num_gpus` per replica beside the classifier's, so on
    one GPU both fit with `num_gpus=0.5`. A cluster with an autoscaler adds GPU nodes instead: this is for
    `cxr serve`'s own local cluster.
    """
    if args.num_gpus <= 0:
        return
    dual = resolve_model(_registry(args), args.model).needs_mask
    needed = args.num_gpus * args.min_replicas * (2 if dual else 1)
    if needed <= cluster_gpus + 1e-9:
        return
    what = (
        f"a classifier and a lung segmenter replica (a dual-channel model), each num_gpus={args.num_gpus:g}"
        if dual
        else f"a classifier replica of num_gpus={args.num_gpus:g}"
    )
    share = cluster_gpus / (args.min_replicas * (2 if dual else 1)) if args.min_replicas else 0
    fix = f"--arg num_gpus={share:g}" if share > 0 else "run it where there is a GPU, or without num_gpus"
    raise ValueError(
        f"the app needs {needed:g} GPU(s) to start (min_replicas={args.min_replicas} × {what}); this cluster "
        f"has {cluster_gpus:g}: {fix}"
    )


def _registry(args: ServeArgs) -> str | None:
    """The registry as every replica reads it: a local folder made absolute."""
    registry = args.registry
    if registry is not None and "://" not in registry:
        registry = str(Path(registry).expanduser().resolve())
    return registry


def _check_audit_dir(folder: str) -> None:
    """The audit trail's folder can be made and written here (on a cluster, each replica's node makes its
    own too): one under a file, or read-only, failed each ingress replica's deploy after Ray had started."""
    import os
    from pathlib import Path

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"audit_dir {folder}: cannot make it ({exc.strerror or exc})") from exc
    if not os.access(folder, os.W_OK):
        raise ValueError(f"audit_dir {folder}: not writable by this user, so no audit line could be")


def build_app(args: ServeArgs) -> Application:
    """The cxr application for `args`; the segmenter gets its own deployment when the model needs masks."""
    if args.audit_log and args.audit_dir:  # here, before Ray starts: not as every replica's deploy failure
        _check_audit_dir(args.audit_dir)
    registry = _registry(args)  # every replica must read the same folder
    resolved = resolve_model(registry, args.model)
    task = resolved.card.input_spec.get("task", "classify")
    if task != "classify":  # refused here, before Ray starts, not by every replica after it
        raise ValueError(
            f"{resolved.ref} is a {task} model (a lung segmenter), not a classifier: serve a classifier "
            "(--model NAME:N or an alias); a dual-channel one brings its segmenter along"
        )
    autoscaling = {
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
        "upscale_delay_s": args.upscale_delay_s,
        "downscale_delay_s": args.downscale_delay_s,
        "look_back_period_s": args.look_back_period_s,
    }
    actor_options = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    segmenter = None
    if resolved.needs_mask:
        if not resolved.card.segmenter:
            raise ValueError(f"{resolved.ref} needs a lung mask but its card names no segmenter checkpoint")
        # A segmenter that is nowhere fails here; each replica then finds its own copy of what the card names.
        try:
            resolve_segmenter(registry, resolved.card.segmenter, resolved.ref)
        except (KeyError, FileNotFoundError) as exc:  # RegistryError is a KeyError too
            raise ValueError(
                f"{resolved.ref}'s card names a lung segmenter that cannot be found: {exc}"
            ) from exc
        segmenter = Segmenter.options(  # type: ignore[attr-defined]  # a serve.deployment
            autoscaling_config={**autoscaling, "target_ongoing_requests": 2},
            ray_actor_options=actor_options,
        ).bind(resolved.card.segmenter, args.device, registry, args.max_batch_size, args.forward_batch_size)
    user_config = ClassifierConfig(
        model=resolved.ref,
        max_batch_size=args.max_batch_size,
        forward_batch_size=args.forward_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
    )
    # Overload: once every classifier replica holds max_ongoing_requests and the ingress queues
    # max_queued_requests more, the handle raises BackPressureError at once and the ingress answers
    # 503 `overloaded` JSON with Retry-After, so a burst costs neither unbounded latency nor memory.
    backpressure = {"retry_after_s": args.retry_after_s}
    classifier = Classifier.options(  # type: ignore[attr-defined]  # a serve.deployment
        autoscaling_config={**autoscaling, "target_ongoing_requests": args.target_ongoing_requests},
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        backpressure_config=backpressure,
        ray_actor_options=actor_options,
        user_config=user_config.model_dump(),
    ).bind(
        registry,
        segmenter,
        args.device,
        args.max_batch_size,
        args.batch_wait_timeout_s,
        args.forward_batch_size,
        app_model=resolved.ref,
    )
    # The ingress takes everything the classifier can hold, plus room to answer the excess with those
    # JSON 503s; past that, Serve's proxy refuses with its own plain-text 503 (and Retry-After).
    capacity = args.max_replicas * args.max_ongoing_requests + args.max_queued_requests
    limits = ApiLimits(
        args.max_upload_bytes,
        args.min_image_side,
        args.retry_after_s,
        args.upload_idle_timeout_s,
        args.upload_timeout_s,
        tuple(origin.strip() for origin in args.cors_origins.split(",") if origin.strip()),
        args.model_timeout_s,
        args.audit_log,
        args.audit_dir,
        args.audit_user_header,
    )
    return Api.options(  # type: ignore[attr-defined]  # a serve.deployment
        num_replicas=args.ingress_replicas,
        max_ongoing_requests=capacity + INGRESS_HEADROOM,
        max_queued_requests=INGRESS_HEADROOM,
        backpressure_config=backpressure,
    ).bind(classifier, limits)
