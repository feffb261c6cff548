"""FLOPs of a Block-Skim forward pass: one analytic estimate shared by evaluation logs and benchmarks, and a
measured count with `torch.utils.flop_counter` to check it against.

The analytic count covers everything that multiplies: per encoder layer on n tokens with hidden size h and
intermediate size I, the Q/K/V/output projections (8 n h^2), the feed-forward (4 n h I) and the attention products
(4 n^2 h); the span head (4 n h); and per skim-predictor layer on K blocks of bs tokens with H heads of d dims, the
diagonal attention blocks (2 K H bs^2 d) and the CNN (2 K H^2 9 (bs^2 + bs^2/4) plus 2 K H bs^2/8) unless the
predictors read only the question masses, plus, with question features, the question rows and columns of the
attention and their sums over the question (4 n q H (d + 1)), and with token matching the matcher's projections and
question-by-sequence scores (`token_matcher_flops`). At inference a predictor classifies every block present,
protected ones included: the decision ignores those, which is cheaper than finding the judged blocks first.
Layer norms, softmax and activations are left out, as `torch.utils.flop_counter` leaves them out.
The paper's ideal speedup (Eq. 4) is also here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from .configuration_blockskim import BlockSkimConfig
from .predictor_blockskim import MATCH_HEADS, MATCH_OVERLAP, MATCH_RANK


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_FLASH_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _CPU_FLASH_ATTENTION is not None:
    try:
        # torch counts SDPA on CUDA but not the CPU flash kernel that SDPA dispatches to on CPU.
        register_flop_formula(_CPU_FLASH_ATTENTION)(_cpu_flash_attention_flop)
    except RuntimeError:  # already registered (a newer torch, or a second import)
        pass


def layer_flops(tokens: int, hidden_size: int, intermediate_size: int) -> int:
    """FLOPs of one BERT-style encoder layer on a sequence of `tokens` positions."""
    n, h = tokens, hidden_size
    return 8 * n * h * h + 4 * n * h * intermediate_size + 4 * n * n * h


def diagonal_block_flops(blocks: int, num_heads: int, head_dim: int, block_size: int) -> int:
    """FLOPs of the bs x bs diagonal attention scores of `blocks` blocks (the predictor's input)."""
    return 2 * blocks * num_heads * block_size * block_size * head_dim


def predictor_flops(
    blocks: int,
    num_heads: int,
    block_size: int,
    question_features: bool = False,
    diagonal_block: bool = True,
    block_context: bool = False,
    token_matches: int = 0,
    hidden_size: int | None = None,
) -> int:
    """FLOPs of the skim predictor classifying `blocks` blocks: two 3x3 convolutions (with `diagonal_block`) and
    the classifier, which reads the CNN's features and/or the 2 x heads question masses (8 x heads in context;
    the context's own element-wise arithmetic is not counted, like the softmax and normalisations elsewhere) and
    `token_matches` features of a `TokenMatcher` (computed apart: `token_matcher_flops`): one linear layer, or with
    `hidden_size` a hidden layer of that many units and the output layer."""
    bs, heads = block_size, num_heads
    convolutions = 2 * blocks * heads * heads * 9 * (bs * bs + (bs // 2) ** 2) if diagonal_block else 0
    question = (8 if block_context else 2) * heads if question_features else 0
    inputs = (heads * (bs // 4) ** 2 if diagonal_block else 0) + question + token_matches
    classifier = 2 * blocks * (inputs * hidden_size + hidden_size * 2 if hidden_size else inputs * 2)
    return convolutions + classifier


def token_matcher_flops(tokens: int, question_tokens: int, slots: int, hidden_size: int) -> int:
    """FLOPs of a `TokenMatcher` (default sizes) on `tokens` positions in `slots` blocks with `question_tokens`
    question tokens: the key projection of every position, the query and weight projections of the question, the
    question-by-sequence scores and the weighted token-overlap shares (the max and weighted sums are not counted)."""
    n, q, h, width = tokens, question_tokens, hidden_size, MATCH_HEADS * MATCH_RANK
    projections = 2 * n * h * width + 2 * q * h * (width + MATCH_HEADS + MATCH_OVERLAP)
    return projections + 2 * q * n * width + 2 * MATCH_OVERLAP * q * slots


def forward_flops(
    config: BlockSkimConfig,
    tokens_per_layer: Sequence[int],
    predictors: bool = True,
    question_tokens: int = 0,
) -> int:
    """Analytic FLOPs of one forward pass.

    Args:
        config (`BlockSkimConfig`): the model's configuration.
        tokens_per_layer (`Sequence[int]`): positions each encoder layer processes (`num_hidden_layers` entries);
            the span head runs on the last layer's positions.
        predictors (`bool`, defaults to `True`): count the skim predictors, which read the diagonal blocks of every
            block present and classify it (at inference, as the model runs them).
        question_tokens (`int`, defaults to 0): tokens up to the first separators, whose attention rows and columns
            the predictors read when `config.predictor_question_features` is set (4 H n q (d + 1) per predictor
            layer on n positions: the question rows and columns, and their weighted sums over the question).

    Returns:
        `int` FLOPs.
    """
    backbone = config.backbone_config
    if len(tokens_per_layer) != backbone.num_hidden_layers:
        raise ValueError(
            f"tokens_per_layer has {len(tokens_per_layer)} entries; "
            f"the backbone has {backbone.num_hidden_layers} layers."
        )
    total = sum(layer_flops(n, backbone.hidden_size, backbone.intermediate_size) for n in tokens_per_layer)
    total += 4 * tokens_per_layer[-1] * backbone.hidden_size
    if predictors:
        head_dim = backbone.hidden_size // backbone.num_attention_heads
        heads, bs = backbone.num_attention_heads, config.block_size
        for layer in config.skim_layers:
            slots = -(-tokens_per_layer[layer] // bs)
            matches = 4 * (MATCH_HEADS + MATCH_OVERLAP) if config.predictor_token_matching else 0
            total += predictor_flops(
                slots,
                heads,
                bs,
                config.predictor_question_features,
                config.predictor_diagonal_block,
                config.predictor_block_context,
                matches,
                config.predictor_hidden_size,
            )
            if matches:
                total += token_matcher_flops(tokens_per_layer[layer], question_tokens, slots, backbone.hidden_size)
            if config.predictor_diagonal_block:
                total += diagonal_block_flops(slots, heads, head_dim, bs)
            if config.predictor_question_features:
                total += 4 * heads * tokens_per_layer[layer] * question_tokens * (head_dim + 1)
    return total


def ideal_speedup(tokens_per_layer: Sequence[float]) -> float:
    """Paper Eq. 4, `L / sum_i prod_{j<i} m_j`, written with the tokens each layer processes.

    With `m_j` the fraction of its input that layer j passes on, layer i processes `n_0 * prod_{j<i} m_j` tokens,
    so the speedup is `L * n_0 / sum_i n_i` (linear in length; attention is quadratic, so real savings are a bit
    larger).

    Args:
        tokens_per_layer (`Sequence[float]`): tokens entering each layer (e.g. a row of `kept_token_counts`).
    """
    return len(tokens_per_layer) * tokens_per_layer[0] / sum(tokens_per_layer)


def count_flops(function: Callable[[], object]) -> int:
    """FLOPs that `torch.utils.flop_counter` measures while `function()` runs."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()
