"""The PyTorch reference generation loop (what the runtime must reproduce).

It follows DSVL's ``generate`` -> Hugging Face ``generate(inputs_embeds=...)``: one prompt pass
over the spliced embeddings, then each new token embedded with the decoder's ``embed_tokens``,
its mask value 1 (text) and position ``cumsum(mask > 0) - 1``. Hugging Face returns BOS
followed by the new tokens; this returns the new tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsvl.model import DSVLModel
from runtime.contract import MASK_TEXT
from runtime.sampling import SamplingOptions  # the runtime's options: one definition of the knobs


@dataclass
class ReferenceOutput:
    tokens: list[int]
    prompt_logits: torch.Tensor  # [L', vocab]: the prompt pass
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [vocab] per new token


def position_ids_for(mask: torch.Tensor) -> torch.Tensor:
    return (mask > 0).long().cumsum(-1) - 1


def pick_next(logits: torch.Tensor, generated: list[int], cfg: SamplingOptions,
              generator: torch.Generator | None) -> int:
    logits = logits.float().clone()
    if cfg.repetition_penalty != 1.0 and generated:
        seen = torch.tensor(sorted(set(generated)))
        scores = logits[seen]
        logits[seen] = torch.where(scores < 0, scores * cfg.repetition_penalty,
                                   scores / cfg.repetition_penalty)
    if not cfg.do_sample:
        return int(torch.argmax(logits))
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, -1)
    if cfg.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > cfg.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.no_grad()
def generate(model: DSVLModel, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
             cfg: SamplingOptions, forced_tokens: list[int] | None = None,
             eos_token_id: int | None = None) -> ReferenceOutput:
    """Generate after a prompt with the runtime's sampling options, stopping after
    ``eos_token_id`` (None: never). With ``forced_tokens`` (teacher forcing) the loop feeds those
    tokens instead of its own picks, so step logits can be compared position by position."""
    image_embeds = model.encode_images(pixel_values) if pixel_values is not None else None
    embeds, mask = model.splice(input_ids, image_embeds)
    decoder = model.lang_decoder
    logits, past = decoder(embeds, mask, position_ids_for(mask), decoder.empty_cache())
    out = ReferenceOutput(tokens=[], prompt_logits=logits[0])
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.do_sample else None
    next_logits = logits[0, -1]
    steps = len(forced_tokens) if forced_tokens is not None else cfg.max_new_tokens
    for step in range(steps):
        token = forced_tokens[step] if forced_tokens is not None else pick_next(
            next_logits, out.tokens, cfg, generator)
        out.tokens.append(token)
        if forced_tokens is None and token == eos_token_id:
            break
        if step == steps - 1:
            break
        mask = torch.cat([mask, torch.full((1, 1), MASK_TEXT, dtype=torch.long)], dim=1)
        step_embeds = decoder.model.embed_tokens(torch.tensor([[token]]))
        logits, past = decoder(step_embeds, mask, position_ids_for(mask)[:, -1:], past)
        next_logits = logits[0, -1]
        out.step_logits.append(next_logits)
    return out
