"""The artefact contract itself: typed manifest sections (round trip, kept unknown keys, one-line
errors naming the field), the graphs' I/O tables (torch dynamic_axes, TensorRT axes, the check
a fresh export must pass) and the rule that no manifest field name is spelled outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from export.checks import ContractError, check_onnx_files, onnx_io
from runtime import contract as c
from runtime import graphs as g
from runtime.errors import ArtifactError
from runtime.manifest import (
    EngineEntry,
    FileEntry,
    Manifest,
    VisionSection,
    parse_manifest,
    read_manifest,
)
from runtime.sections import FieldError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def art(exported) -> Path:
    return exported("--vis-proj", "perceiver")


# ------------------------------------------------------------------ manifest sections
def test_written_manifest_round_trips_through_the_sections(art):
    import json

    data = json.loads((art / c.MANIFEST_NAME).read_text())
    manifest = read_manifest(art)
    assert manifest.to_dict() == data  # every field typed and written back as it was
    assert manifest.format_version == c.FORMAT_VERSION and manifest.vision.file.path == c.VISION_FILE
    # the default decoder: built with fused ops and the in-place cache, checked whole
    assert manifest.decoder.kv_cache == c.KV_SHARED and manifest.decoder.graph == c.GRAPH_FUSED
    assert manifest.decoder.parity.check == "full" and manifest.tokenizer.files


def test_unknown_keys_survive_a_rewrite(art):
    import json

    data = json.loads((art / c.MANIFEST_NAME).read_text())
    data["decoder"]["from_a_newer_writer"] = {"x": 1}
    data["future_section"] = [1, 2]
    manifest = parse_manifest(data, art / c.MANIFEST_NAME, art)
    again = manifest.to_dict()
    assert again["decoder"]["from_a_newer_writer"] == {"x": 1} and again["future_section"] == [1, 2]


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["vision"].pop("image_size"), "vision.image_size is missing"),
    (lambda d: d["decoder"].update(num_layers="two"), "decoder.num_layers must be a non-negative integer"),
    (lambda d: d["decoder"].update(kv_cache="paged"), "decoder.kv_cache is 'paged', expected one of"),
    (lambda d: d["tokenizer"]["files"].update(x={"path": "/etc/passwd", "bytes": 1, "sha256": "0"}),
     "tokenizer.files.x.path must be a path inside the directory"),
    (lambda d: d["vision"]["parity"]["results"][0].update(finite="yes"),
     r"vision.parity.results\[0\].finite must be a true/false"),
    (lambda d: d.update(engines={"decoder": {"file": "engines/decoder.plan"}}),
     "engines.decoder.bytes is missing; rebuild with `python -m export.engine"),
])
def test_bad_fields_are_one_line_naming_file_and_field(art, edit, needle):
    import json

    data = json.loads((art / c.MANIFEST_NAME).read_text())
    edit(data)
    with pytest.raises(ArtifactError, match=needle) as err:
        parse_manifest(data, art / c.MANIFEST_NAME, art)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(art / c.MANIFEST_NAME))


def test_writers_validate_what_they_build():
    entry = FileEntry("vision.onnx", 1, "0" * 64)
    section = VisionSection(file=entry, preprocessor=c.PREPROCESSOR_NAME, vis_proj="perceiver",
                            image_size=-1, patch_size=14, image_tokens=256, vis_dim=64, lang_dim=64,
                            precision="fp32", io_dtype="float32", random_weights=True)
    with pytest.raises(FieldError, match="vision.image_size must be a non-negative integer, got -1"):
        section.validate("vision")
    with pytest.raises(ArtifactError, match="the exporter wrote vision.image_size"):
        Manifest.from_sections({"vision": section})


def test_engine_entry_defaults_for_older_builds():
    entry = EngineEntry.from_dict({"file": "engines/vision.plan", "bytes": 3, "sha256": "a" * 64,
                                   "precision": "fp16", "tensorrt_version": "10.3.0",
                                   "gpu": {"name": "Orin", "compute_capability": "8.7"}}, "engines.vision")
    assert entry.version_compatible is False and entry.hardware_compatibility == "none"
    assert entry.onnx_sha256 is None and entry.profiles == []


# ------------------------------------------------------------------ graphs
def test_decoder_axes_are_declared_once():
    concat = g.decoder_graph(2).torch_dynamic_axes()
    assert concat[c.INPUTS_EMBEDS] == {0: g.BATCH, 1: g.SEQUENCE}
    assert concat[c.ATTENTION_MASK] == {0: g.BATCH, 1: g.TOTAL}
    assert concat[c.past_value_name(1)] == {0: g.BATCH, 2: g.PAST}
    assert concat[c.present_key_name(0)] == {0: g.BATCH, 2: g.TOTAL}
    shared = g.decoder_graph(2, c.KV_SHARED).torch_dynamic_axes()
    assert shared[c.past_key_name(0)] == shared[c.present_key_name(0)] == {0: g.BATCH, 2: g.MAX_SEQUENCE}
    assert g.decoder_graph(2).input_names == c.decoder_input_names(2)
    assert g.decoder_graph(2).output_names == c.decoder_output_names(2)
    assert g.decoder_graph(3).locate(g.PAST) == (c.past_key_name(0), 2)


def test_vision_axes_follow_the_export_kind():
    assert g.vision_graph(False).torch_dynamic_axes() == {c.VISION_INPUT: {0: g.IMAGES},
                                                          c.VISION_OUTPUT: {0: g.IMAGES}}
    dynamic = g.vision_graph(True, fixed_tokens=False).torch_dynamic_axes()
    assert dynamic[c.VISION_INPUT] == {0: g.IMAGES, 2: g.HEIGHT, 3: g.WIDTH}
    assert dynamic[c.VISION_OUTPUT] == {0: g.IMAGES, 1: g.TOKENS}
    assert g.vision_graph(True, fixed_tokens=True).torch_dynamic_axes()[c.VISION_OUTPUT] == {0: g.IMAGES}


def test_exported_onnx_matches_the_contract_and_departures_are_named(art):
    manifest = read_manifest(art)
    check_onnx_files(art, manifest, [c.VISION_FILE, c.DECODER_FILE])  # what every export ran
    inputs, outputs = onnx_io(art / c.DECODER_FILE)
    decoder = manifest.decoder
    spec = g.decoder_graph(decoder.num_layers, decoder.kv_cache, decoder.graph)
    sizes = {g.HIDDEN: manifest.decoder.hidden_size}
    assert spec.mismatch(inputs, outputs, "float32", sizes, strict=True) is None
    renamed = [g.TensorInfo(t.name, t.dtype, tuple("seq" if d == g.SEQUENCE else d for d in t.shape))
               for t in inputs]
    assert "calls its sequence axis 'seq'" in spec.mismatch(renamed, outputs, "float32", strict=True)
    assert spec.mismatch(renamed, outputs, "float32") is None  # a runner only needs what it binds
    assert "is float32, the contract says float16" in spec.mismatch(inputs, outputs, "float16")
    assert "has no input position_ids" in spec.mismatch(
        [t for t in inputs if t.name != c.POSITION_IDS], outputs, "float32")
    wrong = {g.HIDDEN: manifest.decoder.hidden_size + 1}
    assert "manifest.json says" in spec.mismatch(inputs, outputs, "float32", wrong)
    manifest.decoder.num_layers += 1
    with pytest.raises(ContractError, match="has no input past_key_values"):
        check_onnx_files(art, manifest, [c.DECODER_FILE])


# ------------------------------------------------------------------ one place for the names
def manifest_fields() -> set[str]:
    """Every field name any manifest section declares."""
    import dataclasses

    from runtime import manifest
    from runtime.sections import Section

    sections = [v for v in vars(manifest).values() if isinstance(v, type) and issubclass(v, Section)]
    return {f.name for cls in sections for f in dataclasses.fields(cls)} - {"extra"}


# what the readers and writers indexed before the sections: manifest["decoder"], entry["path"], ...
HOLDERS = r"manifest|vision|decoder|tokens|tokenizer|entry|meta|spec|section|engines|quant|file"


def test_no_manifest_field_is_spelled_outside_the_contract():
    """Readers and writers go through runtime/manifest.py's sections. Left out on purpose:
    scripts/fuzz_cli.py (it writes broken manifests as an outsider would)."""
    files = [p.relative_to(REPO).as_posix() for top in ("runtime", "export", "scripts")
             for p in sorted((REPO / top).rglob("*.py"))]
    allowed = {"scripts/fuzz_cli.py"}
    assert len(files) > 40
    fields = "|".join(sorted(manifest_fields()))
    held = re.compile(rf"""\b({HOLDERS})(\[|\.get\()["']({fields})["']""")
    loaded = re.compile(r"""\)\[["'](vision|decoder|tokenizer|engines)["']\]""")  # json.loads(...)["decoder"]
    hits = [f"{name}: {match.group(0)}" for name in files if name not in allowed
            for pattern in (held, loaded) for match in pattern.finditer((REPO / name).read_text())]
    assert not hits, hits
