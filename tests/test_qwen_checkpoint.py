"""Real-weights path for DSVL's qwen-clip: a qwen directory, a LLaMA directory and a DSVL
checkpoint, all written by the test, exported through the CLI's flags.

The qwen directory is laid out as DSVL's helper makes it: ``pytorch_model.bin`` (Qwen-VL's vision
tensors, prefix stripped, no ``proj``), ``config.json`` (a CLIPModel config whose vision_config is
a shrunk ViT-bigG, plus ``qwen_output_dim``, this package's extension, so the resampler is 256 wide
rather than 4096) and DSVL's own ``preprocessor_config.json`` (448 px). The image size is DSVL's 448.
The reference is built here from the saved tensors with ``load_state_dict(strict=True)``, not
through dsvl.loading.
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
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM

try:
    from transformers import CLIPImageProcessorPil as ImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor as ImageProcessor

import export.all as export_all
import export.vision as ev
from dsvl.config import QwenVisionConfig
from dsvl.errors import LoadError
from dsvl.generate import generate
from dsvl.loading import WeightSource, load_model, load_vision
from dsvl.projectors import build_projector
from dsvl.qwen_vision import QwenVisionTransformer
from dsvl.tokenizer import build_preset_tokenizer, write_llama_tokenizer_dir
from runtime.pipeline import Pipeline
from runtime.prompt import format_round
from runtime.sampling import SamplingOptions

ROOT = Path(__file__).resolve().parents[1]
PROJS = ("baseline", "vit")
BIGG_SHRUNK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   patch_size=14, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5)
OUTPUT_DIM = 256
QWEN = QwenVisionConfig(width=64, layers=2, heads=2, mlp_size=128, patch_size=14, image_size=448,
                        output_dim=OUTPUT_DIM)
# DSVL's helper/qwen_clip/preprocessor_config.json
PREPROCESSOR = {"crop_size": 448, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor",
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 448}
LANG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # the qwen-tiny preset's decoder
FP32_REL_TOL = 1e-4


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).clone() for k, v in state.items()}


def projector_config() -> CLIPVisionConfig:
    """What DSVL's projector sees: the bigG config with hidden_size set to the resampler's width."""
    config = CLIPVisionConfig(**(BIGG_SHRUNK | {"hidden_size": OUTPUT_DIM}))
    config._attn_implementation = "eager"
    return config


def write_qwen_dir(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    torch.save(state, path / "pytorch_model.bin")
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 1280,
              "vision_config": BIGG_SHRUNK | {"model_type": "clip_vision_model"},
              "qwen_output_dim": OUTPUT_DIM}
    (path / "config.json").write_text(json.dumps(config))
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return path


@dataclass
class World:
    root: Path
    qwen_dir: Path  # 'qwen' in its path: detected as DSVL does
    dir_state: dict[str, torch.Tensor]
    vis_state: dict[str, torch.Tensor]  # the checkpoints' vis_encoder.*
    proj_states: dict[str, dict[str, torch.Tensor]]
    llama_dir: Path
    checkpoints: dict[str, Path] = field(default_factory=dict)

    def save(self, name: str, state: dict) -> Path:
        folder = self.root / "ckpt" / name
        folder.mkdir(parents=True)
        torch.save(state, folder / "pytorch_model.bin")
        return folder

    def ckpt_state(self, vis_proj: str) -> dict[str, torch.Tensor]:
        return ({"vis_encoder." + k: v for k, v in self.vis_state.items()}
                | {"projection." + k: v for k, v in self.proj_states[vis_proj].items()})

    def qwen_variant(self, name: str, state: dict) -> Path:
        return write_qwen_dir(self.root / "variants" / f"qwen-{name}", state)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("qwen-world")
    torch.manual_seed(1)
    dir_state = perturbed(QwenVisionTransformer(QWEN).state_dict(), seed=1)
    qwen_dir = write_qwen_dir(root / "Qwen-VL-Chat-vision", dir_state)
    torch.manual_seed(2)
    vis_state = perturbed(QwenVisionTransformer(QWEN).state_dict(), seed=2)
    proj_states = {}
    for i, vis_proj in enumerate(PROJS):
        torch.manual_seed(10 + i)
        proj_states[vis_proj] = perturbed(build_projector(vis_proj, projector_config(), 128).state_dict(),
                                          seed=10 + i)
    llama_dir = root / "llama-2"
    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(**LANG, vocab_size=1000, tie_word_embeddings=False)).save_pretrained(llama_dir)
    write_llama_tokenizer_dir(build_preset_tokenizer(1000), llama_dir)
    w = World(root, qwen_dir, dir_state, vis_state, proj_states, llama_dir)
    for vis_proj in PROJS:
        w.checkpoints[vis_proj] = w.save(vis_proj, w.ckpt_state(vis_proj))
    return w


def reference(world: World, vis_proj: str, x: np.ndarray) -> np.ndarray:
    encoder = QwenVisionTransformer(QWEN)
    encoder.load_state_dict(world.vis_state, strict=True)
    proj = build_projector(vis_proj, projector_config(), 128)
    proj.load_state_dict(world.proj_states[vis_proj], strict=True)
    with torch.no_grad():
        return proj.eval()(encoder.eval()(torch.from_numpy(x))).numpy()


def cli_args(world: World, vis_proj: str | None = None, qwen_dir: Path | None = None) -> list[str]:
    argv = ["--vision-model-name-or-path", str(qwen_dir or world.qwen_dir),
            "--lm-model-name-or-path", str(world.llama_dir)]
    if vis_proj:
        argv += ["--checkpoint-path", str(world.checkpoints[vis_proj])]
    return argv


# ------------------------------------------------------------------ export through the CLI flags
@pytest.mark.parametrize("vis_proj", PROJS)
def test_cli_export_matches_saved_weights(vis_proj, world, tmp_path):
    out = tmp_path / "out"
    assert ev.main(cli_args(world, vis_proj) + ["--dynamic-resolution", "--out", str(out)]) == 0
    vision = json.loads((out / "manifest.json").read_text())["vision"]
    assert vision["vision_encoder"] == "qwen" and vision["vis_proj"] == vis_proj  # both inferred
    assert vision["image_size"] == 448 and vision["image_tokens"] == 256
    assert vision["random_weights"] is False
    assert [r["name"] for r in vision["parity"]["results"]] == [
        "1 image(s) @ 448x448", "3 image(s) @ 448x448", "1 image(s) @ 476x476", "3 image(s) @ 476x476"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(out / "vision.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(42)
    for size in (448, 476):
        for images in (1, 3):
            x = rng.standard_normal((images, 3, size, size)).astype(np.float32)
            got = session.run(None, {"pixel_values": x})[0]
            want = reference(world, vis_proj, x)
            assert got.shape == want.shape == (images, 256, 128)
            err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            print(f"qwen dir + checkpoint {vis_proj} {images}x{size}: rel err {err:.2e}")
            assert err <= FP32_REL_TOL
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 448, "width": 448} and pre["size"] == {"shortest_edge": 448}


def test_checkpoint_overrides_directory_weights(world):
    model, loaded = load_vision(WeightSource(vision_model=world.qwen_dir, lm_model=world.llama_dir,
                                             checkpoint=world.checkpoints["vit"]))
    own = model.vis_encoder.state_dict()
    for key, value in world.vis_state.items():
        assert not torch.equal(value, world.dir_state[key])
        assert torch.equal(own[key], value), key
    assert loaded.config.vision_encoder == "qwen"
    assert any("'qwen' in the vision path" in note for note in loaded.notes)
    # the vit projector's extra CLIP layer takes heads/activation/eps from the bigG config
    layer = model.projection.vis_layer
    assert layer.self_attn.num_heads == 2 and layer.self_attn.embed_dim == OUTPUT_DIM
    assert layer.layer_norm1.eps == 1e-5


def test_directory_alone_loads_strictly(world):
    model, loaded = load_vision(WeightSource(vision_model=world.qwen_dir, lm_model=world.llama_dir))
    assert loaded.config.vis_proj == "baseline"  # DSVL's projector for qwen
    own = model.vis_encoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in world.dir_state.items())
    assert any("RANDOM" in note for note in loaded.notes)


def test_vision_encoder_flag_overrides_detection(world, tmp_path):
    """No 'qwen' in the path: --vision-encoder qwen; a CLIP dir under a 'qwen' path: clip."""
    plain = write_qwen_dir(tmp_path / "bigg-vision", world.dir_state)
    with pytest.raises(LoadError, match="holds Qwen-VL's vision weights.*--vision-encoder qwen"):
        load_vision(WeightSource(vision_model=plain, lm_model=world.llama_dir))
    model, loaded = load_vision(WeightSource(vision_model=plain, lm_model=world.llama_dir,
                                             vision_encoder="qwen"))
    assert isinstance(model.vis_encoder, QwenVisionTransformer)
    from transformers import CLIPVisionModel

    clip_dir = tmp_path / "qwen-experiments" / "clip"
    CLIPVisionModel(CLIPVisionConfig(**(BIGG_SHRUNK | {"image_size": 56}))).save_pretrained(clip_dir)
    with pytest.raises(LoadError, match="--vision-encoder clip"):
        load_vision(WeightSource(vision_model=clip_dir, lm_model=world.llama_dir))
    model, loaded = load_vision(WeightSource(vision_model=clip_dir, lm_model=world.llama_dir,
                                             vision_encoder="clip", vis_proj="baseline"))
    assert loaded.config.vision_encoder == "clip"


# ------------------------------------------------------------------ strict loading errors
def _bad_states(world: World) -> dict[str, tuple[dict, str]]:
    state = world.dir_state
    drop = "transformer.resblocks.1.attn.in_proj.weight"
    return {
        "missing": ({k: v for k, v in state.items() if k != drop}, drop),
        "extra-proj": (state | {"proj": torch.zeros(OUTPUT_DIM, OUTPUT_DIM)}, "proj"),
        "extra": (state | {"attn_pool.bogus": torch.zeros(2)}, "attn_pool.bogus"),
        "shape": (state | {"attn_pool.query": torch.zeros(255, OUTPUT_DIM)}, "attn_pool.query"),
        "prefixed": ({"transformer.visual." + k: v for k, v in state.items()}, "transformer.visual."),
    }


@pytest.mark.parametrize("case", ["missing", "extra-proj", "extra", "shape", "prefixed"])
def test_strict_loading_names_the_key(case, world):
    state, key = _bad_states(world)[case]
    path = world.qwen_variant(case, state)
    with pytest.raises(LoadError) as info:
        load_vision(WeightSource(vision_model=path, lm_model=world.llama_dir))
    message = str(info.value)
    assert "\n" not in message and key in message, message
    if case == "shape":
        assert "(255, 256)" in message and "(256, 256)" in message


def test_checkpoint_vis_encoder_wrong_shape_is_named(world):
    state = world.ckpt_state("baseline") | {"vis_encoder.conv1.weight": torch.zeros(64, 3, 16, 16)}
    path = world.save("bad-vis", state)
    with pytest.raises(LoadError, match=r"vis_encoder\.conv1\.weight.*\(64, 3, 16, 16\)"):
        load_vision(WeightSource(vision_model=world.qwen_dir, lm_model=world.llama_dir, checkpoint=path))


def test_cli_errors_are_one_line(world):
    """As a user meets them: a real process, exit 2, one ``error:`` line, nothing written."""
    missing = world.qwen_variant("cli-missing", _bad_states(world)["missing"][0])
    perceiver = world.save("perceiver", world.ckpt_state("baseline")
                           | {"projection.query": torch.zeros(256, 128)})
    cases = {"missing": (cli_args(world, qwen_dir=missing), "resblocks.1.attn.in_proj.weight"),
             "perceiver": (cli_args(world) + ["--checkpoint-path", str(perceiver)], "255 keys")}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = {}
    for name, (argv, _) in cases.items():
        out = world.root / f"cli-{name}"
        procs[name] = (out, subprocess.Popen([sys.executable, "-m", "export.vision", *argv, "--out", str(out)],
                                             cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE))
    for name, (out, proc) in procs.items():
        _, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, stderr
        assert lines[0].startswith("error:") and cases[name][1] in lines[0], lines[0]
        assert not out.exists() or not list(out.iterdir())


# ------------------------------------------------------------------ export.all + runtime
def test_export_all_and_runtime_token_exact(world, tmp_path):
    """A whole DSVL checkpoint (decoder, lang_embed, projector, vis_encoder) over the two
    directories; the runtime preprocesses at the directory's 448 px and generates the reference's
    tokens exactly."""
    model, _, _ = load_model(WeightSource(preset="qwen-tiny", vis_proj="baseline", seed=5))
    state = model.state_dict()
    noise = torch.randn(state["lang_embed.weight"].shape, generator=torch.Generator().manual_seed(6))
    state["lang_embed.weight"] = state["lang_embed.weight"] + 0.5 * noise
    state |= {"vis_encoder." + k: v for k, v in world.vis_state.items()}
    ckpt = world.save("full", state)
    out = tmp_path / "artifacts"
    assert export_all.main(cli_args(world) + ["--checkpoint-path", str(ckpt), "--out", str(out)]) == 0

    rng = np.random.default_rng(3)
    images = []
    for i, (h, w) in enumerate([(500, 640), (480, 460)]):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    pipe = Pipeline.from_artifacts(out, threads=2)
    pixels = pipe.artifacts.preprocessor(images)
    want_pixels = ImageProcessor.from_pretrained(world.qwen_dir)(
        [Image.open(p).convert("RGB") for p in images], return_tensors="np")["pixel_values"]
    assert pixels.shape == (2, 3, 448, 448)
    assert np.array_equal(pixels, want_pixels)

    ref_model, tokenizer, _ = load_model(WeightSource(vision_model=world.qwen_dir, lm_model=world.llama_dir,
                                                      checkpoint=ckpt))
    question = "What is different between them?"
    result = pipe.generate(images, question, SamplingOptions(max_new_tokens=24))
    ids = tokenizer(format_round(question, 2)).input_ids
    assert result.prompt_ids == ids
    ref = generate(ref_model, torch.tensor(ids), torch.from_numpy(pixels),
                   SamplingOptions(max_new_tokens=24), eos_token_id=tokenizer.eos_token_id)
    print(f"qwen dir + checkpoint, 2 images: {len(ref.tokens)} tokens")
    assert len(ref.tokens) >= 8
    assert result.tokens == ref.tokens
