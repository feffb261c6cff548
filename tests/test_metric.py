"""The offline SQuAD metric: official answer normalisation, EM/F1 values worked out by hand, the SQuAD v2.0 breakdown
and no-answer threshold search, clear errors, and `evaluate.load` from a fresh cache with the network cut off."""

from __future__ import annotations

import ast
import inspect
import json
import os
import socket
import string
import subprocess
import sys
import textwrap

import evaluate
import pytest

from modeling_blockskim.metrics import SQUAD_METRIC_PATH, load_squad_metric


def _refuse_network(*args, **kwargs):
    raise OSError("network access during a metric test")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Hub offline mode on, and any socket connection or DNS lookup raises, so a test that reaches out fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", _refuse_network)
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse_network)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse_network)


@pytest.fixture
def squad():
    return load_squad_metric(keep_in_memory=True)


@pytest.fixture
def squad_v2():
    return load_squad_metric(version_2_with_negative=True, keep_in_memory=True)


@pytest.fixture
def normalize_answer(squad):
    """The normalisation function of the very module `evaluate` imported (its own copy, not the package file)."""
    return inspect.getmodule(type(squad)).normalize_answer


def _v1(question_id: str, prediction: str, gold_answers: list[str]) -> tuple[dict, dict]:
    reference = {"id": question_id, "answers": {"text": gold_answers, "answer_start": [0] * len(gold_answers)}}
    return {"id": question_id, "prediction_text": prediction}, reference


def _score_v1(squad, *questions: tuple[dict, dict]) -> dict:
    predictions, references = zip(*questions, strict=True)
    return squad.compute(predictions=list(predictions), references=list(references))


# Normalisation: lower-case, delete `string.punctuation`, delete the words a/an/the, collapse whitespace.


def test_normalize_lowercases_strips_punctuation_and_articles_and_collapses_whitespace(normalize_answer):
    assert normalize_answer("  The  Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple, a day,\tkeeps THE doctor\naway.") == "apple day keeps doctor away"


def test_articles_are_removed_only_as_whole_words_after_punctuation(normalize_answer):
    assert normalize_answer("Theatre, another anthem") == "theatre another anthem"
    assert normalize_answer("A-team") == "ateam"  # the hyphen goes first, so "A" is no longer a word of its own
    assert normalize_answer("The.") == ""


def test_only_ascii_string_punctuation_is_removed(normalize_answer):
    assert string.punctuation == "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    assert normalize_answer(string.punctuation) == ""
    # Unicode punctuation is kept: em dash, curly quotes, ellipsis, guillemets, inverted question mark, CJK marks.
    assert normalize_answer("“Hello,” she said—twice…") == "“hello” she said—twice…"
    assert normalize_answer("«Paris» ¿Qué?") == "«paris» ¿qué"
    assert normalize_answer("北京。東京、日本") == "北京。東京、日本"


def test_unicode_case_word_boundaries_and_whitespace(normalize_answer):
    assert normalize_answer("ÉCOLE Normale Supérieure") == "école normale supérieure"
    assert normalize_answer("ΑΘΗΝΑ") == "αθηνα"
    assert normalize_answer("Москва — столица") == "москва — столица"
    # "é" is a word character, so "thé" is not the article; the em dash is not, so "the" before it is.
    assert normalize_answer("Thé") == "thé"
    assert normalize_answer("the—end") == "—end"
    # No-break and ideographic spaces are whitespace too.
    assert normalize_answer("New\u00a0York\u3000City") == "new york city"


# SQuAD v1.1 / MRQA scoring: percent, max over gold answers, mean over questions.


def test_exact_match_ignores_case_punctuation_articles_and_whitespace(squad):
    scores = _score_v1(squad, _v1("q1", "the  Denver Broncos.", ["Denver Broncos"]))
    assert scores == {"exact_match": 100.0, "f1": 100.0}


def test_non_latin_answers_match_after_normalisation(squad):
    scores = _score_v1(squad, _v1("q1", "Москва!", ["москва"]), _v1("q2", "北京", ["北京。"]))
    # The ideographic full stop is not in `string.punctuation`, so "北京" and "北京。" differ (one token each).
    assert scores == {"exact_match": 50.0, "f1": 50.0}


def test_partial_overlap_f1_is_harmonic_mean_of_precision_and_recall(squad):
    # Prediction tokens [big, red, house], gold tokens [big, house, on, hill]: precision 2/3, recall 1/2, F1 4/7.
    scores = _score_v1(squad, _v1("q1", "the big red house", ["a big house on the hill"]))
    assert scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx(400 / 7, rel=1e-12)
    assert scores["f1"] == pytest.approx(57.142857142857, abs=1e-9)


def test_f1_counts_repeated_tokens_as_a_bag(squad):
    # Three "paris" against one: one shared token, precision 1/3, recall 1, F1 1/2.
    scores = _score_v1(squad, _v1("q1", "Paris Paris Paris", ["Paris"]))
    assert scores == {"exact_match": 0.0, "f1": 50.0}


def test_each_question_takes_its_best_gold_answer(squad):
    exact = _score_v1(squad, _v1("q1", "Denver Broncos", ["Broncos", "Denver Broncos", "the Denver team"]))
    assert exact == {"exact_match": 100.0, "f1": 100.0}
    # Against "house": precision 1/2, recall 1, F1 2/3; against "big house on": precision 1, recall 2/3, F1 4/5.
    partial = _score_v1(squad, _v1("q1", "big house", ["house", "big house on"]))
    assert partial["exact_match"] == 0.0
    assert partial["f1"] == pytest.approx(80.0, rel=1e-12)


def test_corpus_scores_are_the_mean_over_questions(squad):
    scores = _score_v1(
        squad,
        _v1("q1", "Denver Broncos", ["Denver Broncos"]),
        _v1("q2", "Paris Paris Paris", ["Paris"]),
        _v1("q3", "Rome", ["Paris"]),
        _v1("q4", "Berlin", ["berlin"]),
    )
    assert scores == {"exact_match": 50.0, "f1": pytest.approx((1 + 0.5 + 0 + 1) / 4 * 100, rel=1e-12)}


def test_v1_answer_that_normalises_to_nothing_matches_exactly_but_has_zero_f1(squad):
    # SQuAD v1.1 has no empty-answer rule: "" == "" for Exact Match, but no shared token for F1.
    assert _score_v1(squad, _v1("q1", "The", ["a"])) == {"exact_match": 100.0, "f1": 0.0}


def test_references_without_answer_start_are_scored_on_their_texts(squad):
    """MRQA answers may come without character offsets: an empty or absent "answer_start" changes nothing."""
    predictions = [{"id": question_id, "prediction_text": "Paris"} for question_id in ("with", "empty", "absent")]
    references = [
        {"id": "with", "answers": {"text": ["Paris"], "answer_start": [7]}},
        {"id": "empty", "answers": {"text": ["Paris", "the city of Paris"], "answer_start": []}},
        {"id": "absent", "answers": {"text": ["Paris, France"]}},
    ]
    scores = squad.compute(predictions=predictions, references=references)
    assert scores == {"exact_match": pytest.approx(200 / 3, rel=1e-12), "f1": pytest.approx(800 / 9, rel=1e-12)}
    # The reference without "answer_start" leading the batch must work as well.
    scores = squad.compute(predictions=predictions[::-1], references=references[::-1])
    assert scores == {"exact_match": pytest.approx(200 / 3, rel=1e-12), "f1": pytest.approx(800 / 9, rel=1e-12)}


def test_predictions_and_references_are_matched_by_id_not_position(squad):
    predictions = [{"id": "q2", "prediction_text": "Rome"}, {"id": "q1", "prediction_text": "Paris"}]
    references = [{"id": "q1", "answers": {"text": ["Paris"]}}, {"id": "q2", "answers": {"text": ["Rome"]}}]
    assert squad.compute(predictions=predictions, references=references) == {"exact_match": 100.0, "f1": 100.0}


def test_add_and_add_batch_accumulate_like_one_compute(squad):
    squad.add(
        prediction={"id": "q1", "prediction_text": "Paris"}, reference={"id": "q1", "answers": {"text": ["Paris"]}}
    )
    squad.add_batch(
        predictions=[{"id": "q2", "prediction_text": "Rome"}],
        references=[{"id": "q2", "answers": {"text": ["Milan"], "answer_start": [3]}}],
    )
    assert squad.compute() == {"exact_match": 50.0, "f1": 50.0}


# Errors name what is wrong.


def test_prediction_without_reference_raises_naming_both_ids(squad):
    with pytest.raises(ValueError, match=r"prediction ids without a reference: 'q1'.*reference ids without a .*'q9'"):
        _score_v1(squad, ({"id": "q1", "prediction_text": "Paris"}, {"id": "q9", "answers": {"text": ["Paris"]}}))


def test_duplicate_id_raises_naming_it(squad):
    predictions = [{"id": "q1", "prediction_text": "Paris"}, {"id": "q1", "prediction_text": "Rome"}]
    references = [{"id": "q1", "answers": {"text": ["Paris"]}}, {"id": "q2", "answers": {"text": ["Rome"]}}]
    with pytest.raises(ValueError, match="prediction id 'q1' appears twice"):
        squad.compute(predictions=predictions, references=references)


def test_v1_reference_without_gold_answer_raises_pointing_to_squad_v2(squad):
    with pytest.raises(ValueError, match="'q1' has no gold answer.*'squad_v2'"):
        _score_v1(squad, _v1("q1", "", []))


def test_v1_rejects_v2_inputs(squad):
    prediction = {"id": "q1", "prediction_text": "Paris", "no_answer_probability": 0.1}
    with pytest.raises(ValueError, match="need the metric loaded with config 'squad_v2'"):
        squad.compute(predictions=[prediction], references=[{"id": "q1", "answers": {"text": ["Paris"]}}])
    prediction = {"id": "q1", "prediction_text": "Paris"}
    with pytest.raises(ValueError, match="no_answer_threshold=0.5 only applies to SQuAD v2.0"):
        squad.compute(
            predictions=[prediction],
            references=[{"id": "q1", "answers": {"text": ["Paris"]}}],
            no_answer_threshold=0.5,
        )


def test_reference_without_answer_texts_raises(squad):
    with pytest.raises(ValueError, match=r"needs 'answers': \{'text'"):
        squad.compute(predictions=[{"id": "q1", "prediction_text": "Paris"}], references=[{"id": "q1", "answers": []}])


def test_unknown_config_name_raises():
    with pytest.raises(ValueError, match="Unknown config_name 'squad_v3'"):
        evaluate.load(str(SQUAD_METRIC_PATH), "squad_v3")


# SQuAD v2.0: unanswerable questions, HasAns/NoAns breakdown, no-answer threshold and its search.

# Three answerable and three unanswerable questions. Raw (unthresholded) scores, exact / F1:
#   a1 1 / 1, a2 0 / 4/7 (the partial overlap above), a3 0 / 0 (predicted empty), n1 1 / 1 (predicted empty),
#   n2 0 / 0 and n3 0 / 0 (both answered although unanswerable).
V2_QUESTIONS = [
    ("a1", "Denver Broncos", 0.1, ["Denver Broncos"]),
    ("a2", "the big red house", 0.2, ["a big house on the hill"]),
    ("a3", "", 0.9, ["Paris"]),
    ("n1", "", 0.8, []),
    ("n2", "London", 0.3, []),
    ("n3", "Rome", 0.7, []),
]


def _v2_inputs(questions=V2_QUESTIONS) -> dict:
    predictions = [
        {"id": question_id, "prediction_text": text, "no_answer_probability": probability}
        for question_id, text, probability, _ in questions
    ]
    references = [
        {"id": question_id, "answers": {"text": gold, "answer_start": [0] * len(gold)}}
        for question_id, _, _, gold in questions
    ]
    return {"predictions": predictions, "references": references}


def test_v2_scores_with_default_threshold_use_every_prediction_as_given(squad_v2):
    scores = squad_v2.compute(**_v2_inputs())
    assert scores == {
        "exact": pytest.approx(100 * 2 / 6),
        "f1": pytest.approx(100 * (2 + 4 / 7) / 6),  # 3/7 = 42.857...
        "total": 6,
        "HasAns_exact": pytest.approx(100 / 3),
        "HasAns_f1": pytest.approx(100 * (1 + 4 / 7) / 3),  # 11/21 = 52.380...
        "HasAns_total": 3,
        "NoAns_exact": pytest.approx(100 / 3),
        "NoAns_f1": pytest.approx(100 / 3),
        "NoAns_total": 3,
        # Scan in increasing probability, from "all empty" (3 correct): a1 +1 -> 4, a2 +0 / +4/7, n2 -1, n3 -1, ...
        "best_exact": pytest.approx(100 * 4 / 6),
        "best_exact_thresh": 0.1,
        "best_f1": pytest.approx(100 * (4 + 4 / 7) / 6),  # 16/21 = 76.190...
        "best_f1_thresh": 0.2,
    }
    assert list(scores) == [
        "exact",
        "f1",
        "total",
        "HasAns_exact",
        "HasAns_f1",
        "HasAns_total",
        "NoAns_exact",
        "NoAns_f1",
        "NoAns_total",
        "best_exact",
        "best_exact_thresh",
        "best_f1",
        "best_f1_thresh",
    ]


def test_v2_predictions_above_the_threshold_count_as_no_answer(squad_v2):
    # Above 0.5: a3 (answerable: 0), n1 and n3 (unanswerable: 1 each); the others keep their raw scores.
    scores = squad_v2.compute(**_v2_inputs(), no_answer_threshold=0.5)
    assert scores["exact"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (3 + 4 / 7) / 6)  # 25/42 = 59.523...
    assert scores["HasAns_exact"] == pytest.approx(100 / 3)
    assert scores["HasAns_f1"] == pytest.approx(100 * (1 + 4 / 7) / 3)
    assert scores["NoAns_exact"] == pytest.approx(200 / 3)
    assert scores["NoAns_f1"] == pytest.approx(200 / 3)
    # The search does not depend on the threshold applied.
    assert (scores["best_f1"], scores["best_f1_thresh"]) == (pytest.approx(100 * 16 / 21), 0.2)


def test_v2_threshold_is_strict(squad_v2):
    # n3 has probability 0.7: at threshold 0.7 it keeps its answer "Rome"; just below, it becomes "no answer".
    at = squad_v2.compute(**_v2_inputs(), no_answer_threshold=0.7)
    below = squad_v2.compute(**_v2_inputs(), no_answer_threshold=0.6999)
    assert below["NoAns_exact"] - at["NoAns_exact"] == pytest.approx(100 / 3)


def test_v2_best_f1_is_reached_by_applying_its_threshold(squad_v2):
    searched = squad_v2.compute(**_v2_inputs())
    applied = squad_v2.compute(**_v2_inputs(), no_answer_threshold=searched["best_f1_thresh"])
    assert applied["f1"] == pytest.approx(searched["best_f1"])


def test_v2_gold_answers_that_normalise_to_nothing_are_scored_as_empty(squad_v2):
    # As in the official v2.0 script: answerable (the gold list is not empty), but its only gold answer "The"
    # normalises to nothing, so it is scored against "" and the empty prediction gets full marks, F1 included.
    scores = squad_v2.compute(**_v2_inputs([("q1", "", 0.0, ["The"])]))
    assert (scores["HasAns_exact"], scores["HasAns_f1"], scores["HasAns_total"]) == (100.0, 100.0, 1)
    assert "NoAns_total" not in scores


def test_v2_without_unanswerable_questions_omits_the_noans_keys(squad_v2):
    scores = squad_v2.compute(**_v2_inputs(V2_QUESTIONS[:3]))
    assert scores["HasAns_total"] == 3
    assert not any(key.startswith("NoAns_") for key in scores)


# Offline loading.


def test_metric_script_imports_only_the_standard_library_datasets_evaluate_and_numpy():
    """`evaluate` copies the script alone into its modules cache, so it cannot import the package."""
    tree = ast.parse(SQUAD_METRIC_PATH.read_text(encoding="utf-8"))
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    allowed = set(sys.stdlib_module_names) | {"__future__", "datasets", "evaluate", "numpy"}
    assert imported <= allowed, imported - allowed
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))


def test_load_squad_metric_selects_the_config(squad, squad_v2):
    assert SQUAD_METRIC_PATH.is_absolute() and SQUAD_METRIC_PATH.is_file()
    assert (squad.config_name, squad_v2.config_name) == ("squad", "squad_v2")
    assert set(squad_v2.features["predictions"]) == {"id", "prediction_text", "no_answer_probability"}


_ISOLATED_LOAD = """
import importlib.abc, json, socket, sys

class _NoBlockSkim(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_blockskim" or name.startswith("modeling_blockskim."):
            raise ModuleNotFoundError(f"blocked for the test: {name}")

def _refuse(*args, **kwargs):
    raise OSError("network access while loading the metric")

sys.meta_path.insert(0, _NoBlockSkim())
socket.socket.connect = socket.socket.connect_ex = socket.getaddrinfo = _refuse

import evaluate

squad = evaluate.load(sys.argv[1], "squad_v2", keep_in_memory=True)
print(json.dumps(squad.compute(
    predictions=[{"id": "q1", "prediction_text": "Paris", "no_answer_probability": 0.25}],
    references=[{"id": "q1", "answers": {"text": ["Paris"], "answer_start": [0]}}],
)))
"""


def test_evaluate_load_works_from_a_fresh_cache_without_network_or_package(tmp_path):
    """A new process with empty HF_HOME/HF_MODULES_CACHE, offline, sockets refused and `modeling_blockskim`
    unimportable loads the metric from its path alone."""
    env = dict(
        os.environ,
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HUB_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        PYTHONPATH="",
    )
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_ISOLATED_LOAD), str(SQUAD_METRIC_PATH)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores == {
        "exact": 100.0,
        "f1": 100.0,
        "total": 1,
        "HasAns_exact": 100.0,
        "HasAns_f1": 100.0,
        "HasAns_total": 1,
        "best_exact": 100.0,
        "best_exact_thresh": 0.25,
        "best_f1": 100.0,
        "best_f1_thresh": 0.25,
    }
    copied = list((tmp_path / "modules").rglob("squad_blockskim.py"))
    assert len(copied) == 1 and copied[0].read_bytes() == SQUAD_METRIC_PATH.read_bytes()
