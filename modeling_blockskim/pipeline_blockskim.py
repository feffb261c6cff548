"""`BlockSkimQuestionAnsweringPipeline`: extractive question answering over arbitrarily long contexts.

transformers 5 removed its question-answering pipeline; this one keeps the interface users knew (`question=`/`context=`
keywords or `{"question", "context"}` dicts, `top_k`, `max_answer_len`, `max_seq_len`/`doc_stride` windows,
`handle_impossible_answer`, answers as `{"score", "start", "end", "answer"}` with character offsets into the original
context) and adds what Block-Skim needs: skimming follows the checkpoint's config and can be switched per call, and
`return_skim_statistics=True` reports how many tokens every layer really processed (Guan et al., AAAI 2022, the
per-layer kept fractions of section 4's speedup).

All windows of a question run in one forward pass (several questions share it with `batch_size > 1`), padded only to
a multiple of the model's block size. Spans are decoded by `decoding_blockskim.decode_answers`, shared with the
evaluation code. Plain (non-Block-Skim) extractive QA models work too, without the skim options.

Travels with every checkpoint as remote code, so `pipeline("question-answering", model=<checkpoint>,
trust_remote_code=True)` loads it: only `from .x import y` imports of its siblings.
"""

from __future__ import annotations

import inspect
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import torch
from transformers import Pipeline, PreTrainedModel, PreTrainedTokenizerBase

from .configuration_blockskim import layer_thresholds
from .decoding_blockskim import WindowLogits, decode_answers

DEFAULT_MAX_SEQ_LEN = 384
"""Window length in tokens when `max_seq_len` is not given (capped by the tokenizer's and the model's maximum)."""

DEFAULT_DOC_STRIDE = 128
"""Tokens shared by consecutive windows when `doc_stride` is not given (at most half a window's context room)."""


class BlockSkimQuestionAnsweringPipeline(Pipeline):
    """Extractive question answering with a Block-Skim (or any `*ForQuestionAnswering`) model.

    Long contexts are split into overlapping windows of `max_seq_len` tokens (`doc_stride` tokens shared between
    neighbours) with the tokenizer's overflow and offset mapping; every window is scored, and the best spans over all
    windows are returned with character offsets into the context exactly as given (accents, CJK, emoji and unusual
    whitespace included).

    Creating the pipeline puts the model in evaluation mode: a model in training mode would apply dropout and never
    skim.

    Args:
        model (`PreTrainedModel`): a `BlockSkimForQuestionAnswering` (local or remote code) or any extractive QA model.
        tokenizer (`PreTrainedTokenizerBase`): a tokenizer with offset mapping (a fast, `tokenizers`-backed one).
        kwargs: `Pipeline` arguments (`device`, `batch_size`, ...) and defaults for every call parameter of
            [`~BlockSkimQuestionAnsweringPipeline.__call__`] (`top_k`, `skim`, ...).

    Example:

    ```python
    >>> from transformers import AutoTokenizer, pipeline
    >>> from modeling_blockskim import BlockSkimForQuestionAnswering, BlockSkimQuestionAnsweringPipeline

    >>> # A saved checkpoint: `transformers.pipeline` finds this class through `config.custom_pipelines`.
    >>> qa = pipeline("question-answering", model="path/to/checkpoint", trust_remote_code=True)

    >>> # A model in memory: `transformers.pipeline` cannot pick a custom pipeline for a model object, so build it.
    >>> model = BlockSkimForQuestionAnswering.from_pretrained("path/to/checkpoint")
    >>> tokenizer = AutoTokenizer.from_pretrained("path/to/checkpoint")
    >>> qa = BlockSkimQuestionAnsweringPipeline(model=model, tokenizer=tokenizer)
    >>> qa(question="Where is the Eiffel Tower?", context="The Eiffel Tower is in Paris.")
    {'score': 0.97, 'start': 23, 'end': 28, 'answer': 'Paris'}
    >>> qa.save_pretrained("path/to/pipeline")  # weights, tokenizer, this file and `custom_pipelines` in config.json
    ```
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, **kwargs: Any):
        if tokenizer is None:
            raise ValueError(
                "BlockSkimQuestionAnsweringPipeline needs the model's tokenizer: pass tokenizer=AutoTokenizer."
                "from_pretrained(<checkpoint>)."
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} has no offset mapping, which maps answers back to characters of the "
                "context: load a fast (`tokenizers`-backed) tokenizer with AutoTokenizer.from_pretrained(...)."
            )
        super().__init__(model=model, tokenizer=tokenizer, **kwargs)
        self.model.eval()

    @property
    def supports_skim(self) -> bool:
        """Whether the model is a Block-Skim model (its forward takes `skim`, `skim_threshold`, skim details)."""
        return "skim" in inspect.signature(self.model.forward).parameters

    def __call__(
        self,
        inputs: Mapping[str, str] | list[Mapping[str, str]] | Iterable[Mapping[str, str]] | None = None,
        question: str | list[str] | None = None,
        context: str | list[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | list[Any] | Iterator[Any]:
        """Answer one question or many.

        Args:
            inputs (`dict` or `list[dict]`, *optional*): `{"question": str, "context": str}`, a list of them, or an
                iterable (a generator, a `datasets.Dataset` via `KeyDataset`) for lazy results.
            question (`str` or `list[str]`, *optional*): instead of `inputs`, together with `context`.
            context (`str` or `list[str]`, *optional*): one context per question, or one string for all of them.
            top_k (`int`, *optional*, defaults to 1): answers per question; 1 returns a dict, more return a list
                (shorter when fewer distinct spans exist).
            max_answer_len (`int`, *optional*, defaults to 15): longest answer in tokens.
            max_seq_len (`int`, *optional*, defaults to 384): window length in tokens, question and special tokens
                included (capped by the tokenizer's `model_max_length` and the model's position embeddings).
            doc_stride (`int`, *optional*, defaults to 128): tokens of context shared by consecutive windows, so an
                answer cut by one window boundary lies whole in the next window. By default at most half of the
                context room of a window.
            handle_impossible_answer (`bool`, *optional*, defaults to `False`): allow the null answer
                `{"answer": "", "start": 0, "end": 0}` (SQuAD v2), ranked by the score of the [CLS] token.
            skim (`bool`, *optional*): drop the blocks the predictors reject (Block-Skim models only). Defaults to the
                checkpoint's `config.skim_at_inference`.
            skim_threshold (`float` or `dict[int, float]`, *optional*): keep a block when P(keep) >= this value, one
                for all predictor layers or one per layer (`{1: 0.2, 2: 0.5}`); defaults to `config.skim_threshold`
                (Block-Skim models only).
            return_skim_statistics (`bool`, *optional*, defaults to `False`): add `"skim_statistics"` to every answer:
                `{"skim": bool, "num_windows": int, "input_tokens": int, "kept_tokens_per_layer": list[int]}`, the
                real (non-padding) tokens of all the question's windows and how many of them each layer processed
                (Block-Skim models only).
            batch_size (`int`, *optional*, defaults to 1): questions whose windows share one forward pass (all
                windows of a question always do); results do not depend on it.

        Returns:
            Per question, a dict `{"score": float, "start": int, "end": int, "answer": str}` (`top_k=1`) or a list of
            them, best first. `context[start:end] == answer`. A list input gives a list of those, a generator or
            dataset an iterator.

        Raises:
            `ValueError`: for an empty, missing or non-string question or context, a context without tokens, or a
                parameter out of range.
        """
        inputs = _gather_inputs(inputs, question, context)
        if isinstance(inputs, list) and not inputs:
            return []
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        max_answer_len: int | None = None,
        max_seq_len: int | None = None,
        doc_stride: int | None = None,
        handle_impossible_answer: bool | None = None,
        skim: bool | None = None,
        skim_threshold: float | Mapping[int, float] | None = None,
        return_skim_statistics: bool | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Validate the call parameters once, before any work, and route them to preprocess, forward, postprocess."""
        preprocess_params: dict[str, Any] = {}
        forward_params: dict[str, Any] = {}
        postprocess_params: dict[str, Any] = {}
        if max_seq_len is not None:
            _check_int("max_seq_len", max_seq_len, minimum=1)
            max_positions = self._max_positions()
            if max_positions is not None and max_seq_len > max_positions:
                raise ValueError(
                    f"max_seq_len={max_seq_len} exceeds the model's {max_positions} position embeddings: pass "
                    f"max_seq_len <= {max_positions}."
                )
            preprocess_params["max_seq_len"] = max_seq_len
        if doc_stride is not None:
            preprocess_params["doc_stride"] = _check_int("doc_stride", doc_stride, minimum=0)
        if top_k is not None:
            postprocess_params["top_k"] = _check_int("top_k", top_k, minimum=1)
        if max_answer_len is not None:
            postprocess_params["max_answer_len"] = _check_int("max_answer_len", max_answer_len, minimum=1)
        if handle_impossible_answer is not None:
            postprocess_params["handle_impossible_answer"] = _check_bool(
                "handle_impossible_answer", handle_impossible_answer
            )
        if not self.supports_skim:
            # A plain model never skims, so `skim=False` and `return_skim_statistics=False` are accepted as no-ops.
            ignored = [f"skim={skim!r}"] if skim else []
            ignored += [f"skim_threshold={skim_threshold!r}"] if skim_threshold is not None else []
            ignored += [f"return_skim_statistics={return_skim_statistics!r}"] if return_skim_statistics else []
            if ignored:
                raise ValueError(
                    f"{', '.join(ignored)} only apply to Block-Skim models, but {type(self.model).__name__} has no "
                    "skim predictors: drop these arguments or load a BlockSkimForQuestionAnswering checkpoint."
                )
            return preprocess_params, forward_params, postprocess_params
        if skim is not None:
            forward_params["skim"] = _check_bool("skim", skim)
        if skim_threshold is not None:
            taus = layer_thresholds(skim_threshold, list(self.model.config.skim_layers))
            forward_params["skim_threshold"] = taus if isinstance(skim_threshold, Mapping) else float(skim_threshold)
        if return_skim_statistics is not None:
            forward_params["return_skim_statistics"] = _check_bool("return_skim_statistics", return_skim_statistics)
            postprocess_params["return_skim_statistics"] = return_skim_statistics
        return preprocess_params, forward_params, postprocess_params

    def preprocess(
        self, inputs: Mapping[str, str], max_seq_len: int | None = None, doc_stride: int | None = None
    ) -> dict[str, Any]:
        """Validate one question and cut its context into windows.

        Returns:
            `dict` with `context`, and per window (best in the tokenizer's order) the model inputs as lists
            (`input_ids`, and `attention_mask`/`token_type_ids` when the tokenizer makes them), the character
            `offsets` of context tokens (`None` elsewhere) and the `null_index` of its [CLS] token. Padding happens
            when questions are batched.
        """
        question, context = _validated_example(inputs)
        tokenizer = self.tokenizer
        if max_seq_len is None:
            limits = [DEFAULT_MAX_SEQ_LEN, tokenizer.model_max_length, self._max_positions()]
            max_seq_len = min(limit for limit in limits if limit is not None)
        question_first = tokenizer.padding_side == "right"
        question_tokens = len(tokenizer(question, add_special_tokens=False)["input_ids"])
        if question_tokens == 0:
            raise ValueError(f"question={question!r} has no tokens after the tokenizer's cleaning.")
        context_room = max_seq_len - question_tokens - tokenizer.num_special_tokens_to_add(pair=True)
        if context_room < 1:
            raise ValueError(
                f"The question has {question_tokens} tokens, which leaves no room for the context in windows of "
                f"max_seq_len={max_seq_len} tokens: shorten the question or raise max_seq_len."
            )
        if doc_stride is None:
            doc_stride = min(DEFAULT_DOC_STRIDE, context_room // 2)
        elif doc_stride >= context_room:
            raise ValueError(
                f"doc_stride={doc_stride} must be smaller than the {context_room} context tokens that fit in a window "
                f"(max_seq_len={max_seq_len} minus {question_tokens} question tokens and the special tokens): lower "
                "doc_stride or raise max_seq_len."
            )
        encoded = tokenizer(
            text=question if question_first else context,
            text_pair=context if question_first else question,
            truncation="only_second" if question_first else "only_first",
            max_length=max_seq_len,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )
        context_sequence = 1 if question_first else 0
        model_input_names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in encoded]
        windows = []
        for index, input_ids in enumerate(encoded["input_ids"]):
            sequence_ids = encoded.sequence_ids(index)
            offsets = [
                tuple(offset) if sequence == context_sequence else None
                for offset, sequence in zip(encoded["offset_mapping"][index], sequence_ids, strict=True)
            ]
            window = {name: encoded[name][index] for name in model_input_names}
            window["offsets"] = offsets
            cls_token_id = tokenizer.cls_token_id
            window["null_index"] = input_ids.index(cls_token_id) if cls_token_id in input_ids else 0
            windows.append(window)
        if not any(offset is not None for offset in windows[0]["offsets"]):
            raise ValueError(
                f"context={_preview(context)} has no tokens after the tokenizer's cleaning (only whitespace, control "
                "or zero-width characters): pass a context with text in it."
            )
        _extend_over_dropped_marks([window["offsets"] for window in windows], context)
        return {"context": context, "windows": windows}

    def _forward(
        self,
        model_inputs: dict[str, torch.Tensor],
        skim: bool | None = None,
        skim_threshold: float | dict[int, float] | None = None,
        return_skim_statistics: bool = False,
    ) -> dict[str, Any]:
        """One forward pass over the windows of one or more questions.

        Returns:
            `dict` with `start_logits`/`end_logits` `(windows, length)`, aligned with the input ids, plus for
            Block-Skim models `skim` (whether blocks were dropped) and, with `return_skim_statistics`,
            `kept_token_counts` `(windows, num_layers)`.
        """
        accepted = inspect.signature(self.model.forward).parameters
        model_inputs = {name: value for name, value in model_inputs.items() if name in accepted}
        if not self.supports_skim:
            outputs = self.model(**model_inputs)
            return {"start_logits": outputs.start_logits, "end_logits": outputs.end_logits}
        if skim is None:
            skim = bool(self.model.config.skim_at_inference) and len(self.model.config.skim_layers) > 0
        outputs = self.model(
            **model_inputs, skim=skim, skim_threshold=skim_threshold, output_skim_details=return_skim_statistics
        )
        result = {"start_logits": outputs.start_logits, "end_logits": outputs.end_logits, "skim": skim}
        if return_skim_statistics:
            result["kept_token_counts"] = outputs.kept_token_counts
        return result

    def postprocess(
        self,
        model_outputs: dict[str, Any],
        top_k: int = 1,
        max_answer_len: int = 15,
        handle_impossible_answer: bool = False,
        return_skim_statistics: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """The best spans of one question over all its windows, as `{"score", "start", "end", "answer"}` dicts."""
        windows = model_outputs["windows"]
        window_logits = [
            WindowLogits(
                start_logits=model_outputs["start_logits"][index, : len(window["input_ids"])],
                end_logits=model_outputs["end_logits"][index, : len(window["input_ids"])],
                offsets=window["offsets"],
                null_index=window["null_index"],
            )
            for index, window in enumerate(windows)
        ]
        answers = decode_answers(
            window_logits,
            model_outputs["context"],
            top_k=top_k,
            max_answer_len=max_answer_len,
            handle_impossible_answer=handle_impossible_answer,
        ).answers
        if return_skim_statistics:
            statistics = {
                "skim": model_outputs["skim"],
                "num_windows": len(windows),
                "input_tokens": sum(len(window["input_ids"]) for window in windows),
                "kept_tokens_per_layer": model_outputs["kept_token_counts"].sum(dim=0).tolist(),
            }
            answers = [{**answer, "skim_statistics": statistics} for answer in answers]
        return answers[0] if top_k == 1 else answers

    def run_single(
        self, inputs: Mapping[str, str], preprocess_params: dict, forward_params: dict, postprocess_params: dict
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """One question through the same path as a list, so single and batched answers cannot differ."""
        return next(iter(self.get_iterator([inputs], 0, 1, preprocess_params, forward_params, postprocess_params)))

    def get_iterator(
        self,
        inputs: Iterable[Mapping[str, str]],
        num_workers: int,
        batch_size: int,
        preprocess_params: dict,
        forward_params: dict,
        postprocess_params: dict,
    ) -> Iterator[dict[str, Any] | list[dict[str, Any]]]:
        """Answers in input order, lazily: `batch_size` questions at a time, all their windows in one forward pass.

        Replaces the base class's `DataLoader` path, whose collation assumes one model row per input, while a
        question here has as many rows as windows. Tokenization is cheap next to the model, so `num_workers` is not
        used.
        """
        _check_int("batch_size", batch_size, minimum=1)
        return self._answer_in_groups(iter(inputs), batch_size, preprocess_params, forward_params, postprocess_params)

    def _answer_in_groups(
        self,
        inputs: Iterator[Mapping[str, str]],
        batch_size: int,
        preprocess_params: dict,
        forward_params: dict,
        postprocess_params: dict,
    ) -> Iterator[dict[str, Any] | list[dict[str, Any]]]:
        while group := list(islice(inputs, batch_size)):
            examples = [self.preprocess(example, **preprocess_params) for example in group]
            windows = [window for example in examples for window in example["windows"]]
            outputs = self.forward(self._collate(windows), **forward_params)
            first = 0
            for example in examples:
                rows = slice(first, first + len(example["windows"]))
                first = rows.stop
                example_outputs = {
                    name: value[rows] if isinstance(value, torch.Tensor) else value for name, value in outputs.items()
                }
                yield self.postprocess({**example, **example_outputs}, **postprocess_params)

    def _collate(self, windows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad the windows to one length, a multiple of the model's block size when it has one.

        Block-Skim judges whole blocks, so a length between multiples would only be padded again inside the model;
        padding is masked and never counted as kept.
        """
        length = max(len(window["input_ids"]) for window in windows)
        block_size = getattr(self.model.config, "block_size", None)
        if block_size:
            rounded = -(-length // block_size) * block_size
            max_positions = self._max_positions()
            length = rounded if max_positions is None or rounded <= max_positions else length
        pad_values = {"input_ids": self.tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
        batch = {}
        for name, pad_value in pad_values.items():
            if name not in windows[0]:
                continue
            rows = torch.full((len(windows), length), pad_value, dtype=torch.long)  # (windows, length)
            for row, window in enumerate(windows):
                rows[row, : len(window[name])] = torch.tensor(window[name], dtype=torch.long)
            batch[name] = rows
        return batch

    def _max_positions(self) -> int | None:
        """The model's number of position embeddings (the backbone's for Block-Skim), when it declares one."""
        config = getattr(self.model.config, "backbone_config", None) or self.model.config
        return getattr(config, "max_position_embeddings", None)


def _gather_inputs(
    inputs: Any, question: str | list[str] | None, context: str | list[str] | None
) -> Mapping[str, Any] | list[Any] | Any:
    """One `{"question", "context"}` mapping, a list of them, or the caller's iterable, from any accepted call form."""
    if question is None and context is None:
        if inputs is None:
            raise ValueError("No input: pass question= and context=, a {'question', 'context'} dict, or a list.")
        return list(inputs) if isinstance(inputs, tuple) else inputs
    if inputs is not None:
        raise ValueError("Pass either inputs or question= and context=, not both.")
    if question is None or context is None:
        missing = "question" if question is None else "context"
        raise ValueError(f"{missing}= is missing: question= and context= go together.")
    if isinstance(question, (list, tuple)) or isinstance(context, (list, tuple)):
        questions = list(question) if isinstance(question, (list, tuple)) else None
        contexts = list(context) if isinstance(context, (list, tuple)) else None
        if questions is not None and contexts is not None and len(questions) != len(contexts):
            raise ValueError(
                f"Got {len(questions)} questions and {len(contexts)} contexts: pass one context per question, or one "
                "context string for all questions."
            )
        count = len(questions if questions is not None else contexts)
        return [
            {
                "question": questions[index] if questions is not None else question,
                "context": contexts[index] if contexts is not None else context,
            }
            for index in range(count)
        ]
    return {"question": question, "context": context}


def _validated_example(example: Any) -> tuple[str, str]:
    """The question and context of one input, or a `ValueError` saying what is wrong with it."""
    if not isinstance(example, Mapping):
        raise ValueError(
            f"Each input must be a dict with 'question' and 'context' strings, got {type(example).__name__}: "
            f"{_preview(example)}."
        )
    missing = [key for key in ("question", "context") if key not in example]
    if missing:
        raise ValueError(f"Input is missing {missing}; it has keys {sorted(map(str, example))}.")
    for key in ("question", "context"):
        value = example[key]
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a str, got {type(value).__name__}: {_preview(value)}.")
        if not value.strip():
            raise ValueError(f"{key} is empty ({value!r}): pass a non-empty {key}.")
    return example["question"], example["context"]


def _extend_over_dropped_marks(offsets: list[list[tuple[int, int] | None]], context: str) -> None:
    """Let every token's span end after the combining marks that follow it when no token covers them.

    Tokenizers that strip accents drop the combining marks of decomposed text ("cafe\u0301", common in NFD input), so
    the offset of "cafe" would end inside the character "é" and an answer would lose its accent. Updates in place.
    """
    starts = {offset[0] for window in offsets for offset in window if offset is not None}
    for window in offsets:
        for index, offset in enumerate(window):
            if offset is None:
                continue
            end = offset[1]
            while end < len(context) and end not in starts and unicodedata.category(context[end]).startswith("M"):
                end += 1
            window[index] = (offset[0], end)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


__all__ = ["BlockSkimQuestionAnsweringPipeline"]
