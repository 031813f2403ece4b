"""Hostile and broken inputs through the command line: every case ends with a one-line `error:` message and a
non-zero exit, and changes nothing on disk (inputs, outputs, the loraops home, the Hugging Face cache) or in the
registry. One table, one case per row: (build the inputs → CLI arguments [, environment]), expected message."""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import inspect, text

import factories
from loraops import settings, st
from loraops.cli import main
from loraops.registry import Registry, db
from loraops.registry.blobs import LOCKS, STAMPS
from loraops.registry.models import Base
from test_formats_errors import CASES as READER_CASES

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)

MODULES = {"lora_unet_model_layers_0_self_attn_q_proj": ((64,), (64,))}


@dataclass
class Case:
    build: Callable[[Path], list[str] | tuple[list[str], dict[str, str]]]
    message: str  # a regex the error line must match
    hub: bool = False


def raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def st_file(path: Path, header: dict | list | bytes, data: bytes = b"", claimed: int | None = None) -> Path:
    """A .safetensors file with any header (dict/list as JSON, or raw bytes) and ``claimed`` header length."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return raw(path, struct.pack("<Q", len(blob) if claimed is None else claimed) + blob + data)


def lora_header(**entry) -> dict:
    """A kohya header whose up tensor's entry is replaced by ``entry`` (data: 2 tensors of 4×64 / 64×4 F32)."""
    return {"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]},
            "lora_unet_x.lora_up.weight": {"dtype": "F32", "shape": [64, 4], "data_offsets": [1024, 2048], **entry}}


def register(build) -> Callable[[Path], list[str]]:
    return lambda d: ["register", str(build(d))]


def good_kohya(d: Path) -> Path:
    return factories.kohya_file(d / "good.safetensors", MODULES, rank=4)


def ambiguous_base(d: Path) -> list[str]:
    """A base where two modules share one kohya name (a.b_c and a_b.c → lora_unet_a_b_c)."""
    st.write_safetensors(d / "base.safetensors", {"a.b_c.weight": torch.zeros(4, 3), "a_b.c.weight": torch.zeros(4, 3)})
    with Registry.open() as reg:
        reg.add_base(d / "base.safetensors", name="amb")
    adapter = factories.kohya_file(d / "k.safetensors", {"lora_unet_a_b_c": ((3,), (4,))}, rank=2)
    return ["register", str(adapter), "--base", "amb"]


def tiny_base(d: Path) -> Path:
    st.write_safetensors(d / "base.safetensors", {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)})
    return d / "base.safetensors"


def newer_registry(d: Path) -> list[str]:
    with Registry.open() as reg, reg.engine.begin() as c:
        c.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00d'")
    return ["list"]


def unwritable_home(d: Path) -> tuple[list[str], dict[str, str]]:
    raw(d / "a-file", b"x")
    env = {"LORAOPS_HOME": str(d / "a-file" / "home")}
    if not os.environ.get("LORAOPS_DB"):
        env["LORAOPS_DB"] = ""
    else:  # (a server registry's store is LORAOPS_BLOBS: the one in the home that cannot be made)
        env["LORAOPS_BLOBS"] = str(d / "a-file" / "home" / "blobs")
    return ["register", str(good_kohya(d))], env


def loop(path: Path) -> Path:
    """A symlink to itself (Path.resolve() raised RuntimeError on it before Python 3.13)."""
    path.symlink_to(path)
    return path


def home_in_a_loop(d: Path) -> tuple[list[str], dict[str, str]]:
    env = {"LORAOPS_HOME": str(loop(d / "home"))}
    if not os.environ.get("LORAOPS_DB"):
        env["LORAOPS_DB"] = ""
    else:
        env["LORAOPS_BLOBS"] = str(d / "home" / "blobs")
    return ["register", str(good_kohya(d))], env


HEADER = "not a safetensors file|corrupt safetensors|truncated"
TABLE: dict[str, Case] = {
    # --- the safetensors container
    "zero-byte": Case(register(lambda d: raw(d / "x.safetensors", b"")), "too short for a header"),
    "header-beyond-file": Case(register(lambda d: st_file(d / "x.safetensors", {}, claimed=4096)), "truncated"),
    "header-not-json": Case(register(lambda d: st_file(d / "x.safetensors", b"{not json")), "header is not JSON"),
    "header-not-object": Case(register(lambda d: st_file(d / "x.safetensors", [1, 2])), "not a JSON object"),
    "header-100MB-claim": Case(register(lambda d: st_file(d / "x.safetensors", {}, claimed=100 * 2**20 + 1)), "100 MB"),
    "offsets-overlap": Case(register(lambda d: st_file(d / "x.safetensors", lora_header(data_offsets=[512, 1536]),
                                                       bytes(2048))), "overlap"),
    "offsets-outside-data": Case(register(lambda d: st_file(d / "x.safetensors", lora_header(data_offsets=[1024, 4096]),
                                                            bytes(2048))), HEADER),
    "offsets-reversed": Case(register(lambda d: st_file(d / "x.safetensors", lora_header(data_offsets=[2048, 1024]),
                                                        bytes(2048))), HEADER),
    "bytes-vs-shape": Case(register(lambda d: st_file(d / "x.safetensors", lora_header(shape=[64, 8]), bytes(2048))),
                           HEADER),
    "bytes-vs-dtype": Case(register(lambda d: st_file(d / "x.safetensors", lora_header(dtype="F64"), bytes(2048))),
                           HEADER),
    "unknown-dtype": Case(register(lambda d: st_file(d / "x.safetensors", lora_header(dtype="F128"), bytes(2048))),
                          HEADER),
    "negative-shape": Case(register(lambda d: st_file(d / "x.safetensors", lora_header(shape=[-64, -4]), bytes(2048))),
                           HEADER),
    "pickle-pt": Case(register(lambda d: torch.save({"w": torch.ones(2)}, d / "x.pt") or d / "x.pt"), "pickle"),
    "pickle-legacy-as-safetensors": Case(register(lambda d: raw(d / "x.safetensors", b"\x80\x02}q\x00." + bytes(64))),
                                         "pickle|not a safetensors"),
    # --- adapter contents (the reader's own table, now end to end)
    **{f"reader-{name}": Case(register(lambda d, make=make: make(d)), pattern)
       for name, (make, _, pattern) in READER_CASES.items()},
    # --- binding to a base
    "kohya-no-base-module": Case(lambda d: (Registry.open().add_base(tiny_base(d), name="tiny") and None) or [
        "register", str(factories.kohya_file(d / "k.safetensors", {"lora_unet_nothing_here": ((64,), (64,))})),
        "--base", "tiny"], "does not fit|no base module|missing"),
    "kohya-several-base-modules": Case(ambiguous_base, "several base modules match"),
    # --- names, output paths, Hub file lists
    "name-unicode": Case(lambda d: ["register", str(good_kohya(d)), "--name", "stílus-λ"], "bad adapter name"),
    "name-traversal": Case(lambda d: ["register", str(good_kohya(d)), "--name", "../evil"], "bad adapter name"),
    "name-inner-traversal": Case(lambda d: ["register", str(good_kohya(d)), "--name", "team/../../evil"],
                                 "bad adapter name"),
    "name-version-sign": Case(lambda d: ["register", str(good_kohya(d)), "--name", "x@2"], "bad adapter name"),
    "derived-name-traversal": Case(lambda d: ["resize", str(good_kohya(d)), "--rank", "2", "--name", "a/../../b",
                                              "--device", "cpu"], "bad adapter name"),
    "output-exists": Case(lambda d: ["export", str(good_kohya(d)), "--format", "kohya",
                                     "-o", str(raw(d / "taken.safetensors", b"mine"))], "already exists"),
    "output-under-a-file": Case(lambda d: ["resize", str(good_kohya(d)), "--rank", "2", "--device", "cpu",
                                           "-o", str(raw(d / "a-file", b"x") / "out.safetensors")], "a-file"),
    "merge-output-is-the-base": Case(lambda d: ["merge", str(good_kohya(d)), "--into", str(tiny_base(d)),
                                                "-o", str(d / "base.safetensors"), "--device", "cpu"], "overlaps the model it reads"),
    "hub-file-traversal": Case(lambda d: ["pull", "someone/style", "--file", "../evil.safetensors"],
                               "refusing file name", hub=True),
    "hub-file-absolute": Case(lambda d: ["pull", "someone/style", "--file", "/etc/passwd"],
                              "refusing file name", hub=True),
    "register-symlink-loop": Case(register(lambda d: loop(d / "x.safetensors")), "no such file"),
    "base-add-symlink-loop": Case(lambda d: ["base", "add", str(loop(d / "base"))], "no such file"),
    "merge-output-in-a-symlink-loop": Case(lambda d: ["merge", str(good_kohya(d)), "--into", str(tiny_base(d)),
                                                      "-o", str(loop(d / "out") / "x.safetensors"), "--device", "cpu"],
                                           "out"),
    "home-symlink-loop": Case(home_in_a_loop, "home"),
    # --- numbers
    "merge-weight-nan": Case(lambda d: ["merge", f"{good_kohya(d)}:nan", "--into", str(tiny_base(d)),
                                        "-o", str(d / "out"), "--device", "cpu"], "weight|nan|finite"),
    "register-alpha-negative": Case(lambda d: ["register", str(good_kohya(d)), "--alpha", "-2"], "alpha"),
    "register-alpha-inf": Case(lambda d: ["register", str(good_kohya(d)), "--alpha", "inf"], "alpha"),
    "resize-rank-zero": Case(lambda d: ["resize", str(good_kohya(d)), "--rank", "0", "--device", "cpu"], "rank"),
    "combine-density-over-one": Case(lambda d: ["combine", str(good_kohya(d)), str(good_kohya(d)), "-m", "ties",
                                                "--density", "1.5", "--device", "cpu"], "density"),
    # --- the registry and the home
    "registry-from-newer-loraops": Case(newer_registry, "written by a newer loraops"),
    "unwritable-home": Case(unwritable_home, "a-file|home|Not a directory|cannot"),
}


def disk_state(roots: list[Path]) -> dict[str, tuple]:
    """Every path with its size and mtime, except the registry file itself (compared by content below)."""
    state = {}
    for root in roots:
        for p in root.rglob("*") if root.exists() else ():
            if p.name.startswith("registry.db") or LOCKS in p.parts or STAMPS in p.parts:
                continue
            info = p.lstat()
            state[str(p)] = (p.is_dir(), 0 if p.is_dir() else info.st_size, 0 if p.is_dir() else info.st_mtime_ns)
    return state


def registry_state() -> dict[str, list]:
    """Every row of every registry table, read without migrating anything."""
    engine = db.make_engine(settings.db_url())
    try:
        with engine.connect() as c:
            present = set(inspect(c).get_table_names())
            return {name: [tuple(map(str, row)) for row in c.execute(text(f"SELECT * FROM {name} ORDER BY 1"))]
                    for name in [*(t.name for t in Base.metadata.sorted_tables), "alembic_version"] if name in present}
    finally:
        engine.dispose()


@pytest.mark.parametrize("name", sorted(TABLE))
def test_malformed_input(name, tmp_path, request):
    case = TABLE[name]
    if case.hub:
        hub = request.getfixturevalue("fake_hub")
        hub.commit("someone/style", {"style.safetensors": good_kohya(tmp_path).read_bytes()})
    with Registry.open() as reg:  # something in the registry, so "unchanged" means something
        reg.add_adapter(factories.kohya_file(tmp_path / "kept.safetensors", MODULES, rank=2, seed=7), name="kept")
    built = case.build(tmp_path)
    args, env = built if isinstance(built, tuple) else (built, {})
    roots = [tmp_path, settings.home(), Path(os.environ["HF_HOME"])]
    before = disk_state(roots), registry_state()

    result = CliRunner().invoke(main, args, env=env)

    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(case.message, lines[0], re.I), lines[0]
    assert changes(before, (disk_state(roots), registry_state())) == {}


def changes(before, after) -> dict:
    """What differs: paths added/removed/changed, registry tables changed."""
    (disk0, rows0), (disk1, rows1) = before, after
    out = {"added": sorted(disk1.keys() - disk0.keys()), "removed": sorted(disk0.keys() - disk1.keys()),
           "changed": sorted(k for k in disk0.keys() & disk1.keys() if disk0[k] != disk1[k]),
           "tables": sorted(t for t in rows0.keys() | rows1.keys() if rows0.get(t) != rows1.get(t))}
    return {k: v for k, v in out.items() if v}


def test_table_is_big_enough():
    assert len(TABLE) >= 30
