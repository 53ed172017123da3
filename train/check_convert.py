"""The distilled checkpoint through both converters: edgeseek's and llama.cpp's convert_hf_to_gguf.py
(the source llama-cpp-python vendors, fetched by the tests' cache helper), F32 and Q8_0; every key
(type and value) and every tensor (type, shape, bytes) compared.

    python train/check_convert.py RUN/hf [--work DIR]

llama.cpp's converter drops the MTP layer (as edgeseek's does without --keep-mtp), so the files
compared are without it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {f.name: (tuple(t.name for t in f.types), f.contents()) for f in r.fields.values()
            if not f.name.startswith("GGUF.")}


def compare(ours: Path, theirs: Path) -> tuple[list[str], list[str], int]:
    a, b = fields(ours), fields(theirs)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    ta = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    bad = [n for n in sorted(set(ta) | set(tb)) if n not in ta or n not in tb
           or ta[n].tensor_type != tb[n].tensor_type or list(ta[n].shape) != list(tb[n].shape)
           or ta[n].data.tobytes() != tb[n].data.tobytes()]
    return keys, bad, len(ta)


def main():
    import models_cache

    from edgeseek.convert.convert import convert
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hf", type=Path)
    p.add_argument("--work", type=Path)
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    src = models_cache.llama_cpp_src()
    failed = False
    for outtype in ("f32", "q8_0"):
        theirs = work / f"llama.cpp-{outtype}.gguf"
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(a.hf), "--outtype", outtype,
                        "--outfile", str(theirs)], check=True, stdout=subprocess.DEVNULL)
        ours = Path(convert(a.hf, work / f"edgeseek-{outtype}.gguf", outtype, force=True).output)
        keys, bad, n = compare(ours, theirs)
        failed |= bool(keys or bad)
        print(f"{outtype}: {n} tensors, {len(fields(ours))} keys; keys differing: {keys or 'none'}; "
              f"tensors differing: {bad or 'none'}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
