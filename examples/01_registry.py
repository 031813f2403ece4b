"""The registry tour: base add, register (a PEFT folder and a kohya file), list, show, check, inspect, rm, db current,
db stamp.

    python examples/01_registry.py [WORKDIR]

Builds a tiny Llama-style base, a second base of other shapes, and three adapters in WORKDIR (default: a temp dir),
then runs each command through the real CLI (`python -m loraops ...`) and prints what it prints. The registry is
$LORAOPS_HOME (the demo command points it at demo-output/home).
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import loraops, workdir, kohya_lora, llama, peft_lora  # noqa: E402


def main() -> None:
    work = workdir("01_registry")
    print(f"building models and adapters in {work} ...")
    base = llama(work / "llama-tiny")
    wide = llama(work / "llama-wide", hidden=32, seed=3)
    chat = peft_lora(base, work / "chat-lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    chat2 = peft_lora(base, work / "chat-lora-v2", r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"], seed=7)
    style = kohya_lora(base, work / "style.safetensors", r=4, alpha=2, targets=["down_proj", "up_proj"])

    loraops("base", "add", base)
    loraops("base", "add", wide)
    loraops("base", "list")
    loraops("register", chat, "--tag", "chat")
    loraops("register", chat2, "--name", "chat-lora")  # same name, other bytes: version 2
    loraops("register", chat)  # identical identity: the existing record
    loraops("register", style, "--name", "anime-style", "--base", "llama-tiny", "--tag", "sd15", "--tag", "style")
    loraops("list")
    loraops("list", "--target", "q_proj", "--rank", "8")
    loraops("show", "anime-style")
    loraops("show", "chat-lora@1", "--json")
    loraops("check", "chat-lora", "--base", "llama-tiny")
    loraops("check", "chat-lora", "--base", "llama-wide", ok=False)
    loraops("inspect", style)
    loraops("rm", "chat-lora@1")
    loraops("base", "rm", "llama-wide")
    loraops("verify")
    loraops("gc", "--grace", "0")  # the removed chat-lora@1's stored files are already gone: rm takes them
    loraops("db", "current")
    loraops("show", "chat-lora@1", ok=False)

    # A copy of the registry whose revision record was lost (a partial restore dropped alembic_version): every command
    # refuses it rather than migrating over its tables, and db stamp records head once the tables are head's.
    restored = work / "restored.db"
    shutil.copy(Path(os.environ["LORAOPS_HOME"]) / "registry.db", restored)
    with sqlite3.connect(restored) as db:
        db.execute("DROP TABLE alembic_version")
    url = f"sqlite:///{restored}"
    loraops("--db", url, "list", ok=False)
    loraops("--db", url, "db", "stamp")
    loraops("--db", url, "db", "current")


if __name__ == "__main__":
    main()
