"""Where transformers 5 and DSVL's transformers 4.33 could differ: generation defaults and the
rotary base (docs/design.md, "transformers 4.33 vs 5")."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from dsvl.config import generation_defaults, llama_config
from dsvl.decoder import LlamaDecoder
from dsvl.errors import ConfigError
from runtime.sampling import SamplingOptions

# Llama-2-*-hf's generation_config.json: DSVL's chat samples with these, not greedily.
LLAMA2_GENERATION = {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "pad_token_id": 0,
                     "temperature": 0.6, "max_length": 4096, "top_p": 0.9,
                     "transformers_version": "4.31.0.dev0"}


def test_generation_defaults_follow_the_llama_directory(tmp_path):
    assert generation_defaults(None) == {"do_sample": False, "temperature": 1.0, "top_k": 50,
                                         "top_p": 1.0, "repetition_penalty": 1.0,
                                         "source": "transformers 4.33 defaults"}
    (tmp_path / "generation_config.json").write_text(json.dumps(LLAMA2_GENERATION))
    found = generation_defaults(tmp_path)
    assert found == {"do_sample": True, "temperature": 0.6, "top_k": 50, "top_p": 0.9,
                     "repetition_penalty": 1.0, "source": "generation_config.json"}
    (tmp_path / "generation_config.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match="generation_config.json"):
        generation_defaults(tmp_path)


def test_runtime_options_take_model_defaults_then_flags():
    defaults = {**LLAMA2_GENERATION, "top_k": 50, "repetition_penalty": 1.0}
    sampled = SamplingOptions.model_defaults(defaults, max_new_tokens=8, seed=3)
    assert (sampled.do_sample, sampled.temperature, sampled.top_k, sampled.top_p) == (True, 0.6, 50, 0.9)
    assert sampled.max_new_tokens == 8 and sampled.seed == 3
    greedy = SamplingOptions.model_defaults(defaults, do_sample=False)  # --greedy
    assert greedy.do_sample is False
    flags = SamplingOptions.model_defaults(defaults, temperature=1.2, top_k=None)
    assert (flags.temperature, flags.top_k) == (1.2, 50)
    plain = SamplingOptions.model_defaults({"do_sample": False, "temperature": 0.6, "top_k": 50})
    assert plain == SamplingOptions()  # a greedy model: the sampling knobs stay off


def test_answer_length_defaults_to_dsvl_chat_s_256():
    """chat.py's --generation_length_per_round and eval/batch_generation.py both generate up to
    256 tokens: the CLIs, the API's SamplingOptions and the server default to that."""
    from runtime import chat, generate
    from runtime.serve.__main__ import parse_args as serve_args

    assert SamplingOptions().max_new_tokens == 256
    assert generate.parse_args(["--prompt", "hi"]).max_new_tokens == 256
    assert chat.parse_args([]).max_new_tokens == 256
    assert serve_args([]).max_tokens == 256


def test_rotary_base_is_dsvl_s_10000_whatever_the_config_says():
    config = llama_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, vocab_size=50,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    decoder = LlamaDecoder(config)
    head_dim = 16
    want = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    torch.testing.assert_close(decoder.inv_freq, want, rtol=0, atol=0)
    assert config.max_position_embeddings == 4096


def test_rope_types_dsvl_cannot_run_are_refused():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, vocab_size=50,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    with pytest.raises(ConfigError, match="llama3"):
        llama_config(config)
