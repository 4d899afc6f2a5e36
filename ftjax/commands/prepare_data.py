"""Prepare and cache the data of a config: ``ftjax-prepare --config=NAME|FILE.py --out=DIR``.

Writes ``DIR/<hash of config.data and tokenizer>/`` with the tokenised arrays, ``data_report.json``
and ``quarantine.jsonl``; training with the same ``cache_dir`` (and every arm of a sweep that
shares the data config) reuses them.
"""

import os
import time

from absl import flags
from ml_collections import config_flags

from ftjax import cli
from ftjax.data import pipeline, prepare

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config).")
_OUT = flags.DEFINE_string("out", None, "Cache directory for the prepared data.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    del argv
    config = _CONFIG.value
    fallback = config.model.source if os.path.isdir(config.model.source) else ""
    tokenizer = pipeline.load_tokenizer(config.data, fallback)
    for name, cfg in pipeline.task_configs(config.data).items():
        start = time.perf_counter()
        prepared, directory = prepare.prepare_cached(cfg, tokenizer, _OUT.value)
        seconds = time.perf_counter() - start
        rows = sum(s["steps"][0]["rows"] for s in prepared.report["splits"].values())
        print(f"== {name}: {directory}")
        print(prepare.summary(prepared.report))
        print(f"{rows} rows in {seconds:.2f} s ({rows / seconds:,.0f} rows/s)")


def run() -> None:
    """The ``ftjax-prepare`` console script (``python -m ftjax.commands.prepare_data``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
