"""Server latency: a 32-token completion from ``scripts/serve.py`` serving SmolLM2-135M.

Starts the real server in a subprocess on a free port, warms it up, then times ``--requests``
sequential completions (exactly ``--tokens`` new tokens: ``ignore_eos``) through the official
``openai`` client, and once more with ``--concurrent`` requests in flight at the same time
(batched into one decode). Writes ``results/serve.json`` and ``results/serve.md``.

    python benchmarks/bench_serve.py [--tokens=32] [--requests=10] [--concurrent=8]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from absl import app, flags

_TOKENS = flags.DEFINE_integer("tokens", 32, "New tokens per completion.")
_REQUESTS = flags.DEFINE_integer("requests", 10, "Sequential timed requests.")
_CONCURRENT = flags.DEFINE_integer("concurrent", 8, "Requests sent at once for the batched run.")
_OUT = flags.DEFINE_string("out", str(Path(__file__).parent / "results"), "Output folder.")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time, in a small village by the sea,"


def main(argv):
    del argv
    import openai

    from ftjax.models.assets import smollm2_gguf_path

    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"),
                             f"--model={smollm2_gguf_path()}", "--port=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = next(l for l in proc.stdout if l.startswith("serving "))
        client = openai.OpenAI(base_url=line.split(" on ")[1].strip(), api_key="-", timeout=600)
        model = client.models.list().data[0].id

        def complete() -> float:
            start = time.perf_counter()
            out = client.completions.create(model=model, prompt=PROMPT, max_tokens=_TOKENS.value,
                                            temperature=0, extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == _TOKENS.value, out.usage
            return time.perf_counter() - start

        with ThreadPoolExecutor(_CONCURRENT.value) as pool:
            for _ in range(2):  # compile the batch-1 and the concurrent buckets
                complete(), list(pool.map(lambda _: complete(), range(_CONCURRENT.value)))
            sequential = [complete() for _ in range(_REQUESTS.value)]
            start = time.perf_counter()
            concurrent = list(pool.map(lambda _: complete(), range(_CONCURRENT.value)))
            wall = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    result = dict(model="SmolLM2-135M-Instruct (GGUF, float32, CPU)", tokens=_TOKENS.value,
                  latency_median_s=statistics.median(sequential), latency_all_s=sequential,
                  concurrent=_CONCURRENT.value, concurrent_wall_s=wall,
                  concurrent_latency_median_s=statistics.median(concurrent),
                  concurrent_tokens_per_s=_CONCURRENT.value * _TOKENS.value / wall)
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2))
    table = (f"Server latency, {result['model']}, {_TOKENS.value}-token completions via the openai "
             "client.\n\n| requests | median latency (s) | tokens/s |\n|---|---|---|\n"
             f"| 1 at a time (median of {_REQUESTS.value}) | {result['latency_median_s']:.3f} | "
             f"{_TOKENS.value / result['latency_median_s']:.1f} |\n"
             f"| {_CONCURRENT.value} concurrent (batched) | "
             f"{result['concurrent_latency_median_s']:.3f} | "
             f"{result['concurrent_tokens_per_s']:.1f} |\n")
    (out / "serve.md").write_text(table)
    print(table)


if __name__ == "__main__":
    app.run(main)
