"""BlockSkimConfig: defaults, serialisation, and validation errors that name the bad field."""

import json

import pytest
from transformers import AutoConfig, BertConfig, GPT2Config

from modeling_blockskim import BlockSkimConfig
from modeling_blockskim.configuration_blockskim import parse_thresholds, thresholds_for_layers


def test_defaults_follow_the_paper_and_skip_the_last_layer():
    config = BlockSkimConfig(backbone_config=BertConfig(num_hidden_layers=6))
    assert config.block_size == 32
    assert config.skim_layers == [0, 1, 2, 3, 4]
    assert config.balance_factor == 20.0
    assert config.harmony_coefficient == 0.1
    assert config.skim_at_inference is True
    assert config.sep_token_id == 102


def test_roberta_backbone_defaults_to_its_separator():
    from transformers import RobertaConfig

    assert BlockSkimConfig(backbone_config=RobertaConfig()).sep_token_id == 2


def test_round_trip_through_json_keeps_backbone_and_skim_settings(tmp_path):
    config = BlockSkimConfig(
        backbone_config=BertConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4),
        block_size=16,
        skim_layers=[2, 0],
        skim_threshold=0.05,
        balance_factor=30.0,
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, BlockSkimConfig)
    assert isinstance(loaded.backbone_config, BertConfig)
    assert loaded.backbone_config.hidden_size == 64
    assert loaded.skim_layers == [0, 2]
    assert (loaded.block_size, loaded.skim_threshold, loaded.balance_factor) == (16, 0.05, 30.0)


def test_a_per_layer_threshold_survives_json_with_int_layer_keys(tmp_path):
    backbone = BertConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4)
    BlockSkimConfig(backbone_config=backbone, skim_layers=[0, 2], skim_threshold={2: 0.6, 0: 0.2}).save_pretrained(
        tmp_path
    )
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["skim_threshold"] == {"0": 0.2, "2": 0.6}  # JSON object keys are strings
    assert AutoConfig.from_pretrained(tmp_path).skim_threshold == {0: 0.2, 2: 0.6}


@pytest.mark.parametrize(
    ("threshold", "message"),
    [
        ({0: 0.2}, r"sets tau for layers \[0\], but this model has predictors after layers \[0, 2\]"),
        ({0: 0.2, 2: 1.5}, r"skim_threshold\[2\]=1.5 is out of range"),
        ({"first": 0.2, 2: 0.5}, r"skim_threshold has the key 'first', which is not a layer index"),
        ({0: "0.2", 2: 0.5}, r"skim_threshold\[0\] must be a float in \[0.0, 1.0\]"),
    ],
)
def test_a_bad_per_layer_threshold_is_refused_naming_the_entry(threshold, message):
    with pytest.raises(ValueError, match=message):
        BlockSkimConfig(backbone_config=BertConfig(num_hidden_layers=4), skim_layers=[0, 2], skim_threshold=threshold)


def test_the_command_line_form_of_a_threshold_gives_one_tau_per_layer_lowest_first():
    assert parse_thresholds("0.3") == 0.3
    assert parse_thresholds("0.2/0.4/0.6") == (0.2, 0.4, 0.6)
    assert thresholds_for_layers(0.3, [2, 0]) == 0.3
    assert thresholds_for_layers((0.2, 0.6), [2, 0]) == {0: 0.2, 2: 0.6}
    with pytest.raises(ValueError, match=r"0.2/0.4/0.6 gives 3 taus for layers \[0, 2\]"):
        thresholds_for_layers((0.2, 0.4, 0.6), [0, 2])
    with pytest.raises(ValueError, match="'0.2,0.4' is not a float or floats joined by '/'"):
        parse_thresholds("0.2,0.4")


def test_backbone_config_may_be_a_dict_with_model_type():
    config = BlockSkimConfig(backbone_config={"model_type": "electra", "num_hidden_layers": 3})
    assert config.backbone_config.model_type == "electra"
    assert config.skim_layers == [0, 1]


def test_empty_skim_layers_is_allowed_and_means_plain_qa():
    assert BlockSkimConfig(skim_layers=[]).skim_layers == []


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"block_size": 30}, "block_size", "multiple of 4"),
        ({"block_size": 0}, "block_size", "multiple of 4"),
        ({"block_size": 1024}, "block_size", "[4, 512]"),
        ({"block_size": 32.0}, "block_size", "int"),
        ({"skim_layers": [11]}, "skim_layers", "0..10"),
        ({"skim_layers": [-1]}, "skim_layers", "0..10"),
        ({"skim_layers": [1, 1]}, "skim_layers", "more than once"),
        ({"skim_threshold": 1.5}, "skim_threshold", "[0.0, 1.0]"),
        ({"skim_threshold": -0.1}, "skim_threshold", "[0.0, 1.0]"),
        ({"balance_factor": -1.0}, "balance_factor", ">= 0.0"),
        ({"harmony_coefficient": -0.1}, "harmony_coefficient", ">= 0.0"),
        ({"skim_loss_reduction": "max"}, "skim_loss_reduction", "'sum', 'mean'"),
        ({"sep_token_id": 10**6}, "sep_token_id", "[0, 30521]"),
        ({"predictor_diagonal_block": False}, "predictor_diagonal_block", "predictor_question_features=True"),
        ({"predictor_diagonal_block": "no"}, "predictor_diagonal_block", "bool"),
        ({"predictor_block_context": True}, "predictor_block_context", "predictor_question_features=True"),
        ({"predictor_block_context": 1}, "predictor_block_context", "bool"),
        ({"predictor_token_matching": True}, "predictor_token_matching", "predictor_question_features=True"),
        ({"predictor_question_features": True, "predictor_token_matching": 1}, "predictor_token_matching", "bool"),
        ({"predictor_hidden_size": 0}, "predictor_hidden_size", "a positive int, or None"),
        ({"predictor_hidden_size": 16.0}, "predictor_hidden_size", "a positive int, or None"),
        ({"backbone_config": GPT2Config()}, "backbone_config.model_type", "'bert', 'roberta', 'electra'"),
    ],
)
def test_invalid_setting_raises_value_error_naming_field_and_range(kwargs, field, allowed):
    with pytest.raises(ValueError) as error:
        BlockSkimConfig(**kwargs)
    assert field in str(error.value)
    assert allowed in str(error.value)
