"""How much can *any* predictor after a given layer tell? Offline probes of the frozen model's signals there.

The FLOPs target of Block-Skim needs a predictor after an early layer that rejects most passage blocks while it keeps
almost every block holding the answer (a lost answer block costs that question's whole F1). This script measures
how far the signals available after `--layer` of a trained Block-Skim checkpoint go, independently of how the
checkpoint's own predictor was trained: it records, for every passage block of seeded training and dev windows, the
block label, the checkpoint's predictor logit, the block-question attention masses and the layer's hidden states, fits
probes of growing richness on the training blocks and scores them on the dev blocks:

- the checkpoint's own predictor (nothing fitted);
- a linear probe of the block-question attention masses (the question-only predictor's form);
- the same masses as log-ratios to uniform attention, so that they do not scale with the window length;
- those plus the same features of the neighbouring blocks and their difference to the window's best block (exactly
  what a predictor with `predictor_block_context=True` reads: `block_context_features`);
- a learned question-block token matcher on the hidden states (per question token, the best-matching token of the
  block, pooled with learned question-token weights), exact word overlap and everything above: the model's own
  `TokenMatcher`, what a predictor with `predictor_token_matching=True` reads.

Each probe is scored by its AUC and by the share of passage blocks without the answer that it rejects at a threshold
keeping 95, 97 or 99 % of the answer blocks. F1 falls much more slowly than that recall (a lost answer block costs
nothing on a question the model gets wrong anyway), so the recall and rejected share of the checkpoint's predictor at
each τ of `--thresholds` are recorded too, to be read next to the F1 of the same τ in the `squad.py` results:

    python benchmarks/predictor_probe.py --blockskim models/blockskim_predictors --layer 1 \
        --train-file data/squad/train-v1.1.reconstructed.json.gz --dev-file data/squad/dev-v1.1.json.gz \
        --output benchmarks/results/predictor_probe_layer1_cpu.json
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from squad import answer_windows, collate, load_blockskim, load_dev_features
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from modeling_blockskim.attention_blockskim import (
    block_context_features,
    block_question_attention,
    row_logsumexp,
)
from modeling_blockskim.benchmarking import atomic_write_json, environment
from modeling_blockskim.data import load_qa_dataset
from modeling_blockskim.predictor_blockskim import TokenMatcher
from modeling_blockskim.skimming_blockskim import question_token_mask

RECALLS = (0.95, 0.97, 0.99)
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blockskim", required=True, help="trained Block-Skim checkpoint with a predictor at --layer")
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--max-train-questions", type=int, default=7000)
    parser.add_argument("--train-subset-seed", type=int, default=42, help="as run_qa.py --train_subset_seed")
    parser.add_argument("--dev-file", required=True)
    parser.add_argument("--variant", choices=["squad", "squad-long"], default="squad", help="of the dev set")
    parser.add_argument("--paragraphs", type=int, default=4)
    parser.add_argument("--max-questions", type=int, default=2000, help="seeded dev subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--matcher-epochs", type=int, default=3)
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--output", type=Path, required=True)
    return parser.parse_args()


@dataclass
class Windows:
    """Per-window tensors at one layer, right-padded to whole blocks; `labels` -100 marks blocks never judged."""

    hidden: torch.Tensor  # (B, K*bs, h) float32
    input_ids: torch.Tensor  # (B, K*bs), -1 on padding
    valid: torch.Tensor  # (B, K*bs) bool
    question: torch.Tensor  # (B, K*bs) bool
    masses: torch.Tensor  # (B, K, 2H): to_question per head, then from_question
    context: torch.Tensor  # (B, K, 8H): `block_context_features` of the masses; the first 2H are the log-ratios
    labels: torch.Tensor  # (B, K)
    trained_logit: torch.Tensor  # (B, K): keep - skim logit of the checkpoint's predictor
    trained_keep: torch.Tensor  # (B, K): its P(keep), as the model compares it with tau


def collect(model, features: datasets.Dataset, layer: int, batch_size: int, pad_id: int, desc: str) -> list[Windows]:
    """Run the frozen model without skimming and keep what a predictor after `layer` could read."""
    config = model.config
    block_size, heads = config.block_size, config.backbone_config.num_attention_heads
    attention = model.layers[layer].attention.self
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        attention.query.register_forward_hook(lambda m, i, o: captured.__setitem__("query", o)),
        attention.key.register_forward_hook(lambda m, i, o: captured.__setitem__("key", o)),
        model.layers[layer].register_forward_hook(
            lambda m, i, o: captured.__setitem__("hidden", o[0] if isinstance(o, tuple) else o)
        ),
    ]
    predictor_index = config.skim_layers.index(layer)
    order = sorted(range(len(features)), key=lambda index: len(features[index]["input_ids"]))
    windows = []
    try:
        with torch.no_grad():  # not inference mode: the token matcher trains on these tensors
            for start in tqdm(range(0, len(order), batch_size), desc=desc):
                indices = order[start : start + batch_size]
                batch = collate(features, indices, pad_id)
                positions = {
                    name: torch.tensor([features[index][name] for index in indices])
                    for name in ("start_positions", "end_positions")
                }
                output = model(**batch, **positions, skim=False, output_skim_details=True)
                valid = batch["attention_mask"].bool()
                batch_rows, length = valid.shape
                pad = output.block_labels.shape[1] * block_size - length
                query, key = (
                    captured[name].view(batch_rows, length, heads, -1).transpose(1, 2) for name in ("query", "key")
                )
                scaling = query.shape[-1] ** -0.5
                question = question_token_mask(batch["input_ids"], valid, config.sep_token_id)
                width = int(question.sum(dim=1).max()) + 1  # the question follows [CLS]
                lse = row_logsumexp(query, key, valid, scaling)
                masses = block_question_attention(query, key, lse, valid, question[:, :width], block_size, scaling)
                context = block_context_features(
                    masses, valid, question[:, :width], output.block_labels >= 0, block_size
                )  # (B, K, 8H)
                logits = output.block_logits[:, predictor_index]
                windows.append(
                    Windows(
                        hidden=nn.functional.pad(captured["hidden"].float(), (0, 0, 0, pad)),
                        input_ids=nn.functional.pad(batch["input_ids"].masked_fill(~valid, -1), (0, pad), value=-1),
                        valid=nn.functional.pad(valid, (0, pad)),
                        question=nn.functional.pad(question, (0, pad)),
                        masses=masses,
                        context=context,
                        labels=output.block_labels,
                        trained_logit=(logits[..., 1] - logits[..., 0]).float(),
                        trained_keep=logits.float().softmax(dim=-1)[..., 1],
                    )
                )
    finally:
        for hook in hooks:
            hook.remove()
    return windows


class MatcherProbe(nn.Module):
    """What a predictor with `predictor_token_matching=True` reads, fitted offline: the model's own `TokenMatcher`
    next to the block-question masses in context, batch-normalised, and a linear layer."""

    def __init__(self, hidden_size: int, context_features: int):
        super().__init__()
        self.matcher = TokenMatcher(hidden_size)
        self.norm = nn.BatchNorm1d(self.matcher.num_features + context_features)
        self.classifier = nn.Linear(self.matcher.num_features + context_features, 1)

    def forward(self, windows: Windows) -> torch.Tensor:
        judged = windows.labels >= 0
        width = int(windows.question.sum(dim=1).max())  # the question tokens come first
        matches = self.matcher(windows.hidden, windows.input_ids, windows.valid, windows.question[:, :width], judged)
        features = torch.cat([matches[judged], windows.context[judged]], dim=-1)
        return self.classifier(self.norm(features)).squeeze(-1)


def log_ratio(windows: Windows) -> torch.Tensor:
    return windows.context[..., : windows.masses.shape[-1]]


FEATURES = {
    "linear: block-question attention masses": lambda w: w.masses,
    "linear: masses as log-ratios to uniform attention": log_ratio,
    "linear: log-ratios + neighbours + difference to the window's best block": lambda w: w.context,
}


def judged_values(windows: list[Windows], values) -> tuple[torch.Tensor, torch.Tensor]:
    """Per judged block over all windows: `values(w)[judged]` and the labels."""
    return (
        torch.cat([values(w)[w.labels >= 0] for w in windows]),
        torch.cat([w.labels[w.labels >= 0] for w in windows]),
    )


def fit_linear(features: torch.Tensor, labels: torch.Tensor, balance: float):
    """Class-weighted logistic regression on standardised features (what BatchNorm + Linear learn), by L-BFGS."""
    mean, std = features.mean(dim=0), features.std(dim=0) + 1e-6
    linear = nn.Linear(features.shape[1], 1)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=200)
    x, y = (features - mean) / std, labels.float()
    weight = torch.where(y == 1, balance, 1.0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(linear(x).squeeze(-1), y, weight=weight)
        loss = loss + 1e-4 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return lambda f: linear((f - mean) / std).squeeze(-1).detach()


def fit_matcher(train: list[Windows], balance: float, epochs: int, seed: int) -> MatcherProbe:
    torch.manual_seed(seed)
    matcher = MatcherProbe(train[0].hidden.shape[-1], train[0].context.shape[-1])
    optimizer = torch.optim.AdamW(matcher.parameters(), lr=2e-3, weight_decay=0.01)
    batches = list(train)
    for epoch in range(epochs):
        matcher.train()
        random.Random(seed + epoch).shuffle(batches)
        for windows in tqdm(batches, desc=f"token matcher, epoch {epoch + 1}/{epochs}"):
            labels = windows.labels[windows.labels >= 0].float()
            if labels.numel() < 2:
                continue
            logits = matcher(windows)
            weight = torch.where(labels == 1, balance, 1.0)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return matcher.eval()


def separation(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUC, and the share of answer-free passage blocks rejected at thresholds keeping each recall of answer blocks."""
    positive, negative = scores[labels == 1].double(), scores[labels == 0].double()
    if positive.numel() == 0 or negative.numel() == 0:
        raise ValueError("the dev blocks need both answer blocks and answer-free blocks to score a probe.")
    ranks = torch.cat([positive, negative]).argsort().argsort().double() + 1
    auc = (ranks[: positive.numel()].sum() - positive.numel() * (positive.numel() + 1) / 2) / (
        positive.numel() * negative.numel()
    )
    result = {"auc": auc.item()}
    for recall in RECALLS:
        threshold = torch.quantile(positive, 1 - recall)
        result[f"rejected_at_recall_{recall:g}"] = (negative < threshold).double().mean().item()
    return result


def train_features(args: argparse.Namespace, tokenizer) -> datasets.Dataset:
    examples, _ = load_qa_dataset(args.train_file)
    examples = examples.shuffle(seed=args.train_subset_seed).select(
        range(min(args.max_train_questions, len(examples)))
    )
    return answer_windows(examples, tokenizer, args, "train windows")


def main() -> None:
    args = parse_args()
    model = load_blockskim(args.blockskim, [args.layer]).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.blockskim)
    config = model.config
    _, dev_features, _ = load_dev_features(args, tokenizer)
    pad = tokenizer.pad_token_id
    train = collect(model, train_features(args, tokenizer), args.layer, args.batch_size, pad, "train windows")
    dev = collect(model, dev_features, args.layer, args.batch_size, pad, "dev windows")
    _, dev_labels = judged_values(dev, lambda w: w.labels)
    rows = {"trained predictor of the checkpoint": separation(*judged_values(dev, lambda w: w.trained_logit))}
    for name, values in FEATURES.items():
        probe = fit_linear(*judged_values(train, values), config.balance_factor)
        rows[name] = separation(probe(judged_values(dev, values)[0]), dev_labels)
    matcher = fit_matcher(train, config.balance_factor, args.matcher_epochs, args.seed)
    with torch.no_grad():
        scores = torch.cat([matcher(w) for w in dev if (w.labels >= 0).any()])
    rows["token matcher on hidden states + word overlap + log-ratios + neighbours"] = separation(scores, dev_labels)
    for name, row in rows.items():
        print(f"{name:>80}: AUC {row['auc']:.3f}, rejected at 97 % recall {row['rejected_at_recall_0.97']:.3f}")
    blocks = {
        "train_judged_blocks": int(sum((w.labels >= 0).sum() for w in train)),
        "dev_judged_blocks": int(dev_labels.numel()),
        "dev_answer_blocks": int((dev_labels == 1).sum()),
    }
    keep, _ = judged_values(dev, lambda w: w.trained_keep)
    at_threshold = {
        f"{tau:g}": {
            "answer_block_recall": (keep[dev_labels == 1] >= tau).double().mean().item(),
            "rejected": (keep[dev_labels == 0] < tau).double().mean().item(),
        }
        for tau in args.thresholds
    }
    atomic_write_json(
        args.output,
        {
            "benchmark": "predictor_probe",
            "variant": args.variant,
            "setup": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **blocks},
            "environment": environment(torch.device("cpu")),
            "rows": rows,
            "trained_predictor_at_threshold": at_threshold,
        },
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
