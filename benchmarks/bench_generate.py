"""Generation speed: ftjax (jitted KV-cache decode) vs transformers ``generate``, SmolLM2-135M.

    python benchmarks/bench_generate.py [--new-tokens=64] [--rounds=3] [--repeats=3] [--batch-sizes=1,8]

Same GGUF weights, same left-padded chat prompts, float32 on CPU, exactly ``--new-tokens`` new
tokens per row (EOS ignored on both sides), greedy. Each (round, batch size, stack) is a fresh
process (so neither stack's idle threads compete with the other's): load, one warm-up of each
shape, then ``--repeats`` timed one-token runs (time to first token) and full runs; the process
reports the medians. The stack order alternates between rounds; the reported speed-up is the
median over rounds of ftjax's new tokens/s over transformers'. Parity gate: both stacks' greedy
tokens are identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _common  # noqa: E402

SCRIPT = Path(__file__).resolve()
STACKS = ("ftjax", "transformers")
QUESTIONS = ["Write a short poem about the sea.", "What is 2+2?", "Name three colours.",
             "Explain gravity to a child.", "Give me a recipe for pancakes.",
             "What is the capital of France?", "Tell me a joke about computers.",
             "Summarise the plot of Hamlet in two sentences."]


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _prompts(tokenizer: Any, batch: int) -> list[list[int]]:
    """Chat-template prompts (the Instruct model's own format), ``batch`` of them."""
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
            for q in (QUESTIONS * batch)[:batch]]


def _generator(stack: str) -> Callable[[list[list[int]], int], list[list[int]]]:
    """``generate(prompts, k) -> new token ids per row`` for one stack, loaded here."""
    from ftjax.models.assets import smollm2_gguf_path
    path = smollm2_gguf_path()
    if stack == "ftjax":
        from ftjax.generate import Generator, Request, SamplingParams
        from ftjax.models.loading import from_pretrained
        model, tokenizer = from_pretrained(path)
        gen = Generator(model, tokenizer)

        def ours(prompts: list[list[int]], k: int) -> list[list[int]]:
            return [g.tokens for g in gen.generate(
                [Request(p, SamplingParams(max_new_tokens=k, stop_token_ids=())) for p in prompts])]
        return ours

    import torch
    import transformers
    from ftjax.models.gguf_io import load_tokenizer
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    # Never stop at EOS (as ftjax's stop_token_ids=()) without suppressing it (min_new_tokens would).
    pad = tokenizer.pad_token_id
    ref.generation_config.pad_token_id = tokenizer.eos_token_id if pad is None else pad
    ref.generation_config.eos_token_id = None

    def theirs(prompts: list[list[int]], k: int) -> list[list[int]]:
        batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        with torch.no_grad():
            out = ref.generate(**batch, max_new_tokens=k, do_sample=False)
        return out[:, batch["input_ids"].shape[1]:].tolist()
    return theirs


def worker(spec: dict[str, Any]) -> None:
    from ftjax.models.assets import smollm2_gguf_path
    from ftjax.models.gguf_io import load_tokenizer
    b, n = spec["batch_size"], spec["new_tokens"]
    prompts = _prompts(load_tokenizer(smollm2_gguf_path()), b)
    generate = _generator(spec["stack"])
    first_s = _timed(lambda: generate(prompts, 1))  # trace + compile (ftjax) / first call
    tokens = generate(prompts, n)  # warm-up of the full shape; its tokens are the parity record
    ttft = [_timed(lambda: generate(prompts, 1)) for _ in range(spec["repeats"])]
    total = [_timed(lambda: generate(prompts, n)) for _ in range(spec["repeats"])]
    t, f = statistics.median(total), statistics.median(ttft)
    _common.emit(dict(spec, first_call_s=first_s, ttft_s=f, total_s=t, total_runs_s=total,
                      tokens_per_s=b * n / t,
                      decode_tokens_per_s=b * (n - 1) / max(t - f, 1e-9), tokens=tokens,
                      prompt_tokens=max(map(len, prompts)), peak_rss_mb=_common.peak_rss_mb()))


def compare(args: argparse.Namespace) -> None:
    runs, start = [], time.perf_counter()
    for rnd in range(args.rounds):
        for b in map(int, args.batch_sizes.split(",")):
            for stack in STACKS if rnd % 2 == 0 else STACKS[::-1]:
                spec = dict(stack=stack, batch_size=b, new_tokens=args.new_tokens,
                            repeats=args.repeats, round=rnd)
                r = _common.run_worker(SCRIPT, spec, timeout=args.worker_timeout)
                r.update(spec)
                runs.append(r)
                print(f"round {rnd} batch {b} {stack:12s} " + (
                    f"error: {r['error'].splitlines()[-1][:100]}" if "error" in r else
                    f"{r['tokens_per_s']:6.1f} new tok/s  ttft {r['ttft_s']:.3f}s"), flush=True)
    rows, summary = [], {}
    for b in map(int, args.batch_sizes.split(",")):
        ok = {s: {r["round"]: r for r in runs if r["batch_size"] == b and r["stack"] == s
                  and "error" not in r} for s in STACKS}
        shared = sorted(set(ok["ftjax"]) & set(ok["transformers"]))
        ratios = [ok["ftjax"][i]["tokens_per_s"] / ok["transformers"][i]["tokens_per_s"]
                  for i in shared]
        same = [ok["ftjax"][i]["tokens"] == ok["transformers"][i]["tokens"] for i in shared]
        summary[b] = dict(ratios=ratios, median_ratio=statistics.median(ratios) if ratios else None,
                          greedy_tokens_identical=all(same) if same else None)
        for s in STACKS:
            done = list(ok[s].values())
            if not done:
                rows.append([s, b, None, None, None, None, None, "failed"])
                continue
            med = {k: statistics.median(r[k] for r in done)
                   for k in ("tokens_per_s", "decode_tokens_per_s", "ttft_s", "first_call_s")}
            speedup = (f"{statistics.median(ratios):.2f}x (" + ", ".join(f"{x:.2f}" for x in ratios)
                       + ")") if s == "ftjax" and ratios else ""
            rows.append([s, b, med["tokens_per_s"], speedup, med["decode_tokens_per_s"],
                         med["ttft_s"], med["first_call_s"], len(done)])
    table = _common.markdown_table(
        ["impl", "batch", "new tokens/s", "ftjax speed-up: median (per round)", "decode tokens/s",
         "time to first token s", "first call s", "runs"], rows)
    parity = ", ".join(f"batch {b}: {'identical' if v['greedy_tokens_identical'] else 'DIFFERENT'}"
                       for b, v in summary.items())
    md = (f"### Generation, SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32), greedy, "
          f"{args.new_tokens} new tokens\n\n{table}\n\nParity gate (greedy tokens, ftjax vs "
          f"transformers): {parity}.\n")
    payload = dict(machine=_common.machine(), settings=vars(args),
                   wall_s=time.perf_counter() - start, summary=summary, runs=runs)
    print(_common.write_results("generate", payload, md).read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="fresh-process rounds per stack")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per process (median)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--worker-timeout", type=float, default=900)
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
    else:
        compare(args)


if __name__ == "__main__":
    main()
