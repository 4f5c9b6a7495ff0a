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
from runtime.manifest import (
    Comparison,
    DecoderSection,
    FileEntry,
    Manifest,
    Parity,
    QuantizationSection,
    TokenizerSection,
    describe_dir,
)
from runtime.prompt import format_round

if TYPE_CHECKING:  # torch, transformers and onnx load only when an export runs (fast --help)
    import torch

    from dsvl.loading import Loaded
    from dsvl.model import DSVLModel

FP32_REL_TOL = 1e-4  # logits: max |ORT - PyTorch| / max |PyTorch|
FP16_REL_TOL = 5e-2
# int4/int8 weights: logits move by the quantization error itself; the check catches a broken
# graph (NaN, wrong layout: errors of order 1), not rounding. Top-1 agreement is reported.
QUANTIZED_REL_TOL = 0.5


@dataclass
class DecoderExport:
    """What a decoder export wrote into its stage: the manifest's two sections, typed."""

    section: DecoderSection
    tokenizer_section: TokenizerSection
    parity: list[dict]
    ok: bool


# --kv-cache and --decoder-graph take the contract's values (runtime/contract.py): concat (any
# backend) or shared (one buffer GroupQueryAttention updates in place: ONNX Runtime only; MMCA
# as GroupQueryAttention over duplicated query heads, fused graphs only); fused ONNX Runtime
# ops, standard ONNX ops (TensorRT) or traced (the PyTorch tracer, kept as the oracle the built
# graphs are tested against).
WEIGHTS = ("float", "int4", "int8")


def is_shared(kv_cache: str) -> bool:
    """Whether a --kv-cache value is the in-place (GroupQueryAttention) cache."""
    return c.KV_CACHE_FLAGS.get(kv_cache) == c.KV_SHARED


def resolve_kv_cache(kv_cache: str, graph: str, mmca: bool) -> str:
    """``auto``: the in-place cache for a fused graph (MMCA included: it is exact there, and
    no step copies the cache), else concat. ``mmca`` is kept for callers; it no longer decides."""
    if kv_cache != "auto":
        return kv_cache
    return c.KV_FLAG_SHARED if graph == c.GRAPH_FUSED else c.KV_FLAG_CONCAT


def check_graph_choice(graph: str, kv_cache: str, weights: str, mmca: bool) -> None:
    """The combinations a decoder graph can have, as one-line errors that name the fix."""
    if is_shared(kv_cache) and mmca and graph == c.GRAPH_TRACED:
        raise ExportError("--kv-cache shared with MMCA is built from GroupQueryAttention over "
                          "duplicated query heads, which the tracer does not write: use "
                          "--decoder-graph fused, or --kv-cache concat for a traced graph")
    if is_shared(kv_cache) and graph == c.GRAPH_STANDARD:
        raise ExportError("--kv-cache shared needs GroupQueryAttention: use --decoder-graph fused, "
                          "or --kv-cache concat for a standard-op (TensorRT) graph")
    if weights != "float" and graph != c.GRAPH_FUSED:
        raise ExportError(f"--weights {weights} writes MatMulNBits, an ONNX Runtime op: use "
                          "--decoder-graph fused (TensorRT builds its own int8/fp16 engines)")


def dynamic_axes(num_layers: int, shared_cache: bool = False) -> dict:
    """torch's ``dynamic_axes``, generated from the contract's table (runtime/graphs.py)."""
    from runtime.graphs import decoder_graph

    return decoder_graph(num_layers, c.KV_SHARED if shared_cache else c.KV_CONCAT).torch_dynamic_axes()


def export_decoder(model: DSVLModel, tokenizer, loaded: Loaded, stage: Path, precision: str,
                   opset: int, seed: int, progress: Progress, kv_cache: str = "auto",
                   graph: str = c.GRAPH_FUSED, weights: str = "float") -> DecoderExport:
    decoder = model.lang_decoder
    kv_cache = resolve_kv_cache(kv_cache, graph, decoder.mmca)
    check_graph_choice(graph, kv_cache, weights, decoder.mmca)
    shared = is_shared(kv_cache)
    what = f"{graph} ops" + (f", {weights} weights" if weights != "float" else "")
    with progress.step(f"exporting decoder.onnx ({precision}, {what}, {decoder.num_layers} layers, "
                       f"MMCA {'on' if decoder.mmca else 'off'}, {kv_cache} KV cache)"):
        if graph == c.GRAPH_TRACED:
            trace_decoder(decoder, stage, precision, opset, shared)
        else:
            state = decoder.state_dict()
            spec = graph_spec(decoder.config, decoder.mmca, precision, graph, kv_cache, weights)
            write_decoder_graph(stage, spec, lambda name: state[name].detach().float().numpy())
    with progress.step("writing embedding tables and tokenizer"):
        np_dtype = c.numpy_dtype(c.io_dtype(precision))
        np.save(stage / c.PROMPT_EMBED_FILE, model.lang_embed.weight.detach().numpy().astype(np_dtype))
        np.save(stage / c.DECODER_EMBED_FILE,
                decoder.model.embed_tokens.weight.detach().numpy().astype(np_dtype))
        tokenizer.save(stage / c.TOKENIZER_DIR)
    with progress.step("checking ONNX Runtime (CPU) against PyTorch: prompt pass + 4 decode steps"):
        embeds, mask = parity_prompt(model, tokenizer, seed)
        parity = check_decoder(decoder, embeds, mask, stage / c.DECODER_FILE, precision, shared)
    return checked_export(decoder.config, decoder.mmca, loaded, tokenizer, stage, precision, graph,
                          kv_cache, weights, parity, "full")


def checked_export(cfg, mmca: bool, loaded: Loaded, tokenizer, stage: Path, precision: str,
                   graph: str, kv_cache: str, weights: str, parity: list[dict],
                   check: str) -> DecoderExport:
    """The export's typed sections and verdict once its parity check ran (both export paths)."""
    tol = parity_tolerance(precision, weights)
    results = [Comparison.from_dict(r, "parity") for r in parity]
    section = decoder_section(cfg, mmca, loaded, stage, precision, graph, kv_cache, weights,
                              Parity(tol, results, check))
    return DecoderExport(section, tokenizer_section(tokenizer, stage), parity,
                         all(r.within(tol) for r in results))


def parity_tolerance(precision: str, weights: str) -> float:
    if weights != "float":
        return QUANTIZED_REL_TOL
    return FP32_REL_TOL if precision == "fp32" else FP16_REL_TOL


def decoder_section(cfg, mmca: bool, loaded: Loaded, stage: Path, precision: str, graph: str,
                    kv_cache: str, weights: str, parity: Parity) -> DecoderSection:
    """The manifest's decoder section (every export path writes this one), checked as a
    reader will check it."""
    heads = cfg.num_attention_heads
    section = DecoderSection(
        graph=graph,
        file=FileEntry.describe(stage, c.DECODER_FILE),
        prompt_embeddings=FileEntry.describe(stage, c.PROMPT_EMBED_FILE),
        decoder_embeddings=FileEntry.describe(stage, c.DECODER_EMBED_FILE),
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        enable_mmca_attention=mmca,
        kv_cache=c.KV_CACHE_FLAGS[kv_cache],
        quantization=quantization_section(weights) if weights != "float" else None,
        precision=precision,
        io_dtype=c.io_dtype(precision),
        weights=loaded.notes[0].removeprefix("weights: "),
        random_weights=loaded.config.preset is not None,
        generation_defaults=loaded.generation,
        parity=parity,
    )
    section.validate("decoder")
    return section


def trace_decoder(decoder, stage: Path, precision: str, opset: int, shared: bool) -> None:
    """The PyTorch tracer's decoder.onnx (the oracle for the built graphs; whole model in RAM)."""
    import contextlib
    import copy

    import torch

    from dsvl.decoder import FlatDecoder
    from export.gqa import group_query_attention
    from export.torch_onnx import export_onnx

    dtype = torch.float16 if precision == "fp16" else torch.float32
    graph_decoder = copy.deepcopy(decoder).to(dtype) if precision == "fp16" else decoder
    # Trace with a non-empty past and several new positions so no size is specialised.
    hidden = decoder.config.hidden_size
    past = [torch.zeros(1, decoder.num_kv_heads, 2, decoder.head_dim, dtype=dtype)
            for _ in range(2 * decoder.num_layers)]
    example = (torch.zeros(1, 3, hidden, dtype=dtype),
               torch.tensor([[1, 2, 2, 1, 1]]), torch.arange(2, 5).unsqueeze(0), *past)
    # the reference keeps its own attention: GroupQueryAttention only while tracing
    with group_query_attention(graph_decoder) if shared else contextlib.nullcontext():
        export_onnx(FlatDecoder(graph_decoder), example, stage / c.DECODER_FILE,
                    c.decoder_input_names(decoder.num_layers),
                    c.decoder_output_names(decoder.num_layers),
                    dynamic_axes(decoder.num_layers, shared), opset)


def graph_spec(config, mmca: bool, precision: str, graph: str, kv_cache: str, weights: str,
               layers: list[int] | None = None):
    """The builder's spec from a LlamaConfig (rotary frequencies as LlamaDecoder computes them)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from export.decoder_graph import DecoderGraphSpec
    from export.quantize import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE

    rotary = LlamaRotaryEmbedding(config)
    heads = config.num_attention_heads
    return DecoderGraphSpec(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, num_heads=heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps, max_positions=config.max_position_embeddings,
        inv_freq=rotary.inv_freq.float().numpy(), rope_scaling=float(rotary.attention_scaling),
        mmca=mmca, attention_bias=bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)), precision=precision, ops=graph,
        kv_cache=kv_cache, weights=weights, block_size=DEFAULT_BLOCK_SIZE,
        accuracy_level=DEFAULT_ACCURACY_LEVEL, layers=layers)


def write_decoder_graph(stage: Path, spec, read) -> dict:
    """Build decoder.onnx into ``stage``, streaming each weight from ``read(name)`` to
    decoder.onnx.data as it is built. Returns the written tensors' protos by name."""
    import onnx

    from export.decoder_graph import DecoderGraphBuilder
    from export.onnx_stream import ExternalData

    with ExternalData(stage / (c.DECODER_FILE + c.EXTERNAL_DATA_SUFFIX)) as store:
        model = DecoderGraphBuilder(spec, read, store).build()
    onnx.save(model, str(stage / c.DECODER_FILE))
    return store.tensors


def quantization_section(weights: str) -> QuantizationSection:
    """What export.quantize records, for weights quantized while streaming."""
    from export.head_rescore import DEFAULT_TOP_K
    from export.quantize import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, METHOD

    return QuantizationSection(bits=4 if weights == "int4" else 8, block_size=DEFAULT_BLOCK_SIZE,
                               method=METHOD, symmetric=True, accuracy_level=DEFAULT_ACCURACY_LEVEL,
                               streamed=True,
                               lm_head_rescore_top_k=DEFAULT_TOP_K if weights == "int4" else None)


def tokenizer_section(tokenizer, stage: Path) -> TokenizerSection:
    ids = tokenizer.convert_tokens_to_ids
    section = TokenizerSection(
        dir=c.TOKENIZER_DIR, files=describe_dir(stage, c.TOKENIZER_DIR),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, image_token_id=ids("<image>"),
        image_pretoken_id=ids("### Image:"), vocab_size=len(tokenizer), source=tokenizer.source)
    section.validate("tokenizer")
    return section


def parity_prompt(model: DSVLModel, tokenizer, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A real two-image DSVL prompt, spliced: covers text before, between and after images."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=generator)
    ids = torch.tensor(tokenizer(format_round("What is different between them?", 2)).input_ids)
    return model.splice(ids, model.encode_images(pixels))


def check_decoder(decoder, embeds: torch.Tensor, mask: torch.Tensor, path: Path, precision: str,
                  shared_cache: bool = False) -> list[dict]:
    """ONNX Runtime against the eager ``decoder``: the spliced prompt, then 4 greedy steps."""
    import torch

    from dsvl.generate import position_ids_for
    from export.cache_feed import CacheFeed
    from export.common import compare, ort_session

    # A shared cache is one buffer sized for the whole check; a concat cache starts empty.
    length = mask.shape[1] + 8 if shared_cache else 0
    run = CacheFeed(ort_session(path, precision), decoder.num_kv_heads, decoder.head_dim, length)
    with torch.no_grad():
        want, past = decoder(embeds, mask, position_ids_for(mask), decoder.empty_cache())
    results = [compare(f"prompt pass ({mask.shape[1]} positions)", run(embeds.numpy(), mask.numpy()),
                       want.numpy())]
    token = int(want[0, -1].argmax())
    for step in range(4):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        with torch.no_grad():
            step_embeds = decoder.model.embed_tokens(torch.tensor([[token]]))
            want, past = decoder(step_embeds, mask, position_ids_for(mask)[:, -1:], past)
        got = run(step_embeds.numpy(), mask.numpy())
        results.append(compare(f"decode step {step + 1}", got, want.numpy()))
        token = int(want[0, -1].argmax())
    return results


def decoder_files(stage: Path) -> list[str]:
    names = [c.DECODER_FILE, c.PROMPT_EMBED_FILE, c.DECODER_EMBED_FILE, c.TOKENIZER_DIR]
    return names + ([c.DECODER_FILE + c.EXTERNAL_DATA_SUFFIX] if (stage / (c.DECODER_FILE + c.EXTERNAL_DATA_SUFFIX)).exists() else [])


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
    """The decoder graph's flags: how it is made, its KV cache, its weights."""
    parser.add_argument("--decoder-graph", choices=c.DECODER_GRAPHS, default=c.GRAPH_FUSED,
                        help="fused (default): built layer by layer with ONNX Runtime's fused ops "
                             "(GroupQueryAttention with rotary, SkipSimplifiedLayerNormalization, "
                             "packed QKV and gate/up MatMuls), the fastest on ONNX Runtime, weights "
                             "streamed so the model never sits whole in RAM; standard: built the "
                             "same way from plain ONNX ops, for TensorRT (export.engine); traced: "
                             "the PyTorch tracer (whole model in RAM)")
    parser.add_argument("--kv-cache", choices=("auto", *sorted(c.KV_CACHE_FLAGS)), default="auto",
                        help="auto (default): shared for a fused graph (MMCA included), else "
                             "concat; shared: one preallocated buffer updated in place by "
                             "GroupQueryAttention, no per-step cache copy, ONNX Runtime only "
                             "(fused graph; traced without MMCA); concat: present = "
                             "concat(past, new), any backend")
    parser.add_argument("--weights", choices=WEIGHTS, default="float",
                        help="float (default): --precision's type; int4/int8: each MatMul weight "
                             "quantized as it is written (ONNX Runtime MatMulNBits, symmetric, "
                             "block 32, as export.quantize does), so the float model is never held "
                             "whole; needs --decoder-graph fused")
    parser.add_argument("--parity-check", choices=("auto", "full", "layers"), default="auto",
                        help="how the decoder is checked against PyTorch: full builds the eager "
                             "model and runs the whole graph; layers runs the first and last "
                             "layers (+ norm and LM head) layer by layer with lazily loaded "
                             "weights, in bounded memory; auto (default): full up to a 2 GiB "
                             "fp32 decoder, layers above")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_writable(args.out)  # fail before minutes of loading, not after
    progress = Progress(total=4)
    src = weight_source(args)
    if args.decoder_graph == c.GRAPH_TRACED:
        with progress.step("loading weights"):
            from dsvl.loading import load_model

            model, tokenizer, loaded = load_model(src)
            for note in loaded.notes:
                print(f"      {note}")
    else:
        from export import decoder_stream as stream

        with progress.step("opening the weights; encoding the check's two images"):
            vision, loaded, tokenizer, weights = stream.open_sources(src)
            image_embeds = stream.parity_images(vision, loaded.config.image_size, args.seed)
            del vision
    with staged(args.out) as stage:
        if args.decoder_graph == c.GRAPH_TRACED:
            result = export_decoder(model, tokenizer, loaded, stage, args.precision, args.opset,
                                    args.seed, progress, args.kv_cache, args.decoder_graph, args.weights)
        else:
            result = stream.stream_decoder(weights, tokenizer, loaded, stage, args.precision,
                                           args.decoder_graph, args.kv_cache, args.weights,
                                           image_embeds, progress, args.parity_check)
        from export.common import print_parity, versions

        print_parity(result.parity, result.section.parity.tolerance_rel)
        if not result.ok:
            print("error: ONNX Runtime differs from PyTorch beyond tolerance; nothing was written")
            return 1
        publish(stage, args.out, decoder_files(stage),
                Manifest(decoder=result.section, tokenizer=result.tokenizer_section,
                         versions=versions(args.opset)))
    print(f"wrote {args.out / c.DECODER_FILE} in {progress.elapsed():.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
