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
        block_probs (`torch.Tensor` of shape `(batch, heads, length // block_size, block_size, block_size)`):
            filled by the attention function, float32.
    """

    implementation: str
    block_size: int | None = None
    key_valid: torch.Tensor | None = None
    block_probs: torch.Tensor | None = None


def _key_bias(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool -> (B, 1, 1, L) additive bias; `finfo.min` rather than -inf so no row can turn into NaN."""
    bias = torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device)
    bias.masked_fill_(~key_valid, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def _attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook attention returning (output (B, H, L, d), row log-sum-exp (B, H, L) in float32); differentiable."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, L, L)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores.float(), dim=-1)  # (B, H, L)
    probs = torch.exp(scores.float() - lse.unsqueeze(-1)).to(value.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, value), lse


def _fused_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The CPU flash-attention kernel behind SDPA, which also returns the row log-sum-exp (inference only)."""
    fused = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused is None or query.device.type != "cpu":
        return None
    output, lse = fused(query, key, value, 0.0, False, attn_mask=bias, scale=scaling)
    return output, lse.float()


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
    if probe.block_size is None:
        if probe.implementation == "eager":
            bias = attention_mask
            if bias is not None and bias.dtype == torch.bool:
                bias = torch.zeros_like(bias, dtype=query.dtype).masked_fill_(~bias, torch.finfo(query.dtype).min)
            output, _ = _attention_with_lse(query, key, value, bias, scaling, dropout, module.training)
            return output.transpose(1, 2).contiguous(), None
        inner = ALL_ATTENTION_FUNCTIONS[probe.implementation]
        return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    if probe.key_valid is None:
        raise ValueError("AttentionProbe.key_valid is required when block probabilities are requested.")
    bias = _key_bias(probe.key_valid, query.dtype)
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    use_fused = probe.implementation == "sdpa" and not needs_grad and not (module.training and dropout > 0)
    fused = _fused_attention_with_lse(query, key, value, bias, scaling) if use_fused else None
    if fused is not None:
        output, lse = fused
    else:
        output, lse = _attention_with_lse(query, key, value, bias, scaling, dropout, module.training)
    probe.block_probs = diagonal_block_probabilities(query, key, probe.key_valid, lse, scaling, probe.block_size)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(BLOCKSKIM_ATTENTION, blockskim_attention_forward)
