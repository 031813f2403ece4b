"""The registry's record of PEFT trainable tokens: register/list/show/check say them, migration 0005 marks the
PEFT adapters registered before as "not recorded" until `verify` or a new registration records them, and the list
and dict spellings of the same trainable_token_indices are one identity."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from peft import LoraConfig, TrainableTokensConfig

from factories import kohya_file, tiny_llama, token_adapter
from loraops import formats, settings
from loraops.cli import main
from loraops.registry import db

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)

EMBED = "model.embed_tokens.weight"
KOHYA = {"lora_unet_model_layers_0_self_attn_q_proj": ((64,), (64,))}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tok") / "base")


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


def lora(**kwargs):
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, **kwargs)


def test_register_list_show_check_say_the_token_rows(tmp_path, base):
    folder, _ = token_adapter(base, tmp_path / "a", lora(trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [1]}))
    alone, _ = token_adapter(base, tmp_path / "b", TrainableTokensConfig(token_indices=[4, 2, 9]))
    assert ": peft +tokens, 2 modules" in run("register", folder, "--name", "tok")
    assert ": peft +tokens, 0 modules" in run("register", alone, "--name", "alone")
    table = run("list").splitlines()
    assert [line.split()[2:4] for line in table[2:]] == [["peft", "+tokens"], ["peft", "+tokens"]]
    assert "trainable tokens  1 row of lm_head.weight, 2 rows of model.embed_tokens.weight" in run("show", "tok")
    shown = run("show", "alone")
    assert "trainable tokens  3 rows of model.embed_tokens.weight" in shown
    assert "\ntargets           -\n" in shown and "module " not in shown  # no empty module table
    assert json.loads(run("show", "tok", "--json"))["token_rows"] == {EMBED: 2, "lm_head.weight": 1}
    assert run("check", "tok", "--base", base).startswith(f"tok@1 fits {base}: 2/2 modules and 3/3 token rows match")
    assert run("check", "alone", "--base", base).startswith(f"alone@1 fits {base}: 0/0 modules and 3/3 token rows match")


def test_plain_adapters_say_nothing_of_tokens(tmp_path, base):
    run("base", "add", base, "--name", "base")
    kohya_file(tmp_path / "k.safetensors", KOHYA, rank=2, alpha=2)
    run("register", tmp_path / "k.safetensors", "--name", "k", "--base", "base")
    assert "trainable tokens" not in run("show", "k")
    assert "+tokens" not in run("list")
    assert run("check", "k").startswith("k@1 fits base: 1/1 modules match\n")


def test_migration_0005_leaves_earlier_peft_adapters_unrecorded_until_verify(tmp_path, base):
    folder, _ = token_adapter(base, tmp_path / "a", lora(trainable_token_indices=[3, 5, 7]))
    again, _ = token_adapter(base, tmp_path / "c", lora(trainable_token_indices=[2]), seed=3)
    kohya_file(tmp_path / "k.safetensors", KOHYA, rank=2, alpha=2)
    for path, name in ((folder, "tok"), (again, "again"), (tmp_path / "k.safetensors", "k")):
        run("register", path, "--name", name)
    engine = db.make_engine(settings.db_url())
    db.downgrade(engine, "0004")  # a registry written by loraops before 0005, its adapters in it
    if engine.dialect.name != "sqlite":  # a server registry is upgraded only when asked (test_migrations)
        db.ensure_schema(engine, explicit=True)
    engine.dispose()
    assert "+tokens" not in run("list")  # opened: upgraded to head
    assert "trainable tokens  not recorded (registered before loraops recorded them; `loraops verify` records them)" \
        in run("show", "tok")
    assert json.loads(run("show", "k", "--json"))["token_rows"] == {}  # kohya cannot carry tokens
    assert "trainable tokens" not in run("show", "k")
    run("register", again)  # registering it again records them
    assert "trainable tokens  1 row of model.embed_tokens.weight" in run("show", "again")
    run("verify")
    assert "trainable tokens  3 rows of model.embed_tokens.weight" in run("show", "tok")
    assert [line.split()[2] for line in run("list").splitlines()[2:]] == ["peft", "kohya", "peft"]
    assert run("list").count("+tokens") == 2


def test_list_and_dict_spellings_are_one_identity(tmp_path, base):
    folder, _ = token_adapter(base, tmp_path / "a", lora(trainable_token_indices=[3, 5, 7]))
    config = json.loads((folder / "adapter_config.json").read_text())
    listed = formats.identity(folder)
    config["trainable_token_indices"] = {"embed_tokens": [3, 5, 7]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert formats.identity(folder) == listed
    config["trainable_token_indices"] = {"model.embed_tokens": [3, 5, 7]}  # the full path names the same module
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert formats.identity(folder) == listed
    config["trainable_token_indices"] = {"embed_tokens": [3, 7, 5]}  # other rows: another adapter
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert formats.identity(folder) != listed


@pytest.mark.sqlite_only  # SQLite's writer lock file
@pytest.mark.sqlite_only
def test_registering_again_records_the_token_rows_as_a_write(tmp_path, base):
    """Recording the rows of an adapter registered before 0005 is a write: it queues behind another writer (the
    writer lock, Registry.write's retries) like any other, rather than committing from a read transaction. SQLite
    only: a server database has no writer lock to hold (db.writer_lock is a no-op there), so on PostgreSQL the
    test only timed the registration against its 1.5 s wait (it failed once under load)."""
    import threading

    from loraops.registry.store import Registry

    folder, _ = token_adapter(base, tmp_path / "a", lora(trainable_token_indices=[3, 5]))
    run("register", folder, "--name", "tok")
    engine = db.make_engine(settings.db_url())
    db.downgrade(engine, "0004")
    if engine.dialect.name != "sqlite":  # a server registry is upgraded only when asked (test_migrations)
        db.ensure_schema(engine, explicit=True)
    engine.dispose()
    with Registry.open() as registry:
        done = []
        with db.writer_lock(registry.engine):  # another writer's transaction
            worker = threading.Thread(target=lambda: done.append(registry.register_adapter(folder)))
            worker.start()
            worker.join(1.5)
            assert not done, "recorded the token rows while another writer held the registry"
        worker.join(30)
        assert done[0].record.token_rows == {EMBED: 2} and not done[0].created
    assert "trainable tokens  2 rows of model.embed_tokens.weight" in run("show", "tok")


def test_verify_reports_hashes_even_when_this_reader_refuses_an_intact_stored_copy(tmp_path, base, monkeypatch):
    """Recording the token rows is verify's extra: an intact copy the reader refuses (a stricter later version)
    stays "not recorded", and verify still checks every file."""
    folder, _ = token_adapter(base, tmp_path / "a", lora(trainable_token_indices=[3, 5, 7]))
    run("register", folder, "--name", "tok")
    engine = db.make_engine(settings.db_url())
    db.downgrade(engine, "0004")
    if engine.dialect.name != "sqlite":  # a server registry is upgraded only when asked (test_migrations)
        db.ensure_schema(engine, explicit=True)
    engine.dispose()
    run("list")  # upgraded: token_rows unrecorded

    def refuse(*args, **kwargs):
        raise formats.FormatError("refused by this reader")

    monkeypatch.setattr(formats, "read_adapter", refuse)
    assert "match their sha256" in run("verify")
    assert "not recorded" in run("show", "tok")
