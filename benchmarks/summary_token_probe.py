"""Would a summary of the skimmed tokens give back the F1 that surviving answers lose? An offline probe, batch 1.

On SQuAD most of the F1 that skimming costs is lost on questions whose answer survived (benchmarks/EXPERIMENTS.md,
*Status*): the layers after a predictor, trained on whole windows, read a context whose skimmed part is simply gone, so
every softmax spreads its mass over fewer keys. This probe asks whether one extra token per window repairs that: the
mean hidden state of the tokens skimmed so far, which attends like any token and is attended to as the `n` tokens it
stands for (its attention logit plus `log n`: the proportional attention of Token Merging, Bolya et al., ICLR 2023),
never a span candidate. It costs one token per layer after the first skim.

It needs a Block-Skim checkpoint whose backbone and span head are exactly those of a vanilla checkpoint (predictors
trained alone on the frozen vanilla model: `run_qa.py --model_name_or_path VANILLA --new_skim_predictors true
--train_predictors_only true ...`). For every window the Block-Skim model skims at each `--thresholds` τ and
records which tokens it kept before each layer; the vanilla model's own layers then run that keep pattern three
ways: the tokens removed (`drop`, checked to reproduce the Block-Skim logits), the tokens removed plus the summary
token (`summary`) and the same without the `log n` bias (`summary_no_bias`, to separate the bias from the extra
token). Nothing is trained; the model code is not changed.

    python benchmarks/summary_token_probe.py --vanilla models/vanilla --blockskim models/vanilla_predictors \
        --dev-file data/squad/dev-v1.1.json.gz --thresholds 0.1/0.3 --output benchmarks/results/summary_token.json
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from squad import (
    THRESHOLDS_HELP,
    Pass,
    collate,
    layer_thresholds,
    load_blockskim,
    load_dev_features,
    parse_threshold,
    score,
    tau_label,
)
from tqdm.auto import tqdm
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from modeling_blockskim.benchmarking import atomic_write_json, environment
from modeling_blockskim.modeling_blockskim import SKIMMED_LOGIT

VARIANTS = ("drop", "summary", "summary_no_bias")


def kept_before_layers(blockskim, batch: dict[str, torch.Tensor], tau) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """{layer index: (length,) bool, the input positions still present when that layer runs}, for the layers right
    after each predictor layer (cumulative, as skimming is), and Block-Skim's own start logits `(length,)` of that
    forward, which the removal alone must reproduce."""
    output = blockskim(**batch, skim=True, skim_threshold=tau, output_skim_details=True)
    length, block_size = batch["input_ids"].shape[1], blockskim.config.block_size
    real = batch["attention_mask"][0].bool()
    kept = {
        layer + 1: output.block_keep_mask[0, position].repeat_interleave(block_size)[:length] & real
        for position, layer in enumerate(blockskim.config.skim_layers)
    }
    return kept, output.start_logits[0]


def run_with_keep_pattern(vanilla, batch: dict[str, torch.Tensor], kept: dict[int, torch.Tensor], variant: str):
    """The vanilla model's start and end logits `(length,)` with the tokens not in `kept` removed before each layer
    of `kept`; removed positions get `SKIMMED_LOGIT`, as Block-Skim gives them."""
    encoder = vanilla.base_model
    hidden = encoder.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
    length = hidden.shape[1]
    present = torch.ones(length, dtype=torch.bool)
    summary, count, mask = None, 0, None
    for index, layer in enumerate(encoder.encoder.layer):
        if index in kept and not torch.equal(kept[index], present):
            stays = kept[index][present]  # over the positions present now
            tokens = hidden[:, : int(present.sum())]
            if variant != "drop":
                skimmed = int((~stays).sum())
                added = tokens[:, ~stays].sum(dim=1, keepdim=True)
                summary = (added if summary is None else summary * count + added) / (count + skimmed)
                count += skimmed
            hidden, present = tokens[:, stays], kept[index].clone()
            if summary is not None:
                hidden = torch.cat([hidden, summary], dim=1)
                mask = torch.zeros(1, 1, 1, hidden.shape[1])  # additive key bias
                if variant == "summary":
                    mask[..., -1] = math.log(count)
        hidden = layer(hidden, mask)
        if summary is not None:
            summary = hidden[:, -1:]
    logits = vanilla.qa_outputs(hidden)[0, : int(present.sum())]  # (kept, 2)
    out = torch.full((length, 2), SKIMMED_LOGIT)
    out[present] = logits
    return out[:, 0], out[:, 1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vanilla", required=True, help="vanilla QA checkpoint")
    parser.add_argument("--blockskim", required=True, help="Block-Skim checkpoint with the vanilla model's backbone")
    parser.add_argument("--dev-file", required=True)
    parser.add_argument("--variant", choices=["squad", "squad-long"], default="squad")
    parser.add_argument("--paragraphs", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--max-questions", type=int, default=None, help="seeded random subset of the questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thresholds", type=parse_threshold, nargs="+", required=True, help=THRESHOLDS_HELP)
    parser.add_argument("--output", type=Path, required=True)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.blockskim)
    vanilla = AutoModelForQuestionAnswering.from_pretrained(args.vanilla, attn_implementation="sdpa").eval()
    blockskim = load_blockskim(args.blockskim).eval()
    examples, features, _ = load_dev_features(args, tokenizer)
    thresholds = {tau_label(tau): layer_thresholds(blockskim.config.skim_layers, tau) for tau in args.thresholds}
    passes = {"no skimming": Pass()} | {f"{label} {v}": Pass() for label in thresholds for v in VARIANTS}
    worst_drop_deviation = 0.0
    with torch.inference_mode():
        for index in tqdm(range(len(features)), desc="windows"):
            batch = collate(features, [index], tokenizer.pad_token_id)
            start, end = run_with_keep_pattern(vanilla, batch, {}, "drop")
            passes["no skimming"].start_logits.append(start)
            passes["no skimming"].end_logits.append(end)
            for label, tau in thresholds.items():
                kept, reference = kept_before_layers(blockskim, batch, tau)
                for variant in VARIANTS:
                    start, end = run_with_keep_pattern(vanilla, batch, kept, variant)
                    if variant == "drop":  # the same tokens removed as Block-Skim removes: the same logits
                        worst_drop_deviation = max(worst_drop_deviation, float((start - reference).abs().max()))
                    passes[f"{label} {variant}"].start_logits.append(start)
                    passes[f"{label} {variant}"].end_logits.append(end)
    rows = {name: score(examples, features, result) for name, result in passes.items()}
    result = {
        "benchmark": "summary_token_probe",
        "environment": environment("cpu"),
        "setup": {
            "vanilla": args.vanilla,
            "blockskim": args.blockskim,
            "skim_layers": blockskim.config.skim_layers,
            "dev_file": args.dev_file,
            "variant": args.variant,
            "max_seq_length": args.max_seq_length,
            "questions": len(examples),
            "windows": len(features),
            "thresholds": list(thresholds),
        },
        "worst_drop_vs_blockskim_start_logit_deviation": worst_drop_deviation,
        "rows": rows,
    }
    atomic_write_json(args.output, result)
    for name, row in rows.items():
        print(f"{name:>28}: EM {row['exact_match']:.2f} F1 {row['f1']:.2f}")
    print(f"drop vs Block-Skim, worst start-logit deviation {worst_drop_deviation:.2e}; wrote {args.output}")


if __name__ == "__main__":
    main()
