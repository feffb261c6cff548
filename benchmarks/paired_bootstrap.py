"""How sure are the F1 differences of the headline table? Paired bootstrap intervals over the questions.

The targets compare point estimates (Block-Skim F1 ≥ vanilla F1, or ≥ vanilla F1 − 0.5), and on SQuAD-long only a
500-question subset is scored, so a reviewer needs to know how much of a difference is noise. This script scores the
same rows as `squad.py` (vanilla, Block-Skim without skimming, Block-Skim at each τ) on the same questions, keeps
every question's EM and F1, and for each Block-Skim row reports the mean difference from vanilla with a 95%
interval: the questions are resampled with replacement, the same resample for both models (paired), and the 2.5th
and 97.5th percentiles of the mean difference are taken. It also counts the questions whose F1 went up and down.
No timing: for the costs, run `squad.py`.

Example (what BENCHMARKS.md reports):

    python benchmarks/paired_bootstrap.py --vanilla models/vanilla --blockskim models/distilled --skim-layers 0 \\
        --dev-file data/squad/dev-v1.1.json.gz --thresholds 0.5 \\
        --output benchmarks/results/distilled_layer0_paired_squad_384_cpu.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from squad import (
    add_model_and_data_arguments,
    layer_thresholds,
    load_dev_features,
    load_models,
    row_calls,
    run_pass,
    tau_label,
)
from transformers import AutoTokenizer

from modeling_blockskim.benchmarking import add_device_arguments, atomic_write_json, environment
from modeling_blockskim.data import postprocess_qa_predictions
from modeling_blockskim.metrics.squad_blockskim.squad_blockskim import pair_by_id, squad_v1_question_scores


def question_scores(predictions: list[dict], references: list[dict]) -> dict[str, torch.Tensor]:
    """Per question (in the predictions' order, which is the examples'), EM and F1 in percent, scored as the
    official SQuAD v1.1 metric scores each question before averaging."""
    scores = torch.tensor(squad_v1_question_scores(pair_by_id(predictions, references)), dtype=torch.float64)
    return {"exact_match": 100.0 * scores[:, 0], "f1": 100.0 * scores[:, 1]}


def paired_bootstrap(
    differences: torch.Tensor, resamples: int = 10_000, seed: int = 0, chunk: int = 500
) -> tuple[float, float]:
    """95% interval of the mean of per-question differences, resampling questions with replacement.

    Paired: one resample picks the same questions for both models, so what the two models have in common (hard
    questions, easy ones) cancels, and the interval is that of the difference itself.
    """
    generator = torch.Generator().manual_seed(seed)
    differences = differences.double()
    n = differences.numel()
    means = []
    for start in range(0, resamples, chunk):
        picks = torch.randint(n, (min(chunk, resamples - start), n), generator=generator)
        means.append(differences[picks].mean(dim=1))
    low, high = torch.quantile(torch.cat(means), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def compare(scores: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor], resamples: int, seed: int) -> dict:
    """Mean difference from `baseline` with its paired 95% interval, for EM and F1, and the questions that moved."""
    result: dict[str, Any] = {}
    for metric in ("exact_match", "f1"):
        differences = scores[metric] - baseline[metric]
        result[f"{metric}_difference"] = differences.mean().item()
        result[f"{metric}_ci95"] = list(paired_bootstrap(differences, resamples, seed))
    f1_moves = scores["f1"] - baseline["f1"]
    result["questions_f1_up"] = int((f1_moves > 0).sum())
    result["questions_f1_down"] = int((f1_moves < 0).sum())
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_arguments(parser, thresholds=[0.5])
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="question subset and bootstrap seed")
    parser.add_argument("--output", type=Path, required=True, help="results JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    vanilla, blockskim = load_models(args, device)
    tokenizer = AutoTokenizer.from_pretrained(args.blockskim)
    examples, features, _ = load_dev_features(args, tokenizer)
    thresholds = {tau_label(tau): layer_thresholds(blockskim.config.skim_layers, tau) for tau in args.thresholds}
    rows: dict[str, dict[str, Any]] = {}
    scores: dict[str, dict[str, torch.Tensor]] = {}
    for name, (model, call_kwargs) in row_calls(vanilla, blockskim, thresholds).items():
        result = run_pass(model, features, args.eval_batch_size, tokenizer.pad_token_id, device, call_kwargs, name)
        predictions, references = postprocess_qa_predictions(
            examples, features, result.start_logits, result.end_logits
        )
        scores[name] = question_scores(predictions, references)
        rows[name] = {metric: values.mean().item() for metric, values in scores[name].items()}
        if name != "vanilla":
            rows[name]["vs_vanilla"] = compare(scores[name], scores["vanilla"], args.resamples, args.seed)
        print(f"{name:>24}: " + ", ".join(f"{key} {value}" for key, value in rows[name].items()), flush=True)
    atomic_write_json(
        args.output,
        {
            "benchmark": "paired_bootstrap",
            "variant": args.variant,
            "setup": {
                "vanilla": args.vanilla,
                "blockskim": args.blockskim,
                "dev_file": args.dev_file,
                "paragraphs_joined": args.paragraphs if args.variant == "squad-long" else None,
                "max_seq_length": args.max_seq_length,
                "doc_stride": args.doc_stride,
                "questions": len(examples),
                "windows": len(features),
                "max_questions": args.max_questions,
                "skim_layers": blockskim.config.skim_layers,
                "thresholds": args.thresholds,
                "dtype": args.dtype,
                "resamples": args.resamples,
                "seed": args.seed,
            },
            "environment": environment(device),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
