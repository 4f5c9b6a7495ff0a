"""write_dsvl_checkpoint: a torch.save-compatible zip written tensor by tensor, read back by
torch.load(weights_only=True), by the lazy reader, and by load_model as a DSVL checkpoint."""

from __future__ import annotations

import pytest
import torch

from dsvl.checkpoint_writer import write_dsvl_checkpoint
from dsvl.lazy_files import open_torch_zip
from dsvl.loading import CHECKPOINT_FILE, WeightSource, load_model


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    return {"f32": torch.randn(3, 7, generator=gen), "f16": torch.randn(5, generator=gen).half(),
            "bf16": torch.randn(2, 3, 4, generator=gen).bfloat16(), "i64": torch.arange(9),
            "bool": torch.tensor([True, False]), "scalar": torch.tensor(1.5), "empty": torch.empty(0, 3),
            "transposed": base.t(), "window": base[2:, 1:3]}


@pytest.mark.parametrize("zip64", [False, True])
def test_round_trip(tmp_path, zip64):
    path = tmp_path / CHECKPOINT_FILE
    want = tensors()
    consumed = []

    def stream():  # a generator: the writer must not need the tensors twice
        for name, tensor in want.items():
            consumed.append(name)
            yield name, tensor

    assert write_dsvl_checkpoint(path, stream(), force_zip64=zip64) == len(want)
    assert consumed == list(want)
    back = torch.load(path, weights_only=True)
    lazy = open_torch_zip(path)
    assert list(back) == list(lazy) == list(want)
    for name, tensor in want.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
        assert torch.equal(lazy[name].load(), tensor), name
        assert lazy[name].offset % 64 == 0, name  # aligned as torch aligns


def test_repeated_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="given twice"):
        write_dsvl_checkpoint(tmp_path / "x.bin", [("a", torch.ones(1)), ("a", torch.ones(1))])


def test_load_model_reads_a_written_checkpoint(tmp_path):
    """A whole DSVL state dict written by the streaming writer loads through --checkpoint-path."""
    model, _, _ = load_model(WeightSource(preset="tiny", vis_proj="perceiver", seed=1))
    gen = torch.Generator().manual_seed(2)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    write_dsvl_checkpoint(tmp_path / CHECKPOINT_FILE, iter(state.items()))
    loaded, _, _ = load_model(WeightSource(preset="tiny", seed=9, checkpoint=tmp_path))
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
