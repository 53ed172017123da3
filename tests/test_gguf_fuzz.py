"""Damaged GGUF headers never end in a traceback, a hang or a signal.

A few hundred seeded mutations of a real file's header (the DeepSeek V3 fixture: full tokenizer
section, MoE tensors): counts, lengths, type ids, dimensions, offsets, scalar values and string
bytes (invalid UTF-8 among them). Each damaged file goes through `edgeseek inspect` and
`edgeseek generate` (load, template, prefill, one decode step) and must either succeed or exit 1
with one line 'error: <file>: ...'.

The cases run in one child process (this file run as a script) under a time limit: a hang, even
inside a compiled kernel, or a crash by a signal fails the test instead of blocking or killing the
test run. Inside the child each case also has its own alarm, so a slow case is named.
"""
from __future__ import annotations

import atexit
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gguf_patch as G
from edgeseek.app.cli import app

FIXTURE = Path(__file__).parent / "fixtures" / "deepseek2" / "v3-q8_0.gguf"
SEED, CASES = 20261203, 300
CASE_SECONDS = 30  # a case takes ~0.05 s; one whose expert count is new may compile a kernel (seconds)
CHILD_SECONDS = 300

# Values that break counts, lengths and offsets, beside the field's own value nudged.
EDGES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1]
FLOATS = [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e38, 1e-38]
BAD_UTF8 = [0xFF, 0x80, 0xC3, 0xED, 0xF8, 0x00]


def mutate(data: bytearray, parts: list, rng: random.Random) -> list[str]:
    """Damages 1 to 3 fields of `data` in place; returns what was done, for the failure report."""
    roles = sorted({p.role for p in parts})
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        role = rng.choice(roles + ["any byte"])
        if role == "any byte":
            at = rng.randrange(4, parts[-1].offset + parts[-1].size)
            data[at] ^= 1 << rng.randrange(8)
            done.append(f"bit flip at byte {at}")
            continue
        p = rng.choice([q for q in parts if q.role == role])
        what = f"{role} of {p.owner or 'the header'}" + (f"[{p.index}]" if p.index >= 0 else "")
        if role in ("str", "key", "name", "array_data") or (role == "scalar" and p.size not in (4, 8)):
            if not p.size:
                continue
            at = p.offset + rng.randrange(p.size)
            data[at] = rng.choice(BAD_UTF8 + [rng.randrange(256)])
            done.append(f"{what}: byte {at - p.offset} = 0x{data[at]:02x}")
        elif role == "scalar" and p.vtype in (6, 12):  # float32, float64
            v = rng.choice(FLOATS)
            struct.pack_into("<f" if p.vtype == 6 else "<d", data, p.offset, v)
            done.append(f"{what} = {v}")
        else:
            old = G.get_int(data, p)
            if role in ("value_type", "array_type", "tensor_type"):
                v = rng.choice([rng.randrange(40), old + 1, old - 1, 2**32 - 1])
            else:
                v = rng.choice(EDGES + [old + 1, old - 1, old * 2, old // 2, old ^ (1 << rng.randrange(8 * p.size)),
                                        rng.getrandbits(8 * p.size)])
            G.put_int(data, p, v)
            done.append(f"{what}: {old} -> {G.get_int(data, p)}")
    return done


def _judge(result, path: Path) -> str | None:
    """None when the run succeeded or failed the way a user should see: exit 1, one line."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return "raised " + "".join(traceback.format_exception(*result.exc_info))[-1500:]
    if result.exit_code == 0:
        return None
    lines = result.stderr.splitlines()
    if result.exit_code != 1 or len(lines) != 1 or not lines[0].startswith(f"error: {path}: "):
        return f"exit {result.exit_code}, stderr {result.stderr[-600:]!r}"
    return None


def _child(work: Path) -> None:
    """Runs every case; prints one JSON line per run (and one before each case starts)."""
    os.environ["EDGESEEK_CACHE"] = str(work / "cache")  # expert profiles of damaged files land here
    closers = []
    register = atexit.register

    def engine_close_now(f, *args, **kwargs):  # the CLI registers each engine's close for exit
        if type(getattr(f, "__self__", None)).__name__ == "Engine":
            closers.append(f)
            return f
        return register(f, *args, **kwargs)

    atexit.register = engine_close_now

    class Hang(Exception):
        pass

    def alarm(signum, frame):
        raise Hang(f"ran past {CASE_SECONDS} s")

    signal.signal(signal.SIGALRM, alarm)
    runner = CliRunner()
    pristine = FIXTURE.read_bytes()
    parts = G.layout(pristine)
    rng = random.Random(SEED)
    for case in range(-1, CASES):  # -1: the undamaged file, which must work
        data = bytearray(pristine)
        done = mutate(data, parts, rng) if case >= 0 else []
        path = work / f"case{case}.gguf"
        path.write_bytes(data)
        print(json.dumps({"case": case, "start": done}), flush=True)
        for command in (["inspect"], ["generate", "-p", "Hello", "-n", "2", "--temp", "0", "--ctx", "64"]):
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS if case >= 0 else CHILD_SECONDS)
            try:
                r = runner.invoke(app, [command[0], str(path), *command[1:]])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            problem = _judge(r, path)
            if case < 0 and r.exit_code != 0:
                problem = f"the undamaged file failed: {r.stderr[-600:]!r}"
            print(json.dumps({"case": case, "command": command[0], "mutations": done, "exit": r.exit_code,
                              "seconds": round(time.perf_counter() - t0, 3), "problem": problem}), flush=True)
        for close in closers:
            close()
        closers.clear()
        path.unlink()


def test_damaged_headers_end_cleanly(tmp_path):
    t0 = time.perf_counter()
    try:
        child = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True,
                               timeout=CHILD_SECONDS, cwd=Path(__file__).parent)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        started = [line for line in out.splitlines() if '"start"' in line]
        pytest.fail(f"the cases ran past {CHILD_SECONDS} s; the last one started: {started[-1:]}")
    records = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    assert child.returncode == 0, (f"the child ended with {child.returncode} (a signal if negative) during "
                                   f"{records[-1:]}; stderr: {child.stderr[-2000:]}")
    runs = [r for r in records if "command" in r]
    problems = [r for r in runs if r["problem"]]
    assert not problems, "\n\n".join(f"case {r['case']} {r['command']} {r['mutations']}: {r['problem']}"
                                     for r in problems[:5])
    assert len(runs) == 2 * (CASES + 1)
    # The mutations reach every stage: some files are refused on opening, some on loading, some run.
    ok = {c: sum(r["exit"] == 0 for r in runs if r["command"] == c and r["case"] >= 0)
          for c in ("inspect", "generate")}
    assert CASES // 20 < ok["generate"] < ok["inspect"] < CASES * 0.9, ok
    slowest = max(r["seconds"] for r in runs if r["case"] >= 0)
    print(f"{CASES} cases in {time.perf_counter() - t0:.1f} s; ran: {ok}; slowest run {slowest:.2f} s")


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
