"""Write the fixtures that tests/test_dsvl_original.py compares against: what DSVL's ORIGINAL
code answers (its ``chat/chat.py`` driving ``create_dsvl_model_and_transforms``,
``DeepSpeedViLModel.generate`` and its own MMCA ``modeling_llama.py``), computed with the
library versions DSVL pins (transformers 4.33, tokenizers 0.13), not with ours.

Run it in a separate environment, never in CI. Two phases:

    # DSVL's pinned libraries (torch: this machine's CPU wheel; accelerate for chat.py's
    # device_map="auto")
    python3 -m venv /tmp/dsvl433
    /tmp/dsvl433/bin/pip install "transformers==4.33.3" "tokenizers==0.13.3" "accelerate==0.23.0" \
        torch==2.13.0 sentencepiece protobuf pillow numpy
    # DSVL's code, outside the repository (DeepSpeedExamples, applications/DeepSpeed-VisualChat)
    G="git --git-dir=DeepSpeedExamples/.git"  # a clone of microsoft/DeepSpeedExamples
    $G ls-tree -r --name-only HEAD applications/DeepSpeed-VisualChat | grep '\\.py$' | while read f; do
        mkdir -p /tmp/dsvl-src/$(dirname $f); $G show HEAD:$f > /tmp/dsvl-src/$f; done
    # phase A, in the project's environment: the model directories (seeded, tiny), the images
    .venv/bin/python scripts/make_dsvl_fixtures.py build /tmp/dsvl-world
    # phase B, in DSVL's environment: DSVL's chat.py on them -> tests/data/dsvl_original/
    /tmp/dsvl433/bin/python scripts/make_dsvl_fixtures.py record /tmp/dsvl-world \\
        --dsvl /tmp/dsvl-src/applications/DeepSpeed-VisualChat --commit "$($G rev-parse HEAD)"

Phase A writes what a DSVL user has on disk, from the ``tiny`` preset's shapes with seeded
values (every tensor drawn from its own generator, seeded by its name): a Hugging Face CLIP
directory (``clip-vit-tiny/``: a CLIPModel checkpoint as openai's, 56 px preprocessor), a LLaMA-2
directory (``llama-2-tiny/``: config, ``model.safetensors``, LLaMA-2's older
``generation_config.json``, the tokenizer of tests/data/tokenizers/llama2) and one DSVL
``pytorch_model.bin`` per projector (``ckpt-{baseline,vit,perceiver}/``: the whole model's state
dict as DSVL's training saves it, its ``vis_encoder.*``/``lang_decoder.*`` moved off the
directories' values and a ``lang_embed`` unlike ``embed_tokens``, so a loader that ignored any
of them would answer differently), DSVL's ``qwen-clip`` directory (``qwen-clip-tiny/``, see
QWEN_WIDTH) with ``ckpt-qwen/`` (baseline) and ``ckpt-qwen-vit/``, plus three PNG images of odd
sizes. The test rebuilds the same files with the same functions (``build_world``) and checks
their fingerprints first.

Phase B runs DSVL's own ``chat/chat.py`` ``main()`` (its prompt template, image numbering,
history handling, checkpoint loading and ``model.generate`` call) with scripted input lines,
once per model (projector x MMCA over CLIP, qwen + baseline + MMCA, qwen + vit), two
conversations each (``clear`` between them; EOS_MODEL has a third, whose first answer ends
with a generated EOS before NEW_TOKENS, so the next round holds chat.py's history of such an
answer), and records for every round: the input ids chat.py built, the 0/1/2 mask after
DSVL's ``concat``, DSVL's output ids (transformers 4.33 puts its initial ``input_ids``, one
BOS, before the new tokens), the first position's top-5 logits and every step's top-1/top-2
logits; and DSVL's projector output for each image. Then it runs DSVL's
``eval/batch_generation.py`` ``main()`` on EVAL_DATA with EVAL_MODELS and records its CSV and
the same per round. It checks that DSVL's model holds exactly the checkpoint's tensors after
``load_state_dict(strict=False)``, and that every greedy step has a top-1/top-2 gap of at
least MIN_MARGIN (else: change SEED).

What is stubbed, and why: ``deepspeed`` (``add_config_arguments`` only), ``termcolor``,
``utils.utils`` (imports deepspeed), ``utils.data`` (dataset builders; ``DST`` and
``add_special_token`` are DSVL's own), ``torchvision`` (imported by the unused qwen_clip
transforms), the hub (qwen's laion config is read from ``qwen-clip-tiny/``; DSVL's two 4096s are
narrowed, see QWEN_WIDTH); ``.cuda()``/``.to('cuda')`` are no-ops (no GPU) and ``.half()`` is a
no-op, so DSVL runs in fp32 on the CPU: the comparison is of the code, with our fp32 export, not
of fp16 rounding. chat.py's LLaMA loads with ``device_map="auto"`` (its ``args.local_rank`` does
not exist), which needs accelerate; on a machine without a GPU that is the CPU.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import hashlib
import importlib.util
import io
import json
import shutil
import sys
import types
import zlib
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "dsvl_original"
TOKENIZER_DIR = ROOT / "tests" / "data" / "tokenizers" / "llama2"

SEED = 20244
NEW_TOKENS = 16  # chat.py's --generation_length_per_round for the fixtures
MIN_MARGIN = 5e-3  # every greedy choice's top-1/top-2 logit gap: ties would make token parity luck
MAX_SEQ_LEN = 4096  # chat.py's default --max_seq_len
PROJECTORS = ("baseline", "vit", "perceiver")
# DSVL picks the vision encoder by the path ('qwen', else 'clip') and needs 'llama' in the LM's
CLIP_DIR, QWEN_DIR, LLAMA_DIR = "clip-vit-tiny", "qwen-clip-tiny", "llama-2-tiny"
# name -> (vision directory, checkpoint directory, --vis_proj, --enable_mmca_attention)
MODELS = {f"{p}{'-mmca' if m else ''}": (CLIP_DIR, f"ckpt-{p}", p, m) for p in PROJECTORS for m in (False, True)}
MODELS["qwen-mmca"] = (QWEN_DIR, "ckpt-qwen", "baseline", True)  # DSVL's chat recipe (chat_scripts/run.sh)
MODELS["qwen-vit"] = (QWEN_DIR, "ckpt-qwen-vit", "vit", False)  # Qwen-VL's other projector, MMCA off
QWEN_CHECKPOINTS = {"baseline": "ckpt-qwen", "vit": "ckpt-qwen-vit"}  # DSVL fails with the perceiver
# Qwen-VL's ViT: DSVL hard-codes 448 px (unused by its forward) and a 4096-wide resampler. Here the
# images are 56 px and the resampler 256 wide (2 heads of 128): our config.json extension
# qwen_image_size / qwen_output_dim says so, and phase B narrows DSVL's two 4096s (the
# VisionTransformer's output_dim, modeling_dsvl.py:55, and vis_config.hidden_size, :58) to match.
# A 4096-wide resampler (277 MB) made the test's qwen export alone take 30 s.
QWEN_SIZE, QWEN_WIDTH = 56, 256
LAION = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"  # the config DSVL reads from the hub for qwen
IMAGES = {"a": (70, 50), "b": (56, 56), "c": (90, 64)}  # name -> (width, height)
# Each conversation: rounds of (images, question), typed into chat.py as a person would.
CONVERSATIONS = {
    "two-images": [(["a", "b"], "Compare them.")],
    "chat": [(["a"], "What is in the picture?"), (["c"], "And now?"), ([], "Why?")],
    # EOS_MODEL's first answer ends with a generated EOS (its 6th token, before NEW_TOKENS): chat.py
    # pops that EOS (pad is EOS) before appending its own, and the next round's ids show it
    "eos": [(["c"], "Picture small."), ([], "Why?")],
}
# Every conversation runs on every model, except these (name -> the only model they run on).
# "eos" was found by trying short questions on EOS_MODEL: a generated EOS with every greedy step's
# margin >= 0.14 in both rounds (record() checks that its first answer does end with EOS)
EOS_MODEL, EOS_ID = "baseline", 2
ONLY_ON = {"eos": EOS_MODEL}
# DSVL's eval/batch_generation.py (the script behind its published eval/results), in its own JSON
# format: test name -> rounds of [question, "image paths separated by spaces"] or [question].
# Its prompts differ from chat.py's: each round's first ``### Image:`` becomes the tokens of
# "### Image N:" on their own (N: the images so far), the round's other ones stay.
EVAL_DATA = {
    "multi": [["Compare them.", "./images/a.png ./images/b.png"], ["Why?"], ["And this one?", "./images/c.png"]],
    "single": [["What is in the picture?", "./images/c.png"]],
}
EVAL_NAME = "fixture"  # batch_generation.py reads ./eval/eval_data/{--eval_data}.json
EVAL_MODELS = ("baseline", "qwen-mmca")  # qwen-mmca: eval_scripts/run_batch.sh's model
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,  # the
            vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,  # CLIPModel's
            pad_token_id=1)  # unused text tower


def conversations_of(model: str) -> list[str]:
    """The conversations chat.py runs on ``model``, in order."""
    return [name for name in CONVERSATIONS if ONLY_ON.get(name, model) == model]


# ---------------------------------------------------------------- phase A (our environment)
def shapes() -> tuple[dict, dict]:
    """The tiny preset's vision and decoder shapes (vocabulary: the tokenizer fixture's 600)."""
    from dsvl.presets import PRESETS

    tiny = PRESETS["tiny"]
    vision = dict(tiny["vision"], hidden_act="quick_gelu", layer_norm_eps=1e-5)
    lang = {k: v for k, v in tiny["lang"].items() if k != "base_vocab_size"}
    return vision, dict(lang, vocab_size=600, rms_norm_eps=1e-5)


def noise(name: str, shape, scale: float):
    import torch

    gen = torch.Generator().manual_seed(zlib.crc32(f"{SEED}/{name}".encode()))
    return scale * torch.randn(tuple(shape), generator=gen)


def seeded_state(prefix: str, template: dict) -> dict:
    """Values for a module's state dict: norm weights 1 + noise, other vectors small noise, the
    perceiver's sin-cos table + noise, matrices noise / sqrt(fan_in)."""
    import torch

    from dsvl.projectors import sincos_pos_embed_2d

    out = {}
    for name, t in template.items():
        key = prefix + name
        if not t.is_floating_point() or t.ndim == 0:
            out[name] = t.clone()
        elif name.endswith("pos_embed"):  # the 16x16 sin-cos table DSVL starts from
            out[name] = torch.from_numpy(sincos_pos_embed_2d(t.shape[1], 16)).float() + noise(key, t.shape, 0.1)
        elif t.ndim == 1 and name.endswith("weight"):  # LayerNorm / RMSNorm
            out[name] = 1 + noise(key, t.shape, 0.1)
        elif t.ndim == 1:
            out[name] = noise(key, t.shape, 0.05)
        else:
            fan_in = t[0].numel()
            out[name] = noise(key, t.shape, fan_in ** -0.5)
    return out


def moved(prefix: str, state: dict, scale: float) -> dict:
    return {k: (v + noise("moved/" + prefix + k, v.shape, scale) if v.is_floating_point() and v.ndim else v)
            for k, v in state.items()}


def build_world(root: Path) -> dict:
    """Write the model directories, checkpoints and images under ``root``; returns fingerprints
    (of the weights, the images' pixels and the tokenizer file)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    from dsvl.projectors import build_projector

    vis, lang = shapes()
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    # --- CLIP directory: a CLIPModel checkpoint as openai/clip-vit-*'s
    clip_cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16,
                "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "torch_dtype": "float32",
                "text_config": dict(TEXT, model_type="clip_text_model", hidden_act="quick_gelu"),
                "vision_config": dict(vis, model_type="clip_vision_model")}
    clip = CLIPModel(CLIPConfig(text_config=clip_cfg["text_config"], vision_config=clip_cfg["vision_config"],
                                projection_dim=16))
    clip_state = seeded_state("clip/", {k: v for k, v in clip.state_dict().items() if "position_ids" not in k})
    clip_dir = root / CLIP_DIR
    clip_dir.mkdir(exist_ok=True)
    (clip_dir / "config.json").write_text(json.dumps(clip_cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in clip_state.items()}, str(clip_dir / "model.safetensors"),
              metadata={"format": "pt"})
    size = vis["image_size"]
    (clip_dir / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor", "feature_extractor_type": "CLIPFeatureExtractor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": size}}, indent=2) + "\n")
    # --- LLaMA-2 directory
    llama_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1,
                 "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02,
                 "max_position_embeddings": MAX_SEQ_LEN, "pretraining_tp": 1, "rope_scaling": None,
                 "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True, **lang}
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in llama_cfg.items() if k != "architectures"}))
    llama_state = seeded_state("llama/", llama.state_dict())
    llama_state["model.embed_tokens.weight"] = noise("llama/embed", llama_state["model.embed_tokens.weight"].shape, 1.0)
    # an LM head with clear top-1 margins, so greedy parity is meaningful
    head = llama_state["lm_head.weight"]
    llama_state["lm_head.weight"] = noise("llama/head", head.shape, 4.0 / head.shape[1] ** 0.5)
    llama_dir = root / LLAMA_DIR
    llama_dir.mkdir(exist_ok=True)
    (llama_dir / "config.json").write_text(json.dumps(llama_cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in llama_state.items()}, str(llama_dir / "model.safetensors"),
              metadata={"format": "pt"})
    # LLaMA-2's generation_config.json before do_sample was added: greedy, with sampling knobs set
    (llama_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "temperature": 0.9, "max_length": 4096,
         "top_p": 0.6, "transformers_version": "4.31.0.dev0"}, indent=2) + "\n")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / file, llama_dir / file)
    # --- DSVL checkpoints: the whole DeepSpeedViLModel state dict, one per projector
    vocab = lang["vocab_size"] + 3  # ### Image:, <image>, <PAD>
    vis_state = moved("vis/", {k[len("vision_model."):]: v for k, v in clip_state.items()
                               if k.startswith("vision_model.")}, 0.02)
    dec_state = moved("dec/", llama_state, 0.02)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old = dec_state[name]
        new_rows = noise(f"rows/{name}", (3, old.shape[1]), float(old.std()))
        dec_state[name] = torch.cat([old, new_rows])
    assert dec_state["lm_head.weight"].shape[0] == vocab
    lang_embed = dec_state["model.embed_tokens.weight"] + noise("lang_embed", (vocab, lang["hidden_size"]), 0.5)
    from transformers import CLIPVisionConfig

    fingerprints = {}
    for proj in PROJECTORS:
        torch.manual_seed(SEED)
        template = build_projector(proj, CLIPVisionConfig(**vis), lang["hidden_size"]).state_dict()
        state = {"vis_encoder.vision_model." + k: v for k, v in vis_state.items()}
        state |= {"projection." + k: v for k, v in seeded_state(f"proj/{proj}/", template).items()}
        state["lang_embed.weight"] = lang_embed
        state |= {"lang_decoder." + k: v for k, v in dec_state.items()}
        folder = root / f"ckpt-{proj}"
        folder.mkdir(exist_ok=True)
        torch.save({k: v.contiguous().clone() for k, v in state.items()}, folder / "pytorch_model.bin")
        fingerprints[f"ckpt-{proj}"] = digest(state)
    fingerprints[CLIP_DIR], fingerprints[LLAMA_DIR] = digest(clip_state), digest(llama_state)
    fingerprints |= build_qwen(root, lang_embed, dec_state)
    images = root / "images"
    images.mkdir(exist_ok=True)
    for name in IMAGES:
        image = make_image(name)
        image.save(images / f"{name}.png")
        fingerprints[f"images/{name}"] = hashlib.sha256(image.tobytes()).hexdigest()
    fingerprints["tokenizer.json"] = hashlib.sha256((llama_dir / "tokenizer.json").read_bytes()).hexdigest()
    (root / "fingerprints.json").write_text(json.dumps(fingerprints, indent=1) + "\n")
    return fingerprints


def build_qwen(root: Path, lang_embed, dec_state: dict) -> dict:
    """DSVL's qwen-clip directory (helper/: Qwen-VL's vision tower as ``pytorch_model.bin``, a
    CLIPModel config as laion's ViT-bigG one, the 448 px preprocessor's format) with the
    qwen-tiny preset's ViT at 56 px, a 256-wide resampler (see QWEN_WIDTH); and a checkpoint per
    projector DSVL can run over it (QWEN_CHECKPOINTS)."""
    import torch
    from transformers import CLIPVisionConfig

    from dsvl.config import QwenVisionConfig
    from dsvl.presets import PRESETS
    from dsvl.projectors import build_projector
    from dsvl.qwen_vision import QwenVisionTransformer

    vis = dict(PRESETS["qwen-tiny"]["vision"], layer_norm_eps=1e-5)
    qcfg = QwenVisionConfig.from_clip(CLIPVisionConfig(**vis), image_size=QWEN_SIZE, output_dim=QWEN_WIDTH)
    with torch.device("meta"):
        template = QwenVisionTransformer(qcfg).state_dict()
    qwen_state = seeded_state("qwen/", template)
    folder = root / QWEN_DIR
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16,
         "text_config": dict(TEXT, model_type="clip_text_model", hidden_act="gelu"),
         "vision_config": dict(vis, model_type="clip_vision_model"), "qwen_image_size": QWEN_SIZE,
         "qwen_output_dim": QWEN_WIDTH},
        indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": QWEN_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
         "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": QWEN_SIZE}, indent=2) + "\n")
    torch.save({k: v.contiguous() for k, v in qwen_state.items()}, folder / "pytorch_model.bin")
    proj_cfg = qcfg.projector_config(CLIPVisionConfig(**vis))
    fingerprints = {QWEN_DIR: digest(qwen_state)}
    for proj, name in QWEN_CHECKPOINTS.items():
        with torch.device("meta"):
            proj_template = build_projector(proj, proj_cfg, lang_embed.shape[1]).state_dict()
        state = {"vis_encoder." + k: v for k, v in moved("qwen/", qwen_state, 0.02).items()}
        prefix = "proj/qwen/" if proj == "baseline" else f"proj/qwen-{proj}/"
        state |= {"projection." + k: v for k, v in seeded_state(prefix, proj_template).items()}
        state["lang_embed.weight"] = lang_embed
        state |= {"lang_decoder." + k: v for k, v in dec_state.items()}
        ckpt = root / name
        ckpt.mkdir(exist_ok=True)
        torch.save({k: v.contiguous() for k, v in state.items()}, ckpt / "pytorch_model.bin")
        fingerprints[name] = digest(state)
    return fingerprints


def digest(state: dict) -> str:
    """sha256 over names and float32 bytes, sorted by name (file-format independent)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def make_image(name: str):
    """A deterministic RGB image: a smooth gradient per channel plus seeded noise."""
    import numpy as np
    from PIL import Image

    width, height = IMAGES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape) + rng.integers(0, 80), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


# ---------------------------------------------------------------- phase B (DSVL's environment)
def stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_eval_data(world: Path) -> Path:
    """EVAL_DATA where batch_generation.py reads it when run from ``world``."""
    folder = world / "eval" / "eval_data"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{EVAL_NAME}.json"
    path.write_text(json.dumps(EVAL_DATA, indent=1) + "\n")
    return path


def import_dsvl(dsvl: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """DSVL's chat/chat.py and eval/batch_generation.py as modules, with the stubs the
    docstring lists."""
    import torch

    # transformers' lazy modules, imported before the stubs: their availability checks see none
    import transformers.generation.utils  # noqa: F401
    import transformers.integrations.deepspeed  # noqa: F401
    import transformers.models.clip.modeling_clip  # noqa: F401
    from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel  # noqa: F401

    sys.path.insert(0, str(dsvl))
    dst = load_file("utils.data.DST", dsvl / "utils" / "data" / "DST.py")
    stub("utils.data", DST=dst, add_special_token=dst.add_special_token,
         build_dataset=None, DataCollatorPadToMaxLen=None, __path__=[])
    stub("data", DST=dst, __path__=[])
    sys.modules["data.DST"] = dst
    stub("utils.utils", print_rank_0=lambda *a, **k: None, to_device=None)
    temporary = {"deepspeed": stub("deepspeed", add_config_arguments=lambda parser: parser),
                 "termcolor": stub("termcolor", colored=lambda text, *a, **k: text)}
    transforms = stub("torchvision.transforms", InterpolationMode=None)
    temporary["torchvision.transforms"] = transforms
    temporary["torchvision"] = stub("torchvision", transforms=transforms)
    chat = load_file("dsvl_chat", dsvl / "chat" / "chat.py")
    batch = load_file("dsvl_batch_generation", dsvl / "eval" / "batch_generation.py")
    for name in temporary:  # later availability checks (accelerate, transformers) see none
        del sys.modules[name]
    # no GPU: .cuda()/.to('cuda') stay on the CPU; .half() keeps fp32 (see the docstring)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.half = lambda self, *a, **k: self
    torch.nn.Module.half = lambda self: self
    to = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *a, **k: self if a and str(a[0]).startswith("cuda") else to(self, *a, **k)
    return chat, batch


def rle(values) -> list[list[int]]:
    """A mask as [value, count] runs (any iterable of ints: a list here, a numpy row in the test)."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([int(v), 1])
    return runs


def record(world: Path, dsvl: Path, commit: str, out: Path) -> None:
    import torch
    import transformers

    assert transformers.__version__.startswith("4.33"), "run with DSVL's transformers 4.33"
    chat, batch = import_dsvl(dsvl)
    modeling = sys.modules["utils.model.modeling_dsvl"]
    dsvl_llama = sys.modules["utils.model.third_party_model.hf_model.modeling_llama"]
    rounds: list[dict] = []
    built: list = []

    vil_generate = modeling.DeepSpeedViLModel.generate

    def dsvl_generate(self, img, lang, *args, **kwargs):
        if kwargs.get("generation_length") == 256:  # batch_generation.py's fixed budget
            kwargs["generation_length"] = NEW_TOKENS
        rounds.append({"images": int(img.size(0)), "input_ids": lang[0].tolist()})
        output = vil_generate(self, img, lang, *args, **kwargs)
        rounds[-1]["generated"] = output[0][0].tolist()
        return output

    llama_generate = dsvl_llama.LlamaForCausalLM.generate

    def decoder_generate(self, *args, **kwargs):
        result = llama_generate(self, *args, **kwargs, output_scores=True, return_dict_in_generate=True)
        scores = torch.stack([s[0] for s in result.scores])  # [steps, vocab]
        top = scores.topk(5, dim=-1)
        rounds[-1].update(mask=rle(kwargs["attention_mask"][0].tolist()),
                          first_top5={"ids": top.indices[0].tolist(), "values": top.values[0].tolist()},
                          top1=top.values[:, 0].tolist(), top2=top.values[:, 1].tolist())
        return result.sequences

    create = modeling.create_dsvl_model_and_transforms

    def create_and_keep(*args, **kwargs):
        made = create(*args, **kwargs)
        built.append(made)
        return made

    modeling.DeepSpeedViLModel.generate = dsvl_generate
    dsvl_llama.LlamaForCausalLM.generate = decoder_generate
    chat.create_dsvl_model_and_transforms = create_and_keep
    batch.create_model_and_transforms = create_and_keep

    expected = {"generator": f"DSVL {commit} chat/chat.py and eval/batch_generation.py main(), transformers "
                             f"{transformers.__version__}, torch {torch.__version__}, fp32 on the CPU",
                "new_tokens": NEW_TOKENS, "conversations": CONVERSATIONS, "eval_data": EVAL_DATA,
                "fingerprints": json.loads((world / "fingerprints.json").read_text()), "models": {}}
    images = {name: str(world / "images" / f"{name}.png") for name in IMAGES}
    # no hub here: qwen's "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k" config is the qwen directory's,
    # and DSVL's two hard-coded 4096s become QWEN_WIDTH (see there)
    auto_config = modeling.AutoConfig.from_pretrained

    class NarrowVisionConfig(type(auto_config(str(world / QWEN_DIR)).vision_config)):
        def __setattr__(self, name, value):
            super().__setattr__(name, QWEN_WIDTH if (name, value) == ("hidden_size", 4096) else value)

    def laion_config(name, *args, **kwargs):
        if name != LAION:
            return auto_config(name, *args, **kwargs)
        config = auto_config(str(world / QWEN_DIR), *args, **kwargs)
        config.vision_config.__class__ = NarrowVisionConfig
        return config

    modeling.AutoConfig.from_pretrained = laion_config
    vision_transformer = modeling.VisionTransformer
    modeling.VisionTransformer = lambda **kw: vision_transformer(**dict(kw, output_dim=QWEN_WIDTH))
    for model_name, (vision_dir, ckpt, proj, mmca) in MODELS.items():
        argv = ["chat.py", "--lm_model_name_or_path", str(world / LLAMA_DIR),
                "--vision_model_name_or_path", str(world / vision_dir),
                "--checkpoint_path", str(world / ckpt), "--vis_proj", proj,
                "--generation_length_per_round", str(NEW_TOKENS)] + (["--enable_mmca_attention"] if mmca else [])
        typed: list[str] = []
        for conversation in map(CONVERSATIONS.get, conversations_of(model_name)):
            for names, question in conversation:
                typed += [" ".join(images[n] for n in names) if names else "na", question]
            typed += ["na", "clear"]
        typed[-1] = "quit"
        rounds.clear()
        built.clear()
        run_main(chat, argv, typed)
        model, processor, _ = built[0]
        entry = {"vision_model": vision_dir, "checkpoint": ckpt, "vis_proj": proj, "enable_mmca_attention": mmca,
                 "load": check_load(model, world / ckpt),
                 "vision": vision_summary(model, processor, images), "conversations": {}}
        it = iter(rounds)
        for name in conversations_of(model_name):
            entry["conversations"][name] = [next(it) for _ in CONVERSATIONS[name]]
        assert next(it, None) is None
        if "eos" in entry["conversations"]:  # the answer ends with EOS mid-budget, and one more round follows
            first, then = entry["conversations"]["eos"]
            answer = first["generated"]
            assert answer[-1] == EOS_ID and len(answer) - 1 < NEW_TOKENS, f"{model_name}: no EOS in {answer}"
            assert then["input_ids"][:len(first["input_ids"]) + len(answer) - 1] == first["input_ids"] + answer[1:]
        margin = min(a - b for r in rounds for a, b in zip(r["top1"], r["top2"], strict=True))
        assert margin >= MIN_MARGIN, f"{model_name}: a greedy step has a top-2 gap of {margin:.2g}: change SEED"
        expected["models"][model_name] = entry
        print(f"{model_name}: " + "; ".join(f"{n}: " + " | ".join(str(r["generated"][:6]) for r in rs)
                                          for n, rs in entry["conversations"].items()))
    expected["eval"] = {name: record_eval(batch, world, name, rounds) for name in EVAL_MODELS}
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(expected, separators=(",", ":"))
    (out / "expected.json").write_text(text + "\n")
    print(f"wrote {out / 'expected.json'} ({len(text) / 1024:.0f} KiB)")


def record_eval(batch: types.ModuleType, world: Path, model_name: str, rounds: list[dict]) -> dict:
    """batch_generation.py's ``main()`` on EVAL_DATA with ``model_name``'s checkpoint, run from
    ``world`` as eval_scripts/run_batch.sh runs it (every answer NEW_TOKENS long, see
    ``dsvl_generate``): its CSV rows and, per test and round, what ``generate`` saw and gave."""
    import csv

    vision_dir, ckpt, proj, mmca = MODELS[model_name]
    write_eval_data(world)
    argv = ["batch_generation.py", "--model_name", "dsvl", "--vis_proj", proj, "--max_seq_len", str(MAX_SEQ_LEN),
            "--lm_model_name_or_path", str(world / LLAMA_DIR), "--vision_model_name_or_path", str(world / vision_dir),
            "--checkpoint_path", str(world), "--checkpoint_names", ckpt, "--eval_data", EVAL_NAME,
            "--output_filename", str(world / f"results-{model_name}")] + (["--enable_mmca_attention"] if mmca else [])
    rounds.clear()
    run_main(batch, argv, cwd=world)  # the JSON and its image paths are relative to the working directory
    with open(world / f"results-{model_name}.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    it = iter(rounds)
    tests = {name: [next(it) for _ in EVAL_DATA[name]] for name in EVAL_DATA}
    assert next(it, None) is None
    margin = min(a - b for r in rounds for a, b in zip(r["top1"], r["top2"], strict=True))
    assert margin >= MIN_MARGIN, f"eval {model_name}: a greedy step has a top-2 gap of {margin:.2g}: change EVAL_DATA"
    print(f"eval {model_name}: " + "; ".join(f"{n}: " + " | ".join(str(r["generated"][:6]) for r in rs)
                                           for n, rs in tests.items()))
    return {"csv": rows, "tests": tests}


def run_main(script: types.ModuleType, argv: list[str], typed: Sequence[str] = (),
             cwd: Path | None = None) -> None:
    """A DSVL script's ``main()`` with ``argv``, ``typed`` as the user's input lines and ``cwd``
    as the working directory; what it prints is dropped."""
    import torch

    feed = iter(typed)
    original_input, original_argv = builtins.input, sys.argv
    builtins.input, sys.argv = (lambda prompt="": next(feed)), argv
    try:
        with contextlib.chdir(cwd or Path.cwd()), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            script.main()
    finally:
        builtins.input, sys.argv = original_input, original_argv


def check_load(model, ckpt: Path) -> dict:
    """After chat.py's ``load_state_dict(strict=False)``, every tensor of DSVL's model must be the
    checkpoint's: a key DSVL names differently would be silently ignored there."""
    import torch

    state = torch.load(ckpt / "pytorch_model.bin", map_location="cpu")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    differ = sorted(k for k in set(own) & set(state) if not torch.equal(own[k].float(), state[k].float()))
    assert not missing and not unexpected and not differ, (missing[:3], unexpected[:3], differ[:3])
    return {"missing": missing, "unexpected": unexpected}


def vision_summary(model, processor, images: dict) -> dict:
    """DSVL's projector output per image (as DeepSpeedViLModel.generate computes it): shape,
    the first 4 values of the first and last tokens, the mean absolute value; and the pixels'."""
    import torch
    from PIL import Image

    out = {}
    for name, path in images.items():
        pixels = processor.preprocess(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            feature = model.vis_encoder(pixels)
            feature = feature if isinstance(feature, torch.Tensor) else feature.last_hidden_state
            proj = model.projection(feature)[0]
        out[name] = {"pixels_sum": float(pixels.double().sum()), "pixels_abs_sum": float(pixels.double().abs().sum()),
                     "shape": list(proj.shape), "first": proj[0, :4].tolist(), "last": proj[-1, :4].tolist(),
                     "abs_mean": float(proj.abs().mean())}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    build = sub.add_parser("build", help="phase A (project environment): write the model directories")
    build.add_argument("world", type=Path)
    rec = sub.add_parser("record", help="phase B (DSVL's environment): run DSVL's chat.py, write the JSON")
    rec.add_argument("world", type=Path)
    rec.add_argument("--dsvl", type=Path, required=True, help="applications/DeepSpeed-VisualChat, extracted")
    rec.add_argument("--commit", default="unknown", help="the DeepSpeedExamples commit it came from")
    rec.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.phase == "build":
        sys.path.insert(0, str(ROOT))
        print(json.dumps(build_world(args.world), indent=1))
    else:
        record(args.world, args.dsvl.resolve(), args.commit, args.out)


if __name__ == "__main__":
    main()
