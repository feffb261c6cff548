"""Where Block-Skim's batch-1 time goes beyond the ideal truncation: the time inside and between the layers.

`squad.py` reports the implementation efficiency, T(ideal truncation) / T(Block-Skim); this says where the difference
lies. Forward hooks on every layer stamp `time.perf_counter()` before and after it, in Block-Skim and in the ideal
truncation (the stock layers on the same per-layer kept lengths, `squad.ideal_truncation`), on the same seeded dev
windows, one window at a time, the two interleaved after warm-up; each region's median over the repeats is summed
over the windows. The regions:

- `before layer 0`: the embeddings and, in Block-Skim, the question and protected-block masks and the used length;
- `layer i`: the layer itself; a predictor layer also computes what its predictor reads, inside the attention;
- `layer i -> i+1`: in Block-Skim after a predictor layer the predictor, the keep decision, the compaction and a new
  attention mask;
- `after the last layer`: the span head and, in Block-Skim, scattering the logits back and the output object.

The hooks cost the same in both models, so the extra time per region is Block-Skim's own. Each window's forward is
also run once under `benchmarking.count_operators` to count the ATen operators it dispatches: every one pays the
dispatcher's and Python's overhead however small its tensors, which is what dominates Block-Skim's extra time at
batch 1.

Regions mix two kinds of extra work (a predictor layer's region holds both the layer and what its predictor reads),
so the same timed runs also clock Block-Skim's own functions, grouped as the issue's profile asks (`FUNCTION_PARTS`):
what the predictors read (block-question masses, their context, diagonal attention squares, token matches), the
predictor heads, and the skim bookkeeping (masks and used length, keep decision, compaction, scattering the logits
back). None of them runs in the ideal truncation, so each is extra time as a whole; the rest of the extra is the
layers' own share (the fused attention call that also returns the log-sum-exp, attention masks) and Python glue.

Example:

    python benchmarks/overhead_profile.py --vanilla /work/bench_models7k/vanilla --blockskim /work/ctx/context \
        --skim-layers 1 --dev-file ../shared/data/squad/dev-v1.1.json.gz --threshold 0.45 \
        --output benchmarks/results/overhead_profile_cpu.json

`--threshold 0.5/0.8` gives one tau per predictor layer; `--variant squad-long --max-seq-length 512` profiles long
windows.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from squad import (
    THRESHOLDS_HELP,
    collate,
    ideal_truncation,
    layer_thresholds,
    load_dev_features,
    load_models,
    parse_threshold,
    tau_label,
)
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from modeling_blockskim.benchmarking import atomic_write_json, count_operators, environment, median


def region_names(layers: int) -> list[str]:
    """`before layer 0`, `layer 0`, `layer 0 -> 1`, ..., `layer L-1`, `after the last layer`."""
    names = ["before layer 0"]
    for index in range(layers):
        names.append(f"layer {index}")
        names.append(f"layer {index} -> {index + 1}" if index + 1 < layers else "after the last layer")
    return names


class RegionClock:
    """Stamps the time before and after every layer of one forward; `regions` are the differences of the stamps."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        self.stamps: list[float] = []
        self.handles = []
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(lambda *_: self.stamps.append(time.perf_counter())))
            self.handles.append(layer.register_forward_hook(lambda *_: self.stamps.append(time.perf_counter())))

    def time(self, run: Callable[[], object]) -> list[float]:
        self.stamps = [time.perf_counter()]
        run()
        self.stamps.append(time.perf_counter())
        return [later - earlier for earlier, later in itertools.pairwise(self.stamps)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


FUNCTION_PARTS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "predictor inputs": (
        ("attention_blockskim", "", "block_question_attention"),
        ("attention_blockskim", "", "block_context_features"),
        ("attention_blockskim", "", "row_logsumexp"),
        ("attention_blockskim", "JudgedBlocks", "every_slot"),
        ("attention_blockskim", "JudgedBlocks", "gather"),
        ("attention_blockskim", "", "judged_block_probabilities"),
        ("predictor_blockskim", "TokenMatcher", "forward"),
    ),
    "predictor heads": (("predictor_blockskim", "BlockSkimPredictor", "forward"),),
    "skim bookkeeping": (
        ("modeling_blockskim", "BlockSkimForQuestionAnswering", "_initial_state"),
        ("modeling_blockskim", "", "keep_decision"),
        ("modeling_blockskim", "", "compact"),
        ("modeling_blockskim", "", "to_original_blocks"),
        ("modeling_blockskim", "", "scatter_to_input"),
    ),
}
"""Block-Skim's own functions by part of the extra work: (sibling module of the model's, class or "" for a module
function, attribute). Each is looked up where its caller looks it up (the modeling module imports the skimming
functions by name), and none calls another, so no time is counted twice."""


class FunctionClock:
    """Adds up the seconds spent in `FUNCTION_PARTS`, per part, while `clocking()` is active.

    The functions are wrapped in place in the modules of `model` (the package's or a checkpoint's remote code) and
    restored on exit; a wrapper costs two `perf_counter` calls, about a microsecond per call.
    """

    def __init__(self, model: torch.nn.Module):
        package = type(model).__module__.rpartition(".")[0]
        self.targets: list[tuple[str, object, str]] = []
        for part, functions in FUNCTION_PARTS.items():
            for module_name, class_name, attribute in functions:
                owner = importlib.import_module(f"{package}.{module_name}")
                owner = getattr(owner, class_name) if class_name else owner
                self.targets.append((part, owner, attribute))
        self.seconds = dict.fromkeys(FUNCTION_PARTS, 0.0)

    def _timed(self, part: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return timed

    @contextmanager
    def clocking(self) -> Iterator[dict[str, float]]:
        """Clock the functions; yields the per-part seconds of this activation (filled when it ends)."""
        self.seconds = dict.fromkeys(FUNCTION_PARTS, 0.0)
        originals = [(owner, attribute, owner.__dict__[attribute]) for _, owner, attribute in self.targets]
        try:
            for (part, owner, attribute), (_, _, original) in zip(self.targets, originals, strict=True):
                if isinstance(original, classmethod):
                    setattr(owner, attribute, classmethod(self._timed(part, original.__func__)))
                else:
                    setattr(owner, attribute, self._timed(part, original))
            yield self.seconds
        finally:
            for owner, attribute, original in originals:
                setattr(owner, attribute, original)


def profile(
    vanilla: torch.nn.Module,
    blockskim: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    threshold: float | dict[int, float],
    repeats: int,
    warmup: int,
) -> tuple[dict[str, list[float]], dict[str, int], dict[str, float], list[float]]:
    """Seconds per region, summed over the windows of the per-window medians, and ATen operators dispatched, summed
    over the windows, for `blockskim` and `ideal`; Block-Skim's seconds per part of `FUNCTION_PARTS` and the tokens
    it kept per layer (fractions of the windows' real tokens), both over all windows."""
    clocks = {"blockskim": RegionClock(blockskim.layers), "ideal": RegionClock(vanilla.base_model.encoder.layer)}
    functions = FunctionClock(blockskim)
    totals = {name: [0.0] * (2 * len(blockskim.layers) + 1) for name in clocks}
    parts = dict.fromkeys(FUNCTION_PARTS, 0.0)
    kept_tokens = torch.zeros(len(blockskim.layers), dtype=torch.float64)
    operators = dict.fromkeys(clocks, 0)
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="windows", leave=False):
                kept = blockskim(**batch, skim=True, skim_threshold=threshold, output_skim_details=True)
                kept_tokens += kept.kept_token_counts.sum(dim=0).double()
                runs = {
                    "blockskim": lambda batch=batch: blockskim(**batch, skim=True, skim_threshold=threshold),
                    "ideal": ideal_truncation(vanilla, batch, kept.kept_token_counts),
                }
                samples: dict[str, list[list[float]]] = {name: [] for name in runs}
                part_samples: list[dict[str, float]] = []
                for repeat in range(warmup + repeats):
                    for name, run in runs.items():
                        clocking = functions.clocking() if name == "blockskim" else nullcontext(None)
                        with clocking as seconds:
                            regions = clocks[name].time(run)
                        if repeat >= warmup:
                            samples[name].append(regions)
                            if seconds is not None:
                                part_samples.append(seconds)
                for name, per_repeat in samples.items():
                    for index, values in enumerate(zip(*per_repeat, strict=True)):
                        totals[name][index] += median(list(values))
                    operators[name] += count_operators(runs[name])
                for part in parts:
                    parts[part] += median([sample[part] for sample in part_samples])
    finally:
        for clock in clocks.values():
            clock.remove()
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    return totals, operators, parts, (kept_tokens / real_tokens).tolist()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vanilla", required=True, help="vanilla QA checkpoint (the ideal truncation's layers)")
    parser.add_argument("--blockskim", required=True, help="Block-Skim checkpoint")
    parser.add_argument(
        "--skim-layers", type=int, nargs="+", default=None, help="predictor layers used (default: all)"
    )
    parser.add_argument("--dev-file", required=True, help="SQuAD-format dev file (.json or .json.gz)")
    parser.add_argument("--threshold", type=parse_threshold, default=0.45, help=THRESHOLDS_HELP)
    parser.add_argument("--variant", choices=["squad", "squad-long"], default="squad")
    parser.add_argument("--paragraphs", type=int, default=4, help="paragraphs joined per context for squad-long")
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--windows", type=int, default=48, help="dev windows profiled (seeded random sample)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    loading = argparse.Namespace(
        **vars(args), dtype="float32", max_questions=None
    )  # what `squad.load_models` and `load_dev_features` read
    vanilla, blockskim = load_models(loading, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(args.blockskim)
    _, features, _ = load_dev_features(loading, tokenizer)
    sample = random.Random(args.seed).sample(range(len(features)), min(args.windows, len(features)))
    batches = [collate(features, [index], tokenizer.pad_token_id) for index in sample]
    threshold = layer_thresholds(blockskim.config.skim_layers, args.threshold)
    totals, operators, parts, kept = profile(vanilla, blockskim, batches, threshold, args.repeats, args.warmup)
    per_window = {name: [1000 * seconds / len(batches) for seconds in values] for name, values in totals.items()}
    regions = [
        {"region": name, "blockskim_ms": ours, "ideal_ms": ideal, "extra_ms": ours - ideal}
        for name, ours, ideal in zip(
            region_names(len(blockskim.layers)), per_window["blockskim"], per_window["ideal"], strict=True
        )
    ]
    result: dict[str, Any] = {
        "benchmark": "overhead_profile",
        "environment": environment("cpu"),
        "setup": {
            "vanilla": args.vanilla,
            "blockskim": args.blockskim,
            "skim_layers": blockskim.config.skim_layers,
            "threshold": tau_label(args.threshold),
            "dev_file": args.dev_file,
            "variant": args.variant,
            "max_seq_length": args.max_seq_length,
            "windows": len(batches),
            "batch_size": 1,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
        },
        "regions": regions,
        "blockskim_ms_per_window": sum(per_window["blockskim"]),
        "ideal_ms_per_window": sum(per_window["ideal"]),
        "implementation_efficiency": sum(per_window["ideal"]) / sum(per_window["blockskim"]),
        "operators_per_window": {name: count / len(batches) for name, count in operators.items()},
        "functions_ms_per_window": {part: 1000 * seconds / len(batches) for part, seconds in parts.items()},
        "kept_token_fraction_per_layer": kept,
    }
    atomic_write_json(args.output, result)
    for row in regions:
        print(f"{row['region']:>22}: Block-Skim {row['blockskim_ms']:.3f} ms, ideal {row['ideal_ms']:.3f} ms")
    per_window_operators = result["operators_per_window"]
    print(
        f"ATen operators per window: Block-Skim {per_window_operators['blockskim']:.1f}, "
        f"ideal {per_window_operators['ideal']:.1f}"
    )
    for part, milliseconds in result["functions_ms_per_window"].items():
        print(f"{part:>22}: {milliseconds:.3f} ms")
    print(f"efficiency {result['implementation_efficiency']:.3f}; wrote {args.output}")


if __name__ == "__main__":
    main()
