"""Qwen-VL's ViT (DSVL's qwen-clip) in dsvl/: the details that are easy to get wrong, each checked
against an independent computation written here, plus presets, encoder choice and profiles.

No export here (fast): export and runtime parity are in test_qwen_export.py / test_qwen_runtime.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsvl import config as cfgmod
from dsvl.config import QwenVisionConfig
from dsvl.errors import ConfigError
from dsvl.loading import WeightSource, load_vision, resolve_vis_proj, resolve_vision_encoder
from dsvl.qwen_vision import QwenVisionTransformer, Resampler, VisualAttention, abs_pos
from export import engine as eng

TINY = QwenVisionConfig(width=64, layers=2, heads=2, mlp_size=128, patch_size=14, image_size=56,
                        output_dim=256)


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every parameter off its init (LayerNorm ones/zeros, zero biases, sin-cos table)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return module.eval()


def bicubic(table: torch.Tensor, side: int) -> torch.Tensor:
    src = int(math.sqrt(table.shape[0]))
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(side * side, -1)


@torch.no_grad()
def test_fused_in_proj_is_split_per_head():
    """Rows [h*3d, (h+1)*3d) of in_proj are head h's q, k, v in turn (not [q; k; v] blocks)."""
    torch.manual_seed(0)
    attn = perturb(VisualAttention(width=12, heads=3), 1)
    x = torch.randn(5, 2, 12)  # [tokens, images, width]
    d = 4
    w, b = attn.in_proj.weight, attn.in_proj.bias
    heads = []
    for h in range(3):
        rows = slice(3 * d * h, 3 * d * (h + 1))
        wq, wk, wv = w[rows].split(d)
        bq, bk, bv = b[rows].split(d)
        q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv  # [tokens, images, d]
        scores = torch.einsum("tid,sid->its", q, k) / math.sqrt(d)
        heads.append(torch.einsum("its,sid->tid", scores.softmax(-1), v))
    want = attn.out_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x), want, atol=1e-6, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize(("tokens", "images"), [(16, 1), (36, 3), (256, 2)])
def test_resampler_positions_and_graph_attention(tokens, images):
    """Queries get the unscaled 16x16 table, keys the table resized to the token grid, values
    none; nn.MultiheadAttention's [q; k; v] layout; the export's spelled-out attention agrees."""
    torch.manual_seed(0)
    pool = perturb(Resampler(embed_dim=256, kv_dim=64), 2)
    x = torch.randn(images, tokens, 64)
    side = int(math.sqrt(tokens))
    kv = pool.ln_kv(x @ pool.kv_proj.weight.T).permute(1, 0, 2)
    queries = pool.ln_q(pool.query).unsqueeze(1).repeat(1, images, 1) + pool.pos_embed.unsqueeze(1)
    keys = kv + bicubic(pool.pos_embed, side).unsqueeze(1)
    want = F.multi_head_attention_forward(
        queries, keys, kv, 256, 2, pool.attn.in_proj_weight, pool.attn.in_proj_bias, None, None,
        False, 0.0, pool.attn.out_proj.weight, pool.attn.out_proj.bias, training=False,
        need_weights=False)[0].permute(1, 0, 2)
    eager = pool(x)
    pool.graph_friendly = True
    graph = pool(x)
    assert eager.shape == (images, 256, 256)
    scale = want.abs().max().item()
    assert (eager - want).abs().max().item() <= 1e-6 * scale
    assert (graph - want).abs().max().item() <= 1e-5 * scale  # matrix resize: ~2e-6


@torch.no_grad()
@pytest.mark.parametrize("side", [4, 16, 32])
def test_abs_pos_interpolates_in_fp32(side):
    table = torch.randn(256, 8, generator=torch.Generator().manual_seed(3)).half()
    want = table if side == 16 else bicubic(table, side).half()  # fp32 math, cast back
    for graph in (False, True):
        got = abs_pos(table, side * side, graph)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want.float(), atol=1e-3, rtol=0)


@torch.no_grad()
def test_vit_output_and_eps():
    torch.manual_seed(0)
    model = perturb(QwenVisionTransformer(TINY), 4)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert model.conv1.bias is None
    assert all(isinstance(b.mlp.gelu, torch.nn.GELU) and b.mlp.gelu.approximate == "none"
               for b in model.transformer.resblocks)
    assert "proj" not in model.state_dict()  # DSVL's extraction drops Qwen-VL's output proj
    for size in (56, 84):
        x = torch.randn(3, 3, size, size)
        eager = model(x)
        model.set_graph_friendly(True)
        graph = model(x)
        model.set_graph_friendly(False)
        assert isinstance(eager, torch.Tensor) and eager.shape == (3, 256, 256)
        torch.testing.assert_close(graph, eager, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="square"):
        model(torch.randn(1, 3, 56, 84))


def test_qwen_13b_preset_shapes():
    """DSVL's chat recipe: bigG/14 at 448 px (about 2B parameters with the resampler) + 13B."""
    qcfg = cfgmod.qwen_config_from_preset("dsvl-qwen-13b")
    assert (qcfg.width, qcfg.layers, qcfg.heads, qcfg.mlp_size, qcfg.patch_size) == (1664, 48, 16, 8192, 14)
    assert (qcfg.image_size, qcfg.output_dim) == (448, 4096)
    vision = qcfg.projector_config(cfgmod.vision_config_from_preset("dsvl-qwen-13b"))
    assert vision.hidden_size == 4096 and vision.num_attention_heads == 16
    assert vision.hidden_act == "gelu" and vision.layer_norm_eps == 1e-5
    lang = cfgmod.lang_config_from_preset("dsvl-qwen-13b", cfgmod.base_vocab_size("dsvl-qwen-13b") + 3)
    assert (lang.hidden_size, lang.num_hidden_layers, lang.num_attention_heads, lang.vocab_size) == (
        5120, 40, 40, 32003)
    with torch.device("meta"):
        model = QwenVisionTransformer(qcfg)
    params = sum(p.numel() for p in model.parameters())
    assert 1.9e9 < params < 2.0e9, params
    assert model.attn_pool.num_heads == 32


def test_vision_encoder_choice(tmp_path):
    def kind(**kw):
        return resolve_vision_encoder(WeightSource(**kw))[0]

    assert kind(preset="tiny") == "clip" and kind(preset="qwen-tiny") == "qwen"
    assert kind(vision_model=tmp_path / "Qwen-VL-clip") == "qwen"  # DSVL: 'qwen' in the path
    assert kind(vision_model=tmp_path / "clip-vit") == "clip"
    assert kind(vision_model=tmp_path / "Qwen-VL-clip", vision_encoder="clip") == "clip"
    assert kind(vision_model=tmp_path / "vit-bigg", vision_encoder="qwen") == "qwen"
    with pytest.raises(ConfigError, match="contradicts --preset tiny"):
        kind(preset="tiny", vision_encoder="qwen")


def test_perceiver_is_refused_on_qwen():
    with pytest.raises(ConfigError) as info:
        load_vision(WeightSource(preset="qwen-tiny", vis_proj="perceiver"))
    message = str(info.value)
    assert "\n" not in message and "255" in message and "256" in message and "DSVL" in message
    # a checkpoint whose keys say perceiver is refused the same way
    with pytest.raises(ConfigError, match="checkpoint's perceiver"):
        resolve_vis_proj(None, {"projection.query": torch.zeros(1)}, "qwen")
    # with no checkpoint and no --vis-proj, qwen gets DSVL's only allowed projector
    assert resolve_vis_proj(None, None, "qwen")[0] == "baseline"
    assert resolve_vis_proj(None, None, "clip")[0] == "perceiver"


def test_tensorrt_profiles_know_qwen_shapes():
    """export.engine reads sizes from the manifest: 448 px, patch 14, 256 tokens per image."""
    from fake_manifests import fake_decoder, fake_vision

    from runtime import graphs as g

    vision = fake_vision(image_size=448, patch_size=14, dynamic=True, image_tokens=256,
                         vis_proj="baseline", lang_dim=5120)
    vision.vision_encoder = "qwen"
    profile = eng.vision_profile(vision)
    assert profile.axes[g.HEIGHT] == profile.axes[g.WIDTH] == eng.Range(448, 448, 448)
    dynamic = eng.vision_profile(vision, resolution=eng.Range(224, 448, 476))
    assert dynamic.axes[g.HEIGHT].max == 476
    with pytest.raises(eng.EngineBuildError, match="multiple of the patch size 14"):
        eng.vision_profile(vision, resolution=eng.Range(224, 448, 450))
    prompt = eng.decoder_profiles(fake_decoder(max_positions=4096), vision.image_tokens)[0]
    assert prompt.name == "prompt" and prompt.axes[g.SEQUENCE] == eng.Range(1, 256 + 64, 4096)


def test_help_names_the_encoder_flag_and_presets(capsys):
    import export.vision as ev

    with pytest.raises(SystemExit):
        ev.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--vision-encoder {clip,qwen}" in text
    assert "qwen-tiny" in text and "dsvl-qwen-13b" in text


def test_dsvl_helper_config_gives_bigg_shapes(tmp_path):
    """DSVL's helper/qwen_clip/config.json (laion's ViT-bigG CLIPModel config, abridged here but
    with its extra keys) reads as the ``dsvl-qwen-13b`` shapes, with DSVL's 448 px and 4096."""
    import json

    from dsvl.qwen_loading import read_config

    vision = {"hidden_act": "gelu", "hidden_size": 1664, "image_size": 224, "intermediate_size": 8192,
              "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 16,
              "num_channels": 3, "num_hidden_layers": 48, "patch_size": 14, "id2label": {"0": "LABEL_0"},
              "_name_or_path": "", "transformers_version": "4.24.0", "torch_dtype": None}
    raw = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 1280,
           "text_config": {"hidden_size": 1280}, "vision_config": vision,
           "vision_config_dict": {"hidden_size": 1664}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    clip, qwen = read_config(tmp_path)
    assert qwen == cfgmod.qwen_config_from_preset("dsvl-qwen-13b")
    assert clip.hidden_act == "gelu" and clip.layer_norm_eps == 1e-5
