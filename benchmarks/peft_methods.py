"""Per-method cost on a real model: trainable params, optimizer-state bytes and step time.

    python benchmarks/peft_methods.py --config=configs/smollm2_lm.py --methods=lora,qlora,full

Builds each method's experiment from the config, jits the same train step the loop uses, runs
one warm-up step (compile), then times ``--steps`` steps (``block_until_ready``) on one batch of
``train.batch_size x data.seq_len``. Prints one JSON line per method.
"""

from __future__ import annotations

import json
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from ftjax import sharding
from ftjax.train import optim
from ftjax.train.experiment import build
from ftjax.train.loop import init_state
from ftjax.train.step import make_train_step

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_lm.py")
_METHODS = flags.DEFINE_list("methods", ["lora"], "config.method.kind values to measure")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps after one warm-up step")


def measure(config) -> dict:
    exp = build(config)
    tx = optim.make_optimizer(config.train, **exp.plan.optimizer_kwargs())
    state = init_state(exp, tx)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(make_train_step(exp.graphdef, tx, kind=exp.kind,
                                   grad_mask_fn=exp.plan.grad_mask_fn),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    batch = sharding.shard_batch(next(exp.pipe.train_iterator(config.train.batch_size)), exp.mesh)
    t0 = time.time()
    state, m = step(state, exp.frozen, batch)
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    t0 = time.time()
    for _ in range(_STEPS.value):
        state, m = step(state, exp.frozen, batch)
    jax.block_until_ready(m)
    return dict(trainable_params=exp.num_trainable,
                trainable_pct=round(100 * exp.num_trainable / exp.num_total, 3),
                opt_state_bytes=sum(x.nbytes for x in jax.tree.leaves(state.opt_state)),
                step_s=round((time.time() - t0) / _STEPS.value, 3),
                first_step_s=round(compile_s, 1), loss=float(m["loss"]))


def main(_):
    for kind in _METHODS.value:
        config = _CONFIG.value
        config.unlock()
        config.method.kind = kind
        try:
            row = measure(config)
        except ValueError as e:
            row = dict(error=str(e))
        print(json.dumps(dict(method=kind, **row)), flush=True)


if __name__ == "__main__":
    app.run(main)
