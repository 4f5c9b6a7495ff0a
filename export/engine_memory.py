"""What a decoder engine needs in device memory, COMPUTED FROM SHAPES (not measured).

TensorRT sizes each profile's activation memory for that profile's largest shapes, and a
context created with the default STATIC allocation holds the largest profile's all the time
(NvInferRuntime.h, ExecutionContextAllocationStrategy::kSTATIC: "maximum size across all
profiles"). The estimate here is what an unfused attention would hold, one layer at a time
(TensorRT reuses activation memory between layers): fp32 scores [heads, seq, past + seq] with
2 such tensors live (scores, probabilities), 3 with MMCA (two softmaxes), plus the MLP, the
repeated keys/values of grouped-query attention and the logits. Fused attention kernels need
less; use it as an upper bound to choose profiles, and replace it with
``get_device_memory_size_for_profile_v2`` (recorded in the manifest by a real build) when known.

No torch: ``export.engine`` runs on a Jetson without PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime import contract as c
from runtime import graphs as g
from runtime.manifest import DecoderSection, FileEntry

GIB = 2**30
FP32, FP16 = 4, 2


@dataclass(frozen=True)
class DecoderDims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    mmca: bool
    itemsize: int = FP16  # weights, KV cache and activations of an fp16 export

    @classmethod
    def from_section(cls, decoder: DecoderSection) -> DecoderDims:
        return cls(layers=decoder.num_layers, heads=decoder.num_heads, kv_heads=decoder.num_kv_heads,
                   head_dim=decoder.head_dim, hidden=decoder.hidden_size,
                   intermediate=decoder.intermediate_size, vocab=decoder.vocab_size,
                   mmca=decoder.enable_mmca_attention,
                   itemsize=FP32 if decoder.precision == "fp32" else FP16)


def weight_bytes(dims: DecoderDims) -> int:
    """Layers, final norm and lm_head (the input embedding table stays on the host)."""
    kv_width = dims.kv_heads * dims.head_dim
    per_layer = (2 * dims.hidden * dims.heads * dims.head_dim + 2 * dims.hidden * kv_width
                 + 3 * dims.hidden * dims.intermediate + 2 * dims.hidden)
    return (dims.layers * per_layer + dims.hidden + dims.vocab * dims.hidden) * dims.itemsize


def kv_cache_bytes(dims: DecoderDims, max_context: int, ping_pong: bool = True) -> int:
    """Key and value of every layer for ``max_context`` positions; the TensorRT runner keeps
    two such buffers (present is written next to past, then they swap)."""
    one = 2 * dims.layers * dims.kv_heads * max_context * dims.head_dim * dims.itemsize
    return 2 * one if ping_pong else one


def activation_bytes(dims: DecoderDims, seq: int, keys: int) -> int:
    """One layer's peak for ``seq`` new positions attending to ``keys`` (= past + seq)."""
    live_scores = 3 if dims.mmca else 2
    attention = live_scores * dims.heads * seq * keys * FP32
    masks = (2 if dims.mmca else 1) * seq * keys * FP32
    repeated_kv = 2 * dims.heads * keys * dims.head_dim * dims.itemsize if (
        dims.kv_heads != dims.heads) else 0
    mlp = 3 * seq * dims.intermediate * dims.itemsize
    hidden = 4 * seq * dims.hidden * FP32
    logits = seq * dims.vocab * (dims.itemsize + FP32)  # the graph's logits and an fp32 copy
    return attention + masks + repeated_kv + mlp + hidden + logits


def profile_activation_bytes(dims: DecoderDims, axes: dict[str, Any]) -> int:
    """A profile sizes every tensor for its largest shapes: concat(past, new) holds
    past.max + seq.max positions even where the runtime never passes both maxima at once."""
    seq, past = axes[g.SEQUENCE].max, axes[g.PAST].max
    return activation_bytes(dims, seq, past + seq)


@dataclass(frozen=True)
class MemoryPlan:
    weights: int
    kv_cache: int
    profiles: dict[str, int]  # activation estimate per profile

    @property
    def static(self) -> int:
        """Weights + KV + the largest profile, held all the time (kSTATIC)."""
        return self.weights + self.kv_cache + max(self.profiles.values())

    def on_profile_change(self, name: str) -> int:
        """What a kON_PROFILE_CHANGE context holds while profile ``name`` is selected."""
        return self.weights + self.kv_cache + self.profiles[name]

    def largest(self) -> str:
        return max(self.profiles, key=self.profiles.__getitem__)


def plan_memory(dims: DecoderDims, profiles: list[Any], max_context: int) -> MemoryPlan:
    """``profiles``: export.engine Profiles (name + axes sequence/past_sequence)."""
    return MemoryPlan(weight_bytes(dims), kv_cache_bytes(dims, max_context),
                      {p.name: profile_activation_bytes(dims, p.axes) for p in profiles})


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}" if nbytes >= GIB / 100 else "<0.01"


def memory_table(plans: dict[str, tuple[MemoryPlan, MemoryPlan]]) -> str:
    """A markdown table in GiB, one column per label: the new prompt/append/decode plan, then
    the former prefill/decode plan ("before"), all computed from shapes."""
    labels = list(plans)
    old_plans = [plans[label][0] for label in labels]
    new_plans = [plans[label][1] for label in labels]
    rows = [("decoder weights", [gib(p.weights) for p in new_plans]),
            ("KV cache, 2 ping-pong buffers", [gib(p.kv_cache) for p in new_plans])]
    rows += [(f"activations, profile `{name}`", [gib(p.profiles[name]) for p in new_plans])
             for name in new_plans[0].profiles]
    rows += [("**total, STATIC context**", [f"**{gib(p.static)}**" for p in new_plans]),
             ("total while decoding, ON_PROFILE_CHANGE",
              [gib(p.on_profile_change("decode")) for p in new_plans])]
    rows += [(f"before: activations, profile `{name}`", [gib(p.profiles[name]) for p in old_plans])
             for name in old_plans[0].profiles]
    rows += [("before: total, STATIC context", [gib(p.static) for p in old_plans])]
    lines = ["| GiB, computed from shapes | " + " | ".join(labels) + " |",
             "| --- |" + " --- |" * len(labels)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines) + "\n"


def preset_decoder(name: str, mmca: bool) -> DecoderSection:
    """The decoder section an fp16 export of a dsvl preset would have (vocabulary + DSVL's 3
    tokens); its file entries are placeholders: nothing here is written."""
    from dsvl.presets import PRESETS  # shapes only: no torch

    lang = PRESETS[name]["lang"]
    none = FileEntry("-", 0, "")
    return DecoderSection(
        file=none, prompt_embeddings=none, decoder_embeddings=none,
        num_layers=lang["num_hidden_layers"], num_heads=lang["num_attention_heads"],
        num_kv_heads=lang["num_key_value_heads"],
        head_dim=lang["hidden_size"] // lang["num_attention_heads"], hidden_size=lang["hidden_size"],
        intermediate_size=lang["intermediate_size"], vocab_size=lang["base_vocab_size"] + 3,
        max_position_embeddings=4096, enable_mmca_attention=mmca, precision="fp16",
        io_dtype=c.io_dtype("fp16"), random_weights=True)


def preset_table(name: str = "dsvl-7b", contexts: tuple[int, ...] = (2048, 4096)) -> str:
    """The Jetson README's table: default flags (first prompt up to C, append 512), MMCA on and
    off, against the former prefill (seq 1..C over past 0..C-1) + decode plan."""
    from export.engine import BATCH, Profile, Range, decoder_profiles

    plans = {}
    for mmca in (True, False):
        decoder = preset_decoder(name, mmca)
        dims = DecoderDims.from_section(decoder)
        for context in contexts:
            new = decoder_profiles(decoder, image_tokens=256, max_context=context)
            prefill = Profile("prefill", {g.BATCH: BATCH, g.SEQUENCE: Range(1, 320, context),
                                          g.PAST: Range(0, 0, context - 1)})
            old = [prefill, new[-1]]
            plans[f"C = {context}, MMCA {'on' if mmca else 'off'}"] = (
                plan_memory(dims, old, context), plan_memory(dims, new, context))
    return memory_table(plans)


if __name__ == "__main__":
    import sys

    print(preset_table(*sys.argv[1:2]))
