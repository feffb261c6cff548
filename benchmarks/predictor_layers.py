"""Which predictor layers and which tau to recommend: accuracy and FLOPs of every (layer set, tau) on a dev subset.

Every predictor is an independent head trained jointly, so a model trained with predictors after layers 0..4 can
skim with any subset of them (the others are left out at load time). Fewer predictor layers cost less per forward
(on a 6-layer MiniLM each one adds a few percent of a layer's time at batch 1), more of them skim more tokens. This
script measures the trade-off on a seeded subset of the questions, without timing, so the recommended setting is
chosen on evidence and then timed by `benchmarks/squad.py --skim-layers ...` on the full dev set.

Each row also splits its F1 change against the same model without skimming by where it comes from
(`f1_change_by_answer_survival`): questions whose unskimmed answer was cut away (a predictor miss) and questions
whose unskimmed answer survived but changed anyway (the later layers read a shorter context):

    python benchmarks/predictor_layers.py --vanilla models/vanilla --blockskim models/blockskim \
        --dev-file data/squad/dev-v1.1.json.gz --max-questions 1000 \
        --layer-sets 0,1,2,3,4 1,2,3,4 1,3 1 --thresholds 0.5 0.7 0.8 0.9 \
        --output benchmarks/results/predictor_layers_cpu.json
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import datasets
import torch
from squad import (
    THRESHOLDS_HELP,
    Pass,
    flops_per_feature,
    layer_thresholds,
    load_blockskim,
    load_dev_features,
    parse_threshold,
    question_lengths,
    run_pass,
    score,
    tau_label,
)
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from modeling_blockskim.benchmarking import atomic_write_json, environment
from modeling_blockskim.data import postprocess_qa_predictions
from modeling_blockskim.flops import forward_flops
from modeling_blockskim.metrics import load_squad_metric
from modeling_blockskim.metrics.squad_blockskim.squad_blockskim import f1_score
from modeling_blockskim.modeling_blockskim import SKIMMED_LOGIT


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vanilla", required=True)
    parser.add_argument("--blockskim", required=True)
    parser.add_argument("--dev-file", required=True)
    parser.add_argument("--variant", choices=["squad", "squad-long"], default="squad")
    parser.add_argument("--paragraphs", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--max-questions", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer-sets", nargs="+", required=True, help="comma-separated layer indices, e.g. 1,3")
    parser.add_argument(
        "--thresholds",
        type=parse_threshold,
        nargs="+",
        required=True,
        help=THRESHOLDS_HELP,
    )
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--output", type=Path, required=True)
    return parser.parse_args()


def question_f1(examples: datasets.Dataset, features: datasets.Dataset, result: Pass) -> tuple[dict, dict]:
    """Per question: the F1 of the pass's answer (best over the gold answers), and its best span (`n_best[0]`)."""
    decoded = postprocess_qa_predictions(examples, features, result.start_logits, result.end_logits)
    golds = {reference["id"]: reference["answers"]["text"] for reference in decoded.references}
    f1 = {
        prediction["id"]: max(f1_score(prediction["prediction_text"], gold) for gold in golds[prediction["id"]])
        for prediction in decoded.predictions
    }
    return f1, {example_id: answers[0] for example_id, answers in decoded.n_best.items() if answers}


def answer_tokens(features: datasets.Dataset, best: dict[str, dict]) -> dict[str, list[tuple[int, list[int]]]]:
    """Per question: the windows that cover the whole unskimmed answer span, each with the span's token indices.

    A span's tokens are those of a window whose context offsets overlap its characters. The spans do not depend on
    tau, so one search serves every skimming pass.
    """
    windows = defaultdict(list)
    for index, example_id in enumerate(features["example_id"]):
        windows[example_id].append(index)
    offsets = features["offset_mapping"]
    spans = {}
    for example_id, answer in best.items():
        start, end = answer["start"], answer["end"]
        spans[example_id] = []
        for index in windows[example_id]:
            tokens = [t for t, o in enumerate(offsets[index]) if o is not None and o[0] < end and o[1] > start]
            if tokens and offsets[index][tokens[0]][0] <= start and offsets[index][tokens[-1]][1] >= end:
                spans[example_id].append((index, tokens))
    return spans


def answer_survived(spans: dict[str, list[tuple[int, list[int]]]], skimmed: Pass) -> dict[str, bool]:
    """Per question: does some window still hold every token of the unskimmed answer span after skimming? A token
    was kept when its skimmed start logit is not `SKIMMED_LOGIT`."""
    return {
        example_id: any(bool((skimmed.start_logits[index][tokens] > SKIMMED_LOGIT).all()) for index, tokens in found)
        for example_id, found in spans.items()
    }


def f1_change_by_answer_survival(
    unskimmed_f1: dict[str, float], survived: dict[str, bool], skimmed_f1: dict[str, float]
) -> dict[str, float]:
    """Skimming's F1 change (points over all questions), split between questions whose unskimmed answer span was
    cut away and those where it survived; the two parts add up to the whole change."""
    total = len(unskimmed_f1)
    parts = {True: 0.0, False: 0.0}
    for example_id, before in unskimmed_f1.items():
        parts[survived.get(example_id, False)] += skimmed_f1[example_id] - before
    cut = sum(not survived.get(example_id, False) for example_id in unskimmed_f1)
    return {
        "questions_answer_cut": cut,
        "f1_change_answer_cut": 100.0 * parts[False] / total,
        "f1_change_answer_kept": 100.0 * parts[True] / total,
    }


def main() -> None:
    args = parse_args()
    device = torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.blockskim)
    layer_sets = [sorted({int(layer) for layer in spec.split(",")}) for spec in args.layer_sets]
    for layers in layer_sets:  # like the checkpoint's layers below, fails before any pass
        for tau in args.thresholds:
            layer_thresholds(layers, tau)
    models = [load_blockskim(args.blockskim, layers).eval() for layers in layer_sets]
    examples, features, _ = load_dev_features(args, tokenizer)
    metric = load_squad_metric()
    lengths = [len(ids) for ids in features["input_ids"]]
    vanilla = AutoModelForQuestionAnswering.from_pretrained(args.vanilla, attn_implementation="sdpa").eval()
    pad = tokenizer.pad_token_id
    baseline = run_pass(vanilla, features, args.eval_batch_size, pad, device, {}, "vanilla")
    rows = {"vanilla": score(examples, features, baseline, metric)}
    # Predictors never change the answers without skimming: one pass serves every layer set.
    unskimmed = run_pass(models[0], features, args.eval_batch_size, pad, device, {"skim": False}, "no skimming")
    rows["blockskim_no_skim"] = score(examples, features, unskimmed, metric)
    unskimmed_f1, unskimmed_best = question_f1(examples, features, unskimmed)
    unskimmed_spans = answer_tokens(features, unskimmed_best)
    for layers, model in zip(layer_sets, models, strict=True):
        config = model.config
        questions = question_lengths(features, config.sep_token_id)
        dynamic = sum(flops_per_feature(config, [[n] * config.num_hidden_layers for n in lengths], False, questions))
        padded = forward_flops(config, [args.max_seq_length] * config.num_hidden_layers, predictors=False)
        for tau in args.thresholds:
            threshold = layer_thresholds(layers, tau)
            name = f"layers={','.join(map(str, layers))} tau={tau_label(tau)}"
            result = run_pass(
                model, features, args.eval_batch_size, pad, device, {"skim": True, "skim_threshold": threshold}, name
            )
            flops = sum(flops_per_feature(config, result.processed, True, questions))
            skimmed_f1, _ = question_f1(examples, features, result)
            survived = answer_survived(unskimmed_spans, result)
            rows[name] = {
                **score(examples, features, result, metric),
                **f1_change_by_answer_survival(unskimmed_f1, survived, skimmed_f1),
                "skim_layers": layers,
                "threshold": tau if isinstance(tau, float) else list(tau),
                "flops_speedup_vs_dynamic": dynamic / flops,
                "flops_speedup_vs_padded": padded * len(lengths) / flops,
            }
            row = rows[name]
            print(
                f"{name:>28}: F1 {row['f1']:.2f}  FLOPs x{row['flops_speedup_vs_dynamic']:.2f}  "
                f"answer cut {row['questions_answer_cut']} (F1 {row['f1_change_answer_cut']:+.2f}), "
                f"kept (F1 {row['f1_change_answer_kept']:+.2f})"
            )
    atomic_write_json(
        args.output,
        {
            "benchmark": "predictor_layers",
            "variant": args.variant,
            "setup": {
                **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "windows": len(lengths),
                "block_size": models[0].config.block_size,
                "predictor_question_features": models[0].config.predictor_question_features,
                "predictor_diagonal_block": models[0].config.predictor_diagonal_block,
                "predictor_block_context": models[0].config.predictor_block_context,
                "predictor_token_matching": models[0].config.predictor_token_matching,
                "predictor_hidden_size": models[0].config.predictor_hidden_size,
            },
            "environment": environment(device),
            "rows": rows,
        },
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
