"""A GGUF file with every tensor dequantized to F32 and the same metadata: the "exact math" of a
quantized file, which backends are measured against (gguf-py reads, dequantizes and writes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants


def dequantized_f32(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    """Write src's F32 twin to dst (once: an existing dst is kept), without the tensors in `drop`."""
    if dst.exists():
        return dst
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    tmp = dst.with_suffix(".tmp")
    w = GGUFWriter(tmp, arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        if t.name in drop:
            continue
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
        w.add_tensor(t.name, np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type).reshape(shape),
                                                  dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(dst)
    return dst
