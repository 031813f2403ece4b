"""The command line's contract on hostile input, one regression per defect the sweep found: bad input gets one
line `error: …` on stderr and its documented exit code (never a traceback), and nothing is left half-written —
outputs land by rename, and the registry changes in one transaction or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from factories import kohya_file, peft_adapter, tiny_llama
from loraops.cli import main

MODULES = {"lora_unet_model_layers_0_self_attn_q_proj": ((64,), (64,))}


def cli(*args, code=0, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output
    if code:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result


@pytest.fixture
def kohya(tmp_path) -> Path:
    return kohya_file(tmp_path / "style.safetensors", MODULES, rank=4)


def test_an_output_that_is_a_symlink_loop_exists(tmp_path, kohya):
    """Path.resolve() raised RuntimeError on a symlink loop (a traceback); and the loop, which Path.exists() calls
    absent, was replaced without --force."""
    loop, other = tmp_path / "loop.safetensors", tmp_path / "other"
    loop.symlink_to(other)
    other.symlink_to(loop)
    result = cli("export", kohya, "--format", "kohya", "-o", loop, code=4)
    assert result.stderr == f"error: {loop}: already exists (use --force to replace it)\n"
    cli("export", kohya, "--format", "kohya", "-o", loop, "--force")
    assert loop.is_file() and not loop.is_symlink()


def test_a_newline_in_a_path_stays_on_the_error_line(tmp_path, kohya):
    """A file name with a newline made the error two lines."""
    missing = tmp_path / "a\nb.safetensors"
    result = cli("register", missing, code=3)
    assert result.stderr == f"error: {tmp_path}/a\\nb.safetensors: no such file or folder\n"
    (tmp_path / "out\n").write_bytes(b"x")
    cli("export", kohya, "--format", "kohya", "-o", tmp_path / "out\n", code=4)



@pytest.mark.parametrize("args, code", [
    (["inspect", ""], 3), (["register", ""], 3), (["base", "add", ""], 3),
    (["export", "", "--format", "peft", "-o", "{out}"], 3), (["resize", "", "--rank", "2", "-o", "{out}"], 3),
    (["merge", "", "--into", "{base}", "-o", "{out}", "--device", "cpu"], 3),
    (["merge", "{adapter}", "--into", "", "-o", "{out}", "--device", "cpu"], 3),
])
def test_an_empty_reference_is_not_the_working_folder(tmp_path, monkeypatch, args, code):
    """Path('') is '.': an empty REF or PATH read the adapter (or the base) in the working folder, and `register ''`
    registered it as if the user had named it."""
    from loraops.registry import Registry

    tiny_llama(tmp_path / "base")
    peft_adapter(tmp_path / "base", tmp_path / "adapter", r=4)
    for folder in ("adapter", "base"):  # read from either as the working folder
        monkeypatch.chdir(tmp_path / folder)
        filled = [a.format(out=tmp_path / "out", base=tmp_path / "base", adapter=tmp_path / "adapter") for a in args]
        result = cli(*filled, code=code)
        assert "no such file or folder" in result.stderr or "in the registry" in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()
    with Registry.open() as reg:
        assert reg.list_adapters() == [] and reg.list_bases() == []

@pytest.mark.parametrize("args", [["inspect", "{long}"], ["register", "{long}"], ["base", "add", "{long}"],
                                  ["register", "{tmp}/{long}/adapter"]])
def test_a_path_too_long_for_a_file_name_is_the_os_error(tmp_path, args):
    """A command that takes only a path gives the OS's 'File name too long' (exit 2), as before fsutil.existing_path
    read ENAMETOOLONG as a missing file ("no such file or folder", exit 3): that reading is for references that may
    be registry names (fsutil.path_exists), which resolve as names (test_recipe_references)."""
    from loraops.registry import Registry

    result = cli(*[a.format(long="x" * 300, tmp=tmp_path) for a in args], code=2)
    assert result.stderr.endswith(": File name too long\n"), result.stderr
    with Registry.open() as reg:
        assert reg.list_adapters() == [] and reg.list_bases() == []


@pytest.mark.parametrize("args, message", [
    (["merge", "a", "--into", "b", "-o", "c", "--dtype", "int8"],
     "invalid value for '--dtype': 'int8' is not one of 'bf16', 'fp16', 'fp32' (see `main merge --help`)"),
    (["resize", "a", "--rank", "abc"],
     "invalid value for '--rank': 'abc' is not an integer written plainly (like 8) (see `main resize --help`)"),
    (["combine"], "give the adapters to combine (REF[:WEIGHT]...), or --recipe (see `main combine --help`)"),
    (["subtract", "--from", "m", "-o", "o"],
     "give the adapters to subtract (REF[:WEIGHT]...), or --transformer-2 ones (see `main subtract --help`)"),
    (["check"], "give the adapter to check (REF_OR_PATH), or --transformer-2 ones (see `main check --help`)"),
    (["base", "bogus"], "no such command 'bogus' (see `main base --help`)"),
    (["list", "--rank"], "option '--rank' requires an argument"),
])
def test_a_usage_error_is_one_line(args, message):
    """click's own usage errors took four lines (Usage, Try, blank, Error)."""
    assert cli(*args, code=2).stderr == f"error: {message}\n"


def _command_paths():
    from loraops.cli import COMMANDS

    ctx = click.Context(main)
    yield []
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        yield [name]
        yield from ([name, sub] for sub in getattr(command, "commands", ()))


@pytest.mark.parametrize("path", list(_command_paths()), ids=" ".join)
def test_single_dash_help_is_help_on_every_command(path):
    """`loraops merge -help` was read as the short options -h -e -l -p: "no such option '-e'"."""
    shown = CliRunner().invoke(main, [*path, "--help"])
    assert shown.exit_code == 0 and shown.output.startswith(f"Usage: {' '.join(['main', *path])} ")
    for spelling in ("-help", "-h"):
        result = CliRunner().invoke(main, [*path, spelling])
        assert (result.exit_code, result.output) == (0, shown.output), spelling


@pytest.mark.parametrize("args, said", [
    (["merge", "-forc"], "no such option '-forc'. Did you mean '--force'? (see `main merge --help`)"),
    (["merge", "-hepl"], "no such option '-hepl'. Did you mean '--help'? (see `main merge --help`)"),
    (["list", "-jsn"], "no such option '-jsn'. Did you mean '--json'? (see `main list --help`)"),
    (["base", "add", "x", "-nme", "y"], "no such option '-nme'. Did you mean '--name'? (see `main base add --help`)"),
    (["-hepl"], "no such option '-hepl'. Did you mean '--help'? (see `main --help`)"),
    (["-quiet", "list"], "no such option '-quiet'. Did you mean '--quiet'? (see `main --help`)"),
    (["merge", "-xyz"], "no such option '-xyz' (see `main merge --help`)"),
    (["merge", "-base", "b"], "no such option '-base': merge takes --into BASE (see `main merge --help`)"),
    (["merge", "-quiet"], "-quiet is an option of main itself, given before the command: `main --quiet merge …` "
                          "(see `main --help`)"),
    # the word click refused in, not one it read as a value: -o's (`-oforc`, `-o -forc`), --name's, or after --
    (["merge", "-o", "-forc", "-x"], "no such option '-x' (see `main merge --help`)"),
    (["merge", "-oforc", "--name", "-forc", "-hepl"], "no such option '-hepl'. Did you mean '--help'? "
                                                      "(see `main merge --help`)"),
    (["-qx", "list"], "no such option '-qx' (see `main --help`)"),
    # one that click read without complaint as a short option and its value (-o utput, -m ethod)
    (["merge", "style", "--into", "b", "-output", "style"], "no such option '-output'. Did you mean '--output'? "
                                                           "(see `main merge --help`)"),
    (["combine", "style", "-method", "ties"], "no such option '-method'. Did you mean '--method'? "
                                              "(see `main combine --help`)"),
])
def test_a_long_option_typed_with_one_dash_is_named_whole(args, said, kohya, tmp_path):
    """`loraops merge -forc` was read as the short options -f -o -r -c: "no such option '-f'"; `merge x -output y` as
    -o utput, with y an adapter to merge."""
    cli("register", kohya)
    assert cli(*args, code=2).stderr == f"error: {said}\n"
    assert not (Path.cwd() / "utput").exists()


def test_short_options_still_work_alone_clustered_and_with_their_value(tmp_path, kohya):
    out = tmp_path / "out.safetensors"
    cli("-q", "export", kohya, "--format", "kohya", f"-o{out}")
    assert out.is_file()
    assert cli("-qh").stdout.startswith("Usage: main [OPTIONS] COMMAND")


@pytest.mark.parametrize("args", [["show", "b\udcff"], ["base", "show", "b\udcff"], ["rm", "b\udcff"],
                                  ["check", "b\udcff"], ["list", "--tag", "t\udcff"], ["list", "--base", "b\udcff"],
                                  ["combine", "style", "b\udcff"], ["resize", "b\udcff", "--rank", "2"]])
def test_a_reference_that_is_not_utf8_names_nothing_in_one_line(kohya, args):
    """A name from argv with bytes that are not UTF-8 (os.fsdecode makes them surrogates) was the driver's
    UnicodeEncodeError, a traceback, when a command looked it up in the registry."""
    cli("register", kohya)
    bad = next(arg for arg in args if not arg.isascii())
    assert cli(*args, code=2).stderr == (f"error: {bad!r} is not UTF-8 text, as every name and path the registry "
                                         "records is, so it names nothing there (a name typed in another encoding?)\n")


@pytest.mark.parametrize("option, value, default", [("--home", "", "$LORAOPS_HOME or the user data dir"),
                                                     ("--db", " ", "$LORAOPS_DB or SQLite in the home")])
def test_an_empty_home_or_db_option_is_refused(option, value, default):
    """`loraops --home "$UNSET" list` was read as no --home: the default home was used, the user's real one."""
    assert cli(option, value, "list", code=2).stderr == (
        f"error: invalid value for '{option}': it is empty (an unset variable?); leave {option} out for {default} "
        "(see `main --help`)\n")


def test_a_group_alone_still_shows_its_help():
    result = CliRunner().invoke(main, ["base"])
    assert result.exit_code == 2 and result.stderr.startswith("Usage: main base [OPTIONS] COMMAND [ARGS]...")


@pytest.mark.parametrize("args, code, message", [
    (["show", "99999999999999999999"], 3, "no adapter '99999999999999999999' in the registry"),
    (["show", "style@99999999999999999999"], 3, "adapter 'style' has no version 99999999999999999999 (versions: 1)"),
    (["show", "style@²"], 2, "bad adapter reference 'style@²': the part after @ must be a version number or latest"),
    (["rm", "99999999999999999999"], 3, "no adapter '99999999999999999999' in the registry"),
    (["base", "show", "99999999999999999999"], 3, "no base '99999999999999999999' in the registry"),
    (["base", "rm", "99999999999999999999"], 3, "no base '99999999999999999999' in the registry"),
    (["list", "--rank", "99999999999999999999"], 0, None),
])
@pytest.mark.registry_backend
def test_a_number_beyond_the_databases_integers_is_not_found(kohya, args, code, message):
    """An id, version or rank past 2**63 was an OverflowError traceback from the database driver."""
    cli("register", kohya)
    result = cli(*args, code=code)
    assert message is None or result.stderr.startswith(f"error: {message}")


@pytest.mark.sqlite_only  # the registry's own file
def test_an_output_over_the_registry_database_is_refused_even_with_force(tmp_path, kohya, isolated_home):
    """`export … -o ~/.local/share/loraops/registry.db --force` replaced the registry with a kohya file."""
    from loraops import st

    cli("register", kohya, "--name", "style")
    database = isolated_home / "registry.db"
    before = database.read_bytes()
    base = tmp_path / "base"  # (a folder model: a single-file one's output not named .safetensors is refused first)
    base.mkdir()
    st.write_safetensors(base / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)})
    for args in (["export", "style", "--format", "kohya"], ["resize", "style", "--rank", "2", "--format", "kohya"],
                 ["merge", kohya, "--into", base, "--no-record"]):
        # (the writers' lock, replaced by a folder, failed every later write: `…writer-lock: Is a directory`)
        for target in (database, isolated_home / "registry.db-wal", isolated_home / "registry.db.writer-lock"):
            result = cli(*args, "-o", target, "--force", code=2)
            assert result.stderr == (f"error: {target}: overlaps the registry's database ({target}); write the output "
                                     "elsewhere\n")
        cache = isolated_home / "cache"
        result = cli(*args, "-o", cache / "digests", "--force", code=2)
        assert result.stderr == (f"error: {cache / 'digests'}: overlaps loraops' cache ({cache}); write the output "
                                 "elsewhere\n")
    assert database.read_bytes() == before and cli("list").output.count("style@1") == 1
    cli("rm", "style")  # (a write: the lock still works)


def test_force_does_not_replace_home_the_current_folder_or_what_holds_them(tmp_path, kohya, monkeypatch):
    """`-o ~/ --force` (a slip for `-o ~/merged`) or `-o ..`-like paths to a folder holding the current one replaced
    everything under it with one model. Refused in one line before anything is written; a symlink to home is only a
    link, which --force replaces, and an ordinary folder is still replaced."""
    from loraops import st

    home, work = tmp_path / "users" / "me", tmp_path / "work" / "project"
    for folder in (home, work):
        folder.mkdir(parents=True)
        (folder / "keep.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    base = tmp_path / "base"
    base.mkdir()
    st.write_safetensors(base / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)})
    merge = ["merge", kohya, "--into", base, "--no-record", "--device", "cpu", "--force", "-o"]
    for output, what in [(home, "the home folder"), (f"{home}/", "the home folder"), (work, "the current folder"),
                         (work.parent, f"a folder holding the current folder ({work})"),
                         (home.parent, f"a folder holding the home folder ({home})")]:
        result = cli(*merge, output, code=2)
        shown = str(output).rstrip("/")
        assert result.stderr == (f"error: {shown}: is {what}; --force will not replace it, give the output its own "
                                 "name (e.g. ./merged)\n")
    link = tmp_path / "link-to-home"
    link.symlink_to(home)
    cli(*merge, link)
    assert (link / "model.safetensors").is_file() and not link.is_symlink()
    other = tmp_path / "other"
    other.mkdir()
    cli(*merge, other)
    assert (other / "model.safetensors").is_file()
    assert (home / "keep.txt").read_text() == (work / "keep.txt").read_text() == "mine"
    from loraops import fsutil  # the library names its own parameter
    from loraops.errors import InvalidInputError
    with pytest.raises(InvalidInputError, match=r": is the home folder; force=True will not replace it, "):
        fsutil.refuse_existing(home, force=True)


@pytest.mark.registry_backend
def test_an_output_over_an_adapter_it_reads_is_refused_even_with_force(tmp_path, kohya):
    """resize, combine and merge given `-o` the adapter's own path (or a folder holding it) and --force replaced the
    user's adapter with their result; export refused it already."""
    from loraops import st

    base = tmp_path / "base.safetensors"
    st.write_safetensors(base, {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)})
    before = kohya.read_bytes()
    for args in (["resize", kohya, "--rank", "2", "--format", "kohya", "--device", "cpu"],
                 ["combine", kohya, f"{kohya}:0.5", "--format", "kohya", "--device", "cpu"],
                 ["merge", f"{kohya}:0.5", "--into", base, "--no-record", "--device", "cpu"],
                 ["export", kohya, "--format", "kohya"]):
        for output in (kohya, tmp_path):
            result = cli(*args, "-o", output, "--force", code=2)
            if args[0] == "merge" and output == tmp_path:  # (a single-file model's output: misnamed first)
                assert result.stderr == (f"error: {output}: the output of merging into the single-file model "
                                         "base.safetensors is one .safetensors file; give a name ending in .safetensors\n")
                continue
            assert result.stderr == f"error: {output}: overlaps the adapter it reads ({kohya}); write the output elsewhere\n"
    assert kohya.read_bytes() == before


def test_an_error_a_ctrl_c_left_behind_is_an_interrupted_run(monkeypatch, capsys):
    """A Ctrl-C that lands in a database driver's call can make the driver's clean-up fail in its own words, which
    replaces the KeyboardInterrupt (psycopg: "can't change 'autocommit' now" when SQLAlchemy resets a PostgreSQL
    connection whose pre-ping the Ctrl-C cut short, seen in test_crash's random interrupts): it was a traceback and
    exit 1; it is the interrupted run it is, exit 130. An error with no Ctrl-C behind it still escapes."""
    from loraops import settings
    from loraops.cli import exit_status

    class DriverError(Exception):
        pass

    def pre_ping_cut_short():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise DriverError("can't change 'autocommit' now")  # (its __context__: the KeyboardInterrupt)

    monkeypatch.setattr(settings, "db_url", pre_ping_cut_short)
    assert exit_status(["list"]) == 130
    assert capsys.readouterr().err == "error: interrupted; nothing was written\n"

    def plain_failure():
        raise DriverError("no Ctrl-C behind this")

    monkeypatch.setattr(settings, "db_url", plain_failure)
    with pytest.raises(DriverError):
        exit_status(["list"])


def test_a_ctrl_c_a_library_turned_into_an_error_of_its_own_is_an_interrupted_run(monkeypatch, capsys):
    """test_merge_interrupted_at_random_points under load: a Ctrl-C that landed while pydantic built a record
    model's schema (on its first use) came out as pydantic_core's SchemaError ("Error building `literal` serializer:
    KeyboardInterrupt:"), which keeps no link to the KeyboardInterrupt: a traceback and exit 1. An error raised after
    a Ctrl-C reached the run is the interrupted run, exit 130; in the next run, an error is an error again."""
    from loraops import settings
    from loraops.cli import exit_status

    class SchemaError(Exception):
        pass

    def interrupted_in_a_library():
        caught = False
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # the handler interrupts the sleep
        except KeyboardInterrupt:
            caught = True
        if caught:  # raised outside the except block: no __context__, as pydantic_core's
            raise SchemaError("Error building `literal` serializer:\n  KeyboardInterrupt: ")

    monkeypatch.setattr(settings, "db_url", interrupted_in_a_library)
    assert exit_status(["list"]) == 130
    assert capsys.readouterr().err == "error: interrupted; nothing was written\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def plain_failure():
        raise SchemaError("no Ctrl-C behind this")

    monkeypatch.setattr(settings, "db_url", plain_failure)
    with pytest.raises(SchemaError):
        exit_status(["list"])


def test_a_ctrl_c_as_exit_status_gives_back_its_handlers_leaves_no_state_behind(monkeypatch, capsys):
    """A Ctrl-C landing in exit_status's last lines, before it gave back its handlers, escaped with _terminate still
    handling SIGINT and SIGTERM (a library user's process then took a later SIGTERM for a Ctrl-C) and the signal
    still remembered: every later run in the process (exit_status, CliRunner) said an error of its own was an
    interrupted run, "nothing was written", exit 130."""
    from loraops import settings
    from loraops.cli import exit_status

    class DriverError(Exception):
        pass

    real, landed, before = signal.signal, [], signal.getsignal(signal.SIGTERM)

    def ctrl_c_as_sigterm_is_given_back(signum, handler):
        if signum == signal.SIGTERM and handler is before and not landed:
            landed.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # (handled here, or once exit_status lets it through)
        return real(signum, handler)

    monkeypatch.setattr(signal, "signal", ctrl_c_as_sigterm_is_given_back)
    with contextlib.suppress(KeyboardInterrupt):  # (run() says it: test_a_ctrl_c_as_the_run_ends_is_one_line...)
        exit_status(["--version"])
    monkeypatch.setattr(signal, "signal", real)
    assert landed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is before
    capsys.readouterr()

    def plain_failure():
        raise DriverError("no Ctrl-C behind this")

    monkeypatch.setattr(settings, "db_url", plain_failure)
    with pytest.raises(DriverError):
        CliRunner().invoke(main, ["list"], catch_exceptions=False)
    with pytest.raises(DriverError):
        exit_status(["list"])


def test_an_ignored_ctrl_c_stays_ignored_and_an_error_stays_an_error(monkeypatch):
    """A background job started by a shell without job control runs with SIGINT ignored: exit_status must not take
    it over (a Ctrl-C meant for the shell would stop the job), nor give it back as Python's handler; an error of a
    command's own is still no interrupted run. (conftest installs Python's handler for the session: this says
    what happens without it.)"""
    from loraops import settings
    from loraops.cli import exit_status

    class DriverError(Exception):
        pass

    seen = []

    def failing():
        seen.append(signal.getsignal(signal.SIGINT))
        raise DriverError("no Ctrl-C behind this")

    monkeypatch.setattr(settings, "db_url", failing)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(DriverError):
            exit_status(["list"])
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.SIG_IGN] and after is signal.SIG_IGN


def test_sigterm_is_handled_as_ctrl_c(tmp_path, kohya, monkeypatch, capsys):
    """SIGTERM (`kill`, a scheduler, `docker stop`) ended the process on the spot: no cleanup ran, and the output's
    temporary sibling stayed beside it (where `gc` does not look). Now: the same cleanup as Ctrl-C, exit 143."""
    from loraops import fsutil
    from loraops.cli import exit_status

    class Killed(Exception):
        pass

    def fallback(signum, frame):  # without loraops' handler, SIGTERM would end pytest itself
        raise Killed

    real_fsync = fsutil.fsync_tree

    def terminated_while_writing(path):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler interrupts the sleep
        real_fsync(path)

    monkeypatch.setattr(fsutil, "fsync_tree", terminated_while_writing)
    previous = signal.signal(signal.SIGTERM, fallback)
    try:
        code = exit_status(["export", str(kohya), "--format", "kohya", "-o", str(tmp_path / "out.safetensors")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143
    assert capsys.readouterr().err == "error: interrupted; nothing was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.safetensors"]


@pytest.mark.registry_backend
def test_a_damaged_stored_copy_is_neither_pushed_nor_checked_as_a_bad_adapter(kohya, fake_hub):
    """push uploaded a stored copy whose bytes had changed, as it was (exit 0), under a model card claiming the
    recorded sha256; check of one whose file was gone said 'not a PEFT adapter?' of the blob folder. Both now say
    what merge says: the stored copy is changed or missing (exit 6)."""
    import json

    cli("register", kohya, "--name", "style")
    stored = Path(json.loads(cli("show", "style", "--json").stdout)["path"])
    data = bytearray(stored.read_bytes())
    data[-5] ^= 0xFF
    stored.write_bytes(bytes(data))
    result = cli("push", "style", "me/style", "--token", "hf_owner", code=6)
    assert result.stderr.startswith(f"error: adapter style@1: its stored copy {stored} is changed (sha256 ")
    assert "me/style" not in fake_hub.repos
    stored.unlink()
    result = cli("check", "style", "--base", "nothing-needed", code=6)
    assert result.stderr.startswith(f"error: adapter style@1: its stored copy {stored} is missing, so it is not used")


def unprivileged() -> list[str] | None:
    """A command prefix that runs a process bound by file permissions: none needed for a user; for root, setpriv
    without the capabilities that override them (None when there is no setpriv)."""
    import shutil

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner"] if setpriv else None


@pytest.mark.sqlite_only
def test_a_registry_file_that_cannot_be_written_says_so(kohya, isolated_home):
    """A read-only registry.db in a folder this process may write is named as such, not as "in a folder"."""
    import subprocess
    import sys

    prefix = unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv")
    cli("register", kohya, "--name", "style")
    database = isolated_home / "registry.db"
    database.chmod(0o444)
    try:
        result = subprocess.run([*prefix, sys.executable, "-m", "loraops", "rm", "style"], capture_output=True, text=True)
    finally:
        database.chmod(0o644)
    assert (result.returncode, result.stderr) == (6, f"error: the registry {database} is read-only here (this process "
                                                     "cannot write the file): nothing can be recorded\n")


@pytest.mark.sqlite_only
def test_a_registry_that_opens_but_cannot_be_written_is_read_only(kohya, isolated_home):
    """With its -wal and -shm already beside it (another process has it open; a copy of a live one), a registry in a
    folder this process may not write opened and read as if writable: `rm` then failed on the writer lock's path
    (exit 2), and a recorded merge wrote its output and then could not record it. It is read-only, said up front."""
    import sqlite3
    import subprocess
    import sys

    prefix = unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv")
    cli("register", kohya, "--name", "style")
    holder = sqlite3.connect(isolated_home / "registry.db")  # keeps the -wal and -shm there
    holder.execute("SELECT count(*) FROM adapters").fetchall()
    modes = {p: p.stat().st_mode for p in (isolated_home, *isolated_home.glob("registry.db*"))}
    try:
        for path in modes:
            path.chmod(0o555 if path.is_dir() else 0o444)
        result = subprocess.run([*prefix, sys.executable, "-m", "loraops", "rm", "style"], capture_output=True, text=True)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
        holder.close()
    assert (result.returncode, result.stderr) == (6, f"error: the registry {isolated_home}/registry.db is read-only here "
                                                     "(it is in a folder this process cannot write): nothing can be recorded\n")
    assert cli("list").stdout.count("style@1") == 1


@pytest.mark.parametrize("args, message", [
    (["register", "{k}", "--alpha", "1e300"], "{k}: --alpha: alpha 1e+300 is beyond what float32 holds"),
    (["merge", "{k}:1e39", "--into", "{base}", "-o", "{out}", "--no-record", "--device", "cpu"],
     "{k}: weight 1e+39 × scale 0.5 of module 'model.layers.0.self_attn.q_proj' is beyond what float32 holds"),
    (["combine", "{k}:1e300", "{k}:1e300", "-m", "linear", "--device", "cpu"],
     "linear of style@1, style@1: module 'lora_unet_model_layers_0_self_attn_q_proj': the weighted sum of its inputs "
     "overflows float32 (weights 1e+300, 1e+300; --precise computes in float64), so it cannot be factorized\n"),
    # two weights float32 holds, whose weighted sum it does not (said "its values go beyond", naming no weight)
    (["combine", "{k}:1e38", "{k}:-3e38", "-m", "svd", "--device", "cpu"],
     "svd of style@1, style@1: module 'lora_unet_model_layers_0_self_attn_q_proj': the weighted sum of its inputs "
     "overflows float32 (weights 1e+38, -3e+38; --precise computes in float64), so it cannot be factorized\n"),
    (["combine", "{k}:1e300", "{k}:1e300", "-m", "ties", "--density", "0.5", "--rank", "2", "--device", "cpu"],
     "ties of style@1, style@1: module 'lora_unet_model_layers_0_self_attn_q_proj': the weighted sum of its inputs "
     "overflows float32 (weights 1e+300, 1e+300; --precise computes in float64), so it cannot be factorized\n"),
    # the weights' sum past float64, which normalize divided by (inf: a result of zeros, written)
    (["combine", "{k}:1e308", "{k}:1e308", "-m", "ties", "--density", "0.5", "--rank", "2", "--precise", "--device",
      "cpu", "-o", "{out}"],
     "ties of style@1, style@1: module 'lora_unet_model_layers_0_self_attn_q_proj': the weighted sum of its inputs "
     "overflows float64 (weights 1e+308, 1e+308), so it cannot be factorized\n"),
])
def test_numbers_beyond_float32_are_refused_in_one_line(tmp_path, kohya, args, message):
    """An alpha of 1e300 was registered, then a merge of it was a RuntimeError traceback from addmm_ (its export
    wrote alpha inf); so was a merge weight × scale past float32; combine linear/ties of such weights was a
    LinAlgError traceback from the SVD, then "its SVD failed (… non-finite values)", which named no cause, then "its
    values go beyond what float32 holds", which named no weight: the inputs are finite, so their weighted sum overflows."""
    from loraops import st

    base = tmp_path / "base.safetensors"
    st.write_safetensors(base, {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)})
    names = {"k": kohya, "base": base, "out": tmp_path / "out.safetensors"}
    result = cli(*[a.format(**names) for a in args], code=2)
    assert result.stderr.startswith(f"error: {message.format(**names)}")
    assert not (tmp_path / "out.safetensors").exists()


def test_ties_precise_takes_weights_past_float32(tmp_path, kohya):
    """ties --precise with two weights of 1e39 said its SVD failed: normalize's divisor summed bool × weight, which
    torch makes float32 (inf past 3.4e38, then inf/inf = NaN) even in float64. The weights cancel in the division:
    the result is that of weights 1."""
    from safetensors.torch import load_file

    for weight, out in (("1e39", "huge"), ("1", "ones")):
        cli("combine", f"{kohya}:{weight}", f"{kohya}:{weight}", "-m", "ties", "--density", "0.5", "--rank", "2",
            "--precise", "--device", "cpu", "-o", tmp_path / f"{out}.safetensors", "--name", out)
    huge, ones = (load_file(tmp_path / f"{out}.safetensors") for out in ("huge", "ones"))
    assert huge.keys() == ones.keys()
    for name in huge:
        torch.testing.assert_close(huge[name], ones[name])


@pytest.mark.parametrize("field, value, message", [
    ("init_lora_weights", "pissa", "init_lora_weights='pissa': PEFT takes this initialisation out of the base"),
    ("use_qalora", True, "a QA-LoRA adapter (use_qalora); loraops handles plain LoRA only"),
])
@pytest.mark.registry_backend
def test_a_refused_config_is_refused_even_when_its_weights_are_registered(tmp_path, field, value, message):
    """The identity of a PEFT folder hashes the config fields that change the math, not those the reader refuses
    outright; merge by path takes the registered adapter of the same identity, so a PiSSA copy of a registered
    LoRA was merged as that LoRA (exit 0) where register and inspect of it refuse it."""
    import json

    from loraops import st
    from test_formats_errors import good, peft_folder

    registered = peft_folder(tmp_path / "plain", good())
    cli("register", registered)
    copy = peft_folder(tmp_path / "copy", good())
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    base = tmp_path / "base.safetensors"
    st.write_safetensors(base, {"layer.q.weight": torch.zeros(4, 3)})
    result = cli("merge", copy, "--into", base, "-o", tmp_path / "out.safetensors", "--device", "cpu", code=2)
    assert result.stderr.startswith(f"error: {copy}/adapter_config.json: {message}")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["combine", "a", "b", "-m", "ties", "--density", "nan"],
     "invalid value for '--density': 'nan' is not a finite number (see `main combine --help`)"),
    (["resize", "a", "--dynamic", "sv_fro", "--param", "inf"],
     "invalid value for '--param': 'inf' is not a finite number (see `main resize --help`)"),
])
def test_nan_and_inf_parameters_are_called_what_they_are(args, message):
    """A NaN density was refused as 'Input should be less than or equal to 1', an Inf resize param as 'sv_fro needs a
    param' (one was given). They are now refused where the option is read (cli.FLOAT)."""
    assert cli(*args, code=2).stderr == f"error: {message}\n"


@pytest.mark.parametrize("grace, message", [
    ("nan", "invalid value for '--grace': 'nan' is not a finite number (see `main gc --help`)"),
    ("-1", "--grace -1: give a number of seconds ≥ 0"),
    # (its example was the other numbers' '(like 0.7, -1 or 2e-3)', a -1 that --grace refuses)
    ("1h", "invalid value for '--grace': '1h' is not a number of seconds written plainly (like 3600 or 0.5) (see "
           "`main gc --help`)"),
])
def test_gc_refuses_a_grace_that_is_no_age(grace, message):
    """--grace nan kept nothing (every comparison with NaN is false), so it removed what a registration in progress
    was writing, as --grace 0 does; and a negative grace was taken."""
    assert cli("gc", "--grace", grace, code=2).stderr == f"error: {message}\n"


@pytest.mark.parametrize("value, message", [
    ("1_0", "'1_0' is not a number written plainly (like 0.7, -1 or 2e-3)"),
    (" 1 ", "' 1 ' is not a number written plainly (like 0.7, -1 or 2e-3)"),
    ("\u0661", "'\u0661' is not a number written plainly (like 0.7, -1 or 2e-3)"),
    ("nan", "'nan' is not a finite number"),
    ("-Infinity", "'-Infinity' is not a finite number"),
    ("1e400", "'1e400' is not a finite number"),
])
@pytest.mark.parametrize("command", [["inspect", "x"], ["register", "x"], ["check", "x"],
                                     ["extract", "--base", "b", "--tuned", "t", "--rank", "2"]])
def test_a_float_option_takes_plain_finite_numbers_only(command, value, message):
    """--alpha (and every float option: cli.FLOAT) took Python's spellings: '1_0' as 10, ' 1 ' as 1, 'nan' and 'inf'
    as themselves, far from the one line saying so."""
    result = cli(*command, "--alpha", value, code=2)
    assert result.stderr == f"error: invalid value for '--alpha': {message} (see `main {command[0]} --help`)\n"


@pytest.mark.parametrize("args", [["list", "--rank", "1_0"], ["list", "--rank", " 8"], ["list", "--rank", "8.0"],
                                  ["combine", "a", "--seed", "1_000"], ["resize", "a", "--rank", "\u0968"]])
def test_an_integer_option_takes_plain_integers_only(args):
    """click's INT is Python's int(): '1_0' was 10, ' 8' was 8 (cli.INT)."""
    result = cli(*args, code=2)
    assert result.stderr == (f"error: invalid value for '{args[-2]}': {args[-1]!r} is not an integer written plainly "
                             f"(like 8) (see `main {args[0]} --help`)\n")


def test_an_integer_past_pythons_digit_limit_is_refused_in_one_line():
    """int() refuses more than 4300 digits with a ValueError, which cli.INT let through as a traceback (click's INT
    had said it in one line)."""
    digits = "9" * 5000
    result = cli("list", "--rank", digits, code=2)
    assert result.stderr == (f"error: invalid value for '--rank': '{digits[:12]}…' (5000 digits) is too large "
                             "(see `main list --help`)\n")


def test_plain_numbers_are_still_read():
    from loraops.references import parse_number

    assert [parse_number(t) for t in ("0.7", "-1", "2e-3", ".5", "+3.", "1E+2", "5.", "1e-3", "-0.5")] == [
        0.7, -1.0, 0.002, 0.5, 3.0, 100.0, 5.0, 0.001, -0.5]
    assert [parse_number(t, integer=True) for t in ("8", "-3", "+0", "007")] == [8, -3, 0, 7]


@pytest.mark.parametrize("token", ["", "hf_abc\n"])
def test_a_token_that_cannot_be_sent_is_bad_input(token):
    """`--token "$UNSET"` was reported as 'cannot reach the Hub … (LocalProtocolError: Illegal header value b'Bearer ')',
    exit 7, and a check of the network."""
    for args in (["pull", "me/style"], ["push", "style", "me/style"], ["base", "add", "hub:me/base"]):
        result = cli(*args, "--token", token, code=2)
        assert result.stderr.startswith("error: --token is empty or holds a control character (a newline?)")


def test_a_token_for_a_base_given_by_path_is_refused(tmp_path):
    """`base add PATH --token T` left the token silently unused (it is for hub: bases only)."""
    assert cli("base", "add", tmp_path, "--token", "hf_abc", code=2).stderr == (
        f"error: {tmp_path}: --token is for a base added from the Hub (hub:OWNER/NAME); a path is read from disk\n")


@pytest.mark.sqlite_only
def test_a_registry_under_a_file_names_the_file(tmp_path, kohya):
    """`--db sqlite:///a-file/x.db` said 'error: …/a-file: File exists'."""
    (tmp_path / "a-file").write_bytes(b"x")
    database = tmp_path / "a-file" / "x.db"
    result = cli("--db", f"sqlite:///{database}", "register", kohya, code=2)
    assert result.stderr == f"error: {database}: cannot be written, {tmp_path / 'a-file'} is not a folder\n"


@pytest.mark.sqlite_only
def test_a_url_option_the_driver_ignores_is_refused_in_one_line(tmp_path):
    """`--db sqlite:///…?mode=ro` printed SQLAlchemy's warning (three lines) and used the file read-write."""
    result = cli("--db", f"sqlite:///{tmp_path / 'r.db'}?mode=ro", "list", code=6)
    assert result.stderr.startswith(f"error: cannot use the registry at sqlite:///{tmp_path / 'r.db'}?mode=ro: Query "
                                    "string argument(s) 'mode' are not accepted by the pysqlite driver")


@pytest.mark.registry_backend
def test_subtract_exact_of_a_recorded_merge_whose_files_changed_says_so(tmp_path, kohya):
    """It said the model 'is not recorded in the registry as a merge (it was not made by `loraops merge`, or its
    record was removed)' of a recorded merge, named by its record, whose bytes had changed since."""
    from loraops import st

    base = tmp_path / "base.safetensors"
    st.write_safetensors(base, {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)})
    merged = tmp_path / "merged.safetensors"
    cli("merge", kohya, "--into", base, "-o", merged, "--device", "cpu")
    data = bytearray(merged.read_bytes())
    data[-1] ^= 1
    merged.write_bytes(bytes(data))
    for model in ("merged", merged):
        result = cli("subtract", kohya, "--from", model, "-o", tmp_path / "restored.safetensors", "--exact",
                     "--device", "cpu", code=2)
        assert result.stderr.startswith(f"error: --exact: {model} at {merged} is recorded as a merge, but its files "
                                        "changed since (fingerprint ")
    assert not (tmp_path / "restored.safetensors").exists()


@pytest.mark.parametrize("case, message", [
    ("loha-rank-0", "module 'lora_unet_proj': empty factor (lora_unet_proj.hada_w1_a 24×0, "),
    ("lokr-empty-w1", "module 'lora_unet_proj': empty factor (lora_unet_proj.lokr_w1_a 4×0, "),
    ("lora-and-loha", "module 'lora_unet_proj' holds both LoRA (lora_down/lora_up) and LoHa/LoKr (hada_/lokr_) "
                      "factors: a module is one or the other"),
])
def test_a_malformed_lycoris_module_is_refused(tmp_path, case, message):
    """A LoHa of rank 0 was a ZeroDivisionError traceback (alpha / r); a LoKr with an empty w1 was read (and merged)
    as a zero ΔW; a module with LoRA and LoHa keys was merged as its LoRA alone, the LoHa dropped without a word."""
    from safetensors.torch import load_file, save_file
    from test_lycoris import lycoris_file

    path, _ = lycoris_file(tmp_path / "lyco.safetensors", "lokr" if case.startswith("lokr") else "loha")
    tensors, key = load_file(str(path)), "lora_unet_proj"
    if case == "loha-rank-0":
        tensors.update({f"{key}.hada_w{n}_{s}": torch.zeros((24, 0) if s == "a" else (0, 16)) for n in (1, 2) for s in "ab"})
    elif case == "lokr-empty-w1":
        tensors.update({f"{key}.lokr_w1_a": torch.zeros(4, 0), f"{key}.lokr_w1_b": torch.zeros(0, 4)})
    else:
        tensors.update({f"{key}.lora_down.weight": torch.ones(3, 16), f"{key}.lora_up.weight": torch.ones(24, 3)})
    save_file(tensors, str(path))
    base = tmp_path / "base.safetensors"
    save_file({"proj.weight": torch.zeros(24, 16), "conv1.weight": torch.zeros(8, 4, 1, 1),
               "conv3.weight": torch.zeros(6, 8, 3, 3)}, str(base))
    assert cli("inspect", path, code=2).stderr.startswith(f"error: {path}: {message}")
    cli("merge", path, "--into", base, "-o", tmp_path / "out.safetensors", "--device", "cpu", code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "lyco.safetensors"]


@pytest.mark.parametrize("args, message", [
    (["--modules", ","], "--modules ',' names no module: give comma-separated module names"),
    (["--save-module", ""], "--save-module '' names no module: give comma-separated module names"),
    (["--modules", "q_proj", "--save-module", "q_proj"],
     "--modules q_proj: its weights (model.layers.0.self_attn.q_proj.weight) are stored whole by --save-module: "
     "a module is either extracted or stored whole"),
    (["--alpha", "1e300"], "alpha 1e+300 is beyond what float32 holds"),
    # checked by the sweep and fine: kept so they stay so
    (["--rank", "0"], "bad parameters for extract: --rank: Input should be greater than 0"),
    (["--dynamic", "sv_fro", "--param", "0"], "bad parameters for extract: sv_fro --param is a fraction in (0, 1] (got "
                                              "0)"),
    (["--rank", "4", "--max-rank", "2"], "bad parameters for extract: --param and --max-rank go with a --dynamic rule, "
                                         "not with a fixed --rank"),
    (["--modules", "q_proj|v_proj"], "--modules q_proj|v_proj: {base} has no 2-D or conv weight by that name (norms "
                                     "and biases are no LoRA targets: --save-module keeps them whole)"),
    (["--dtype", "int8"], "invalid value for '--dtype': 'int8' is not one of 'bf16', 'fp16', 'fp32' (see `main "
                          "extract --help`)"),
    (["--format", "diffusers"], "invalid value for '--format': 'diffusers' is not one of 'peft', 'kohya' (see `main "
                                "extract --help`)"),
])
def test_extract_options_that_name_nothing_or_overflow(tmp_path, args, message):
    """An empty --modules or --save-module list was taken as absent (every module extracted, exit 0); a module both
    extracted and stored whole was 'has no 2-D or conv weight by that name'; --alpha 1e300 was refused only when the
    finished adapter was checked, naming a scratch file in the blob store."""
    from loraops import st
    from loraops.registry import Registry

    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    g = torch.Generator().manual_seed(0)
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    st.write_safetensors(base, {n: torch.randn(8, 8, generator=g) for n in names})
    st.write_safetensors(tuned, {n: torch.randn(8, 8, generator=g) for n in names})
    rank = [] if "--rank" in args or "--dynamic" in args else ["--rank", "2"]
    result = cli("extract", "--base", base, "--tuned", tuned, *rank, *args, "-o", tmp_path / "out", code=2)
    assert result.stderr == f"error: {message.format(base=base)}\n"
    assert not (tmp_path / "out").exists()
    with Registry.open() as reg:
        assert reg.list_adapters() == [] and reg.list_bases() == []


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_a_pattern_that_is_no_regex_is_refused(tmp_path, field):
    """PEFT matches rank_pattern/alpha_pattern keys as regexes: a key like '(' was an re.error traceback."""
    import json

    from test_formats_errors import good, peft_folder

    folder = peft_folder(tmp_path / "a", good())
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, field: {"(": 2}}))
    assert cli("inspect", folder, code=2).stderr.startswith(
        f"error: {folder}/adapter_config.json: config {field}['('] is no regular expression (missing ), ")


def test_an_error_line_comes_after_what_was_said_before_it(tmp_path):
    """With stdout and stderr sent to one file, a Ctrl-C that cut the flush of a merge's summary (click.echo writes,
    then flushes) left the summary in stdout's buffer: it landed after the error line that said the interrupt, and
    the log read as if the error came first (the summary is written here without its flush)."""
    import subprocess
    import sys

    log = tmp_path / "log"
    said = "import sys, loraops.cli as cli; sys.stdout.write('merged\\n'); cli.say_error('error: interrupted')"
    with log.open("w") as out:
        subprocess.run([sys.executable, "-c", said], stdout=out, stderr=subprocess.STDOUT, check=True,
                       env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
                            "PYTHONPATH": str(Path(__file__).parents[1])})
    assert log.read_text().splitlines() == ["merged", "error: interrupted"]


def test_a_base_folder_of_shards_without_their_index_is_refused(tmp_path):
    """The shards were read as they are: `base add` recorded the folder, `check` passed, and `merge` wrote an output
    folder of shards without an index, which transformers' from_pretrained does not load."""
    base = tiny_llama(tmp_path / "base", shard_size="60KB")
    adapter = peft_adapter(base, tmp_path / "adapter")
    cli("base", "add", base, "--name", "recorded")  # while it was whole
    (base / "model.safetensors.index.json").unlink()
    total = len(list(base.glob("model-*-of-*.safetensors")))
    line = (f"error: {base}: shards model-0000N-of-{total:05d}.safetensors but no model.safetensors.index.json: the "
            "index is missing (an interrupted copy?)\n")
    bases = cli("base", "list", "--json").stdout
    assert cli("base", "add", base, "--name", "again", code=2).stderr == line
    assert cli("check", adapter, "--base", base, code=2).stderr == line
    for into in (base, "recorded"):
        assert cli("merge", adapter, "--into", into, "-o", tmp_path / "out", "--device", "cpu", code=2).stderr == line
    assert not (tmp_path / "out").exists() and cli("base", "list", "--json").stdout == bases
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("base", "adapter")] == []


def test_a_missing_choice_is_said_on_one_line():
    """`export X -o -` without --format said "missing option '--format'. Choose from:\\n\\tpeft,\\n\\tkohya,…" with the
    newlines and tabs escaped into the one line (click lists the choices one a line)."""
    assert cli("export", "X", "-o", "-", code=2).stderr == (
        "error: missing option '--format': choose from peft, kohya, diffusers (see `main export --help`)\n")


@pytest.mark.sqlite_only
def test_another_applications_database_is_refused_and_left_as_it_was(tmp_path, kohya):
    """`--db` naming another application's SQLite file: every command, `list` included, wrote loraops' tables into
    it (and switched it to WAL). Now refused in one line, its bytes unchanged and nothing made beside it; once it is
    meant to hold a registry too, `db upgrade` creates loraops' tables there and the commands take it."""
    import sqlite3

    database = tmp_path / "notes.db"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        connection.execute("INSERT INTO notes (body) VALUES ('keep me')")
        connection.commit()
    before = database.read_bytes()
    url = f"sqlite:///{database}"
    for args in (["list"], ["show", "x"], ["check", kohya], ["base", "list"], ["verify"], ["gc", "--dry-run"],
                 ["rm", "x"], ["db", "current"], ["db", "stamp"], ["register", kohya]):
        result = cli("--db", url, *args, code=6)
        assert result.stderr == (f"error: the database at {url} is not a loraops registry (it holds other tables: "
                                 "notes); nothing was changed in it: give --db a loraops registry or a new file, or run "
                                 "`loraops --db URL db upgrade` to add loraops' tables beside its own\n")
        assert database.read_bytes() == before, args
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db", "style.safetensors"], args
    cli("--db", url, "db", "upgrade")
    cli("--db", url, "register", kohya)
    assert "style" in cli("--db", url, "list").stdout
    with contextlib.closing(sqlite3.connect(database)) as connection:
        assert connection.execute("SELECT body FROM notes").fetchall() == [("keep me",)]


@pytest.mark.sqlite_only
def test_another_alembic_applications_database_at_loraops_revision_is_refused(tmp_path):
    """Another application migrated by Alembic records its own revision in alembic_version; one numbered as loraops'
    head ('0006') took list and show past the foreign-database check (their fast read trusts the revision), to an
    OperationalError traceback (no such table: adapters)."""
    import sqlite3

    from loraops.registry.reads import HEAD

    database = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY)")
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        connection.execute("INSERT INTO alembic_version VALUES (?)", (HEAD,))
        connection.commit()
    before = database.read_bytes()
    url = f"sqlite:///{database}"
    for args in (["list"], ["show", "x"], ["base", "list"]):
        assert cli("--db", url, *args, code=6).stderr == (
            f"error: the database at {url} is not a loraops registry (it holds other tables: notes); nothing was "
            "changed in it: give --db a loraops registry or a new file, or run `loraops --db URL db upgrade` to add "
            "loraops' tables beside its own\n")
        assert database.read_bytes() == before, args


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["merge", "--help"]])
def test_help_and_version_on_a_full_disk_or_a_closed_pipe(args):
    """The group's own --help and --version are written while its options are read, outside the commands' error
    handling: on a full stdout they ended in a traceback (exit 1); a reader that left gets silence and 141."""
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "loraops", *args], stdout=full, stderr=subprocess.PIPE, text=True)
    assert (done.returncode, done.stderr) == (5, "error: stdout: No space left on device\n")
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run([sys.executable, "-m", "loraops", *args], stdout=writer, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (141, "")


def test_a_report_that_cannot_be_written_says_stdout_and_what_landed(tmp_path, kohya):
    """A merge (or registration) whose summary cannot be written (stdout on a full disk) said only "No space left on
    device", exit 5, as if the merge had failed for want of room, while its output was written and recorded; the
    error now names stdout and says what landed, as an interrupted command does."""
    import subprocess
    import sys

    base, out = _single_file_base(tmp_path), tmp_path / "merged.safetensors"

    def full(*args) -> str:
        with open("/dev/full", "w") as stdout:
            done = subprocess.run([sys.executable, "-m", "loraops", *map(str, args)], stdout=stdout,
                                  stderr=subprocess.PIPE, text=True)
        assert done.returncode == 5, done.stderr
        return done.stderr

    assert full("merge", kohya, "--into", base, "-o", out) == (
        f"error: stdout: No space left on device (after {out} was written in full and recorded)\n")
    assert [b["name"] for b in json.loads(cli("base", "list", "--json").stdout)] == ["base", "merged"]
    assert full("register", kohya, "--base", "base") == (  # (the merge registered it; this links it to its base)
        "error: stdout: No space left on device (after style@1 was linked to base base)\n")
    assert full("list") == "error: stdout: No space left on device\n"


def test_control_characters_in_paths_are_shown_escaped_in_tables_and_summaries(tmp_path, kohya):
    """A newline or an ESC in a file name is escaped in error lines; `show`, `list` and export's `wrote` printed them
    raw: a path broken over two lines, a terminal's colours switched by a name."""
    named = tmp_path / "new\nline.safetensors"
    named.write_bytes(kohya.read_bytes())
    cli("register", named, "--name", "nl")
    shown = cli("show", "nl").stdout
    assert f"source          {tmp_path}/new\\nline.safetensors\n" in shown and "\x1b" not in shown
    out = tmp_path / "a\x1b[31mb.safetensors"
    assert cli("export", "nl", "--format", "kohya", "-o", out).stdout == (
        f"wrote {tmp_path}/a\\x1b[31mb.safetensors\n")
    assert all(line.isprintable() for line in cli("list").stdout.splitlines())


def _single_file_base(tmp_path) -> Path:
    """A one-tensor single-file model the kohya fixture fits (its q_proj)."""
    from loraops import st

    base = tmp_path / "base.safetensors"
    st.write_safetensors(base, {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)})
    return base


def test_name_with_no_record_is_refused(tmp_path, kohya):
    """merge and subtract left a --name given with --no-record unused without a word (nothing recorded under it), as
    --exact refuses --precise and combine refuses a parameter its method does not take."""
    from loraops.registry import Registry

    base = _single_file_base(tmp_path)
    merged = tmp_path / "merged.safetensors"
    cli("merge", kohya, "--into", base, "-o", merged, "--no-record", "--device", "cpu")
    for command, source in (("merge", "--into"), ("subtract", "--from")):
        out = tmp_path / f"{command}.safetensors"
        result = cli(command, kohya, source, merged if command == "subtract" else base, "-o", out, "--no-record",
                     "--name", "mine", "--device", "cpu", code=2)
        assert result.stderr == ("error: --name 'mine' names the output's record, and --no-record makes none: leave "
                                 "one of them out\n")
        assert not out.exists()
    from loraops import merging
    from loraops.errors import InvalidInputError

    # the library says its own parameters: name and record=False, not the CLI's options
    with pytest.raises(InvalidInputError, match="^name 'mine' names the output's record, and record=False makes none"):
        merging.merge(base, [kohya], tmp_path / "lib.safetensors", record=False, name="mine", device="cpu")
    with Registry.open() as reg:
        assert reg.list_bases() == []


def test_every_dtype_option_takes_torch_names(tmp_path, kohya):
    """--dtype took bf16, fp16 and fp32 only, where the Python API and a recipe's out_dtype also take bfloat16,
    float16, float32 (torch's, PEFT's and mergekit's names): `--dtype bfloat16` was a usage error in every command.
    Any case, as the Python API takes them (`BF16`, as loraops prints dtypes: tests/test_newcomer.py)."""
    import json

    from loraops.cli import COMMANDS, DTYPE

    commands = [main.get_command(None, name) for name in COMMANDS]
    dtyped = {c.name: p for c in commands for p in c.params if p.name == "dtype"}
    assert sorted(dtyped) == ["combine", "export", "extract", "merge", "resize", "subtract"]
    assert all(p.type is DTYPE for p in dtyped.values())
    merged = json.loads(cli("merge", kohya, "--into", _single_file_base(tmp_path), "-o", tmp_path / "m.safetensors",
                            "--dtype", "bfloat16", "--device", "cpu", "--no-record", "--json").stdout)
    assert merged["dtype"] == "bfloat16"
    for name, dtype in (("half", "float16"), ("float32", "float32"), ("float", "float32")):
        done = json.loads(cli("resize", kohya, "--rank", "2", "--dtype", name, "--name", f"r-{name}", "--device", "cpu",
                              "--json").stdout)
        assert done["adapter"]["dtype"] == dtype
    assert cli("resize", kohya, "--rank", "2", "--dtype", "bfloat", code=2).stderr == (
        "error: invalid value for '--dtype': 'bfloat' is not one of 'bf16', 'fp16', 'fp32' (see `main resize "
        "--help`)\n")


@pytest.mark.parametrize("args, option, shown", [
    (["list", "--db", "sqlite:///x.db"], "--db", "--db URL list"), (["base", "add", "x", "-q"], "-q", "-q base add"),
    (["merge", "--quiet"], "--quiet", "--quiet merge"), (["show", "x", "--home", "h"], "--home", "--home DIR show"),
])
def test_an_option_of_loraops_itself_after_the_command_says_where_it_goes(tmp_path, args, option, shown):
    """`loraops list --db URL` said "no such option '--db'. Did you mean '--base'?"."""
    assert cli(*args, code=2).stderr == (f"error: {option} is an option of main itself, given before the command: "
                                         f"`main {shown} …` (see `main --help`)\n")
    assert not (tmp_path / "x.db").exists()


def test_one_option_one_help_and_metavar_everywhere():
    """The options several commands share read the same in each one's --help: --device's said "(cuda when
    available)" in merge and subtract only, pull's --base showed TEXT where the others show BASE (list's --tag
    TEXT, register's TAG), merge's REF[:W] was combine's REF[:WEIGHT], and resize's REF did not say it may be a
    path."""
    from loraops.cli import COMMANDS

    def commands(group):
        for command in group.commands.values() if hasattr(group, "commands") else ():
            yield from commands(command)
        yield group

    ctx = click.Context(main)
    every = [c for name in COMMANDS for c in commands(main.get_command(ctx, name))]
    helps = {}
    for command in every:
        for param in command.params:
            if param.name == "device":
                helps.setdefault(param.help, []).append(command.name)
            if param.name in ("tags", "tag") or (param.name == "base" and command.name != "extract"):
                assert param.metavar in ("TAG", "BASE"), (command.name, param.name, param.metavar)
    assert len(helps) == 1, helps
    usage = {c.name: c.collect_usage_pieces(ctx) for c in every if c.name in ("merge", "subtract", "combine")}
    assert usage["merge"][1] == "[REF[:WEIGHT]]..." and usage["subtract"][1] == usage["combine"][1] == "REF[:WEIGHT]..."
    # a REF that may be a path says so (resize did not, as if it took registered adapters only, as push does)
    assert all("registry reference or a path" in c.help for c in every if c.name in ("merge", "combine", "resize"))


def test_a_registered_bases_path_where_only_a_name_is_taken_names_the_base(tmp_path, kohya, monkeypatch):
    """`register --base PATH` (combine, export, list --base…) of a registered base's own files said `loraops base add
    PATH` records it, which only says it is already registered, under the name to give."""
    base = _single_file_base(tmp_path)
    cli("base", "add", base, "--name", "sd")
    monkeypatch.chdir(tmp_path)
    for args in (["register", kohya, "--base"], ["list", "--base"], ["combine", kohya, "--base"]):
        assert cli(*args, "./base.safetensors", code=3).stderr == (
            "error: ./base.safetensors: a path is not taken here, only a registered base: the base there is "
            "registered as 'sd', give that\n")
