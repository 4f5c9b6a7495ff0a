"""Cost per chat turn of each chat mode (exact, reencode, approximate), side by side in one run.

    python scripts/bench_chat.py --preset small --json chat.json [--mmca] [--artifacts DIR]

Exports the preset (unless --artifacts is given) with a DSVL checkpoint whose ``lang_embed``
differs from ``embed_tokens``, as after DSVL's training, so ``exact`` has to re-run each
previous answer. A 4-turn conversation (an image, text, a new image, text) runs in every mode,
interleaved, ``--repeats`` times; per turn it reports the median time to first token (the
prefill, vision included), the positions reused and prefilled, and whether each mode's tokens
equal ``reencode``'s (DSVL's computation). The machine's load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.pipeline import Pipeline  # noqa: E402
from runtime.sampling import SamplingOptions  # noqa: E402

MODES = ("exact", "reencode", "approximate")
TURNS = [("Describe the picture in detail.", [0]), ("What colours stand out?", []),
         ("Here is another one. How do they differ?", [1]), ("Which would you pick, and why?", [])]


def export(preset: str, mmca: bool, out: Path) -> Path:
    import torch

    from dsvl.loading import WeightSource, load_model
    from export import all as export_all

    model, _, _ = load_model(WeightSource(preset=preset, vis_proj="perceiver", seed=5))
    state = model.state_dict()
    noise = torch.randn(state["lang_embed.weight"].shape, generator=torch.Generator().manual_seed(6))
    state["lang_embed.weight"] = state["lang_embed.weight"] + 0.5 * noise
    (out / "ckpt").mkdir(parents=True)
    torch.save(state, out / "ckpt" / "pytorch_model.bin")
    flags = ["--preset", preset, "--vis-proj", "perceiver", "--checkpoint-path", str(out / "ckpt"),
             "--out", str(out / "artifacts")] + (["--enable-mmca-attention"] if mmca else [])
    if export_all.main(flags) != 0:
        raise SystemExit("export failed")
    return out / "artifacts"


def images(size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size + 37 * i, size, 3), dtype=np.uint8) for i in range(2)]


def run_mode(pipe: Pipeline, mode: str, pictures: list[np.ndarray], new_tokens: int) -> list[dict]:
    chat = pipe.chat(mode)
    rows = []
    for question, picks in TURNS:
        result = chat.ask(question, [pictures[i] for i in picks], SamplingOptions(max_new_tokens=new_tokens))
        t = result.timings
        rows.append({"ttft_s": t["time_to_first_token_s"], "total_s": t["total_s"],
                     "reused": t["reused_positions"], "prefilled": t["prefilled_positions"],
                     "tokens": result.tokens})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--mmca", action="store_true", help="export with MMCA attention")
    parser.add_argument("--artifacts", type=Path, help="use this export instead of making one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = args.artifacts or export(args.preset, args.mmca, Path(tmp))
        pipes = {mode: Pipeline.from_artifacts(artifacts, threads=args.threads) for mode in MODES}
        pictures = images(pipes["exact"].artifacts.vision.image_size)
        load_before = os.getloadavg()
        runs: dict[str, list[list[dict]]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:  # interleaved, so load drifts hit every mode alike
                runs[mode].append(run_mode(pipes[mode], mode, pictures, args.new_tokens))
        load_after = os.getloadavg()
        mmca = pipes["exact"].artifacts.mmca
    reference = runs["reencode"][0]
    table = {}
    for mode in MODES:
        table[mode] = []
        for turn in range(len(TURNS)):
            samples = [run[turn] for run in runs[mode]]
            table[mode].append({
                "ttft_ms": 1e3 * statistics.median(s["ttft_s"] for s in samples),
                "total_ms": 1e3 * statistics.median(s["total_s"] for s in samples),
                "reused": samples[0]["reused"], "prefilled": samples[0]["prefilled"],
                "tokens_equal_dsvl": samples[0]["tokens"] == reference[turn]["tokens"]})
    result = {"preset": args.preset, "mmca": mmca, "threads": args.threads, "repeats": args.repeats,
              "new_tokens": args.new_tokens, "turns": [q for q, _ in TURNS],
              "loadavg_before": load_before, "loadavg_after": load_after, "modes": table,
              "ttft_ratio_vs_reencode": {
                  mode: [round(table[mode][t]["ttft_ms"] / table["reencode"][t]["ttft_ms"], 3)
                         for t in range(len(TURNS))] for mode in MODES}}
    print(f"chat modes, preset {args.preset}, MMCA {'on' if mmca else 'off'}, {args.threads} threads, "
          f"median of {args.repeats}; load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'turn':<6}" + "".join(f"{m + ' ttft ms (reused/prefilled)':>42}" for m in MODES))
    for turn in range(len(TURNS)):
        cells = []
        for mode in MODES:
            row = table[mode][turn]
            mark = "" if row["tokens_equal_dsvl"] else " !="
            cells.append(f"{row['ttft_ms']:.0f} ({row['reused']}/{row['prefilled']}){mark}")
        print(f"{turn + 1:<6}" + "".join(f"{c:>42}" for c in cells))
    print("'!=' marks tokens that differ from reencode (DSVL's computation)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
