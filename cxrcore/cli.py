"""The `cxr` console script; `python -m jobs.<name>` entrypoints dispatch to the same commands."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib
import io
import json
import logging
import math
import os
import re
import shlex
import sys
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from cxrcore import plan
from cxrcore.config import (
    PRETRAINED_CHOICES,
    BenchmarkConfig,
    ConfigError,
    EvaluateConfig,
    IngestConfig,
    PipelineConfig,
    SynthConfig,
    TrainConfig,
    TuneConfig,
    UnsafeWeightsError,
    add_config_arguments,
    config_from_args,
    flag_name,
)
from cxrcore.console import quiet_ray_console
from cxrcore.data.layout import LayoutError
from cxrcore.data.split import SPLITS
from cxrcore.labels import CLASSES
from cxrcore.registry import (
    UNREADABLE_REPORT,
    ModelRegistry,
    RegistryError,
    evaluation_warnings,
    registered_test,
    report_warning,
    serving_warnings,
)
from cxrcore.runtime import Interrupted, storage_error, storage_reason
from cxrcore.summaries import (
    format_cell,
    format_comparison,
    format_holdout,
    format_ingest_report,
    format_scan,
    format_train_result,
    scan_confound,
    train_warnings,
)
from cxrcore.tables import format_table

Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run one command, return its exit status (errors become a one-line message)."""
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints with escapes, not a crash
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        # "WARNING: ..." as every warning cxr prints; the module beside it where -v asks for the detail
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(levelname)s: %(message)s",
    )
    if not hasattr(args, "run"):
        getattr(args, "help_of", parser).print_help()
        return 2
    from cxrcore.runtime import bypass_proxy, forget_sigterm, keep_matplotlib_config_writable

    forget_sigterm()
    bypass_proxy()  # `cxr predict`'s requests to a server on this machine never go through a proxy
    keep_matplotlib_config_writable()
    ray_before = _ray_running()
    try:
        with quiet_ray_console() if not args.verbose else contextlib.nullcontext():
            status: int = args.run(args)
        if not ray_before:
            _stop_ray_undisturbed()
        return status
    except (ConfigError, LayoutError, RegistryError, FileNotFoundError, UnsafeWeightsError) as exc:
        print(f"cxr: error: {exc}", file=sys.stderr)
        return 2
    except (NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError) as exc:
        # a path given where the other kind is, or one this user may not write: the path and why
        where = f"{exc.filename}: " if exc.filename else ""
        reason = exc.strerror or str(exc)
        if isinstance(exc, FileExistsError) and exc.filename and os.path.isfile(exc.filename):
            reason = "a file is there, where a folder is needed"  # os.makedirs said "File exists"
        hint = _elsewhere_hint(args, exc.filename) if isinstance(exc, PermissionError) else ""
        print(f"cxr: error: {where}{reason}{hint}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        from cxrcore.runtime import sigterm_received

        _disconnect_ray()  # the line that ends the run is the last one printed
        signal_name = "SIGTERM" if sigterm_received() else "Ctrl-C"
        said = f": {exc}" if isinstance(exc, Interrupted) else f" by {signal_name}"
        print(f"cxr: interrupted{said}", file=sys.stderr)
        return 143 if sigterm_received() else 130
    except BrokenPipeError:  # `cxr ... | head`
        sys.stderr.close()
        return 0
    except Exception as exc:
        if (full := storage_error(exc)) is not None:
            # A read-only mount (NFS, a container's volume; exit 2, as a folder this user may not write), a
            # full disk, a quota or `ulimit -f` (exit 1), here or in a Ray task, worker or trial: the path
            # and why, not a traceback. What the run wrote is staged beside its output, which stays as it was.
            where = f"{full.filename}: " if full.filename else ""
            hint = _elsewhere_hint(args, full.filename) if full.errno == errno.EROFS else ""
            print(f"cxr: error: {where}{storage_reason(full)}{hint}", file=sys.stderr)
            return 2 if full.errno == errno.EROFS else 1
        if (locale := undecodable_path(exc)) is not None:
            print(f"cxr: error: {locale}", file=sys.stderr)
            return 2
        if (why := decoder_unavailable(exc)) is None:
            raise
        print(
            f"cxr: error: this machine cannot decode compressed DICOM right now ({why}); no file is at "
            "fault and nothing was written: run the same command again once processes are free",
            file=sys.stderr,
        )
        return 1


def undecodable_path(exc: BaseException) -> str | None:
    """What to do where a path Python read under a non-UTF-8 locale reached Arrow (or anything else that
    takes UTF-8 text): with `PYTHONUTF8=0` and `LC_ALL=C`, Python reads a name's non-ASCII bytes as
    surrogate escapes, which Arrow cannot encode; None for any other error. (Python's own default under
    the C locale is UTF-8 mode, where such a name reads as itself.)"""
    while exc is not None:
        if isinstance(exc, UnicodeEncodeError) and any(0xDC80 <= ord(c) <= 0xDCFF for c in exc.object):
            encoding = sys.getfilesystemencoding()
            return (
                f"a path holds characters that Python's file-system encoding ({encoding}) cannot pass on: "
                f"{exc.object.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')}; "
                "run with PYTHONUTF8=1 (or a UTF-8 locale, LC_ALL=C.UTF-8), or use paths in ASCII"
            )
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _elsewhere_hint(args: argparse.Namespace, filename: object) -> str:
    """Where a path this user may not write (or a read-only one) is in the current folder, as a command's
    default output is (`./cxr-runs`, `./cxr-demo`): the way round it, the command's output argument named."""
    fields = dataclasses.fields(args.config_cls) if hasattr(args, "config_cls") else ()
    output = next((f for f in fields if f.name in ("out", "work_dir")), None)
    if not isinstance(filename, str | os.PathLike) or output is None:
        return ""
    flag = output.name.upper() if output.metadata.get("positional") else flag_name(output.name)
    try:
        if not Path(os.path.abspath(filename)).is_relative_to(os.getcwd()):
            return ""
    except OSError:  # the current folder itself is gone
        return ""
    return f" (in the current folder: run from a folder you can write, or give {flag} one)"


SERVE_IMPORTS = ("cxrcore", "serve")
"""What Serve's replicas import of cxr: `cxr serve` and the demo check the folder for both."""


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def _stop_ray_undisturbed() -> None:
    """Stop the Ray this command started, once it has finished, with Ctrl-C held off meanwhile. Left to
    the exit, a Ctrl-C pressed as the local cluster stopped (a moment after the last line, as users do)
    ended a finished ingest in Ray's traceback with exit status 1, and left Ray's agents running. A
    caller's own Ray (a notebook, the tests' session) is left as it was."""
    if not _ray_running():
        return
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        _disconnect_ray()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _disconnect_ray()
    finally:
        signal.signal(signal.SIGINT, previous)


def _disconnect_ray() -> None:
    """Disconnect from Ray now, as the exit would (a local cluster stops), rather than after the last
    message: a trial's epoch line still on its way from the workers would otherwise print after it."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


_DECODER_UNAVAILABLE = re.compile(r"^cxrcore\.data\.transforms\.DecoderUnavailableError: (.+)$", re.MULTILINE)


def decoder_unavailable(exc: BaseException) -> str | None:
    """Why the DICOM decoder's process could not be started, if that is what `exc` is about: raised here
    (`data check`), or in a Ray Data task (`data ingest`), which reaches the driver as Ray's
    RayTaskError(UserCodeException) holding the original only as traceback text."""
    from cxrcore.data.transforms import DecoderUnavailableError

    if isinstance(exc, DecoderUnavailableError):
        return str(exc)
    if exc.__class__.__module__.startswith("ray.") and (found := _DECODER_UNAVAILABLE.search(str(exc))):
        return found.group(1)
    return None


def _positive_seconds(value: str) -> float:
    """An argparse type: a finite number of seconds above 0 (`--timeout -1` ended in a traceback)."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {value}")
    return seconds


def _version_line() -> str:
    """cxr's version, with Ray's and torch's as installed (without importing them: `--version` is quick)."""
    from importlib.metadata import PackageNotFoundError, version

    import cxrcore

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    from cxrcore.provenance import source_commit, source_sha256

    python = sys.version.split()[0]
    code = f"commit {source_commit() or 'unknown (not a git checkout)'}, source sha256 {source_sha256()[:12]}"
    return f"cxr {cxrcore.__version__} ({code}; ray {of('ray')}, torch {of('torch')}, Python {python})"


class _Version(argparse.Action):
    """`--version`, its line made only when asked for (it runs git and hashes cxr's source)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(_version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr", description="Train, compare and serve chest X-ray classifiers on a Ray cluster."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    parser.add_argument("--version", action=_Version, help="show cxr's version (and its code's) and exit")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    data = commands.add_parser("data", help="inspect, synthesise and ingest datasets")
    data.set_defaults(help_of=data)  # `cxr data` alone: its own commands, not the top level's
    data_commands = data.add_subparsers(title="data commands", metavar="COMMAND")
    check = data_commands.add_parser(
        "check", help="report what a raw dataset folder holds and what is wrong with it"
    )
    _add_ingest_arguments(
        check, ("raw", "labels", "label_column", "file_column", "patient_column", "map", "skip_unmapped")
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(run=_run_check)
    _add_config_command(data_commands, "synth", SynthConfig, _run_synth, "write synthetic chest X-rays")
    _add_config_command(
        data_commands,
        "ingest",
        IngestConfig,
        _run_ingest,
        "ingest a raw dataset to Parquet",
        plan.ingest_plan,
        _check_ingest,
    )

    _add_config_command(
        commands,
        "train",
        TrainConfig,
        _run_train,
        "train a model with Ray Train (DDP)",
        plan.train_plan,
        _check_train_or_tune,
    )
    _add_config_command(
        commands,
        "tune",
        TuneConfig,
        _run_tune,
        "compare architectures with Ray Tune",
        plan.tune_plan,
        _check_train_or_tune,
    )
    _add_config_command(
        commands, "evaluate", EvaluateConfig, _run_evaluate, "score a model on a dataset, its own or another"
    )
    compare = commands.add_parser(
        "compare",
        help="compare two models image by image: two `cxr evaluate` folders of the same images",
        description="Compare two models scored on the same images, image by image: give two folders "
        "`cxr evaluate --out` wrote (the same dataset and split, e.g. production and a candidate, or a "
        "shipped model and its fine-tune on this site's test split). Prints each model's accuracy, macro-F1 "
        "and per-class recall on the images both scored, the differences with 95% "
        "intervals, and McNemar's exact test on the images exactly one of them got right.",
    )
    compare.add_argument("first", metavar="EVAL_A", help="a `cxr evaluate` output folder")
    compare.add_argument("second", metavar="EVAL_B", help="another, of the same images")
    compare.add_argument("--json", action="store_true", help="print the comparison as JSON")
    compare.set_defaults(run=_run_compare)
    _add_models_commands(commands)
    serve = commands.add_parser(
        "serve", help="serve a model over HTTP with Ray Serve (foreground; Ctrl-C stops it)"
    )
    serve.add_argument(
        "--registry",
        default=os.environ.get("CXR_REGISTRY"),
        help="model registry (folder or URI; default: $CXR_REGISTRY); without one, --model is a checkpoint",
    )
    serve.add_argument(
        "--model", default="production", help="registry alias, name:N or name; or a checkpoint folder"
    )
    serve.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    serve.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    serve.add_argument(
        "--grace-s", type=float, default=3.0,
        help="on Ctrl-C or SIGTERM, after the requests in flight are answered, seconds of 503 "
        "shutting_down (and /readyz 503) before the port closes, for load balancers to look elsewhere; a "
        "second signal ends them (default: %(default)s)",
    )  # fmt: skip
    serve.add_argument(
        "--arg", action="append", default=[], metavar="KEY=VALUE",
        help="another field of serve.schemas.ServeArgs, e.g. --arg max_replicas=4 (repeatable)",
    )  # fmt: skip
    serve.set_defaults(run=_run_serve)
    predict = commands.add_parser("predict", help="classify image files with a running `cxr serve` endpoint")
    predict.add_argument(
        "files",
        nargs="+",
        metavar="PATH",
        help="image files (PNG, JPEG, DICOM; TIFF, BMP, WebP and JPEG 2000 sent as PNG), or folders of them",
    )
    predict.add_argument("--url", default="http://127.0.0.1:8000", help="server URL (default: %(default)s)")
    predict.add_argument(
        "--timeout", type=_positive_seconds, default=60.0, help="seconds per request (default: 60)"
    )
    predict.add_argument(
        "--json", action="store_true",
        help="print each answer whole as a JSON line (file, HTTP status, and the server's JSON: model and "
        "weights, input_sha256, request_id, answered_at, input_check), for a record of the predictions",
    )  # fmt: skip
    predict.set_defaults(run=_run_predict)
    _add_config_command(
        commands, "demo", PipelineConfig, _run_pipeline, "run the whole pipeline on a local Ray cluster"
    )
    _add_config_command(
        commands, "benchmark", BenchmarkConfig, _run_benchmark, "measure each stage against its baseline"
    )
    _describe_subcommands(parser)
    return parser


def _describe_subcommands(parser: argparse.ArgumentParser) -> None:
    """Give each subcommand made with only a `help` that line as its description too, so that its own
    --help says what it does (`cxr serve --help` began with the usage alone)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    sub.description = helps[name]
                _describe_subcommands(sub)


def _add_config_command(
    commands: Any,
    name: str,
    config_cls: type,
    run: Command,
    help_text: str,
    planner: Callable[[Any], str] | None = None,
    checks: Callable[[Any], list[str]] | None = None,
) -> argparse.ArgumentParser:
    """A command whose flags are `config_cls`'s fields; with a `planner`, also `--dry-run`, which prints
    the plan and then runs `checks`: what the run checks before Ray starts."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help_text, description=(config_cls.__doc__ or help_text).split("\n")[0]
    )
    add_config_arguments(parser, config_cls)
    if planner is not None:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="print the plan, then check what the run checks before Ray starts (the settings, every "
            "name, the input, the output free); starts no Ray, decodes no image",
        )
        run = _run_or_plan(run, planner, checks or (lambda config: []))
    parser.set_defaults(run=run, config_cls=config_cls)
    return parser


def _run_or_plan(run: Command, planner: Callable[[Any], str], checks: Callable[[Any], list[str]]) -> Command:
    """`run`, or under --dry-run the plan of the config it would run, then the run's own checks before Ray.
    A wrong setting, or a refusal of what is on this machine (a damaged dataset, an output another run is
    writing), exits 2 as the run would. What this machine lacks (a dataset or GPUs the plan may be for) is
    a note: the plan stands for the machine that has them, and here the run would stop."""

    def run_or_plan(args: argparse.Namespace) -> int:
        if not args.dry_run:
            return run(args)
        config = config_from_args(args.config_cls, args)
        print(planner(config), flush=True)
        for note in [*checks(config), *_cluster_notes(config)]:
            print(f"note: on this machine the run would stop: {note}", file=sys.stderr)
        return 0

    return run_or_plan


def _cluster_notes(config: Any) -> list[str]:
    """The cluster a run would join (--address, else RAY_ADDRESS) where nothing answers, as a dry run's note:
    the run would be refused there, after a 5-second probe (a stale RAY_ADDRESS, a review, session 54)."""
    from cxrcore.runtime import check_cluster_address

    try:
        check_cluster_address(getattr(config, "address", None))
    except ConfigError as error:
        return [str(error)]
    return []


def _add_ingest_arguments(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Some of `cxr data ingest`'s arguments, with its help, for a command that reads RAW the same way."""
    hints = typing.get_type_hints(IngestConfig)
    for f in dataclasses.fields(IngestConfig):
        if f.name not in names:
            continue
        if f.metadata.get("positional"):
            parser.add_argument(f.name, metavar=f.name.upper(), help=f.metadata["help"])
        elif hints[f.name] is bool:
            parser.add_argument(flag_name(f.name), action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(flag_name(f.name), metavar=f.name.upper(), help=f.metadata["help"])


def _add_models_commands(commands: Any) -> None:
    models = commands.add_parser("models", help="model architectures; versions and aliases in a registry")
    models.set_defaults(help_of=models)
    models_commands = models.add_subparsers(title="models commands", metavar="COMMAND")
    architectures = models_commands.add_parser("architectures", help="list the model architectures")
    architectures.set_defaults(run=_run_architectures)
    listing = models_commands.add_parser("list", help="list registered versions: aliases, scores, data")
    _add_registry_argument(listing)
    listing.add_argument("--name", help="only the versions of this model")
    listing.set_defaults(run=_run_list)
    show = models_commands.add_parser("show", help="show a registered version's card and where it is stored")
    show.add_argument("ref", help="alias, NAME:N, or NAME for its latest version")
    _add_registry_argument(show)
    show.add_argument("--json", action="store_true", help="print it as JSON")
    show.set_defaults(run=_run_show)
    promote = models_commands.add_parser("promote", help="point an alias at a registered version")
    promote.add_argument("ref", help="alias, NAME:N, or NAME for its latest version")
    _add_registry_argument(promote)
    promote.add_argument("--alias", default="production", help="alias to move (default: %(default)s)")
    promote.set_defaults(run=_run_promote)
    history = models_commands.add_parser(
        "history", help="every move of an alias: when, from which version to which, by whom"
    )
    _add_registry_argument(history)
    history.add_argument("--alias", help="only the moves of this alias")
    history.add_argument("--json", action="store_true", help="print them as JSON lines")
    history.set_defaults(run=_run_history)
    seal = models_commands.add_parser(
        "seal",
        help="record the weights' sha256 and the data manifest in versions an earlier cxr registered",
    )
    seal.add_argument("ref", nargs="?", help="alias, NAME:N, or NAME for its latest version (default: all)")
    _add_registry_argument(seal)
    seal.add_argument("--dry-run", action="store_true", help="say what would be recorded; write nothing")
    seal.set_defaults(run=_run_seal)
    register = models_commands.add_parser(
        "register",
        help="register a checkpoint (`cxr train`'s best) as its model's next version, with its segmenter",
    )
    register.add_argument("checkpoint", help="checkpoint folder or URI: `cxr train` prints its best")
    _add_registry_argument(register)
    register.add_argument("--report", help="an evaluation folder to keep with it (`cxr evaluate --out`)")
    register.add_argument("--alias", help="an alias to point at it (e.g. staging; production to serve it)")
    register.set_defaults(run=_run_register)
    add_evaluation = models_commands.add_parser(
        "add-evaluation",
        help="keep an evaluation of a version (another hospital's data above all) with it in the registry",
    )
    add_evaluation.add_argument("ref", help="alias, NAME:N, or NAME for its latest version")
    add_evaluation.add_argument("report", help="the `cxr evaluate --out` folder of that version's weights")
    _add_registry_argument(add_evaluation)
    add_evaluation.set_defaults(run=_run_add_evaluation)
    clean = models_commands.add_parser(
        "clean", help="free what registrations killed midway left (version folders without a card)"
    )
    _add_registry_argument(clean)
    clean.add_argument(
        "--older-than",
        type=_duration,
        default=_duration("1h"),
        metavar="AGE",
        help="only folders unchanged this long, so running registrations are safe: 90s, 30m, 1h, 0 "
        "(default: 1h)",
    )
    clean.add_argument("--dry-run", action="store_true", help="list what would be freed, free nothing")
    clean.set_defaults(run=_run_clean)
    import_weights = models_commands.add_parser(
        "import-weights",
        help="write an architecture's ImageNet weights for one channel, without the classifier, as "
        "safetensors (for --pretrained FILE or FOLDER on workers without internet)",
    )
    import_weights.add_argument(
        "arch", metavar="ARCH", help="an architecture with hub weights: resnet18, resnet34, resnet50, ..."
    )
    import_weights.add_argument(
        "--out",
        required=True,
        help="the .safetensors file to write, or a folder: ARCH-1ch.safetensors there, as `--pretrained "
        "FOLDER` reads it",
    )
    import_weights.add_argument(
        "--from",
        dest="source",
        metavar="SOURCE",
        help="a local 3-channel state_dict (.safetensors/.pth/.pt/.bin) instead of the model hub",
    )
    import_weights.add_argument(
        "--force",
        action="store_true",
        help="replace an existing file (runs that started from it name it by its sha256 in their cards)",
    )
    import_weights.set_defaults(run=_run_import_weights)


def _add_registry_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry", default=os.environ.get("CXR_REGISTRY"), help="registry folder or URI ($CXR_REGISTRY)"
    )


def _registry(args: argparse.Namespace) -> ModelRegistry:
    if not args.registry:
        raise ConfigError("--registry: no model registry given (pass --registry or set CXR_REGISTRY)")
    local = os.path.expanduser(args.registry)  # '~/reg' quoted, or from CXR_REGISTRY: as register takes it
    if "://" not in args.registry and os.path.exists(local) and not os.path.isdir(local):
        raise ConfigError(f"--registry: {args.registry} is a file, not a registry folder")
    if "://" not in args.registry and not os.path.isdir(local):
        raise ConfigError(
            f"--registry: no registry at {args.registry} (no such folder here); `cxr tune` and the demo "
            "create one where they register"
        )
    return ModelRegistry(args.registry)


def _run_check(args: argparse.Namespace) -> int:
    from cxrcore.config import parse_label_map
    from cxrcore.data.layout import LabelFile, check_layout

    labels = args.labels and os.path.expanduser(args.labels)
    label_file = LabelFile.from_flags(labels, args.label_column, args.file_column, args.patient_column)
    scan = check_layout(os.path.expanduser(args.raw), label_file, parse_label_map(args.map))
    if args.json:
        from cxrcore.data.ingest import printable_json

        data = scan.to_dict()
        if confound := scan_confound(scan):  # as the text says it: ingest's warning, before the ingest
            data["warnings"] = [*data["warnings"], confound]
        print(json.dumps(printable_json(data), indent=2))
    else:
        print(format_scan(scan, args.skip_unmapped))
    if not scan.usable:
        print(
            f"cxr: error: no usable image under {scan.root} (each is listed above with why)", file=sys.stderr
        )
        return 1
    if scan.refusal() and not args.skip_unmapped:
        print(
            "cxr: error: `cxr data ingest` stops on images without a class: map their labels with --map "
            "or leave them out with --skip-unmapped",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_synth(args: argparse.Namespace) -> int:
    from cxrcore.data.synthetic import write_synthetic_dataset

    config: SynthConfig = config_from_args(SynthConfig, args)
    out = Path(config.out)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"{config.out} already holds files: a second set of phantoms would mix with them (the images of "
            "both runs, the metadata of the last only). Write to a new folder, or delete this one first"
        )
    summary = write_synthetic_dataset(config.out, config.per_class, config.seed, sites=config.sites)
    print(
        f"wrote {sum(summary.counts.values())} synthetic images to {summary.root} "
        f"({summary.images_per_second:.0f} images/s)"
    )
    if config.sites > 1:
        from cxrcore.data.layout import source_of
        from cxrcore.data.synthetic import site_url

        hosts = [source_of(site_url(site)) for site in range(config.sites)]
        print(f"sites: {hosts[0]} (marker follows the class), {', '.join(hosts[1:])} (marker random)")
        print(f"hold one out: cxr data ingest {shlex.quote(config.out)} OUT --test-sources {hosts[-1]}")
    return 0


def _connect(address: str | None) -> None:
    """Join (or start) Ray and say where its dashboard is, before a long-running command."""
    from cxrcore.runtime import dashboard_text, init_ray

    dashboard = init_ray(address)
    print(f"Ray dashboard: {dashboard_text(dashboard)}", flush=True)


def _run_on_ray(
    args: argparse.Namespace,
    action: Callable[[Any], Any],
    formatter: Callable[[Any], str],
    writing: Callable[[Any], AbstractContextManager[None]],
) -> Any:
    """The shape of every cluster command: typed config from the flags, connect, run, summarise; `writing`
    holds the output for the whole command, so a second one writing it fails before Ray starts."""
    config = config_from_args(args.config_cls, args)
    _check_before_ray(config)  # a typo or a damaged dataset fails at once, not after Ray's start
    with writing(config):
        if isinstance(config, TrainConfig | TuneConfig) and _is_here(config.out):
            _check_resumable(config)  # a re-run the run would refuse, refused before Ray's start (20 s)
        _connect(config.address)
        _note_local_paths(config)
        result = action(config)
    print(formatter(result))
    return result


def _check_train_or_tune(config: TrainConfig | TuneConfig) -> list[str]:
    """`--dry-run`'s checks: the run's own before Ray starts, and its output free of another run. What this
    machine lacks (the dataset, a weights file, GPUs) is returned as notes: a plan may be for elsewhere."""
    from cxrcore.train import trainer
    from cxrcore.tune import writing

    notes: list[str] = []
    _check_before_ray(config, notes)
    if _is_here(config.out):  # where the run's lock is (no folder yet: no run writing there)
        with writing(config) if isinstance(config, TuneConfig) else trainer.writing(config):
            pass
        _check_resumable(config)
    return notes


def _check_resumable(config: TrainConfig | TuneConfig) -> None:
    """`--dry-run`'s check of what an earlier run of this name left, as the run reads it once Ray has
    started: its recorded settings, and Ray Train's or Tune's record of its progress, whole (a kill or a
    full disk may have cut one short)."""
    from cxrcore.data.ingest import read_report
    from cxrcore.experiment import recorded_settings
    from cxrcore.train import trainer
    from cxrcore.tune import check_experiment_settings, check_experiment_state, experiment_path

    if isinstance(config, TuneConfig):
        recorded = recorded_settings(experiment_path(config), "a Tune experiment")
        check_experiment_state(experiment_path(config))
        if recorded is not None and _is_here(config.data):  # what the run checks before Ray starts
            check_experiment_settings(config, read_report(config.data), write=False)
    else:
        run_dir = f"{config.out.rstrip('/')}/{config.run_name()}"
        recorded = recorded_settings(run_dir, "a training run")
        trainer.restore_checkpoint_record(run_dir, write=False)
        if recorded is not None and _is_here(config.data):  # what the run checks once Ray runs
            trainer.check_resume(
                config, trainer.loop_config(config, settings_only=True), run_dir, write=False
            )


def _check_ingest(config: IngestConfig) -> list[str]:
    """`--dry-run`'s checks of an ingest: the run's own before Ray starts (RAW scanned, no image decoded),
    and OUT free of another ingest; a RAW not on this machine is a note (a plan may be for elsewhere)."""
    from cxrcore.data.ingest import check_output_folder, scan_ingest_input, writing

    _refuse_outputs_in_job_copy(config)
    if not _is_here(config.raw):
        if _is_here(config.out):
            check_output_folder(config.raw, config.out)
        return [] if "://" in config.raw else [f"{config.raw} is not a folder"]
    scan_ingest_input(config)
    if _is_here(os.path.dirname(os.path.abspath(config.out))):  # where OUT's lock is: makes no folder
        with writing(config):
            pass
    return []


def _is_here(location: str) -> bool:
    """A path that exists on this machine (a dry run never reaches out to object storage)."""
    return "://" not in location and os.path.exists(location)


def _check_before_ray(config: Any, notes: list[str] | None = None) -> None:
    """What fails a train or tune command whatever the cluster, checked before Ray's start (12 s here): an
    output inside a job's working dir, the architecture names (a "did you mean" otherwise), the dataset
    (finished, its files whole), the --pretrained choice, a file there (`resolve_pretrained`; the run loads
    the weights, once, after), and --gpu on the local cluster of a machine without enough GPUs.

    A dry run gives `notes`: it may plan a run for another machine, so what this one lacks (the dataset
    folder, the weights file, GPUs) goes there, while what it has is checked as the run checks it."""
    _refuse_outputs_in_job_copy(config)
    if not isinstance(config, TuneConfig | TrainConfig):
        return
    from cxrcore.data import storage
    from cxrcore.data.ingest import read_report
    from cxrcore.train.trainer import (
        check_dataset,
        check_freeze,
        check_hub,
        check_local_gpus,
        check_local_worker_cpus,
        resolve_pretrained,
        unscored_classes,
        untrained_classes,
    )

    dry_run, lacking = notes is not None, notes if notes is not None else []

    def lacks(location: str) -> bool:
        return dry_run and "://" not in location and not os.path.exists(location)

    def here(check: Callable[..., Any], *args: Any) -> bool:
        """A check of what this machine has: it fails a run, and is a note of a dry run (False)."""
        try:
            check(*args)
        except ConfigError as error:
            if not dry_run:
                raise
            lacking.append(str(error))
            return False
        return True

    no_file = lacks(config.pretrained) and config.pretrained.strip().lower() not in PRETRAINED_CHOICES
    if no_file:  # noted below where a model takes it
        missing_weights = f"--pretrained: no weights file at {config.pretrained}"
        config = dataclasses.replace(config, pretrained="hub")  # still: does the model take weights?
    if isinstance(config, TuneConfig):
        from cxrcore.tune import check_settings, search_plan, takes_pretrained

        check_settings(config)
        hub_models = [
            m
            for m in sorted({t["model"] for t in search_plan(config, 1)})
            if takes_pretrained(m, config.pretrained)
        ]
    else:
        check_freeze(config, resolve_pretrained(config.model, config.pretrained))  # the name too
        hub_models = [config.model]
        here(check_local_worker_cpus, config)  # as --gpu below: a plan may be for a bigger machine
    if no_file and hub_models:  # a comparison of models that take no weights never reads it
        lacking.append(missing_weights)
    for model in [] if no_file else hub_models:  # a hub this machine cannot reach: refused before Ray
        if not here(check_hub, model, config.pretrained):
            break
    if config.gpu:
        workers = config.workers if isinstance(config, TrainConfig) else config.workers_per_trial
        here(check_local_gpus, workers, config.address)
    if lacks(config.data):
        lacking.append(f"--data {config.data}: no such folder")
    elif not storage.is_remote(config.data):  # object storage is read where the run starts, once
        check_dataset(config.data)
        report = read_report(config.data)
        if isinstance(config, TuneConfig):
            from cxrcore.tune import check_masks, check_test_split

            check_test_split(config, report)
            check_masks(config, report)
        else:
            from cxrcore.train.trainer import check_masks as check_training_masks
            from cxrcore.train.trainer import check_worker_shares

            check_training_masks(config, report)
            check_worker_shares(config, int(report["by_split"]["train"]))
        unscored = unscored_classes(report, tuning=isinstance(config, TuneConfig))
        for warning in (untrained_classes(report), unscored):
            if warning:
                print(f"WARNING: {warning}", file=sys.stderr)
    if dry_run and os.path.exists(config.pretrained):  # loaded once the run starts; a dry run loads it now
        from cxrcore.train.trainer import check_pretrained
        from cxrcore.tune import search_plan, takes_pretrained

        if isinstance(config, TrainConfig):
            check_pretrained(config.model, config.pretrained)
        else:  # the models the trials build ("resnet" steps through depths), as tune's preflight loads them
            for name in sorted({trial["model"] for trial in search_plan(config, 1)}):
                if takes_pretrained(name, config.pretrained):
                    check_pretrained(name, config.pretrained)


def _note_local_paths(config: Any) -> None:
    """On a cluster joined by address, name the locations that are paths of this machine: a relative or
    local --out under `ray job submit` lands on the head, while workers on other nodes write their
    checkpoints to their own disks. Every node must see such a path (a shared filesystem, as the KubeRay
    manifests' /data), or it belongs on object storage."""
    from cxrcore.data import storage
    from cxrcore.runtime import local_core_limit

    if local_core_limit() is not None:  # the local cluster cxr started: this machine alone
        return
    local = [
        f"--{name} {value}"
        for name in ("data", "out", "registry")
        if isinstance(value := getattr(config, name, None), str) and value and not storage.is_remote(value)
    ]
    if local:
        print(
            f"note: {', '.join(local)}: on a cluster of several nodes, every node must see "
            f"{'this path' if len(local) == 1 else 'these paths'} at the same place (a shared filesystem), "
            "or use s3:// or gs:// URIs",
            file=sys.stderr,
            flush=True,
        )


def _refuse_outputs_in_job_copy(config: Any) -> None:
    """Under `ray job submit --working-dir`, refuse an output (--out, --registry; ingest's OUT) inside the
    job's unpacked copy of its working dir, as a relative path is: Ray deletes that copy with the cluster's
    session, and shares it with every later job whose code hashes the same. Before Ray starts."""
    package = _job_package(os.getcwd())
    if package is None:
        return
    label = {"out": "OUT" if isinstance(config, IngestConfig) else "--out", "registry": "--registry"}
    outputs = ("out",) if isinstance(config, EvaluateConfig) else ("out", "registry")  # evaluate reads one
    inside = [
        f"{label[name]} {value}"
        for name in outputs
        if isinstance(value := getattr(config, name, None), str) and value and _is_under(value, package)
    ]
    if inside:  # a relative default, resolved in the copy of --working-dir that Ray deletes with its session
        raise ConfigError(
            f"{', '.join(inside)}: inside this job's copy of its working_dir ({package}), which Ray deletes "
            "when the cluster's session ends: give an absolute path every node sees (e.g. /data/cxr-runs) "
            "or an s3:// or gs:// URI"
        )


def _job_package(cwd: str) -> str | None:
    """The `_ray_pkg_*` folder a Ray job's driver runs in (its --working-dir, unpacked), or None."""
    parts = cwd.split(os.sep)
    at = next((i for i, part in enumerate(parts) if part.startswith("_ray_pkg_")), None)
    return os.sep.join(parts[: at + 1]) if at is not None else None


def _is_under(path: str, folder: str) -> bool:
    if "://" in path:
        return False
    return os.path.commonpath([os.path.abspath(path), folder]) == folder


def _run_ingest(args: argparse.Namespace) -> int:
    from cxrcore.data.ingest import ingest_dataset, scan_ingest_input, writing

    config = config_from_args(args.config_cls, args)
    _refuse_outputs_in_job_copy(config)
    scanned = scan_ingest_input(config)  # a folder it refuses costs no Ray start
    with writing(config):  # another ingest into OUT: refused before Ray starts too
        _connect(config.address)
        print(format_ingest_report(ingest_dataset(config, scanned)))
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from cxrcore.train.trainer import fit, writing

    result = _run_on_ray(args, fit, format_train_result, writing)
    if result.run_dir is None:  # --workers 0, as asked: the loop in this process, its figures only (fit
        return 0  # said so)
    if result.best_checkpoint is None:
        print("cxr: error: the run saved no checkpoint", file=sys.stderr)
        return 1
    from cxrcore.checkpoint import load_card

    for warning in train_warnings(load_card(result.best_checkpoint)):
        print(f"WARNING: {warning}", file=sys.stderr)
    return 0


def _run_tune(args: argparse.Namespace) -> int:
    from cxrcore.tune import run_comparison, writing

    comparison = _run_on_ray(args, run_comparison, format_comparison, writing)
    if not comparison["best"]:
        print("cxr: error: no architecture produced a checkpoint; nothing was registered", file=sys.stderr)
        return 1
    from cxrcore.tune import architecture

    models = (comparison.get("settings") or {}).get("models") or getattr(args, "models", None) or ""
    named = [name.strip() for name in str(models).split(",")]
    missing = sorted(
        {architecture(t["model"], named) for t in comparison["trials"]}
        - {architecture(model, named) for model in comparison["best"]}
    )
    if missing:  # a job that compared fewer architectures than asked must not read SUCCEEDED
        print(
            f"cxr: error: {', '.join(missing)} produced no checkpoint (every trial failed; see the trials "
            f"above), so the comparison and production cover {', '.join(sorted(comparison['best']))} only",
            file=sys.stderr,
        )
        return 1
    crashed = sorted(model for model, row in comparison["best"].items() if row.get("failed"))
    if crashed:  # its figures are of a run that did not finish
        print(
            f"cxr: error: every trial of {', '.join(crashed)} failed (see the trials above): registered from "
            "the checkpoints made before the failure, not promoted",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from cxrcore.evaluate.paired import ComparisonError, compare_evaluations, format_comparison

    try:
        result = compare_evaluations(os.path.expanduser(args.first), os.path.expanduser(args.second))
    except ComparisonError as exc:
        raise ConfigError(str(exc)) from exc
    print(json.dumps(result, indent=2) if args.json else format_comparison(result))
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from cxrcore.evaluate.evaluation import evaluate_checkpoint
    from cxrcore.evaluate.external import verdict_alarming
    from cxrcore.evaluate.report import column_label, metrics_table, with_intervals

    config: EvaluateConfig = config_from_args(EvaluateConfig, args)
    _refuse_outputs_in_job_copy(config)
    paths = evaluate_checkpoint(config)
    metrics = json.loads(paths["metrics"].read_text())
    headline = {
        k: metrics[k]
        for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece", "dice", "iou")
        if k in metrics
    }
    evaluated = metrics.get("evaluated")
    if evaluated:
        where = f"split {evaluated['split']}, {evaluated['relation']} data"
        print(f"evaluated {evaluated['model']} on {evaluated['dataset']} ({where})")
        if evaluated["note"]:
            print(f"WARNING: this evaluation {evaluated['note']}")
    rows = [[column_label(k), format_cell(v)] for k, v in with_intervals(headline, metrics).items()]
    print(format_table(["metric", "value"], rows))
    if "per_class" in metrics:  # a classifier: what accuracy hides on an imbalanced split
        per_class = metrics_table(metrics)
        columns = list(dict.fromkeys(key for row in per_class for key in row))
        cells = [[format_cell(row.get(c)) for c in columns] for row in per_class]
        print(format_table([column_label(c) for c in columns], cells))
        missed = (evaluated or {}).get("missed")
        if missed:
            print(f"WARNING: the model {missed}; the accuracy does not show it, the recalls above do")
        # as metrics.json and the report have it; an external evaluation's verdict (below) says it of its own
        if chance := (evaluated or {}).get("chance"):
            print(f"WARNING: {chance}")
        if (metrics.get("calibration") or {}).get("prior_note"):
            print(f"note: {metrics['calibration']['prior_note']}")
    if evaluated and evaluated.get("sources_separate_classes"):
        print(f"WARNING: in the dataset, {evaluated['sources_separate_classes']}")
    if evaluated and evaluated.get("unusual_inputs"):
        print(f"WARNING: {evaluated['unusual_inputs']}")
    elif evaluated and evaluated.get("input_check"):
        print(f"input check: {evaluated['input_check']}")
    if evaluated and evaluated.get("classes_note"):
        print(f"note: {evaluated['classes_note']}")
    comparison = metrics.get("internal_comparison")
    if comparison:
        column = f"internal ({comparison['reference']})" if comparison["reference"] else "internal"
        sides = ("internal", "external", "drop")
        rows = [[column_label(name), *(format_cell(row[k]) for k in sides)]
                for name, row in comparison["figures"].items()]  # fmt: skip
        print(format_table(["metric", column, "external", "drop"], rows))
        # not clean, or not known to be: the model may have trained on these images
        print(("WARNING: " if verdict_alarming(comparison) else "") + comparison["verdict"])
    holdout = metrics.get("source_holdout")
    if holdout:
        print(format_holdout(holdout))
    remote = "://" in config.out and not config.out.startswith("file://")  # written there from a local copy
    print(f"report: {config.out.rstrip('/') + '/' + paths['report'].name if remote else paths['report']}")
    if (
        config.model and evaluated and evaluated.get("relation") != "internal"
    ):  # a version, on data from elsewhere
        registry = shlex.quote(str(config.registry or os.environ.get("CXR_REGISTRY")))
        print(
            f"keep it with the version (cxr models show and GET /v1/model then show it): cxr models "
            f"add-evaluation {evaluated['model']} {shlex.quote(config.out)} --registry {registry}"
        )
    return 0


def _run_architectures(args: argparse.Namespace) -> int:
    from cxrcore.models import get_model_entry, list_models

    rows = []
    for name in list_models():
        entry = get_model_entry(name)
        spec = entry.input_spec
        rows.append([name, spec.task, "+".join(spec.channels), spec.image_size, entry.description])
    print(format_table(["model", "task", "channels", "default size", "description"], rows))
    print(
        "default size: the input size a model is built at without data; cxr train and cxr tune build it at "
        "the dataset's (cxr data ingest --size, 256 unless given)"
    )
    return 0


def _run_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    versions = registry.versions(args.name)
    unfinished = _interrupted_lines(registry.interrupted(args.name))
    if unfinished:
        unfinished = ["", *unfinished, "`cxr models clean` frees those an hour old (killed registrations)"]
    if not versions:
        if args.name:  # a name that matches nothing is a mistake to say, as `ls` says one, not a listing
            held = sorted({version.name for version in registry.versions()})
            holds = f"; it holds {', '.join(held)}" if held else ", which is empty"
            print(f"cxr: error: no versions of {args.name} in {registry.root}{holds}", file=sys.stderr)
            if unfinished:
                print("\n".join(unfinished[1:]))
            return 1
        print("\n".join([f"{registry.root} is empty", *unfinished]))
        return 0
    scores = ("val_accuracy", "val_macro_f1", "val_dice")
    rows = [
        [v.ref, ",".join(v.aliases), v.card.created_at,
         *(format_cell(v.card.metrics.get(k)) for k in scores), *_test_figures(v),
         v.card.data.get("fingerprint") or "-"]
        for v in versions
    ]  # fmt: skip
    header = [
        "ref",
        "aliases",
        "created",
        "val acc",
        "val F1",
        "val dice",
        "test acc (n)",
        "test F1",
        "data fingerprint",
    ]
    print("\n".join([format_table(header, rows), *unfinished]))
    return 0


def _test_figures(version: Any) -> tuple[str, str]:
    """The accuracy (with its image count) and macro-F1 of the test report registered with `version`;
    dashes without one (or with a report of another split or dataset), "?" where its metrics.json cannot be
    read. On an imbalanced test split the macro-F1 tells apart a model that misses a rare class."""
    test, why = registered_test(version)
    if test is None:  # "?": a report cut short or unreadable; the listing goes on
        return ("?", "?") if why and why.startswith(UNREADABLE_REPORT) else ("-", "-")
    n = test["images"]
    accuracy = f"{test['accuracy']:.3f}" + (f" ({n})" if n is not None else "")
    return accuracy, format_cell(test["macro_f1"])


def _interrupted_lines(items: list[Any]) -> list[str]:
    return [
        f"{i.name}/v{i.version}: an unfinished registration ({i.files} file{'s' * (i.files != 1)}, "
        f"{i.bytes / 2**20:.1f} MiB, "
        f"{'age unknown' if i.age_s is None else _age(i.age_s) + ' old'})"
        for i in items
    ]


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _duration(text: str) -> float:
    """Seconds in "90", "90s", "30m", "1h" or "2d"."""
    value, unit = (text[:-1], text[-1]) if text and text[-1] in "smhd" else (text, "s")
    try:
        seconds = float(value) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an age such as 90s, 30m or 1h, got {text!r}") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"expected an age of 0 or more, got {text!r}")
    return seconds


def _run_clean(args: argparse.Namespace) -> int:
    registry = _registry(args)
    cleaned = registry.clean(args.older_than, dry_run=args.dry_run)
    freed = {(i.name, i.version) for i in cleaned}
    left = [i for i in registry.interrupted() if (i.name, i.version) not in freed]
    verb = "would free" if args.dry_run else "freed"
    for line in _interrupted_lines(cleaned):
        print(f"{verb} {line}")
    total = sum(i.bytes for i in cleaned) / 2**20
    several = len(cleaned) != 1
    count = f"{len(cleaned)} unfinished registration{'s' * several}"
    print(f"{verb} {count}, {total:.1f} MiB; {'their numbers stay' if several else 'its number stays'} used")
    for item, line in zip(left, _interrupted_lines(left), strict=True):
        old = item.age_s is not None and item.age_s >= args.older_than  # old enough, yet locked
        why = (
            "a registration is writing it now"
            if old
            else "younger than --older-than, it may still be running"
        )
        print(f"kept {line}: {why}")
    return 0


def _run_history(args: argparse.Namespace) -> int:
    """Every recorded move of an alias, oldest first (REG/aliases.log.jsonl); exit 1 where none is."""
    moves = [m for m in _registry(args).history() if args.alias in (None, m.get("alias"))]
    if args.json:
        for move in moves:
            print(json.dumps(move))
    elif moves:
        columns = ("time", "alias", "from", "to", "user", "host", "cxr")
        rows = [[str(move.get(column) or "-") for column in columns] for move in moves]
        print(format_table(list(columns), rows))
    for unrecorded in _registry(args).unrecorded_aliases().values():
        print(f"WARNING: {unrecorded}", file=sys.stderr)
    if not moves:
        which = f"the alias {args.alias}" if args.alias else "an alias"
        print(f"no move of {which} is recorded in {args.registry}", file=sys.stderr)
        return 1
    return 0


def _run_show(args: argparse.Namespace) -> int:
    from cxrcore.checkpoint import WEIGHTS_NAME

    registry = _registry(args)
    version = registry.get(args.ref)
    card = version.card.to_dict()
    history = card.pop("history")
    paths = {"folder": version.uri, "weights": f"{version.uri}/{WEIGHTS_NAME}", "report": version.report}
    # the card names its segmenter where it was registered; a moved or copied registry reads its own
    if version.card.segmenter:
        try:
            paths["segmenter"] = str(registry.segmenter_checkpoint(version.card.segmenter, of=version.ref))
        except RegistryError as exc:
            paths["segmenter"] = f"not found: {exc}"
    test, why = registered_test(version)
    try:  # what serve, evaluate and promote check before they use it: shown here before a review reads it
        registry.local_checkpoint(version.ref)
        refused = None
    except (ConfigError, RegistryError) as exc:  # weights replaced, card edited
        refused = str(exc)
    if args.json:
        shown: dict[str, Any] = {
            "ref": version.ref,
            "aliases": list(version.aliases),
            "paths": paths,
            "test": test,
        }
        shown["test_missing"] = why
        shown["refused"] = refused
        shown["evaluations"] = registry.evaluations(version.ref)
        print(json.dumps({**shown, "card": card, "history_length": len(history)}, indent=2))
        return 0
    lines = [f"WARNING: serve, evaluate and promote refuse it: {refused}"] if refused else []
    lines += [f"ref: {version.ref}", f"aliases: {', '.join(version.aliases) or '-'}"]
    lines += [f"{key}: {path or '-'}" for key, path in paths.items()]
    lines.append(f"test: {_test_line(test) if test else f'- ({why})'}")
    evaluations = registry.evaluations(version.ref)
    lines.append(f"evaluations: {len(evaluations) or '- (none added: cxr models add-evaluation)'}")
    lines += [f"  {entry['number']}. {_evaluation_line(entry)}" for entry in evaluations]
    lines += [f"WARNING: {warning}" for warning in evaluation_warnings(evaluations)]
    lines.append("card:")
    for key, value in card.items():
        if key == "epoch" and isinstance(value, int):  # as the history, the epoch lines and the reports count
            value = f"{value + 1} (card.json: {value}, counted from 0)"
        lines.append(
            f"  {key}: {json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else value}"
        )
    lines.append(f"  history: {len(history)} epochs")
    print("\n".join(lines))
    return 0


def _run_add_evaluation(args: argparse.Namespace) -> int:
    """ModelRegistry.add_evaluation: the evaluation kept with the version, and what it found in a line."""
    registry = _registry(args)
    version = registry.get(args.ref)
    entry, added = registry.add_evaluation(version.ref, args.report)
    where = f"{version.ref}'s evaluation {entry['number']}"
    print(f"{'added as' if added else 'kept already, as'} {where}: {_evaluation_line(entry)}")
    for warning in evaluation_warnings([entry]):
        print(f"WARNING: {warning}")
    return 0


def _evaluation_line(entry: dict[str, Any]) -> str:
    """An evaluation added to a version (`evaluation_entry`) in a line: what it scored and its figures."""
    from cxrcore.evaluate.report import interval_text

    accuracy = entry.get("accuracy")
    interval = entry.get("accuracy_ci95")
    figures = "no accuracy" if accuracy is None else f"accuracy {accuracy:.3f}"
    if interval:
        figures += f" (95% CI {interval_text(interval)})"
    return (
        f"{entry.get('relation')} data {entry.get('dataset')} (fingerprint {entry.get('fingerprint')}, split "
        f"{entry.get('split')}, {entry.get('images')} images), {figures}, macro-F1 "
        f"{format_cell(entry.get('macro_f1'))}; added {entry.get('added_at')} by {entry.get('user')}"
        + (" [its metrics.json changed since]" if entry.get("changed") else "")
    )


def _test_line(test: dict[str, Any]) -> str:
    """The registered test figures in a line, with whether they beat answering the commonest class."""
    from cxrcore.evaluate.report import interval_text

    line = (
        f"accuracy {test['accuracy']:.3f} (95% CI {interval_text(test['accuracy_ci95'])}) on "
        f"{test['images'] or '?'} images of its dataset's test split, "
        f"macro-F1 {format_cell(test['macro_f1'])}"
    )
    if test["beats_commonest_class"] is False:
        line += (
            f"; WARNING: not shown to beat always answering the commonest class "
            f"({test['commonest_class_accuracy']:.3f})"
        )
    return line


def _run_register(args: argparse.Namespace) -> int:
    """A checkpoint registered once, its lung segmenter with it (ModelRegistry.register_once)."""
    from cxrcore.checkpoint import load_card

    if not args.registry:
        raise ConfigError("--registry: no model registry given (pass --registry or set CXR_REGISTRY)")
    args.checkpoint = os.path.expanduser(args.checkpoint)  # quoted in a script, `~` reaches cxr as it is
    try:
        card = load_card(args.checkpoint)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc  # it names the checkpoint
    registry = ModelRegistry(args.registry)  # a new one is created
    done = registry.register_once(args.checkpoint, report=args.report, alias=args.alias)
    if done.segmenter_registered and done.segmenter:
        print(f"registered its lung segmenter {card.segmenter} as {done.segmenter.ref}")
    if done.found:
        print(f"{args.checkpoint} is registered already, as {done.version.ref}")
        if done.report_added:  # registered first, evaluated after: the report is its test figures now
            print(f"its report is {args.report} now (`cxr models show {done.version.ref}`)")
        elif args.report:
            print("with this report already (its metrics.json is the registered one's)")
        if not (done.version.card.data.get("manifest") or {}).get("file"):
            print(f"{_manifest_line(done.version.card.data)} (`cxr models seal` makes it once it can)")
    else:
        print(f"registered {args.checkpoint} as {done.version.ref}")
        print(_manifest_line(done.version.card.data))
    if args.alias:
        print(f"{args.alias}: {done.version.ref}")
        if args.alias == "production":
            _warn_against_production(registry, done.version)
    return 0


def _run_seal(args: argparse.Namespace) -> int:
    """ModelRegistry.seal: one line per version given what it lacked."""
    registry = _registry(args)
    sealed = registry.seal(args.ref, dry_run=args.dry_run)
    verb = "would record" if args.dry_run else "recorded"
    for item in sealed:
        if item.problem:
            print(f"{item.ref}: not sealed: {item.problem}", file=sys.stderr)
            continue
        parts = []
        if item.weights_sha256:
            parts.append(f"weights sha256 {item.weights_sha256[:12]}… (the file as it is now)")
        if item.manifest is not None:
            parts.append(_manifest_line({**registry.get(item.ref).card.data, "manifest": item.manifest}))
        if item.card:
            parts.append("the card's sha256 (the card as it is now)")
        print(f"{item.ref}: {verb} {'; '.join(parts)}")
    if any(item.problem for item in sealed):
        return 1
    if not sealed:
        which = args.ref or "every version"
        print(
            f"{which} in {args.registry}: its weights' and card's hashes and its data manifest (or why none) "
            "are recorded"
        )
    return 0


def _manifest_line(data: dict[str, Any]) -> str:
    """What a registration kept of the model's dataset (cxrcore.data.manifest), in one line."""
    block = data.get("manifest") or {}
    if not block.get("file"):
        return f"no data manifest: {block.get('missing', 'not made')}"
    splits = ", ".join(
        f"{split} {block['by_split'][split]}" for split in SPLITS if split in block["by_split"]
    )
    return f"data manifest: {block['images']} images ({splits}) of {data.get('dataset')}, kept with it"


def _run_promote(args: argparse.Namespace) -> int:
    registry = _registry(args)
    old = registry.aliases().get(args.alias)
    version = registry.promote(args.ref, args.alias)
    unchanged = " (unchanged)" if old == version.ref else ""
    print(f"{args.alias}: {old or '(none)'} -> {version.ref}{unchanged}")
    if args.alias == "production":
        _warn_against_production(registry, version)
    return 0


def _warn_against_production(registry: Any, version: Any) -> None:
    """Where a review signs a candidate off as production (`promote`, `register --alias production`): what
    is known against it. `register --alias production` had said none of it (a review, session 57)."""
    test, why = registered_test(version)
    known = serving_warnings(test, version.card.data) + evaluation_warnings(registry.evaluations(version.ref))
    if doubted := report_warning(why):
        known.append(doubted)
    for warning in known:
        print(f"WARNING: {version.ref}: {warning}")


def _run_import_weights(args: argparse.Namespace) -> int:
    from cxrcore.models.pretrained import import_weights, weights_file_name

    folder = os.path.isdir(args.out) or args.out.endswith(("/", os.sep))  # `--out weights/`: made here
    out = os.path.join(args.out, weights_file_name(args.arch)) if folder else args.out
    if folder:
        os.makedirs(args.out, exist_ok=True)
    try:
        written = import_weights(args.arch, out, args.source, overwrite=args.force)
    except (ValueError, RuntimeError) as exc:  # not a ResNet, weights that do not fit, hub unreachable
        raise ConfigError(str(exc)) from exc
    print(
        f"wrote {written['path']}: {written['arch']} on one channel, no classifier, "
        f"{written['tensors']} tensors, {written['bytes'] / 2**20:.1f} MiB, from {written['source']}"
    )
    given = args.out if folder else written["path"]  # a folder serves every architecture it holds
    print(f"use it with: cxr train --model {written['arch']} --pretrained {given}")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from cxrcore.runtime import check_no_shadowing_modules

    check_no_shadowing_modules(SERVE_IMPORTS)  # before `serve` is imported: `python -m` puts `.` first
    # The Serve application lives in serve/ and is loaded by module name, as `serve run` loads
    # `serve.app:build_app`: the library keeps no import of it.
    server = importlib.import_module("serve.server")
    app_args: dict[str, Any] = {"registry": args.registry, "model": args.model}
    for item in args.arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--arg: expected KEY=VALUE, got {item!r}")
        app_args[key.strip()] = value.strip()
    try:
        status: int = server.serve_foreground(
            app_args, host=args.host, port=args.port, address=args.address, grace_s=args.grace_s
        )
    except ValueError as exc:  # pydantic's ValidationError, an unknown registry reference
        raise ConfigError(_arg_errors(exc)) from exc
    except server.ServeStartError as exc:  # what failed and where to read why, not a traceback
        print(f"cxr: error: {exc}", file=sys.stderr)
        return 1
    return status


def _arg_errors(exc: ValueError) -> str:
    """An error of `cxr serve`'s settings in one line: pydantic's each as "--arg KEY: why" (its own text
    ran over four lines with a URL), anything else as it is."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    said = []
    for error in errors():
        key = ".".join(map(str, error.get("loc", ()))) or "settings"
        why = "no such setting" if error.get("type") == "extra_forbidden" else error.get("msg", "")
        said.append(f"{'--' + key if key in ('registry', 'model') else '--arg ' + key}: {why}")
    return "; ".join(said) + " (serve/README.md lists the settings)"


def _run_predict(args: argparse.Namespace) -> int:
    import httpx

    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url: expected http://HOST:PORT (as `cxr serve` prints it), got {args.url!r}")
    endpoint = url if url.endswith("/v1/predict") else f"{url}/v1/predict"
    with httpx.Client(timeout=args.timeout) as client:
        try:  # once, not a connection error per file of a folder
            client.get(f"{endpoint.removesuffix('/v1/predict')}/healthz")
        except httpx.TransportError as exc:
            why = f"{type(exc).__name__}: {exc}"
            print(f"cxr: error: cannot reach {url} ({why}); is `cxr serve` running there?", file=sys.stderr)
            return 1
        answers: list[dict[str, Any]] = []
        files = [os.path.expanduser(name) for name in args.files]  # a quoted `~/x.png` too
        table, problems, unusual = predict_files(client, endpoint, files, answers)
    if args.json:
        for answer in answers:
            print(json.dumps(answer, ensure_ascii=False))
    else:
        print(table)
    for line in unusual:
        print(f"WARNING: {line}", file=sys.stderr)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def _not_sent(folder: str, images: Sequence[str]) -> str | None:
    """What `cxr predict FOLDER` leaves out of the files in the folder itself (not images by their suffix
    or bytes; hidden ones aside), counted by suffix; None where it sends them all. They had gone unsaid."""
    sent = {os.path.realpath(name) for name in images}
    left = [
        entry.name
        for entry in os.scandir(folder)
        if entry.is_file() and not entry.name.startswith(".") and os.path.realpath(entry.path) not in sent
    ]
    if not left:
        return None
    kinds = Counter(os.path.splitext(name)[1].lower() or "(no suffix)" for name in left)
    counted = ", ".join(f"{suffix} {n}" for suffix, n in sorted(kinds.items()))
    return f"{len(left)} file(s) not sent, not images by their suffix or bytes ({counted})"


def predict_files(
    client: Any, endpoint: str, names: Sequence[str], answers: list[dict[str, Any]] | None = None
) -> tuple[str, list[str], list[str]]:
    """`cxr predict`: POST each file (each image below a folder named) to `endpoint`; a table of the
    answers, a line for each file that got none (its status and the server's reason), and one for each
    the server's input check found unlike the model's training images. `answers`, where given, gets each
    file's whole answer (`file`, `status`, and the server's JSON or the reason)."""
    from cxrcore.data.ingest import printable_name
    from cxrcore.data.layout import image_files

    rows: list[list[Any]] = []
    classes: list[str] = []
    problems: list[str] = []
    unusual: list[str] = []
    for given in names:
        files = image_files(given) if os.path.isdir(given) else [given]
        if os.path.isdir(given) and (left := _not_sent(given, files)):
            problems.append(f"{given}: {left}")
        if not files:
            problems.append(f"{given}: no image file in this folder")
            if answers is not None:
                answers.append({"file": given, "status": None, "problem": "no image file in this folder"})
        for name in files:
            record: dict[str, Any] = {}
            status, body = _post_file(client, endpoint, name, record)
            shown = printable_name(name)  # `caf\xe9.png`, as the dataset and the reports spell it
            if answers is not None:  # the server's own JSON, errors too, with the request's id
                problem = None if status == 200 and _is_prediction(body) else body
                problem = problem if problem is None or isinstance(problem, str) else "not a cxr prediction"
                answers.append(
                    {"file": shown, "status": status, **record, **({"problem": problem} if problem else {})}
                )
            if status == 200 and not _is_prediction(body):  # another server on that port, or a proxy's page
                rows.append([shown, "error"])
                problems.append(f"{shown}: the answer is not a cxr prediction: {str(body)[:200]!r}")
                continue
            if status != 200:
                rows.append([shown, "error" if status is None else f"error {status}"])
                problems.append(f"{shown}: {body}")
                continue
            probabilities, model = body["probabilities"], body["model"]
            classes = classes or list(probabilities)
            version = "" if model.get("version") is None else f":{model['version']}"
            check = body.get("input_check") or {}
            if check.get("unusual"):
                unusual.append(f"{shown}: {_unusual_text(check, model['name'])}")
            rows.append(
                [shown, body["label"], *(f"{probabilities[c]:.3f}" for c in probabilities),
                 _checked(check), f"{model['name']}{version}", f"{body['latency_ms']:.1f}"]
            )  # fmt: skip
    header = ["file", "label", *classes, "input", "model", "ms"] if classes else ["file", "label"]
    return format_table(header, [row + [""] * (len(header) - len(row)) for row in rows]), problems, unusual


def _unusual_text(check: dict[str, Any], model: str) -> str:
    """Why an upload is unusual, from its `input_check`: which of the two scores is above its threshold."""
    above = []
    if check["score"] > check["threshold"]:
        above.append(f"score {check['score']:.2f}, usual up to {check['threshold']:.2f}")
    if check.get("pattern_distance", 0) > check.get("pattern_threshold", math.inf):
        above.append(
            f"pattern distance {check['pattern_distance']:.1f}, usual up to {check['pattern_threshold']:.1f}"
        )
    return (
        f"unlike the images {model} trained on (input check: {'; '.join(above)}): its probabilities may mean "
        "nothing; is it a frontal chest X-ray like those the model was made for (view, site, population)?"
    )


def _checked(check: dict[str, Any]) -> str:
    """The `input` column of `cxr predict`: what the server's input check said of the file."""
    if not check:
        return "-"  # a model whose checkpoint has no reference
    return "UNUSUAL" if check.get("unusual") else "usual"


def _is_prediction(body: Any) -> bool:
    """Whether a 200's body is what cxr's /v1/predict answers (its label, probabilities and model)."""
    return (
        isinstance(body, dict)
        and isinstance(body.get("probabilities"), dict)
        and isinstance(body.get("model"), dict)
        and "name" in body["model"]
        and isinstance(body.get("label"), str)
        and isinstance(body.get("latency_ms"), int | float)
    )


def _post_file(
    client: Any, endpoint: str, name: str, record: dict[str, Any] | None = None
) -> tuple[int | None, Any]:
    """(HTTP status, the answer's JSON) for one file; for no answer or an error, (status or None, why).
    `record`, where given, gets the answer's request id (its X-Request-ID) and its JSON as the server sent it,
    an error's `error` and `detail` too (`cxr predict --json`)."""
    import httpx

    from cxrcore.decode import ImageDecodeError, upload_bytes

    try:
        with open(name, "rb") as file:
            data, content_type = upload_bytes(file.read())  # a TIFF or BMP as the PNG of its pixels
        # A name that is not UTF-8 (a Latin-1 `caf\xe9.png`) as its UTF-8 reading: httpx could not encode it,
        # and the traceback ended the run before any other file was sent.
        filename = os.fsencode(os.path.basename(name)).decode("utf-8", "replace")
        upload = (filename, data) if content_type is None else (f"{filename}.png", data, content_type)
        response = client.post(endpoint, files={"file": upload})
    except ImageDecodeError as exc:
        return None, f"not sent: {exc}"
    except (OSError, httpx.HTTPError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if record is not None and response.headers.get("x-request-id"):
        record["request_id"] = response.headers["x-request-id"]
    try:
        body = response.json()
    except ValueError:  # not JSON: a proxy's own answer (Serve's plain-text 503), or not cxr at all
        text = " ".join(response.text.split())[:200] or "(empty body)"
        return response.status_code, f"HTTP {response.status_code}: {text}"
    if record is not None and isinstance(body, dict):
        record.update(body)
    if response.status_code != 200:
        return response.status_code, f"HTTP {response.status_code} {body.get('error')}: {body.get('detail')}"
    return 200, body


def _run_pipeline(args: argparse.Namespace) -> int:
    from cxrcore.data import storage
    from cxrcore.pipeline import check_pipeline
    from cxrcore.runtime import check_no_shadowing_modules

    config: PipelineConfig = config_from_args(PipelineConfig, args)
    check_pipeline(config)  # a typo fails now, not after the synthesis and the ingest
    if config.serve:
        check_no_shadowing_modules(SERVE_IMPORTS)
    # One demo per folder: two at once wrote their phantoms over each other before ingest's lock parted them
    with storage.exclusive(config.work_dir, "a demo", "another --work-dir"):
        return _run_demo(config)


def _run_demo(config: PipelineConfig) -> int:
    from cxrcore.pipeline import run_pipeline

    if config.serve and not (config.address or os.environ.get("RAY_ADDRESS")):
        from cxrcore.runtime import check_port_free

        check_port_free("127.0.0.1", config.port)  # now, not after the training it would serve
    results = run_pipeline(config)
    served = "production"
    if config.tune and results.get("production model") == "none":
        if not results.get("candidate model"):
            print(
                "cxr: error: no architecture produced a checkpoint; nothing to register or serve",
                file=sys.stderr,
            )
            return 1
        # The winner is not shown to beat the commonest class: it is the candidate, not production. The
        # demo serves it to show the service, and says so.
        served = "candidate"
        print(
            f"WARNING: no version is production (the winner {results['candidate model']} is not shown to "
            "beat always answering the commonest class); the demo serves the candidate to show the service",
            file=sys.stderr,
        )
    if config.serve and results.get("registry"):
        # One image of each class sent over HTTP like any client would, never one the model trained on:
        # the synthetic run's new clear examples (not in the dataset), else the first image of each class
        # in the raw folder that ingest put in the test split.
        firsts: dict[str, str] = {}
        if results.get("examples"):
            firsts = {c: os.path.join(results["examples"], f"{c}-example.png") for c in CLASSES}
            sent = "one new image per class"
        else:
            firsts = _held_out_firsts(results["raw"], results["dataset"])
            sent = "the first test-split image of each class"
        model = results["production model"] if served == "production" else results["candidate model"]
        print(f"\n== serving {model} with Ray Serve on 127.0.0.1:{config.port}: {sent}", flush=True)
        server = importlib.import_module("serve.server")  # serve/ builds on cxrcore, never the reverse
        try:
            answers = server.demo_predictions(
                {"registry": results["registry"], "model": served},
                list(firsts.values()),
                port=config.port,
            )
        except server.ServeStartError as exc:  # what failed and where to read why, not a traceback
            print(f"cxr: error: {exc}", file=sys.stderr)
            return 1
        rows = [
            [
                os.path.basename(a["file"]),
                label,
                a["label"],
                f"{max(a['probabilities'].values()):.3f}",
                _checked(a.get("input_check") or {}),
                f"{a['latency_ms']:.0f}",
            ]
            for label, a in zip(firsts, answers, strict=True)
        ]
        print(format_table(["file", "class", "predicted", "probability", "input", "latency ms"], rows))
        right = sum(row[1] == row[2] for row in rows)
        print(f"{right} of {len(rows)} examples classified as their class")
        local = not (config.address or os.environ.get("RAY_ADDRESS"))
        gone = " (up while the demo ran: its local Ray cluster stops with it; --address keeps one)"
        print(f"Ray dashboard: {results['Ray dashboard']}{gone if local else ''}")
    return 0


def _held_out_firsts(raw: str, dataset: str) -> dict[str, str]:
    """class → path in `raw` of its first image (by file name) that ingest put in `dataset`'s test split."""
    from cxrcore.data.ingest import printable_name, read_table
    from cxrcore.data.layout import scan_layout

    test = read_table(dataset, columns=["label", "file"], split="test").to_pylist()
    held_out = {(row["label"], row["file"]) for row in test}
    firsts: dict[str, str] = {}
    for entry in sorted(scan_layout(raw).entries, key=lambda e: e.file):
        if (entry.label, printable_name(entry.file)) in held_out:
            firsts.setdefault(entry.label, entry.image_path)
    return firsts


def _run_benchmark(args: argparse.Namespace) -> int:
    from cxrcore.bench import run_benchmarks
    from cxrcore.bench.report import JSON_NAME, MARKDOWN_NAME

    config: BenchmarkConfig = config_from_args(BenchmarkConfig, args)
    report = run_benchmarks(config)
    print(report.markdown())
    print(f"report: {config.out}/{MARKDOWN_NAME} and {JSON_NAME}")
    if report.failed:
        print(f"cxr: error: benchmark section(s) failed: {', '.join(report.failed)}", file=sys.stderr)
        return 1
    return 0
