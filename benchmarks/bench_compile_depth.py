"""Compile time vs depth: the same width (SmolLM2-135M's) at 2, 8 and 32 layers, scan on and off.

    python benchmarks/bench_compile_depth.py           # depths 2,8,32; scan on and off
    python benchmarks/bench_compile_depth.py --quick   # depths 2,8

Each point is a fresh process: random init from the ``smollm2-135m`` preset with ``num_layers``
overridden, then the full train step (forward, backward, AdamW) traced, lowered and compiled
ahead of time, then run once. Reported: trace + lower, XLA compile, the first run, their sum
(time to first step), and the ratio of trace + compile to the 2-layer figure of the same mode.
With ``scan`` the compiled program holds one layer whatever the depth, so its compile time
should stay nearly flat; unrolled, it grows with depth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _common  # noqa: E402

SCRIPT = Path(__file__).resolve()
PRESET = "smollm2-135m"
BATCH, SEQ = 1, 128  # small, so the first run does not hide the compile


def worker(spec: dict[str, Any]) -> None:
    import jax
    import numpy as np
    from ftjax import sharding
    from ftjax.models import registry

    family, cfg = registry.get_preset(PRESET)
    cfg = dataclasses.replace(cfg, num_layers=spec["layers"], scan_layers=spec["scan"])
    mesh = sharding.make_mesh({"fsdp": 1})
    model = registry.init_sharded(lambda rngs: family.build(cfg, "causal_lm", 0, rngs), mesh)
    stream = np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, SEQ + 1), dtype=np.int32)
    trainer = _common.FtjaxTrainer(model, _common.lm_batch(stream), mesh)

    t0 = time.perf_counter()
    lowered = trainer.step_fn.trace(trainer.state, trainer.frozen, trainer.batch).lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state, metrics = compiled(trainer.state, trainer.frozen, trainer.batch)
    jax.block_until_ready((state, metrics))
    t3 = time.perf_counter()
    _common.emit(dict(spec, trace_lower_s=t1 - t0, compile_s=t2 - t1, first_run_s=t3 - t2,
                      first_step_s=t3 - t0, loss=float(metrics["loss"]),
                      hlo_kb=len(lowered.as_text()) / 1024))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="depths 2 and 8 only")
    p.add_argument("--depths", default="2,8,32")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    depths = [2, 8] if args.quick else [int(d) for d in args.depths.split(",")]
    runs = []
    for scan in (True, False):
        for layers in depths:
            r = _common.run_worker(SCRIPT, dict(layers=layers, scan=scan))
            r.update(layers=layers, scan=scan)
            runs.append(r)
            print(json.dumps(r)[:300], flush=True)
    rows = []
    for r in runs:
        base = next(b for b in runs if b["scan"] == r["scan"] and b["layers"] == depths[0])
        ok = "error" not in r and "error" not in base
        compile_s = r["trace_lower_s"] + r["compile_s"] if ok else None
        ratio = compile_s / (base["trace_lower_s"] + base["compile_s"]) if ok else None
        rows.append(["on" if r["scan"] else "off", r["layers"], r.get("trace_lower_s"),
                     r.get("compile_s"), r.get("first_run_s"), r.get("first_step_s"),
                     f"{ratio:.2f}x" if ratio else r.get("error", "")[-80:], r.get("hlo_kb")])
    table = _common.markdown_table(
        ["scan", "layers", "trace+lower s", "compile s", "first run s", "time to first step s",
         f"trace+compile vs {depths[0]} layers", "HLO KiB"], rows)
    payload = dict(machine=_common.machine(), preset=PRESET, batch=BATCH, seq=SEQ, runs=runs)
    md = (f"### Compile time vs depth ({PRESET} width, batch {BATCH} x {SEQ}, train step)\n\n"
          f"{table}\n")
    print(_common.write_results("compile_depth_quick" if args.quick else "compile_depth",
                                payload, md).read_text())


if __name__ == "__main__":
    main()
