"""Run loraops commands in processes a test can SIGKILL at any moment, without paying an interpreter start-up
(1-3 s with torch) per run: this server imports everything once, then forks one child per command.

Protocol (one JSON line each way): the test writes {"args": [...], "env": {...}, "stdout": path, "stderr": path}
(optionally "cwd"; "whole_env": the child's environment is env alone, as subprocess.run(env=...) gives; "began": a
path the child creates as the loraops program begins); the server answers {"pid": N} at once, then {"status": S}
when the child ended (S < 0: killed by signal -S). The server itself runs no torch op and no thread before forking,
so the children start clean. A child runs what `python -m
loraops` runs (loraops.cli.run, stdin /dev/null): an exception that escapes it is printed as Python prints
it and exits 1, so a traceback still reaches the test. What a fork cannot show: messages printed while the
preloaded modules are imported (the server's, not the child's)."""
from __future__ import annotations

import json
import os
import sys


# huggingface_hub's package only: its constants (HF_HOME's token path, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET …), read
# from the environment when huggingface_hub.constants is imported, are imported by each child under its own environment.
PRELOAD = ("torch", "safetensors.torch", "huggingface_hub", "sqlalchemy.dialects.sqlite", "sqlalchemy.dialects.postgresql",
           "alembic.command", "loraops.formats", "loraops.check", "loraops.basemodel", "loraops.hub", "loraops.registry.store")


def serve() -> None:
    import importlib

    import loraops.cli as cli

    for name in PRELOAD:
        importlib.import_module(name)

    for name in cli.COMMANDS:  # command modules (those that exist in this checkout)
        cli.main.get_command(None, name)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)


def _child(request: dict) -> None:
    """Never returns: whatever happens (a signal included), the child ends in os._exit and never runs the server's
    loop."""
    code = 70
    try:
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
            if request.get("whole_env"):
                os.environ.clear()
            os.environ.update(request["env"])
            import loraops.hub

            os.environ.setdefault(loraops.hub.XET_ENV, "1")  # what importing loraops.hub does in a fresh process
            if request.get("cwd"):
                os.chdir(request["cwd"])
            sys.argv = ["loraops", *request["args"]]
            from loraops.cli import run

            if request.get("began"):  # tells a test its signal landed in the program, not before it began
                open(request["began"], "w").close()
            run()  # the `loraops` program itself: exit_status, then the flush with signals ignored, then os._exit
        except KeyboardInterrupt:  # a SIGINT before the program started: what Python does then
            code = 130
        except BaseException:  # an uncaught exception: Python prints it and exits 1
            import traceback

            traceback.print_exc()
            code = 1
    finally:
        try:
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class ForkServer:
    """The test side: `with ForkServer() as fs: pid = fs.start(args, env, log); ...; status = fs.wait()`."""

    def __init__(self) -> None:
        import subprocess

        import loraops

        # The loraops this test imports, whatever the working folder (a relative PYTHONPATH would not hold there).
        path = os.pathsep.join([os.path.dirname(os.path.dirname(loraops.__file__)), os.environ.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, env={**os.environ, "PYTHONPATH": path})

    def start(self, args: list[str], env: dict[str, str], log: str, **request) -> int:
        """Start a child; its stdout and stderr go to the file ``log`` (truncated), or to request's "stdout" and
        "stderr" when given."""
        if "stdout" not in request:
            open(log, "w").close()
            request.update(stdout=log, stderr=log)
        self.proc.stdin.write(json.dumps({"args": args, "env": env, **request}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"]

    def wait(self) -> int:
        return json.loads(self.proc.stdout.readline())["status"]

    def run(self, args: list[str], env: dict[str, str], log: str, **request) -> int:
        self.start(args, env, log, **request)
        return self.wait()

    def __enter__(self) -> "ForkServer":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve()
