"""The registry records a convolution's kernel (adapter_modules.kernel, revision 0007): `list --json` and `show` give
it for PEFT, kohya (LoCon conv) and AdaLoRA conv adapters, and keep it once the base is removed, when the stored
file alone no longer says it (an AdaLoRA conv's A is flattened; a kohya file names its modules its own way)."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from factories import conv_embedding_model, conv_peft_adapter, kohya_file, save_state_dict
from loraops import settings
from loraops.cli import main
from loraops.registry import db
from test_adalora_vera import adalora_adapter

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)

KERNELS = {  # conv_embedding_model's layers an adapter of each kind adapts → the kernel the registry gives
    "peft": {"embed": None, "proj": None, "conv1": [1, 1], "conv3": [3, 3]},
    "kohya": {"conv1": [1, 1], "conv3": [3, 3]},
    "adalora": {"proj": None, "conv3": [3, 3]},
}


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout  # (show's note on a stored copy damaged on purpose goes to stderr)


def adapter(kind: str, tmp_path: Path) -> Path:
    if kind == "peft":
        return conv_peft_adapter(tmp_path / "peft")
    if kind == "kohya":
        return kohya_file(tmp_path / "k.safetensors", {"lora_unet_conv1": ((4, 1, 1), (8, 1, 1)),
                                                       "lora_unet_conv3": ((8, 3, 3), (6, 1, 1))}, rank=2)
    return adalora_adapter(None, tmp_path / "ada", model=conv_embedding_model(), targets=["proj", "conv3"])


def kernels(modules: list[dict]) -> dict[str, list[int] | None]:
    return {m["name"]: m["kernel"] for m in modules}


def shown(ref: str) -> dict[str, list[int] | None]:
    return kernels(json.loads(run("show", ref, "--json"))["modules"])


def listed() -> dict[str, list[int] | None]:
    return kernels(json.loads(run("list", "--json"))[0]["modules"])


@pytest.mark.parametrize("kind", KERNELS)
def test_list_and_show_give_the_kernel_recorded_at_registration_and_keep_it_without_the_base(tmp_path, kind):
    """list --json gave null for every kernel (the rows did not record it), and show of a kohya or AdaLoRA conv lost
    it with its base (read from the stored file bound to the base). The stored file is not read for them now: the
    kernels are the rows' (a damaged file leaves them)."""
    run("base", "add", save_state_dict(conv_embedding_model(), tmp_path / "base.safetensors"), "--name", "b")
    run("register", adapter(kind, tmp_path), "--name", "a", "--base", "b")
    assert shown("a") == KERNELS[kind]
    run("base", "rm", "b", "--force")
    assert shown("a") == KERNELS[kind]
    assert listed() == KERNELS[kind]
    assert "conv3x3" in run("show", "a")
    stored = Path(json.loads(run("show", "a", "--json"))["path"])
    for file in stored.rglob("*.safetensors") if stored.is_dir() else [stored]:
        file.parent.chmod(0o755)
        file.chmod(0o644)
        file.write_bytes(b"")
    assert shown("a") == KERNELS[kind]


@pytest.mark.empty_db
def test_upgrade_fills_the_kernels_of_bound_convs_from_the_base_and_show_reads_the_others(tmp_path):
    """A registry of revision 0006 has no kernel column: the upgrade to 0007 fills a bound conv row's from its base's
    manifest (an AdaLoRA conv's too, whose stored A is flattened); an unbound adapter's rows stay null, and show reads
    theirs from the stored file, as before. Downgrading drops the column and keeps the rows."""
    run("base", "add", save_state_dict(conv_embedding_model(), tmp_path / "base.safetensors"), "--name", "b")
    run("register", adapter("adalora", tmp_path), "--name", "ada", "--base", "b")
    run("register", adapter("kohya", tmp_path), "--name", "k", "--base", "b")
    run("register", conv_peft_adapter(tmp_path / "unbound", seed=2), "--name", "unbound")
    engine = db.make_engine(settings.db_url())
    db.downgrade(engine, "0006")

    def rows():
        with engine.connect() as c:
            return c.execute(text("SELECT a.name, m.name, m.kind FROM adapters a JOIN adapter_modules m "
                                  "ON m.adapter_id = a.id ORDER BY m.id")).all()

    before = rows()
    db.upgrade(engine)
    with engine.connect() as c:
        recorded = {(a, m): k for a, m, k in c.execute(text(
            "SELECT a.name, m.name, m.kernel FROM adapters a JOIN adapter_modules m ON m.adapter_id = a.id")).all()}
    assert {key: None if k is None else json.loads(k) if isinstance(k, str) else k for key, k in recorded.items()} == {
        **{("ada", m): k for m, k in KERNELS["adalora"].items()},
        **{("k", m): k for m, k in KERNELS["kohya"].items()},
        **{("unbound", m): None for m in KERNELS["peft"]},
    }
    assert shown("ada") == KERNELS["adalora"] and shown("unbound") == KERNELS["peft"]
    assert listed() == KERNELS["adalora"]  # (ada@1 first by name)
    db.downgrade(engine, "0006")
    assert rows() == before
    engine.dispose()
