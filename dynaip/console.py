"""What the console shows: quiet by default, everything with ``-v`` / ``--verbose``.

Quiet (the default of every ``dynaip`` command):
- third-party deprecations (``DeprecationWarning``, ``PendingDeprecationWarning``, ``FutureWarning``)
  and third-party ``UserWarning`` s (torch, diffusers, transformers, timm, groundingdino, ...) are
  not shown; warnings raised by this project's own code and by Pillow (bad images) still are;
- Ray's own log lines (INFO/WARNING of ``ray``, Ray Data's console handler, the C++ core's
  ``core_worker.cc ... E`` notices) and the workers' forwarded output are not shown; the workers
  apply the same warning policy (``worker_process_setup_hook``) and keep their full logs in Ray's
  session directory; problems with the user's data come back as counts (rejects by reason, skipped
  samples);
- diffusers / transformers progress bars (model loading included) and INFO messages are off, and so is
  every other library's INFO line on the console (``OwnInfoOnly``; e.g. matplotlib's font cache notice).

Verbose (``-v``): nothing is filtered, the workers' output is forwarded to the console.
The choice travels to child processes (Ray workers included) in ``DYNAIP_VERBOSE``.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import warnings
from pathlib import Path

VERBOSE_ENV = "DYNAIP_VERBOSE"
THIRD_PARTY = (
    r"(torch|torchvision|diffusers|transformers|timm|groundingdino|segment_anything|open_clip|ray|"
    r"accelerate|huggingface_hub|webdataset|peft|pyarrow|pandas|numpy|scipy|skimage|tqdm|gradio)(\..*)?$"
)
RAY_DATA_QUIET_CONFIG = Path(__file__).with_name("ray_data_logging_quiet.yaml")
"""Ray Data's default logging config with its console handler at ERROR (the log file keeps everything)."""
NATIVE_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWEF] \d+ \d+\] ")
"""A line of Ray's C++ core (``[2026-01-01 10:00:00,123 E 4242 4242] core_worker.cc:2465: ...``)."""
QUIET_LOGGERS = (
    "ray",
    "ray.data",
    "ray.train",
    "ray.tune",
    "ray.serve",
    "diffusers",
    "transformers",
    "accelerate",
    "huggingface_hub",
    "timm",
    "urllib3",
    "httpx",
)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def configure(verbose: bool) -> None:
    """Sets the policy for this process and its children; called once by the ``dynaip`` command."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        quiet()
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, OwnInfoOnly) for f in handler.filters):
                handler.addFilter(OwnInfoOnly())


class OwnInfoOnly(logging.Filter):
    """Quiet mode's filter on the console handler: INFO lines of this project pass; a library's INFO (e.g.
    ``matplotlib.font_manager`` building its font cache on first import) only with ``-v``; warnings and errors
    of every logger pass."""

    OWN = ("dynaip", "pipeline", "jobs", "__main__")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".", 1)[0] in self.OWN


def quiet() -> None:
    """Applies the quiet policy in this process (the driver, or a Ray worker through ``worker_setup``)."""
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=THIRD_PARTY)
    # torch's non-writable-array notice is attributed to whoever called torch.from_numpy
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # read by processes started from here: Ray's raylet and workers (C++ core log level), the HF libraries
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_QUIET_CONFIG))
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _quiet_hf()


def _quiet_hf() -> None:
    """diffusers / transformers keep their own verbosity and progress-bar switches (if imported)."""
    import sys

    if "diffusers" in sys.modules:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


def quiet_ray_data() -> None:
    """Ray Data installs its own console handler at import: raise it to ERROR (its log file keeps everything)."""
    if is_verbose():
        return
    for h in logging.getLogger("ray.data").handlers:
        if type(h).__name__ != "SessionFileHandler":
            h.setLevel(logging.ERROR)


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook``: every worker applies the driver's policy."""
    if not is_verbose():
        quiet()
        quiet_ray_data()


def ray_init_kwargs(runtime_env: dict | None = None) -> dict:
    """Keyword arguments for ``ray.init`` that carry the console policy to Ray and its workers."""
    verbose = is_verbose()
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), VERBOSE_ENV: "1" if verbose else "0"}
    env.setdefault("worker_process_setup_hook", "dynaip.console.worker_setup")
    kwargs: dict = {"runtime_env": env}
    if not verbose:
        quiet()
        if _filter_requested:
            filter_native_stderr()
        kwargs.update(log_to_driver=False, logging_level=logging.ERROR)
    return kwargs


_filter_requested = False


def request_native_filter() -> None:
    """Called by the ``dynaip`` entry point (a process of its own, not a library caller): when Ray
    starts in quiet mode, its C++ lines on this process's stderr are filtered."""
    global _filter_requested
    _filter_requested = True


_native_filter: tuple[int, threading.Thread] | None = None


def filter_native_stderr() -> None:
    """Quiet mode, in a ``dynaip`` process: lines that Ray's C++ core writes to this process's stderr
    (file descriptor 2, below Python) are dropped; everything else passes through unchanged."""
    global _native_filter
    if _native_filter is not None or is_verbose():
        return
    try:
        sys.stderr.flush()
        original = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:  # no usable stderr: nothing to filter
        return

    def pump() -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not NATIVE_LOG_LINE.match(line):
                    os.write(original, line + b"\n")
            if buf and not buf.startswith(b"["):  # progress bars: pass partial lines through at once
                os.write(original, buf)
                buf = b""
        if buf and not NATIVE_LOG_LINE.match(buf):
            os.write(original, buf)

    thread = threading.Thread(target=pump, name="dynaip-stderr-filter", daemon=True)
    thread.start()
    _native_filter = (original, thread)

    def restore() -> None:
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os.dup2(original, 2)  # closes the pipe's last write end held here: the pump drains and stops
        thread.join(timeout=2)

    atexit.register(restore)


def quiet_libraries() -> None:
    """The HF libraries' own verbosity and progress bars follow the policy (call after importing them)."""
    if not is_verbose():
        _quiet_hf()


def progress_bars(pipeline) -> None:
    """A diffusers pipeline's per-call progress bar follows the policy."""
    if not is_verbose():
        _quiet_hf()
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=not is_verbose())
