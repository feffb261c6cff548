"""Self-attention that also yields what the skim predictors read: the diagonal-block attention probabilities.

Block-Skim's predictor for block k looks at layer i's post-softmax attention restricted to the block's own
bs x bs square, `P[:, :, k*bs:(k+1)*bs, k*bs:(k+1)*bs]` (paper section 3.2). With SDPA the full probability map is
never materialised, so this module registers one attention function, `"blockskim"`, in transformers'
`AttentionInterface`. The backbone layers of a Block-Skim model dispatch to it; it runs the model's own attention
implementation (`"sdpa"`, `"eager"`, ...) unless the caller passes an `AttentionProbe` asking for block
probabilities, in which case it computes the attention output together with each row's log-sum-exp and derives
the diagonal blocks of the judged blocks only (passage blocks still present), in O(N * bs * bs * d):

    P[i, j] = exp(q_i . k_j * scale + mask_j - logsumexp_j'(q_i . k_j' * scale + mask_j'))

On CPU at inference the fused flash kernel returns that log-sum-exp for free; when gradients are needed (joint
training never skims but the skim loss shapes the attention, so the input is not detached) the log-sum-exp has its
own exact, O(L * d)-memory gradient (`_RowLogSumExp`) and the rest is plain autograd. Travels with every
checkpoint as remote code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

BLOCKSKIM_ATTENTION = "blockskim"

LOGSUMEXP_CHUNK_SCORES = 1 << 26
"""Scores per chunk (256 MB of float32) when the row log-sum-exp is computed apart from the attention (off CPU)."""


@dataclass
class AttentionProbe:
    """What one layer call asks of the `"blockskim"` attention function, passed as the `blockskim_probe` keyword.

    Args:
        implementation (`str`): the model's attention implementation for the main output (`"sdpa"`, `"eager"`, ...).
        block_size (`int`, *optional*): when set, record the attention probabilities of the judged blocks.
        key_valid (`torch.BoolTensor` of shape `(batch, length)`, *optional*): keys that may be attended to;
            required with `block_size` (padding and filler slots of a compacted batch are `False`). It must agree
            with the layer's attention mask: no mask means every key is real.
        judged_blocks (`torch.LongTensor` of shape `(N, 2)`, *optional*): (row, block) of the blocks to describe,
            in row-major order (`mask.nonzero()`). Without it every slot of `judged_slots` is described, judged or
            not (`N = batch * slots`): at inference that saves the host synchronisation of `nonzero()` and the
            gathers by index, and the caller ignores what it does not judge. One of the two is required with
            `block_size`.
        diagonal_block (`bool`, defaults to `True`): compute `block_probs`; predictors that read only the question
            masses switch it off.
        question_valid (`torch.BoolTensor` of shape `(batch, width)`, *optional*): the question tokens, all among
            the first `width` positions, when the block-question attention masses are wanted too.
        block_context (`bool`, defaults to `False`): describe each judged block by its masses in context
            (`block_context_features`) rather than by its raw masses.
        judged_slots (`torch.BoolTensor` of shape `(batch, slots)`, *optional*): the judged blocks as a mask, which
            the caller has already; required with `block_context` and without `judged_blocks`.
        block_probs (`torch.Tensor` of shape `(N, heads, block_size, block_size)`): filled by the attention
            function, float32; rows of invalid queries are zero.
        question_features (`torch.Tensor` of shape `(N, 2 * heads)`, or `(N, 8 * heads)` with `block_context`):
            filled when `question_valid` is given; see `block_question_attention` and `block_context_features`.
    """

    implementation: str
    block_size: int | None = None
    key_valid: torch.Tensor | None = None
    judged_blocks: torch.Tensor | None = None
    diagonal_block: bool = True
    question_valid: torch.Tensor | None = None
    block_context: bool = False
    judged_slots: torch.Tensor | None = None
    block_probs: torch.Tensor | None = None
    question_features: torch.Tensor | None = None


def _key_bias(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool -> (B, 1, 1, L) additive bias; `finfo.min` rather than -inf so no row can turn into NaN."""
    return torch.where(key_valid, key_valid.new_zeros((), dtype=dtype), torch.finfo(dtype).min)[:, None, None, :]


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
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The CPU flash-attention kernel behind SDPA, which also returns the row log-sum-exp; `None` off CPU.

    `key_valid` (`(batch, length)`, or `None` when every key is real) becomes the additive key bias only when the
    kernel runs: elsewhere the bias would be two kernels for nothing.
    """
    fused = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused is None or query.device.type != "cpu":
        return None
    bias = None if key_valid is None else _key_bias(key_valid, query.dtype)
    output, lse = fused(query, key, value, 0.0, False, attn_mask=bias, scale=scaling)
    return output, lse.float()


class _RowLogSumExp(torch.autograd.Function):
    """`lse_i = log sum_j exp(scale * q_i . k_j + bias_j)` with its exact gradient, in O(L * d) memory.

    With `P = softmax(S)` an upstream gradient `g_i` on `lse_i` gives `dL/dq_i = scale * g_i * (P K)_i` and
    `dL/dk = scale * P^T (g * Q)`. Both come from one fused SDPA call with `V = K`: its output is `P K`, and its
    gradient with respect to V for the output gradient `g * Q` is `P^T (g * Q)`. So the L x L probabilities are
    never stored, as in flash attention.
    """

    @staticmethod
    def forward(ctx, query, key, key_valid, scaling: float):
        ctx.save_for_backward(query, key, key_valid)
        ctx.scaling = scaling
        return _logsumexp_no_grad(query, key, key_valid, scaling)

    @staticmethod
    def backward(ctx, grad_lse):
        query, key, key_valid = ctx.saved_tensors
        scaling = ctx.scaling
        with torch.enable_grad():
            values = key.detach().requires_grad_(True)
            probs_times_keys = nn.functional.scaled_dot_product_attention(
                query.detach(), key.detach(), values, attn_mask=_key_bias(key_valid, query.dtype), scale=scaling
            )  # (B, H, L, d) = P K
            (transposed,) = torch.autograd.grad(
                probs_times_keys, values, grad_outputs=(grad_lse[..., None] * query.float()).to(query.dtype)
            )  # P^T (g * Q)
        grad_query = scaling * grad_lse[..., None] * probs_times_keys.float()
        return grad_query.to(query.dtype), (scaling * transposed.float()).to(key.dtype), None, None


def _logsumexp_no_grad(
    query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor, scaling: float
) -> torch.Tensor:
    with torch.no_grad():
        fused = _cpu_flash_attention(query, key, key, key_valid, scaling)
        if fused is not None:
            return fused[1]
        batch, heads, length, _ = query.shape
        bias = _key_bias(key_valid, torch.float32)  # (B, 1, 1, L)
        rows = max(1, LOGSUMEXP_CHUNK_SCORES // max(1, batch * heads * length))
        keys = (key.float() * scaling).transpose(-1, -2)  # (B, H, d, L), scaled once rather than every chunk
        chunks = [
            torch.logsumexp(torch.matmul(chunk.float(), keys).add_(bias), dim=-1) for chunk in query.split(rows, dim=2)
        ]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


def row_logsumexp(query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """log sum_j exp(q_i . k_j * scale) over the valid keys, (B, H, L) float32; differentiable when the inputs are.

    On CPU the fused flash kernel returns it in O(L * d) memory; elsewhere query rows are processed in chunks so the
    L x L scores never exist at once.
    """
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return _RowLogSumExp.apply(query, key, key_valid, scaling)
    return _logsumexp_no_grad(query, key, key_valid, scaling)


@dataclass
class JudgedBlocks:
    """The tokens of the blocks a predictor judges, gathered once from the `(batch, heads, length, ...)` layout.

    Attributes:
        valid (`torch.BoolTensor` of shape `(N, block_size)`): real tokens of the block (a last block the sequence
            does not fill repeats its last position in the gathered tensors; those slots are not valid).
        query, key (`torch.Tensor` of shape `(N, heads, block_size, head_dim)`, float32): the blocks' queries and keys.
        lse (`torch.Tensor` of shape `(N, heads, block_size)`, float32): their rows' log-sum-exp, `+inf` on invalid
            rows so that every probability of such a row is exactly 0.
    """

    valid: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    lse: torch.Tensor

    @classmethod
    def gather(
        cls,
        blocks: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        lse: torch.Tensor,
        key_valid: torch.Tensor,
        block_size: int,
    ) -> JudgedBlocks:
        """`blocks`: `(N, 2)` (row, block) pairs, e.g. `mask.nonzero()`; the rest as `(batch, heads, length, ...)`
        and `key_valid` `(batch, length)`."""
        length = key_valid.shape[1]
        offsets = torch.arange(block_size, device=blocks.device)
        positions = blocks[:, 1:] * block_size + offsets  # (N, bs)
        rows = blocks[:, :1]  # (N, 1)
        clamped = positions.clamp(max=length - 1)
        valid = key_valid[rows, clamped] & (positions < length)
        block_lse = take_positions(lse, rows, clamped).masked_fill(~valid[:, None, :], float("inf"))
        return cls(valid, take_positions(query, rows, clamped), take_positions(key, rows, clamped), block_lse)

    @classmethod
    def every_slot(
        cls,
        query: torch.Tensor,
        key: torch.Tensor,
        lse: torch.Tensor,
        key_valid: torch.Tensor,
        block_size: int,
        slots: int,
    ) -> JudgedBlocks:
        """Every slot's block, `N = batch * slots` in row-major order, by padding and reshaping instead of indexing:
        the same values as `gather` on all `(row, slot)` pairs, with no index tensor to build."""
        pad = slots * block_size - key_valid.shape[1]

        def per_slot(tensor: torch.Tensor) -> torch.Tensor:  # (B, H, L, ...) -> (B * S, H, bs, ...), float32
            padding = [0, 0] * (tensor.dim() - 3) + [0, pad]
            blocked = nn.functional.pad(tensor, padding).unflatten(2, (slots, block_size))  # (B, H, S, bs, ...)
            return blocked.transpose(1, 2).flatten(0, 1).float()

        valid = nn.functional.pad(key_valid, (0, pad)).view(-1, block_size)  # (B * S, bs)
        block_lse = per_slot(lse).masked_fill(~valid[:, None, :], float("inf"))
        return cls(valid, per_slot(query), per_slot(key), block_lse)


def take_positions(tensor: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`(batch, heads, length, ...)` at `(N, 1)` rows and `(N, P)` positions -> `(N, heads, P, ...)`, float32."""
    return tensor[rows, :, positions].transpose(1, 2).float()


def judged_block_probabilities(blocks: JudgedBlocks, scaling: float) -> torch.Tensor:
    """Attention probabilities of each judged block's own bs x bs square, from the rows' log-sum-exp:

        P[i, j] = exp(q_i . k_j * scale + mask_j - logsumexp_j'(q_i . k_j' * scale + mask_j'))

    Only the judged blocks are computed: padding, filler and protected blocks cost nothing. Rows of invalid
    queries are zero, so what a block's image holds never depends on how its row was padded. Differentiable when
    the inputs of `JudgedBlocks.gather` are (through the gathers and `row_logsumexp`).

    Returns:
        `torch.Tensor` of shape `(N, heads, block_size, block_size)`, float32.
    """
    scores = torch.matmul(blocks.query, blocks.key.transpose(-1, -2))  # (N, H, bs, bs)
    key_bias = _key_bias(blocks.valid, torch.float32)  # (N, 1, 1, bs)
    # In place: the matmul's backward needs only its inputs, exp's only its result.
    return scores.mul_(scaling).add_(key_bias).sub_(blocks.lse[..., None]).exp_()


def block_question_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    key_valid: torch.Tensor,
    question_valid: torch.Tensor,
    block_size: int,
    scaling: float,
) -> torch.Tensor:
    """Per block and head, how much attention flows between the block and the question, without gradient.

    `to_question[b, s, h]`: mean over the block's real tokens of the probability mass they put on the question
    tokens; `from_question[b, s, h]`: mean over the question tokens of the mass they put on the block. Only the
    question rows and columns of the attention are computed, O(length x question x head_dim) per head, on the
    `(batch, heads, length, ...)` layout as it is: a handful of batched kernels, where gathering the judged blocks
    first cost twice as long at batch 1 (the question features are what the question-only predictors read, so
    their few kernels are the predictor's whole input cost).

    Args:
        query, key (`torch.Tensor` of shape `(batch, heads, length, head_dim)`).
        lse (`torch.Tensor` of shape `(batch, heads, length)`): log-sum-exp of every query row over the valid keys.
        key_valid (`torch.BoolTensor` of shape `(batch, length)`): real tokens.
        question_valid (`torch.BoolTensor` of shape `(batch, width)`): the question tokens, all among the first
            `width <= length` positions.
        block_size (`int`): tokens per block; a last block the sequence does not fill is averaged over its real
            tokens.

    Returns:
        `torch.Tensor` of shape `(batch, ceil(length / block_size), 2 * heads)`, float32: `to_question` for every
        head, then `from_question`; 0 for a block without real tokens.
    """
    with torch.no_grad():
        heads, width = query.shape[1], question_valid.shape[1]
        query, key = query.float(), key.float()
        question = question_valid.float()  # (B, W)
        question_mean = question / question.sum(dim=1, keepdim=True).clamp_(min=1)  # (B, W)
        # A real key's score never exceeds its row's log-sum-exp; the clamp keeps padding keys, zeroed below, finite.
        # Rows of every token, columns of the question: (B, H, L, W), summed over the question.
        scores = torch.matmul(query, key[:, :, :width].transpose(-1, -2) * scaling)
        probs = scores.sub_(lse[..., None]).clamp_(max=0.0).exp_()
        to_question = torch.matmul(probs, question[:, None, :, None])[..., 0]  # (B, H, L)
        # Rows of the question, columns of every token: (B, H, W, L), averaged over the question.
        scores = torch.matmul(query[:, :, :width] * scaling, key.transpose(-1, -2))
        probs = scores.sub_(lse[:, :, :width, None]).clamp_(max=0.0).exp_()
        from_question = torch.matmul(question_mean[:, None, None, :], probs)[:, :, 0]  # (B, H, L)
        token = key_valid.float()  # (B, L)
        # Per-token values of real tokens and the token count itself, summed per block in one reduction.
        per_token = torch.cat([to_question, from_question, token[:, None]], dim=1) * token[:, None]  # (B, 2H+1, L)
        pad = -key_valid.shape[1] % block_size
        sums = nn.functional.pad(per_token, (0, pad)).unflatten(-1, (-1, block_size)).sum(dim=-1)  # (B, 2H+1, S)
        to_block = sums[:, :heads] / sums[:, -1:].clamp(min=1)  # mean over the block's real tokens
        return torch.cat([to_block, sums[:, heads:-1]], dim=1).transpose(1, 2)  # (B, S, 2H)


def block_context_features(
    masses: torch.Tensor,
    key_valid: torch.Tensor,
    question_valid: torch.Tensor,
    judged: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Each block's question masses in context: relative to uniform attention, to its neighbours, to the best block.

    A linear predictor of the raw masses judges every block on its own, against a fixed scale; but the masses shrink
    as the window grows (a token spreads its attention over more keys) and whether a block is the one the question
    asks about depends on the others. So each block is described by four groups of 2 x heads numbers:

    1. `r = log(mass / uniform mass)`, where under uniform attention a token puts `q / n` of its mass on the `q`
       question tokens and a question token puts `m / n` on a block of `m` real tokens (`n` real tokens in all);
    2. `r` of the block before it and 3. of the block after it (0 where that is not a judged block);
    4. `r` minus its maximum over the row's judged blocks.

    On SQuAD v1.1 dev after layer 1 of MiniLM this raises the answer-free blocks a linear classifier rejects at 97 %
    answer-block recall from 22 % to 31 % (`benchmarks/predictor_probe.py`, benchmarks/EXPERIMENTS.md).

    Args:
        masses (`torch.Tensor` of shape `(batch, slots, 2 * heads)`): `block_question_attention`.
        key_valid (`torch.BoolTensor` of shape `(batch, length)`): real tokens, `length <= slots * block_size`.
        question_valid (`torch.BoolTensor` of shape `(batch, width)`): the question tokens.
        judged (`torch.BoolTensor` of shape `(batch, slots)`): the blocks being judged (passage blocks present).
        block_size (`int`).

    Returns:
        `torch.Tensor` of shape `(batch, slots, 8 * heads)`, float32.
    """
    with torch.no_grad():
        batch, slots, width = masses.shape
        pad = slots * block_size - key_valid.shape[1]
        block_tokens = nn.functional.pad(key_valid, (0, pad)).view(batch, slots, block_size).sum(dim=-1)  # (B, S)
        questions = question_valid.sum(dim=1, keepdim=True).expand(-1, slots)  # (B, S)
        # The uniform masses q / n and m / n for every slot at once; a slot without tokens (m = 0) is never judged,
        # so clamping its count to 1 only keeps its unused ratio finite.
        counts = torch.stack([questions, block_tokens], dim=-1).clamp_(min=1)  # (B, S, 2)
        uniform = counts / block_tokens.sum(dim=1)[:, None, None]  # (B, S, 2)
        ratio = (masses.float().view(batch, slots, 2, width // 2) / uniform[..., None]).clamp_(min=1e-6).log_()
        return neighbour_context(ratio.view(batch, slots, width), judged)


def neighbour_context(values: torch.Tensor, judged: torch.Tensor) -> torch.Tensor:
    """`(batch, slots, F)` -> `(batch, slots, 4F)`: each slot's values, those of the slots before and after it (0
    where that slot is not judged) and the values minus their maximum over the row's judged slots."""
    judged = judged[..., None]  # (B, S, 1)
    # One padded copy gives both neighbours: slot s - 1 at index s, slot s + 1 at index s + 2.
    padded = nn.functional.pad(values * judged, (0, 0, 1, 1))  # (B, S + 2, F)
    best = torch.where(judged, values, -1e4).amax(dim=1, keepdim=True)  # (B, 1, F)
    return torch.cat([values, padded[:, :-2], padded[:, 2:], values - best], dim=-1)


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
        if probe.key_valid is None or (probe.judged_blocks is None and probe.judged_slots is None):
            raise ValueError(
                "AttentionProbe.key_valid and judged_blocks or judged_slots are required with block_size."
            )
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if probe.implementation == "sdpa" and not needs_grad and dropout == 0.0:
            # At inference the fused kernel yields the output and the log-sum-exp in one pass. Without an attention
            # mask every key is real, and a zero bias would change no bit of either, only cost two kernels.
            key_valid = None if attention_mask is None else probe.key_valid
            fused = _cpu_flash_attention(query, key, value, key_valid, scaling)
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
        judged = probe.judged_blocks
        if probe.diagonal_block:
            if judged is None:
                slots = probe.judged_slots.shape[1]
                blocks = JudgedBlocks.every_slot(query, key, lse, probe.key_valid, probe.block_size, slots)
            else:
                blocks = JudgedBlocks.gather(judged, query, key, lse, probe.key_valid, probe.block_size)
            probe.block_probs = judged_block_probabilities(blocks, scaling)
        if probe.question_valid is not None:
            per_block = block_question_attention(
                query, key, lse, probe.key_valid, probe.question_valid, probe.block_size, scaling
            )  # (B, S, 2H)
            if probe.block_context:
                if probe.judged_slots is None:
                    raise ValueError("AttentionProbe.judged_slots is required with block_context.")
                per_block = block_context_features(
                    per_block, probe.key_valid, probe.question_valid, probe.judged_slots, probe.block_size
                )  # (B, S, 8H)
            probe.question_features = (
                per_block.flatten(0, 1) if judged is None else per_block[judged[:, 0], judged[:, 1]]
            )
    return output, None


AttentionInterface.register(BLOCKSKIM_ATTENTION, blockskim_attention_forward)
