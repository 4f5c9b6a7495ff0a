"""Next-token choice: greedy, or temperature / top-k / top-p sampling with a seed; repetition
penalty as Hugging Face applies it (divide positive logits, multiply negative ones)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.errors import UserError


def check_finite(value: float, flag: str) -> None:
    if not math.isfinite(value):
        raise UserError(f"{flag} {value} is not a finite number".strip())


# Tokens per answer unless told: DSVL's chat.py (--generation_length_per_round) and its
# eval/batch_generation.py both generate up to 256 (its generate() itself defaults to 128).
DSVL_ANSWER_TOKENS = 256


@dataclass
class SamplingOptions:
    max_new_tokens: int = DSVL_ANSWER_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    @classmethod
    def model_defaults(cls, defaults: dict | None, **overrides) -> SamplingOptions:
        """DSVL's sampling settings for this model (the manifest's ``generation_defaults``,
        from the LLaMA directory's generation_config.json), then ``overrides`` (None: unset)."""
        fields = {k: v for k, v in (defaults or {}).items()
                  if k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")}
        if not fields.get("do_sample", False):  # greedy: the sampling knobs do not apply
            fields = {k: v for k, v in fields.items() if k == "repetition_penalty"}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def validate(self) -> None:
        """Raise ValueError naming the flag; nan and inf never reach the sampler."""
        for flag, value in (("--temperature", self.temperature), ("--top-p", self.top_p),
                            ("--repetition-penalty", self.repetition_penalty)):
            check_finite(value, flag)
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed {self.seed} is out of range: use 0 to {2**32 - 1}")
        if self.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        if self.temperature <= 0:
            raise UserError("--temperature must be positive")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise UserError("--top-k must be >= 0 and --repetition-penalty > 0")


class Sampler:
    def __init__(self, options: SamplingOptions):
        options.validate()
        self.options = options
        self.rng = np.random.default_rng(options.seed)
        # The argmax alone: what a generation loop may inline instead of calling the sampler.
        self.greedy = not options.do_sample and options.repetition_penalty == 1.0

    def __call__(self, logits: np.ndarray, generated: list[int]) -> int:
        opts = self.options
        if opts.repetition_penalty != 1.0 and generated:
            logits = logits.astype(np.float32, copy=True)
            seen = np.unique(np.asarray(generated))
            scores = logits[seen]
            logits[seen] = np.where(scores < 0, scores * opts.repetition_penalty,
                                    scores / opts.repetition_penalty)
        if not opts.do_sample:
            return int(logits.argmax())
        logits = logits.astype(np.float64) / opts.temperature
        if opts.top_k > 0:
            kth = np.partition(logits, -min(opts.top_k, logits.size))[-min(opts.top_k, logits.size)]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if opts.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            sorted_probs = probs[order]
            drop = np.cumsum(sorted_probs) - sorted_probs > opts.top_p
            sorted_probs[drop] = 0
            probs = np.zeros_like(probs)
            probs[order] = sorted_probs
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
