"""BlockSkim: Block-Skim (Guan et al., AAAI 2022) for Hugging Face extractive question answering.

Importing the package registers the Block-Skim classes with the Auto classes (so an installed package loads
checkpoints without `trust_remote_code`) and marks them for `auto_map` on save (so a checkpoint also loads anywhere
with `trust_remote_code=True`). This is the only place where registration happens.
"""

from transformers import AutoConfig, AutoModelForQuestionAnswering
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_blockskim import BlockSkimConfig
from .modeling_blockskim import (
    SKIMMED_LOGIT,
    BlockSkimForQuestionAnswering,
    BlockSkimPreTrainedModel,
    BlockSkimQuestionAnsweringOutput,
)
from .pipeline_blockskim import BlockSkimQuestionAnsweringPipeline

__version__ = "0.1.0"

AutoConfig.register(BlockSkimConfig.model_type, BlockSkimConfig, exist_ok=True)
AutoModelForQuestionAnswering.register(BlockSkimConfig, BlockSkimForQuestionAnswering, exist_ok=True)
BlockSkimConfig.register_for_auto_class()
BlockSkimForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")
PIPELINE_REGISTRY.register_pipeline(
    "question-answering",
    pipeline_class=BlockSkimQuestionAnsweringPipeline,
    pt_model=AutoModelForQuestionAnswering,
    type="text",
)

__all__ = [
    "SKIMMED_LOGIT",
    "BlockSkimConfig",
    "BlockSkimForQuestionAnswering",
    "BlockSkimPreTrainedModel",
    "BlockSkimQuestionAnsweringOutput",
    "BlockSkimQuestionAnsweringPipeline",
]
