"""A GGUF file's matrices requantized to another format with edgeseek's own quantizer, metadata and
1-D tensors kept (SmolLM2-135M's Q8_0 twin of its Q4_1 file, for the dense-model decode figures).

    python bench/requantize.py SRC.gguf DST.gguf [--type q8_0]

Each 2-D tensor is dequantized (gguf-py) and quantized again (quantize/): the result carries the
source's rounding too, so it measures speed, not the quality of a Q8_0 model.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFWriter, quants

from edgeseek.convert.convert import copy_metadata
from edgeseek.quantize import get_format


def requantize(src: Path, dst: Path, qtype: T) -> Path:
    r = GGUFReader(src)
    w = GGUFWriter(dst.with_suffix(".tmp"), r.fields["general.architecture"].contents())
    copy_metadata(r, w)
    fmt = get_format(qtype)
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
        x = np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type).reshape(shape), dtype=np.float32)
        if len(shape) == 2 and shape[1] % fmt.block_size == 0:
            w.add_tensor(t.name, fmt.quantize(x), raw_dtype=qtype)  # (rows, row_bytes)
        else:
            w.add_tensor(t.name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dst.with_suffix(".tmp").replace(dst)
    return dst


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--type", default="q8_0")
    a = p.parse_args()
    print(requantize(a.src, a.dst, T[a.type.upper()]))
