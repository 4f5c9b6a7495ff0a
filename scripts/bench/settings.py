"""What one bench run measures, and how many times."""

from __future__ import annotations

from dataclasses import dataclass

from export import quantize as q
from runtime import contract as c

QUESTION = "Describe the image in detail."
CONTEXTS = (64, 1024)
# The quantized decoders measured: name -> (bits, MatMulNBits accuracy_level). "int4" is what
# `python -m export.quantize --bits 4` writes by default.
QUANTIZED = {"int4": (4, q.DEFAULT_ACCURACY_LEVEL), "int4-acc0": (4, 0), "int8": (8, q.DEFAULT_ACCURACY_LEVEL)}


@dataclass
class Settings:
    preset: str
    repeats: int  # timed repeats of vision and time-to-first-token, after `warmup`
    warmup: int
    decode_runs: int  # prompt pass + `decode_steps` steps, per context and backend
    decode_steps: int
    agreement_tokens: int  # teacher-forced greedy tokens for the quantized decoders
    bandwidth_mb: int  # size of the array copied to measure memory bandwidth
    threads: int
    profile: bool = False  # per-op profiles of decode steps and the prompt pass
    kv_cache: str = c.KV_FLAG_CONCAT  # the decoder export's KV cache flag: concat or shared (in place)
