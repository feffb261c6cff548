"""Extractive-QA data: file readers, windowed features, block-multiple padding and answer post-processing.

The importable counterpart of the data handling in Hugging Face's `examples/pytorch/question-answering`
(`run_qa.py` pre-processing and `utils_qa.py` post-processing), so that a training script, a notebook and the tests
share one implementation:

1. **Readers** turn nested SQuAD JSON (v1.1 and v2.0), flattened SQuAD records (JSON lines like the Hub `squad` data
   set) and MRQA 2019 JSON lines into a `datasets.Dataset` with the Hub `squad` columns (`id`, `title`, `context`,
   `question`, `answers = {"text": [...], "answer_start": [...]}`; an unanswerable question has empty lists). The
   format is detected from the content (gzip from its magic bytes), never from the file name. Every record is
   checked; a bad one raises a `QADataError` (a `ValueError`) naming the file and the record, or, with
   `skip_invalid=True`, is skipped and counted in the returned `ReadReport`.
2. **Pre-processing** (`prepare_train_features`, `prepare_eval_features`, for `Dataset.map(batched=True)`) cuts each
   question + context into overlapping windows of at most `max_seq_length` tokens. Nothing is padded here: the
   collator (`qa_data_collator`) pads each batch to a multiple of the Block-Skim block size, so padding never fills
   whole blocks (REFERENCE section 3, point 1).
3. **Post-processing** (`postprocess_qa_predictions`) groups the windows of each question and decodes them with the
   span search shared with the pipeline (`decoding_blockskim.decode_answers`).

MRQA answers: MRQA is scored against its `answers` strings, which need not occur in the context (aliases, other
casing), while training needs character offsets. The MRQA reader therefore fills `answers` from `detected_answers`
(one entry per distinct character span, in file order; `text` is the exact context slice, so
`context[answer_start:answer_start + len(text)] == text` holds as for SQuAD) and keeps the official strings in one
extra column, `reference_texts`. `postprocess_qa_predictions` scores against `reference_texts` whenever the examples
have that column.

Library only: not part of the remote code that travels with checkpoints.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import math
import os
import re
import string
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, List, Value
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from .decoding_blockskim import WindowLogits, decode_answers

logger = logging.getLogger(__name__)

QAFormat = Literal["squad_nested", "squad_flat", "mrqa"]
"""File formats the readers understand: nested SQuAD JSON, flattened SQuAD records, MRQA 2019 JSON lines."""

RecordErrorKind = Literal["unreadable_json", "missing_field", "invalid_value", "answer_mismatch", "duplicate_id"]
"""Why a record was rejected; `ReadReport.skipped_by_kind` counts skipped records by these names."""

SQUAD_FEATURES = Features(
    {
        "id": Value("string"),
        "title": Value("string"),
        "context": Value("string"),
        "question": Value("string"),
        "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
    }
)
"""Columns of every data set the readers return (the Hub `squad` / `squad_v2` schema)."""

MRQA_FEATURES = Features({**SQUAD_FEATURES, "reference_texts": List(Value("string"))})
"""MRQA data sets add `reference_texts`: the official answer strings the predictions are scored against."""

EVAL_ONLY_COLUMNS: tuple[str, ...] = ("example_id", "offset_mapping", "cls_index")
"""Columns of evaluation features that post-processing needs and the model must not receive."""


# ----------------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------------


class QADataError(ValueError):
    """A data file, or one record in it, cannot be used.

    Args:
        path (`str`): the file.
        location (`str` or `None`): where in the file: a JSON path such as `data[3].paragraphs[0].qas[2] (id
            '5733be28')`, a line such as `line 7 (id 'q7')`, or a line and column of broken JSON; `None` when the
            problem concerns the whole file.
        reason (`str`): what is wrong, with the offending value.
        kind (`str`, *optional*): the `RecordErrorKind` of a bad record (which `skip_invalid=True` would skip);
            `None` for problems no record-skipping can fix.
    """

    def __init__(self, path: str, location: str | None, reason: str, kind: str | None = None):
        self.path, self.location, self.reason, self.kind = path, location, reason, kind
        where = f"{path}: {location}" if location else path
        hint = " Fix the record, or pass skip_invalid=True to skip and count such records." if kind else ""
        super().__init__(f"{where}: {reason}.{hint}")


@dataclass(frozen=True)
class SkippedRecord:
    """One record left out by `skip_invalid=True`: where it is, why (`kind`, one of `RecordErrorKind`), and details."""

    location: str
    kind: str
    reason: str


@dataclass
class ReadReport:
    """What a reader did with one file.

    Args:
        path (`str`): the file.
        format (`QAFormat`): the detected format.
        num_examples (`int`): questions in the returned data set.
        skipped (`list[SkippedRecord]`): every record left out; a record is one question, or a whole line or
            paragraph whose questions cannot be told apart (an unreadable JSON line, a paragraph without `qas`).
    """

    path: str
    format: QAFormat
    num_examples: int
    skipped: list[SkippedRecord] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def skipped_by_kind(self) -> dict[str, int]:
        return dict(Counter(record.kind for record in self.skipped))


class _RecordError(Exception):
    """Raised by the record checks; the reader adds the file and the location."""

    def __init__(self, kind: RecordErrorKind, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _require(record: Any, key: str, expected: type | tuple[type, ...], what: str) -> Any:
    """`record[key]`, checked to be an `expected` (a `bool` only passes when `bool` is expected)."""
    if not isinstance(record, dict):
        raise _RecordError("invalid_value", f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise _RecordError("missing_field", f"missing field {key!r} ({what})")
    value = record[key]
    expected = expected if isinstance(expected, tuple) else (expected,)
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        raise _RecordError("invalid_value", f"field {key!r} must be {what}, got {value!r:.80}")
    return value


def _require_text(record: Any, key: str, what: str) -> str:
    value = _require(record, key, str, what)
    if not value.strip():
        raise _RecordError("invalid_value", f"field {key!r} ({what}) is empty")
    return value


def _require_id(record: Any, key: str) -> str:
    value = _require(record, key, (str, int), "a non-empty string")
    if not str(value):
        raise _RecordError("invalid_value", f"field {key!r} (the question id) is empty")
    return str(value)


def _check_span(context: str, text: str, start: Any, index: int) -> None:
    if isinstance(start, bool) or not isinstance(start, int):
        raise _RecordError("invalid_value", f"answer {index}: answer_start must be an int, got {start!r}")
    if not text.strip():
        raise _RecordError("invalid_value", f"answer {index}: the answer text is empty")
    found = context[start : start + len(text)] if 0 <= start <= len(context) else ""
    if found != text:
        raise _RecordError(
            "answer_mismatch",
            f"answer {index} {text!r} does not match the context at answer_start={start} "
            f"(the context has {found!r} there; the context is {len(context)} characters long)",
        )


def _squad_answers(raw: Any, context: str) -> tuple[list[str], list[int]]:
    """Answers as SQuAD lists: `[{"text", "answer_start"}, ...]` or `{"text": [...], "answer_start": [...]}`."""
    if isinstance(raw, dict):
        texts = _require(raw, "text", list, "a list of answer strings")
        starts = _require(raw, "answer_start", list, "a list of character offsets")
        if len(texts) != len(starts):
            raise _RecordError(
                "invalid_value", f"answers has {len(texts)} texts but {len(starts)} answer_start values"
            )
    elif isinstance(raw, list):
        texts = [_require(answer, "text", str, "the answer string") for answer in raw]
        starts = [_require(answer, "answer_start", int, "a character offset") for answer in raw]
    else:
        raise _RecordError("invalid_value", f"answers must be a list or a dict of lists, got {raw!r:.80}")
    for index, (text, start) in enumerate(zip(texts, starts, strict=True)):
        if not isinstance(text, str):
            raise _RecordError("invalid_value", f"answer {index}: the text must be a string, got {text!r}")
        _check_span(context, text, start, index)
    return texts, starts


def _squad_example(qa: Any, context: str, title: str) -> dict[str, Any]:
    """One SQuAD question (nested `qas` entry or flattened record) as a row of `SQUAD_FEATURES`."""
    question_id = _require_id(qa, "id")
    question = _require_text(qa, "question", "the question")
    is_impossible = qa.get("is_impossible")
    if is_impossible is not None and not isinstance(is_impossible, bool):
        raise _RecordError("invalid_value", f"field 'is_impossible' must be true or false, got {is_impossible!r}")
    texts, starts = _squad_answers(_require(qa, "answers", (list, dict), "the answers"), context)
    if is_impossible and texts:
        raise _RecordError("invalid_value", f"is_impossible is true but the question has {len(texts)} answer(s)")
    if is_impossible is False and not texts:
        raise _RecordError("invalid_value", "is_impossible is false but the question has no answers")
    return {
        "id": question_id,
        "title": title,
        "context": context,
        "question": question,
        "answers": {"text": texts, "answer_start": starts},
    }


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def _loose(text: str) -> str:
    """Case, punctuation and spacing removed: MRQA's `detected_answers.text` is a normalised string."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _mrqa_example(qa: Any, context: str) -> dict[str, Any]:
    """One MRQA `qas` entry as a row of `MRQA_FEATURES` (char spans are inclusive at the end)."""
    question_id = _require_id(qa, "qid")
    question = _require_text(qa, "question", "the question")
    reference_texts = _require(qa, "answers", list, "the list of answer strings")
    if not all(isinstance(text, str) for text in reference_texts):
        raise _RecordError("invalid_value", f"field 'answers' must hold strings, got {reference_texts!r:.80}")
    is_impossible = qa.get("is_impossible", False)
    if not isinstance(is_impossible, bool):
        raise _RecordError("invalid_value", f"field 'is_impossible' must be true or false, got {is_impossible!r}")
    detected = [] if is_impossible else _require(qa, "detected_answers", list, "the answer spans in the context")
    spans: dict[tuple[int, int], str] = {}
    for index, answer in enumerate(detected):
        text = _require(answer, "text", str, "the detected answer string")
        for char_span in _require(answer, "char_spans", list, "inclusive [start, end] character spans"):
            if (
                not isinstance(char_span, list)
                or len(char_span) != 2
                or not all(isinstance(value, int) and not isinstance(value, bool) for value in char_span)
            ):
                raise _RecordError("invalid_value", f"detected answer {index}: bad char span {char_span!r}")
            start, end = char_span[0], char_span[1] + 1  # MRQA ends are inclusive
            if not 0 <= start < end <= len(context):
                raise _RecordError(
                    "answer_mismatch",
                    f"detected answer {index} {text!r}: char span {char_span} lies outside the context "
                    f"({len(context)} characters)",
                )
            if _loose(context[start:end]) != _loose(text):
                raise _RecordError(
                    "answer_mismatch",
                    f"detected answer {index} {text!r} does not match the context at char span {char_span} "
                    f"(inclusive end; the context has {context[start:end]!r} there)",
                )
            spans.setdefault((start, end), context[start:end])
    if not is_impossible and not spans:
        raise _RecordError("missing_field", "no detected answer span (MRQA questions are answerable)")
    if not is_impossible and not reference_texts:
        raise _RecordError("missing_field", "field 'answers' is empty (MRQA scores against these strings)")
    return {
        "id": question_id,
        "title": "",
        "context": context,
        "question": question,
        "answers": {"text": list(spans.values()), "answer_start": [start for start, _ in spans]},
        "reference_texts": reference_texts,
    }


class _Collector:
    """Accumulates the rows of one file, rejects duplicate ids, and raises or counts bad records."""

    def __init__(self, path: str, skip_invalid: bool):
        self.path, self.skip_invalid = path, skip_invalid
        self.rows: list[dict[str, Any]] = []
        self.ids: set[str] = set()
        self.skipped: list[SkippedRecord] = []

    def reject(self, location: str, error: _RecordError) -> None:
        if not self.skip_invalid:
            raise QADataError(self.path, location, error.reason, error.kind) from None
        self.skipped.append(SkippedRecord(location, error.kind, error.reason))

    def add(self, location: str, make_row: Callable[..., dict[str, Any]], *args: Any) -> None:
        """Adds `make_row(*args)`, or rejects the record at `location` when that fails or its id repeats."""
        try:
            row = make_row(*args)
            if row["id"] in self.ids:
                raise _RecordError("duplicate_id", f"the question id {row['id']!r} was already used in this file")
        except _RecordError as error:
            self.reject(location, error)
            return
        self.ids.add(row["id"])
        self.rows.append(row)


def _qa_location(prefix: str, qa: Any, id_key: str) -> str:
    question_id = qa.get(id_key) if isinstance(qa, dict) else None
    return f"{prefix} ({id_key} {question_id!r})" if isinstance(question_id, (str, int)) else prefix


def _add_questions(
    collector: _Collector,
    location: str,
    container: Any,
    read_context: Callable[[Any], str],
    make_row: Callable[..., dict[str, Any]],
    id_key: str,
    *args: Any,
) -> None:
    """Adds the `qas` of a paragraph (SQuAD) or context line (MRQA): `make_row(qa, context, *args)` per question.

    A container without a `qas` list is one rejected record; when only its context is bad, each of its questions is
    rejected with that reason, so the report counts questions whenever they can be told apart.
    """
    try:
        qas = _require(container, "qas", list, "the list of questions")
    except _RecordError as error:
        collector.reject(location, error)
        return
    try:
        context: str | _RecordError = read_context(container)
    except _RecordError as error:
        context = error
    separator = ", " if location.startswith("line") else "."
    for qa_index, qa in enumerate(qas):
        qa_location = _qa_location(f"{location}{separator}qas[{qa_index}]", qa, id_key)
        if isinstance(context, _RecordError):
            collector.reject(qa_location, context)
        else:
            collector.add(qa_location, make_row, qa, context, *args)


def _read_context(container: Any) -> str:
    return _require_text(container, "context", "the context text")


def _read_title(article: Any) -> str:
    title = article.get("title", "") if isinstance(article, dict) else ""
    if not isinstance(title, str):
        raise _RecordError("invalid_value", f"field 'title' must be a string, got {title!r:.80}")
    return title


def _read_squad_nested(document: Any, collector: _Collector) -> None:
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise QADataError(
            collector.path,
            None,
            "not a QA file: expected nested SQuAD JSON (a top-level 'data' list), SQuAD records (JSON lines or a "
            "JSON list) or MRQA JSON lines",
        )
    for article_index, article in enumerate(document["data"]):
        article_location = f"data[{article_index}]"
        try:
            paragraphs = _require(article, "paragraphs", list, "the article's paragraphs")
            title = _read_title(article)
        except _RecordError as error:
            collector.reject(article_location, error)
            continue
        for paragraph_index, paragraph in enumerate(paragraphs):
            paragraph_location = f"{article_location}.paragraphs[{paragraph_index}]"
            _add_questions(collector, paragraph_location, paragraph, _read_context, _squad_example, "id", title)


def _flat_example(record: Any) -> dict[str, Any]:
    return _squad_example(record, _read_context(record), _read_title(record))


def _record_kind(value: Any) -> Literal["header", "mrqa", "squad_flat"] | None:
    """The line format a parsed JSON value belongs to, or `None` when it is no QA record."""
    if not isinstance(value, dict):
        return None
    if "header" in value:
        return "header"
    if "qas" in value:
        return "mrqa"
    if "question" in value:
        return "squad_flat"
    return None


def _read_lines(lines: Iterable[tuple[int, str]], line_format: QAFormat, collector: _Collector) -> None:
    """Reads numbered JSON lines: flattened SQuAD records or MRQA contexts (header lines are passed over)."""
    for line_number, line in lines:
        if not line.strip():
            continue
        location = f"line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            collector.reject(location, _RecordError("unreadable_json", f"not valid JSON ({error})"))
            continue
        if _record_kind(record) == "header":
            continue
        if line_format == "mrqa":
            _add_questions(collector, location, record, _read_context, _mrqa_example, "qid")
        else:
            collector.add(_qa_location(location, record, "id"), _flat_example, record)


def _read_document(document: Any, collector: _Collector) -> QAFormat:
    """Reads one parsed JSON document: nested SQuAD, or a list of flattened SQuAD records."""
    if isinstance(document, list):
        for index, record in enumerate(document):
            collector.add(_qa_location(f"[{index}]", record, "id"), _flat_example, record)
        return "squad_flat"
    _read_squad_nested(document, collector)
    return "squad_nested"


def _open_text(path: str) -> TextIO:
    """The file as UTF-8 text, gunzipped when it starts with the gzip magic bytes (whatever its name)."""
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    if compressed:
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _line_format(record: Any) -> QAFormat | None:
    kind = _record_kind(record)
    return None if kind is None else "squad_flat" if kind == "squad_flat" else "mrqa"


def _read_file(path: str, collector: _Collector) -> QAFormat:
    """Detects the format from the content and reads the file into `collector`.

    A first line that is a QA record (or an MRQA header) means JSON lines, which are streamed; anything else is read
    as one JSON document. A file that is no valid JSON document but has QA records on later lines is JSON lines with
    a broken first record (which is then reported like any other bad line).
    """
    with _open_text(path) as stream:
        head, first_line = [], ""
        for first_line in stream:
            head.append(first_line)
            if first_line.strip():
                break
        if not first_line.strip():
            raise QADataError(path, None, "the file is empty")
        first_record = _json_or_none(first_line)
        line_format = _line_format(first_record)
        if line_format is not None:
            numbered = itertools.chain([(len(head), first_line)], enumerate(stream, start=len(head) + 1))
            _read_lines(numbered, line_format, collector)
            return line_format
        rest = stream.read()
    if first_record is not None and not rest.strip():  # a one-line document, already parsed
        return _read_document(first_record, collector)
    text = "".join(head) + rest
    try:
        document = json.loads(text)
    except json.JSONDecodeError as document_error:
        lines = list(enumerate(text.splitlines(), start=1))
        line_format = next(
            (found for _, line in lines[len(head) :] if (found := _line_format(_json_or_none(line))) is not None),
            None,
        )
        if line_format is None:
            raise QADataError(
                path,
                f"line {document_error.lineno}, column {document_error.colno}",
                f"not valid JSON ({document_error.msg}); expected nested SQuAD JSON, SQuAD records as JSON lines, "
                "or MRQA JSON lines",
            ) from None
        _read_lines(lines, line_format, collector)
        return line_format
    return _read_document(document, collector)


def load_qa_dataset(path: str | os.PathLike, *, skip_invalid: bool = False) -> tuple[Dataset, ReadReport]:
    """Reads one extractive-QA file into a `Dataset` with the Hub `squad` columns.

    Understands, whatever the file is called (gzip is recognised by its magic bytes):
    - nested SQuAD JSON, v1.1 or v2.0 (`{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`); an
      `is_impossible` question gets empty answer lists, its `plausible_answers` are not read;
    - flattened SQuAD records, one JSON object per line like the Hub `squad` data set (or a JSON list of them):
      `{"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}`;
    - MRQA 2019 JSON lines: an optional `{"header": ...}` line, then one context per line with its `qas`. Answers
      come from `detected_answers` (inclusive character spans) and the official answer strings are kept in an extra
      `reference_texts` column (see the module docstring).

    Every record is checked: fields present and typed, question ids unique, each answer equal to the context text
    at its offset. A bad record raises `QADataError` (a `ValueError`) that names the file and the record (its JSON
    path such as `data[3].paragraphs[0].qas[2]` or its line number, with the question id). A file that cannot be
    read at all always raises.

    Args:
        path (`str` or `os.PathLike`): the file.
        skip_invalid (`bool`, *optional*, defaults to `False`): skip bad records instead of raising; they are
            counted in the report and logged as a warning.

    Returns:
        `tuple[Dataset, ReadReport]`: one row per question, in file order, and what happened to the file.

    Raises:
        `QADataError`: a bad record (unless `skip_invalid`), an unreadable file, or no example left.

    Example:

    ```python
    >>> from modeling_blockskim.data import load_qa_dataset
    >>> dataset, report = load_qa_dataset("dev-v2.0.json.gz")
    >>> dataset[0]["answers"]
    {'text': ['France', 'France', 'France', 'France'], 'answer_start': [159, 159, 159, 159]}
    ```
    """
    path = os.fspath(path)
    collector = _Collector(path, skip_invalid)
    try:
        file_format = _read_file(path, collector)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise QADataError(path, None, f"cannot be read as UTF-8 text or gzip ({error})") from None
    report = ReadReport(path=path, format=file_format, num_examples=len(collector.rows), skipped=collector.skipped)
    if report.skipped:
        first = report.skipped[0]
        logger.warning(
            "%s: skipped %d invalid record(s) (%s); the first, at %s: %s",
            path,
            report.num_skipped,
            ", ".join(f"{count} {kind}" for kind, count in report.skipped_by_kind.items()),
            first.location,
            first.reason,
        )
    if not collector.rows:
        raise QADataError(path, None, f"no usable example ({report.num_skipped} invalid record(s) skipped)")
    logger.info("%s: read %d questions (%s).", path, report.num_examples, file_format)
    features = MRQA_FEATURES if file_format == "mrqa" else SQUAD_FEATURES
    columns = {name: [row[name] for row in collector.rows] for name in features}
    return Dataset.from_dict(columns, features=features), report


def load_qa_dataset_dict(
    data_files: Mapping[str, str | os.PathLike], *, skip_invalid: bool = False
) -> tuple[DatasetDict, dict[str, ReadReport]]:
    """Reads one file per split (e.g. `{"train": ..., "validation": ..., "test": ...}`) with `load_qa_dataset`.

    Args:
        data_files (`Mapping[str, str | os.PathLike]`): split name to file.
        skip_invalid (`bool`, *optional*, defaults to `False`): see `load_qa_dataset`.

    Returns:
        `tuple[DatasetDict, dict[str, ReadReport]]`: the splits and, per split, its report.
    """
    if not data_files:
        raise ValueError("data_files is empty: give at least one split, e.g. {'validation': 'dev-v1.1.json'}.")
    splits, reports = {}, {}
    for split, path in data_files.items():
        splits[split], reports[split] = load_qa_dataset(path, skip_invalid=skip_invalid)
    return DatasetDict(splits), reports


# ----------------------------------------------------------------------------------------------------------------
# Pre-processing
# ----------------------------------------------------------------------------------------------------------------


def _tokenize_windows(
    examples: Mapping[str, Sequence[Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    doc_stride: int,
) -> tuple[Any, int]:
    """Overlapping windows of every example, with offsets; returns them and the sequence index of the context."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets need one (load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True))."
        )
    if not 0 < max_seq_length <= tokenizer.model_max_length:
        raise ValueError(
            f"max_seq_length={max_seq_length} must be in [1, tokenizer.model_max_length={tokenizer.model_max_length}]."
        )
    if not 0 <= doc_stride < max_seq_length:
        raise ValueError(f"doc_stride={doc_stride} must be in [0, max_seq_length={max_seq_length}).")
    question_first = tokenizer.padding_side == "right"
    questions = [question.lstrip() for question in examples["question"]]  # leading spaces only waste the window
    contexts = examples["context"]
    encoded = tokenizer(
        questions if question_first else contexts,
        contexts if question_first else questions,
        truncation="only_second" if question_first else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    return encoded, 1 if question_first else 0


def _cls_index(input_ids: list[int], tokenizer: PreTrainedTokenizerBase) -> int:
    cls_token_id = tokenizer.cls_token_id
    return input_ids.index(cls_token_id) if cls_token_id is not None and cls_token_id in input_ids else 0


def _model_inputs(encoded: Any) -> dict[str, list]:
    return {key: encoded[key] for key in encoded if key not in ("offset_mapping", "overflow_to_sample_mapping")}


def _answer_tokens(
    offsets: list[tuple[int, int]], sequence_ids: list[int | None], context_sequence: int, start: int, end: int
) -> tuple[int, int] | None:
    """First and last token of the characters `[start, end)` when the window's context holds all of them."""
    context_tokens = [index for index, sequence in enumerate(sequence_ids) if sequence == context_sequence]
    if not context_tokens or offsets[context_tokens[0]][0] > start or offsets[context_tokens[-1]][1] < end:
        return None
    start_token = next(index for index in context_tokens if offsets[index][1] > start)
    end_token = next(index for index in reversed(context_tokens) if offsets[index][0] < end)
    return (start_token, end_token) if start_token <= end_token else None


def prepare_train_features(
    examples: Mapping[str, Sequence[Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int = 384,
    doc_stride: int = 128,
) -> dict[str, list]:
    """Training windows with answer token positions, for `Dataset.map(batched=True)`.

    Each example becomes one or more windows of at most `max_seq_length` tokens, `[CLS] question [SEP] context
    [SEP]` (context first when `tokenizer.padding_side == "left"`), consecutive windows sharing `doc_stride` tokens
    of context. `start_positions`/`end_positions` are the first and last token of the first answer when the window
    holds the whole answer, else the [CLS] index (also for unanswerable questions). Windows are not padded: pad
    batches with `qa_data_collator`.

    Args:
        examples (`Mapping[str, Sequence]`): a batch of rows with `question`, `context` and `answers`.
        tokenizer (`PreTrainedTokenizerBase`): a fast tokenizer (offsets are needed).
        max_seq_length (`int`, *optional*, defaults to 384): tokens per window, special tokens included.
        doc_stride (`int`, *optional*, defaults to 128): context tokens shared by consecutive windows.

    Returns:
        `dict[str, list]`: the tokenizer's model inputs (`input_ids`, `attention_mask`, `token_type_ids` when the
        tokenizer makes them) plus `start_positions` and `end_positions`, one entry per window.

    Example:

    ```python
    >>> train_features = train_examples.map(
    ...     prepare_train_features,
    ...     batched=True,
    ...     remove_columns=train_examples.column_names,
    ...     fn_kwargs={"tokenizer": tokenizer, "max_seq_length": 384, "doc_stride": 128},
    ... )
    ```
    """
    encoded, context_sequence = _tokenize_windows(examples, tokenizer, max_seq_length, doc_stride)
    features = _model_inputs(encoded)
    features.update(_answer_positions(examples, encoded, context_sequence, tokenizer))
    return features


def _answer_positions(
    examples: Mapping[str, Sequence[Any]], encoded: Any, context_sequence: int, tokenizer: PreTrainedTokenizerBase
) -> dict[str, list[int]]:
    """Per window, the first/last token of the example's first answer, or the [CLS] index when not all inside."""
    positions: dict[str, list[int]] = {"start_positions": [], "end_positions": []}
    for index, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
        answers = examples["answers"][example_index]
        span = None
        if answers["answer_start"]:
            start = answers["answer_start"][0]
            span = _answer_tokens(
                encoded["offset_mapping"][index],
                encoded.sequence_ids(index),
                context_sequence,
                start,
                start + len(answers["text"][0]),
            )
        if span is None:
            cls_index = _cls_index(encoded["input_ids"][index], tokenizer)
            span = (cls_index, cls_index)
        positions["start_positions"].append(span[0])
        positions["end_positions"].append(span[1])
    return positions


def prepare_eval_features(
    examples: Mapping[str, Sequence[Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    with_answer_positions: bool = False,
) -> dict[str, list]:
    """Evaluation windows that remember their example and where their context tokens are, for `Dataset.map`.

    Windows as in `prepare_train_features`. Post-processing needs three extra columns, which the model must not
    receive (drop them with `remove_eval_only_columns` before collation):
    - `example_id`: the `id` of the example the window comes from;
    - `offset_mapping`: per token, `[char_start, char_end]` in the context for context tokens, `None` otherwise;
    - `cls_index`: the position of the [CLS] token, which stands for "no answer".

    Args:
        examples (`Mapping[str, Sequence]`): a batch of rows with `id`, `question` and `context`.
        tokenizer (`PreTrainedTokenizerBase`): a fast tokenizer.
        max_seq_length (`int`, *optional*, defaults to 384): tokens per window, special tokens included.
        doc_stride (`int`, *optional*, defaults to 128): context tokens shared by consecutive windows.
        with_answer_positions (`bool`, *optional*, defaults to `False`): also add `start_positions` and
            `end_positions` as in `prepare_train_features` (needs `answers`), so evaluation can report the loss and
            how well the skim predictors find the answer blocks.

    Returns:
        `dict[str, list]`: the tokenizer's model inputs plus `example_id`, `offset_mapping` and `cls_index` (and
        the answer positions when asked).

    Example:

    ```python
    >>> eval_features = eval_examples.map(
    ...     prepare_eval_features,
    ...     batched=True,
    ...     remove_columns=eval_examples.column_names,
    ...     fn_kwargs={"tokenizer": tokenizer},
    ... )
    >>> model_inputs = remove_eval_only_columns(eval_features)
    ```
    """
    encoded, context_sequence = _tokenize_windows(examples, tokenizer, max_seq_length, doc_stride)
    features = _model_inputs(encoded)
    features["example_id"], features["offset_mapping"], features["cls_index"] = [], [], []
    for index, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
        sequence_ids = encoded.sequence_ids(index)
        features["example_id"].append(examples["id"][example_index])
        features["offset_mapping"].append(
            [
                list(offset) if sequence == context_sequence else None
                for offset, sequence in zip(encoded["offset_mapping"][index], sequence_ids, strict=True)
            ]
        )
        features["cls_index"].append(_cls_index(encoded["input_ids"][index], tokenizer))
    if with_answer_positions:
        features.update(_answer_positions(examples, encoded, context_sequence, tokenizer))
    return features


def remove_eval_only_columns(features: Dataset) -> Dataset:
    """The evaluation features without `EVAL_ONLY_COLUMNS`, ready for the collator and the model.

    Keep the full features for `postprocess_qa_predictions`; the Trainer's `remove_unused_columns` would drop these
    columns as well, but only after they reach a collator that cannot pad strings and `None`s.
    """
    return features.remove_columns([name for name in EVAL_ONLY_COLUMNS if name in features.column_names])


@dataclass
class _RightPaddingDataCollator(DataCollatorWithPadding):
    """`DataCollatorWithPadding` that pads on the right even when the tokenizer pads on the left.

    Window positions (`start_positions`, `offset_mapping`, `cls_index`) are computed on unpadded windows, so padding
    must come after the tokens; left padding would shift every position by the padding length.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.tokenizer.pad(
            features,
            padding=self.padding,
            max_length=self.max_length,
            pad_to_multiple_of=self.pad_to_multiple_of,
            padding_side="right",
            return_tensors=self.return_tensors,
        )


def qa_data_collator(
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 32,
    *,
    pad_to_max_length: bool = False,
    max_seq_length: int | None = None,
) -> DataCollatorWithPadding:
    """A collator that pads each batch on the right to a multiple of the block size.

    transformers' `DataCollatorWithPadding(tokenizer, pad_to_multiple_of=block_size)` does exactly this for windows
    from `prepare_train_features` (the scalar `start_positions`/`end_positions` become tensors untouched) and for
    evaluation windows once `remove_eval_only_columns` has removed their string and `None` columns, so it is what
    this returns for right-padding tokenizers. For left-padding tokenizers it returns a subclass that still pads on
    the right, because the positions in the features were computed before padding.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer that made the features.
        block_size (`int`, *optional*, defaults to 32): the model's `config.block_size`; batches are padded to a
            multiple of it, so padding never fills a whole block.
        pad_to_max_length (`bool`, *optional*, defaults to `False`): pad every batch to `max_seq_length` instead
            (static shapes, e.g. for benchmarks against the original code; it wastes compute on padding).
        max_seq_length (`int`, *optional*): the length to pad to with `pad_to_max_length`; must then be a multiple
            of `block_size`.

    Returns:
        `DataCollatorWithPadding` returning PyTorch tensors.

    Example:

    ```python
    >>> collator = qa_data_collator(tokenizer, block_size=model.config.block_size)
    >>> batch = collator([train_features[i] for i in range(8)])
    >>> batch["input_ids"].shape[1] % model.config.block_size
    0
    ```
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int (the model's config.block_size), got {block_size!r}.")
    if pad_to_max_length and (max_seq_length is None or max_seq_length % block_size != 0):
        raise ValueError(
            f"pad_to_max_length=True needs max_seq_length, a multiple of block_size={block_size}; got "
            f"max_seq_length={max_seq_length!r} (e.g. 384 or 512 for block_size 32)."
        )
    collator_class = DataCollatorWithPadding if tokenizer.padding_side == "right" else _RightPaddingDataCollator
    return collator_class(
        tokenizer,
        padding="max_length" if pad_to_max_length else True,
        max_length=max_seq_length if pad_to_max_length else None,
        pad_to_multiple_of=block_size,
        return_tensors="pt",
    )


# ----------------------------------------------------------------------------------------------------------------
# Post-processing
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class QAPredictions:
    """Decoded answers, in the shapes `evaluate`'s `squad` / `squad_v2` metrics take.

    Unpacks as `(predictions, references)`, the pair a `BlockSkimTrainer` post-processing function returns.

    Args:
        predictions (`list[dict]`): `{"id", "prediction_text"}` per example, plus `"no_answer_probability"` with
            `version_2_with_negative`.
        references (`list[dict]`): `{"id", "answers": {"text": [...], "answer_start": [...]}}` per example.
        n_best (`dict[str, list[dict]]`): per example id, the best answers as `decode_answers` returns them
            (`{"score", "start", "end", "answer"}`, best first; with `version_2_with_negative` the null answer is
            among them as `{"answer": "", "start": 0, "end": 0}`).
    """

    predictions: list[dict[str, Any]]
    references: list[dict[str, Any]]
    n_best: dict[str, list[dict[str, Any]]]

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return iter((self.predictions, self.references))


def _logit_rows(logits: Any, name: str) -> Sequence[torch.Tensor]:
    """Rows of a `(num_features, length)` array or tensor, or of a list of 1-D arrays of any lengths."""
    if isinstance(logits, torch.Tensor):
        rows = logits.detach().cpu()
    elif isinstance(logits, np.ndarray) and logits.dtype != object:
        rows = torch.from_numpy(logits)
    else:
        rows = [torch.as_tensor(np.asarray(row)) for row in logits]
    if any(row.dim() != 1 for row in rows):
        raise ValueError(f"{name} must hold one 1-D row of logits per feature.")
    return rows


def _null_answer(answer: Mapping[str, Any]) -> bool:
    return answer["start"] == answer["end"] == 0 and answer["answer"] == ""


def _log(probability: float) -> float:
    return math.log(probability) if probability > 0 else -math.inf


def _references(examples: Dataset) -> list[dict[str, Any]]:
    """Scoring references; MRQA examples are scored against their `reference_texts` (offset -1 when absent)."""
    if "reference_texts" not in examples.column_names:
        return [{"id": row["id"], "answers": row["answers"]} for row in examples.select_columns(["id", "answers"])]
    return [
        {
            "id": row["id"],
            "answers": {
                "text": row["reference_texts"],
                "answer_start": [row["context"].find(text) for text in row["reference_texts"]],
            },
        }
        for row in examples.select_columns(["id", "context", "reference_texts"])
    ]


def postprocess_qa_predictions(
    examples: Dataset,
    features: Dataset,
    start_logits: Any,
    end_logits: Any,
    *,
    version_2_with_negative: bool = False,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> QAPredictions:
    """Answers per example from the start/end logits of its windows.

    The windows of each example (matched through `example_id`) become `WindowLogits` (context tokens keep their
    offsets, every other token gets `None`; the null position is the window's `cls_index`) and `decode_answers`
    searches all spans of at most `max_answer_length` tokens over all windows. Only a window's own tokens count:
    logits beyond its length (collator padding, or the -100 the Trainer fills in when it concatenates batches of
    different widths) are cut off.

    With `version_2_with_negative`, the null answer competes: the prediction is empty when
    `log(p_null) - log(p_best_span) > null_score_diff_threshold`, where `p_null` is `decode_answers`' null score
    (the smallest over the windows of `p_start([CLS]) * p_end([CLS])`) and `p_best_span` the best span's score. For
    one window this difference equals the logit difference `(s_cls + e_cls) - (s_i + e_j)` that `run_qa.py`
    thresholds, so thresholds keep their meaning. `no_answer_probability` is `p_null`.

    Args:
        examples (`Dataset`): the examples, with `id`, `context` and `answers` (and `reference_texts` for MRQA).
        features (`Dataset`): their windows from `prepare_eval_features`, in the order the logits come in.
        start_logits, end_logits (`np.ndarray`, `torch.Tensor` or list of 1-D arrays): one row per feature, of at
            least the feature's length.
        version_2_with_negative (`bool`, *optional*, defaults to `False`): questions may have no answer (SQuAD v2).
        n_best_size (`int`, *optional*, defaults to 20): answers kept per example in `n_best`.
        max_answer_length (`int`, *optional*, defaults to 30): longest answer, in tokens.
        null_score_diff_threshold (`float`, *optional*, defaults to 0.0): see above.

    Returns:
        `QAPredictions` with `predictions` and `references` for the `squad` (or `squad_v2`) metric and `n_best`; it
        unpacks as `(predictions, references)`.

    Example:

    ```python
    >>> output = trainer.predict(remove_eval_only_columns(eval_features))
    >>> start_logits, end_logits = output.predictions
    >>> predictions, references = postprocess_qa_predictions(eval_examples, eval_features, start_logits, end_logits)
    >>> squad_metric.compute(predictions=predictions, references=references)
    >>> # A BlockSkimTrainer takes it with the run's settings bound:
    >>> post_process_function = functools.partial(postprocess_qa_predictions, version_2_with_negative=True)
    ```
    """
    if n_best_size < 1:
        raise ValueError(f"n_best_size={n_best_size} must be >= 1.")
    missing = [name for name in ("example_id", "offset_mapping") if name not in features.column_names]
    if missing:
        raise ValueError(
            f"features lack {missing}: pass the full output of prepare_eval_features, not the model inputs."
        )
    start_rows, end_rows = _logit_rows(start_logits, "start_logits"), _logit_rows(end_logits, "end_logits")
    if not len(start_rows) == len(end_rows) == len(features):
        raise ValueError(
            f"got {len(start_rows)} start and {len(end_rows)} end logit rows for {len(features)} features; pass the "
            "predictions for exactly these features, in their order."
        )
    columns = [name for name in EVAL_ONLY_COLUMNS if name in features.column_names]
    windows_per_example: dict[str, list[WindowLogits]] = defaultdict(list)
    for index, feature in enumerate(features.select_columns(columns)):
        offsets = [tuple(offset) if offset is not None else None for offset in feature["offset_mapping"]]
        length = len(offsets)
        if start_rows[index].shape[0] < length or end_rows[index].shape[0] < length:
            raise ValueError(
                f"feature {index} has {length} tokens but only {start_rows[index].shape[0]} start and "
                f"{end_rows[index].shape[0]} end logits."
            )
        windows_per_example[feature["example_id"]].append(
            WindowLogits(
                start_logits=start_rows[index][:length],
                end_logits=end_rows[index][:length],
                offsets=offsets,
                null_index=feature.get("cls_index", 0),
            )
        )
    example_ids = list(examples["id"])
    unknown = set(windows_per_example) - set(example_ids)
    if unknown:
        raise ValueError(f"features refer to {len(unknown)} example id(s) not in examples, e.g. {min(unknown)!r}.")

    predictions, n_best = [], {}
    for example_id, context in zip(example_ids, examples["context"], strict=True):
        if example_id not in windows_per_example:
            raise ValueError(f"example {example_id!r} has no feature; make the features from these examples.")
        decoded = decode_answers(
            windows_per_example[example_id],
            context,
            top_k=n_best_size + int(version_2_with_negative),
            max_answer_len=max_answer_length,
            handle_impossible_answer=version_2_with_negative,
        )
        spans = [answer for answer in decoded.answers if not _null_answer(answer)]
        prediction: dict[str, Any] = {"id": example_id, "prediction_text": spans[0]["answer"] if spans else ""}
        if version_2_with_negative:
            null_score = decoded.null_score
            if spans and _log(null_score) - _log(spans[0]["score"]) > null_score_diff_threshold:
                prediction["prediction_text"] = ""
            prediction["no_answer_probability"] = null_score
        predictions.append(prediction)
        n_best[example_id] = decoded.answers[:n_best_size]
    return QAPredictions(predictions=predictions, references=_references(examples), n_best=n_best)


__all__ = [
    "EVAL_ONLY_COLUMNS",
    "MRQA_FEATURES",
    "SQUAD_FEATURES",
    "QADataError",
    "QAFormat",
    "QAPredictions",
    "ReadReport",
    "SkippedRecord",
    "load_qa_dataset",
    "load_qa_dataset_dict",
    "postprocess_qa_predictions",
    "prepare_eval_features",
    "prepare_train_features",
    "qa_data_collator",
    "remove_eval_only_columns",
]
