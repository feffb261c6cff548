"""The analytic FLOPs estimate agrees with torch's FLOP counter, with and without skimming."""

import pytest
import torch

from modeling_blockskim.flops import count_flops, forward_flops, ideal_speedup
from modeling_blockskim.skimming_blockskim import question_token_mask

from .testing_utils import BLOCK_SIZE, PREDICTOR_KINDS, qa_batch, tiny_model


@pytest.mark.parametrize("skim", [False, True])
def test_analytic_flops_match_the_flop_counter(skim):
    model = tiny_model("bert", num_hidden_layers=4)
    batch = qa_batch("bert", lengths=(64, 64))  # full rows: the counter sees exactly the real tokens
    keep = torch.tensor([[True, False, True, False, False, True, False, True]] * 2)
    kwargs = {"skim": True, "keep_blocks_override": {0: keep}} if skim else {"skim": False}
    with torch.no_grad():
        details = model(**batch, **kwargs, output_skim_details=True)
        measured = count_flops(lambda: model(**batch, **kwargs))
    tokens = details.kept_token_counts[0].tolist()
    assert tokens == ([64, 32, 32, 32] if skim else [64] * 4)
    # Block 0 holds [CLS] + question, block 7 the final separator.
    analytic = 2 * forward_flops(model.config, tokens, predictors=skim)
    assert analytic == measured


def test_ideal_speedup_is_layers_over_relative_work():
    assert ideal_speedup([100, 100, 100, 100]) == 1.0
    assert ideal_speedup([100, 50, 50, 50]) == pytest.approx(4 / 2.5)
    assert ideal_speedup([100, 50, 25, 25]) == pytest.approx(4 / 2.0)


def test_forward_flops_rejects_a_wrong_number_of_layers():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="3 layers"):
        forward_flops(model.config, [BLOCK_SIZE] * 2)


@pytest.mark.parametrize("predictor", PREDICTOR_KINDS.values(), ids=PREDICTOR_KINDS.keys())
def test_analytic_flops_match_the_counter_when_the_last_block_is_cut_short(predictor):
    model = tiny_model("bert", num_hidden_layers=4, **predictor)
    batch = qa_batch("bert", lengths=(61, 61))  # 8 blocks, the last holding 5 tokens
    keep = torch.tensor([[True, False, True, False, False, True, False, True]] * 2)
    kwargs = {"skim": True, "keep_blocks_override": {0: keep}}
    with torch.no_grad():
        details = model(**batch, **kwargs, output_skim_details=True)
        measured = count_flops(lambda: model(**batch, **kwargs))
    tokens = details.kept_token_counts[0].tolist()
    assert tokens == [61, 29, 29, 29]  # blocks 0, 2, 5 and the short block 7: the layers never run on padding
    valid = batch["attention_mask"].bool()
    question = int(question_token_mask(batch["input_ids"], valid, model.config.sep_token_id)[0].sum())
    analytic = 2 * forward_flops(model.config, tokens, question_tokens=question)
    assert analytic == measured
