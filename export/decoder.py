"""python -m export.decoder: the LLaMA decoder (MMCA included) -> decoder.onnx with a KV cache.

One graph serves the prompt pass (past length 0) and decode steps: inputs ``inputs_embeds``,
``attention_mask`` (0/1/2 over past + new positions), ``position_ids``,
``past_key_values.{i}.key/.value``; outputs ``logits`` and ``present.{i}.key/.value``. Beside it:
both embedding tables (the prompt's ``lang_embed`` and the decoder's ``embed_tokens``) and the
tokenizer. The parity check runs a real spliced prompt and decode steps through ONNX Runtime.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from export.cli import (
    ExportError,
    Progress,
    add_output_flags,
    add_weight_flags,
    check_writable,
    publish,
    run_cli,
    staged,
    weight_source,
)
from runtime import contract as c
from runtime.prompt import format_round

if TYPE_CHECKING:  # torch, transformers and onnx load only when an export runs (fast --help)
    import torch

    from dsvl.loading import Loaded
    from dsvl.model import DSVLModel

FP32_REL_TOL = 1e-4  # logits: max |ORT - PyTorch| / max |PyTorch|
FP16_REL_TOL = 5e-2


@dataclass
class DecoderExport:
    section: dict
    tokenizer_section: dict
    parity: list[dict]
    ok: bool


KV_CACHES = {
    # present = concat(past, new): standard ops, runs on ONNX Runtime and TensorRT; MMCA.
    "concat": "concat",
    # past and present are one preallocated [B, kv_heads, max_context, D] buffer that
    # GroupQueryAttention updates in place: no per-step cache copy; ONNX Runtime only, no MMCA.
    "shared": "shared-buffer",
}


def dynamic_axes(num_layers: int, shared_cache: bool = False) -> dict:
    """torch's ``dynamic_axes``, generated from the contract's table (runtime/graphs.py)."""
    from runtime.graphs import decoder_graph

    return decoder_graph(num_layers, c.KV_SHARED if shared_cache else c.KV_CONCAT).torch_dynamic_axes()


def export_decoder(model: DSVLModel, tokenizer, loaded: Loaded, stage: Path, precision: str,
                   opset: int, seed: int, progress: Progress, kv_cache: str = "concat") -> DecoderExport:
    import copy

    import torch

    from dsvl.decoder import FlatDecoder
    from export.common import export_onnx, file_entry

    decoder = model.lang_decoder
    dtype = torch.float16 if precision == "fp16" else torch.float32
    shared = kv_cache == "shared"
    if shared and decoder.mmca:
        raise ExportError("--kv-cache shared uses ONNX Runtime's GroupQueryAttention, which cannot "
                          "express MMCA's two softmaxes: use --kv-cache concat for MMCA models")
    with progress.step(f"exporting decoder.onnx ({precision}, {decoder.num_layers} layers, "
                       f"MMCA {'on' if decoder.mmca else 'off'}, {kv_cache} KV cache)"):
        graph_decoder = copy.deepcopy(decoder).to(dtype) if precision == "fp16" else decoder
        # Trace with a non-empty past and several new positions so no size is specialised.
        hidden = decoder.config.hidden_size
        past = [torch.zeros(1, decoder.num_kv_heads, 2, decoder.head_dim, dtype=dtype)
                for _ in range(2 * decoder.num_layers)]
        example = (torch.zeros(1, 3, hidden, dtype=dtype),
                   torch.tensor([[1, 2, 2, 1, 1]]), torch.arange(2, 5).unsqueeze(0), *past)
        graph_decoder.set_shared_cache(shared)
        try:
            export_onnx(FlatDecoder(graph_decoder), example, stage / c.DECODER_FILE,
                        c.decoder_input_names(decoder.num_layers),
                        c.decoder_output_names(decoder.num_layers),
                        dynamic_axes(decoder.num_layers, shared), opset)
        finally:
            graph_decoder.set_shared_cache(False)  # the reference keeps its own attention
    with progress.step("writing embedding tables and tokenizer"):
        np_dtype = c.numpy_dtype(c.io_dtype(precision))
        np.save(stage / c.PROMPT_EMBED_FILE, model.lang_embed.weight.detach().numpy().astype(np_dtype))
        np.save(stage / c.DECODER_EMBED_FILE,
                decoder.model.embed_tokens.weight.detach().numpy().astype(np_dtype))
        tokenizer.save(stage / c.TOKENIZER_DIR)
    with progress.step("checking ONNX Runtime (CPU) against PyTorch: prompt pass + 4 decode steps"):
        parity = check_decoder(model, tokenizer, stage / c.DECODER_FILE, precision, seed, shared)
    tol = FP32_REL_TOL if precision == "fp32" else FP16_REL_TOL
    ok = all(r["finite"] and r["max_rel_err"] <= tol for r in parity)
    cfg = decoder.config
    section = {
        "file": file_entry(stage, c.DECODER_FILE),
        "prompt_embeddings": file_entry(stage, c.PROMPT_EMBED_FILE),
        "decoder_embeddings": file_entry(stage, c.DECODER_EMBED_FILE),
        "num_layers": decoder.num_layers,
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": decoder.num_kv_heads,
        "head_dim": decoder.head_dim,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "enable_mmca_attention": decoder.mmca,
        "kv_cache": KV_CACHES[kv_cache],
        "precision": precision,
        "io_dtype": c.io_dtype(precision),
        "weights": loaded.notes[0].removeprefix("weights: "),
        "random_weights": loaded.config.preset is not None,
        "generation_defaults": loaded.generation,
        "parity": {"tolerance_rel": tol, "results": parity},
    }
    return DecoderExport(section, tokenizer_section(tokenizer, stage), parity, ok)


def tokenizer_section(tokenizer, stage: Path) -> dict:
    from export.common import dir_entries

    ids = tokenizer.convert_tokens_to_ids
    return {"dir": c.TOKENIZER_DIR, "files": dir_entries(stage, c.TOKENIZER_DIR),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "image_token_id": ids("<image>"), "image_pretoken_id": ids("### Image:"),
            "vocab_size": len(tokenizer), "source": tokenizer.source}


def parity_prompt(model: DSVLModel, tokenizer, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A real two-image DSVL prompt, spliced: covers text before, between and after images."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=generator)
    ids = torch.tensor(tokenizer(format_round("What is different between them?", 2)).input_ids)
    return model.splice(ids, model.encode_images(pixels))


def check_decoder(model: DSVLModel, tokenizer, path: Path, precision: str, seed: int,
                  shared_cache: bool = False) -> list[dict]:
    import torch

    from dsvl.generate import position_ids_for
    from export.common import compare, ort_session

    decoder = model.lang_decoder
    session = ort_session(path, precision)
    np_dtype = c.numpy_dtype(c.io_dtype(precision))
    embeds, mask = parity_prompt(model, tokenizer, seed)
    # A shared cache is one buffer sized for the whole check; a concat cache starts empty.
    length = mask.shape[1] + 8 if shared_cache else 0
    shape = (1, decoder.num_kv_heads, length, decoder.head_dim)
    feeds = {c.past_key_name(i): np.zeros(shape, np_dtype) for i in range(decoder.num_layers)}
    feeds |= {c.past_value_name(i): np.zeros(shape, np_dtype) for i in range(decoder.num_layers)}
    results = []
    with torch.no_grad():
        want, past = decoder(embeds, mask, position_ids_for(mask), decoder.empty_cache())
    feeds |= {c.INPUTS_EMBEDS: embeds.numpy().astype(np_dtype), c.ATTENTION_MASK: mask.numpy(),
              c.POSITION_IDS: position_ids_for(mask).numpy()}
    outputs = session.run(None, feeds)
    results.append(compare(f"prompt pass ({mask.shape[1]} positions)", outputs[0], want.numpy()))
    token = int(want[0, -1].argmax())
    for step in range(4):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        step_embeds = decoder.model.embed_tokens(torch.tensor([[token]]))
        positions = position_ids_for(mask)[:, -1:]
        with torch.no_grad():
            want, past = decoder(step_embeds, mask, positions, past)
        feeds = {c.INPUTS_EMBEDS: step_embeds.detach().numpy().astype(np_dtype),
                 c.ATTENTION_MASK: mask.numpy(), c.POSITION_IDS: positions.numpy()}
        for i in range(decoder.num_layers):
            feeds[c.past_key_name(i)] = outputs[1 + 2 * i]
            feeds[c.past_value_name(i)] = outputs[2 + 2 * i]
        outputs = session.run(None, feeds)
        results.append(compare(f"decode step {step + 1}", outputs[0], want.numpy()))
        token = int(want[0, -1].argmax())
    return results


def decoder_files(stage: Path) -> list[str]:
    names = [c.DECODER_FILE, c.PROMPT_EMBED_FILE, c.DECODER_EMBED_FILE, c.TOKENIZER_DIR]
    return names + ([c.DECODER_FILE + ".data"] if (stage / (c.DECODER_FILE + ".data")).exists() else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export.decoder",
        description="Export DSVL's LLaMA decoder (with MMCA when enabled) to ONNX with a KV cache, "
                    "plus both embedding tables and the tokenizer, and check it against PyTorch.")
    add_weight_flags(parser)
    add_output_flags(parser, "artifacts")
    add_kv_cache_flag(parser)
    return parser.parse_args(argv)


def add_kv_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache", choices=sorted(KV_CACHES), default="concat",
                        help="concat (default): present = concat(past, new), standard ONNX ops for "
                             "ONNX Runtime and TensorRT, MMCA supported; shared: one preallocated "
                             "buffer updated in place by ONNX Runtime's GroupQueryAttention, faster "
                             "on long contexts, ONNX Runtime only, no MMCA")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_writable(args.out)  # fail before minutes of loading, not after
    progress = Progress(total=4)
    with progress.step("loading weights"):
        from dsvl.loading import load_model

        model, tokenizer, loaded = load_model(weight_source(args))
        for note in loaded.notes:
            print(f"      {note}")
    with staged(args.out) as stage:
        result = export_decoder(model, tokenizer, loaded, stage, args.precision, args.opset,
                                args.seed, progress, args.kv_cache)
        from export.common import print_parity, versions

        print_parity(result.parity, result.section["parity"]["tolerance_rel"])
        if not result.ok:
            print("error: ONNX Runtime differs from PyTorch beyond tolerance; nothing was written")
            return 1
        publish(stage, args.out, decoder_files(stage),
                {"decoder": result.section, "tokenizer": result.tokenizer_section,
                 "versions": versions(args.opset)})
    print(f"wrote {args.out / c.DECODER_FILE} in {progress.elapsed():.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
