"""Shared command-line plumbing: one-line errors and non-zero exits instead of tracebacks for bad input."""

from __future__ import annotations

import sys

from absl import app, flags


class UsageError(ValueError):
    """A problem with the command line or its inputs, reported as one line."""


def run(main, prog: str) -> None:
    """``app.run(main)``, printing ``<prog>: error: <message>`` and exiting 1 for expected failures.

    Expected failures are ValueError (bad arguments, bad files: `ldr_tf.data.dataset.DatasetError`, ...), OSError
    (unreadable / unwritable paths) and KeyboardInterrupt (exit 130 after the caller saved what it could).
    """

    def wrapped(argv):
        import logging

        logging.getLogger("tensorflow").setLevel(logging.WARNING)  # TF's INFO chatter (signatures, savers)
        try:
            return main(argv)
        except KeyboardInterrupt:
            sys.stderr.write(f"{prog}: interrupted\n")
            sys.exit(130)
        except (ValueError, OSError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            sys.stderr.write(f"{prog}: error: {msg}\n")
            sys.exit(1)

    app.run(wrapped)


def run_argv(define, body, argv, prog: str) -> int:
    """Parses `argv` into fresh flags made by ``define(fv)`` and runs ``body(fv)``: the exit status, with one-line
    ``<prog>: error: ...`` messages on stderr for bad input (exit 1), like `run` but in-process (tests, recipes)."""
    fv = flags.FlagValues()
    define(fv)
    try:
        rest = fv(list(argv))
        if len(rest) > 1:
            raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
        return int(body(fv) or 0)
    except flags.Error as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 1
