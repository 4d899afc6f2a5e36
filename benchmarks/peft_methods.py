"""Every registered fine-tuning method on one config: trainable params, step time and peak memory.

    python benchmarks/peft_methods.py                    # configs/demo.py (MiniLM, SST-2, 32 x 48)
    python benchmarks/peft_methods.py --config=configs/smollm2_lm.py --methods=lora,qlora,full
    python benchmarks/peft_methods.py --quick            # demo at batch 8 x 16, 2 timed steps

The methods are the registry's (``ftjax.peft.registry.methods()``), so a new method module gets
its row by existing; ``--methods`` picks some, ``--set KEY=VALUE`` (repeatable) changes the config
for every row (e.g. ``--set method.lora.rank=16``). Each method runs in a fresh process: it builds
the experiment as ``scripts/train.py`` does (``train.experiment.build``), compiles the loop's train
step ahead of time, runs it once (the first step), then times ``--steps`` more steps on one batch,
each to completion. Reported per method: trainable parameters, optimizer state, the median step
time, the first step (trace + compile + run), XLA's memory for the compiled step (arguments +
outputs + temporaries - donated aliases) and the process's peak memory (peak RSS on CPU; the
device's ``peak_bytes_in_use`` where the runtime reports it). A method the model cannot take (a
head-only run on a tied LM head) is a row with its error.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _common  # noqa: E402

SCRIPT = Path(__file__).resolve()
DEFAULT_CONFIG = "configs/demo.py"
QUICK_CONFIG = "configs/demo.py:steps=2,batch=8,seq_len=16"
MIB = 2 ** 20


def _value(text: str) -> Any:
    """A ``--set`` value: a Python literal when it parses as one, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _config(config_arg: str, method: str, overrides: dict[str, Any]):
    from ftjax.experiments.sweep import load_config_module
    from ftjax.train.fused_plan import with_overrides

    path, _, arg = config_arg.partition(":")
    config = load_config_module(_common.REPO / path).get_config(arg or None)
    return with_overrides(config, {**overrides, "method.kind": method})


def _peak_device_mib(device: Any) -> float | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats["peak_bytes_in_use"] / MIB if stats and "peak_bytes_in_use" in stats else None


def worker(spec: dict[str, Any]) -> None:
    import jax
    from ftjax import sharding
    from ftjax.train import optim
    from ftjax.train.experiment import build
    from ftjax.train.loop import init_state
    from ftjax.train.step import make_train_step

    config = _config(spec["config"], spec["method"], spec["overrides"])
    try:
        exp = build(config)
    except ValueError as e:  # the method cannot take this model (head-only on a tied LM head)
        _common.emit(dict(error=str(e).splitlines()[0]))
        return
    tx = optim.make_optimizer(config.train, **exp.plan.optimizer_kwargs())
    state = init_state(exp, tx)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(make_train_step(exp.graphdef, tx, kind=exp.kind, grad_accum=config.train.grad_accum,
                                   schedule=optim.schedule_shape(config.train),
                                   step_hook=exp.plan.step_hook),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    batch = sharding.shard_batch(next(exp.pipe.train_iterator(config.train.batch_size)), exp.mesh)
    optimizer_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))

    t0 = time.perf_counter()
    compiled = step.lower(state, exp.frozen, batch).compile()
    state, metrics = compiled(state, exp.frozen, batch)
    jax.block_until_ready((state, metrics))
    first_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                 - mem.alias_size_in_bytes) if mem is not None else None
    times, losses = [], [float(metrics["loss"])]
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        state, metrics = compiled(state, exp.frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    device = jax.local_devices()[0]
    _common.emit(dict(
        trainable=exp.num_trainable, total=exp.num_total, optimizer_bytes=optimizer_bytes,
        step_s=statistics.median(times), step_times_s=times, first_step_s=first_s,
        xla_step_mib=xla_bytes / MIB if xla_bytes is not None else None,
        peak_rss_mib=_common.peak_rss_mb(), peak_device_mib=_peak_device_mib(device),
        device=device.device_kind, devices=jax.device_count(), losses=losses,
        batch=config.train.batch_size, seq_len=config.data.seq_len))


def _row(method: Any, r: dict[str, Any]) -> list[Any]:
    peft = method.peft.peft_type if method.peft else ""
    if "error" in r:
        return [method.name, peft, None, None, None, None, None, None, r["error"].splitlines()[-1][:90]]
    peak = r["peak_device_mib"] if r["peak_device_mib"] is not None else r["peak_rss_mib"]
    return [method.name, peft, f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%)",
            r["optimizer_bytes"] / MIB, 1000 * r["step_s"], r["first_step_s"], r["xla_step_mib"],
            peak, f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"config file[:arg] (default {DEFAULT_CONFIG})")
    p.add_argument("--methods", default="", help="comma-separated config.method.kind values "
                   "(default: every registered method)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after the first (default 5)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted config override for every method")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_CONFIG}, 2 timed steps")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import json
        return worker(json.loads(args.worker))

    from ftjax.peft import registry
    config_arg = args.config or (QUICK_CONFIG if args.quick else DEFAULT_CONFIG)
    steps = args.steps or (2 if args.quick else 5)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = _value(value)
    chosen = [registry.get(m.strip()) for m in args.methods.split(",") if m.strip()]
    runs, rows = [], []
    for method in chosen or list(registry.methods()):
        spec = dict(config=config_arg, method=method.name, overrides=overrides, steps=steps)
        r = _common.run_worker(SCRIPT, spec)
        r.update(method=method.name)
        runs.append(r)
        rows.append(_row(method, r))
        print(f"{method.name:12s} " + (r["error"].splitlines()[-1] if "error" in r else
              f"step {1000 * r['step_s']:.0f} ms, peak {rows[-1][7]:.0f} MiB"), flush=True)
    done = next((r for r in runs if "error" not in r), {})
    setup = (f"`{config_arg}`" + "".join(f" `{k}={v}`" for k, v in overrides.items())
             + (f", batch {done['batch']} x {done['seq_len']} tokens, {done['devices']} "
                f"{done['device']} device(s)" if done else "") + f", {steps} timed steps")
    peak = "peak device MiB" if done.get("peak_device_mib") is not None else "peak RSS MiB"
    table = _common.markdown_table(
        ["method", "PEFT format", "trainable params", "optimizer state MiB", "step ms (median)",
         "first step s", "XLA step MiB", peak, "loss first -> last"], rows)
    md = f"### Fine-tuning methods: {setup}\n\n{table}\n"
    payload = dict(machine=_common.machine(), config=config_arg, overrides=overrides, steps=steps,
                   runs=runs)
    name = "peft_methods_quick" if args.quick else "peft_methods"
    print(_common.write_results(name, payload, md).read_text())


if __name__ == "__main__":
    main()
