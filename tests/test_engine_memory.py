"""export/engine_memory.py: decoder memory computed from shapes (the Jetson README's table)."""

from __future__ import annotations

import pytest

from export import engine as eng
from export import engine_memory as mem

DSVL_7B = mem.DecoderDims(layers=32, heads=32, kv_heads=32, head_dim=128, hidden=4096,
                          intermediate=11008, vocab=32003, mmca=True)


def test_weights_and_kv_cache_of_dsvl_7b():
    # LLaMA-2-7B layers + final norm + lm_head over 32003 tokens: 6.607 B parameters, fp16
    assert mem.weight_bytes(DSVL_7B) == 2 * (32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096)
                                             + 4096 + 32003 * 4096)
    assert round(mem.weight_bytes(DSVL_7B) / 2 / 1e9, 3) == 6.607
    # 512 MiB per 1k positions, twice for the ping-pong buffers
    assert mem.kv_cache_bytes(DSVL_7B, 1024, ping_pong=False) == 512 * 2**20
    assert mem.kv_cache_bytes(DSVL_7B, 4096) == 4 * mem.GIB


def test_activation_estimate_counts_the_score_tensors():
    plain = mem.DecoderDims(layers=1, heads=2, kv_heads=1, head_dim=4, hidden=8,
                            intermediate=16, vocab=10, mmca=False)
    seq, keys = 3, 5
    expected = (2 * 2 * seq * keys * 4 + seq * keys * 4 + 2 * 2 * keys * 4 * 2
                + 3 * seq * 16 * 2 + 4 * seq * 8 * 4 + seq * 10 * 6)
    assert mem.activation_bytes(plain, seq, keys) == expected
    mmca = mem.DecoderDims(**{**plain.__dict__, "mmca": True})
    assert mem.activation_bytes(mmca, seq, keys) - expected == 2 * seq * keys * 4 + seq * keys * 4


def test_profiles_bound_what_the_old_prefill_needed():
    """The former prefill profile sized attention at [heads, C, 2C-1]: about 4.3 GB per fp32
    score tensor for dsvl-7b at C = 4096; the new profiles stay within C-1 + 512 keys."""
    decoder = mem.preset_decoder("dsvl-7b", mmca=True)
    assert mem.DecoderDims.from_section(decoder) == DSVL_7B
    prompt, append, decode = eng.decoder_profiles(decoder, max_context=4096)
    assert 32 * 4096 * (4095 + 4096) * 4 == pytest.approx(4.3e9, rel=2e-3)
    plan = mem.plan_memory(DSVL_7B, [prompt, append, decode], 4096)
    assert plan.profiles["append"] < plan.profiles["prompt"] and plan.largest() == "prompt"
    assert plan.profiles["decode"] < 2**26
    assert plan.static == plan.weights + plan.kv_cache + plan.profiles["prompt"]
    assert plan.on_profile_change("decode") < plan.static


def test_preset_table_is_labelled_and_shows_both_plans():
    table = mem.preset_table("dsvl-7b", (2048, 4096))
    lines = table.splitlines()
    assert lines[0].startswith("| GiB, computed from shapes | C = 2048, MMCA on | C = 4096, MMCA on")
    row = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert "12.31" in row["decoder weights"] and "4.00" in row["KV cache, 2 ping-pong buffers"]
    assert "before: total, STATIC context" in row and "activations, profile `append`" in row
    assert len(lines) == 2 + 10
