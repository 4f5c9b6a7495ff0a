"""Real weights: a Hugging Face CLIP directory, a LLaMA directory and a DSVL pytorch_model.bin.

The tests write all three themselves (small shapes), export through the CLI's flags, and check
ONNX Runtime against a PyTorch model built independently from the saved tensors (transformers'
CLIPVisionModel + ``build_projector`` + strict ``load_state_dict``), not through dsvl.loading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig
from transformers.utils import logging as hf_logging

import export.vision as ev
from dsvl.loading import CHECKPOINT_FILE, LoadError, WeightSource, load_vision
from dsvl.projectors import build_projector, sincos_pos_embed_2d

try:
    from transformers import CLIPImageProcessorPil as ImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor as ImageProcessor

hf_logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
PROJS = ("baseline", "vit", "perceiver")
VIS = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
           image_size=56, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
LANG_DIM = 128
MEAN = [0.5, 0.25, 0.125]  # not CLIP's: proves the preprocessor config comes from the dir
STD = [0.2, 0.3, 0.4]
OLD, NEW = "vis_encoder.vision_model.", "vis_encoder."
FP32_REL_TOL = 1e-4
# lang_* keys in a DSVL checkpoint; deliberately odd shapes: vision loading must ignore them
LANG_JUNK = {"lang_decoder.model.embed_tokens.weight": (7, 3), "lang_decoder.lm_head.weight": (5, 5),
             "lang_decoder.model.layers.0.self_attn.q_proj.weight": (2, 9), "lang_embed.weight": (3, 2)}


def vis_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(**VIS)


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every float tensor moved off its init (LayerNorm ones/zeros, sin-cos pos_embed...)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v).clone()
            for k, v in state.items()}


@dataclass
class World:
    root: Path
    clip_dir: Path
    llama_dir: Path
    clip_state: dict[str, torch.Tensor]  # what the CLIP dir holds
    vis_state: dict[str, torch.Tensor]  # what the checkpoint's vis_encoder.* hold
    proj_states: dict[str, dict[str, torch.Tensor]]  # projector keys (no prefix), per type
    checkpoints: dict[str, Path] = field(default_factory=dict)  # dirs with pytorch_model.bin

    def full_state(self, vis_proj: str, layout: str = OLD) -> dict[str, torch.Tensor]:
        state = {layout + k: v for k, v in self.vis_state.items()}
        if layout == OLD:  # transformers < 4.31 saved the position_ids buffer too
            state[OLD + "embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
        state |= {"projection." + k: v for k, v in self.proj_states[vis_proj].items()}
        gen = torch.Generator().manual_seed(9)
        state |= {k: torch.randn(shape, generator=gen) for k, shape in LANG_JUNK.items()}
        return state

    def save(self, name: str, state: dict) -> Path:
        folder = self.root / "ckpt" / name
        folder.mkdir(parents=True)
        torch.save(state, folder / CHECKPOINT_FILE)
        return folder

    def args(self, vis_proj: str | None = None, checkpoint: Path | None = None) -> list[str]:
        argv = ["--vision-model-name-or-path", str(self.clip_dir),
                "--lm-model-name-or-path", str(self.llama_dir)]
        if checkpoint is not None:
            argv += ["--checkpoint-path", str(checkpoint)]
        if vis_proj is not None:
            argv += ["--vis-proj", vis_proj]
        return argv

    def source(self, vis_proj: str | None = None, checkpoint: Path | None = None) -> WeightSource:
        return WeightSource(vision_model=self.clip_dir, lm_model=self.llama_dir,
                            checkpoint=checkpoint, vis_proj=vis_proj)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("weights")
    clip_dir, llama_dir = root / "clip", root / "llama"
    torch.manual_seed(1)
    clip = CLIPVisionModel(vis_config())
    clip.save_pretrained(clip_dir)
    ImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                   image_mean=MEAN, image_std=STD).save_pretrained(clip_dir)
    LlamaConfig(hidden_size=LANG_DIM, intermediate_size=256, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=100).save_pretrained(llama_dir)
    torch.manual_seed(2)
    vis_state = perturbed(CLIPVisionModel(vis_config()).state_dict(), seed=2)
    proj_states = {}
    for i, vis_proj in enumerate(PROJS):
        torch.manual_seed(10 + i)
        proj_states[vis_proj] = perturbed(build_projector(vis_proj, vis_config(), LANG_DIM).state_dict(),
                                          seed=10 + i)
    w = World(root, clip_dir, llama_dir, {k: v.clone() for k, v in clip.state_dict().items()},
              vis_state, proj_states)
    for vis_proj in PROJS:
        w.checkpoints[vis_proj] = w.save(vis_proj, w.full_state(vis_proj))
    return w


def reference(world: World, vis_proj: str, x: np.ndarray) -> np.ndarray:
    """CLIP last_hidden_state then the projector, from the checkpoint's own tensors."""
    clip = CLIPVisionModel(vis_config())
    clip.load_state_dict(world.vis_state, strict=True)
    proj = build_projector(vis_proj, vis_config(), LANG_DIM)
    proj.load_state_dict(world.proj_states[vis_proj], strict=True)
    clip.eval()
    proj.eval()
    pixels = torch.from_numpy(x)
    with torch.no_grad():
        hidden = clip(pixel_values=pixels, interpolate_pos_encoding=x.shape[-1] != 56).last_hidden_state
        return proj(hidden).numpy()


@pytest.fixture(scope="session")
def cli_exports(world, tmp_path_factory):
    """One dynamic-resolution export per projector, through the CLI's flags, with no --vis-proj
    (the type is inferred from the checkpoint's keys)."""
    cache: dict[str, Path] = {}

    def get(vis_proj: str) -> Path:
        if vis_proj not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-export-{vis_proj}")
            argv = world.args(checkpoint=world.checkpoints[vis_proj]) + [
                "--dynamic-resolution", "--out", str(out)]
            assert ev.main(argv) == 0
            cache[vis_proj] = out
        return cache[vis_proj]

    return get


# ------------------------------------------------------------------ export from real weights
@pytest.mark.parametrize("vis_proj", PROJS)
def test_cli_export_matches_saved_weights(vis_proj, world, cli_exports):
    out = cli_exports(vis_proj)
    assert not list(out.glob(".partial-*"))
    vision = json.loads((out / "manifest.json").read_text())["vision"]
    assert vision["vis_proj"] == vis_proj  # inferred: no --vis-proj was given
    assert vision["random_weights"] is False
    assert vision["vis_dim"] == VIS["hidden_size"] and vision["lang_dim"] == LANG_DIM
    assert vision["image_size"] == 56
    assert all(r["max_rel_err"] <= FP32_REL_TOL for r in vision["parity"]["results"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(out / "vision.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(42)
    for size in (56, 84):
        for images in (1, 3):
            x = rng.standard_normal((images, 3, size, size)).astype(np.float32)
            got = session.run(None, {"pixel_values": x})[0]
            want = reference(world, vis_proj, x)
            tokens = 256 if vis_proj == "perceiver" else (size // 14) ** 2 + 1
            assert got.shape == want.shape == (images, tokens, LANG_DIM)
            err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            print(f"checkpoint {vis_proj} {images}x{size}: rel err {err:.3e}")
            assert err <= FP32_REL_TOL


@pytest.mark.parametrize("vis_proj", PROJS)
def test_preprocessor_config_comes_from_clip_dir(vis_proj, cli_exports):
    pre = json.loads((cli_exports(vis_proj) / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == pytest.approx(MEAN)
    assert pre["image_std"] == pytest.approx(STD)
    assert pre["crop_size"] == {"height": 56, "width": 56}
    assert pre["size"] == {"shortest_edge": 56}


# ------------------------------------------------------------------ what gets loaded
def assert_state(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    assert set(expected) <= set(own)
    for key, value in expected.items():
        assert torch.equal(own[key], value.to(own[key].dtype)), key


def test_clip_dir_alone_loads_its_weights(world):
    model, loaded = load_vision(world.source(vis_proj="baseline"))
    assert_state(model.vis_encoder, world.clip_state)
    assert loaded.config.lang_dim == LANG_DIM
    assert any("RANDOM" in note for note in loaded.notes)  # no checkpoint: projector is random


def test_checkpoint_overrides_clip_dir(world):
    model, _ = load_vision(world.source(checkpoint=world.checkpoints["perceiver"]))
    own = model.vis_encoder.state_dict()
    for key, dir_value in world.clip_state.items():
        assert not torch.equal(world.vis_state[key], dir_value), key  # the fixture's premise
        assert torch.equal(own[key], world.vis_state[key]), key
    assert_state(model.projection, world.proj_states["perceiver"])


def test_perceiver_pos_embed_comes_from_checkpoint(world):
    model, _ = load_vision(world.source(checkpoint=world.checkpoints["perceiver"]))
    pos = model.projection.pos_embed.detach()
    sincos = torch.from_numpy(sincos_pos_embed_2d(LANG_DIM, 16)).float()
    assert torch.equal(pos, world.proj_states["perceiver"]["pos_embed"])
    assert not torch.allclose(pos, sincos, atol=1e-3)


@pytest.mark.parametrize("fmt", ["new-layout", "file-path", "bf16", "deepspeed-module"])
def test_checkpoint_formats(fmt, world):
    vis_proj = "perceiver"
    if fmt == "new-layout":  # transformers 5 saves vis_encoder.* without vision_model.
        path = world.save(fmt, world.full_state(vis_proj, layout=NEW))
    elif fmt == "file-path":
        path = world.checkpoints[vis_proj] / CHECKPOINT_FILE
    elif fmt == "bf16":  # DSVL trains and saves in bf16
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                 for k, v in world.full_state(vis_proj).items()}
        path = world.save(fmt, state)
    else:
        path = world.save(fmt, {"module": world.full_state(vis_proj)})
    model, loaded = load_vision(world.source(checkpoint=path))
    assert loaded.config.vis_proj == vis_proj
    cast = (lambda t: t.to(torch.bfloat16).float()) if fmt == "bf16" else (lambda t: t)
    assert_state(model.vis_encoder, {k: cast(v) for k, v in world.vis_state.items()})
    assert_state(model.projection, {k: cast(v) for k, v in world.proj_states[vis_proj].items()})


@pytest.mark.parametrize("vis_proj", PROJS)
def test_projector_type_inferred_from_keys(vis_proj, world):
    model, loaded = load_vision(world.source(checkpoint=world.checkpoints[vis_proj]))
    assert model.vis_proj == loaded.config.vis_proj == vis_proj
    assert any("inferred" in note for note in loaded.notes)
    assert_state(model.projection, world.proj_states[vis_proj])
    # naming the right type explicitly works too
    model, _ = load_vision(world.source(vis_proj=vis_proj, checkpoint=world.checkpoints[vis_proj]))
    assert model.vis_proj == vis_proj


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(("requested", "held"), [("vit", "perceiver"), ("baseline", "vit"),
                                                 ("perceiver", "baseline")])
def test_vis_proj_contradicting_checkpoint(requested, held, world):
    with pytest.raises(LoadError) as info:
        load_vision(world.source(vis_proj=requested, checkpoint=world.checkpoints[held]))
    message = str(info.value)
    assert "\n" not in message
    assert requested in message and held in message


@pytest.fixture(scope="module", autouse=True)
def contradiction_cli(world, tmp_path_factory):
    """``--vis-proj vit`` with a perceiver checkpoint, as a real process. Started before the
    module's first test so its torch/transformers import overlaps the in-process tests."""
    out = tmp_path_factory.mktemp("contradiction") / "out"
    argv = world.args(vis_proj="vit", checkpoint=world.checkpoints["perceiver"]) + ["--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "export.vision", *argv], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_cli_vis_proj_contradiction_exits_2(contradiction_cli):
    proc, out = contradiction_cli
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:")
    assert "--vis-proj vit" in lines[0] and "'perceiver'" in lines[0]
    assert not out.exists() or not list(out.iterdir())


MISSING = [("baseline", "1.bias"), ("baseline", "0.weight"),
           ("vit", "vis_layer.self_attn.q_proj.weight"), ("vit", "projection.1.weight"),
           ("perceiver", "pos_embed"), ("perceiver", "attn.in_proj_weight"), ("perceiver", "query")]


@pytest.mark.parametrize("explicit", [True, False], ids=["with-vis-proj", "inferred"])
@pytest.mark.parametrize(("vis_proj", "key"), MISSING)
def test_missing_projector_key_is_named(vis_proj, key, explicit, world):
    state = world.full_state(vis_proj)
    del state["projection." + key]
    path = world.save(f"missing-{vis_proj}-{key}-{explicit}", state)
    with pytest.raises(LoadError) as info:
        load_vision(world.source(vis_proj=vis_proj if explicit else None, checkpoint=path))
    message = str(info.value)
    assert "\n" not in message
    if explicit or key not in ("0.weight", "query"):
        assert "projection." + key in message
    else:  # the key that identifies the type is gone: the type cannot be inferred
        assert "--vis-proj" in message


def test_checkpoint_without_projection_keys(world):
    state = {k: v for k, v in world.full_state("baseline").items() if not k.startswith("projection.")}
    path = world.save("no-projection", state)
    for vis_proj in (None, "baseline"):
        with pytest.raises(LoadError, match=r"no projection\.\* keys"):
            load_vision(world.source(vis_proj=vis_proj, checkpoint=path))


WRONG_SHAPE = [("perceiver", "projection.kv_proj.weight", (LANG_DIM, 47)),
               ("perceiver", "projection.pos_embed", (255, LANG_DIM)),
               ("baseline", "projection.0.weight", (64, 48)),
               ("vit", "projection.vis_layer.mlp.fc1.weight", (95, 48)),
               ("vit", OLD + "embeddings.position_embedding.weight", (26, 48))]


@pytest.mark.parametrize(("vis_proj", "key", "shape"), WRONG_SHAPE)
def test_wrong_shaped_key_is_named(vis_proj, key, shape, world):
    state = world.full_state(vis_proj)
    state[key] = torch.zeros(shape)
    path = world.save(f"shape-{key}", state)
    with pytest.raises(LoadError) as info:
        load_vision(world.source(checkpoint=path))
    message = str(info.value)
    assert "\n" not in message
    assert key.replace(OLD, "") in message.replace(OLD, "").replace(NEW, "")
    assert str(tuple(shape)) in message
