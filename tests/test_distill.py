"""The distillation program (train/distill.py) end to end on the CPU at its tiny size: the teacher
rebuilt from SmolLM2's GGUF computes what edgeseek computes on the same weights; data, training
(resumed from its checkpoint), export in the DeepseekV3 layout with the MTP block and the teacher's
tokenizer; edgeseek converts the export with --keep-mtp and decodes it with MTP on, greedy output
equal to MTP off."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "train"))

import distill  # noqa: E402

import edgeseek  # noqa: E402


def test_teacher_from_the_gguf_computes_what_edgeseek_computes(smollm2_path, tmp_path):
    import torch
    from gguf_f32 import dequantized_f32
    teacher, _ = distill.load_teacher(smollm2_path)
    exact = edgeseek.load(dequantized_f32(smollm2_path, tmp_path / "f32.gguf"), mtp="off")
    ids = np.array([1, 504, 3458, 282, 4649, 314])
    ref = exact.model.forward(ids, exact.model.new_cache(), all_logits=True)
    with torch.no_grad():
        got = teacher(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(got - ref).max() < 1e-3 * (ref.max() - ref.min())  # edgeseek's cache is float16


def test_the_pipeline_at_its_tiny_size(smollm2_path, tmp_path):
    run = tmp_path / "run"

    def step(*args):
        r = subprocess.run([sys.executable, str(ROOT / "train" / "distill.py"), *args, "--out", str(run),
                            "--teacher", str(smollm2_path)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    step("data", "--prompts", "4", "--reply", "6", "--gen-batch", "2")
    assert "saved step 2" in step("train", "--size", "tiny", "--steps", "2", "--batch", "2")
    assert "resumed at step 2" in step("train", "--size", "tiny", "--steps", "4", "--batch", "2")
    assert all(p.stat().st_size <= distill.SHARD for p in (run / "ckpt").glob("shard-*.pt"))
    step("export")
    from edgeseek.convert.convert import convert
    gguf = convert(run / "hf", tmp_path / "student.gguf", "f32", force=True, keep_mtp=True).output
    on, off = edgeseek.load(gguf, mtp=1), edgeseek.load(gguf, mtp="off")
    assert on.model.config.n_mtp == 1 and on.model.config.router.gating == 2  # sigmoid routing
    prompt = "Write a poem about rain."
    greedy = edgeseek.SamplerConfig.greedy()
    assert edgeseek.generate(on, prompt, max_tokens=12, sampler=greedy) == \
        edgeseek.generate(off, prompt, max_tokens=12, sampler=greedy)
    teacher = edgeseek.load(smollm2_path)
    assert on.tokenizer.encode("Hello 123 <|im_start|>") == teacher.tokenizer.encode("Hello 123 <|im_start|>")

    # train/tune_mtp.py on the student: its own replies, the block in PyTorch checked against
    # edgeseek's before training, the tuned block written back with every other tensor unchanged
    tune_run = tmp_path / "tune"

    def tune(*args):
        r = subprocess.run([sys.executable, str(ROOT / "train" / "tune_mtp.py"), *args, "--out", str(tune_run)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    assert "6 sequences" in tune("data", str(gguf), "--prompts", "6", "--reply", "8", "--parallel", "3")
    out = tune("train", str(gguf), "--minutes", "0.05", "--batch", "2")
    gap = float(re.search(r"logit difference\| ([0-9.e+-]+)", out).group(1))
    assert gap < 1e-2  # F32 weights; edgeseek's cache is float16
    tuned = tmp_path / "tuned.gguf"
    tune("write", str(gguf), str(tuned))
    from gguf import GGUFReader
    before = {t.name: t for t in GGUFReader(gguf).tensors}
    after = {t.name: t for t in GGUFReader(tuned).tensors}
    assert list(before) == list(after)
    block = f"blk.{on.model.config.n_layer}."
    changed = {n for n in before if not np.array_equal(before[n].data, after[n].data)}
    assert changed and all(n.startswith(block) for n in changed)
    tuned_on = edgeseek.load(tuned, mtp=1)
    assert edgeseek.generate(tuned_on, prompt, max_tokens=12, sampler=greedy) == \
        edgeseek.generate(off, prompt, max_tokens=12, sampler=greedy)
