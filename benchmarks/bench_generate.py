"""Generation speed: ftjax (jitted KV-cache decode) vs transformers ``generate``, SmolLM2-135M.

Same GGUF weights, same left-padded chat prompts, float32 on CPU, exactly ``--new_tokens`` new
tokens per row (EOS ignored on both sides), greedy. Runs are interleaved (ftjax, transformers,
ftjax, ...) and the median is reported. Time to first token is a one-token generation.

    python benchmarks/bench_generate.py [--new_tokens=64] [--repeats=3] [--batch_sizes=1,8]
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

from absl import app, flags

_NEW = flags.DEFINE_integer("new_tokens", 64, "New tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved timed runs per side (median).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes.")
_OUT = flags.DEFINE_string("out", str(Path(__file__).parent / "results"), "Output folder.")

QUESTIONS = ["Write a short poem about the sea.", "What is 2+2?", "Name three colours.",
             "Explain gravity to a child.", "Give me a recipe for pancakes.",
             "What is the capital of France?", "Tell me a joke about computers.",
             "Summarise the plot of Hamlet in two sentences."]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv):
    del argv
    import torch
    import transformers

    from ftjax.generate import Generator, Request, SamplingParams
    from ftjax.models.assets import smollm2_gguf_path
    from ftjax.models.loading import from_pretrained

    path = smollm2_gguf_path()
    model, tokenizer = from_pretrained(path)
    gen = Generator(model, tokenizer)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    n = _NEW.value
    rows = []
    for b in map(int, _BATCHES.value):
        prompts = [gen.chat_prompt([{"role": "user", "content": q}])
                   for q in (QUESTIONS * b)[:b]]
        batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")

        def ours(k: int):
            return gen.generate([Request(p, SamplingParams(max_new_tokens=k, stop_token_ids=()))
                                 for p in prompts])

        def theirs(k: int):
            with torch.no_grad():
                return ref.generate(**batch, max_new_tokens=k, min_new_tokens=k, do_sample=False)

        for k in (1, n):  # compile / warm up both sides once per shape
            ours(k), theirs(k)
        times = {"ftjax": {"ttft": [], "total": []}, "transformers": {"ttft": [], "total": []}}
        for _ in range(_REPEATS.value):
            for name, fn in (("ftjax", ours), ("transformers", theirs)):
                times[name]["ttft"].append(_timed(lambda: fn(1)))
                times[name]["total"].append(_timed(lambda: fn(n)))
        for name, t in times.items():
            total, ttft = statistics.median(t["total"]), statistics.median(t["ttft"])
            rows.append(dict(impl=name, batch=b, new_tokens=n, prompt_tokens=max(map(len, prompts)),
                             total_s=total, ttft_s=ttft, tokens_per_s=b * n / total,
                             decode_tokens_per_s=b * (n - 1) / max(total - ttft, 1e-9)))
        ratio = rows[-2]["tokens_per_s"] / rows[-1]["tokens_per_s"]
        print(f"batch {b}: ftjax {rows[-2]['tokens_per_s']:.1f} tok/s, transformers "
              f"{rows[-1]['tokens_per_s']:.1f} tok/s ({ratio:.1f}x)", flush=True)

    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
                device="cpu", machine=platform.processor() or platform.machine(),
                torch_threads=torch.get_num_threads(), repeats=_REPEATS.value)
    (out / "generate.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["| impl | batch | new tokens | new tokens/s | decode tokens/s | time to first token (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['batch']} | {r['new_tokens']} | {r['tokens_per_s']:.1f} | "
              f"{r['decode_tokens_per_s']:.1f} | {r['ttft_s']:.3f} |" for r in rows]
    (out / "generate.md").write_text(
        f"Generation, {meta['model']}, float32 on CPU, greedy, median of {meta['repeats']} "
        "interleaved runs.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
