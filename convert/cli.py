"""`edgeseek convert`: the Typer command over edgeseek.convert.convert, with a rich progress bar on
stderr and the per-tensor report (a table, or JSON on stdout)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .recipes import RECIPES


def _progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("NO_COLOR")


def convert_command(
    src: Path = typer.Argument(..., help="Hugging Face checkpoint folder: config.json, *.safetensors "
                               "(sharded with model.safetensors.index.json or single), tokenizer.json, "
                               "tokenizer_config.json."),
    output: Path = typer.Option(..., "-o", "--output", help="GGUF file to write."),
    type_: str = typer.Option("q8_0", "-t", "--type", help="Recipe: " + ", ".join(RECIPES) + "."),
    tensor_type: Optional[List[str]] = typer.Option(
        None, "--tensor-type", help="REGEX=TYPE: tensors whose GGUF name matches REGEX get TYPE (f32, f16, bf16, "
        "q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k); repeatable, first match wins."),
    legacy_mla: bool = typer.Option(False, "--legacy-mla", help="DeepSeek: write attn_kv_b (the pre-MLA layout) "
                                    "instead of attn_k_b / attn_v_b."),
    keep_mtp: bool = typer.Option(False, "--keep-mtp", help="DeepSeek-V3: keep the multi-token-prediction layers "
                                  "(as nextn blocks); skipped by default."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output file if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the per-tensor report as JSON on stdout."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Quantizer threads (default: all cores)."),
):
    """Convert a Hugging Face checkpoint into a GGUF file that edgeseek and llama.cpp load.

    Tensors are read, quantized and written one at a time, so memory stays near one tensor whatever the
    model size; the file appears at OUTPUT only once complete. Input dtypes: F32, F16, BF16 and FP8 e4m3
    with weight_scale_inv block scales (DeepSeek-V3/R1).

    Examples:

        edgeseek convert ./DeepSeek-V2-Lite-Chat -o v2lite-q4_k_m.gguf --type q4_k_m

        edgeseek convert ./DeepSeek-R1 -o r1-q4_k_m.gguf -t q4_k_m --tensor-type 'ffn_down_exps=q6_k'

        edgeseek convert ./Qwen2.5-0.5B -o qwen.gguf -t q8_0 --json > report.json
    """
    from .convert import convert

    progress = None
    task = None
    if _progress_enabled():
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        progress = Progress(TextColumn("converting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=True)

    def on_start(total: int):
        nonlocal task
        if progress is not None:
            progress.start()
            task = progress.add_task("convert", total=total)

    def on_progress(n: int):
        if progress is not None and task is not None:
            progress.advance(task, n)

    try:
        report = convert(src, output, recipe=type_, tensor_types=tensor_type or (), legacy_mla=legacy_mla,
                         keep_mtp=keep_mtp, force=force, threads=threads, on_start=on_start,
                         on_progress=on_progress)
    finally:
        if progress is not None:
            progress.stop()

    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    from rich.console import Console
    from rich.table import Table
    console = Console(highlight=False, soft_wrap=True, emoji=False, markup=False)  # paths as they are, unwrapped
    table = Table("tensor", "shape", "type", "MB", "rel. error", box=None)
    for t in report.tensors:
        table.add_row(t.name, "x".join(map(str, t.shape)), t.type, f"{t.bytes / 1e6:.2f}",
                      f"{t.rel_error:.2e}" if t.rel_error else "0")
    console.print(table)
    console.print(f"{report.output}: {report.architecture} -> {report.recipe}, {len(report.tensors)} tensors, "
                  f"{report.output_bytes / 1e9:.2f} GB from {report.source_bytes / 1e9:.2f} GB in "
                  f"{report.seconds:.1f} s; tokenizer pre {report.vocab['pre']!r}")


def convert_lora_command(
    peft_dir: Path = typer.Argument(..., help="PEFT LoRA adapter folder: adapter_config.json and "
                                    "adapter_model.safetensors."),
    base: Path = typer.Option(..., "--base", help="The base model's Hugging Face checkpoint folder (config.json, "
                              "*.safetensors): names and shapes come from it."),
    output: Path = typer.Option(..., "-o", "--output", help="Adapter GGUF file to write."),
    type_: str = typer.Option("f16", "-t", "--type", help="Tensor type: f32, f16 or q8_0 (q8_0 falls back to f16 "
                              "where a row is no multiple of 32, as llama.cpp does)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output file if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the per-tensor report as JSON on stdout."),
):
    """Convert a PEFT LoRA adapter into llama.cpp's adapter GGUF, which `--lora` (and llama.cpp's --lora) applies to the base model's GGUF at run time.

    The same keys and tensors as llama.cpp's convert_lora_to_gguf.py: attention, dense and shared FFN, routed experts (stacked), embedding and output head. DeepSeek's kv_b_proj has no adapter layout (llama.cpp fails on it too).

    Examples:

        edgeseek convert-lora ./my-lora --base ./DeepSeek-V2-Lite-Chat -o my-lora.gguf

        edgeseek convert-lora ./sql-lora --base ./Qwen2.5-0.5B -o sql.gguf -t q8_0

        edgeseek chat qwen.gguf --lora sql.gguf:0.8
    """
    from .lora import convert_lora

    report = convert_lora(peft_dir, base, output, type_, force=force)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    from rich.console import Console
    console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False, markup=False)
    size = report.output_bytes
    console.print(f"{report.output}: {report.architecture} LoRA, rank {report.rank}, alpha {report.alpha:g}, "
                  f"{len(report.tensors) // 2} adapted weights, {size / 1e6:.2f} MB in {report.seconds:.1f} s")
