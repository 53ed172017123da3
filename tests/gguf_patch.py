"""Where each field of a GGUF header sits, so that tests can damage one on purpose.

The walk reads the layout of ggml's gguf.cpp with struct, independently of edgeseek's parser, and
assumes a well-formed little-endian file (the pristine file a test starts from).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class Part:
    offset: int
    size: int
    role: str  # tensor_count kv_count key_len key value_type str_len str scalar array_type array_len
    #            array_data name_len name n_dims dim tensor_type tensor_offset
    owner: str  # the metadata key or tensor name it belongs to ("" for the counts)
    index: int = -1  # element of an array, dimension of a tensor
    vtype: int = -1  # value type of a scalar or of array_data's elements


def layout(data: bytes) -> list[Part]:
    parts: list[Part] = []
    pos = 4 + 4

    def add(size, role, owner="", index=-1, vtype=-1):
        nonlocal pos
        parts.append(Part(pos, size, role, owner, index, vtype))
        pos += size
        return data[pos - size: pos]

    n_tensors = struct.unpack("<Q", add(8, "tensor_count"))[0]
    n_kv = struct.unpack("<Q", add(8, "kv_count"))[0]

    def string(owner, len_role, role, index=-1):
        n = struct.unpack("<Q", add(8, len_role, owner, index))[0]
        add(n, role, owner, index)

    def next_string() -> str:
        n = struct.unpack_from("<Q", data, pos)[0]
        return data[pos + 8: pos + 8 + n].decode()

    for _ in range(n_kv):
        key = next_string()
        string(key, "key_len", "key")
        vtype = struct.unpack("<I", add(4, "value_type", key))[0]
        if vtype == STRING:
            string(key, "str_len", "str")
        elif vtype == ARRAY:
            itype = struct.unpack("<I", add(4, "array_type", key))[0]
            n = struct.unpack("<Q", add(8, "array_len", key))[0]
            if itype == STRING:
                for i in range(n):
                    string(key, "str_len", "str", i)
            else:
                add(n * struct.calcsize(SCALAR[itype]), "array_data", key, vtype=itype)
        else:
            add(struct.calcsize(SCALAR[vtype]), "scalar", key, vtype=vtype)
    for _ in range(n_tensors):
        name = next_string()
        string(name, "name_len", "name")
        n_dims = struct.unpack("<I", add(4, "n_dims", name))[0]
        for d in range(n_dims):
            add(8, "dim", name, d)
        add(4, "tensor_type", name)
        add(8, "tensor_offset", name)
    return parts


def find(parts: list[Part], role: str, owner: str, index: int = -1) -> Part:
    return next(p for p in parts if p.role == role and p.owner == owner and p.index == index)


def put_int(data: bytearray, part: Part, value: int) -> None:
    """Writes `value` into an integer field of 4 or 8 bytes (wrapping it to the field's width)."""
    fmt = {4: "<I", 8: "<Q"}[part.size]
    struct.pack_into(fmt, data, part.offset, value % (1 << (8 * part.size)))


def get_int(data: bytes, part: Part) -> int:
    return struct.unpack_from({4: "<I", 8: "<Q"}[part.size], data, part.offset)[0]
