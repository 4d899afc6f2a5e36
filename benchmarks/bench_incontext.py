"""In-context evaluation with the demonstrations encoded once (KV-cache prefix) vs every query's
full sequence, on SmolLM2-135M-Instruct (the offline GGUF) and the first SST-2 dev sentences.

For each k (demonstrations per label; 2k demonstrations per prompt) one draw of
``configs/sst2_incontext.py`` (calibrated, content-free "N/A") runs through ``evaluate_incontext``
three times in this process: the prefix path on ``--new`` examples (timed), the prefix path and
the full-sequence path (``incontext.prefix_cache=False``, timed) on the first ``--old`` examples
(the full path is slow at k = 16, hence fewer). Wall times are end to end, compiles included, as a
user waits for them; per-example times divide by the examples scored (their content-free prompt
included in the time). On the common examples the per-option scores, metrics and the
content-free probabilities of both paths are compared.

    python benchmarks/bench_incontext.py [--ks=4,16] [--new=64] [--old=16,6] [--batch_size=8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import _common


def _evaluate(model, tok, mesh, k: int, n: int, cached: bool, batch_size: int) -> dict:
    """One draw at ``k`` on the first ``n`` dev examples; the option scores passed to the metrics
    are kept (``scores``, ``content_free``) and the wall time measured."""
    from ftjax.configs.sst2_incontext import get_config
    from ftjax.eval import incontext
    from ftjax.eval.loop import Evaluator

    c = get_config(f"k={k},draws=1,max_examples={n}")
    c.incontext.update(prefix_cache=cached, batch_size=batch_size)
    seen, run_scores, bias = [], Evaluator.run_scores, incontext.calibration_bias

    def keep_scores(self, scores, *args, **kwargs):
        seen.append(("scores", scores))
        return run_scores(self, scores, *args, **kwargs)

    def keep_content_free(scores):
        seen.append(("content_free", scores))
        return bias(scores)

    Evaluator.run_scores, incontext.calibration_bias = keep_scores, keep_content_free
    try:
        t0 = time.perf_counter()
        result = incontext.evaluate_incontext(model, tok, c, mesh)
        wall = time.perf_counter() - t0
    finally:
        Evaluator.run_scores, incontext.calibration_bias = run_scores, bias
    assert result["prefix_cache"] is cached
    draw = result["draws"][0]
    return dict(k=k, examples=n, prefix_cache=cached, wall_s=wall, per_example_s=wall / n,
                accuracy=draw["metrics"]["accuracy"],
                calibrated_accuracy=draw["metrics"]["calibrated"]["accuracy"],
                loss=draw["metrics"]["loss"], p_content_free=draw["p_content_free"],
                confusion=draw["metrics"]["confusion_matrix"],
                calibrated_confusion=draw["metrics"]["calibrated"]["confusion_matrix"],
                **{name: np.asarray(s).tolist() for name, s in seen})


def _context_tokens(tok, k: int) -> int:
    from ftjax.configs.sst2_incontext import get_config
    from ftjax.eval.incontext import build_episode
    c = get_config(f"k={k},draws=1,max_examples=1")
    return len(build_episode(c.data, tok, c.incontext, 0).context)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="4,16")
    p.add_argument("--new", type=int, default=64, help="examples for the prefix path")
    p.add_argument("--old", default="16,6", help="examples for the full path, one per k")
    p.add_argument("--batch_size", type=int, default=8)
    args = p.parse_args()
    import jax
    from ftjax import models, sharding
    from ftjax.configs.sst2_incontext import get_config

    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model, tok = models.create(get_config().model, mesh)
    ks = [int(k) for k in args.ks.split(",")]
    olds = [int(n) for n in args.old.split(",")]
    runs, rows = [], []
    for k, n_old in zip(ks, olds):
        new = _evaluate(model, tok, mesh, k, args.new, True, args.batch_size)
        same = _evaluate(model, tok, mesh, k, n_old, True, args.batch_size)
        old = _evaluate(model, tok, mesh, k, n_old, False, args.batch_size)
        diff = np.abs(np.asarray(same["scores"]) - np.asarray(old["scores"])).max()
        cf_diff = np.abs(np.asarray(same["content_free"]) - np.asarray(old["content_free"])).max()
        agree = dict(max_abs_score_diff=float(diff), max_abs_content_free_diff=float(cf_diff),
                     same_confusion=same["confusion"] == old["confusion"],
                     same_calibrated_confusion=same["calibrated_confusion"] == old["calibrated_confusion"])
        tokens = _context_tokens(tok, k)
        runs.append(dict(k=k, context_tokens=tokens, prefix=new, prefix_on_old_examples=same,
                         full=old, agreement=agree))
        speedup = old["per_example_s"] / new["per_example_s"]
        rows.append([k, tokens, f"{args.new}: {new['wall_s']:.1f}", f"{new['per_example_s']:.3f}",
                     f"{n_old}: {old['wall_s']:.1f}", f"{old['per_example_s']:.2f}", f"{speedup:.1f}x",
                     f"{same['accuracy']:.3f} / {old['accuracy']:.3f}", f"{diff:.1e}",
                     agree["same_confusion"] and agree["same_calibrated_confusion"]])
        print(rows[-1], flush=True)
    md = _common.markdown_table(
        ["k", "context tokens", "prefix: examples, wall s", "prefix s/example", "full: examples, wall s",
         "full s/example", "speed-up", "accuracy prefix / full (common)", "max |score diff|",
         "same confusions"], rows)
    payload = dict(machine=_common.machine(), settings=vars(args), runs=runs)
    print(_common.write_results("incontext", payload, md).read_text())


if __name__ == "__main__":
    main()
