"""convert(): a checkpoint folder -> one GGUF file, streamed.

Every output tensor is produced as float32 row chunks (one routed expert, or ~32 MB of rows, at a
time), quantized by the format's own quantizer (edgeseek.quantize) and appended to a temporary file
beside the output, which is renamed over the output path only once complete: memory stays bounded by
one chunk whatever the model size, and an interrupted conversion leaves no file at the output path.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Queue
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from edgeseek.errors import EdgeseekError
from edgeseek.quantize import get_format

from .architectures import Options, Plan, architecture_of
from .checkpoint import Checkpoint
from .recipes import Model, choose, get_recipe, parse_overrides
from .vocab import write_vocab


class OutputExistsError(EdgeseekError):
    """The output path exists and --force was not given."""


@dataclass
class TensorReport:
    name: str
    shape: list[int]  # GGUF order (ne0 first), as llama.cpp prints it
    type: str
    bytes: int
    rel_error: float  # ||W - dequant(quant(W))|| / ||W||, on ~32 evenly spaced rows per chunk (0 for F32)


@dataclass
class Report:
    output: str
    architecture: str
    recipe: str
    file_type: int
    seconds: float = 0.0
    source_bytes: int = 0
    output_bytes: int = 0
    vocab: dict = field(default_factory=dict)
    tensors: list[TensorReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _quantize(qtype: T, x: np.ndarray) -> np.ndarray:
    """(rows, ne0) float32 -> (rows, row_bytes) uint8 in the GGUF block layout."""
    return get_format(qtype).quantize(x)


ERROR_ROWS = 32  # rows per chunk on which the quantization error is measured


def _sq_error(qtype: T, x: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """(sum of squared errors, sum of squares) on an even sample of about ERROR_ROWS rows of the chunk:
    dequantizing everything would cost a third of the conversion time."""
    rows = slice(None, None, max(1, x.shape[0] // ERROR_ROWS))
    xs = x[rows]
    norm = float(np.einsum("ij,ij->", xs, xs, dtype=np.float64))
    if qtype == T.F32:
        return 0.0, norm
    d = get_format(qtype).dequantize(np.ascontiguousarray(q[rows])).reshape(xs.shape)
    d -= xs
    return float(np.einsum("ij,ij->", d, d, dtype=np.float64)), norm


def _prefetch(gen, depth: int = 1):
    """Yields gen's items, producing the next one in a background thread (reads overlap quantizing)."""
    q: Queue = Queue(maxsize=depth)
    done = object()

    def run():
        try:
            for item in gen:
                q.put(item)
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    while True:
        item = q.get()
        if item is done:
            break
        if isinstance(item, BaseException):
            raise item
        yield item
    t.join()


def check_output(out: Path, force: bool) -> None:
    """The file a conversion will write: not a folder, not an existing file unless forced, in a
    folder that exists; checked before any work."""
    if out.is_dir():
        raise OutputExistsError(f"{out}: is a folder; give the output file's path")
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise EdgeseekError(f"{out.parent}: output folder does not exist")


def copy_metadata(reader, w: GGUFWriter) -> None:
    """Every key of `reader` (gguf-py's GGUFReader) into w but the architecture, which w was made
    with: a file written again with other tensors (requantized, dequantized, a block retrained)."""
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)


@contextmanager
def written_atomically(w: GGUFWriter, out: Path):
    """w's header, metadata and tensor infos into a temporary file beside `out`; the caller writes
    the tensor data to the file object this yields; renamed to `out` at the end, removed on any
    error or Ctrl+C, so that an interrupted conversion leaves no half-written file."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        yield w.fout[0]
        w.close()
        os.replace(tmp, out)
    except BaseException:
        for fo in w.fout or []:
            fo.close()
        tmp.unlink(missing_ok=True)
        raise


def _general_keys(w: GGUFWriter, src: Path, plan: Plan, name: str | None):
    """general.* keys as llama.cpp's converter writes them: name and size label from gguf-py's Metadata
    (model card, folder name), type "model"."""
    g = GGUFWriter(None, w.arch)
    for p in plan.tensors:
        g.add_tensor_info(p.name, p.shape, np.dtype(np.float32), 0, raw_dtype=T.F32)
    total, shared, expert, n_expert = g.get_total_parameter_count()
    meta = gguf.Metadata.load(None, src, name, total)
    if meta.name is None:
        meta.name = src.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)


def convert(src: str | os.PathLike, out: str | os.PathLike, recipe: str = "q8_0", tensor_types=(),
            legacy_mla: bool = False, keep_mtp: bool = False, force: bool = False, threads: int | None = None,
            name: str | None = None, on_start: Callable[[int], None] | None = None,
            on_progress: Callable[[int], None] | None = None) -> Report:
    """Converts the checkpoint folder `src` into the GGUF file `out`; returns the per-tensor report.

    on_start(total_source_bytes) is called once the plan is known, on_progress(bytes) as tensors are
    read (for a progress bar)."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    rec = get_recipe(recipe)
    overrides = parse_overrides(list(tensor_types))
    check_output(out, force)
    if threads:
        import numba
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))

    ckpt = Checkpoint(src)
    ckpt.check_index()
    hf_arch, arch = architecture_of(ckpt)

    arch_keys = GGUFWriter(None, arch.gguf_arch)
    plan = arch.build(ckpt, arch_keys, Options(legacy_mla=legacy_mla, keep_mtp=keep_mtp))
    names = [p.name for p in plan.tensors]
    model = Model(n_layer=arch_keys.kv_data[0][f"{arch.gguf_arch}.block_count"].value,
                  n_expert=ckpt.config.get("n_routed_experts") or 0,
                  n_attn_v=sum(any(s in n for s in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))
                               for n in names),
                  has_output="output.weight" in names)
    types = [choose(rec, p.name, p.shape, model, overrides) for p in plan.tensors]

    w = GGUFWriter(None, arch.gguf_arch)
    _general_keys(w, src, plan, name)
    for k, v in arch_keys.kv_data[0].items():
        if k != "general.architecture":
            w.add_key_value(k, v.value, v.type, sub_type=v.sub_type)
    w.add_file_type(rec.ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    report = Report(str(out), hf_arch, rec.name, int(rec.ftype))
    report.vocab = write_vocab(w, src, ckpt.config, arch.pre_names)

    sizes = []
    for p, t in zip(plan.tensors, types):
        nbytes = gguf.quant_shape_to_byte_shape(p.shape, t)[-1] * int(np.prod(p.shape[:-1], dtype=np.int64))
        sizes.append(nbytes)
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=t)
    total_src = sum(p.source_bytes for p in plan.tensors)
    report.source_bytes = total_src
    if on_start:
        on_start(total_src)

    with written_atomically(w, out) as f:
        align = w.data_alignment
        for p, t, nbytes in zip(plan.tensors, types, sizes):
            f.write(b"\0" * (-f.tell() % align))
            written, err, norm = 0, 0.0, 0.0
            rows_total = int(np.prod(p.shape[:-1], dtype=np.int64))
            rows_done = 0
            for x in _prefetch(p.chunks()):
                q = _quantize(t, x)
                f.write(memoryview(np.ascontiguousarray(q)).cast("B"))
                written += q.nbytes
                e, n = _sq_error(t, x, q)
                err, norm = err + e, norm + n
                if on_progress and rows_total:
                    done = p.source_bytes * (rows_done + x.shape[0]) // rows_total - p.source_bytes * rows_done // rows_total
                    on_progress(done)
                rows_done += x.shape[0]
            if written != nbytes:
                raise EdgeseekError(f"internal: {p.name} wrote {written} bytes, planned {nbytes}")
            report.tensors.append(TensorReport(p.name, list(reversed(p.shape)), t.name, nbytes,
                                               float(np.sqrt(err / norm)) if norm > 0 else 0.0))
    report.output_bytes = out.stat().st_size
    report.seconds = time.perf_counter() - t0
    return report
