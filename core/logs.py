"""Process logging: one line per event, JSON when nobody watches a terminal, and the ML libraries quiet.

A worker's log should read as what happened to each job: :func:`configure` gives every process the
same format (``LIKENESS_LOG_FORMAT``: ``json`` lines for a log collector, ``text`` for a person,
``auto``: JSON unless stderr is a terminal), and fields passed as ``extra`` (``job_id``, ``stage``,
...) become JSON keys. :func:`quiet_libraries` silences what the libraries print on every job
while being correct: progress bars of weight loading (transformers, diffusers, huggingface_hub),
their advisory warnings, diffusers' ``torch_dtype`` deprecation, peft's note on saving a LoRA of a
local base, and the TF Lite / absl lines that MediaPipe's native graphs write straight to file
descriptor 2. Call it before the libraries load.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import warnings
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["auto", "json", "text"]

#: environment read by the libraries when they are imported
LIBRARY_QUIET_ENV = {
    "TQDM_DISABLE": "1",  # diffusers' "Loading pipeline components" and every other tqdm bar
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub and transformers' "Loading weights"
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",  # e.g. "You have 2 ControlNets and you have passed N prompts"
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "GLOG_minloglevel": "2",
}
#: native stderr lines with nothing to act on (MediaPipe's TF Lite runtime, absl before InitializeLog)
NATIVE_NOISE = (b"inference_feedback_manager.cc", b"absl::InitializeLog()", b"Created TensorFlow Lite XNNPACK")
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time, level, logger, message, the ``extra`` fields, the exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: int | str = "INFO", log_format: LogFormat = "auto") -> None:
    """Replace the root logger's handlers with one stderr handler in the chosen format."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)


def quiet_libraries() -> None:
    """Silence the ML libraries' routine output in this process (and the processes it starts)."""
    for name, value in LIBRARY_QUIET_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", message=r".*`torch_dtype` is deprecated", category=FutureWarning)
    # peft, saving a LoRA of a local base folder: our tokens live in the adapter's own files
    warnings.filterwarnings("ignore", message=r"Could not find a config file in .* will assume that the vocabulary")
    for name in ("transformers", "diffusers"):  # already imported: their loggers read the environment once
        if name in sys.modules:
            logging.getLogger(name).setLevel(logging.ERROR)
    _filter_native_stderr()


_FILTER: dict[str, object] = {}
_DRAINED = b"\0likeness: native stderr drained\0"  # the exit's marker line (never shown)


def _on_fd2(stream) -> bool:  # noqa: ANN001
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _filter_native_stderr() -> None:
    """Drop :data:`NATIVE_NOISE` lines that native code writes to fd 2 (Python keeps the real stderr).

    Native threads write to the file descriptor directly, so fd 2 becomes a pipe whose reader passes
    every other line on; ``sys.stderr`` (and so every log handler made afterwards) writes to the
    original stderr, unfiltered and undelayed. Once per process.
    """
    if _FILTER or os.name != "posix":
        return
    original = os.dup(2)
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    pipe = (os.fstat(2).st_dev, os.fstat(2).st_ino)
    if _on_fd2(sys.stderr):  # else (a test's capture, a redirect) Python's stderr is not fd 2 already
        sys.stderr = open(original, "w", buffering=1, encoding="utf-8", errors="backslashreplace",  # noqa: SIM115
                          closefd=False)

    drained, owner = threading.Event(), os.getpid()

    def forward() -> None:
        with open(read_end, "rb", buffering=0) as native:
            pending = b""
            while chunk := native.read(65536):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                kept = b"".join(line + b"\n" for line in lines
                                if line != _DRAINED and not any(n in line for n in NATIVE_NOISE))
                if kept:
                    os.write(original, kept)
                if _DRAINED in lines:
                    drained.set()
            if pending:
                os.write(original, pending)

    thread = threading.Thread(target=forward, name="native-stderr-filter", daemon=True)
    thread.start()
    _FILTER.update(original=original, thread=thread)

    def drain() -> None:
        """At exit, pass on what native code wrote last: the reader is a daemon thread that nobody waits for,
        so a marker goes through the pipe after everything written so far, and the exit waits for it."""
        if os.getpid() != owner:  # a forked child: the reader (and its event) are its parent's
            return
        if (os.fstat(2).st_dev, os.fstat(2).st_ino) != pipe:  # fd 2 was pointed elsewhere since (pytest's capture)
            return
        os.write(2, _DRAINED + b"\n")
        drained.wait(timeout=2)

    atexit.register(drain)
