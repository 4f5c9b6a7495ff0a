"""Peak RSS of reading a large checkpoint one tensor at a time (run by hand, not a test).

Writes a DSVL-format checkpoint of LLaMA-2-7B layer shapes in fp16 (``--layers`` layers, about
0.4 GB each) with the streaming writer, then reads every tensor back in a fresh process per
reader and prints each process's VmHWM (peak RSS) from /proc/self/status:

    python scripts/lazy_memory.py --layers 5 --dir /tmp/lazy-mem

``lazy`` (dsvl.lazy_sources.open_checkpoint, each tensor loaded, summed and dropped) should stay
near the interpreter's own footprint plus the largest tensor; ``mmap`` (torch.load(mmap=True),
every tensor touched) and ``eager`` (torch.load) grow with the file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HIDDEN, MLP = 4096, 11008
SHAPES = {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
          "self_attn.v_proj.weight": (HIDDEN, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
          "mlp.gate_proj.weight": (MLP, HIDDEN), "mlp.up_proj.weight": (MLP, HIDDEN),
          "mlp.down_proj.weight": (HIDDEN, MLP), "input_layernorm.weight": (HIDDEN,),
          "post_attention_layernorm.weight": (HIDDEN,)}


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write(path: Path, layers: int) -> None:
    import torch

    from dsvl.checkpoint_writer import write_dsvl_checkpoint

    def tensors():
        for i in range(layers):
            for name, shape in SHAPES.items():
                gen = torch.Generator().manual_seed(i * 100 + len(name))
                yield f"lang_decoder.model.layers.{i}.{name}", torch.randn(shape, generator=gen).half()

    write_dsvl_checkpoint(path, tensors())


def read(path: Path, how: str) -> float:
    import torch

    total = 0.0
    if how == "lazy":
        from dsvl.lazy_sources import open_checkpoint

        for source in open_checkpoint(path).values():
            total += source.load().float().sum().item()
    else:
        state = torch.load(path, weights_only=True, mmap=how == "mmap")
        for tensor in state.values():
            total += tensor.float().sum().item()
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lazy-mem"))
    parser.add_argument("--readers", default="lazy,mmap,eager")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        how, path = args.child[0], Path(args.child[1])
        if how == "write":
            write(path, args.layers)
            print(f"write: VmHWM {peak_mb():.0f} MB")
        else:
            checksum = read(path, how)
            print(f"{how}: VmHWM {peak_mb():.0f} MB (checksum {checksum:.3f})")
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "pytorch_model.bin"
    for how in ["write", *args.readers.split(",")]:
        subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--child", how, str(path)],
                       check=True)
        if how == "write":
            print(f"file: {path.stat().st_size / 2**20:.0f} MB ({args.layers} layers of LLaMA-2-7B, fp16)")
    baseline = subprocess.run([sys.executable, "-c", "import torch, dsvl.lazy_sources, pathlib; "
                               "print([l for l in pathlib.Path('/proc/self/status').read_text().splitlines() "
                               "if l.startswith('VmHWM')][0])"], capture_output=True, text=True, check=True)
    print(f"interpreter + torch alone: {baseline.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
