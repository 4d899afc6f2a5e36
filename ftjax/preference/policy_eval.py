"""Judging a tuned policy by its own samples: completions, their log-probs under a policy and a
reference, the sequence KL, and win rates with confidence intervals.

The sequence KL of a policy ``pi`` to a reference ``pi_ref`` is estimated as the paper does
(Rafailov et al. 2023, sec. 6.1): the mean over samples ``y ~ pi(.|x)`` of
``log pi(y|x) - log pi_ref(y|x)``, each a sum of per-token log-probs of the sampled tokens.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.generate import Generation, Generator, Request, SamplingParams
from ftjax.preference.step import flat_inputs, token_logps


def sample(generator: Generator, prompts: Sequence[Sequence[int]], *, samples: int, max_new_tokens: int,
           temperature: float, seed: int) -> list[list[Generation]]:
    """``samples`` completions of every prompt (``[prompt][sample]``), each with its own seed,
    ended only by the tokenizer's EOS (kept out of ``tokens``, see ``with_stop``)."""
    eos = generator.tokenizer.eos_token_id
    stop = () if eos is None else (eos,)
    requests = [Request(list(p), SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                seed=seed + samples * i + j, stop_token_ids=stop))
                for i, p in enumerate(prompts) for j in range(samples)]
    out = generator.generate(requests)
    return [out[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def with_stop(generation: Generation, tokenizer: Any) -> list[int]:
    """The sampled tokens of a completion, with the EOS that ended it (the sample includes it)."""
    ended = generation.finish_reason == "stop" and tokenizer.eos_token_id is not None
    return list(generation.tokens) + ([tokenizer.eos_token_id] if ended else [])


def sequence_logps(model: nnx.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                   *, batch_size: int = 16) -> np.ndarray:
    """``log p(response | prompt)`` of every pair under ``model``, summed over the response tokens,
    ``[N]`` float32 (one compile: rows padded to the longest, batches to ``batch_size``)."""
    n = len(prompts)
    if n != len(responses):
        raise ValueError(f"{n} prompts but {len(responses)} responses")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    rows = -(-n // batch_size) * batch_size
    ids = np.zeros((rows, width), np.int32)
    plen, length = np.zeros((rows,), np.int32), np.zeros((rows,), np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = list(p) + list(r)
        plen[i], length[i] = len(p), len(p) + len(r)
    graphdef, state = nnx.split(model)
    out = [np.asarray(_summed(graphdef, state, dict(input_ids=ids[i:i + batch_size], prompt_len=plen[i:i + batch_size],
                                     length=length[i:i + batch_size])))
           for i in range(0, rows, batch_size)]
    return np.concatenate(out)[:n].astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)  # one compile per architecture and shape, not per call
def _summed(graphdef: nnx.GraphDef, state: Any, batch: dict[str, jax.Array]) -> jax.Array:
    inputs = flat_inputs(batch)
    return jnp.sum(token_logps(nnx.merge(graphdef, state), inputs) * inputs["response"], axis=1)


def sequence_kl(logp: Sequence[float], logp_ref: Sequence[float]) -> float:
    """The sampled estimate of KL(pi || pi_ref): mean of ``logp - logp_ref`` over samples of pi."""
    return float(np.mean(np.asarray(logp, np.float64) - np.asarray(logp_ref, np.float64)))


def win_rate(rewards: Sequence[float], baseline: Sequence[float]) -> tuple[float, int]:
    """(share of paired comparisons ``rewards[i]`` wins over ``baseline[i]``, ties counting half; n)."""
    a, b = np.asarray(rewards, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape or not a.size:
        raise ValueError(f"win_rate needs two equally long non-empty sequences, got {a.shape} and {b.shape}")
    return float(np.mean((a > b) + 0.5 * (a == b))), int(a.size)


def wilson_interval(p: float, n: int, *, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed over ``n`` trials (95% by default)."""
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1, got {n}")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
