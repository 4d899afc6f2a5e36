"""How long the train loop waits for its next batch, with the background prefetch off and on.

    python benchmarks/bench_input.py                      # 256 x 2048 tokens, prefetch 0 and 2
    python benchmarks/bench_input.py --batch=8 --seq=128 --steps=3 --grad-accum=1   # smoke

``train.loop.train`` on configs/tiny.py (the random-init 2-layer LM, SST-2 text packed into
``--seq``-token rows), one fresh process per ``--prefetch`` value, interleaved over ``--rounds``.
The loop's batch source is wrapped to time every ``next()``: the time the step loop is blocked
on the host building the batch (rows gathered and padded in Python, then
``make_array_from_process_local_data``). Also timed: one batch built and transferred alone (the
host cost per step), and the loop's wall time per step after the first. ``log.every_steps=1``
makes every step end in a device-to-host read, so no step overlaps the next through JAX's async
dispatch alone. ``--grad-accum`` splits the batch so the step's ``[rows, T, 30522]`` logits fit
in memory; it does not change the batch the host builds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _common  # noqa: E402

SCRIPT = Path(__file__).resolve()


def worker(spec: dict[str, Any]) -> None:
    """One ``train()`` run with ``train.prefetch=spec['prefetch']``, its batch waits timed."""
    from ftjax import sharding
    from ftjax.configs.tiny import get_config
    from ftjax.data.prefetch import Prefetcher
    from ftjax.train import loop
    from ftjax.train.experiment import build

    c = get_config(f"steps={spec['steps']}")
    c.data.seq_len, c.train.batch_size = spec["seq"], spec["batch"]
    c.train.grad_accum, c.train.prefetch = spec["grad_accum"], spec["prefetch"]
    c.mesh.update(dict(data=1, fsdp=1, tensor=1, num_devices=1))
    c.log.every_steps, c.checkpoint.every_steps = 1, 10 ** 6
    c.checkpoint.async_save = False
    c.eval.max_batches, c.eval.batch_size = 1, 4

    # The host cost of one batch, alone: gather + pad the rows, then put them on the device.
    exp = build(c)
    it = exp.pipe.train_iterator(c.train.batch_size)
    build_s = []
    for _ in range(3):
        start = time.perf_counter()
        sharding.shard_batch(next(it), exp.mesh)["input_ids"].block_until_ready()
        build_s.append(time.perf_counter() - start)
    del exp, it

    waits: list[float] = []

    class Timed(Prefetcher):
        def __next__(self):
            start = time.perf_counter()
            out = super().__next__()
            waits.append(time.perf_counter() - start)
            return out

    loop.Prefetcher = Timed
    workdir = Path(tempfile.mkdtemp(prefix="bench_input_"))
    start = time.perf_counter()
    loop.train(c, workdir)
    wall = time.perf_counter() - start
    steady = waits[1:]  # the first wait also starts the thread and fills nothing ahead
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/tokens_per_sec"] for r in rows if "train/tokens_per_sec" in r]  # steps 2..
    tokens = c.train.batch_size * c.data.seq_len
    _common.emit(dict(spec, build_s=statistics.median(build_s), wait_s=statistics.median(steady),
                      wait_max_s=max(steady), waits=waits, wall_s=wall,
                      step_s=statistics.median([tokens / x for x in rates]) if rates else None,
                      peak_rss_mb=_common.peak_rss_mb()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--grad-accum", type=int, default=64)
    p.add_argument("--prefetch", default="0,2", help="comma-separated train.prefetch values")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    runs, start = [], time.perf_counter()
    depths = [int(x) for x in args.prefetch.split(",")]
    for rnd in range(args.rounds):
        for depth in depths if rnd % 2 == 0 else depths[::-1]:
            spec = dict(batch=args.batch, seq=args.seq, steps=args.steps, grad_accum=args.grad_accum,
                        prefetch=depth, round=rnd)
            r = _common.run_worker(SCRIPT, spec)
            r.update(spec)
            runs.append(r)
            print(f"round {rnd} prefetch {depth}: " + (f"error: {r['error']}" if "error" in r else
                  f"build {r['build_s'] * 1e3:.1f} ms, wait {r['wait_s'] * 1e3:.2f} ms "
                  f"(max {r['wait_max_s'] * 1e3:.2f}), step {r['step_s']:.2f} s"), flush=True)
    rows = []
    for depth in depths:
        ok = [r for r in runs if r["prefetch"] == depth and "error" not in r]
        if ok:
            med = {k: statistics.median([r[k] for r in ok]) for k in ("build_s", "wait_s", "wait_max_s", "step_s")}
            rows.append([depth, med["build_s"] * 1e3, med["wait_s"] * 1e3, med["wait_max_s"] * 1e3,
                         med["step_s"], len(ok)])
    table = _common.markdown_table(
        ["train.prefetch", "one batch built + transferred, ms", "loop blocked per step, ms (median)",
         "blocked, ms (max)", "step s (median)", "runs"], rows)
    md = (f"### Input pipeline, {args.batch} x {args.seq} tokens, grad_accum {args.grad_accum}\n\n{table}\n")
    payload = dict(machine=_common.machine(), settings=vars(args), wall_s=time.perf_counter() - start,
                   runs=runs)
    print(_common.write_results("input", payload, md).read_text())


if __name__ == "__main__":
    main()
