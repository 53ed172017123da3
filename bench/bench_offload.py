"""Bigger than RAM: the DeepSeek-V2-Lite-shaped Q4_0 file (8.9 GB) under 4 GB and 3 GB memory
cgroups, from a cold page cache, edgeseek (expert cache within --ram-budget) against llama.cpp
(whole-file mmap, weight repacking off: its best configuration when the model exceeds RAM), same
threads, same run.

    python bench/bench_offload.py [--limits 4G 3G] [--decode 32] [--kind q4_0]

Each run is its own process inside a fresh cgroup v1 memory group (root), after dropping the page
cache. Reported: decode tokens/s over N tokens of a fixed random sequence, disk bytes read per
token, expert-cache hit rate, peak memory of the group (memory.max_usage_in_bytes: anonymous memory
and page cache) and whether the OOM killer struck. edgeseek's budget is 80% of the limit (mapped
library pages and the page cache of what it reads also count against the group). Writes
bench/results/offload.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CGROUP = Path("/sys/fs/cgroup/memory")
sys.path.insert(0, str(HERE))

from bench_runtime import drop_caches  # noqa: E402
from edgeseek.budget import format_size, parse_size  # noqa: E402


def in_cgroup(limit: int, args: list[str]) -> dict:
    group = CGROUP / f"edgeseek-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        drop_caches()
        cmd = " ".join([sys.executable, str(HERE / "offload_side.py"), *args])
        done = subprocess.run(["sh", "-c", f"echo $$ > {group}/cgroup.procs && exec {cmd}"],
                              capture_output=True, text=True)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
    finally:
        group.rmdir()
    result = {"exit": done.returncode, "cgroup_peak_bytes": peak, "oom_kills": int(oom.get("oom_kill", 0))}
    if done.returncode == 0:
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    else:
        result["stderr"] = done.stderr[-2000:]
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limits", nargs="+", default=["4G", "3G"])
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--kind", default="q4_0")
    p.add_argument("--out", type=Path, default=HERE / "results" / "offload.json")
    a = p.parse_args()
    model = HERE / "data" / f"v2lite-{a.kind}.gguf"
    if not model.exists():
        subprocess.run([sys.executable, str(HERE / "make_v2lite.py"), "--kinds", a.kind], check=True)
    rows = []
    for limit_text in a.limits:
        limit = parse_size(limit_text)
        budget = str(int(limit * 0.8))
        runs = {
            "llama.cpp": ["llama.cpp", str(model), "--decode", str(a.decode)],
            "edgeseek": ["edgeseek", str(model), "--budget", budget, "--decode", str(a.decode)],
            "edgeseek+prefetch": ["edgeseek", str(model), "--budget", budget, "--decode", str(a.decode),
                                  "--prefetch"],
        }
        for name, args in runs.items():
            r = in_cgroup(limit, args)
            r.update(engine=name, limit=limit_text, model=model.name, file_bytes=model.stat().st_size)
            print(json.dumps(r), file=sys.stderr)
            rows.append(r)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"runs": rows, "decode_tokens": a.decode, "threads": 2}, indent=1))
    print("| limit | engine | decode tok/s | vs llama.cpp | disk read / token | hit rate | group peak | OOM |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["limit"] == r["limit"] and x["engine"] == "llama.cpp")
        tps = r.get("decode_tps")
        ratio = f"{tps / base['decode_tps']:.2f}x" if tps and base.get("decode_tps") else "-"
        hit = r.get("experts", {}).get("expert_hit_rate")
        print(f"| {r['limit']} | {r['engine']} | {tps:.2f} | {ratio} | "
              f"{format_size(r.get('disk_read_per_token', 0))} | {'-' if hit is None else f'{100 * hit:.0f}%'} | "
              f"{format_size(r['cgroup_peak_bytes'])} | {r['oom_kills']} |" if tps else
              f"| {r['limit']} | {r['engine']} | failed (exit {r['exit']}) | - | - | - | "
              f"{format_size(r['cgroup_peak_bytes'])} | {r['oom_kills']} |")


if __name__ == "__main__":
    main()
