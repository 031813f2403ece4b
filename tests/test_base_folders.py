"""Base folders a user hands loraops as they lie: a patch index beside an unreadable shard, stale copies below the
model's folder, a Hugging Face cache snapshot of symlinks (docs/readme-bases7.md)."""
import json
import re
from pathlib import Path

import pytest

from loraops.basemodel import BaseModel
from loraops.errors import FormatError
from tests.factories import peft_adapter
from tests.test_basemodel import _patched_model


@pytest.mark.parametrize("spoil", ["truncated", "no permission", "dangling link"])
def test_an_unreadable_shard_a_patch_index_leaves_out_is_refused_saying_why_it_was_read(tmp_path, monkeypatch, spoil):
    """The original shard beside a patch index that does not list it is read (its header) to tell a replaced shard
    from a left-out one; where it could not be, the file system's or the header's own error was all the user saw (or,
    without read permission, for root, nothing: it was read anyway). One line now, naming the index, the file, why
    it was read and what to do, from base add, check and merge; the same on the Hub."""
    from click.testing import CliRunner

    from loraops import hub
    from loraops.cli import main

    folder, last, _ = _patched_model(tmp_path)
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    shard = folder / last
    if spoil == "truncated":
        shard.write_bytes(shard.read_bytes()[:50])
        reason = f"{shard}: truncated or not a safetensors file"
    elif spoil == "dangling link":
        shard.unlink()
        shard.symlink_to(tmp_path / "blobs" / "gone")  # (an HF cache snapshot whose blob was deleted)
        reason = f"{shard}: no such file"
    else:
        def refuse(file, *args, **kwargs):
            if Path(file) == shard:
                raise PermissionError(13, "Permission denied", str(file))
            return open(file, *args, **kwargs)

        monkeypatch.setattr("loraops.st.open", refuse, raising=False)  # (root reads a chmod 000 file)
        reason = f"{shard}: Permission denied"
    says = (f"{folder}/patch/model.safetensors.index.json: does not list {last}, a shard of its set in the model's "
            f"folder, whose header loraops reads to see whether the index lists all its tensors elsewhere (a shard it "
            f"replaces), and it cannot be read ({reason}")
    for args in (["base", "add", str(folder)], ["check", str(adapter), "--base", str(folder)],
                 ["merge", str(adapter), "--into", str(folder), "-o", str(tmp_path / "out"), "--no-record"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert line.startswith(f"error: {says}") and line.endswith(": remove the file, or list it in the index")
        assert "\n" not in line
    assert not (tmp_path / "out").exists()
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    read = lambda n: json.loads((folder / n).read_text())  # noqa: E731
    with pytest.raises(FormatError, match=re.escape(f"patch/model.safetensors.index.json: does not list {last}, a shard")):
        hub.weight_layout(names, read, read_header=lambda n: BaseModel.open(folder / n).tensors)
