"""CTranslate2 model.bin reader: round trip on a small file written here, clear errors on bad files,
and a full parse of the Whisper tiny.en file of the pinned package (skipped when absent)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from training.base.ct2 import CT2FormatError, CT2Model, read_ct2, write_ct2


def _small(path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    variables = {
        "encoder/conv1/weight": rng.standard_normal((4, 3, 3)).astype(np.float16),
        "encoder/layer_0/ffn/linear_0/bias": rng.standard_normal(5).astype(np.float32),
        "encoder/num_heads": np.array(6, dtype=np.int16),  # rank-0 scalar
        "decoder/activation": np.array(3, dtype=np.int8),
        "ids": np.arange(6, dtype=np.int32).reshape(2, 3),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "naïve/ünicode": np.ones(2, dtype=np.float32),
    }
    return write_ct2(path, "TinySpec", variables, revision=3, aliases={"alias": "ids"}), variables


def test_round_trip(tmp_path):
    path, variables = _small(tmp_path / "model.bin")
    model = read_ct2(path)
    assert isinstance(model, CT2Model)
    assert (model.version, model.spec, model.revision) == (6, "TinySpec", 3)
    assert list(model.variables) == list(variables)  # file order kept
    for name, want in variables.items():
        got = model.variables[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)
    assert model.aliases == {"alias": "ids"}
    np.testing.assert_array_equal(model.get("alias"), variables["ids"])
    assert model.variables["ids"].flags.writeable
    with pytest.raises(KeyError, match="nope"):
        model.get("nope")


def test_header_layout_is_little_endian(tmp_path):
    path, _ = _small(tmp_path / "model.bin")
    raw = path.read_bytes()
    assert struct.unpack_from("<I", raw, 0)[0] == 6
    assert struct.unpack_from("<H", raw, 4)[0] == len("TinySpec") + 1  # length counts the NUL
    assert raw[6 : 6 + 9] == b"TinySpec\0"


def test_bfloat16_is_widened(tmp_path):
    # A one-variable file built by hand with dtype id 5 (bfloat16) holding 1.5 and -2.0.
    bits = (np.array([1.5, -2.0], dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
    body = struct.pack("<I", 6) + struct.pack("<H", 2) + b"S\0" + struct.pack("<II", 1, 1)
    body += struct.pack("<H", 2) + b"x\0" + struct.pack("<BIBI", 1, 2, 5, 4) + bits.tobytes()
    body += struct.pack("<I", 0)
    (tmp_path / "bf16.bin").write_bytes(body)
    got = read_ct2(tmp_path / "bf16.bin").variables["x"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [1.5, -2.0])


@pytest.mark.parametrize("cut", [0, 3, 10, 40, -5, -1])
def test_truncated_file_fails_clearly(tmp_path, cut):
    path, _ = _small(tmp_path / "model.bin")
    raw = path.read_bytes()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(raw[:cut] if cut > 0 else raw[: len(raw) + cut] if cut < 0 else b"")
    with pytest.raises(CT2FormatError, match=r"truncated|does not fit"):
        read_ct2(bad)


def test_corrupt_files_fail_clearly(tmp_path):
    path, _ = _small(tmp_path / "model.bin")
    raw = path.read_bytes()

    def fails(data: bytes, pattern: str) -> None:
        bad = tmp_path / "bad.bin"
        bad.write_bytes(data)
        with pytest.raises(CT2FormatError, match=pattern):
            read_ct2(bad)

    fails(struct.pack("<I", 5) + raw[4:], "binary version 5")
    fails(b"PK\x03\x04" + raw[4:], "binary version")  # some other file format
    fails(raw + b"\0\0", "trailing bytes")
    # The first variable's dtype byte: after the header, its name, rank and 3 dims.
    name = b"encoder/conv1/weight\0"
    at = raw.index(name) + len(name) + 1 + 3 * 4
    assert raw[at] == 4  # float16
    fails(raw[:at] + bytes([9]) + raw[at + 1 :], "unknown dtype id 9")
    fails(raw[:at] + bytes([0]) + raw[at + 1 :], "declares .* bytes")  # float32 size mismatch
    # A name without its NUL terminator.
    i = raw.index(name) + len(name) - 1
    fails(raw[:i] + b"X" + raw[i + 1 :], "NUL-terminated")
    with pytest.raises(CT2FormatError, match="cannot read"):
        read_ct2(tmp_path / "missing.bin")


def test_writer_rejects_unknown_dtype_and_alias(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_ct2(tmp_path / "a.bin", "S", {"x": np.zeros(2, dtype=np.float64)})
    with pytest.raises(ValueError, match="alias"):
        write_ct2(tmp_path / "a.bin", "S", {"x": np.zeros(2, np.float32)}, aliases={"y": "z"})


def _package_file() -> Path:
    from training.base.build import WHISPER, BaseBuildError, locate_weights

    try:
        return locate_weights(WHISPER, check_hash=False)
    except BaseBuildError as exc:
        pytest.skip(str(exc))


def test_reads_real_whisper_file_to_the_end():
    model = read_ct2(_package_file())  # raises if anything is left over or missing
    assert (model.version, model.spec, model.revision) == (6, "WhisperSpec", 3)
    assert len(model.variables) == 148
    assert model.variables["encoder/conv1/weight"].shape == (384, 80, 3)
    assert model.variables["encoder/position_encodings/encodings"].shape == (1500, 384)
    assert int(model.variables["encoder/num_heads"]) == 6
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    for name, value in model.variables.items():
        if value.dtype.kind == "f":
            assert np.isfinite(value).all(), name
