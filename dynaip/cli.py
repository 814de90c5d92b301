"""The `dynaip` command line: one entry point, one subcommand per job (see docs/ARCHITECTURE.md, "CLI")."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Sequence

log = logging.getLogger("dynaip")


def _tiny_checkpoints(args: argparse.Namespace) -> int:
    from dynaip.models.tiny import write_tiny_checkpoints

    path = write_tiny_checkpoints(args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny random-weight checkpoints written; models file: {path}")
    return 0


def _add_tiny_checkpoints(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tiny-checkpoints",
        help="write tiny random-weight checkpoints in the real release formats",
        description="Writes FLUX (diffusers dir), OpenCLIP, Grounding DINO, SAM, BLIP captioner, aesthetic-head "
        "and FLUX ControlNet (diffusers dir) "
        "checkpoints with tiny "
        "random weights plus DIR/models.yaml. For tests and the demo: their outputs are noise.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="same seed → byte-identical files")
    p.add_argument("--overwrite", action="store_true", help="rewrite even if DIR/models.yaml exists")
    p.set_defaults(func=_tiny_checkpoints)


def _optional_parsers() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands whose modules pull heavy dependencies are imported here, once."""
    from dynaip.eval.cli import add_eval_parser
    from dynaip.inference.cli import add_generate_parser
    from pipeline.cli import add_curate_parser, add_manifest_parser, add_synth_parser

    from dynaip.demo import add_demo_parser
    from dynaip.features.cli import add_precompute_parser
    from dynaip.serve.app import add_serve_parser
    from dynaip.train.cli import add_train_parser

    return [
        add_curate_parser,
        add_synth_parser,
        add_manifest_parser,
        add_precompute_parser,
        add_train_parser,
        add_generate_parser,
        add_eval_parser,
        add_demo_parser,
        add_serve_parser,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynaip",
        description="DynaIP: data curation, training and inference "
        "for the zero-shot personalization adapter on FLUX.1-dev",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show everything: debug logging, third-party warnings, Ray's logs and its workers' output",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_tiny_checkpoints(sub)
    for add in _optional_parsers():
        add(sub)
    return parser


class Stopped(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``, ``ray job stop``), raised like Ctrl-C's KeyboardInterrupt so the same
    cleanup runs: ``finally`` blocks and context managers release the run lock, remove temporary files and
    shut an embedded Ray down at exit; finished work (chunks, checkpoints, jobs) stays for the resume."""


STOP_HINT = "finished work is kept; run the same command again to resume"
_received: list[int] = []  # SIGTERMs seen by the running command's handler


@contextmanager
def stop_signals() -> Iterator[None]:
    """While a command runs, SIGTERM raises ``Stopped``; a second SIGTERM during the cleanup kills at once
    (the default action), as a scheduler's SIGKILL would. Restored afterwards (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _received.append(signum)  # Ray re-raises a KeyboardInterrupt of its own inside ray.get / ray.wait
        raise Stopped("SIGTERM")

    on_term.dynaip_stop = True  # type: ignore[attr-defined]  # dynaip.cluster.connect puts it back after ray.init
    _received.clear()
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def stop_message(e: KeyboardInterrupt) -> tuple[str, int]:
    """The one line for a stopped run and its exit status (128 + the signal number, as a shell reports it)."""
    if isinstance(e, Stopped) or signal.SIGTERM in _received:
        return f"stopped by SIGTERM: {STOP_HINT}", 128 + signal.SIGTERM
    return f"stopped by Ctrl-C (SIGINT): {STOP_HINT}", 128 + signal.SIGINT


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dynaip.console import configure

    configure(args.verbose)  # quiet by default (see dynaip/console.py); Ray workers inherit it
    try:
        with stop_signals():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the cleanup has run; one line, no traceback
        line, status = stop_message(e)
        log.error("%s", line)
        return status
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, no traceback
        log.error("%s", e)
        return 2
    except Exception as e:
        from dynaip.atomic import storage_error
        from dynaip.models.errors import CheckpointError, SetupError

        full = storage_error(e)
        if full is not None:  # a full / read-only disk: one line naming the path, the run resumes later
            log.error("%s", full)
            return 2
        if isinstance(e, (CheckpointError, SetupError)):  # a stage that cannot start: the message says the fix
            log.error("%s", user_message(e))
            return 2
        raise


def user_message(e: BaseException) -> str:
    """The one line to show for a user error: a Ray task error carries its remote traceback in
    ``str()``; its ``cause`` holds the message itself."""
    cause = getattr(e, "cause", None)
    return str(cause if isinstance(cause, BaseException) else e).strip().splitlines()[0]


def run() -> int:
    """The ``dynaip`` console script: ``main`` in a process of its own (see ``console.request_native_filter``)."""
    from dynaip.console import request_native_filter

    request_native_filter()
    return main()


def run_job(command: str, argv: list[str] | None, description: str) -> int:
    """A Ray job entrypoint (``jobs/<command>.py``): the arguments of ``dynaip <command>``, INFO logs with
    timestamps (the job log is the only console), and user errors as one line with status 2."""
    from dynaip.models.errors import SetupError
    from pipeline.cli import add_curate_parser, add_synth_parser

    parser = argparse.ArgumentParser(prog=f"jobs/{command}.py", description=description)
    sub = parser.add_subparsers(dest="command")
    {"curate": add_curate_parser, "synth": add_synth_parser}[command](sub)
    args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with stop_signals():  # `ray job stop` sends SIGTERM to the entrypoint
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        line, status = stop_message(e)
        print(f"error: {line}", file=sys.stderr, flush=True)
        return status
    except (ValueError, FileNotFoundError, SetupError) as e:  # user errors: one line in the job log, no traceback
        print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        from dynaip.atomic import storage_error

        full = storage_error(e)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(run())
