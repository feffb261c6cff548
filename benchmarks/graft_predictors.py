"""Give a Block-Skim checkpoint the trained predictors of another one, for layers it has none for.

Skim-aware fine-tuning (`run_qa.py --train_with_skimming true`) freezes everything up to its last predictor layer
and tunes the layers after it. A checkpoint tuned that way with one predictor (say after layer 1) still has the
earlier layers of the checkpoint it started from, bit for bit, so that checkpoint's predictor after layer 0 reads
exactly the attention and hidden states it was trained on: it can be moved over without training. This script
does that, and refuses when it would not hold (any weight up to the grafted layer differs, or the predictors are
of another kind):

    python benchmarks/graft_predictors.py --base models/skimtuned05 --donor models/matching16_hidden64 \
        --layers 0 --output models/skimtuned05_layers01

The result is a normal checkpoint (predictors after the union of both layer sets, the base's tokenizer); its
`skim_threshold` is the base's for its own layers and `--skim-threshold` (default 0.5) for the grafted ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer

from modeling_blockskim import BlockSkimConfig, BlockSkimForQuestionAnswering
from modeling_blockskim.configuration_blockskim import layer_thresholds

# Config fields that decide a predictor's inputs and shape: base and donor must agree on every one.
PREDICTOR_FIELDS = (
    "block_size",
    "predictor_question_features",
    "predictor_diagonal_block",
    "predictor_block_context",
    "predictor_token_matching",
    "predictor_hidden_size",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="Block-Skim checkpoint that receives the predictors")
    parser.add_argument("--donor", required=True, help="Block-Skim checkpoint whose predictors are copied")
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="predictor layers to copy")
    parser.add_argument("--skim-threshold", type=float, default=0.5, help="tau of the grafted layers")
    parser.add_argument("--output", type=Path, required=True)
    return parser.parse_args(argv)


def shared_prefix_keys(state: Mapping[str, torch.Tensor], last_layer: int) -> list[str]:
    """Names of the weights a predictor after `last_layer` depends on: the embeddings and layers 0..last_layer."""
    prefixes = ("embeddings.", "embeddings_project.") + tuple(f"layers.{i}." for i in range(last_layer + 1))
    return sorted(name for name in state if name.startswith(prefixes))


def graft_predictors(
    base: BlockSkimForQuestionAnswering,
    donor: BlockSkimForQuestionAnswering,
    layers: Sequence[int],
    threshold: float,
) -> BlockSkimForQuestionAnswering:
    """A new model: `base` with `donor`'s predictors after `layers` added (neither input is modified).

    Raises `ValueError` naming the field or weight that makes the donor's predictors read something else in the base.
    """
    layers = sorted(set(layers))
    for field in PREDICTOR_FIELDS:
        if getattr(base.config, field) != getattr(donor.config, field):
            raise ValueError(
                f"{field}: the base has {getattr(base.config, field)!r}, the donor {getattr(donor.config, field)!r};"
                " a predictor only works on the inputs it was trained on."
            )
    missing = [layer for layer in layers if layer not in donor.config.skim_layers]
    if missing:
        raise ValueError(f"--layers {missing}: the donor has predictors only after layers {donor.config.skim_layers}.")
    present = [layer for layer in layers if layer in base.config.skim_layers]
    if present:
        raise ValueError(f"--layers {present}: the base already has predictors there ({base.config.skim_layers}).")
    base_state, donor_state = base.state_dict(), donor.state_dict()
    for name in shared_prefix_keys(base_state, max(layers)):
        if name not in donor_state or not torch.equal(base_state[name], donor_state[name]):
            raise ValueError(
                f"{name} differs between base and donor: the grafted predictors after layers {layers} would read "
                "hidden states and attention they were not trained on."
            )
    skim_layers = sorted(set(base.config.skim_layers) | set(layers))
    own = layer_thresholds(base.config.skim_threshold, base.config.skim_layers)
    thresholds = {layer: own.get(layer, threshold) for layer in skim_layers}
    config = BlockSkimConfig.from_dict(base.config.to_dict())
    config.skim_layers = skim_layers
    config.skim_threshold = thresholds if len(set(thresholds.values())) > 1 else threshold
    model = BlockSkimForQuestionAnswering(config)
    grafted = tuple(f"skim_predictors.{layer}." for layer in layers)
    state = dict(base_state)
    state.update({name: tensor for name, tensor in donor_state.items() if name.startswith(grafted)})
    model.load_state_dict(state, strict=True)
    return model.eval()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    base = BlockSkimForQuestionAnswering.from_pretrained(args.base)
    donor = BlockSkimForQuestionAnswering.from_pretrained(args.donor)
    model = graft_predictors(base, donor, args.layers, args.skim_threshold)
    # Written next to the destination and renamed into place: an interrupted run leaves no half checkpoint.
    args.output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.output.name}.", dir=args.output.parent))
    try:
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(args.base).save_pretrained(staging)
        if args.output.exists():
            shutil.rmtree(args.output)
        os.replace(staging, args.output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"wrote {args.output}: predictors after layers {model.config.skim_layers}, tau {model.config.skim_threshold}"
    )


if __name__ == "__main__":
    main()
