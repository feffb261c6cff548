"""Span decoding: from per-window start/end logits to answers with character offsets into the original context.

One mechanism for the question-answering pipeline and for `run_qa.py` evaluation. Every window (a `max_seq_len`
slice of a long context) is scored on its own: start and end probabilities are a softmax over the positions that
may hold an answer (the context tokens, plus the [CLS] null answer when unanswerable questions are allowed), and a
span (i, j) scores `p_start(i) * p_end(j)` with `i <= j < i + max_answer_len`. The search is exact (every pair,
vectorised), so it never misses a span a top-n heuristic would. Answers from all windows are ranked together; the
null answer's score is the smallest over the windows (a window without the answer should not veto one that has
it). Skimmed positions carry a logit of -10000 and so receive zero probability.

Travels with every checkpoint as remote code (the pipeline uses it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WindowLogits:
    """One window's span logits and how its tokens map to the context.

    Args:
        start_logits, end_logits (`torch.Tensor` of shape `(length,)`).
        offsets (`list`): per token, the `(char_start, char_end)` span in the context for context tokens, `None`
            for every other token (question, special tokens, padding).
        null_index (`int`, defaults to 0): position of the [CLS] token that stands for "no answer".
    """

    start_logits: torch.Tensor
    end_logits: torch.Tensor
    offsets: list[tuple[int, int] | None]
    null_index: int = 0


@dataclass
class DecodedAnswers:
    """Answers of one question, best first, and the null answer's score (`None` unless impossible answers are on)."""

    answers: list[dict]
    null_score: float | None


def _window_candidates(
    window: WindowLogits, max_answer_len: int, handle_impossible_answer: bool
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """All valid spans of one window: (scores (N,), start/end token pairs (N, 2)), plus its null score.

    Only the band `start <= end < start + max_answer_len` is scored: O(length * max_answer_len), not length^2.
    """
    length = window.start_logits.shape[0]
    is_context = torch.zeros(length, dtype=torch.bool)
    context_positions = [index for index, offset in enumerate(window.offsets[:length]) if offset is not None]
    is_context[context_positions] = True
    allowed = is_context.clone()
    if handle_impossible_answer:
        allowed[window.null_index] = True
    start = window.start_logits.float().masked_fill(~allowed, float("-inf")).softmax(dim=0)  # (L,)
    end = window.end_logits.float().masked_fill(~allowed, float("-inf")).softmax(dim=0)  # (L,)
    ends = torch.arange(length)[:, None] + torch.arange(max_answer_len)[None, :]  # (L, W): end of each span
    inside = ends < length
    ends = ends.clamp(max=length - 1)
    valid = inside & is_context[:, None] & is_context[ends]  # (L, W)
    scores = start[:, None] * end[ends]  # (L, W)
    starts_, widths = valid.nonzero(as_tuple=True)
    pairs = torch.stack([starts_, starts_ + widths], dim=1)  # (N, 2)
    null_score = float(start[window.null_index] * end[window.null_index]) if handle_impossible_answer else None
    return scores[valid], pairs, null_score


def decode_answers(
    windows: list[WindowLogits],
    context: str,
    top_k: int = 1,
    max_answer_len: int = 15,
    handle_impossible_answer: bool = False,
) -> DecodedAnswers:
    """Best answers of one question over all its windows.

    Args:
        windows (`list[WindowLogits]`): the question's windows over `context`.
        context (`str`): the original context; answers are its exact substrings.
        top_k (`int`, defaults to 1): answers to return (fewer when fewer distinct spans exist).
        max_answer_len (`int`, defaults to 15): longest answer in tokens.
        handle_impossible_answer (`bool`, defaults to `False`): allow the null answer (SQuAD v2); it is returned as
            `{"answer": "", "start": 0, "end": 0}` wherever its score ranks.

    Returns:
        `DecodedAnswers` whose answers are `{"score", "start", "end", "answer"}` dicts with character offsets.
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1.")
    if max_answer_len < 1:
        raise ValueError(f"max_answer_len={max_answer_len} must be >= 1.")
    best: dict[tuple[int, int], float] = {}
    null_scores = []
    for window in windows:
        scores, pairs, null_score = _window_candidates(window, max_answer_len, handle_impossible_answer)
        if null_score is not None:
            null_scores.append(null_score)
        order = scores.argsort(descending=True)[: top_k * 4]  # distinct character spans may repeat across windows
        for index in order.tolist():
            start_token, end_token = pairs[index].tolist()
            span = (window.offsets[start_token][0], window.offsets[end_token][1])
            score = float(scores[index])
            if score > best.get(span, -1.0):
                best[span] = score
    answers = [
        {"score": score, "start": start, "end": end, "answer": context[start:end]}
        for (start, end), score in best.items()
    ]
    null_score = min(null_scores) if null_scores else None
    if null_score is not None:
        answers.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
    answers.sort(key=lambda answer: answer["score"], reverse=True)
    return DecodedAnswers(answers=answers[:top_k], null_score=null_score)
