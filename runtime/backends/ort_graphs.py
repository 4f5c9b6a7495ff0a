"""The vision encoder through ONNX Runtime's CUDA graphs: one captured graph per image count.

A fixed-resolution vision graph launches a few hundred small kernels per call; on a GPU that
launch cost, more than the arithmetic, likely sets a small model's latency (docs/benchmarks.md,
"GPU"). ONNX Runtime's
CUDA provider can capture a session's kernels once and replay them (``enable_cuda_graph``), on
three conditions: every input and output is bound on the device at an address that never
changes, each captured graph sees one set of shapes, and nothing in the graph needs a copy
between host and device. Here each image count gets its own pair of device buffers and its own
graph id (ONNX Runtime's ``gpu_graph_id`` run option: ids from 1, -1 turns capture off); the
pixels are copied into the count's input buffer before each run and the output copied back
after it. ONNX Runtime runs the first calls of an id normally, captures, then replays. The
slots live as long as the runner: one per image count seen (a conversation's few).

The copy in (``OrtValue.update_inplace``: a plain ``cudaMemcpy`` from pageable memory) may
return before its last bytes reach the device (CUDA's documented behaviour for pageable
host-to-device copies), and ONNX Runtime's kernels run on their own stream, which does not wait
for the default stream's copies. So one float is read back from the device on the default
stream before each run: that read is ordered after the copy and returns only once it is done.

On a CPU session the same code runs with host buffers (the ids mean nothing there): that is
how its bookkeeping is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime import contract as c

GRAPH_ID_OPTION = "gpu_graph_id"  # ONNX Runtime's run option (kOrtRunOptionsConfigCudaGraphAnnotation)


@dataclass
class CountSlot:
    """What one image count keeps alive for its captured graph: the binding, the device buffers
    it points at (their addresses are baked into the graph) and the run options naming it."""

    binding: Any
    pixels: Any  # OrtValue [count, 3, H, W]
    embeds: Any  # OrtValue [count, tokens, lang_dim]
    options: Any


class ImageCountGraphs:
    """``run(pixels)`` for pixels already in the graph's dtype: a slot per image count, made on
    the count's first call and reused after, so each captured graph keeps its buffers."""

    def __init__(self, session, device: str, output_shape: Callable[[int], tuple[int, ...]], dtype):
        self.session = session
        self.device = device
        self.output_shape = output_shape
        self.dtype = np.dtype(dtype)
        self.slots: dict[int, CountSlot] = {}
        self.fence = None  # one float on the device: reading it waits for the copy in

    def run(self, pixels: np.ndarray) -> np.ndarray:
        count = len(pixels)
        slot = self.slots.get(count) or self._slot(count, pixels.shape)
        slot.pixels.update_inplace(np.ascontiguousarray(pixels, self.dtype))
        if self.device != "cpu":
            self._wait_for_copies()
        self.session.run_with_iobinding(slot.binding, slot.options)
        out = slot.embeds.numpy()  # a device value's copy to the host; a host value's own memory
        return out.copy() if self.device == "cpu" else out

    def _wait_for_copies(self) -> None:
        """A device-to-host read on the default stream: it starts after the copy in ends."""
        if self.fence is None:
            import onnxruntime as ort

            self.fence = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32), self.device, 0)
        self.fence.numpy()

    def _slot(self, count: int, shape: tuple[int, ...]) -> CountSlot:
        import onnxruntime as ort

        pixels = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.dtype, self.device, 0)
        embeds = ort.OrtValue.ortvalue_from_shape_and_type(list(self.output_shape(count)), self.dtype,
                                                           self.device, 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(c.VISION_INPUT, pixels)
        binding.bind_ortvalue_output(c.VISION_OUTPUT, embeds)
        options = ort.RunOptions()
        options.add_run_config_entry(GRAPH_ID_OPTION, str(count))
        self.slots[count] = slot = CountSlot(binding, pixels, embeds, options)
        return slot
