"""scripts/plan.py's CPU estimates against measured training runs: step time and peak memory.

    python benchmarks/check_plan.py                    # full, lora, head on configs/demo.py, 30 steps
    python benchmarks/check_plan.py --methods=bitfit   # another method, e.g. one not used to set the MFU
    python benchmarks/check_plan.py --quick            # 4 steps at batch 8 x 16 (a smoke run)

The parent measures this machine's matmul rate once (``hardware.cpu_matmul_flops``) and plans each
method as ``scripts/plan.py --hardware=cpu`` does. Each method then trains in a fresh process with
``ftjax.train.loop.train`` (the demo's config, every batch padded to ``seq_len`` by one bucket so
the step compiles once, eval cut to one batch). Measured step time: the median over the logged
windows of ``batch * seq_len / tokens_per_sec`` (``metrics.jsonl``; the loop's windows start
after the first step, so compile is excluded). Measured memory: the process's largest RSS sampled
(every 10 ms) between the first and the last train row (compiled, stepping; before the final eval
and checkpoint) minus its RSS just before the run was built (imports and the runtime). The run's
peak (``ru_maxrss`` to the last train row, minus the same baseline) is reported beside it: it
adds the compiler's and the weight loading's transient memory, which no device estimate covers.
Within 30% is the issue's bar.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _common  # noqa: E402

SCRIPT = Path(__file__).resolve()
MIB = 2 ** 20


def _config(spec: dict[str, Any]):
    from ftjax.configs import demo
    from ftjax.train.fused_plan import with_overrides

    arg = f"steps={spec['steps']},batch={spec['batch']},seq_len={spec['seq_len']}"
    overrides = {"method.kind": spec["method"], "data.buckets": [spec["seq_len"]],
                 "eval.max_batches": 1, "log.every_steps": spec["every"],
                 "train.learning_rate": demo.LEARNING_RATES.get(spec["method"], 1e-3)}
    return with_overrides(demo.get_config(arg), overrides)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(spec: dict[str, Any]) -> None:
    import jax
    import jax.numpy as jnp
    from ftjax.train.loop import train

    jax.block_until_ready(jnp.ones(4) + 1)  # the runtime is up before the baseline
    config = _config(spec)
    workdir = Path(tempfile.mkdtemp(prefix="check_plan_"))
    metrics = workdir / "metrics.jsonl"
    samples, done = [], threading.Event()

    def sample():  # (bytes of metrics.jsonl, peak RSS so far, RSS now), every 10 ms
        while not done.is_set():
            samples.append((metrics.stat().st_size if metrics.exists() else 0, _peak_rss_bytes(),
                            _common.rss_mb() * MIB))
            time.sleep(0.01)

    baseline = _common.rss_mb() * MIB
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    train(config, str(workdir))
    done.set()
    thread.join()
    train_rows, offset, first, last = [], 0, None, 0
    for line in metrics.read_bytes().splitlines(keepends=True):
        row = json.loads(line)
        if "train/tokens_per_sec" in row:
            train_rows.append(row)
            first = offset if first is None else first
            last = offset  # the file's size before the last train row was written
        offset += len(line)
    run = [peak for size, peak, _ in samples if size <= last]
    steady = [now for size, _, now in samples if first < size <= last]  # compiled, stepping
    tokens = spec["batch"] * spec["seq_len"]
    _common.emit(dict(
        step_s=statistics.median(tokens / r["train/tokens_per_sec"] for r in train_rows),
        step_times_s=[tokens / r["train/tokens_per_sec"] for r in train_rows],
        memory_bytes=max(steady) - baseline, run_peak_bytes=max(run) - baseline,
        baseline_bytes=baseline,
        peak_rss_bytes=_peak_rss_bytes(), windows=len(train_rows)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,lora,head")
    p.add_argument("--quick", action="store_true", help="4 steps at batch 8 x 16")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    from ftjax.train import hardware, planner
    size = dict(steps=4, batch=8, seq_len=16, every=2) if args.quick else dict(
        steps=30, batch=32, seq_len=48, every=5)
    matmul = hardware.cpu_matmul_flops()
    hw = hardware.get("cpu")
    print(f"matmul {matmul / 1e9:.1f} GFLOP/s; MFU {hw.mfu}", flush=True)
    runs, rows = [], []
    for method in args.methods.split(","):
        spec = dict(method=method, **size)
        config = _config(spec)
        est = planner.plan([(method, config)], hw, hw.mfu)[0]
        r = _common.run_worker(SCRIPT, spec)
        if "error" in r:
            print(f"{method}: {r['error']}", flush=True)
            runs.append(dict(method=method, **r))
            continue
        est_step = est.seconds / config.train.steps
        # The MFU that would have made the step time exact (not used for the estimate).
        achieved = hw.mfu * est_step / r["step_s"]
        runs.append(dict(method=method, estimate_step_s=est_step, estimate_memory_bytes=est.memory.total,
                         flops_per_step=est.flops.total, achieved_mfu=achieved, **r))
        rows.append([method, f"{est.trainable:,}", est.flops.total / 1e9, est_step, r["step_s"],
                     f"{100 * (est_step / r['step_s'] - 1):+.0f}%", est.memory.total / MIB,
                     r["memory_bytes"] / MIB, f"{100 * (est.memory.total / r['memory_bytes'] - 1):+.0f}%",
                     r["run_peak_bytes"] / MIB, achieved])
        print(rows[-1], flush=True)
    table = _common.markdown_table(
        ["method", "trainable", "GFLOP/step", "est. step s", "measured step s", "step err",
         "est. MiB", "measured MiB (stepping)", "memory err", "run peak MiB (compile, load)",
         "MFU that fits"], rows)
    md = (f"### plan.py vs measured, configs/demo.py, batch {size['batch']} x {size['seq_len']}, "
          f"{size['steps']} steps, cpu: matmul {matmul / 1e9:.1f} GFLOP/s, MFU {hw.mfu}\n\n{table}\n")
    payload = dict(machine=_common.machine(), matmul_flops=matmul, mfu=hw.mfu, size=size, runs=runs)
    print(_common.write_results("plan_check_quick" if args.quick else "plan_check", payload, md)
          .read_text())


if __name__ == "__main__":
    main()
