"""Every command's --json, pinned: the field names and value types of each (a rename or a changed type fails here),
and the rules they all keep (loraops.records): `adapter` is an AdapterRecord, `base` a base's record (an object, or
null), `ref` an adapter's reference string (`base_ref`, `tuned_ref` a model's), `created` a time, `new` a bool, and
`dtype` a torch dtype name (bfloat16, not BF16)."""
from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from factories import peft_adapter, tiny_llama
from loraops.cli import main

pytestmark = pytest.mark.registry_backend  # the registry's records: on PostgreSQL too (conftest.py)

TIME, DTYPE = "ISO-8601 time", "torch dtype name"
TORCH_DTYPES = {"bfloat16", "float16", "float32", "float64", "float8_e4m3fn", "float8_e5m2"}

MODULE = {"name": str, "kind": str, "rank": (int, None), "alpha": float, "scale": float, "in_features": int,
          "out_features": int, "kernel": ([int], None)}
BASE_REF = {"id": int, "name": str, "fingerprint": str}
LINEAGE = {"id": int, "op": str, "params": dict, "created": TIME,
           "inputs": [{"kind": str, "id": (int, None), "ref": str, "sha256": (str, None), "weight": (float, None),
                       "role": (str, None)}]}
ADAPTER = {"id": int, "name": str, "version": int, "sha256": str, "weights_sha256": str, "format": str,
           "dtype": DTYPE, "size": int, "num_parameters": int, "rank": (int, None), "alpha": (float, None),
           "scale_mode": str, "target_modules": [str], "dora": bool, "products": [str], "methods": [str],
           "token_rows": (dict, None), "base": (BASE_REF, None), "base_hint": (str, None), "tags": [str],
           "source": (str, None), "path": str, "created": TIME, "num_modules": int, "modules": [MODULE],
           "lineage": (LINEAGE, None)}
BASE = {"id": int, "name": str, "fingerprint": str, "source": str, "path": (str, None), "num_tensors": int,
        "num_parameters": int, "dtype": DTYPE, "total_bytes": int, "derived": bool, "lineage": (LINEAGE, None),
        "created": TIME}
MISMATCH = {"name": str, "tensor": str, "expected": ([int], None), "actual": [int]}
CHECK = {"ref": str, "fits": [str], "reports": [{
    "ok": bool, "base_ref": (str, None), "matched": int, "modules": int, "missing": [str], "why_missing": dict,
    "ambiguous": [str], "shape_mismatches": [MISMATCH], "full_tensor_mismatches": [MISMATCH],
    "token_row_mismatches": [MISMATCH], "token_rows": int, "token_rows_matched": int, "tensors": int,
    "tensors_matched": int, "tied_heads": [str]}], "base_hint": (str, None)}
INSPECT = {"path": str, "format": str, "identity": str, "files": [str], "size": int, "dtype": DTYPE,
           "rank": (int, None), "alpha": (float, None), "scale_mode": str, "target_modules": [str], "dora": bool,
           "products": [str], "methods": [str], "lora_bias": bool, "num_modules": int, "num_parameters": int,
           "names_resolved": bool, "trainable_tokens": dict, "base_model": (str, None), "full_tensors": [str],
           "metadata": dict, "modules": [MODULE]}
COMBINE = {"method": str, "params": dict, "rank": (int, None), "conv_rank": (int, None),
           "inputs": [{"ref": str, "weight": float, "rank": (int, None), "modules": int,
                       "block_weights": ([float], None)}],
           "device": str, "precision": str,
           "modules": [{"name": str, "rank": int, "spatial": bool, "inputs": int, "svd": str, "error": float,
                        "zero": bool}],
           "error_max": float, "error_mean": float, "parameters": int, "seconds": float}
RESIZE = {"rank": (int, None), "dynamic": (str, None), "param": (float, None), "max_rank": (int, None),
          "conv_rank": (int, None), "device": str, "precision": str,
          "modules": [{"name": str, "kind": str, "spatial": bool, "kernel": ([int], None), "rank_before": int,
                       "rank_after": int, "alpha_after": float, "fro_retained": float, "sum_retained": (float, None),
                       "zero": bool}],
          "fro_retained_mean": float, "sum_retained_mean": (float, None), "parameters_before": int,
          "parameters_after": int, "seconds": float}
SKIPPED = {"name": str, "reason": str, "max_abs_diff": float}
EXTRACT = {"base_ref": str, "tuned_ref": str, "rank": (int, None), "dynamic": (str, None), "param": (float, None),
           "max_rank": (int, None), "conv_rank": (int, None), "alpha": (float, None), "device": str,
           "precision": str, "dtype": DTYPE,
           "modules": [{"name": str, "kind": str, "spatial": bool, "shape": [int], "rank": int, "alpha": float,
                        "svd": str, "error": float, "fro_retained": float}],
           "error_max": float, "error_mean": float, "fro_retained_mean": float, "identical": int,
           "skipped": [SKIPPED], "saved": [str], "rounding": [SKIPPED], "rounding_targets": [str], "parameters": int,
           "seconds": float, "peak_rss_bytes": int, "peft_names": dict, "warnings": [str], "untied_heads": dict,
           "base_changed": [str]}


def derived(report: dict) -> dict:
    return {"adapter": ADAPTER, "new": bool, "output": (str, None), "report": report}


EXPORT = {"ref": str, "format": str, "output": str, "plain_lora_of": [str], "left_out": [str]}
MERGE = {"operation": str, "output": str, "base_path": str,
         "adapters": [{"ref": str, "weight": float, "modules": int, "full_tensors": int,
                       "block_weights": ([float], None), "component": (str, None)}],
         "dtype": DTYPE, "device": str, "precise": bool, "tensors_merged": int, "tensors_replaced": int,
         "tensors_converted": int, "tensors_copied": int, "bytes_written": int, "seconds": float,
         "peak_rss_bytes": int,
         "residual": ({"compared_to": (str, None), "elements": int, "elements_differing": (int, None),
                       "max_abs_diff": (float, None), "rounding_max_abs": float, "note": str}, None),
         "heads_untied": [str], "files_left_out": [str], "name": (str, None), "already_registered": bool,
         "base_changed": (str, None), "fingerprint": (str, None)}
GC = {"dry_run": bool, "items": [{"path": str, "size": int}], "size": int}
VERIFY = {"ok": bool, "adapters": int,
          "problems": [{"ref": str, "file": str, "problem": str, "pull_again": (str, None)}]}
REGISTER = {"new": bool, "adapter": ADAPTER, "linked": bool, "previous_base": (BASE_REF, None)}
PULL = {"repo_id": str, "revision": (str, None), "commit": str, "files": [str], **REGISTER}
BASE_ADD = {"new": bool, "base": BASE}
DB = {"url": str, "revision": (str, None), "head": str, "state": str}
DB_CHANGE = {"url": str, "before": (str, None), "after": str}
PUSH = {"ref": str, "repo_id": str, "revision": str, "format": str, "files": [str], "commit": str,
        "commit_url": str, "pr_url": (str, None), "changed": bool, "card_kept": bool}


def mismatches(value, spec, where: str = "$") -> list[str]:
    """Where ``value`` (parsed JSON) does not have the shape ``spec`` gives: a dict of its exact fields, [item] a list
    of such items, a tuple the alternatives, None null, TIME/DTYPE a string of that kind, else a type (int is no
    float here: pydantic writes a float field's 8 as 8.0)."""
    if isinstance(spec, tuple):
        found = [mismatches(value, s, where) for s in spec]
        return [] if [] in found else found[0]
    if spec is None:
        return [] if value is None else [f"{where}: {value!r} is not null"]
    if spec == TIME:
        return [] if isinstance(value, str) and datetime.fromisoformat(value) else [f"{where}: {value!r} no time"]
    if spec == DTYPE:
        return [] if value in TORCH_DTYPES else [f"{where}: {value!r} is not a torch dtype name"]
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is not an object"]
        if set(value) != set(spec):
            return [f"{where}: fields {sorted(value)} are not {sorted(spec)}"]
        return [m for key, s in spec.items() for m in mismatches(value[key], s, f"{where}.{key}")]
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not a list"]
        return [m for i, item in enumerate(value) for m in mismatches(item, spec[0], f"{where}[{i}]")]
    if type(value) is not spec:
        return [f"{where}: {value!r} is not {spec.__name__}"]
    return []


def common_rules(value, where: str = "$") -> list[str]:
    """The names every --json uses in one sense (loraops.records), wherever they are."""
    found = []
    if isinstance(value, dict):
        rules = {"adapter": (dict, "an AdapterRecord"), "base": ((dict, type(None)), "a base's record"),
                 "ref": (str, "a reference string"), "new": (bool, "a bool")}
        for key, item in value.items():
            if key == "label":  # (a lineage's inputs, and a merge's adapters in its params, said label for ref)
                found.append(f"{where}.label: say ref")
            if key in rules and not isinstance(item, rules[key][0]):
                found.append(f"{where}.{key}: {item!r} is not {rules[key][1]}")
            if key in ("created", "dtype"):
                found += mismatches(item, TIME if key == "created" else (DTYPE, None), f"{where}.{key}")
            found += common_rules(item, f"{where}.{key}")
    elif isinstance(value, list):
        found += [m for i, item in enumerate(value) for m in common_rules(item, f"{where}[{i}]")]
    return found


def json_of(*args, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return json.loads(result.stdout), result.stderr


def pinned(value, spec) -> None:
    assert mismatches(value, spec) == [], mismatches(value, spec)
    assert common_rules(value) == [], common_rules(value)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("json-schema")
    base = tiny_llama(d / "llama", dtype=torch.bfloat16)  # (a base's dtype said BF16, an adapter's bfloat16)
    return {"dir": d, "base": base, "a1": peft_adapter(base, d / "a1", r=4, alpha=8),
            "a2": peft_adapter(base, d / "a2", seed=2, r=4, alpha=8)}


@pytest.mark.empty_db  # (it starts from no registry: on PostgreSQL too, no tables yet)
def test_every_command_json(made, tmp_path):
    before = json_of("db", "current", "--json")[0]
    pinned(before, DB)
    assert before["revision"] is None and before["state"] in ("missing", "empty")  # (a file not made yet; no tables)
    registered = json_of("register", made["a1"], "--name", "a1", "--json")[0]
    pinned(registered, REGISTER)  # (the record was flat beside new/linked/previous_base; pull's nests it)
    assert registered["new"] and registered["adapter"]["dtype"] == "float32" and registered["adapter"]["base"] is None
    added = json_of("base", "add", made["base"], "--name", "tiny", "--json")[0]
    pinned(added, BASE_ADD)
    assert added["new"] and added["base"]["dtype"] == "bfloat16"
    assert not json_of("base", "add", made["base"], "--json")[0]["new"]
    again = json_of("register", made["a1"], "--base", "tiny", "--json")[0]
    assert (again["new"], again["linked"], again["previous_base"], again["adapter"]["base"]["name"]) == \
        (False, True, None, "tiny")
    json_of("register", made["a2"], "--name", "a2", "--json")
    pinned(json_of("list", "--json")[0], [ADAPTER])
    pinned(json_of("show", "a1", "--json")[0], {**ADAPTER, "lora_bias": (bool, None)})
    pinned(json_of("inspect", made["a1"], "--json")[0], INSPECT)
    checked = json_of("check", "a1", "--json")[0]
    pinned(checked, CHECK)
    assert checked["ref"] == "a1@1" and checked["fits"] == [r["base_ref"] for r in checked["reports"]] == ["tiny"]

    combined = json_of("combine", "a1", "a2:0.5", "--method", "linear", "--name", "c", "--json")[0]
    pinned(combined, derived(COMBINE))
    shown = json_of("show", "c", "--json")[0]
    assert [i["ref"] for i in shown["lineage"]["inputs"]] == ["a1@1", "a2@1"]  # (it was "label")
    assert shown["lineage"] == combined["adapter"]["lineage"]
    assert combined["new"] is True and [i["ref"] for i in combined["report"]["inputs"]] == ["a1@1", "a2@1"]
    assert json_of("combine", "a1", "a2:0.5", "--method", "linear", "--json")[0]["new"] is False  # (the same bytes)
    pinned(json_of("resize", "a1", "--rank", "2", "--name", "r", "--json")[0], derived(RESIZE))
    exported = json_of("export", "a1", "--format", "kohya", "-o", tmp_path / "k.safetensors", "--json")[0]
    pinned(exported, EXPORT)
    assert exported["ref"] == "a1@1"

    merged = json_of("merge", "a1:0.5", "--into", "tiny", "-o", tmp_path / "merged", "--json")[0]
    pinned(merged, MERGE)
    assert merged["dtype"] == "bfloat16" and merged["adapters"][0]["ref"] == "a1@1"
    assert merged["base_path"] == str(made["base"])  # (the folder merged into; a base given by name too)
    pinned(json_of("base", "show", "merged", "--json")[0], BASE)
    subtracted = json_of("subtract", "a1:0.5", "--from", "merged", "-o", tmp_path / "back", "--json")[0]
    pinned(subtracted, MERGE)
    assert subtracted["adapters"][0]["weight"] == -0.5 and subtracted["residual"] is not None
    extracted = json_of("extract", "--base", "tiny", "--tuned", "merged", "--rank", "2", "--json")[0]
    pinned(extracted, derived(EXTRACT))
    assert extracted["report"]["dtype"] == "bfloat16" == extracted["adapter"]["dtype"]
    assert (extracted["report"]["base_ref"], extracted["report"]["tuned_ref"]) == ("tiny", "merged")
    assert extracted["adapter"]["base"]["name"] == "tiny"
    pinned(json_of("base", "list", "--json")[0], [BASE])

    removed = json_of("rm", "r", "--json")[0]
    pinned(removed, [ADAPTER])
    assert [r["name"] for r in removed] == ["r"]
    assert json_of("base", "rm", "back", "--json")[0]["name"] == "back"
    pinned(json_of("base", "rm", "merged", "--force", "--json")[0], BASE)
    pinned(json_of("gc", "--dry-run", "--json")[0], GC)
    verified = json_of("verify", "--json")[0]
    pinned(verified, VERIFY)
    assert verified["ok"] and verified["adapters"] == 4
    now = json_of("db", "current", "--json")[0]
    pinned(now, DB)
    assert now["revision"] == now["head"] and now["state"] == "head"


@pytest.mark.empty_db  # (it starts from no registry: on PostgreSQL too, no tables yet)
def test_db_upgrade_and_stamp_json_say_the_revision_before_and_after():
    """db upgrade and db stamp printed only text, every other command has --json."""
    from sqlalchemy import text

    from loraops import settings
    from loraops.registry import db

    upgraded = json_of("db", "upgrade", "--json")[0]
    pinned(upgraded, DB_CHANGE)
    assert (upgraded["before"], upgraded["after"]) == (None, db.HEAD)  # (a new registry)
    assert json_of("db", "upgrade", "--json")[0] == {**upgraded, "before": db.HEAD}
    assert json_of("db", "stamp", "--json")[0] == {**upgraded, "before": db.HEAD}  # (nothing to stamp)
    engine = db.make_engine(settings.db_url())
    with engine.begin() as connection:  # its revision record lost: stamp records head
        connection.execute(text("DROP TABLE alembic_version"))
    engine.dispose()
    assert json_of("db", "stamp", "--json")[0] == upgraded


def test_a_merge_recorded_with_label_reads_with_ref(made, tmp_path):
    """A merge recorded before named its adapters' references `label` in its lineage params: it reads as `ref`, as
    every record says it, and --exact still restores from it."""
    from sqlalchemy import update

    from loraops import settings
    from loraops.registry import db
    from loraops.registry.models import SqlLineage

    json_of("base", "add", made["base"], "--name", "tiny", "--json")
    json_of("merge", f"{made['a1']}:0.5", "--into", "tiny", "-o", tmp_path / "merged", "--name", "merged", "--json")
    params = json_of("base", "show", "merged", "--json")[0]["lineage"]["params"]
    assert [set(a) for a in params["adapters"]] == [{"ref", "sha256", "weight"}]
    old = {**params, "adapters": [{("label" if k == "ref" else k): v for k, v in entry.items()}
                                  for entry in params["adapters"]]}
    engine = db.make_engine(settings.db_url())
    with engine.begin() as connection:
        connection.execute(update(SqlLineage).where(SqlLineage.op == "merge").values(params=old))
    engine.dispose()
    shown = json_of("base", "show", "merged", "--json")[0]
    pinned(shown, BASE)
    assert shown["lineage"]["params"] == params
    restored = json_of("subtract", f"{made['a1']}:0.5", "--from", "merged", "--exact", "-o", tmp_path / "back",
                       "--json")[0]
    pinned(restored, MERGE)
    assert restored["operation"] == "restore" and restored["base_path"] == str(made["base"])


def test_gc_and_verify_json_say_what_they_found(made):
    """gc --json lists each item with its size; verify --json lists each problem, and still exits non-zero with the
    error line on stderr (as check --json does for an adapter that fits no base)."""
    a1 = json_of("register", made["a1"], "--name", "a1", "--json")[0]["adapter"]
    stored = Path(a1["path"])
    unused = stored.parent / ("f" * len(stored.name))  # (a stored folder no record uses)
    shutil.copytree(stored, unused)
    found = json_of("gc", "--grace", "0", "--dry-run", "--json")[0]
    pinned(found, GC)
    assert found == {"dry_run": True, "items": [{"path": str(unused), "size": a1["size"]}], "size": a1["size"]}
    assert json_of("gc", "--grace", "0", "--json")[0] == {**found, "dry_run": False} and not unused.exists()
    weights = f"{a1['path']}/adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    verified, stderr = json_of("verify", "--json", code=6)
    pinned(verified, VERIFY)
    assert not verified["ok"] and [(p["ref"], p["file"]) for p in verified["problems"]] == [("a1@1", weights)]
    assert stderr.startswith("error: 1 stored file(s) missing or changed") and stderr.count("\n") == 1


def test_pull_and_push_json(fake_hub, made):
    fake_hub.commit_folder("someone/a1", made["a1"])
    pulled = json_of("pull", "someone/a1", "--name", "a1", "--json")[0]
    pinned(pulled, PULL)
    assert pulled["new"] is True and pulled["adapter"]["name"] == "a1"
    pushed = json_of("push", "a1", "me/a1", "--token", "hf_owner", "--json")[0]
    pinned(pushed, PUSH)
    assert pushed["ref"] == "a1@1"
