"""The skim predictor: a tiny CNN that reads one block's own attention square and says "keep" or "skim".

Paper section 3.2: the input is the H-channel bs x bs image `P[:, :, k*bs:(k+1)*bs, k*bs:(k+1)*bs]` of layer i's
attention probabilities; the network is [3x3 conv H->H, BatchNorm, ReLU, 2x2 average pool] x 2, flatten, and a
linear layer to two logits (skim, keep). About 4.2K parameters for BERT-base (H = 12, bs = 32); its FLOPs are
negligible next to the layer it follows, though its dozen small kernels are not at batch 1. Optionally (not in the
paper) the linear layer also reads the block-question attention masses, or reads only those, without the CNN, and
may read them in context (relative to uniform attention, the neighbouring blocks and the window's best block),
and may compare the block's tokens with the question's on the layer's hidden states (`TokenMatcher`).
Travels with every checkpoint as remote code.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_blockskim import neighbour_context

MATCH_HEADS, MATCH_RANK, MATCH_OVERLAP = 4, 32, 2
"""`TokenMatcher` defaults: the sizes `BlockSkimConfig.predictor_token_matching` builds, which the FLOPs count
reads too. Chosen with `benchmarks/predictor_probe.py`."""


class TokenMatcher(nn.Module):
    """Does the block hold what the question names? A comparison of question and block tokens on hidden states.

    Attention masses summarise how much a block and the question attend to each other; whether the block holds the
    entity or phrase the question asks about is a matter of single tokens, and after one layer the hidden states
    still say which tokens those are. So, per block:

    - for each of `heads` matching heads, each question token's best score against the block's tokens under a
      learned low-rank bilinear form `(W_q x_i) . (W_k x_j) / sqrt(rank)`, averaged over the question with learned
      weights (a softmax over the question tokens of `W_w x_i`, so names can count more than "what" or [SEP]);
    - for each of `overlap` channels, the weighted share of question tokens whose id occurs in the block (exact
      token overlap, which the bilinear form only approximates);

    then all of it in context of the neighbouring blocks and the window's best judged block (`neighbour_context`).
    Cost per call on n positions with q question tokens and hidden size h: `2 n h heads rank` for the keys, the
    same for the q queries, and `2 q n heads rank` for the scores.

    Args:
        hidden_size (`int`): the backbone's hidden size.
        heads (`int`, defaults to `MATCH_HEADS`): matching heads.
        rank (`int`, defaults to `MATCH_RANK`): dimension of each head's projections.
        overlap (`int`, defaults to `MATCH_OVERLAP`): question weightings of the token-overlap share.
    """

    def __init__(
        self, hidden_size: int, heads: int = MATCH_HEADS, rank: int = MATCH_RANK, overlap: int = MATCH_OVERLAP
    ):
        super().__init__()
        self.heads, self.rank, self.overlap = heads, rank, overlap
        self.query = nn.Linear(hidden_size, heads * rank)
        self.key = nn.Linear(hidden_size, heads * rank)
        self.weights = nn.Linear(hidden_size, heads + overlap)

    @property
    def num_features(self) -> int:
        """Numbers per block: `heads + overlap` values, each with its two neighbours and its gap to the best."""
        return 4 * (self.heads + self.overlap)

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        token_valid: torch.Tensor,
        question_valid: torch.Tensor,
        judged: torch.Tensor,
    ) -> torch.Tensor:
        """Match every block of every row against its question.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch, length, hidden)`): the predictor layer's output.
            input_ids (`torch.LongTensor` of shape `(batch, slots * block_size)`): token ids at the same positions
                (padded to whole blocks; ids of invalid positions are never compared).
            token_valid (`torch.BoolTensor` of shape `(batch, slots * block_size)`): real, present tokens;
                `length <= slots * block_size`.
            question_valid (`torch.BoolTensor` of shape `(batch, width)`): the question tokens, all among the first
                `width` positions.
            judged (`torch.BoolTensor` of shape `(batch, slots)`): the blocks being judged.

        Returns:
            `torch.Tensor` of shape `(batch, slots, num_features)`, float32.
        """
        batch, length, _ = hidden_states.shape
        slots, width = judged.shape[1], question_valid.shape[1]
        block_size = token_valid.shape[1] // slots
        hidden = hidden_states.to(self.query.weight.dtype)
        question_hidden = hidden[:, :width]  # (B, W, h)
        # Weights over the question tokens, one distribution per matching head and overlap channel: (B, W, F).
        weights = self.weights(question_hidden).float().masked_fill(~question_valid[..., None], -1e4).softmax(dim=1)
        query = self.query(question_hidden).unflatten(-1, (self.heads, self.rank)).transpose(1, 2)  # (B, M, W, r)
        key = self.key(hidden).unflatten(-1, (self.heads, self.rank)).transpose(1, 2)  # (B, M, L, r)
        scores = torch.matmul(query, key.transpose(-1, -2)).float() * self.rank**-0.5  # (B, M, W, L)
        scores = nn.functional.pad(scores, (0, slots * block_size - length))
        scores = scores.masked_fill(~token_valid[:, None, None, :], -1e4)
        best = scores.unflatten(-1, (slots, block_size)).amax(dim=-1)  # (B, M, W, S)
        matched = (best * weights[..., : self.heads].transpose(1, 2)[..., None]).sum(dim=2)  # (B, M, S)
        same = (input_ids[:, :width, None] == input_ids[:, None, :]) & token_valid[:, None, :]  # (B, W, S * bs)
        present = same.unflatten(-1, (slots, block_size)).any(dim=-1).float()  # (B, W, S)
        shared = torch.matmul(weights[..., self.heads :].transpose(1, 2), present)  # (B, overlap, S)
        return neighbour_context(torch.cat([matched, shared], dim=1).transpose(1, 2), judged)


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
        token_matching_hidden_size (`int`, *optional*): the backbone's hidden size, to also read a `TokenMatcher`'s
            features (`BlockSkimConfig.predictor_token_matching`), batch-normalised like the question masses.
        hidden_size (`int`, *optional*): one hidden layer of this many GELU units before the two logits
            (`BlockSkimConfig.predictor_hidden_size`); without it the classifier is the paper's linear layer.
    """

    def __init__(
        self,
        num_heads: int,
        block_size: int,
        question_features: bool = False,
        diagonal_block: bool = True,
        block_context: bool = False,
        token_matching_hidden_size: int | None = None,
        hidden_size: int | None = None,
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
        self.token_matcher = TokenMatcher(token_matching_hidden_size) if token_matching_hidden_size else None
        matches = self.token_matcher.num_features if self.token_matcher is not None else 0
        self.match_norm = nn.BatchNorm1d(matches) if matches else None
        square = num_heads * (block_size // 4) ** 2 if diagonal_block else 0
        inputs = square + extra + matches
        self.hidden = nn.Sequential(nn.Linear(inputs, hidden_size), nn.GELU()) if hidden_size else None
        self.classifier = nn.Linear(hidden_size or inputs, 2)

    def forward(
        self,
        block_probs: torch.Tensor | None,
        question_features: torch.Tensor | None = None,
        token_matches: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Classify blocks.

        Args:
            block_probs (`torch.Tensor` of shape `(num_blocks, heads, block_size, block_size)`): the blocks to judge,
                only real ones (so BatchNorm statistics never see padding); required unless the predictor was
                built with `diagonal_block=False`.
            question_features (`torch.Tensor` of shape `(num_blocks, 2 * heads)`, or `(num_blocks, 8 * heads)` with
                `block_context`, *optional*): required when the predictor was built with `question_features=True`.
            token_matches (`torch.Tensor` of shape `(num_blocks, token_matcher.num_features)`, *optional*): the
                judged blocks' rows of `self.token_matcher(...)`; required when the predictor has one.

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
            parts.append(_normalise(self.question_norm, question_features.to(dtype)))
        if self.match_norm is not None:
            if token_matches is None:
                raise ValueError("This predictor reads token matches: pass token_matches from its token_matcher.")
            parts.append(_normalise(self.match_norm, token_matches.to(dtype)))
        features = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (N, inputs)
        return self.classifier(features if self.hidden is None else self.hidden(features))  # (N, 2)


def _normalise(norm: nn.BatchNorm1d, features: torch.Tensor) -> torch.Tensor:
    """`norm(features)`, except that a lone judged block in training is normalised with the running statistics:
    batch statistics need two blocks or more."""
    batch_statistics = norm.training and features.shape[0] > 1
    return nn.functional.batch_norm(
        features,
        norm.running_mean,
        norm.running_var,
        norm.weight,
        norm.bias,
        training=batch_statistics,
        momentum=norm.momentum,
        eps=norm.eps,
    )
