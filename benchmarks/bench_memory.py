"""Memory of SmolLM2-135M fine-tuning: full vs LoRA vs QLoRA (ftjax), full and LoRA (PyTorch).

    python benchmarks/bench_memory.py           # 3 train steps per row, each a fresh process
    python benchmarks/bench_memory.py --quick   # the same with 2 steps

Rows run the train benchmark's workers (``bench_train.py``: same weights, batch 8 x 128, AdamW)
and report the process's peak RSS, its RSS once the model and optimizer are ready, the optimizer
state's bytes, and, for ftjax, ``ftjax.train.memory``'s estimate of the step's memory; ftjax runs
its default chunked LM loss (``config.train.loss_chunk``), ``ftjax-unchunked`` the full logits. QLoRA here
is ftjax's NF4 (block 64) base with LoRA r=8 on q/v; PyTorch has no CPU QLoRA (bitsandbytes'
4-bit kernels need CUDA), so that row is ftjax only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _common, bench_train  # noqa: E402

ROWS = (("smollm2-full", "ftjax"), ("smollm2-full", "ftjax-unchunked"), ("smollm2-lora", "ftjax"),
        ("smollm2-qlora", "ftjax"),
        ("smollm2-full", "torch"), ("smollm2-lora", "torch"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 steps per row instead of 3")
    args = p.parse_args(argv)
    import tempfile
    batch = Path(tempfile.mkdtemp(prefix="bench_memory_")) / "smollm2.npz"
    np.savez(batch, **bench_train.make_batch(bench_train.CASES["smollm2-full"]))
    runs, rows = [], []
    for case, stack in ROWS:
        spec = dict(case=case, stack=stack, steps=2 if args.quick else 3, round=0, batch=str(batch))
        r = _common.run_worker(bench_train.SCRIPT, spec)
        r.update(case=case, stack=stack)
        runs.append(r)
        print(f"{case:14s} {stack:6s} " + (r["error"].splitlines()[-1] if "error" in r else
              f"peak {r['peak_rss_mb']:.0f} MiB"), flush=True)
        if "error" in r:
            rows.append([case.split("-")[1], stack, None, None, None, None, None, r["error"][-80:]])
            continue
        rows.append([case.split("-")[1], stack, f"{r['trainable']:,}",
                     r["optimizer_bytes"] / 2 ** 20, r["rss_after_load_mb"], r["peak_rss_mb"],
                     r.get("estimate_mb"), f"{r['losses'][0]:.4f}"])
    table = _common.markdown_table(
        ["method", "stack", "trainable params", "optimizer state MiB", "RSS ready MiB",
         "peak RSS MiB", "ftjax estimate MiB", "step-0 loss"], rows)
    md = "### Memory, SmolLM2-135M, batch 8 x 128, float32\n\n" + table + "\n"
    payload = dict(machine=_common.machine(), runs=runs)
    name = "memory_quick" if args.quick else "memory"
    print(_common.write_results(name, payload, md).read_text())


if __name__ == "__main__":
    main()
