"""Validated reading of a GGUF file's header: metadata and tensor table.

File layout (GGUF v2/v3, little-endian)::

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, type: u32, value)            string = u64 length + UTF-8 bytes
    n_tensors x (name: string, n_dims: u32, dims: u64[n_dims], ggml type: u32, offset: u64)
    padding to `general.alignment` (default 32), then the tensor data; offsets are relative to it.

`read_header` checks every length against the bytes left, and every tensor's type, shape, size
and placement against the file (in bounds, aligned, no overlap), before any tensor byte is read.
A truncated or hostile file fails with a `GGUFError` naming the problem, never with an
out-of-bounds read or an allocation sized by an untrusted count.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from inferd.models import gguf_quants


class GGUFError(ValueError):
    """A GGUF file that cannot be read: malformed, truncated, hostile, or of an unsupported kind."""


GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS: ggml tensors have at most 4 dimensions
MAX_ARRAY_NESTING = 2  # arrays of arrays occur (e.g. per-layer lists); deeper is hostile
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> (struct format, numpy dtype) for the fixed-size scalars.
_SCALAR_TYPES: dict[int, tuple[str, Any]] = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_FLOAT32, _STRING, _ARRAY = 6, 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first): ggml's dims reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]  # in file order
    file_size: int


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file; every overrun is a GGUFError."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"file is truncated: {what} needs {n} bytes at offset {self.pos}, "
                            f"file has {self.size}")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{what} is not valid UTF-8 ({e})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == _FLOAT32:
            # The shortest decimal that round-trips in float32, so 1e-5 reads as 1e-05 rather than
            # 9.999999747378752e-06 in the config (the float32 value is the same).
            return float(str(np.float32(self.scalar("<f", what))))
        if vtype in _SCALAR_TYPES:
            return self.scalar(_SCALAR_TYPES[vtype][0], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        raise GGUFError(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> list[Any]:
        if depth >= MAX_ARRAY_NESTING:
            raise GGUFError(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING} levels")
        etype = self.scalar("<I", f"element type of {what}")
        count = self.scalar("<Q", f"length of {what}")
        if etype in _SCALAR_TYPES:
            fmt, np_type = _SCALAR_TYPES[etype]
            n = count * struct.calcsize(fmt)
            self.need(n, f"{what} ({count} elements)")
            values = np.frombuffer(self.buf, dtype=np.dtype(np_type).newbyteorder("<"), count=count,
                                   offset=self.pos).tolist()
            self.pos += n
            return values
        if etype not in (_STRING, _ARRAY):
            raise GGUFError(f"{what} has unknown element type {etype}")
        # Each string/array element takes at least 8 bytes; checking first bounds the list we build.
        self.need(count * 8, f"{what} ({count} elements)")
        return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]


_HEADERS: dict[tuple, GGUFHeader] = {}
"""Parsed headers by (path, inode, size, mtime): a process reads its model's header twice (model
info, then weights) and parsing a 49k-token vocabulary takes ~0.3 s. Treat them as read-only."""


def read_header(path: str | Path) -> GGUFHeader:
    """Parse and validate a GGUF header; raises GGUFError for anything malformed."""
    path = Path(path)
    try:
        st = os.stat(path)
        key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
        if key in _HEADERS:
            return _HEADERS[key]
        size = st.st_size
        with open(path, "rb") as f:
            if size < 24:
                raise GGUFError(f"file is truncated ({size} bytes); not a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                header = _parse(_Cursor(buf, size), path)
        if len(_HEADERS) >= 4:
            _HEADERS.pop(next(iter(_HEADERS)))
        _HEADERS[key] = header
        return header
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e}") from None
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None


def _parse(cur: _Cursor, path: Path) -> GGUFHeader:
    magic = cur.buf[0:4]
    if magic != GGUF_MAGIC:
        raise GGUFError(f"bad magic {magic!r}: not a GGUF file")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        hint = " (a big-endian file, which is not supported)" if swapped in (2, 3) else ""
        raise GGUFError(f"unsupported GGUF version {version}{hint}; versions 2 and 3 are supported")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")
    # Lower bounds on the header size (a tensor entry takes >= 32 bytes, a metadata entry >= 13):
    # reject absurd counts before looping over them.
    if n_tensors * 32 + n_kv * 13 > cur.size:
        raise GGUFError(f"header claims {n_tensors} tensors and {n_kv} metadata entries, "
                        f"more than a {cur.size}-byte file can hold")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.scalar("<I", f"type of metadata {key!r}")
        if key in metadata:
            raise GGUFError(f"duplicate metadata key {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")
    entries = [_tensor_entry(cur, i) for i in range(n_tensors)]
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
            or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment={alignment!r} is not a positive power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = _validate_tensors(entries, data_start, alignment, cur.size)
    return GGUFHeader(version=version, metadata=metadata, tensors=tensors, file_size=cur.size)


def _tensor_entry(cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string(f"name of tensor #{i}")
    n_dims = cur.scalar("<I", f"n_dims of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"tensor {name!r} has {n_dims} dimensions; ggml allows 1 to {MAX_DIMS}")
    dims = tuple(cur.scalar("<Q", f"dims of tensor {name!r}") for _ in range(n_dims))
    qtype = cur.scalar("<I", f"type of tensor {name!r}")
    offset = cur.scalar("<Q", f"offset of tensor {name!r}")
    return name, dims, qtype, offset


def _validate_tensors(entries: list[tuple[str, tuple[int, ...], int, int]], data_start: int,
                      alignment: int, file_size: int) -> dict[str, TensorInfo]:
    """Check each tensor's type, shape, size and placement; none may overlap or pass the end."""
    tensors: dict[str, TensorInfo] = {}
    for name, dims, raw_type, offset in entries:
        try:
            qtype = GGMLQuantizationType(raw_type)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(f"tensor {name!r} has unknown ggml type {raw_type}") from None
        if not gguf_quants.is_supported(qtype):
            raise GGUFError(f"tensor {name!r} has type {qtype.name}, which cannot be dequantized")
        if name in tensors:
            raise GGUFError(f"duplicate tensor name {name!r}")
        if any(d == 0 for d in dims) or dims[0] % block_size:
            raise GGUFError(f"tensor {name!r} has dims {list(dims)}: each must be positive and the "
                            f"row length a multiple of the {qtype.name} block size {block_size}")
        # Python ints do not overflow, so a hostile 2**63 dimension just fails the size check.
        n_bytes = math.prod(dims) // block_size * type_size
        start = data_start + offset
        if offset % alignment:
            raise GGUFError(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
        if start + n_bytes > file_size:
            raise GGUFError(f"tensor {name!r} ({qtype.name}, dims {list(dims)}, {n_bytes} bytes at "
                            f"offset {start}) runs past the end of the {file_size}-byte file")
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype, start, n_bytes)
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.n_bytes > b.offset:
            raise GGUFError(f"tensors {a.name!r} and {b.name!r} overlap in the data section")
    return tensors
