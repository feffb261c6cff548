"""The "blockskim" attention function: the model's own attention output plus exact diagonal-block probabilities."""

import pytest
import torch
from torch import nn

from modeling_blockskim import attention_blockskim
from modeling_blockskim.attention_blockskim import (
    AttentionProbe,
    JudgedBlocks,
    block_context_features,
    block_question_attention,
    blockskim_attention_forward,
    judged_block_probabilities,
    neighbour_context,
    row_logsumexp,
)


def _qkv(batch=2, heads=3, length=24, head_dim=8, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, heads, length, head_dim, generator=generator) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def _reference_probabilities(query, key, key_valid, scaling, zero_invalid_queries=True):
    """Full softmax attention over the valid keys; rows of invalid queries are zero (the predictor never reads)."""
    scores = query @ key.transpose(-1, -2) * scaling
    scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)  # (B, H, L, L)
    return probs * key_valid[:, None, :, None] if zero_invalid_queries else probs


def _diagonal_blocks(probs, block_size):
    """(B, H, K, bs, bs) diagonal squares; a last block the sequence does not fill is zero-padded."""
    batch, heads, length, _ = probs.shape
    blocks = -(-length // block_size)
    pad = blocks * block_size - length
    probs = nn.functional.pad(probs, (0, pad, 0, pad))
    return torch.stack(
        [
            probs[:, :, k * block_size : (k + 1) * block_size, k * block_size : (k + 1) * block_size]
            for k in range(blocks)
        ],
        dim=2,
    )  # (B, H, K, bs, bs)


class _Module(nn.Module):
    is_causal = False


def _all_blocks(key_valid, block_size):
    """(N, 2) every block holding a valid token, row-major, as the model passes its judged blocks."""
    pad = -key_valid.shape[1] % block_size
    return nn.functional.pad(key_valid, (0, pad)).unflatten(1, (-1, block_size)).any(-1).nonzero()


def _probe(key_valid, block_size=8, judged=None, **kwargs):
    judged = _all_blocks(key_valid, block_size) if judged is None else judged
    return AttentionProbe("sdpa", block_size=block_size, key_valid=key_valid, judged_blocks=judged, **kwargs)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["fused-inference", "differentiable"])
def test_probe_returns_the_diagonal_blocks_of_the_softmax_attention(requires_grad):
    query, key, value = _qkv(requires_grad=requires_grad)
    key_valid = torch.ones(2, 24, dtype=torch.bool)
    key_valid[1, 19:] = False
    scaling = 8**-0.5
    judged = torch.tensor([[0, 0], [0, 2], [1, 1], [1, 2]])  # any subset of the blocks, e.g. passage blocks only
    probe = _probe(key_valid, judged=judged)
    mask = key_valid[:, None, None, :]  # the model's own mask always agrees with key_valid
    output, _ = blockskim_attention_forward(_Module(), query, key, value, mask, scaling=scaling, blockskim_probe=probe)

    reference = _diagonal_blocks(_reference_probabilities(query, key, key_valid, scaling), 8)  # (B, H, K, bs, bs)
    expected = reference[judged[:, 0], :, judged[:, 1]]  # (N, H, bs, bs)
    torch.testing.assert_close(probe.block_probs, expected, atol=1e-6, rtol=1e-5)
    attention = _reference_probabilities(query, key, key_valid, scaling, zero_invalid_queries=False)
    torch.testing.assert_close(output, (attention @ value).transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert probe.block_probs.requires_grad == requires_grad


@pytest.mark.parametrize("requires_grad", [False, True], ids=["fused-inference", "differentiable"])
def test_probe_handles_a_sequence_that_ends_inside_a_block(requires_grad):
    # The model runs its layers only up to the last real token, so the last block may be cut short.
    query, key, value = _qkv(length=21, requires_grad=requires_grad)
    key_valid = torch.ones(2, 21, dtype=torch.bool)
    key_valid[1, 17:] = False
    scaling = 8**-0.5
    probe = _probe(key_valid)
    blockskim_attention_forward(
        _Module(), query, key, value, key_valid[:, None, None, :], scaling=scaling, blockskim_probe=probe
    )
    expected = _diagonal_blocks(_reference_probabilities(query, key, key_valid, scaling), 8).transpose(1, 2)
    expected = expected.flatten(0, 1)  # (B * K, H, bs, bs): every block holds a real token here
    assert probe.block_probs.shape == (6, 3, 8, 8)
    torch.testing.assert_close(probe.block_probs, expected, atol=1e-6, rtol=1e-5)
    assert (probe.block_probs[5, :, 1:] == 0).all()  # row 1 has one real token in its last block
    if requires_grad:
        weights = torch.randn(6, 3, 8, 8)
        ours = torch.autograd.grad((probe.block_probs * weights).sum(), (query, key))
        want = torch.autograd.grad((expected * weights).sum(), (query, key))
        for got, reference in zip(ours, want, strict=True):
            torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probe_gradient_equals_autograd_through_the_full_softmax(dtype):
    query, key, _ = [t.to(dtype).requires_grad_(True) for t in _qkv(length=32)]
    key_valid = torch.ones(2, 32, dtype=torch.bool)
    key_valid[0, 27:] = False
    weights = torch.randn(8, 3, 8, 8)
    probe = _probe(key_valid)
    blockskim_attention_forward(_Module(), query, key, query, key_valid[:, None, None, :], blockskim_probe=probe)
    ours = torch.autograd.grad((probe.block_probs * weights).sum(), (query, key))
    reference = _diagonal_blocks(_reference_probabilities(query, key, key_valid, 8**-0.5), 8)
    reference = reference.transpose(1, 2).flatten(0, 1).float()  # (B * K, H, bs, bs)
    expected = torch.autograd.grad((reference * weights).sum(), (query, key))
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_probe_gradient_reaches_queries_and_keys():
    query, key, value = _qkv(requires_grad=True)
    probe = _probe(torch.ones(2, 24, dtype=torch.bool))
    blockskim_attention_forward(_Module(), query, key, value, None, blockskim_probe=probe)
    probe.block_probs.sum().backward()
    assert query.grad.abs().sum() > 0 and key.grad.abs().sum() > 0


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_without_probe_the_model_implementation_runs_unchanged(implementation):
    query, key, value = _qkv()
    mask = torch.ones(2, 1, 24, 24, dtype=torch.bool)
    mask[1, ..., 19:] = False
    output, weights = blockskim_attention_forward(
        _Module(), query, key, value, mask, blockskim_probe=AttentionProbe(implementation=implementation)
    )
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    torch.testing.assert_close(output, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)
    assert weights is None


def test_every_slot_holds_what_gathering_every_row_and_slot_pair_holds():
    # Inference reads every slot by reshaping; it must describe each block exactly as the indexed gather does, also
    # for a row that ends early and for a last slot the sequence (21 positions, 3 slots of 8) does not fill.
    query, key, _ = _qkv(length=21)
    key_valid = torch.ones(2, 21, dtype=torch.bool)
    key_valid[1, 10:] = False  # row 1: its last slot holds no real token at all
    lse = row_logsumexp(query, key, key_valid, 0.3)
    pairs = torch.cartesian_prod(torch.arange(2), torch.arange(3))  # (6, 2) row-major
    gathered = JudgedBlocks.gather(pairs, query, key, lse, key_valid, 8)
    every = JudgedBlocks.every_slot(query, key, lse, key_valid, 8, slots=3)
    assert torch.equal(every.valid, gathered.valid) and every.valid.sum() == 21 + 10
    assert torch.equal(every.lse, gathered.lse)
    # Positions past the sequence hold zeros here and a repeated last position there; neither is valid.
    for name in ("query", "key"):
        ours, theirs = getattr(every, name), getattr(gathered, name)
        assert ours.shape == theirs.shape == (6, 3, 8, 8)
        assert torch.equal(ours.transpose(1, 2)[every.valid], theirs.transpose(1, 2)[gathered.valid])
    # The same products on differently laid-out copies: equal up to the last bit of rounding.
    torch.testing.assert_close(
        judged_block_probabilities(every, 0.3), judged_block_probabilities(gathered, 0.3), atol=1e-6, rtol=1e-5
    )


def test_probe_without_judged_blocks_describes_every_slot_row_major():
    query, key, value = _qkv(length=21)
    key_valid = torch.ones(2, 21, dtype=torch.bool)
    key_valid[1, 17:] = False
    slots = torch.ones(2, 3, dtype=torch.bool)
    question = torch.zeros(2, 4, dtype=torch.bool)
    question[:, 1:3] = True
    outputs = {}
    for name, judged in (("pairs", slots.nonzero()), ("every slot", None)):
        probe = AttentionProbe(
            "sdpa",
            block_size=8,
            key_valid=key_valid,
            judged_blocks=judged,
            judged_slots=slots,
            question_valid=question,
        )
        blockskim_attention_forward(
            _Module(), query, key, value, key_valid[:, None, None, :], scaling=0.3, blockskim_probe=probe
        )
        outputs[name] = probe
    torch.testing.assert_close(outputs["every slot"].block_probs, outputs["pairs"].block_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        outputs["every slot"].question_features, outputs["pairs"].question_features, atol=0, rtol=0
    )
    with pytest.raises(ValueError, match="judged_blocks or judged_slots"):
        blockskim_attention_forward(
            _Module(),
            query,
            key,
            value,
            None,
            blockskim_probe=AttentionProbe("sdpa", block_size=8, key_valid=key_valid),
        )


@pytest.mark.parametrize("chunk_scores", [1 << 26, 2 * 3 * 21 * 5], ids=["one-chunk", "chunks-of-5-rows"])
def test_the_portable_path_a_gpu_takes_gives_the_same_probabilities_and_log_sum_exp(monkeypatch, chunk_scores):
    # Off CPU there is no fused kernel returning the log-sum-exp: it is computed apart, in chunks of query rows.
    query, key, value = _qkv(length=21)
    key_valid = torch.ones(2, 21, dtype=torch.bool)
    key_valid[1, 17:] = False
    fused_lse = row_logsumexp(query, key, key_valid, 0.3)
    fused = _probe(key_valid)
    blockskim_attention_forward(
        _Module(), query, key, value, key_valid[:, None, None, :], scaling=0.3, blockskim_probe=fused
    )
    monkeypatch.setattr(attention_blockskim, "_cpu_flash_attention", lambda *args: None)
    monkeypatch.setattr(attention_blockskim, "LOGSUMEXP_CHUNK_SCORES", chunk_scores)
    portable = _probe(key_valid)
    output, _ = blockskim_attention_forward(
        _Module(), query, key, value, key_valid[:, None, None, :], scaling=0.3, blockskim_probe=portable
    )
    lse = row_logsumexp(query, key, key_valid, 0.3)
    scores = (query @ key.transpose(-1, -2) * 0.3).masked_fill(~key_valid[:, None, None, :], float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, fused_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(portable.block_probs, fused.block_probs, atol=1e-6, rtol=1e-5)
    attention = _reference_probabilities(query, key, key_valid, 0.3, zero_invalid_queries=False)
    torch.testing.assert_close(output, (attention @ value).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_block_probabilities_sum_to_at_most_one_per_row():
    query, key, _ = _qkv()
    key_valid = torch.ones(2, 24, dtype=torch.bool)
    lse = torch.logsumexp(query @ key.transpose(-1, -2) * 0.3, dim=-1)
    blocks = JudgedBlocks.gather(_all_blocks(key_valid, 8), query, key, lse, key_valid, 8)
    probs = judged_block_probabilities(blocks, 0.3)
    assert probs.shape == (6, 3, 8, 8)
    assert (probs.sum(-1) <= 1 + 1e-6).all() and (probs >= 0).all()


def test_row_logsumexp_gradient_equals_autograd_through_the_full_scores():
    query, key, _ = [t.double().requires_grad_(True) for t in _qkv(length=20)]
    key_valid = torch.ones(2, 20, dtype=torch.bool)
    key_valid[1, 13:] = False
    weights = torch.randn(2, 3, 20, dtype=torch.float64)
    ours = torch.autograd.grad((row_logsumexp(query, key, key_valid, 0.4) * weights).sum(), (query, key))
    scores = (query @ key.transpose(-1, -2) * 0.4).masked_fill(~key_valid[:, None, None, :], float("-inf"))
    expected = torch.autograd.grad((torch.logsumexp(scores, dim=-1) * weights).sum(), (query, key))
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_block_question_attention_equals_the_question_rows_and_columns_of_the_softmax():
    query, key, value = _qkv(length=21)
    key_valid = torch.ones(2, 21, dtype=torch.bool)
    key_valid[1, 17:] = False
    question = torch.zeros(2, 21, dtype=torch.bool)
    question[0, :6] = True
    question[1, :4] = True
    question_valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    scaling = 8**-0.5
    probe = _probe(key_valid, question_valid=question_valid)
    blockskim_attention_forward(
        _Module(), query, key, value, key_valid[:, None, None, :], scaling=scaling, blockskim_probe=probe
    )
    probs = _reference_probabilities(query, key, key_valid, scaling)  # (B, H, L, L), invalid query rows zero
    expected = torch.zeros(2, 3, 6)  # (B, K, 2H)
    for row in range(2):
        for block in range(3):
            tokens = [t for t in range(block * 8, min(block * 8 + 8, 21)) if key_valid[row, t]]
            for head in range(3):
                to_question = probs[row, head][tokens][:, question[row]].sum(dim=-1).mean()
                from_question = probs[row, head][question[row]][:, tokens].sum(dim=-1).mean()
                expected[row, block, head] = to_question
                expected[row, block, 3 + head] = from_question
    assert probe.question_features.shape == (6, 6)  # (N, 2H): every block holds a real token here
    torch.testing.assert_close(probe.question_features, expected.flatten(0, 1), atol=1e-6, rtol=1e-5)
    lse = torch.logsumexp(
        (query @ key.transpose(-1, -2) * scaling).masked_fill(~key_valid[:, None, None, :], -1e30), dim=-1
    )
    direct = block_question_attention(query, key, lse, key_valid, question_valid, 8, scaling)
    torch.testing.assert_close(direct, expected, atol=1e-6, rtol=1e-5)


def test_block_context_features_are_log_ratios_to_uniform_with_neighbours_and_the_gap_to_the_best_block():
    # One row of 10 real tokens in blocks of 4 (4 + 4 + 2), the question 3 of them; one head, so 2 masses per block.
    key_valid = torch.tensor([[True] * 10 + [False] * 2])
    question_valid = torch.tensor([[True] * 3])
    masses = torch.tensor([[[0.9, 0.4], [0.6, 0.2], [0.15, 0.05]]])  # (1, 3, 2): to_question, from_question
    judged = torch.tensor([[False, True, True]])  # block 0 holds the question
    got = block_context_features(masses, key_valid, question_valid, judged, block_size=4)
    # Uniform attention: 3 / 10 of a token's mass on the question; 4 / 10 (2 / 10 for the last block) from it.
    uniform = torch.tensor([[0.3, 0.4], [0.3, 0.4], [0.3, 0.2]])
    ratio = (masses[0] / uniform).log()  # (3, 2)
    best = ratio[1:].amax(dim=0)  # over the judged blocks only
    zero = torch.zeros(2)
    expected = torch.stack(
        [
            torch.cat([ratio[0], zero, ratio[1], ratio[0] - best]),  # block 0 before nothing, block 1 after
            torch.cat([ratio[1], zero, ratio[2], ratio[1] - best]),  # block 0 is not judged: its neighbour slot is 0
            torch.cat([ratio[2], ratio[1], zero, ratio[2] - best]),
        ]
    )
    assert got.shape == (1, 3, 8)
    torch.testing.assert_close(got[0], expected)
    # The log-ratios do not depend on the window length: with twice the tokens, in blocks twice as large, the same
    # pattern puts half the mass on the question, and the question the same mass on each block.
    longer_masses = masses * torch.tensor([0.5, 1.0])
    longer = block_context_features(longer_masses, torch.tensor([[True] * 20]), question_valid, judged, block_size=8)
    torch.testing.assert_close(longer[0, :, :2], ratio)


def test_neighbour_context_holds_neighbours_and_the_gap_to_the_best_judged_block():
    features = torch.tensor([[[1.0], [3.0], [2.0]]])
    judged = torch.tensor([[True, True, False]])  # the third block is never judged: no neighbour value, not the best
    expected = torch.tensor([[[1.0, 0.0, 3.0, -2.0], [3.0, 1.0, 0.0, 0.0], [2.0, 3.0, 0.0, -1.0]]])
    torch.testing.assert_close(neighbour_context(features, judged), expected)


def test_probe_without_an_attention_mask_equals_the_probe_with_every_key_marked_real():
    # No mask means every key is real; the fused kernel then runs without a bias, and nothing changes, bit for bit.
    query, key, value = _qkv()
    key_valid = torch.ones(2, 24, dtype=torch.bool)
    question_valid = torch.zeros(2, 5, dtype=torch.bool)
    question_valid[:, :4] = True
    results = []
    for mask in (None, key_valid[:, None, None, :]):
        probe = _probe(key_valid, question_valid=question_valid)
        output, _ = blockskim_attention_forward(_Module(), query, key, value, mask, blockskim_probe=probe)
        results.append((output, probe.block_probs, probe.question_features))
    for unmasked, masked in zip(*results, strict=True):
        assert torch.equal(unmasked, masked)


def test_context_probe_needs_the_judged_slots():
    query, key, value = _qkv()
    key_valid = torch.ones(2, 24, dtype=torch.bool)
    question_valid = torch.ones(2, 4, dtype=torch.bool)
    probe = _probe(key_valid, question_valid=question_valid, block_context=True, diagonal_block=False)
    with pytest.raises(ValueError, match="judged_slots"):
        blockskim_attention_forward(_Module(), query, key, value, None, blockskim_probe=probe)
    probe = _probe(
        key_valid,
        question_valid=question_valid,
        block_context=True,
        diagonal_block=False,
        judged_slots=torch.ones(2, 3, dtype=torch.bool),
    )
    blockskim_attention_forward(_Module(), query, key, value, None, blockskim_probe=probe)
    masses = block_question_attention(
        query, key, row_logsumexp(query, key, key_valid, 8**-0.5), key_valid, question_valid, 8, 8**-0.5
    )
    expected = block_context_features(masses, key_valid, question_valid, torch.ones(2, 3, dtype=torch.bool), 8)
    torch.testing.assert_close(probe.question_features, expected.flatten(0, 1))
