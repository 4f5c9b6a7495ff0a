"""Teacher-forced top-1 agreement with the PyTorch reference: the reference's greedy tokens
are fed step by step into each runtime decoder (``Pipeline.decode``'s ``sampler`` seam), and
each step's logits compared."""

from __future__ import annotations

import numpy as np
import torch

from dsvl.generate import generate
from runtime.pipeline import Pipeline
from runtime.sampling import SamplingOptions
from scripts.bench.settings import Settings
from scripts.bench.timing import log


def teacher_forced_logits(pipe: Pipeline, ids: list[int], pixels: np.ndarray,
                          tokens: list[int]) -> np.ndarray:
    embeds, mask = pipe.splice(ids, pipe.vision.encode(pixels))
    pipe.reset()
    first = pipe.prefill(embeds, mask)
    record: list[np.ndarray] = []

    def forced(logits: np.ndarray, generated: list[int]) -> int:
        record.append(np.array(logits, np.float32))
        return tokens[len(generated)]

    pipe.decode(first, SamplingOptions(max_new_tokens=len(tokens)), sampler=forced, stop_ids=())
    return np.stack(record)


def bench_agreement(settings: Settings, model, pipes: dict[str, Pipeline], ids: list[int],
                    pixels: np.ndarray) -> dict:
    """Greedy tokens of the PyTorch fp32 reference, fed step by step into each ORT decoder."""
    ref = generate(model, torch.tensor(ids), torch.from_numpy(pixels),
                   SamplingOptions(max_new_tokens=settings.agreement_tokens))
    want = torch.stack([ref.prompt_logits[-1], *ref.step_logits]).numpy()
    results = {}
    for name, pipe in pipes.items():
        got = teacher_forced_logits(pipe, ids, pixels, ref.tokens)
        err = np.abs(got - want)
        results[name] = {"top1_agreement": float(np.mean(got.argmax(-1) == np.asarray(ref.tokens))),
                         "logits_max_abs_err": float(err.max()), "logits_mean_abs_err": float(err.mean()),
                         "reference_logits_max_abs": float(np.abs(want).max()), "tokens": len(ref.tokens)}
        log(f"      {name}: top-1 agreement {results[name]['top1_agreement']:.1%}, "
            f"logits max|err| {results[name]['logits_max_abs_err']:.3g}")
    top2 = np.sort(want, axis=-1)[:, -2:]
    results["reference_top1_margin_median"] = float(np.median(top2[:, 1] - top2[:, 0]))
    return results
