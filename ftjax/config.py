"""The config schema: every section with its defaults, locked so a typo fails loudly.

Config files in ``configs/`` build on ``base_config()`` and return ``finalize(config)``. A locked
``ConfigDict`` refuses unknown keys and names the closest valid one (``--config.train.stpes=5`` ->
'Did you mean "steps" instead of "stpes"?').
"""

from __future__ import annotations

import difflib
import json
import os

import ml_collections

from ftjax.data.config import data_config
from ftjax.errors import FtjaxError
from ftjax.paths import as_path
from ftjax.peft.config import method_config
from ftjax.preference.config import preference_config


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dict(
        source="tiny-llama",  # preset name, HF folder, hub id or .gguf file
        head="causal_lm",  # causal_lm | sequence_classification | token_classification | reward
        num_labels=0,  # 0 = taken from the data's label set
        dtype="float32",  # compute dtype
        param_dtype="float32",
        scan_layers=True,
        remat="none",  # none | full | dots | dots_no_batch
        # What a BERT-family sequence classifier classifies: cls | mean | pooler; "" = what the
        # checkpoint says (sentence-transformers' 1_Pooling/config.json), else the pooler.
        pooling="",
        allow_pickle=False,  # opt-in for pickled torch .bin checkpoints
        overrides=ml_collections.ConfigDict(),  # architecture overrides for presets
        init_from="",  # a previous run's workdir: its trained weights start this run
    ))
    c.method = method_config()
    c.data = data_config()
    c.preference = preference_config()  # data.task=preference: scripts/preference.py
    # Against forgetting: loss += strength / 2 * sum(F * (theta - theta_start) ** 2) over the
    # trainable params; F = 1 for l2sp, the diagonal empirical Fisher for ewc.
    c.regularizer = ml_collections.ConfigDict(dict(
        kind="none",  # none | l2sp | ewc
        strength=0.0,
        fisher_tasks=[],  # ewc: mixture tasks whose train rows estimate F ([] = every task)
        fisher_examples=128,  # ewc: examples per task in the estimate
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=100,
        batch_size=8,  # global batch (examples per optimizer step)
        grad_accum=1,  # micro-batches per step; batch_size must divide by it
        seed=0,
        optimizer="adamw",  # adamw | sgd
        learning_rate=1e-3,
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        schedule="cosine",  # cosine | linear | constant
        warmup_steps=10,
        min_lr_ratio=0.0,
        grad_clip=1.0,  # global-norm clipping; 0 disables
        # Causal LM: the head + cross-entropy over this many positions at a time (recomputed in
        # the backward pass); 0 = all at once. Experimental: same loss and gradients, but XLA
        # does not yet free most of the [B, T, V] logits (tests/test_lm_loss_chunked.py).
        loss_chunk=0,
        # Batches built and put on their devices ahead of the step, in a background thread
        # (ftjax.data.prefetch); 0 = built in the loop, between steps.
        prefetch=2,
    ))
    # Axis sizes (one may be -1 = the rest); num_devices > 0 uses only the first N devices.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_devices=0))
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=50,
        keep=3,
        keep_best=True,  # also keep the best checkpoint by eval.best_metric
        async_save=True,
    ))
    c.eval = ml_collections.ConfigDict(dict(
        every_steps=0,  # 0 = only at the end
        batch_size=32,
        best_metric="loss",  # metric name from eval/metrics.json
        best_mode="min",  # min | max
        max_batches=0,  # 0 = the whole split
    ))
    # In-context few-shot evaluation (scripts/incontext.py): demonstrations drawn by the data
    # pipeline's k-shot sampler (config.data.kshot.seed, draws 0..draws-1), same template and
    # verbalisers as task=text_to_text.
    c.incontext = ml_collections.ConfigDict(dict(
        k=1,  # demonstrations per label (0 = zero-shot)
        draws=3,  # independent demonstration draws, reported as mean and std
        calibrate=True,  # contextual calibration (Zhao et al. 2021), reported beside the raw scores
        content_free=["N/A"],  # content-free inputs whose mean label probabilities are divided out
        separator="\n\n",  # text between demonstrations and before the query
        max_examples=0,  # first N eval examples (0 = all)
        batch_size=8,  # eval examples per jitted call (each scores every label)
        # Encode each draw's demonstrations once (a KV-cache prefix every query runs on) when the
        # model is a decoder with a cache; False (or an encoder): score every full sequence.
        prefix_cache=True,
    ))
    c.log = ml_collections.ConfigDict(dict(
        every_steps=10,
        tensorboard=True,
        # Weights & Biases (pip install 'ftjax[wandb]'): the metrics.jsonl rows under the same
        # names; WANDB_MODE=offline keeps the run on this machine (`wandb sync` sends it later).
        wandb=False,
        wandb_project="ftjax",
        wandb_entity="",  # "" = the W&B default entity
        wandb_name="",  # "" = the workdir's name
        wandb_group="",  # sweeps set their folder's name
    ))
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="",  # explicit multi-process: host:port of process 0
        num_processes=0,
        process_id=-1,
    ))
    return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Lock the config so unknown keys raise with a did-you-mean suggestion."""
    config.lock()
    return config


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a training run saved as ``workdir/config.json`` (written by the train loop), locked."""
    path = as_path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} the workdir of a training run?")
    return finalize(ml_collections.ConfigDict(with_defaults(json.loads(path.read_text()),
                                                           base_config().to_dict())))


def with_defaults(saved: dict, defaults: dict) -> dict:
    """``saved`` with every key of ``defaults`` it lacks (a run saved before the key existed gets
    the default, i.e. the behaviour it was trained with); saved values and extra keys are kept."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = with_defaults(out[key], value)
    return out


class ConfigArgError(FtjaxError, ValueError):
    """A ``file.py:key=value`` argument the config file does not take, or a bad value."""


def parse_arg(arg: str | None, **defaults):
    """big_vision-style ``file.py:key=value,flag`` argument parsing into a ConfigDict."""
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            raise ConfigArgError(f"config argument {key!r} (from ':{arg}') is not one of "
                                 f"{sorted(defaults)}" + (f'. Did you mean "{close[0]}"?' if close else ""))
        default = defaults[key]
        if not sep:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif default is not None:
            try:
                out[key] = type(default)(value)
            except ValueError:
                raise ConfigArgError(f"config argument {key}={value!r} is not a valid "
                                     f"{type(default).__name__}") from None
        else:
            out[key] = value
    return out
