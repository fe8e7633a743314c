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


def build_app(args: ServeArgs) -> Application:
    """The cxr application for `args`; the segmenter gets its own deployment when the model needs masks."""
    registry = args.registry
    if registry is not None and "://" not in registry:
        registry = str(Path(registry).expanduser().resolve())  # every replica must read the same folder
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
        resolve_segmenter(registry, resolved.card.segmenter)
        segmenter = Segmenter.options(
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
    classifier = Classifier.options(
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
    )
    return Api.options(
        num_replicas=args.ingress_replicas,
        max_ongoing_requests=capacity + INGRESS_HEADROOM,
        max_queued_requests=INGRESS_HEADROOM,
        backpressure_config=backpressure,
    ).bind(classifier, limits)
