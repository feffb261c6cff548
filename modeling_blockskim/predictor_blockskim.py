"""The skim predictor: a tiny CNN that reads one block's own attention square and says "keep" or "skim".

Paper section 3.2: the input is the H-channel bs x bs image `P[:, :, k*bs:(k+1)*bs, k*bs:(k+1)*bs]` of layer i's
attention probabilities; the network is [3x3 conv H->H, BatchNorm, ReLU, 2x2 average pool] x 2, flatten, and a
linear layer to two logits (skim, keep). About 4.2K parameters for BERT-base (H = 12, bs = 32); its FLOPs are
negligible next to the layer it follows, though its dozen small kernels are not at batch 1. Optionally (not in the
paper) the linear layer also reads the block-question attention masses, or reads only those, without the CNN, and
may read them in context (relative to uniform attention, the neighbouring blocks and the window's best block).
Travels with every checkpoint as remote code.
"""

from __future__ import annotations

import torch
from torch import nn


class BlockSkimPredictor(nn.Module):
    """Block relevance classifier over diagonal attention blocks.

    Args:
        num_heads (`int`): attention heads of the layer it reads (the image's channels).
        block_size (`int`): tokens per block, a multiple of 4 (two 2x2 poolings).
        question_features (`bool`, defaults to `False`): also read 2 x `num_heads` block-question attention
            masses (`BlockSkimConfig.predictor_question_features`), batch-normalised and joined to the CNN
            features before the linear layer.
        diagonal_block (`bool`, defaults to `True`): read the block's attention square with the CNN
            (`BlockSkimConfig.predictor_diagonal_block`); `False` needs `question_features=True` and leaves a
            linear classifier of the normalised question masses.
        block_context (`bool`, defaults to `False`): the question masses come in context, 8 x `num_heads` numbers
            per block (`BlockSkimConfig.predictor_block_context`, `attention_blockskim.block_context_features`);
            needs `question_features=True`.
    """

    def __init__(
        self,
        num_heads: int,
        block_size: int,
        question_features: bool = False,
        diagonal_block: bool = True,
        block_context: bool = False,
    ):
        super().__init__()
        if not (diagonal_block or question_features):
            raise ValueError("A predictor without the diagonal block needs question_features=True.")
        if block_context and not question_features:
            raise ValueError("block_context describes the question masses: it needs question_features=True.")
        self.features = (
            nn.Sequential(
                nn.Conv2d(num_heads, num_heads, kernel_size=3, padding=1),
                nn.BatchNorm2d(num_heads),
                nn.ReLU(),
                nn.AvgPool2d(2),
                nn.Conv2d(num_heads, num_heads, kernel_size=3, padding=1),
                nn.BatchNorm2d(num_heads),
                nn.ReLU(),
                nn.AvgPool2d(2),
            )
            if diagonal_block
            else None
        )
        extra = (8 if block_context else 2) * num_heads if question_features else 0
        self.question_norm = nn.BatchNorm1d(extra) if question_features else None
        square = num_heads * (block_size // 4) ** 2 if diagonal_block else 0
        self.classifier = nn.Linear(square + extra, 2)

    def forward(self, block_probs: torch.Tensor | None, question_features: torch.Tensor | None = None) -> torch.Tensor:
        """Classify blocks.

        Args:
            block_probs (`torch.Tensor` of shape `(num_blocks, heads, block_size, block_size)`): the blocks to judge,
                only real ones (so BatchNorm statistics never see padding); required unless the predictor was
                built with `diagonal_block=False`.
            question_features (`torch.Tensor` of shape `(num_blocks, 2 * heads)`, or `(num_blocks, 8 * heads)` with
                `block_context`, *optional*): required when the predictor was built with `question_features=True`.

        Returns:
            `torch.Tensor` of shape `(num_blocks, 2)`: logits of (skim, keep).
        """
        dtype = self.classifier.weight.dtype
        parts = []
        if self.features is not None:
            if block_probs is None:
                raise ValueError("This predictor reads the diagonal attention block: pass block_probs.")
            parts.append(self.features(block_probs.to(dtype)).flatten(1))  # (N, H * bs/4 * bs/4)
        if self.question_norm is not None:
            if question_features is None:
                raise ValueError("This predictor reads block-question attention: pass question_features.")
            norm = self.question_norm
            # Batch statistics need two blocks or more; a lone judged block is normalised with the running ones.
            batch_statistics = norm.training and question_features.shape[0] > 1
            question = nn.functional.batch_norm(
                question_features.to(dtype),
                norm.running_mean,
                norm.running_var,
                norm.weight,
                norm.bias,
                training=batch_statistics,
                momentum=norm.momentum,
                eps=norm.eps,
            )
            parts.append(question)
        return self.classifier(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])  # (N, 2)
