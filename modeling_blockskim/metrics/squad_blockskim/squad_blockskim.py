"""SQuAD Exact Match and F1 as an `evaluate` metric that loads from a local path, so evaluation never needs the Hub.

Owns the answer normalisation and scoring that the Block-Skim paper reports (Guan et al., AAAI 2022, section 4:
SQuAD v1.1, SQuAD v2.0 and the MRQA tasks are all scored with Exact Match and F1). Written from the definitions of
the official SQuAD v1.1 and v2.0 evaluation scripts so that numbers are comparable with published ones:

- an answer is normalised by lower-casing it, deleting every character of `string.punctuation` (ASCII punctuation
  only: the em dash, curly quotes, guillemets and CJK punctuation are kept), deleting the whole words "a", "an" and
  "the", and collapsing runs of whitespace (Unicode whitespace included) to single spaces;
- Exact Match is 1 when the normalised prediction equals a normalised gold answer; F1 is the harmonic mean of
  precision and recall over the bags of whitespace tokens of the two normalised strings; each question takes the
  maximum over its gold answers, and the corpus score is the mean in percent.

`evaluate` copies this file on its own into its modules cache and imports it there, so it imports only the standard
library, `datasets` and `evaluate`, and never the `modeling_blockskim` package.
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass

import datasets
import evaluate

_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "Proceedings of the 2016 Conference on Empirical Methods in Natural Language Processing",
    year = "2016",
    pages = "2383--2392",
}
@inproceedings{rajpurkar-etal-2018-know,
    title = "Know What You Don{'}t Know: Unanswerable Questions for {SQ}u{AD}",
    author = "Rajpurkar, Pranav and Jia, Robin and Liang, Percy",
    booktitle = "Proceedings of the 56th Annual Meeting of the Association for Computational Linguistics",
    year = "2018",
    pages = "784--789",
}
"""

_DESCRIPTION = """\
Exact Match and F1 of extractive question answering, with the normalisation of the official SQuAD evaluation
scripts. Config "squad" (the default) scores SQuAD v1.1 and MRQA predictions; config "squad_v2" scores SQuAD v2.0
predictions, where a question may have no answer, and adds the per-subset breakdown and the no-answer threshold
search of the official v2.0 script. Works offline: load it with `evaluate.load(<path of this file>, <config>)`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[dict]`): one per question, with
        - "id" (`str`): the question id;
        - "prediction_text" (`str`): the predicted answer, "" for "no answer";
        - "no_answer_probability" (`float`, config "squad_v2" only): how likely the question has no answer.
    references (`list[dict]`): one per question, with
        - "id" (`str`): the question id;
        - "answers" (`dict`): "text" (`list[str]`), the gold answers, and optionally "answer_start" (`list[int]`,
          may be empty or absent: only the texts are scored, so MRQA answer lists work as they are). Under
          "squad_v2" an empty "text" list marks an unanswerable question (its only gold answer is "").
    no_answer_threshold (`float`, *optional*, defaults to 1.0, config "squad_v2" only): a prediction whose
        "no_answer_probability" is strictly greater than this counts as "no answer" whatever its text.

Predictions and references are matched by id, in any order; an id present on one side only, or twice on one side,
raises a `ValueError` naming it.

Returns:
    Config "squad": "exact_match" and "f1", in percent (0 to 100).
    Config "squad_v2", as the official SQuAD v2.0 script (scores in percent):
        "exact", "f1", "total": over all questions, after applying `no_answer_threshold`;
        "HasAns_exact", "HasAns_f1", "HasAns_total": the answerable questions (only when there are some);
        "NoAns_exact", "NoAns_f1", "NoAns_total": the unanswerable questions (only when there are some);
        "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh": the best scores over every no-answer
        threshold, and the threshold that reaches each.

Example:

    >>> squad = evaluate.load("path/to/squad_blockskim")
    >>> predictions = [{"id": "q1", "prediction_text": "the Eiffel Tower"}]
    >>> references = [{"id": "q1", "answers": {"text": ["Eiffel Tower"], "answer_start": [4]}}]
    >>> squad.compute(predictions=predictions, references=references)
    {'exact_match': 100.0, 'f1': 100.0}
"""

CONFIG_NAMES: tuple[str, ...] = ("squad", "squad_v2")
"""Accepted config names; `evaluate` passes "default" when none is given, which means "squad"."""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Normalise an answer the way the official SQuAD scripts do, so that formatting differences do not count.

    Steps, in this order: lower-case; delete ASCII punctuation (`string.punctuation`); replace the whole words "a",
    "an" and "the" by a space; collapse whitespace. The order matters: "A-team" loses its hyphen first and becomes
    the word "ateam", which is not an article.

    Example:

        >>> normalize_answer("  The  Eiffel-Tower!")
        'eiffeltower'
    """
    lowered = text.lower()
    without_punctuation = "".join(character for character in lowered if character not in _PUNCTUATION)
    without_articles = _ARTICLES.sub(" ", without_punctuation)
    return " ".join(without_articles.split())


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 when the normalised prediction equals the normalised gold answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, empty_matches_empty: bool = False) -> float:
    """Token-level F1 between a prediction and one gold answer, on bags of normalised whitespace tokens.

    Args:
        prediction (`str`): the predicted answer.
        gold (`str`): one gold answer.
        empty_matches_empty (`bool`, *optional*, defaults to `False`): the SQuAD v2.0 rule for answers that normalise
            to nothing: F1 is 1.0 when both sides are empty and 0.0 when only one is. SQuAD v1.1 (and MRQA) have no
            such rule: an empty side shares no token, so F1 is 0.0.

    Returns:
        `float` in [0, 1].
    """
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if empty_matches_empty and (not prediction_tokens or not gold_tokens):
        return float(prediction_tokens == gold_tokens)
    shared = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    num_shared = sum(shared.values())
    if num_shared == 0:
        return 0.0
    precision = num_shared / len(prediction_tokens)
    recall = num_shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _show_ids(ids: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(question_id) for question_id in ids[:limit])
    return shown if len(ids) <= limit else f"{shown} and {len(ids) - limit} more"


def _index_by_id(rows: list[dict], kind: str) -> dict[str, dict]:
    by_id = {}
    for row in rows:
        if row["id"] in by_id:
            raise ValueError(f"The {kind} id {row['id']!r} appears twice; give exactly one {kind} per question.")
        by_id[row["id"]] = row
    return by_id


def pair_by_id(predictions: list[dict], references: list[dict]) -> list[tuple[dict, dict]]:
    """Match each prediction with the reference of the same id, in prediction order.

    The official scripts skip (v2.0) or score zero (v1.1) a question without a prediction and ignore a prediction
    without a question. Here either is an error: it nearly always means that the predictions were made on another
    split or were lost in post-processing, and a silently shifted score hides that.

    Raises:
        `ValueError`: an id appears twice on one side, or on one side only; the message names the ids.
    """
    predictions_by_id = _index_by_id(predictions, "prediction")
    references_by_id = _index_by_id(references, "reference")
    without_reference = [question_id for question_id in predictions_by_id if question_id not in references_by_id]
    without_prediction = [question_id for question_id in references_by_id if question_id not in predictions_by_id]
    problems = []
    if without_reference:
        problems.append(f"prediction ids without a reference: {_show_ids(without_reference)}")
    if without_prediction:
        problems.append(f"reference ids without a prediction: {_show_ids(without_prediction)}")
    if problems:
        raise ValueError(
            f"Predictions and references must cover the same question ids; {'; '.join(problems)}. Check that the "
            "predictions were made on the split the references come from."
        )
    return [(prediction, references_by_id[question_id]) for question_id, prediction in predictions_by_id.items()]


def squad_v1_question_scores(pairs: list[tuple[dict, dict]]) -> list[tuple[float, float]]:
    """Per question, the best EM and F1 (0 to 1) against any of its gold answers, as the official v1.1 script
    scores each question before averaging; per-question scores are what a paired significance test needs.

    Raises:
        `ValueError`: a reference has no gold answer (unanswerable questions need the "squad_v2" config).
    """
    scores = []
    for prediction, reference in pairs:
        gold_answers = reference["answers"]["text"]
        if not gold_answers:
            raise ValueError(
                f"The reference {reference['id']!r} has no gold answer. SQuAD v1.1 scoring needs at least one; load "
                "the metric with config 'squad_v2' to score unanswerable questions."
            )
        predicted = prediction["prediction_text"]
        scores.append(
            (
                max(exact_match_score(predicted, gold) for gold in gold_answers),
                max(f1_score(predicted, gold) for gold in gold_answers),
            )
        )
    return scores


def squad_v1_scores(pairs: list[tuple[dict, dict]]) -> dict[str, float]:
    """SQuAD v1.1 (and MRQA) corpus scores: mean over questions of the best EM and F1 against any gold answer.

    Raises:
        `ValueError`: a reference has no gold answer (unanswerable questions need the "squad_v2" config).
    """
    scores = squad_v1_question_scores(pairs)
    exact_match = sum(exact for exact, _ in scores)
    f1 = sum(score for _, score in scores)
    return {"exact_match": 100.0 * exact_match / len(pairs), "f1": 100.0 * f1 / len(pairs)}


@dataclass
class _ScoredQuestion:
    """One SQuAD v2.0 question with its raw scores (before any no-answer threshold), both in [0, 1]."""

    has_answer: bool
    prediction_text: str
    no_answer_probability: float
    exact: float
    f1: float


def _score_v2_question(prediction: dict, reference: dict) -> _ScoredQuestion:
    # As in the official v2.0 script: "answerable" looks at the raw gold list, but gold answers that normalise to
    # nothing are dropped before scoring, and a question left with none is scored against "".
    gold_texts = reference["answers"]["text"]
    gold_answers = [gold for gold in gold_texts if normalize_answer(gold)] or [""]
    predicted = prediction["prediction_text"]
    return _ScoredQuestion(
        has_answer=bool(gold_texts),
        prediction_text=predicted,
        no_answer_probability=prediction["no_answer_probability"],
        exact=max(exact_match_score(predicted, gold) for gold in gold_answers),
        f1=max(f1_score(predicted, gold, empty_matches_empty=True) for gold in gold_answers),
    )


def _thresholded_totals(questions: list[_ScoredQuestion], no_answer_threshold: float) -> dict[str, float | int]:
    """Corpus "exact" and "f1" (percent) and "total" once predictions above the threshold become "no answer"."""
    exact, f1 = 0.0, 0.0
    for question in questions:
        if question.no_answer_probability > no_answer_threshold:
            exact += float(not question.has_answer)
            f1 += float(not question.has_answer)
        else:
            exact += question.exact
            f1 += question.f1
    return {"exact": 100.0 * exact / len(questions), "f1": 100.0 * f1 / len(questions), "total": len(questions)}


def _best_threshold(questions: list[_ScoredQuestion], score_name: str) -> tuple[float, float]:
    """The best corpus score (percent) over no-answer thresholds, and the threshold that reaches it.

    Follows the official v2.0 scan: start with every question answered "no answer" (reported as threshold 0.0), then
    answer the questions one by one in increasing `no_answer_probability` (ties in prediction order). Answering an
    answerable question adds its raw score; answering an unanswerable one costs 1 when the prediction text is not
    empty (the raw text, before normalisation). The threshold is the probability of the last question answered.
    """
    current = sum(not question.has_answer for question in questions)
    best, best_threshold = current, 0.0
    for question in sorted(questions, key=lambda question: question.no_answer_probability):
        if question.has_answer:
            current += getattr(question, score_name)
        elif question.prediction_text:
            current -= 1
        if current > best:
            best, best_threshold = current, question.no_answer_probability
    return 100.0 * best / len(questions), best_threshold


def squad_v2_scores(pairs: list[tuple[dict, dict]], no_answer_threshold: float = 1.0) -> dict[str, float | int]:
    """SQuAD v2.0 corpus scores with the keys and semantics of the official v2.0 evaluation script.

    Args:
        pairs (`list[tuple[dict, dict]]`): (prediction, reference) per question, from [`pair_by_id`].
        no_answer_threshold (`float`, *optional*, defaults to 1.0): predictions whose `no_answer_probability` is
            strictly greater count as "no answer" in "exact", "f1" and the HasAns/NoAns breakdown.

    Returns:
        `dict`: "exact", "f1", "total", then "HasAns_*" and "NoAns_*" (each only when that subset is not empty, as
        the official script does), then "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh".
    """
    questions = [_score_v2_question(prediction, reference) for prediction, reference in pairs]
    scores = _thresholded_totals(questions, no_answer_threshold)
    for prefix, has_answer in (("HasAns", True), ("NoAns", False)):
        subset = [question for question in questions if question.has_answer == has_answer]
        if subset:
            subset_scores = _thresholded_totals(subset, no_answer_threshold)
            scores.update({f"{prefix}_{name}": value for name, value in subset_scores.items()})
    for score_name in ("exact", "f1"):
        best, best_threshold = _best_threshold(questions, score_name)
        scores[f"best_{score_name}"] = best
        scores[f"best_{score_name}_thresh"] = best_threshold
    return scores


def _answer_texts_only(reference: dict) -> dict:
    """The reference with its answers reduced to {"text": [...]}, the only part that is scored.

    `evaluate` accepts a nested dict only when it has exactly the declared keys, so declaring "answer_start" would
    reject MRQA-style references without it, and not declaring it would reject SQuAD references that have it.
    Declaring "text" alone and dropping the rest accepts both.
    """
    answers = reference.get("answers") if isinstance(reference, dict) else None
    if not isinstance(answers, dict) or "text" not in answers:
        raise ValueError(
            f"Each reference needs 'answers': {{'text': [gold answer strings]}} ('answer_start' is optional); got "
            f"{reference!r}."
        )
    return {**reference, "answers": {"text": answers["text"]}}


class SquadBlockSkim(evaluate.Metric):
    """SQuAD v1.1 / MRQA (config "squad", the default) and SQuAD v2.0 (config "squad_v2") Exact Match and F1."""

    @property
    def _version_2_with_negative(self) -> bool:
        return self.config_name == "squad_v2"

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in ("default", *CONFIG_NAMES):
            raise ValueError(
                f"Unknown config_name {self.config_name!r}; use 'squad' (SQuAD v1.1 and MRQA, the default) or "
                "'squad_v2' (SQuAD v2.0, with unanswerable questions)."
            )
        prediction_feature = {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")}
        if self._version_2_with_negative:
            # float64 keeps the caller's probabilities exact, so thresholds compare and report them unchanged.
            prediction_feature["no_answer_probability"] = datasets.Value("float64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": prediction_feature,
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": {"text": datasets.List(datasets.Value("string"))},
                    },
                }
            ),
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _check_prediction(self, prediction: dict) -> None:
        expected = set(self.features["predictions"])
        if not isinstance(prediction, dict) or set(prediction) != expected:
            hint = ""
            if isinstance(prediction, dict) and "no_answer_probability" in prediction:
                hint = " Predictions with a 'no_answer_probability' need the metric loaded with config 'squad_v2'."
            raise ValueError(
                f"Config {self.config_name!r} expects predictions with the keys {sorted(expected)}; got "
                f"{prediction!r}.{hint}"
            )

    def add_batch(
        self, *, predictions: list[dict] | None = None, references: list[dict] | None = None, **kwargs
    ) -> None:
        """Add a batch of predictions and references, checked and with each reference reduced to its answer texts."""
        for prediction in predictions or []:
            self._check_prediction(prediction)
        if references is not None:
            references = [_answer_texts_only(reference) for reference in references]
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction: dict | None = None, reference: dict | None = None, **kwargs) -> None:
        """Add one prediction and its reference, checked and with the reference reduced to its answer texts."""
        if prediction is not None:
            self._check_prediction(prediction)
        if reference is not None:
            reference = _answer_texts_only(reference)
        super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(
        self, predictions: list[dict], references: list[dict], no_answer_threshold: float | None = None
    ) -> dict[str, float | int]:
        pairs = pair_by_id(predictions, references)
        if not pairs:
            raise ValueError("There are no predictions to score; pass at least one prediction and its reference.")
        if self._version_2_with_negative:
            return squad_v2_scores(pairs, 1.0 if no_answer_threshold is None else no_answer_threshold)
        if no_answer_threshold is not None:
            raise ValueError(
                f"no_answer_threshold={no_answer_threshold!r} only applies to SQuAD v2.0; load the metric with "
                "config 'squad_v2' (and give every prediction a 'no_answer_probability') to use it."
            )
        return squad_v1_scores(pairs)
