"""Tiny random backbones of every supported type and QA-shaped inputs, shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import BertConfig, ElectraConfig, RobertaConfig

from modeling_blockskim import BlockSkimConfig, BlockSkimForQuestionAnswering

BLOCK_SIZE = 8
SEP_TOKEN_ID = {"bert": 3, "roberta": 2, "electra": 3}
CLS_TOKEN_ID = {"bert": 2, "roberta": 0, "electra": 2}
PAD_TOKEN_ID = {"bert": 0, "roberta": 1, "electra": 0}
PREDICTOR_KINDS = {
    "paper-predictor": {},
    "question-features": {"predictor_question_features": True},
    "question-only": {"predictor_question_features": True, "predictor_diagonal_block": False},
    "question-context": {
        "predictor_question_features": True,
        "predictor_diagonal_block": False,
        "predictor_block_context": True,
    },
    "token-matching": {
        "predictor_question_features": True,
        "predictor_diagonal_block": False,
        "predictor_block_context": True,
        "predictor_token_matching": True,
    },
    "hidden-layer": {
        "predictor_question_features": True,
        "predictor_diagonal_block": False,
        "predictor_block_context": True,
        "predictor_token_matching": True,
        "predictor_hidden_size": 8,
    },
}
"""`tiny_model` settings of the predictor kinds: the paper's CNN, CNN + question masses, question masses only,
question masses in context, those with token matching on the hidden states, and those with a hidden layer."""

_BLOCK_PACKAGE = """
import importlib.abc, sys
class _NoBlockSkim(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_blockskim" or name.startswith("modeling_blockskim."):
            raise ModuleNotFoundError(f"blocked for the test: {name}")
sys.meta_path.insert(0, _NoBlockSkim())
"""


def run_without_package(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter where `modeling_blockskim` cannot be imported and nothing reaches the Hub.

    This is how a checkpoint's remote code is used by someone who never installed this package.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    script = _BLOCK_PACKAGE + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def tiny_backbone_config(backbone: str, num_hidden_layers: int = 3, **overrides):
    """Batch-3-sized testers in the transformers style: hidden 32, 4 heads, a few layers, 160 positions.

    `overrides` replace any field, e.g. the real vocabulary size and 512 positions for tests with a real tokenizer.
    """
    common = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=160,
        pad_token_id=PAD_TOKEN_ID[backbone],
    )
    common.update(overrides)
    if backbone == "bert":
        return BertConfig(**common)
    if backbone == "roberta":
        return RobertaConfig(**common, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    if backbone == "electra":
        return ElectraConfig(**common, embedding_size=16)
    raise ValueError(backbone)


def tiny_model(
    backbone: str = "bert",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    num_hidden_layers: int = 3,
    **skim_kwargs,
) -> BlockSkimForQuestionAnswering:
    torch.manual_seed(seed)
    config = BlockSkimConfig(
        backbone_config=tiny_backbone_config(backbone, num_hidden_layers),
        block_size=skim_kwargs.pop("block_size", BLOCK_SIZE),
        sep_token_id=SEP_TOKEN_ID[backbone],
        **skim_kwargs,
    )
    config._attn_implementation = attn_implementation
    return BlockSkimForQuestionAnswering(config).eval()


def qa_batch(
    backbone: str = "bert",
    lengths: tuple[int, ...] = (61, 47, 30, 19),
    question_length: int = 6,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """`[CLS] question [SEP] context [SEP]` rows of the given real lengths, right-padded to the longest.

    RoBERTa rows use its `<s> question </s></s> context </s>` layout.
    """
    generator = torch.Generator().manual_seed(seed)
    sep, cls, pad = SEP_TOKEN_ID[backbone], CLS_TOKEN_ID[backbone], PAD_TOKEN_ID[backbone]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    token_type_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(5, 99, (length,), generator=generator)
        input_ids[row, 0] = cls
        input_ids[row, question_length + 1] = sep
        context_start = question_length + 2
        if backbone == "roberta":
            input_ids[row, question_length + 2] = sep
            context_start += 1
        input_ids[row, length - 1] = sep
        attention_mask[row, :length] = 1
        if backbone != "roberta":
            token_type_ids[row, context_start:length] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if backbone != "roberta":
        batch["token_type_ids"] = token_type_ids
    return batch
