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
    "keep", as `torch.nn.CrossEntropyLoss(weight=...)` defines it). Targets may also be soft, a probability `t` of
    "keep" per block (`span_block_targets`): the block then counts `balance_factor * t` times as "keep" and `1 - t`
    times as "skim", which for `t` in {0, 1} is exactly the hard-label loss. `reduction="sum"` adds the layer terms
    as the paper does; `"mean"` averages them. A batch without labelled blocks contributes an exact zero that still
    touches every predictor output, so data-parallel training never sees unused parameters.

    Args:
        block_logits (`torch.Tensor` of shape `(batch, layers, blocks, 2)`): (skim, keep) logits per predictor layer.
        block_labels (`torch.Tensor` of shape `(batch, blocks)` or `(batch, layers, blocks)`): integer labels (1 keep,
            0 skim) or float probabilities of "keep"; -100 ignored.
        balance_factor (`float`): beta.
        reduction (`"sum"` or `"mean"`).

    Returns:
        Scalar `torch.Tensor` (float32).
    """
    batch, layers, blocks, _ = block_logits.shape
    labels = block_labels if block_labels.dim() == 3 else block_labels[:, None, :].expand(batch, layers, blocks)
    labelled = labels != IGNORE_INDEX  # (B, P, K)
    keep = labels.float().clamp(min=0.0) * labelled  # (B, P, K), in [0, 1]
    keep_weight, skim_weight = balance_factor * keep, (1.0 - keep) * labelled
    log_probs = nn.functional.log_softmax(block_logits.float(), dim=-1)  # (B, P, K, 2)
    losses = -(skim_weight * log_probs[..., 0] + keep_weight * log_probs[..., 1])
    target_weight = (skim_weight + keep_weight).sum(dim=(0, 2))  # (P,)
    per_layer = losses.sum(dim=(0, 2)) / target_weight.clamp(min=torch.finfo(torch.float32).tiny)
    combined = per_layer.sum() if reduction == "sum" else per_layer.mean()
    return combined + 0.0 * block_logits.sum()


def span_block_targets(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    token_valid: torch.Tensor,
    block_labels: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Soft skim targets from the model's own answer: how likely its span head is to start or end in each block.

    Skimming costs F1 only where it removes the block the full model would have answered from; a gold answer block
    on a question the model gets wrong anyway costs nothing to lose, and a block the model (rightly or wrongly)
    answers from costs its whole answer. So a predictor trained on a frozen model may learn to keep the blocks that
    model reads its answer from: per block, the larger of the probability masses the start and the end
    distributions (softmax over the window's real tokens) put on its tokens. The gold answer does not enter them.

    Args:
        start_logits, end_logits (`torch.Tensor` of shape `(batch, length)`): the model's span logits, not skimmed.
        token_valid (`torch.Tensor` of shape `(batch, length)`): real tokens (the attention mask).
        block_labels (`torch.LongTensor` of shape `(batch, blocks)`): `answer_block_labels` of the same windows; the
            blocks it ignores (-100: [CLS], question, separators, padding) are ignored here too.
        block_size (`int`).

    Returns:
        `torch.Tensor` of shape `(batch, blocks)`, float32: P(keep) targets in [0, 1], -100 where ignored.
    """
    length, blocks = start_logits.shape[1], block_labels.shape[1]
    logits = torch.stack([start_logits, end_logits]).float()  # (2, B, L)
    probs = logits.masked_fill(~token_valid.bool(), float("-inf")).softmax(dim=-1)
    probs = nn.functional.pad(probs, (0, blocks * block_size - length))  # (2, B, K * bs)
    mass = probs.unflatten(-1, (blocks, block_size)).sum(dim=-1).amax(dim=0)  # (B, K)
    return mass.clamp(max=1.0).masked_fill(block_labels == IGNORE_INDEX, IGNORE_INDEX)


def span_distillation_loss(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    teacher_start_logits: torch.Tensor,
    teacher_end_logits: torch.Tensor,
    token_kept: torch.Tensor,
) -> torch.Tensor:
    """KL divergence of the span head's start and end distributions from a teacher's, over the kept tokens.

    Skim-aware distillation: the teacher is the model as it was before the stage, reading the whole window; the
    student reads the skimmed one. Both distributions are taken over the tokens the student kept (the teacher's
    renormalised there), so the student learns to answer from a skimmed window as the teacher answers from the whole
    one, not to put mass on tokens it no longer has. No gold answer enters, so the stage adds no labelled
    supervision: where nothing is skimmed and the student equals the teacher, the gradient is exactly zero.

    Args:
        start_logits, end_logits (`torch.Tensor` of shape `(batch, length)`): the student's (skimmed) span logits.
        teacher_start_logits, teacher_end_logits (`torch.Tensor` of shape `(batch, length)`): the teacher's, on
            the whole window.
        token_kept (`torch.BoolTensor` of shape `(batch, length)`): the real tokens the student's span head scored.

    Returns:
        Scalar `torch.Tensor` (float32): the mean over windows of the start and end terms' mean; 0 where the
        student's distributions are the teacher's.
    """
    terms = []
    for student, teacher in ((start_logits, teacher_start_logits), (end_logits, teacher_end_logits)):
        student = student.float().masked_fill(~token_kept, float("-inf"))
        teacher = teacher.float().masked_fill(~token_kept, float("-inf"))
        targets, log_targets = teacher.softmax(dim=-1), teacher.log_softmax(dim=-1)
        log_ratio = (log_targets - student.log_softmax(dim=-1)).masked_fill(~token_kept, 0.0)
        divergence = (targets * log_ratio).sum(dim=-1)
        # The divergence's gradient, softmax(student) - targets, written out with the same softmax on both sides:
        # autograd's would differ from zero by rounding where student and teacher agree, and Adam's normalisation
        # turns any non-zero gradient, however small, into a full step.
        surrogate = ((student.softmax(dim=-1) - targets).detach() * student.masked_fill(~token_kept, 0.0)).sum(dim=-1)
        terms.append((divergence.detach() + surrogate - surrogate.detach()).mean())
    return (terms[0] + terms[1]) / 2
