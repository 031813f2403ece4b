import json
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from loraops.errors import FormatError, NotFoundError
from loraops.st import dtype_name, load_tensors, read_header

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass


def _raw(path, header: dict, data: bytes = b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_reads_a_real_file(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"k": "v"}
    assert header.tensors["a"].shape == (3, 4) and header.tensors["a"].dtype == "F32"
    loaded = load_tensors(header)
    torch.testing.assert_close(loaded["a"], t["a"])
    torch.testing.assert_close(loaded["b"], t["b"])


def _dup(path, members: bytes, data: bytes):
    """A header whose JSON object lists ``members`` (raw, so a key can appear twice: json.dumps cannot write that)."""
    blob = b"{" + members + b"}"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b""), "too short"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10**12)), "over the 100 MB limit"),
        (lambda p: p.write_text('{"r": 8, "lora_alpha": 16}'), "it begins with text ('{\"r\": 8,'…), as a JSON"),
        (lambda p: p.write_bytes(struct.pack("<Q", 1000) + b"{}"), "truncated"),
        (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"nope"), "not JSON"),
        (lambda p: _raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}), "past the end"),
        (lambda p: _raw(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "12 expected"),
        (lambda p: _raw(p, {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype"),
        (
            lambda p: _raw(
                p,
                {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                b"\0" * 12,
            ),
            "overlap",
        ),
        # what the safetensors library refuses (its validate()): data no tensor covers, a name given twice
        # an empty tensor whose element count overflows 64 bits (the library's checked product) or a dimension that
        # no u64 holds: 0 bytes, so the sizes agreed, and loraops copied it into outputs no loader could open
        (lambda p: _raw(p, {"z": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40, 0], "data_offsets": [0, 0]}}),
         "more elements than 64 bits count"),
        (lambda p: _raw(p, {"z": {"dtype": "F32", "shape": [0, 2 ** 70], "data_offsets": [0, 0]}}),
         "more elements than 64 bits count"),
        (lambda p: _raw(p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "bytes 0–4"),
        (lambda p: _raw(p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12), "bytes 4–8"),
        (lambda p: _raw(p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
         "4 bytes after the last tensor"),
        (lambda p: _dup(p, b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                           b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}', b"\0" * 8), "'a' twice"),
        (lambda p: _dup(p, b'"__metadata__":{"k":"1"},"__metadata__":{"k":"2"}', b""), "'__metadata__' twice"),
        # a lone surrogate escape is JSON Python reads but no Unicode text (safetensors refuses it; SQLite cannot store it)
        (lambda p: _dup(p, b'"__metadata__":{"k":"x\\udcffy"}', b""), "not Unicode text"),
        (lambda p: _dup(p, b'"a\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}', b"\0" * 4),
         "not Unicode text"),
        (lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 20), "pickle"),
        (lambda p: p.write_bytes(b"\x80\x02" + b"\0" * 20), "pickle"),
    ],
)
def test_rejects_bad_files_with_one_line(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(FormatError) as err:
        read_header(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(NotFoundError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")


def test_write_is_byte_stable_and_aligned(tmp_path):
    """Same tensors and metadata, in any insertion order → the same bytes (a file's sha256 is an adapter's identity);
    every tensor starts at a multiple of its element size, so zero-copy loaders can map it."""
    from safetensors import safe_open

    from loraops.st import write_safetensors

    tensors = {"z.odd": torch.arange(3, dtype=torch.bfloat16), "a.wide": torch.arange(5, dtype=torch.float64),
               "m.mid": torch.arange(7, dtype=torch.float32), "b.byte": torch.arange(3, dtype=torch.uint8)}
    metadata = {"format": "pt", "lora_adapter_metadata": "{}", "ss_network_dim": "4"}
    write_safetensors(tmp_path / "one.safetensors", tensors, metadata)
    write_safetensors(tmp_path / "two.safetensors", dict(reversed(tensors.items())), dict(reversed(metadata.items())))
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    header = read_header(tmp_path / "one.safetensors")
    assert header.metadata == metadata
    for name, tensor in tensors.items():
        assert header.tensors[name].start % tensor.element_size() == 0, name
    with safe_open(tmp_path / "one.safetensors", "pt") as f:
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)


GOOD_HEADER = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'


def _library_reads(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, "pt"):
            return True
    except Exception:
        return False


@pytest.mark.parametrize("blob, message", [
    (b"\xef\xbb\xbf" + GOOD_HEADER, "header starts with a byte order mark"),
    (GOOD_HEADER.replace(b"[0,4]", b"[-0,4]"), "bad data_offsets [-0.0, 4]"),
    (GOOD_HEADER.replace(b"[1]", b"[-0]").replace(b"[0,4]", b"[0,0]"), "bad shape [-0.0]"),
    (GOOD_HEADER.replace(b'"dtype"', b'"x":NaN,"dtype"'), "NaN is not JSON"),
    (GOOD_HEADER.replace(b'"dtype"', b'"x":-Infinity,"dtype"'), "-Infinity is not JSON"),
    (GOOD_HEADER.decode().encode("utf-16-le"), "header is not JSON"),
    # serde_json: a number past float64 is out of range (Python reads 1e999 as inf, a 400-digit integer as itself)
    (GOOD_HEADER.replace(b'"dtype"', b'"x":1e999,"dtype"'), "1e999 is beyond float64"),
    (GOOD_HEADER.replace(b'"dtype"', b'"x":-' + b"9" * 400 + b',"dtype"'), "beyond float64"),
    # serde_json nests 127 deep at most; Python, about 1000, then a RecursionError traceback
    (GOOD_HEADER.replace(b'"dtype"', b'"x":' + b"[" * 126 + b"]" * 126 + b',"dtype"'), "nests deeper than 127"),
    (GOOD_HEADER.replace(b'"dtype"', b'"x":' + b"[" * 100000 + b"]" * 100000 + b',"dtype"'), "nests deeper than 127"),
    # (a TypeError traceback: a list is no dict key)
    (GOOD_HEADER.replace(b'"F32"', b'["F32"]'), "unknown dtype ['F32']"),
    (GOOD_HEADER.replace(b'"F32"', b'{"F32":1}'), "unknown dtype {'F32': 1}"),
])
def test_a_header_the_safetensors_library_refuses_is_refused(tmp_path, blob, message):
    """json.loads(bytes) skipped a UTF-8 byte order mark (and read UTF-16), read -0 as the integer 0 and took NaN and
    Infinity: headers the safetensors library refuses (serde_json: no BOM, -0 is a float, no NaN) were accepted."""
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + (b"" if b"[0,0]" in blob else b"\0" * 4))
    assert not _library_reads(path)
    with pytest.raises(FormatError) as err:
        read_header(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


@pytest.mark.parametrize("blob", [GOOD_HEADER, b" " + GOOD_HEADER, GOOD_HEADER.replace(b'"dtype"', b'"x":1,"dtype"'),
                                  b'{"__metadata__":null,' + GOOD_HEADER[1:],
                                  # -0 is a float, refused only where a size or offset is read
                                  GOOD_HEADER.replace(b'"dtype"', b'"x":-0,"dtype"'),
                                  GOOD_HEADER.replace(b'"dtype"', b'"x":[1e-999,' + b"9" * 300 + b'],"dtype"'),
                                  GOOD_HEADER.replace(b'"dtype"', b'"x":' + b"[" * 125 + b"]" * 125 + b',"dtype"'),
                                  b'{"__metadata__":{"k":"caf\\u00e9 \\/ \\" \\n \xc3\xa9"},' + GOOD_HEADER[1:]])
def test_a_header_the_library_reads_is_read(tmp_path, blob):
    path = tmp_path / "fine.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)
    assert _library_reads(path)
    assert list(read_header(path).tensors) == ["a"]


def _library_dtypes(folder) -> list[str]:
    """The dtypes the installed safetensors library knows, as its refusal of an unknown one lists them."""
    path = _raw(folder / "x.safetensors", {"a": {"dtype": "Q7", "shape": [0], "data_offsets": [0, 0]}})
    from safetensors import safe_open

    with pytest.raises(Exception) as err:
        safe_open(path, "pt")
    return re.findall(r"`(\w+)`", str(err.value).split("expected one of", 1)[1])


def test_every_dtype_of_the_library_is_read_or_named(tmp_path):
    """A C64 (complex64) tensor, a valid file, was called an 'unknown dtype' in a 'corrupt safetensors header'."""
    from loraops.st import DTYPE_BYTES, UNSUPPORTED_DTYPES

    known = _library_dtypes(tmp_path)
    assert "C64" in known and "F8_E8M0" in known
    assert sorted(known) == sorted([*DTYPE_BYTES, *UNSUPPORTED_DTYPES])
    save_file({"z": torch.zeros(2, dtype=torch.complex64)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(FormatError) as err:
        read_header(tmp_path / "c.safetensors")
    assert str(err.value) == (f"{tmp_path / 'c.safetensors'}: tensor 'z' is C64 (complex64): loraops does not support "
                              "tensors of that dtype")


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bfloat16"), (torch.float8_e4m3fn, "float8_e4m3fn"),
                                         ("torch.float16", "float16"), ("float32", "float32")])
def test_dtype_name_is_torch_name_without_its_prefix(dtype, name):
    assert dtype_name(dtype) == name


def test_scan_reads_every_tensor_once_in_whole_values_and_sees_every_byte(tmp_path):
    """st.scan (register's value check and identity in one read): blocks are whole values of each tensor, a tensor
    past the 8 MiB buffer comes in several, and ``seen`` gets the file's bytes in order (what register hashes)."""
    from loraops.st import scan

    big = torch.randn(3 * (1 << 20) + 5, dtype=torch.float64)  # 24 MiB and 40 bytes: 8 MiB blocks and a tail
    tensors = {"big": big, "half": torch.randn(7, 3).half(), "ints": torch.arange(9, dtype=torch.int16),
               "brain": torch.randn(5).bfloat16()}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"odd": "length"})  # (a header length that aligns nothing)
    seen, blocks = [], {}
    for info, block in scan(path, lambda chunk: seen.append(bytes(chunk))):
        assert block.dtype == tensors[info.name].dtype and block.dim() == 1
        blocks.setdefault(info.name, []).append(block.clone())
    assert b"".join(seen) == path.read_bytes() and len(blocks["big"]) == 4
    for name, tensor in tensors.items():
        assert torch.equal(torch.cat(blocks[name]), tensor.reshape(-1))


def test_without_torch_says_the_notes_of_the_try_that_counts_a_failed_one_too():
    """In a fresh interpreter (no torch yet): a read that fails says its notes before its error (they were dropped
    with the failure), and a read that turns out to need torch says those of its second try alone."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """if True:
        import logging, sys
        from loraops import st
        logging.basicConfig(stream=sys.stdout, format="%(message)s")
        note = logging.getLogger("loraops").warning
        def failing():
            note("a note")
            raise ValueError("bad input")
        try:
            st.without_torch(failing)
        except ValueError as error:
            print("raised", error)
        def needing():
            note("a try")
            import torch
            return "done"
        print(st.without_torch(needing), "torch" in sys.modules)
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.stdout.splitlines() == ["a note", "raised bad input", "a try", "done True"]
