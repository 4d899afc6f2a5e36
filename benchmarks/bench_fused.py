"""Fused sweep arms vs one arm after another: wall time and peak RSS of the same sweep.

Two sweeps on the demo's setup (all-MiniLM-L6-v2 on SST-2, batch 32 x 48 tokens):
  (a) 8 LoRA arms, 4 learning rates x 2 seeds;
  (b) 8 head-only arms, 8 learning rates, one seed (one data stream: one shared backbone forward);
  (c) the demo itself (configs/demo.py: five methods x two seeds, so only seeds fuse), full eval.
Each runs twice through scripts/sweep.py in fresh folders: --fuse=off (every arm its own process,
as before) and --fuse=auto (one process for the group). Wall time is the sweep command's; peak
RSS is the largest ``peak_rss_mb`` an arm's run_summary.json records (the fused process's for
every fused arm). Final accuracies are printed side by side (they must agree).

    python benchmarks/bench_fused.py [--steps=40] [--eval_batches=4] [--arms=8] [--sweeps=lora,head,demo]
                                     [--modes=off,auto] [--out=FILE.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = '''
from ftjax.configs import demo
from ftjax.train.fused_plan import with_overrides

def get_config(arg=None):
    c = demo.get_config("steps={steps}")
    return with_overrides(c, {{"method.kind": "{kind}", "eval.max_batches": {eval_batches},
                               "log.tensorboard": False}})

def sweep():
    return {arms}
'''


def _arms(kind: str, n: int) -> list[dict]:
    if kind == "lora":
        lrs = [1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2][: max(1, n // 2)]
        return [{"name": f"lr{lr}-s{s}", "train.learning_rate": lr, "train.seed": s}
                for lr in lrs for s in (0, 1)][:n]
    return [{"name": f"lr{lr}", "train.learning_rate": lr}
            for lr in [1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2][:n]]


def run_sweep(config: Path | str, workdir: Path, fuse: str) -> dict:
    start = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "sweep.py"), f"--config={config}",
                           f"--workdir={workdir}", f"--fuse={fuse}"], capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"sweep --fuse={fuse} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summaries = {p.parent.name: json.loads(p.read_text())
                 for p in sorted((workdir / "arms").glob("*/run_summary.json"))}
    return dict(wall_s=wall, peak_rss_mb=max(s["peak_rss_mb"] for s in summaries.values()),
                accuracy={n: s["final"].get("accuracy") for n, s in summaries.items()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval_batches", type=int, default=4)
    ap.add_argument("--arms", type=int, default=8)
    ap.add_argument("--sweeps", default="lora,head,demo")
    ap.add_argument("--modes", default="off,auto", help="off,auto; one of them: that side only")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-fused-") as tmp:
        for kind in args.sweeps.split(","):
            if kind == "demo":
                config, arms = f"{REPO / 'configs' / 'demo.py'}:steps={args.steps}", 10
            else:
                config, arms = Path(tmp) / f"{kind}.py", args.arms
                config.write_text(CONFIG.format(steps=args.steps, kind=kind, eval_batches=args.eval_batches,
                                                arms=_arms(kind, args.arms)))
            runs = {fuse: run_sweep(config, Path(tmp) / f"{kind}-{fuse}", fuse)
                    for fuse in args.modes.split(",")}
            if len(runs) == 1:
                (mode, run), = runs.items()
                print(f"{kind}: {arms} arms x {args.steps} steps, --fuse={mode}: {json.dumps(run)}",
                      flush=True)
                results[kind] = dict(arms=arms, steps=args.steps, **runs)
                continue
            off, auto = runs["off"], runs["auto"]
            results[kind] = dict(arms=arms, steps=args.steps, separate=off, fused=auto,
                                 speedup=off["wall_s"] / auto["wall_s"],
                                 rss_ratio=auto["peak_rss_mb"] / off["peak_rss_mb"])
            print(f"{kind}: {arms} arms x {args.steps} steps: separate {off['wall_s']:.0f}s "
                  f"(peak RSS {off['peak_rss_mb']:.0f} MB/arm), fused {auto['wall_s']:.0f}s "
                  f"({auto['peak_rss_mb']:.0f} MB): {results[kind]['speedup']:.2f}x, RSS "
                  f"{results[kind]['rss_ratio']:.2f}x", flush=True)
            for name in off["accuracy"]:
                print(f"  {name}: accuracy separate {off['accuracy'][name]:.4f} fused "
                      f"{auto['accuracy'][name]:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
