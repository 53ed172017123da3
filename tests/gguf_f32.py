"""A GGUF file with every tensor dequantized to F32 and the same metadata: the "exact math" of a
quantized file, which backends are measured against (gguf-py reads, dequantizes and writes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter, quants

from edgeseek.convert.convert import copy_metadata


def dequantized_f32(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    """Write src's F32 twin to dst (once: an existing dst is kept), without the tensors in `drop`."""
    if dst.exists():
        return dst
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    tmp = dst.with_suffix(".tmp")
    w = GGUFWriter(tmp, arch)
    copy_metadata(r, w)
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
