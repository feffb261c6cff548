"""Accuracy and real cost of Block-Skim against honest baselines on SQuAD v1.1 dev (and a long-context variant).

One run evaluates two models trained with `examples/run_qa.py` from the same backbone (see
`benchmarks/train_models.sh`): the vanilla QA model (the baseline) and the Block-Skim model, without skimming and
skimming at every threshold tau. For every row it records, in one process and on the same inputs:

- EM/F1 on every question (`--max-questions` samples a documented subset for the slow long-context variant);
- FLOPs per question as run at batch 1, from the analytic count on the per-layer lengths the model processed
  (checked against `torch.utils.flop_counter` on a sample), the speedup versus the vanilla model with dynamic
  padding (the honest baseline) and padded to `max_seq_length` (the setting of the paper's FLOPs), and the paper's
  ideal speedup (Eq. 4) from the kept-token fractions;
- the oracle bound: keep only [CLS], question, separator and gold-answer blocks after the first 1, 2, 3 layers
  (`oracle.after_layer_k`: k layers read the whole window, as with a predictor at layer index k - 1);
- wall-clock per batch size (medians of interleaved repeats after warm-up; CUDA events on a GPU): vanilla with
  dynamic padding + SDPA, vanilla padded, Block-Skim rows, and the *ideal truncation* of every skimming row (the
  stock layers run on sequences already cut to that row's per-layer kept lengths, no predictor, no gather), so that
  implementation efficiency = T(ideal truncation) / T(Block-Skim).

Example (what BENCHMARKS.md reports; `benchmarks/report.py` turns the JSON into tables and plots):

    python benchmarks/squad.py --vanilla models/vanilla --blockskim models/blockskim \
        --dev-file data/squad/dev-v1.1.json.gz --output benchmarks/results/squad_cpu.json
    python benchmarks/squad.py ... --variant squad-long --max-seq-length 512 --max-questions 1000 \
        --output benchmarks/results/squad_long512_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForQuestionAnswering, AutoTokenizer
from transformers.masking_utils import create_bidirectional_mask

from modeling_blockskim import BlockSkimConfig, BlockSkimForQuestionAnswering
from modeling_blockskim.benchmarking import (
    add_device_arguments,
    atomic_write_json,
    environment,
    median,
    time_side_by_side,
)
from modeling_blockskim.configuration_blockskim import (
    parse_thresholds,
    thresholds_for_layers,
    trained_predictor_subset,
)
from modeling_blockskim.data import load_qa_dataset, postprocess_qa_predictions, prepare_eval_features
from modeling_blockskim.flops import count_flops, forward_flops, ideal_speedup
from modeling_blockskim.metrics import load_squad_metric
from modeling_blockskim.skimming_blockskim import any_per_block, protected_token_mask, question_token_mask

DEFAULT_THRESHOLDS = (0.001, 0.01, 0.05, 0.1, 0.3, 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def squad_long(examples: datasets.Dataset, paragraphs: int) -> datasets.Dataset:
    """SQuAD-long: every `paragraphs` consecutive paragraphs of an article joined into one context.

    Each question keeps its own answers, re-offset into the joined context (paragraphs are joined with a blank
    line). The joined contexts are several windows long, so windows are full at 384 and 512 tokens.
    """
    by_title: dict[str, list[str]] = {}
    for title, context in zip(examples["title"], examples["context"], strict=True):
        contexts = by_title.setdefault(title, [])
        if not contexts or contexts[-1] != context:
            contexts.append(context)
    joined: dict[tuple[str, str], tuple[str, int]] = {}  # (title, paragraph) -> (joined context, offset)
    for title, contexts in by_title.items():
        for first in range(0, len(contexts), paragraphs):
            group = contexts[first : first + paragraphs]
            text = "\n\n".join(group)
            offset = 0
            for context in group:
                joined[(title, context)] = (text, offset)
                offset += len(context) + 2

    def rewrite(example: dict[str, Any]) -> dict[str, Any]:
        text, offset = joined[(example["title"], example["context"])]
        answers = dict(example["answers"])
        answers["answer_start"] = [start + offset for start in answers["answer_start"]]
        for start, answer in zip(answers["answer_start"], answers["text"], strict=True):
            assert text[start : start + len(answer)] == answer, "answer re-offset failed"
        return {"context": text, "answers": answers}

    return examples.map(rewrite, desc=f"joining {paragraphs} paragraphs")


# ----------------------------------------------------------------------------------------------------------------
# Per-feature records of one evaluation pass
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Pass:
    """What one model variant did on every feature."""

    start_logits: list[torch.Tensor] = field(default_factory=list)
    end_logits: list[torch.Tensor] = field(default_factory=list)
    processed: list[list[int]] = field(default_factory=list)  # positions each layer ran on, batch 1
    kept_tokens: list[list[int]] = field(default_factory=list)  # real tokens each layer ran on


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Feature indices grouped into batches of similar length (results do not depend on the batch)."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def collate(features: datasets.Dataset, indices: Sequence[int], pad_id: int, length: int | None = None) -> dict:
    """Right-padded tensors of the given features, to `length` or to the longest of them."""
    rows = [features[index] for index in indices]
    width = length or max(len(row["input_ids"]) for row in rows)
    batch: dict[str, torch.Tensor] = {}
    for name, pad in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if name in rows[0]:
            batch[name] = torch.tensor([row[name] + [pad] * (width - len(row[name])) for row in rows])
    return batch


def processed_lengths(output: Any) -> torch.Tensor:
    """(batch, layers) positions each layer runs on when the example is alone in its batch.

    A lone skimming example runs every layer on its real, still present tokens: the layers stop at the last real
    token (no padding to whole blocks) and, after a predictor layer, on the kept blocks' tokens, which stay
    contiguous. That is exactly `kept_token_counts`, whatever batch the example was evaluated in.
    """
    return output.kept_token_counts


def run_pass(
    model: torch.nn.Module,
    features: datasets.Dataset,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    call_kwargs: dict[str, Any],
    description: str,
) -> Pass:
    """Evaluate every feature; Block-Skim calls also record what each layer processed."""
    lengths = [len(ids) for ids in features["input_ids"]]
    records: dict[int, tuple] = {}
    is_blockskim = isinstance(model, BlockSkimForQuestionAnswering)
    skimming = is_blockskim and call_kwargs.get("skim", False)
    layers = model.config.num_hidden_layers
    with torch.inference_mode():
        for indices in tqdm(batches_by_length(lengths, batch_size), desc=description, leave=False):
            batch = {k: v.to(device) for k, v in collate(features, indices, pad_id).items()}
            output = model(**batch, **call_kwargs, **({"output_skim_details": True} if skimming else {}))
            real = batch["attention_mask"].sum(dim=1)  # (B,)
            if skimming:
                processed = processed_lengths(output).tolist()
                kept = output.kept_token_counts.tolist()
            else:
                processed = kept = real[:, None].repeat(1, layers).tolist()
            for row, index in enumerate(indices):
                n = lengths[index]
                records[index] = (
                    output.start_logits[row, :n].float().cpu(),
                    output.end_logits[row, :n].float().cpu(),
                    processed[row],
                    kept[row],
                )
    result = Pass()
    for index in range(len(lengths)):
        start, end, processed, kept = records[index]
        result.start_logits.append(start)
        result.end_logits.append(end)
        result.processed.append(processed)
        result.kept_tokens.append(kept)
    return result


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and the oracle bound
# ----------------------------------------------------------------------------------------------------------------


def blocks_touched(token_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """(1, K) blocks holding at least one marked token of a `(1, n)` mask (padded to whole blocks)."""
    pad = -token_mask.shape[1] % block_size
    return any_per_block(torch.nn.functional.pad(token_mask, (0, pad)), block_size)


def question_lengths(features: datasets.Dataset, sep_token_id: int) -> list[int]:
    """Per feature: the question tokens (up to the first separators) whose attention question-feature predictors
    read."""
    counts = []
    for ids in features["input_ids"]:
        input_ids = torch.tensor([ids])
        counts.append(
            int(question_token_mask(input_ids, torch.ones_like(input_ids, dtype=torch.bool), sep_token_id).sum())
        )
    return counts


def oracle_keep_blocks(ids: Sequence[int], start: int, end: int, sep_token_id: int, block_size: int) -> torch.Tensor:
    """(1, K) the oracle's blocks of one window: those holding [CLS], question, separators or the gold answer."""
    input_ids = torch.tensor([list(ids)])
    keep = protected_token_mask(input_ids, torch.ones_like(input_ids, dtype=torch.bool), sep_token_id)
    if start > 0:  # windows without the answer point at [CLS] (position 0)
        keep[0, start : end + 1] = True
    return blocks_touched(keep, block_size)


def oracle_kept_tokens(features: datasets.Dataset, sep_token_id: int, block_size: int) -> list[int]:
    """Real tokens in the protected blocks plus the gold-answer blocks of each feature (no answer: none)."""
    kept = []
    columns = (features["input_ids"], features["start_positions"], features["end_positions"])
    for ids, start, end in zip(*columns, strict=True):
        blocks = oracle_keep_blocks(ids, start, end, sep_token_id, block_size)  # (1, K)
        token_blocks = blocks.repeat_interleave(block_size, dim=1)[:, : len(ids)]
        kept.append(int(token_blocks.sum()))
    return kept


def flops_per_feature(
    config, rows: Sequence[Sequence[int]], predictors: bool, question_tokens: Sequence[int]
) -> list[int]:
    return [
        forward_flops(config, list(row), predictors=predictors, question_tokens=question)
        for row, question in zip(rows, question_tokens, strict=True)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Wall-clock
# ----------------------------------------------------------------------------------------------------------------


def ideal_truncation(vanilla: torch.nn.Module, batch: dict, kept_tokens: torch.Tensor) -> Callable[[], object]:
    """The stock layers on sequences already cut to the per-layer kept lengths: no predictor, no gather.

    Row b holds `kept_tokens[b, i]` real tokens at layer i, left-aligned; masks are built beforehand.
    """
    base = vanilla.base_model
    layers = base.encoder.layer
    lengths = kept_tokens.max(dim=0).values.tolist()  # (layers,)
    positions = torch.arange(max(lengths), device=kept_tokens.device)
    masks = []
    for index, length in enumerate(lengths):
        valid = positions[None, :length] < kept_tokens[:, index, None]  # (B, length)
        shape_probe = torch.empty(valid.shape[0], length, 1, device=valid.device, dtype=vanilla.dtype)
        masks.append(create_bidirectional_mask(config=vanilla.config, inputs_embeds=shape_probe, attention_mask=valid))
    model_inputs = {k: v for k, v in batch.items() if k in ("input_ids", "token_type_ids")}

    def run() -> torch.Tensor:
        hidden = base.embeddings(**model_inputs)
        for layer, length, mask in zip(layers, lengths, masks, strict=True):
            hidden = layer(hidden[:, :length], mask)
        return vanilla.qa_outputs(hidden)

    return run


def time_rows(
    vanilla: torch.nn.Module,
    blockskim: BlockSkimForQuestionAnswering,
    features: datasets.Dataset,
    indices: Sequence[int],
    batch_size: int,
    thresholds: Mapping[str, float | dict[int, float]],
    max_seq_length: int,
    pad_id: int,
    device: torch.device,
    repeats: int,
    warmup: int,
) -> dict[str, float]:
    """Seconds per variant for the given features: sum over batches of the per-batch median."""
    totals: dict[str, float] = {}
    batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    with torch.inference_mode():
        for batch_indices in tqdm(batches, desc=f"timing batch {batch_size}", leave=False):
            batch = {k: v.to(device) for k, v in collate(features, batch_indices, pad_id).items()}
            padded = {k: v.to(device) for k, v in collate(features, batch_indices, pad_id, max_seq_length).items()}
            variants: dict[str, Callable[[], object]] = {
                "vanilla_dynamic": lambda batch=batch: vanilla(**batch),
                "vanilla_padded": lambda padded=padded: vanilla(**padded),
                "blockskim_no_skim": lambda batch=batch: blockskim(**batch, skim=False),
            }
            for label, tau in thresholds.items():
                details = blockskim(**batch, skim=True, skim_threshold=tau, output_skim_details=True)
                variants[f"blockskim_tau={label}"] = lambda batch=batch, tau=tau: blockskim(
                    **batch, skim=True, skim_threshold=tau
                )
                variants[f"ideal_truncation_tau={label}"] = ideal_truncation(vanilla, batch, details.kept_token_counts)
            times = time_side_by_side(variants, repeats=repeats, warmup=warmup, device=device)
            for name, values in times.items():
                totals[name] = totals.get(name, 0.0) + median(values)
    return totals


def check_flop_counter(
    vanilla: torch.nn.Module,
    blockskim: BlockSkimForQuestionAnswering,
    features: datasets.Dataset,
    indices: Sequence[int],
    thresholds: Mapping[str, float | dict[int, float]],
    question_tokens: Sequence[int],
    pad_id: int,
    device: torch.device,
) -> dict[str, float]:
    """Largest |measured / analytic - 1| per variant over single-feature forwards."""
    config = blockskim.config
    worst: dict[str, float] = {}

    def record(name: str, measured: int, analytic: int) -> None:
        worst[name] = max(worst.get(name, 0.0), abs(measured / analytic - 1.0))

    with torch.inference_mode():
        for index in indices:
            batch = {k: v.to(device) for k, v in collate(features, [index], pad_id).items()}
            n = batch["input_ids"].shape[1]
            plain = forward_flops(config, [n] * config.num_hidden_layers, predictors=False)
            record("vanilla_dynamic", count_flops(lambda batch=batch: vanilla(**batch)), plain)
            record("blockskim_no_skim", count_flops(lambda batch=batch: blockskim(**batch, skim=False)), plain)
            for label, tau in thresholds.items():
                details = blockskim(**batch, skim=True, skim_threshold=tau, output_skim_details=True)
                lengths = processed_lengths(details)[0].tolist()
                analytic = forward_flops(config, lengths, question_tokens=question_tokens[index])
                measured = count_flops(lambda batch=batch, tau=tau: blockskim(**batch, skim=True, skim_threshold=tau))
                record(f"blockskim_tau={label}", measured, analytic)
    return worst


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


THRESHOLDS_HELP = (
    "tau for every predictor layer (0.3), or one per predictor layer, lowest layer first, joined by '/' (0.2/0.6)"
)


def parse_threshold(text: str) -> float | tuple[float, ...]:
    """`0.3` (one tau for all predictor layers) or `0.2/0.4/0.6` (one per predictor layer, lowest layer first)."""
    try:
        return parse_thresholds(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--thresholds: {error}") from None


def tau_label(tau: float | tuple[float, ...]) -> str:
    return "/".join(f"{value:g}" for value in (tau if isinstance(tau, tuple) else (tau,)))


def layer_thresholds(layers: list[int], tau: float | tuple[float, ...]) -> float | dict[int, float]:
    """`skim_threshold` for a model with predictors after `layers`, from one `--thresholds` value."""
    try:
        return thresholds_for_layers(tau, layers)
    except ValueError as error:
        raise SystemExit(f"--thresholds {error}") from None


def add_model_and_data_arguments(parser: argparse.ArgumentParser, thresholds: Sequence[float]) -> None:
    """The two models, the dev questions and their windows, the τ rows and the evaluation batch: the same in every
    script that scores the rows of this one (`paired_bootstrap.py`), so that one command line selects the same work."""
    parser.add_argument("--vanilla", required=True, help="vanilla QA checkpoint (run_qa.py --block_skim false)")
    parser.add_argument("--blockskim", required=True, help="Block-Skim checkpoint (run_qa.py --block_skim true)")
    parser.add_argument("--dev-file", required=True, help="SQuAD v1.1 dev JSON (plain or .gz)")
    parser.add_argument(
        "--skim-layers",
        type=int,
        nargs="+",
        default=None,
        help="predictor layers to use at inference, a subset of the checkpoint's (default: all it was trained with)",
    )
    parser.add_argument("--variant", choices=["squad", "squad-long"], default="squad")
    parser.add_argument("--paragraphs", type=int, default=4, help="paragraphs joined per context for squad-long")
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--max-questions", type=int, default=None, help="seeded random subset of the questions")
    parser.add_argument(
        "--thresholds", type=parse_threshold, nargs="+", default=list(thresholds), help=THRESHOLDS_HELP
    )
    parser.add_argument("--eval-batch-size", type=int, default=32)


def row_calls(
    vanilla: torch.nn.Module, blockskim: BlockSkimForQuestionAnswering, thresholds: Mapping[str, float | dict]
) -> dict[str, tuple[torch.nn.Module, dict[str, Any]]]:
    """Every row of the accuracy table, as (model, call arguments): vanilla, Block-Skim without skimming, and
    Block-Skim at each of `thresholds` (label -> `skim_threshold`)."""
    return {
        "vanilla": (vanilla, {}),
        "blockskim_no_skim": (blockskim, {"skim": False}),
        **{
            f"blockskim_tau={label}": (blockskim, {"skim": True, "skim_threshold": tau})
            for label, tau in thresholds.items()
        },
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_arguments(parser, DEFAULT_THRESHOLDS)
    parser.add_argument(
        "--joint-training",
        default=None,
        help="when --blockskim comes from a predictor-only stage (run_qa.py --train_predictors_only): the joint "
        "training run it started from, whose throughput is compared with the vanilla run's; the --vanilla path "
        "itself when the stage started from the vanilla model (the cost is then the stage's time on top of it)",
    )
    parser.add_argument(
        "--earlier-stages",
        nargs="+",
        default=[],
        help="with --joint-training, when --blockskim comes from a stage on top of another stage (e.g. run_qa.py "
        "--train_with_skimming after --train_predictors_only): the earlier stages' runs, in order; their time is "
        "part of the training cost",
    )
    parser.add_argument("--timing-features", type=int, default=128, help="windows timed (seeded random sample)")
    parser.add_argument("--timing-batch-sizes", type=int, nargs="+", default=None, help="default: 1 16 (CPU), 1 32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--flop-check-features", type=int, default=8)
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True, help="results JSON")
    args = parser.parse_args()
    if args.earlier_stages and not args.joint_training:
        parser.error("--earlier-stages needs --joint-training: the run the first stage started from.")
    return args


def load_blockskim(path: str, skim_layers: Sequence[int] | None = None, **kwargs) -> BlockSkimForQuestionAnswering:
    """A Block-Skim checkpoint skimming with `skim_layers`, a subset of its trained predictors (default: all).

    Predictors of unused layers are left out of the model (their weights are dropped without a warning); a layer
    without a trained predictor is refused rather than initialised at random; a checkpoint's per-layer τ keeps the
    entries of the layers used (`BlockSkimForQuestionAnswering`).
    """
    trained = BlockSkimConfig.from_pretrained(path).skim_layers
    layers = trained_predictor_subset(skim_layers, trained, f"predictor layers {skim_layers}: {path}")
    return BlockSkimForQuestionAnswering.from_pretrained(path, skim_layers=layers, **kwargs)


def load_models(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, BlockSkimForQuestionAnswering]:
    dtype = getattr(torch, args.dtype)
    vanilla = AutoModelForQuestionAnswering.from_pretrained(args.vanilla, attn_implementation="sdpa", dtype=dtype)
    blockskim = load_blockskim(args.blockskim, args.skim_layers, dtype=dtype)
    if vanilla.config.model_type == "blockskim":
        raise ValueError(f"--vanilla {args.vanilla} is a Block-Skim checkpoint; pass the vanilla model.")
    return vanilla.to(device).eval(), blockskim.to(device).eval()


def load_dev_features(args: argparse.Namespace, tokenizer) -> tuple[datasets.Dataset, datasets.Dataset, Any]:
    """The dev questions of `--variant` (a seeded `--max-questions` subset) and their windows with gold positions."""
    examples, report = load_qa_dataset(args.dev_file)
    if args.variant == "squad-long":
        examples = squad_long(examples, args.paragraphs)
    if args.max_questions is not None and args.max_questions < len(examples):
        examples = examples.shuffle(seed=args.seed).select(range(args.max_questions))
    return examples, answer_windows(examples, tokenizer, args, "eval windows"), report


def answer_windows(examples: datasets.Dataset, tokenizer, args: argparse.Namespace, desc: str) -> datasets.Dataset:
    """Evaluation windows of `examples` (`--max-seq-length`, `--doc-stride`) that also carry the gold positions."""
    return examples.map(
        prepare_eval_features,
        batched=True,
        remove_columns=examples.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_seq_length": args.max_seq_length,
            "doc_stride": args.doc_stride,
            "with_answer_positions": True,
        },
        desc=desc,
    )


def score(examples: datasets.Dataset, features: datasets.Dataset, result: Pass, metric=None) -> dict[str, float]:
    """EM/F1 of one pass, with the official SQuAD v1.1 metric."""
    metric = metric or load_squad_metric()
    predictions, references = postprocess_qa_predictions(examples, features, result.start_logits, result.end_logits)
    scores = metric.compute(predictions=predictions, references=references)
    return {"exact_match": scores["exact_match"], "f1": scores["f1"]}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    batch_sizes = args.timing_batch_sizes or ([1, 32] if device.type == "cuda" else [1, 16])
    vanilla, blockskim = load_models(args, device)
    config = blockskim.config
    thresholds = {tau_label(tau): layer_thresholds(config.skim_layers, tau) for tau in args.thresholds}
    tokenizer = AutoTokenizer.from_pretrained(args.blockskim)

    examples, features, report = load_dev_features(args, tokenizer)
    lengths = [len(ids) for ids in features["input_ids"]]
    layers = config.num_hidden_layers
    questions = question_lengths(features, config.sep_token_id)
    print(f"{len(examples)} questions, {len(features)} windows, mean length {sum(lengths) / len(lengths):.1f}")

    # --- accuracy and per-feature lengths of every row -----------------------------------------------------------
    metric = load_squad_metric()
    passes: dict[str, Pass] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, (model, call_kwargs) in row_calls(vanilla, blockskim, thresholds).items():
        result = run_pass(model, features, args.eval_batch_size, tokenizer.pad_token_id, device, call_kwargs, name)
        passes[name] = result
        rows[name] = score(examples, features, result, metric)
        scores = rows[name]
        print(f"{name:>24}: EM {scores['exact_match']:.2f}  F1 {scores['f1']:.2f}")

    # --- FLOPs ------------------------------------------------------------------------------------------------------
    dynamic = flops_per_feature(config, [[n] * layers for n in lengths], False, questions)
    padded = forward_flops(config, [args.max_seq_length] * layers, predictors=False)
    n_questions = len(examples)
    for name, result in passes.items():
        skimming = name.startswith("blockskim_tau")
        row_flops = flops_per_feature(config, result.processed, skimming, questions)
        kept_totals = [sum(column) for column in zip(*result.kept_tokens, strict=True)]
        rows[name].update(
            {
                "flops_per_question": sum(row_flops) / n_questions,
                "flops_speedup_vs_dynamic": sum(dynamic) / sum(row_flops),
                "flops_speedup_vs_padded": padded * len(lengths) / sum(row_flops),
                "kept_token_fraction_per_layer": [total / kept_totals[0] for total in kept_totals],
                "ideal_speedup_eq4": ideal_speedup(kept_totals),
            }
        )
        result.flops = row_flops  # type: ignore[attr-defined]
    oracle_tokens = oracle_kept_tokens(features, config.sep_token_id, config.block_size)
    oracle = {}
    for after in (1, 2, 3):
        per_layer = [[n] * after + [k] * (layers - after) for n, k in zip(lengths, oracle_tokens, strict=True)]
        total = sum(flops_per_feature(config, per_layer, False, questions))
        oracle[f"after_layer_{after}"] = {
            "flops_speedup_vs_dynamic": sum(dynamic) / total,
            "flops_speedup_vs_padded": padded * len(lengths) / total,
        }
    print("oracle bound:", json.dumps(oracle))

    # --- FLOP counter check and wall-clock on a seeded sample of windows --------------------------------------------
    sample = random.Random(args.seed).sample(range(len(features)), min(args.timing_features, len(features)))
    counter_check = check_flop_counter(
        vanilla,
        blockskim,
        features,
        sample[: args.flop_check_features],
        thresholds,
        questions,
        tokenizer.pad_token_id,
        device,
    )
    print("flop counter vs analytic, worst relative deviation:", json.dumps(counter_check))
    timing: dict[str, dict[str, Any]] = {}
    sample_dynamic = sum(dynamic[index] for index in sample)
    for batch_size in batch_sizes:
        seconds = time_rows(
            vanilla,
            blockskim,
            features,
            sample,
            batch_size,
            thresholds,
            args.max_seq_length,
            tokenizer.pad_token_id,
            device,
            args.repeats,
            args.warmup,
        )
        per_row = {}
        for name in rows:
            key = "vanilla_dynamic" if name == "vanilla" else name
            entry = {
                "ms_per_window": 1000 * seconds[key] / len(sample),
                "speedup_vs_dynamic": seconds["vanilla_dynamic"] / seconds[key],
                "speedup_vs_padded": seconds["vanilla_padded"] / seconds[key],
            }
            flops_speedup = sample_dynamic / sum(passes[name].flops[index] for index in sample)  # type: ignore[attr-defined]
            entry["flops_speedup_vs_dynamic_on_sample"] = flops_speedup
            entry["wall_over_flops_speedup"] = entry["speedup_vs_dynamic"] / flops_speedup
            ideal = key.replace("blockskim_", "ideal_truncation_")
            if name.startswith("blockskim_tau"):
                entry["ideal_truncation_ms_per_window"] = 1000 * seconds[ideal] / len(sample)
                entry["ideal_truncation_speedup_vs_dynamic"] = seconds["vanilla_dynamic"] / seconds[ideal]
                entry["implementation_efficiency"] = seconds[ideal] / seconds[key]
            per_row[name] = entry
        timing[str(batch_size)] = {
            "vanilla_padded_ms_per_window": 1000 * seconds["vanilla_padded"] / len(sample),
            "rows": per_row,
        }
        for name, entry in per_row.items():
            print(
                f"batch {batch_size:>2} {name:>24}: {entry['ms_per_window']:.2f} ms/window, "
                f"x{entry['speedup_vs_dynamic']:.2f} vs dynamic, x{entry['speedup_vs_padded']:.2f} vs padded"
                + (
                    f", efficiency {entry['implementation_efficiency']:.2f}"
                    if "implementation_efficiency" in entry
                    else ""
                )
            )

    result = {
        "benchmark": "squad",
        "variant": args.variant,
        "setup": {
            "vanilla": args.vanilla,
            "blockskim": args.blockskim,
            "dev_file": args.dev_file,
            "paragraphs_joined": args.paragraphs if args.variant == "squad-long" else 1,
            "max_seq_length": args.max_seq_length,
            "doc_stride": args.doc_stride,
            "questions": n_questions,
            "windows": len(features),
            "mean_window_length": sum(lengths) / len(lengths),
            "median_window_length": sorted(lengths)[len(lengths) // 2],
            "max_questions": args.max_questions,
            "seed": args.seed,
            "thresholds": [tau if isinstance(tau, float) else list(tau) for tau in args.thresholds],
            "block_size": config.block_size,
            "skim_layers": config.skim_layers,
            "predictor_question_features": config.predictor_question_features,
            "predictor_diagonal_block": config.predictor_diagonal_block,
            "predictor_block_context": config.predictor_block_context,
            "predictor_token_matching": config.predictor_token_matching,
            "predictor_hidden_size": config.predictor_hidden_size,
            "joint_training": args.joint_training,
            "dtype": args.dtype,
            "timing_windows": len(sample),
            "timing_repeats": args.repeats,
            "timing_warmup": args.warmup,
            "skipped_records": report.num_skipped,
        },
        "environment": environment(device),
        "padded_flops_per_question": padded * len(lengths) / n_questions,
        "dynamic_flops_per_question": sum(dynamic) / n_questions,
        "oracle": oracle,
        "flop_counter_worst_deviation": counter_check,
        "rows": rows,
        "timing": timing,
        "training": training_cost(
            args.vanilla,
            args.joint_training or args.blockskim,
            [*args.earlier_stages, args.blockskim] if args.joint_training else [],
        ),
    }
    atomic_write_json(args.output, result)
    print(f"wrote {args.output}")


def training_cost(vanilla_dir: str, blockskim_dir: str, stage_dirs: Sequence[str] = ()) -> dict[str, Any] | None:
    """Training throughput of the two runs from their `train_results.json` (trained side by side), and the
    `train_results.json` of the stages run after them, when there were any: the predictor-only stage first
    (`predictor_stage`), then any later ones (`later_stages`, e.g. skim-aware fine-tuning).

    Stages that started from the vanilla model (`blockskim_dir == vanilla_dir`) have no joint run to compare: their
    Block-Skim model costs the vanilla training plus the stages, given as the ratio of their times.
    """
    stage_on_vanilla = bool(stage_dirs) and Path(blockskim_dir).resolve() == Path(vanilla_dir).resolve()
    runs = [("vanilla", vanilla_dir)] + ([] if stage_on_vanilla else [("blockskim", blockskim_dir)])
    runs += [("predictor_stage", directory) for directory in stage_dirs[:1]]
    runs += [("later_stages", directory) for directory in stage_dirs[1:]]
    results: dict[str, Any] = {}
    for name, directory in runs:
        path = Path(directory) / "train_results.json"
        if not path.is_file():
            if name == "predictor_stage" and not stage_on_vanilla:
                continue
            return None
        run = json.loads(path.read_text())
        if name == "later_stages":
            results.setdefault(name, []).append(run)
        else:
            results[name] = run
    if stage_on_vanilla:
        stages = [results["predictor_stage"], *results.get("later_stages", [])]
        vanilla_time = results["vanilla"]["train_runtime"]
        stage_time = sum(stage["train_runtime"] for stage in stages)
        results["stage_on_vanilla_time_ratio"] = (vanilla_time + stage_time) / vanilla_time
        return results
    results["blockskim_over_vanilla_samples_per_second"] = (
        results["blockskim"]["train_samples_per_second"] / results["vanilla"]["train_samples_per_second"]
    )
    return results


if __name__ == "__main__":
    main()
