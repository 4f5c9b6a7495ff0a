"""Decode steps after a prompt pass, PyTorch against the runtime. The runtime side runs
``Pipeline.decode`` itself and measures through its seams: ``on_step`` marks each step,
``stop_ids=()`` decodes exactly the steps asked for, and the runner's
``last_inference_time()`` gives the session's share of each step."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from dsvl.generate import position_ids_for
from runtime import contract as c
from runtime.pipeline import Pipeline
from runtime.sampling import SamplingOptions
from scripts.bench.settings import Settings
from scripts.bench.timing import log, summary, wall_time


def ort_decode_run(pipe: Pipeline, embeds: np.ndarray, steps: int) -> dict:
    """Prompt pass of len(embeds) positions, then ``steps`` greedy steps through Pipeline.decode.
    A step is the time between two ``on_step`` calls: sampling, bookkeeping and the forward."""
    pipe.reset()
    first = pipe.prefill(embeds, np.ones((1, embeds.shape[1]), np.int64))
    marks: list[float] = []
    session_s: list[float] = []

    def on_step(_logits: np.ndarray, tokens: list[int]) -> None:
        marks.append(time.perf_counter())
        if tokens:  # every call but the first follows one decoder forward
            session_s.append(pipe.decoder.last_inference_time())

    start = time.perf_counter()
    tokens, _ = pipe.decode(first, SamplingOptions(max_new_tokens=steps + 1), on_step=on_step,
                            stop_ids=())
    total = time.perf_counter() - start
    assert len(tokens) - 1 == steps == len(session_s)
    return {"step_s": [float(s) for s in np.diff(marks)], "decode_s": total, "session_s": sum(session_s)}


@torch.no_grad()
def torch_decode_run(model, ids: torch.Tensor, steps: int,
                     timed: Callable[[Callable[[], object]], float] = wall_time) -> dict:
    """The reference loop of dsvl/generate.py, each step timed by ``timed`` (a GPU timing
    synchronises the device; run it under ``torch.device`` so the loop's tensors land there)."""
    decoder = model.lang_decoder
    mask = torch.ones(1, len(ids), dtype=torch.long)
    logits, past = decoder(model.lang_embed(ids)[None], mask, position_ids_for(mask), decoder.empty_cache())
    token = int(logits[0, -1].argmax())

    def step() -> None:
        nonlocal mask, past, token
        mask = torch.cat([mask, torch.full((1, 1), c.MASK_TEXT, dtype=torch.long)], dim=1)
        step_embeds = decoder.model.embed_tokens(torch.tensor([[token]]))
        logits, past = decoder(step_embeds, mask, position_ids_for(mask)[:, -1:], past)
        token = int(logits[0, -1].argmax())

    step_s = [timed(step) for _ in range(steps)]
    return {"step_s": step_s, "decode_s": sum(step_s)}


def bench_decode(settings: Settings, model, pipes: dict[str, Pipeline], context: int,
                 backends: list[str]) -> dict:
    """Decode step times after a prompt pass of ``context`` positions (random token ids, embedded
    with the prompt table by both sides), runs interleaved across backends."""
    artifacts = pipes["fp32"].artifacts
    ids = np.random.default_rng(context).integers(0, artifacts.decoder.vocab_size, context)
    embeds = np.asarray(artifacts.prompt_embeddings[ids], np.float32)[None]
    runs: dict[str, list[dict]] = {name: [] for name in backends}
    for _ in range(settings.decode_runs):
        for name in backends:
            if name == "pytorch":
                runs[name].append(torch_decode_run(model, torch.from_numpy(ids), settings.decode_steps))
            else:
                runs[name].append(ort_decode_run(pipes[name], embeds, settings.decode_steps))
    result = {}
    for name, items in runs.items():
        steps = [s for run in items for s in run["step_s"]]
        entry = summary(steps) | {"tokens_per_s": 1e3 / float(np.median(np.asarray(steps) * 1e3))}
        if name != "pytorch":
            decode_s = sum(run["decode_s"] for run in items)
            entry["session_ms_per_step"] = 1e3 * sum(run["session_s"] for run in items) / len(steps)
            entry["python_overhead_fraction"] = 1 - sum(run["session_s"] for run in items) / decode_s
        result[name] = entry
    log("      decode ctx " + str(context) + ": " + ", ".join(
        f"{name} {entry['median_ms']:.1f} ms/token" for name, entry in result.items()))
    return result
