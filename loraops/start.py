"""The `loraops` program's entry (console script and `python -m loraops`): loraops.cli imported under a Ctrl-C
that says one line. Its import (click's, the package's) takes ~50 ms, in which a Ctrl-C was Python's
KeyboardInterrupt traceback; from then on loraops.cli.run says what an interruption left."""
import signal
import sys


def run() -> None:
    try:
        from .cli import run as command
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(128 + signal.SIGINT) from None
    command()
