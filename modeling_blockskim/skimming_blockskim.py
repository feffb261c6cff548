"""Pure tensor operations of Block-Skim: which blocks are protected, labelled, kept, and how a batch shrinks.

Everything here works on whole batches without Python loops over examples or tokens, and never lets one example
influence another (REFERENCE section 3):

1. padding is never counted or kept (the layers stop at the last real token; only the block bookkeeping is
   padded to a multiple of the block size);
2. `keep = (P(keep) >= tau) | protected`, then `keep &= valid`; protected blocks hold [CLS], the question or a
   separator;
3. `compact` moves each row's kept blocks to the front in their original order, slices to the batch maximum and
   marks the slots past a row's own count as invalid fillers, which attention then masks;
4. `scatter_to_input` puts per-position results back at the input positions; everything skimmed gets a fill value.

Travels with every checkpoint as remote code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

IGNORE_INDEX = -100
"""Block label of blocks that do not enter the skim loss: protected, padding, or absent."""


def question_token_mask(input_ids: torch.Tensor, token_valid: torch.Tensor, sep_token_id: int) -> torch.Tensor:
    """Everything up to the end of the first run of separators: [CLS], the question and its separator(s).

    A row without a separator is all question.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, length)`).
        token_valid (`torch.BoolTensor` of shape `(batch, length)`): real tokens (the attention mask).
        sep_token_id (`int`).

    Returns:
        `torch.BoolTensor` of shape `(batch, length)`.
    """
    is_sep = (input_ids == sep_token_id) & token_valid  # (B, L)
    from_first_sep = is_sep.cumsum(dim=1) > 0  # (B, L)
    # The question ends at the first token after the first separator that is not a separator itself.
    return ((from_first_sep & ~is_sep).cumsum(dim=1) == 0) & token_valid


def protected_token_mask(
    input_ids: torch.Tensor, token_valid: torch.Tensor, sep_token_id: int, question_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Tokens that are never skimmed: everything up to the end of the first run of separators, and every separator.

    For `[CLS] question [SEP] context [SEP]` (BERT, ELECTRA) and `<s> question </s></s> context </s>` (RoBERTa)
    this is the [CLS] token, the question and the separators. A row without a separator is protected entirely.
    Arguments and result as for `question_token_mask`; `question_tokens` is its result when the caller has it.
    """
    is_sep = (input_ids == sep_token_id) & token_valid
    if question_tokens is None:
        question_tokens = question_token_mask(input_ids, token_valid, sep_token_id)
    return question_tokens | is_sep


def any_per_block(token_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """(batch, length) bool -> (batch, length // block_size) bool: does the block hold any such token."""
    return token_mask.unflatten(1, (-1, block_size)).any(dim=-1)


def answer_block_labels(
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
    token_valid: torch.Tensor,
    protected_tokens: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Skim-loss targets per block: 1 = holds at least one answer token, 0 = passage without answer, -100 = ignore.

    Unlike the original code, one answer token suffices (single-token answers and answers crossing a block
    boundary label every block they touch), and [CLS], question, separator and padding blocks are excluded rather
    than labelled "skim". An answer at [CLS] (unanswerable question, or a window without the answer) or outside the
    sequence makes every passage block negative.

    Args:
        start_positions, end_positions (`torch.LongTensor` of shape `(batch,)`): inclusive token span.
        token_valid, protected_tokens (`torch.BoolTensor` of shape `(batch, length)`), `length` a multiple of
            `block_size`.

    Returns:
        `torch.LongTensor` of shape `(batch, length // block_size)`.
    """
    length = token_valid.shape[1]
    positions = torch.arange(length, device=token_valid.device)[None, :]  # (1, L)
    start = start_positions.reshape(-1, 1)  # (B, 1)
    end = end_positions.reshape(-1, 1)  # (B, 1)
    passage = token_valid & ~protected_tokens  # (B, L)
    answer_tokens = (positions >= start) & (positions <= end) & (start < length) & passage  # (B, L)
    labels = any_per_block(answer_tokens, block_size).long()  # (B, K)
    labelled = any_per_block(passage, block_size) & ~any_per_block(protected_tokens, block_size)  # (B, K)
    return labels.masked_fill(~labelled, IGNORE_INDEX)


@dataclass
class SkimState:
    """The shrinking sequence between layers; slot s of row b holds original block `block_ids[b, s]`.

    The hidden states stop at the last position any row still uses (`length`), not at a whole number of blocks:
    the tail of the last block would be padding that every layer computes for nothing (about 8% of a SQuAD window).
    Block bookkeeping (`token_valid`, `block_*`) covers whole slots; positions past `length` are invalid.

    Attributes:
        hidden_states (`torch.Tensor` of shape `(batch, length, hidden)`), `length <= slots * block_size`.
        token_valid (`torch.BoolTensor` of shape `(batch, slots * block_size)`): real, still present tokens; padding
            and filler slots are `False` and are masked as attention keys.
        block_ids (`torch.LongTensor` of shape `(batch, slots)`): original block index of each slot.
        block_protected (`torch.BoolTensor` of shape `(batch, slots)`).
        question_tokens (`torch.BoolTensor` of shape `(batch, slots * block_size)`, *optional*): the question
            tokens, tracked when predictors read the block-question attention; they sit in protected blocks, which
            compaction keeps but may move forward (past dropped padding blocks of a left-padded row).
        question_width (`int`): the question tokens lie in the first `question_width` positions; compaction only
            moves them forward, so the bound holds.
        input_ids (`torch.LongTensor` of shape `(batch, slots * block_size)`, *optional*): the token ids, tracked
            when predictors compare tokens (`TokenMatcher`); ids of invalid positions are meaningless.
        compacted (`bool`): some block was dropped, so slots no longer sit at their original positions.
        keys_all_valid (`bool`): every position the layers run on is a real token in every row, so attention needs
            no key mask; known when the length is, without another host synchronisation.
    """

    hidden_states: torch.Tensor
    token_valid: torch.Tensor
    block_ids: torch.Tensor
    block_protected: torch.Tensor
    question_tokens: torch.Tensor | None = None
    question_width: int = 0
    input_ids: torch.Tensor | None = None
    compacted: bool = False
    keys_all_valid: bool = False

    @property
    def length(self) -> int:
        """Positions the layers run on."""
        return self.hidden_states.shape[1]

    @property
    def layer_token_valid(self) -> torch.Tensor:
        """(batch, length) bool: `token_valid` over the positions the layers run on."""
        return self.token_valid[:, : self.length]

    @property
    def block_valid(self) -> torch.Tensor:
        """(batch, slots) bool: slot holds a block with at least one real token."""
        return any_per_block(self.token_valid, self.block_size)

    @property
    def block_size(self) -> int:
        return self.token_valid.shape[1] // self.block_ids.shape[1]

    def token_positions(self) -> torch.Tensor:
        """(batch, slots * block_size) original position of every token slot."""
        offsets = torch.arange(self.block_size, device=self.block_ids.device)  # (bs,)
        return (self.block_ids[:, :, None] * self.block_size + offsets).flatten(1)


def used_lengths(*token_masks: torch.Tensor) -> tuple[list[int], int]:
    """For each `(batch, length)` mask, the positions up to its last marked token in any row (at least 1), and how
    many positions the first mask marks in all.

    What the layers must run on (for the real tokens), how far the question reaches, and whether every row is real up
    to its used length (`batch * length` real tokens: attention then needs no key mask). The masks share one shape,
    and one host synchronisation serves all of it: on a GPU each synchronisation stalls the launch queue.
    """
    positions = torch.arange(1, token_masks[0].shape[1] + 1, device=token_masks[0].device)  # (L,)
    masks = torch.stack(token_masks) if len(token_masks) > 1 else token_masks[0][None]  # a view: no copy for one
    last = (masks * positions).amax(dim=(1, 2))  # (masks,)
    *values, marked = torch.cat([last, token_masks[0].sum().reshape(1)]).tolist()
    return [max(value, 1) for value in values], marked


def keep_decision(wanted: torch.Tensor, block_protected: torch.Tensor, block_valid: torch.Tensor) -> torch.Tensor:
    """`keep = (wanted | protected) & valid`, shapes `(batch, slots)`; `wanted` is usually `P(keep) >= tau`."""
    return (wanted | block_protected) & block_valid


def compact(state: SkimState, keep: torch.Tensor) -> SkimState:
    """Physically remove the blocks not kept: gather each row's kept blocks to the front, in original order.

    The result is as long as the row that keeps most tokens; shorter rows end in filler slots whose tokens are
    marked invalid, so attention masks them and no row's result depends on the others. Two host synchronisations
    (whether anything is dropped; the new length, with whether any row has fillers) are inherent to a dynamic shape.

    Args:
        state (`SkimState`): the current sequence.
        keep (`torch.BoolTensor` of shape `(batch, slots)`): blocks to keep (already restricted to valid ones).

    Returns:
        `SkimState` with `ceil(length / block_size)` slots, `length` the new last used position.
    """
    if torch.equal(keep, state.block_valid):
        return state  # nothing dropped anywhere: the common case at batch 1, in one kernel and sync
    block_size = state.block_size
    # Stable sort on "not kept" puts kept blocks first, each group in its current (= original) order; the dropped
    # blocks behind them become the fillers, so their tokens are made invalid before they move.
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # (B, S)
    offsets = torch.arange(block_size, device=keep.device)  # (bs,)
    token_index = (order[:, :, None] * block_size + offsets).flatten(1)  # (B, S * bs)
    keep_tokens = keep.repeat_interleave(block_size, dim=1)  # (B, S * bs)
    token_valid = (state.token_valid & keep_tokens).gather(1, token_index)
    (length,), real_tokens = used_lengths(token_valid)
    new_slots = -(-length // block_size)
    tokens = new_slots * block_size
    order, token_index, token_valid = order[:, :new_slots], token_index[:, :tokens], token_valid[:, :tokens]
    # Positions past the current length hold no real token; any index there is masked, so clamp it.
    hidden_index = token_index[:, :length].clamp(max=state.length - 1)  # (B, length)
    hidden = state.hidden_states.gather(1, hidden_index[:, :, None].expand(-1, -1, state.hidden_states.shape[-1]))
    question, input_ids = state.question_tokens, state.input_ids
    return replace(
        state,
        hidden_states=hidden,
        token_valid=token_valid,
        block_ids=state.block_ids.gather(1, order),
        block_protected=(state.block_protected & keep).gather(1, order),
        question_tokens=None if question is None else (question & keep_tokens).gather(1, token_index),
        input_ids=None if input_ids is None else input_ids.gather(1, token_index),
        compacted=True,
        keys_all_valid=real_tokens == keep.shape[0] * length,
    )


def to_original_blocks(values: torch.Tensor, block_ids: torch.Tensor, num_blocks: int, fill: float) -> torch.Tensor:
    """Place per-slot values `(batch, slots, ...)` at their original block index `(batch, num_blocks, ...)`."""
    shape = (values.shape[0], num_blocks, *values.shape[2:])
    out = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    index = block_ids.reshape(*block_ids.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return out.scatter(1, index, values)


def scatter_to_input(
    values: torch.Tensor, state: SkimState, num_blocks: int, length: int, fill: float
) -> torch.Tensor:
    """Put per-position values `(batch, state.length, ...)` back at the input positions `(batch, length, ...)`.

    Invalid slots (padding, fillers) and every position that was skimmed get `fill`. Slot positions are distinct
    within a row, so the scatter is deterministic.

    Args:
        values (`torch.Tensor` of shape `(batch, state.length, ...)`).
        state (`SkimState`): the sequence the values were computed on.
        num_blocks (`int`): blocks of the input in original coordinates.
        length (`int`): the caller's sequence length (the block-padded input is cropped back to it).
    """
    trailing = [1] * (values.dim() - 2)
    token_valid = state.layer_token_valid
    values = values.masked_fill(~token_valid.reshape(*token_valid.shape, *trailing), fill)
    if not state.compacted:  # every position is where it started; only the tail past the used length is missing
        tail = length - state.length
        return nn.functional.pad(values, [0, 0] * len(trailing) + [0, tail], value=fill) if tail else values
    positions = state.token_positions()[:, : state.length]  # (B, length)
    out_shape = (values.shape[0], num_blocks * state.block_size, *values.shape[2:])
    out = torch.full(out_shape, fill, dtype=values.dtype, device=values.device)
    return out.scatter(1, positions.reshape(*positions.shape, *trailing).expand_as(values), values)[:, :length]
