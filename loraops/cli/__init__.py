"""The `loraops` command line: a thin layer over the library.

Each command parses its arguments, makes one library call and renders the result (a table, or --json).
Commands live in one module per area and are loaded lazily, so `loraops --help` imports no torch.
Library errors become a one-line message and an exit code here, in one place (LoraopsGroup.invoke).
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import importlib
import logging
import os
import signal
import sys
from typing import Callable, Iterator

import click

from .. import __version__
from ..errors import LoraopsError

# command name → "module:attribute" (modules inside loraops.cli)
COMMANDS = {
    "register": "adapters:register",
    "list": "adapters:list_adapters",
    "show": "adapters:show",
    "rm": "adapters:rm",
    "inspect": "inspect:inspect",
    "check": "adapters:check",
    "base": "base:base",
    "db": "db:db",
    "merge": "merge:merge",
    "subtract": "merge:subtract",
    "combine": "algebra:combine",
    "resize": "algebra:resize",
    "export": "algebra:export",
    "extract": "extract:extract",
    "pull": "hub:pull",
    "push": "hub:push",
    "gc": "maintenance:gc",
    "verify": "maintenance:verify",
}


INTERRUPTED = "error: interrupted; nothing was written"
_LANDING = "loraops.landing"  # ctx.meta: the command's output (expect_output)
_ARGS = "loraops.args"  # ctx.meta: the command line after the group's options (`base rm NAME`: LoraopsGroup.ran)
_interrupt: list[int | None] = [None]  # the signal that reached this run (see _terminate); None while none did
# A path the user gave that cannot be used as it is: bad input (exit 2), like any other.
UNUSABLE_PATH = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG,
                 errno.ENOENT}


GROUP_OPTIONS = {"--home": "--home DIR", "--db": "--db URL", "-q": "-q", "--quiet": "--quiet"}
"""The options of `loraops` itself (main) as its usage shows them; given after a command, the error says so."""


MODEL_OPTIONS = ("--into", "--from", "--base")
"""How commands name the model they read: merge --into, subtract --from, the others --base. One given to a command
that names it otherwise says which it takes."""


def one_line(message: str) -> str:
    """A message kept on one line: control characters (a newline in a file name) shown escaped, as repr shows them."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in message)


def usage_error(exc: click.UsageError, args: list[str]) -> None:
    """A bad option or argument, said as one line like every other error (click's own way takes four). ``args``: the
    command line click was reading (from the command's name on), where a word it refused is looked up."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):  # `loraops base` alone: the help, as click shows it
        raise exc
    message = exc.format_message().rstrip(".")
    typed = wanted = exc.option_name if isinstance(exc, click.NoSuchOption) else None
    if isinstance(exc, click.NoSuchOption) and exc.ctx is not None:
        typed = _single_dash_word(exc.ctx, exc.option_name, args) or typed
        if typed != wanted:  # `merge -forc`: click said "no such option '-f'" (of -f -o -r -c)
            wanted, message = f"-{typed}", _one_dash_said(exc.ctx, typed)
    if wanted in GROUP_OPTIONS and exc.ctx is not None and exc.ctx.parent is not None:
        # `loraops list --db URL`: click said "no such option '--db'. Did you mean '--base'?"
        root = exc.ctx.find_root()
        command = exc.ctx.command_path.removeprefix(root.command_path).strip()
        fail(f"{typed} is an option of {root.command_path} itself, given before the command: "
             f"`{root.command_path} {GROUP_OPTIONS[wanted]} {command} …` (see `{root.command_path} --help`)",
             exc.exit_code)
    if wanted in MODEL_OPTIONS and exc.ctx is not None:
        taken = [param.get_help_record(exc.ctx)[0] for param in exc.ctx.command.params
                 if set(param.opts) & {*MODEL_OPTIONS, "--tuned"}]
        if taken:  # `merge --base B`: click said "Did you mean '--name'?"
            message = f"no such option '{typed}': {exc.ctx.info_name} takes {' and '.join(taken)}"
    if isinstance(exc, click.MissingParameter) and isinstance(getattr(exc.param, "type", None), click.Choice):
        # click lists the choices one a line ("Choose from:\n\tpeft,\n\tkohya…"), escaped into '\n\t' by one_line
        missing = message.partition(". ")[0]
        message = f"{missing}: choose from {', '.join(map(str, exc.param.type.choices))}"
    hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
    fail(f"{message[:1].lower()}{message[1:]}{hint}", exc.exit_code)


def _one_dash_said(ctx: click.Context, word: str) -> str:
    """What a long option typed with one dash (``word``) is said as, with the double-dash option it may mean."""
    longs = [opt for param in ctx.command.get_params(ctx) for opt in (*param.opts, *param.secondary_opts)
             if opt.startswith("--")]
    close = difflib.get_close_matches(f"-{word.partition('=')[0]}", longs, n=1)
    return f"no such option '{word}'" + (f". Did you mean '{close[0]}'?" if close else "")


def _one_dash_words(ctx: click.Context, args: list[str]) -> Iterator[tuple[str, dict[str, bool]]]:
    """The words of ``args`` that click reads as clustered short options (`-forc`: -f -o -r -c; `-output`: -o with
    the value `utput`), each with the command's options (option → whether it is a flag); found as click's parser
    reads the line: the value after an option that takes one is not an option, nor is what follows `--`."""
    flags = {opt: isinstance(param, click.Option) and (param.is_flag or param.count)
             for param in ctx.command.get_params(ctx) for opt in (*param.opts, *param.secondary_opts)}
    words = iter(args)
    for word in words:
        if word == "--":
            return
        if word.partition("=")[0] in flags:
            if "=" not in word and not flags[word]:
                next(words, None)
        elif word.startswith("-") and not word.startswith("--") and len(word) > 2:
            yield word, flags


def _single_dash_word(ctx: click.Context, refused: str, args: list[str]) -> str | None:
    """The word of ``args`` in which click refused the short option ``refused`` (`-forc`, a long option typed with one
    dash), when that word is not ``refused`` itself: in `-ab…` the letters after a short option that takes a value
    are that value, not options."""
    for word, flags in _one_dash_words(ctx, args):
        for letter in word[1:]:
            if f"-{letter}" not in flags:
                if f"-{letter}" == refused:
                    return word
                break
            if not flags[f"-{letter}"]:
                break
    return None


def refuse_one_dash_long_option(ctx: click.Context, args: list[str]) -> None:
    """`merge -output x`, `combine -method ties`: a long option of the command typed with one dash, which click reads
    without complaint as its short option with the rest as the value (-o utput, -m ethod), leaving the value given
    to be read as an adapter; said as `-forc` is (usage_error)."""
    for word, flags in _one_dash_words(ctx, args):
        if f"-{word.partition('=')[0]}" in flags and flags.get(word[:2]) is False:
            fail(f"{_one_dash_said(ctx, word)} (see `{ctx.command_path} --help`)", click.UsageError.exit_code)


def _terminate(signum: int, frame) -> None:
    """SIGTERM (`kill`, a job scheduler, `docker stop`) is handled as Ctrl-C is: the same cleanup (no temporary output
    left beside the output, where `gc` does not look) and the same messages, then exit 128 + 15. By default it ended
    the process on the spot. Ctrl-C comes here too, to be remembered: a library may turn the KeyboardInterrupt into
    an error of its own that keeps no link to it (pydantic_core's SchemaError, while it builds a model's schema)."""
    _interrupt[0] = signum
    raise KeyboardInterrupt


class TorchImport:
    """A finder on sys.meta_path while the CLI runs (torch not yet imported): torch's import, wherever loraops or a
    library first asks for it (settings.resolve_device in a merge, a reader in register, ops.combine's module, …),
    runs with Ctrl-C deferred to its end (landing.interrupts_deferred), then raised there. torch's C++ start-up clears
    whatever its `import numpy` raises, so a Ctrl-C that landed there (1–2 s into a command) was lost: the command
    ran to its end, a whole merge written and recorded, and only then said it was interrupted."""

    def find_spec(self, name: str, path, target=None):
        if name != "torch":
            return None
        # (asked of the other finders, as the import system does; it stays for a later import, since a query
        # (transformers' importlib.util.find_spec("torch")) may come first)
        spec = next((found for finder in sys.meta_path if finder is not self
                     and (found := finder.find_spec(name, path, target)) is not None), None)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def deferred(module, run=run) -> None:
                from ..landing import interrupts_deferred

                with interrupts_deferred():
                    run(module)
            spec.loader.exec_module = deferred
        return spec


def interrupted() -> int:
    """The exit status of an interrupted run: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (_interrupt[0] or signal.SIGINT)


def say_error(line: str) -> None:
    """Write ``line`` on stderr after what is already said on stdout: with both sent to one file (`> log 2>&1`),
    stdout is block-buffered and its summary would otherwise land after the error line that followed it."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    click.echo(line, err=True)


def fail(message: str, code: int) -> None:
    """Say ``message`` as the one `error:` line on stderr and exit with ``code``."""
    say_error(f"error: {one_line(message)}")
    raise click.exceptions.Exit(code)


def system_error(exc: OSError, landed: Callable[[], str | None] = lambda: None) -> None:
    """An error of the operating system nothing foresaw (a home under a file, a read-only folder, a full disk, stdout
    on /dev/full): still one line, naming the path the user gave (not our temporary sibling of it). A reader that
    left (`loraops list | head`) gets silence and 141, as from other CLI tools. Stdout that cannot be written is
    named, with what had landed (``landed``: an output, a record), which the report was to say: a merge's summary
    on a full disk said only "No space left on device", as if the merge had failed for want of room."""
    if isinstance(exc, BrokenPipeError):
        sys.stderr.close()
        raise click.exceptions.Exit(141)
    from ..fsutil import user_path

    code = 5 if exc.errno == errno.ENOSPC else 2 if exc.errno in UNUSABLE_PATH else 1
    if exc.filename:
        fail(f"{user_path(exc.filename)}: {exc.strerror or exc}", code)
    if not writing_stdout(exc):
        fail(str(exc.strerror or exc), code)
    after = landed()
    fail(f"stdout: {exc.strerror or exc}" + (f" ({after.removeprefix('interrupted ')})" if after else ""), code)


def writing_stdout(exc: OSError) -> bool:
    """Whether ``exc`` was raised writing to stdout: by click.echo to it (the frame it left from writes ``file``)."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    stream = frame.tb_frame.f_locals.get("file") if frame is not None else None
    return stream is not None and any(stream is out for out in (sys.stdout, sys.__stdout__))


def said(exc: LoraopsError, command: click.Command | None) -> str:
    """``exc``'s message, with the parameters it names said as ``command``'s options where it has one
    of that name (max_rank: --max-rank; a flag's value as the flag typed for it, rescale=False: --no-rescale), or one
    that passes it (subpath: --file, all_versions=True: --all); the library says them as Python writes them."""
    if command is None:
        return str(exc)
    options = {option for param in command.params for option in (*param.opts, *param.secondary_opts)}

    def option(word: str) -> str:
        name, _, value = word.partition("=")
        typed = f"--{'no-' * (value == 'False')}{name.replace('_', '-')}"
        passing = [opt for param in command.params if param.name == name
                   for opt in (param.secondary_opts if value == "False" else param.opts)]
        return typed if typed in options else max(passing, key=len) if passing else word

    return exc.said(option)


class Number(click.ParamType):
    """A numeric option (--alpha, --rank, --grace …) as references.parse_number reads it: plainly written and finite;
    click's FLOAT and INT take Python's spellings ('1_0', ' 1 ', 'nan', 'inf')."""

    def __init__(self, integer: bool, kind: str | None = None) -> None:
        self.integer, self.kind = integer, kind
        self.name = "integer" if integer else "float"

    def convert(self, value, param, ctx):
        from ..references import parse_number

        if not isinstance(value, str):  # a default, already a number
            return value
        try:
            return parse_number(value, self.integer, self.kind)
        except LoraopsError as exc:
            self.fail(str(exc), param, ctx)


FLOAT, INT = Number(integer=False), Number(integer=True)
SECONDS = Number(integer=False, kind="a number of seconds written plainly (like 3600 or 0.5)")


class Dtype(click.Choice):
    """--dtype: bf16, fp16 or fp32, also under the names torch, PEFT, mergekit and kohya give them (bfloat16,
    float16, float32, half, float), which the Python API and a recipe's out_dtype take: the CLI refused them. Any
    case: `BF16` is the safetensors name (a header's, an older lineage record's)."""

    ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}

    def __init__(self) -> None:
        super().__init__(["bf16", "fp16", "fp32"])

    def convert(self, value, param, ctx):
        name = self.ALIASES.get(value.lower(), value.lower()) if isinstance(value, str) else value
        return name if name in self.choices else super().convert(value, param, ctx)


DTYPE = Dtype()


class LoraopsGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self.get_command(ctx, name) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as exc:  # an area not built yet in this checkout
            if exc.name == f"{__name__}.{module_name}":
                return None
            raise
        return getattr(module, attribute, None)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        # click suggests from the commands it holds, and this group loads them lazily: `loraops merg` had no suggestion
        name = args[0] if args else ""
        if name == "version":  # (the closest command is verify)
            ctx.fail("No such command 'version': `loraops --version` prints it")
        close = difflib.get_close_matches(name, COMMANDS, n=1) if name not in COMMANDS else []
        if close and not name.startswith("-") and not ctx.resilient_parsing:
            ctx.fail(f"No such command {name!r}. Did you mean {close[0]!r}?")
        ctx.meta[_ARGS] = list(args)
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not isinstance(command, click.Group) and not ctx.resilient_parsing:
            refuse_one_dash_long_option(click.Context(command, info_name=name, parent=ctx), rest)
        return name, command, rest

    def ran(self, ctx: click.Context) -> click.Command | None:
        """The command that ran: `base rm`'s rm, whose options an error's parameters are said as, not base's (the
        groups below this one take no options: the word after one names its command)."""
        command, args = self, ctx.meta.get(_ARGS, [])
        while isinstance(command, click.Group) and args:
            command, args = command.get_command(ctx, args[0]), args[1:]
        return command

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra) -> click.Context:
        given = list(args)  # (click's parser consumes args)
        try:
            return super().make_context(info_name, args, parent, **extra)
        except KeyboardInterrupt:  # while the options are read: click would say "Aborted!" and exit 1
            say_error(INTERRUPTED)
            raise click.exceptions.Exit(interrupted()) from None
        except click.UsageError as exc:
            usage_error(exc, given)
        except OSError as exc:  # the group's own --help / --version written to a full disk or a closed pipe
            system_error(exc)

    def invoke(self, ctx: click.Context):
        notes, handler = logging.getLogger("loraops"), _Notes()
        level = notes.level
        notes.addHandler(handler)
        notes.setLevel(logging.INFO)
        from ..landing import Landing

        ctx.meta[_LANDING] = Landing()  # what a command without an output lands is told to it (landing.tell)
        try:
            result = super().invoke(ctx)
            if _interrupt[0] is not None:
                # a Ctrl-C some library swallowed, the command then run to its end as if none had come (exit 0);
                # torch's start-up was one (its import now defers it: TorchImport)
                raise KeyboardInterrupt
            return result
        except LoraopsError as exc:
            fail(said(exc, self.ran(ctx)), exc.exit_code)
        except click.UsageError as exc:  # a command's own options (the group's are read in make_context)
            usage_error(exc, ctx.meta.get(_ARGS, []))
        except KeyboardInterrupt as exc:  # a command interrupted after its output landed says so (landing.Landing)
            fail(exc.args[0] if exc.args else _landed(ctx) or INTERRUPTED.removeprefix("error: "), interrupted())
        except OSError as exc:
            system_error(exc, lambda: _landed(ctx))
        except Exception as exc:
            if _interrupt[0] is None and not _raised_under_interrupt(exc):
                from ..settings import out_of_memory

                # the library says what ran out where (settings.device_memory); this is for a path it does not cover
                error = out_of_memory(exc)
                if error is None and type(exc).__module__.partition(".")[0] in ("sqlite3", "psycopg", "sqlalchemy"):
                    from ..registry.db import failed
                    from ..settings import db_url

                    error = failed(exc, db_url())
                if error is None:
                    raise
                fail(str(error), error.exit_code)
            fail(_landed(ctx) or INTERRUPTED.removeprefix("error: "), interrupted())
        finally:
            notes.removeHandler(handler)
            notes.setLevel(level)


class _Notes(logging.Handler):
    """The library's notes (the "loraops" logger), each said once on stderr as `note: ...` (a base opened twice by
    one command says it once)."""
    def __init__(self) -> None:
        super().__init__()
        self.said: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = one_line(record.getMessage())
        if message not in self.said:
            self.said.add(message)
            click.echo(f"note: {message}", err=True)


def expect_output(output, record: bool = False) -> None:
    """The command writes ``output`` (None: none; ``record``: a merge's, recorded as a base once it lands): a Ctrl-C
    anywhere in it, also after the library call returned (in the command's last lines, in click's return from it,
    after the summary was said), says what is there (landing.Landing). A Ctrl-C there said "nothing was written" of a
    merge written in full and recorded."""
    from ..landing import Landing

    click.get_current_context().meta[_LANDING] = Landing(output, record)


def _landed(ctx: click.Context) -> str | None:
    landing = ctx.meta.get(_LANDING)
    return landing.landed() if landing is not None else None


def _raised_under_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while a Ctrl-C was being handled: a driver's clean-up the KeyboardInterrupt cut
    short can fail in its own words and replace it (psycopg's "can't change 'autocommit' now" when SQLAlchemy resets
    a PostgreSQL connection whose pre-ping the Ctrl-C interrupted), which is an interrupted run, not a traceback."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def not_empty(default: str):
    """A callback refusing an option given empty (`--home "$UNSET"`), which was read as not given: ``default`` was
    used instead, the user's real home for --home."""
    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise click.BadParameter(f"it is empty (an unset variable?); leave {param.opts[0]} out for {default}",
                                     ctx, param)
        return value
    return check


@click.group(cls=LoraopsGroup, context_settings={"help_option_names": ["-h", "--help", "-help"]})
@click.option("--home", type=click.Path(file_okay=False), callback=not_empty("$LORAOPS_HOME or the user data dir"),
              help="loraops home folder (default $LORAOPS_HOME or the user data dir).")
@click.option("--db", "db", metavar="URL", callback=not_empty("$LORAOPS_DB or SQLite in the home"),
              help="Registry SQLAlchemy URL (default $LORAOPS_DB or SQLite in the home).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.version_option(__version__, prog_name="loraops")
def main(home: str | None, db: str | None, quiet: bool) -> None:
    """Manage LoRA adapters and do their arithmetic."""
    from .. import settings

    # The settings module reads the environment at call time; the options simply set it for this process.
    if home:
        os.environ[settings.ENV_HOME] = home
    if db:
        os.environ[settings.ENV_DB] = db
    if quiet:
        os.environ[settings.ENV_QUIET] = "1"


def exit_status(args: list[str] | None = None) -> int:
    """Run the CLI (``args``, default sys.argv) and return the status `loraops` exits with. Not in click's
    standalone mode: there, a Ctrl-C that lands in click's own code (after a command returned, while its context
    closes) becomes "Aborted!" and exit 1. SIGTERM is handled as Ctrl-C while it runs (_terminate)."""
    if os.name == "nt":  # no os.pwrite, os.preadv, fcntl locks or resource there: outputs failed once computed
        say_error("error: loraops runs on Linux and macOS; on Windows, run it in WSL2")
        return 1
    previous = signal.getsignal(signal.SIGTERM)
    # (an ignored SIGINT stays ignored: a background job's)
    ctrl_c = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _interrupt[0] = None
    torch_import = TorchImport()
    try:
        signal.signal(signal.SIGTERM, _terminate)
        if ctrl_c:
            signal.signal(signal.SIGINT, _terminate)
        if "torch" not in sys.modules:
            sys.meta_path.insert(0, torch_import)
        code = main(args=args, prog_name="loraops", standalone_mode=False)
        code = code if isinstance(code, int) else 0  # ctx.exit(N) comes back as N; a command's return value is not one
    except click.ClickException as exc:  # `loraops base` alone (its help); other usage errors: usage_error
        exc.show()
        code = exc.exit_code
    except SystemExit as exc:
        code = exc.code
    except (KeyboardInterrupt, click.exceptions.Abort):  # outside the command's own handling
        say_error("error: interrupted")
        code = interrupted()
    finally:
        with contextlib.suppress(ValueError):  # (not there when torch was imported before)
            sys.meta_path.remove(torch_import)
        _give_back(previous, ctrl_c)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    return code or 0


def _give_back(previous, ctrl_c: bool) -> None:
    """The handlers exit_status took, given back, and the signal forgotten for the next run in this process (tests,
    the fork server, a library's caller), even when a Ctrl-C lands meanwhile: it escaped with _terminate left
    handling both signals and its signal remembered, so every later run called its own errors interrupted runs.
    That Ctrl-C is raised once all is given back."""
    late = False
    while True:
        try:
            signal.signal(signal.SIGTERM, previous)
            if ctrl_c:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            _interrupt[0] = None
            break
        except KeyboardInterrupt:
            late = True
    if late:
        raise KeyboardInterrupt


def run() -> None:
    """The `loraops` program (console script and `python -m loraops`): main(), then an exit that skips the
    interpreter's teardown. With torch loaded, tearing down its thousands of modules and objects takes 0.2–0.3 s
    after the work is done (`import torch` alone: 1.37–1.72 s as a process, 1.08–1.54 s with this exit). Every
    command has closed, synced and renamed its outputs and closed the registry before it returns, so only the
    standard streams are left to flush."""
    try:
        code = exit_status()
    except KeyboardInterrupt:  # landed once exit_status gave back its handlers: Python's traceback, else
        say_error("error: interrupted")
        code = 128 + signal.SIGINT
    # The work is done and said: a Ctrl-C now must not cut the flush of what was said (it would escape as an
    # uncaught KeyboardInterrupt, the summary of a finished merge lost).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
