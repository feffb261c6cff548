"""Self-attention that also yields what the skim predictors read: the diagonal-block attention probabilities.

Block-Skim's predictor for block k looks at layer i's post-softmax attention restricted to the block's own
bs x bs square, `P[:, :, k*bs:(k+1)*bs, k*bs:(k+1)*bs]` (paper section 3.2). With SDPA the full probability map is
never materialised, so this module registers one attention function, `"blockskim"`, in transformers'
`AttentionInterface`. The backbone layers of a Block-Skim model dispatch to it; it runs the model's own attention
implementation (`"sdpa"`, `"eager"`, ...) unless the caller passes an `AttentionProbe` asking for block
probabilities, in which case it computes the attention output together with each row's log-sum-exp and derives
the diagonal blocks in O(L * bs * d):

    P[i, j] = exp(q_i . k_j * scale + mask_j - logsumexp_j'(q_i . k_j' * scale + mask_j'))

On CPU at inference the fused flash kernel returns that log-sum-exp for free; when gradients are needed (joint
training never skims but the skim loss shapes the attention, so the input is not detached) the exact math runs
in eager form. Travels with every checkpoint as remote code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

BLOCKSKIM_ATTENTION = "blockskim"


@dataclass
class AttentionProbe:
    """What one layer call asks of the `"blockskim"` attention function, passed as the `blockskim_probe` keyword.

    Args:
        implementation (`str`): the model's attention implementation for the main output (`"sdpa"`, `"eager"`, ...).
        block_size (`int`, *optional*): when set, record the diagonal-block attention probabilities.
        key_valid (`torch.BoolTensor` of shape `(batch, length)`, *optional*): keys that may be attended to;
            required with `block_size` (padding and filler slots of a compacted batch are `False`).
        question_index (`torch.LongTensor` of shape `(batch, question_length)`, *optional*): positions of the
            question tokens, when the block-question attention masses are wanted too; `question_valid` marks the
            real entries of rows with shorter questions.
        block_probs (`torch.Tensor` of shape `(batch, heads, ceil(length / block_size), block_size, block_size)`):
            filled by the attention function, float32; rows of invalid queries are zero.
        question_features (`torch.Tensor` of shape `(batch, ceil(length / block_size), 2 * heads)`): filled when
            `question_index` is given; see `block_question_attention`.
    """

    implementation: str
    block_size: int | None = None
    key_valid: torch.Tensor | None = None
    question_index: torch.Tensor | None = None
    question_valid: torch.Tensor | None = None
    block_probs: torch.Tensor | None = None
    question_features: torch.Tensor | None = None


def _key_bias(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool -> (B, 1, 1, L) additive bias; `finfo.min` rather than -inf so no row can turn into NaN."""
    bias = torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device)
    bias.masked_fill_(~key_valid, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def _eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float,
    training: bool,
) -> torch.Tensor:
    """Textbook attention, (B, H, L, d), for the `"eager"` implementation; takes a boolean or additive mask."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, L, L)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, value)


def _cpu_flash_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The CPU flash-attention kernel behind SDPA, which also returns the row log-sum-exp; `None` off CPU."""
    fused = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused is None or query.device.type != "cpu":
        return None
    output, lse = fused(query, key, value, 0.0, False, attn_mask=bias, scale=scaling)
    return output, lse.float()


def row_logsumexp(query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """log sum_j exp(q_i . k_j * scale) over the valid keys, (B, H, L) float32, without gradient.

    On CPU the fused flash kernel returns it in O(L * d) memory; elsewhere query rows are processed in chunks so the
    L x L scores never exist at once.
    """
    with torch.no_grad():
        fused = _cpu_flash_attention(query, key, key, _key_bias(key_valid, query.dtype), scaling)
        if fused is not None:
            return fused[1]
        batch, heads, length, _ = query.shape
        bias = _key_bias(key_valid, torch.float32)  # (B, 1, 1, L)
        rows = max(1, (1 << 26) // max(1, batch * heads * length))  # about 256 MB of float32 scores per chunk
        keys = key.float().transpose(-1, -2)  # (B, H, d, L)
        chunks = [
            torch.logsumexp(torch.matmul(chunk.float(), keys) * scaling + bias, dim=-1)
            for chunk in query.split(rows, dim=2)
        ]
        return torch.cat(chunks, dim=2)


def diagonal_block_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    key_valid: torch.Tensor,
    lse: torch.Tensor,
    scaling: float,
    block_size: int,
) -> torch.Tensor:
    """Attention probabilities of every block's own bs x bs square, from the rows' log-sum-exp.

    Args:
        query, key (`torch.Tensor` of shape `(batch, heads, length, head_dim)`), `length` a multiple of `block_size`.
        key_valid (`torch.BoolTensor` of shape `(batch, length)`).
        lse (`torch.Tensor` of shape `(batch, heads, length)`): log-sum-exp of each query row over all valid keys.

    Returns:
        `torch.Tensor` of shape `(batch, heads, num_blocks, block_size, block_size)`, float32.
    """
    batch, heads, length, _ = query.shape
    num_blocks = length // block_size
    query_blocks = query.float().unflatten(2, (num_blocks, block_size))  # (B, H, K, bs, d)
    key_blocks = key.float().unflatten(2, (num_blocks, block_size))  # (B, H, K, bs, d)
    scores = torch.matmul(query_blocks, key_blocks.transpose(-1, -2)) * scaling  # (B, H, K, bs, bs)
    bias = _key_bias(key_valid, torch.float32).view(batch, 1, num_blocks, 1, block_size)
    return torch.exp(scores + bias - lse.view(batch, heads, num_blocks, block_size, 1))


class _DiagonalBlockProbabilities(torch.autograd.Function):
    """Diagonal-block probabilities with the exact gradient, in O(L * d) memory.

    With `P_ij = exp(s_ij - lse_i)` and `s_ij = scale * q_i . k_j + bias_j`, an upstream gradient G on the diagonal
    blocks gives `dL/ds_ij = G_ij P_ij` inside the blocks and `dL/dlse_i = g_i = -sum_j G_ij P_ij`. The log-sum-exp
    spreads `g_i` over the whole row: `dL/dq_i += scale * g_i * (P K)_i` and `dL/dk = scale * P^T (g * Q)`. Both
    come from one fused SDPA call with `V = K`: its output is `P K`, and its gradient with respect to V for the
    output gradient `g * Q` is `P^T (g * Q)`. So the L x L probabilities are never stored, as in flash attention.
    """

    @staticmethod
    def forward(ctx, query, key, key_valid, lse, scaling: float, block_size: int):
        probs = diagonal_block_probabilities(query, key, key_valid, lse, scaling, block_size)
        ctx.save_for_backward(query, key, key_valid, probs)
        ctx.scaling, ctx.block_size = scaling, block_size
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        query, key, key_valid, probs = ctx.saved_tensors
        scaling, block_size = ctx.scaling, ctx.block_size
        num_blocks = query.shape[2] // block_size
        score_grad = grad_probs * probs  # (B, H, K, bs, bs): dL/ds inside the diagonal blocks
        lse_grad = -score_grad.sum(dim=-1).flatten(2)  # (B, H, L)
        query_blocks = query.float().unflatten(2, (num_blocks, block_size))
        key_blocks = key.float().unflatten(2, (num_blocks, block_size))
        grad_query = scaling * torch.matmul(score_grad, key_blocks).flatten(2, 3)  # (B, H, L, d)
        grad_key = scaling * torch.matmul(score_grad.transpose(-1, -2), query_blocks).flatten(2, 3)
        with torch.enable_grad():
            values = key.detach().requires_grad_(True)
            probs_times_keys = nn.functional.scaled_dot_product_attention(
                query.detach(), key.detach(), values, attn_mask=_key_bias(key_valid, query.dtype), scale=scaling
            )  # (B, H, L, d) = P K
            (transposed,) = torch.autograd.grad(
                probs_times_keys, values, grad_outputs=(lse_grad[..., None] * query.float()).to(query.dtype)
            )  # P^T (g * Q)
        grad_query = grad_query + scaling * lse_grad[..., None] * probs_times_keys.float()
        grad_key = grad_key + scaling * transposed.float()
        return grad_query.to(query.dtype), grad_key.to(key.dtype), None, None, None, None


def diagonal_block_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
    block_size: int,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Diagonal-block attention probabilities `(B, H, K, bs, bs)`, differentiable when the inputs require it.

    The sequence need not fill its last block: the missing positions count as padding. Rows of invalid queries
    (padding, fillers) are zero, so what a block's image holds never depends on how its row was padded.

    Args:
        key_valid (`torch.BoolTensor` of shape `(batch, length)`): real tokens, as keys and as queries.
        lse (`torch.Tensor` of shape `(batch, heads, length)`, *optional*): the rows' log-sum-exp over the valid
            keys, when already known (it carries no gradient; the exact gradient is `_DiagonalBlockProbabilities`').
    """
    if lse is None:
        lse = row_logsumexp(query, key, key_valid, scaling)
    pad = -query.shape[2] % block_size
    if pad:
        query, key = (nn.functional.pad(t, (0, 0, 0, pad)) for t in (query, key))
        key_valid = nn.functional.pad(key_valid, (0, pad))
        lse = nn.functional.pad(lse, (0, pad))
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        probs = _DiagonalBlockProbabilities.apply(query, key, key_valid, lse, scaling, block_size)
    else:
        probs = diagonal_block_probabilities(query, key, key_valid, lse, scaling, block_size)
    batch, _, num_blocks = probs.shape[:3]
    return probs * key_valid.view(batch, 1, num_blocks, block_size, 1)


def block_question_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    key_valid: torch.Tensor,
    lse: torch.Tensor,
    question_index: torch.Tensor,
    question_valid: torch.Tensor,
    scaling: float,
    block_size: int,
) -> torch.Tensor:
    """Per block and head, how much attention flows between the block and the question, without gradient.

    `to_question[b, k, h]`: mean over the block's real tokens of the probability mass they put on the question
    tokens; `from_question[b, k, h]`: mean over the question tokens of the mass they put on the block. Only the
    question rows and columns of the attention map are computed, O(length x question x head_dim).

    Args:
        query, key (`torch.Tensor` of shape `(batch, heads, length, head_dim)`).
        key_valid (`torch.BoolTensor` of shape `(batch, length)`).
        lse (`torch.Tensor` of shape `(batch, heads, length)`): log-sum-exp of every query row over the valid keys.
        question_index, question_valid (`(batch, question_length)`): question positions and which are real.

    Returns:
        `torch.Tensor` of shape `(batch, ceil(length / block_size), 2 * heads)`, float32: `to_question` for every
        head, then `from_question`.
    """
    with torch.no_grad():
        batch, heads, length, head_dim = query.shape
        query, key, lse = query.float(), key.float(), lse.float()
        index = question_index[:, None, :, None].expand(batch, heads, -1, head_dim)  # (B, H, Q, d)
        question_weight = question_valid.float()[:, None, None, :]  # (B, 1, 1, Q)
        # Rows of every token, columns of the question: (B, H, L, Q).
        scores = torch.matmul(query, key.gather(2, index).transpose(-1, -2)) * scaling
        to_question = (torch.exp(scores - lse[..., None]) * question_weight).sum(dim=-1)  # (B, H, L)
        # Rows of the question, columns of every token: (B, H, Q, L).
        scores = torch.matmul(query.gather(2, index), key.transpose(-1, -2)) * scaling
        question_lse = lse.gather(2, question_index[:, None, :].expand(batch, heads, -1))  # (B, H, Q)
        from_tokens = torch.exp(scores + _key_bias(key_valid, torch.float32) - question_lse[..., None])
        from_question = (from_tokens * question_weight.transpose(-1, -2)).sum(dim=2)  # (B, H, L)
        from_question = from_question / question_valid.sum(dim=1).clamp(min=1)[:, None, None]
        pad = -length % block_size
        valid = nn.functional.pad(key_valid, (0, pad)).float().unflatten(1, (-1, block_size))  # (B, K, bs)
        to_question = nn.functional.pad(to_question, (0, pad)).unflatten(2, (-1, block_size))  # (B, H, K, bs)
        from_question = nn.functional.pad(from_question, (0, pad)).unflatten(2, (-1, block_size))
        to_block = (to_question * valid[:, None]).sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)[:, None]  # (B, H, K)
        from_block = (from_question * valid[:, None]).sum(dim=-1)  # (B, H, K)
        return torch.cat([to_block, from_block], dim=1).transpose(1, 2)  # (B, K, 2H)


def blockskim_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    blockskim_probe: AttentionProbe | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`AttentionInterface` entry: the model's own attention, plus diagonal-block probabilities when probed.

    Returns the attention output as `(batch, length, heads, head_dim)`, like every transformers implementation.
    """
    probe = blockskim_probe if blockskim_probe is not None else AttentionProbe(implementation="sdpa")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    dropout = dropout if module.training else 0.0
    output = lse = None  # output as transformers implementations return it: (B, L, H, d)
    if probe.block_size is not None:
        if probe.key_valid is None:
            raise ValueError("AttentionProbe.key_valid is required when block probabilities are requested.")
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if probe.implementation == "sdpa" and not needs_grad and dropout == 0.0:
            # At inference the fused kernel yields the output and the log-sum-exp in one pass.
            fused = _cpu_flash_attention(query, key, value, _key_bias(probe.key_valid, query.dtype), scaling)
            if fused is not None:
                output, lse = fused[0].transpose(1, 2).contiguous(), fused[1]
    if output is None and probe.implementation == "eager":
        output = _eager_attention(query, key, value, attention_mask, scaling, dropout, module.training)
        output = output.transpose(1, 2).contiguous()
    elif output is None:
        inner = ALL_ATTENTION_FUNCTIONS[probe.implementation]
        output, _ = inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if probe.block_size is not None:
        if lse is None:
            lse = row_logsumexp(query, key, probe.key_valid, scaling)
        probe.block_probs = diagonal_block_attention(query, key, probe.key_valid, scaling, probe.block_size, lse=lse)
        if probe.question_index is not None:
            probe.question_features = block_question_attention(
                query, key, probe.key_valid, lse, probe.question_index, probe.question_valid, scaling, probe.block_size
            )
    return output, None


AttentionInterface.register(BLOCKSKIM_ATTENTION, blockskim_attention_forward)
