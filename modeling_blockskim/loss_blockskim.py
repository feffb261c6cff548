"""Losses of joint Block-Skim training (paper section 3.3): `L = L_QA + alpha * combine_layers(CE_beta(blocks))`.

One implementation serves the model's own `loss` and `BlockSkimTrainer`, which may override alpha and beta per run.
Travels with every checkpoint as remote code.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .skimming_blockskim import IGNORE_INDEX


def question_answering_loss(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
) -> torch.Tensor:
    """Mean of the start and end cross-entropies, exactly as the stock `*ForQuestionAnswering` heads compute it.

    Positions outside the sequence are ignored (they are clamped to `length`, the ignore index).
    """
    length = start_logits.shape[1]
    start_positions = start_positions.reshape(-1).clamp(0, length)
    end_positions = end_positions.reshape(-1).clamp(0, length)
    loss_fct = nn.CrossEntropyLoss(ignore_index=length)
    return (loss_fct(start_logits.float(), start_positions) + loss_fct(end_logits.float(), end_positions)) / 2


def skim_loss(
    block_logits: torch.Tensor,
    block_labels: torch.Tensor,
    balance_factor: float,
    reduction: Literal["sum", "mean"] = "sum",
) -> torch.Tensor:
    """Class-weighted cross-entropy of the block predictions, combined over predictor layers.

    Each layer's term is the weighted mean over its labelled blocks (weight 1 for "skim", `balance_factor` for
    "keep", as `torch.nn.CrossEntropyLoss(weight=...)` defines it). `reduction="sum"` adds the layer terms as the
    paper does; `"mean"` averages them. A batch without labelled blocks contributes an exact zero that still
    touches every predictor output, so data-parallel training never sees unused parameters.

    Args:
        block_logits (`torch.Tensor` of shape `(batch, layers, blocks, 2)`): (skim, keep) logits per predictor layer.
        block_labels (`torch.LongTensor` of shape `(batch, blocks)` or `(batch, layers, blocks)`): 1 keep, 0 skim,
            -100 ignored.
        balance_factor (`float`): beta.
        reduction (`"sum"` or `"mean"`).

    Returns:
        Scalar `torch.Tensor` (float32).
    """
    batch, layers, blocks, _ = block_logits.shape
    labels = block_labels if block_labels.dim() == 3 else block_labels[:, None, :].expand(batch, layers, blocks)
    class_weight = torch.tensor([1.0, balance_factor], device=block_logits.device)
    losses = nn.functional.cross_entropy(
        block_logits.float().reshape(-1, 2),
        labels.reshape(-1),
        weight=class_weight,
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(batch, layers, blocks)
    target_weight = class_weight[labels.clamp(min=0)] * (labels != IGNORE_INDEX)  # (B, P, K)
    per_layer = losses.sum(dim=(0, 2)) / target_weight.sum(dim=(0, 2)).clamp(min=torch.finfo(torch.float32).tiny)
    combined = per_layer.sum() if reduction == "sum" else per_layer.mean()
    return combined + 0.0 * block_logits.sum()
