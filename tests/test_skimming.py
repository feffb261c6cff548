"""The pure tensor operations: protection, block labels, keep decisions, compaction and scattering back."""

from dataclasses import replace

import torch

from modeling_blockskim.skimming_blockskim import (
    IGNORE_INDEX,
    SkimState,
    answer_block_labels,
    any_per_block,
    compact,
    keep_decision,
    protected_token_mask,
    scatter_to_input,
    to_original_blocks,
    used_lengths,
)

SEP = 9


def test_protected_tokens_are_cls_question_and_separators_for_bert_layout():
    #                 CLS  q   q  SEP  c  c  c  SEP pad
    ids = torch.tensor([[1, 5, 6, SEP, 7, 7, 7, SEP, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    protected = protected_token_mask(ids, valid, SEP)
    assert protected.int().tolist() == [[1, 1, 1, 1, 0, 0, 0, 1, 0]]


def test_protected_tokens_cover_the_double_separator_of_roberta_layout():
    #                  <s> q  </s></s> c  c </s>
    ids = torch.tensor([[0, 5, SEP, SEP, 7, 7, SEP]])
    valid = torch.ones_like(ids, dtype=torch.bool)
    assert protected_token_mask(ids, valid, SEP).int().tolist() == [[1, 1, 1, 1, 0, 0, 1]]


def test_row_without_separator_is_protected_entirely():
    ids = torch.tensor([[1, 5, 6, 7]])
    valid = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert protected_token_mask(ids, valid, SEP).int().tolist() == [[1, 1, 1, 0]]


def _labels(start, end, valid_length, protected_until, length=16, block_size=4):
    valid = (torch.arange(length) < valid_length)[None]
    protected = (torch.arange(length) <= protected_until)[None] & valid
    protected[0, valid_length - 1] = True  # final separator
    return answer_block_labels(torch.tensor([start]), torch.tensor([end]), valid, protected, block_size)[0].tolist()


def test_single_token_answer_makes_its_block_positive():
    # blocks: [0-3] question, [4-7], [8-11], [12-15] holds the final separator -> excluded
    assert _labels(start=9, end=9, valid_length=16, protected_until=3) == [IGNORE_INDEX, 0, 1, IGNORE_INDEX]


def test_answer_crossing_a_block_boundary_makes_both_blocks_positive():
    assert _labels(start=7, end=8, valid_length=16, protected_until=3) == [IGNORE_INDEX, 1, 1, IGNORE_INDEX]


def test_question_and_padding_blocks_are_excluded_from_the_skim_loss():
    # valid length 10: block [8-11] holds the final separator, block [12-15] is pure padding
    assert _labels(start=5, end=6, valid_length=10, protected_until=4) == [
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
        IGNORE_INDEX,
    ]
    assert _labels(start=5, end=6, valid_length=14, protected_until=2) == [IGNORE_INDEX, 1, 0, IGNORE_INDEX]


def test_answer_at_cls_or_outside_the_window_gives_only_negative_passage_blocks():
    assert _labels(start=0, end=0, valid_length=16, protected_until=3) == [IGNORE_INDEX, 0, 0, IGNORE_INDEX]
    assert _labels(start=16, end=16, valid_length=16, protected_until=3) == [IGNORE_INDEX, 0, 0, IGNORE_INDEX]


def test_keep_decision_keeps_protected_and_drops_padding_blocks():
    wanted = torch.tensor([[False, True, False, True]])
    protected = torch.tensor([[True, False, False, False]])
    valid = torch.tensor([[True, True, True, False]])
    assert keep_decision(wanted, protected, valid).tolist() == [[True, True, False, False]]


def _state(batch=2, blocks=4, block_size=2, hidden=3):
    hidden_states = torch.arange(batch * blocks * block_size * hidden, dtype=torch.float32).view(batch, -1, hidden)
    token_valid = torch.ones(batch, blocks * block_size, dtype=torch.bool)
    token_valid[1, -3:] = False  # row 1: last block padding, block 2 half padding
    block_ids = torch.arange(blocks).expand(batch, blocks)
    protected = torch.zeros(batch, blocks, dtype=torch.bool)
    protected[:, 0] = True
    return SkimState(hidden_states, token_valid, block_ids, protected)


def test_compact_keeps_blocks_in_original_order_and_masks_fillers():
    state = _state()
    keep = torch.tensor([[True, False, True, True], [True, False, False, False]])
    new = compact(state, keep)
    assert new.block_ids.tolist() == [[0, 2, 3], [0, 1, 2]]
    assert new.hidden_states.shape == (2, 6, 3)
    # Row 0 holds the original tokens of blocks 0, 2, 3.
    assert torch.equal(new.hidden_states[0], state.hidden_states[0, [0, 1, 4, 5, 6, 7]])
    # Row 1 keeps one block; the two filler slots are invalid whatever they contain.
    assert new.token_valid.tolist()[1] == [True, True, False, False, False, False]
    assert new.block_protected.tolist() == [[True, False, False], [True, False, False]]


def test_compact_moves_the_token_ids_with_their_tokens():
    state = _state()
    ids = torch.arange(100, 116).view(2, 8)
    new = compact(replace(state, input_ids=ids), torch.tensor([[True, False, True, True], [True, False, True, False]]))
    assert new.input_ids[0].tolist() == [100, 101, 104, 105, 106, 107]
    assert new.input_ids[1, :4].tolist() == [108, 109, 112, 113]  # the rest are fillers, never compared


def test_scatter_to_input_restores_positions_and_fills_skimmed_ones():
    state = _state()
    keep = torch.tensor([[True, False, True, False], [True, True, False, False]])
    new = compact(state, keep)
    values = new.token_positions().float()  # each slot's own original position
    out = scatter_to_input(values, new, num_blocks=4, length=7, fill=-1.0)
    assert out.tolist() == [
        [0.0, 1.0, -1.0, -1.0, 4.0, 5.0, -1.0],
        [0.0, 1.0, 2.0, 3.0, -1.0, -1.0, -1.0],
    ]


def test_compact_moves_the_question_tokens_with_their_block_past_dropped_padding():
    # Row 1 is left-padded: block 0 is padding, its question sits in block 1 and must move to the front.
    state = _state()
    question = torch.zeros(2, 8, dtype=torch.bool)
    question[0, :2] = True
    question[1, 2:4] = True
    state = replace(state, question_tokens=question, question_width=4)
    keep = torch.tensor([[True, True, True, False], [False, True, True, False]])
    new = compact(state, keep)
    assert new.compacted and new.question_width == 4
    assert new.question_tokens.tolist() == [
        [True, True, False, False, False, False],
        [True, True, False, False, False, False],
    ]


def test_compact_fillers_never_carry_protection_or_question_tokens():
    # A caller's keep pattern may drop a protected block (the model's never does): the filler slot it turns into
    # must be neither protected nor a question, so no later predictor or question feature reads it.
    state = _state()
    question = torch.zeros(2, 8, dtype=torch.bool)
    question[:, :2] = True
    state = replace(state, question_tokens=question, question_width=2)
    keep = torch.tensor([[True, True, True, True], [False, True, True, False]])
    new = compact(state, keep)
    assert new.block_ids.tolist() == [[0, 1, 2, 3], [1, 2, 0, 3]]
    assert new.block_protected.tolist() == [[True, False, False, False], [False, False, False, False]]
    assert new.token_valid[1].tolist() == [True, True, True, False, False, False, False, False]
    assert not new.question_tokens[1].any()
    assert new.length == 8  # row 0 keeps all 8 tokens; row 1 holds 3 real tokens, then fillers


def test_used_lengths_are_the_last_marked_position_of_each_mask_in_any_row_with_the_first_masks_count():
    tokens = torch.tensor([[True, True, True, False, False], [True, True, False, False, False]])
    question = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    assert used_lengths(tokens, question) == ([3, 2], 5)  # 5 < 2 rows x 3: some row is padded before position 3
    assert used_lengths(torch.zeros(2, 5, dtype=torch.bool)) == ([1], 0)  # at least one position
    assert used_lengths(tokens[:, :2]) == ([2], 4)  # every row real up to its used length: no key mask needed


def test_scatter_to_input_of_an_uncompacted_state_only_fills_padding_and_the_tail():
    state = _state()
    assert compact(state, state.block_valid) is state and not state.compacted
    values = torch.arange(8, dtype=torch.float32)[None, :, None].expand(2, 8, 1)
    out = scatter_to_input(values, state, num_blocks=5, length=10, fill=-1.0)
    # The general path (the same positions put back by a scatter) gives the same result.
    general = scatter_to_input(values, replace(state, compacted=True), num_blocks=5, length=10, fill=-1.0)
    assert torch.equal(out, general)
    assert out[1, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, -1.0, -1.0, -1.0, -1.0, -1.0]


def test_to_original_blocks_places_slot_values_at_their_block():
    values = torch.tensor([[10.0, 30.0], [20.0, 0.0]])
    block_ids = torch.tensor([[1, 3], [2, 0]])
    assert to_original_blocks(values, block_ids, 4, fill=-1.0).tolist() == [
        [-1.0, 10.0, -1.0, 30.0],
        [0.0, -1.0, 20.0, -1.0],
    ]


def test_any_per_block():
    mask = torch.tensor([[0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert any_per_block(mask, 2).tolist() == [[False, True, False]]
