"""Shared command-line plumbing: one-line errors and non-zero exits instead of tracebacks for bad input.

Every command (``python -m ldr_tf.<command>``, ``python -m tools.<script>``) follows one convention:

* exit 0: done;
* exit 1: bad input (a missing or corrupt file, wrong shapes, an existing output, ...): ``<prog>: error: <message>``;
* exit 2: a bad command line (unknown or missing flag, bad flag value, `UsageError`):
  ``<prog>: usage error: <message>``;
* exit 130: interrupted (Ctrl-C, or SIGTERM: ``kill``, job schedulers, ``docker stop``), after the command saved
  what it could and removed its half-written outputs.

`run` is the entry of ``python -m`` (absl's app: flags in the global FLAGS); `run_argv` runs a command in-process
with its own flags (tests, recipes that call a tool).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from absl import app, flags


class UsageError(ValueError):
    """A problem with the command line (missing, unknown or contradictory flags): exit status 2."""


def _line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def report(prog: str, e: BaseException) -> int:
    """Prints the one-line message of an expected failure and returns its exit status; re-raises anything else."""
    if isinstance(e, (UsageError, flags.Error)):
        print(f"{prog}: usage error: {_line(e)}", file=sys.stderr, flush=True)
        return 2
    if isinstance(e, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    if isinstance(e, (ValueError, OSError)):
        print(f"{prog}: error: {_line(e)}", file=sys.stderr, flush=True)
        return 1
    raise e


def without_keras() -> None:
    """Lets TensorFlow skip importing Keras, for a command that only runs SavedModels (``ldr_tf.predict``).

    ``import tensorflow`` imports Keras 3 with it (1.2 s of its 2.9 s on 2 cores) unless ``TF_USE_LEGACY_KERAS``
    asks for the legacy ``tf_keras`` package, whose import it skips when that package is not installed. So this sets
    ``TF_USE_LEGACY_KERAS=1`` when TensorFlow is not imported yet, the variable is not set, and ``tf_keras`` is
    absent; ``tf.keras`` is then unusable in this process, which such a command never touches. Call it before
    anything imports TensorFlow (the ``__main__`` block of the command), never in a library module.
    """
    import importlib.util

    if "tensorflow" in sys.modules or "TF_USE_LEGACY_KERAS" in os.environ:
        return
    if importlib.util.find_spec("tf_keras") is not None:
        return
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


def _exit_now(status) -> None:
    """Ends the process at once with `status` (after flushing the standard streams and the logging handlers).

    Used by short commands whose outputs are all closed and in place when `main` returns: Python's normal exit
    tears TensorFlow down (its thread pools, kernels, XLA and oneDNN caches), which took 0.9 s of a 7 s predict
    run on 2 cores and is of no use to anyone.
    """
    import logging

    code = status if isinstance(status, int) else (0 if status is None else 1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread, so that a command stopped by ``kill``
    cleans up (temporary files, checkpoints) as on Ctrl-C. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(main, prog: str, fast_exit: bool = False) -> None:
    """``app.run(main)`` with the exit statuses and one-line messages above.

    Expected failures are `UsageError` and flag errors (exit 2), ValueError (bad arguments, bad files:
    `ldr_tf.data.dataset.DatasetError`, ...) and OSError (unreadable / unwritable paths) (exit 1), KeyboardInterrupt
    (exit 130; SIGTERM is turned into KeyboardInterrupt). `fast_exit`: end the process as soon as `main` returns or fails as above, without Python's
    interpreter shutdown (`_exit_now`), for commands that leave no file open and no thread writing when they return.
    """

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            sys.exit(report(prog, e))

    def wrapped(argv):
        import logging

        logging.getLogger("tensorflow").setLevel(logging.WARNING)  # TF's INFO chatter (signatures, savers)
        try:
            with sigterm_as_interrupt():
                status = main(argv)
        except (ValueError, OSError, KeyboardInterrupt) as e:
            status = report(prog, e)
            if not fast_exit:
                sys.exit(status)
        if fast_exit:
            _exit_now(status)
        return status

    app.run(wrapped, flags_parser=parse)


def run_argv(define, body, argv, prog: str) -> int:
    """Parses `argv` (``argv[0]`` = program) into fresh flags made by ``define(fv)`` and runs ``body(fv)``.

    Returns the exit status of the convention above (``--help`` prints the flags and returns 0).
    """
    fv = flags.FlagValues()
    define(fv)
    argv = list(argv) if argv else [prog]
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(fv.get_help())
        return 0
    try:
        rest = fv(argv)
        if len(rest) > 1:
            raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
        return int(body(fv) or 0)
    except (ValueError, OSError, KeyboardInterrupt, flags.Error) as e:
        return report(prog, e)
