"""Jitted KV-cache generation: prefill + a compiled decode loop, sampling, stop sequences."""

from ftjax.generate.decode import decode
from ftjax.generate.generator import Generation, Generator, Request
from ftjax.generate.sampling import SamplingParams

__all__ = ["Generation", "Generator", "Request", "SamplingParams", "decode"]
