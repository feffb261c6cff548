"""BlockSkimTrainer: joint training lowers both losses, per-run alpha/beta overrides, separate loss logs, resuming."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments

from modeling_blockskim.flops import forward_flops
from modeling_blockskim.loss_blockskim import skim_loss, span_block_targets, span_distillation_loss
from modeling_blockskim.trainer import BlockSkimTrainer

from .testing_utils import qa_batch, tiny_model


def _features(rows: int = 8, seed: int = 0) -> Dataset:
    """QA features with the answer inside the passage of every row."""
    batch = qa_batch("bert", lengths=(40,) * rows, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(9, 30, (rows,), generator=generator)
    batch["start_positions"] = start
    batch["end_positions"] = start + torch.randint(0, 4, (rows,), generator=generator)
    return Dataset.from_dict({name: tensor.tolist() for name, tensor in batch.items()})


def _tensor_batch(features: Dataset, rows: int = 4) -> dict[str, torch.Tensor]:
    """The first `rows` features as a model's input batch."""
    return {name: torch.tensor(values) for name, values in features[:rows].items()}


def _args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        max_steps=40,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def test_a_few_steps_of_joint_training_lower_the_qa_and_skim_losses(tmp_path):
    model = tiny_model("bert").train()
    trainer = BlockSkimTrainer(model=model, args=_args(tmp_path), train_dataset=_features())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "qa_loss" in entry]
    assert len(logs) == 4
    assert logs[-1]["qa_loss"] < logs[0]["qa_loss"] * 0.8
    assert logs[-1]["skim_loss"] < logs[0]["skim_loss"] * 0.8
    for entry in logs:  # the logged total is the model's joint loss
        assert entry["loss"] == pytest.approx(entry["qa_loss"] + 0.1 * entry["skim_loss"], rel=1e-4)


def test_run_overrides_of_alpha_and_beta_reach_the_model_config_and_its_loss(tmp_path):
    model = tiny_model("bert")
    BlockSkimTrainer(
        model=model, args=_args(tmp_path), harmony_coefficient=0.5, balance_factor=50.0, skim_loss_reduction="mean"
    )
    assert (model.config.harmony_coefficient, model.config.balance_factor) == (0.5, 50.0)
    features = _features()[:4]
    batch = {name: torch.tensor(values) for name, values in features.items()}
    with torch.no_grad():
        output = model(**batch, output_skim_details=True)
    expected = skim_loss(output.block_logits, output.block_labels, balance_factor=50.0, reduction="mean")
    torch.testing.assert_close(output.skim_loss, expected)
    torch.testing.assert_close(output.loss, output.qa_loss + 0.5 * expected)


def test_invalid_run_override_is_refused(tmp_path):
    with pytest.raises(ValueError, match="balance_factor"):
        BlockSkimTrainer(model=tiny_model("bert"), args=_args(tmp_path), balance_factor=-2.0)


def test_skim_loss_weights_positive_blocks_by_beta():
    # One layer, two labelled blocks: a positive with P(keep)=0.5 and a negative with P(keep)=0.5.
    logits = torch.zeros(1, 1, 3, 2)
    labels = torch.tensor([[1, 0, -100]])
    # Every labelled block costs log 2; the weighted mean is log 2 for any beta ...
    assert skim_loss(logits, labels, balance_factor=20.0).item() == pytest.approx(0.6931472)
    # ... while a confident miss on the positive block weighs beta times more than one on the negative block.
    logits[0, 0, 0] = torch.tensor([4.0, 0.0])  # says "skim" on the answer block
    miss = torch.nn.functional.cross_entropy(torch.tensor([[4.0, 0.0]]), torch.tensor([1])).item()
    for beta in (1.0, 20.0):
        expected = (beta * miss + 1.0 * 0.6931472) / (beta + 1.0)
        assert skim_loss(logits, labels, balance_factor=beta).item() == pytest.approx(expected, rel=1e-5)


def test_skim_loss_sums_layers_by_default_and_averages_on_request():
    logits = torch.zeros(1, 3, 2, 2)
    labels = torch.tensor([[1, 0]])
    assert skim_loss(logits, labels, 20.0, "sum").item() == pytest.approx(3 * 0.6931472)
    assert skim_loss(logits, labels, 20.0, "mean").item() == pytest.approx(0.6931472)


def test_soft_targets_of_zero_and_one_give_exactly_the_hard_label_loss():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 5, 2, generator=generator)
    labels = torch.randint(0, 2, (3, 5), generator=generator)
    labels[0, 0] = labels[2, 4] = -100
    weighted = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 2),
        labels[:, None, :].expand(3, 2, 5).reshape(-1),
        weight=torch.tensor([1.0, 20.0]),
        ignore_index=-100,
        reduction="none",
    ).view(3, 2, 5)
    kept_weight = torch.where(labels == 1, 20.0, 1.0) * (labels != -100)  # (3, 5)
    expected = (weighted.sum(dim=(0, 2)) / kept_weight.sum()).sum()
    assert skim_loss(logits, labels, 20.0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert skim_loss(logits, labels.float(), 20.0).item() == skim_loss(logits, labels, 20.0).item()


def test_a_soft_target_counts_beta_times_its_probability_as_keep_and_the_rest_as_skim():
    logits = torch.tensor([[[[0.0, math.log(3.0)], [0.0, 0.0]]]])  # P(keep) = 0.75, then 0.5
    targets = torch.tensor([[0.5, -100.0]])  # the second block is ignored
    beta = 2.0
    expected = -(0.5 * math.log(0.25) + beta * 0.5 * math.log(0.75)) / (0.5 + beta * 0.5)
    assert skim_loss(logits, targets, beta).item() == pytest.approx(expected, rel=1e-6)


def test_span_block_targets_are_the_larger_of_the_start_and_end_mass_in_each_block():
    # Blocks of 4: block 0 is the question (ignored), blocks 1 and 2 passage, block 3 only padding.
    start_logits = torch.full((1, 14), -1e4)
    end_logits = torch.full((1, 14), -1e4)
    start_logits[0, 5] = 0.0  # every start in block 1
    end_logits[0, [6, 9]] = 0.0  # ends split between blocks 1 and 2
    start_logits[0, 12:] = end_logits[0, 12:] = 50.0  # padding: masked, never counts
    token_valid = torch.ones(1, 14, dtype=torch.bool)
    token_valid[0, 12:] = False
    labels = torch.tensor([[-100, 0, 1, -100]])  # the gold answer does not matter, only which blocks are labelled
    targets = span_block_targets(start_logits, end_logits, token_valid, labels, block_size=4)
    torch.testing.assert_close(targets, torch.tensor([[-100.0, 1.0, 0.5, -100.0]]))


class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_resume_from_checkpoint_continues_from_the_saved_step(tmp_path):
    features = _features()
    args = _args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3, logging_steps=1)
    BlockSkimTrainer(model=tiny_model("bert"), args=args, train_dataset=features).train()
    assert (tmp_path / "checkpoint-3").is_dir() and (tmp_path / "checkpoint-6").is_dir()

    counter = _CountSteps()
    resumed = BlockSkimTrainer(
        model=tiny_model("bert", seed=1), args=args, train_dataset=features, callbacks=[counter]
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert counter.steps == [4, 5, 6]
    assert resumed.state.global_step == 6


def test_predictor_learning_rate_gives_the_predictors_their_own_parameter_group(tmp_path):
    model = tiny_model("bert")
    trainer = BlockSkimTrainer(
        model=model, args=_args(tmp_path, learning_rate=1e-4), skim_predictor_learning_rate=3e-3
    )
    optimizer = trainer.create_optimizer()
    predictor_ids = {id(p) for name, p in model.named_parameters() if name.startswith("skim_predictors.")}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= predictor_ids or not ids & predictor_ids  # never mixed
        assert group["lr"] == (3e-3 if ids & predictor_ids else 1e-4)
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters()}


def test_training_predictors_only_changes_the_predictors_and_nothing_else(tmp_path):
    model = tiny_model("bert").train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    modes: dict[str, set[bool]] = {"backbone": set(), "predictor": set()}
    model.layers[0].register_forward_pre_hook(lambda module, args: modes["backbone"].add(module.training))
    predictor = next(iter(model.skim_predictors.values()))
    predictor.register_forward_pre_hook(lambda module, args: modes["predictor"].add(module.training))
    trainer = BlockSkimTrainer(
        model=model,
        args=_args(tmp_path, max_steps=12, logging_steps=4),
        train_dataset=_features(),
        train_predictors_only=True,
    )
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    predictor_names = {name for name in before if name.startswith("skim_predictors.")}
    assert changed and changed <= predictor_names
    assert modes == {"backbone": {False}, "predictor": {True}}  # frozen part as at inference: no dropout
    logs = [entry for entry in trainer.state.log_history if "skim_loss" in entry]
    assert len(logs) == 3
    for entry in logs:  # the optimised loss is the skim loss alone
        assert entry["loss"] == pytest.approx(entry["skim_loss"], rel=1e-4)
    assert logs[-1]["skim_loss"] < logs[0]["skim_loss"]


def test_predictors_trained_on_the_models_own_answers_optimise_the_loss_of_its_span_targets(tmp_path):
    model = tiny_model("bert").train()
    features = _features()
    trainer = BlockSkimTrainer(
        model=model,
        args=_args(tmp_path, max_steps=12, logging_steps=4),
        train_dataset=features,
        train_predictors_only=True,
        skim_targets="model",
    )
    batch = _tensor_batch(features)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        output = model(**batch, output_skim_details=True)
    targets = span_block_targets(
        output.start_logits, output.end_logits, batch["attention_mask"], output.block_labels, model.config.block_size
    )
    assert ((targets > 0) & (targets < 1)).any()  # soft, not the gold labels
    torch.testing.assert_close(loss, skim_loss(output.block_logits, targets, model.config.balance_factor))
    assert not torch.allclose(loss, output.skim_loss)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "skim_loss" in entry]
    assert logs[-1]["skim_loss"] < logs[0]["skim_loss"]


def test_training_with_skimming_tunes_only_the_layers_after_the_predictors_on_the_skimmed_sequence(tmp_path):
    model = tiny_model("bert", num_hidden_layers=4, skim_layers=[1]).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    modes: dict[str, set[bool]] = {"frozen layer": set(), "tuned layer": set(), "predictor": set()}
    model.layers[1].register_forward_pre_hook(lambda module, args: modes["frozen layer"].add(module.training))
    model.layers[2].register_forward_pre_hook(lambda module, args: modes["tuned layer"].add(module.training))
    model.skim_predictors["1"].register_forward_pre_hook(lambda module, args: modes["predictor"].add(module.training))
    lengths: list[int] = []
    model.layers[3].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    features = _features()
    trainer = BlockSkimTrainer(
        model=model,
        args=_args(tmp_path, max_steps=6, logging_steps=2),
        train_dataset=features,
        train_with_skimming=True,
        skim_threshold=1.0,  # only protected and answer blocks survive
    )
    batch = _tensor_batch(features)
    torch.manual_seed(1)  # the same dropout masks in the tuned layers
    loss = trainer.compute_loss(model, batch)
    torch.manual_seed(1)
    with torch.no_grad():
        reference = model(**batch, skim=True, skim_threshold=1.0, output_skim_details=True)
    torch.testing.assert_close(loss, reference.qa_loss)  # the QA loss of the skimmed sequence alone
    assert lengths[-1] < 40
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    tuned = {name for name in before if name.startswith(("layers.2.", "layers.3.", "qa_outputs."))}
    assert changed and changed <= tuned
    assert modes == {"frozen layer": {False}, "tuned layer": {True}, "predictor": {False}}
    assert max(lengths) < 40  # every training step ran the later layers on the skimmed sequence


def test_training_with_skimming_at_drawn_thresholds_mixes_whole_and_skimmed_windows_reproducibly(tmp_path):
    lengths_per_run = []
    for run in range(2):
        model = tiny_model("bert", num_hidden_layers=4, skim_layers=[1]).train()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        lengths: list[int] = []
        model.layers[3].register_forward_pre_hook(lambda module, args, seen=lengths: seen.append(args[0].shape[1]))
        trainer = BlockSkimTrainer(
            model=model,
            args=_args(tmp_path / str(run), max_steps=10, logging_steps=5),
            train_dataset=_features(),
            train_with_skimming=True,
            skim_training_thresholds=[0.0, 1.0],  # whole windows, or only protected and answer blocks
        )
        trainer.train()
        lengths_per_run.append(lengths)
        changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
        assert changed and all(name.startswith(("layers.2.", "layers.3.", "qa_outputs.")) for name in changed)
    full = max(len(ids) for ids in _features()["input_ids"])
    assert len(lengths_per_run[0]) == 10
    assert full in lengths_per_run[0] and min(lengths_per_run[0]) < 40  # both kinds of step occurred
    assert lengths_per_run[0] == lengths_per_run[1]  # the same draws for the same seed and steps


def test_span_distillation_loss_is_the_divergence_from_the_teacher_renormalised_over_kept_tokens():
    student = torch.tensor([[1.0, 2.0, -10_000.0, 0.5]])
    teacher = torch.tensor([[0.0, 1.0, 3.0, 1.0]])
    kept = torch.tensor([[True, True, False, True]])
    targets = torch.tensor([1.0, math.e, math.e]) / (1 + 2 * math.e)  # the teacher on tokens 0, 1 and 3

    def divergence(kept_logits: list[float]) -> float:
        normaliser = math.log(sum(math.exp(value) for value in kept_logits))
        pairs = zip(targets.tolist(), kept_logits, strict=True)
        return sum(t * (math.log(t) - (value - normaliser)) for t, value in pairs)

    loss = span_distillation_loss(student, 2 * student, teacher, teacher, kept)  # start logits; end logits doubled
    assert loss.item() == pytest.approx((divergence([1.0, 2.0, 0.5]) + divergence([2.0, 4.0, 1.0])) / 2)


def test_distillation_from_the_unskimmed_model_leaves_a_model_that_skims_nothing_unchanged(tmp_path):
    model = tiny_model("bert", num_hidden_layers=4, skim_layers=[1]).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = BlockSkimTrainer(
        model=model,
        args=_args(tmp_path, max_steps=4, logging_steps=2, weight_decay=0.0),
        train_dataset=_features(),
        train_with_skimming=True,
        distill_unskimmed=True,
        skim_threshold=0.0,  # every block kept: the student reads what the teacher reads
    )
    trainer.train()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, before[name], rtol=0, atol=1e-6, msg=name)
    logs = [entry for entry in trainer.state.log_history if "distillation_loss" in entry]
    assert len(logs) == 2 and all(entry["loss"] == entry["distillation_loss"] for entry in logs)


def test_distillation_from_the_unskimmed_model_pulls_the_skimmed_answers_towards_the_teachers(tmp_path):
    model = tiny_model("bert", num_hidden_layers=4, skim_layers=[1]).train()
    features = _features()
    batch = _tensor_batch(features, rows=8)
    trainer = BlockSkimTrainer(
        model=model,
        args=_args(tmp_path, max_steps=30, logging_steps=10, learning_rate=1e-3, weight_decay=0.0),
        train_dataset=features,
        train_with_skimming=True,
        distill_unskimmed=True,
        skim_threshold=1.0,  # only protected and answer blocks survive
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the student now answers differently from the teacher, the model as given
        teacher = model.eval()(**batch, skim=False)
        model.qa_outputs.weight.add_(torch.randn(model.qa_outputs.weight.shape, generator=generator))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss_before = trainer.compute_loss(model.train(), batch)
    trainer.train()
    loss_after = trainer.compute_loss(model.train(), batch)
    assert loss_after < loss_before * 0.8
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith(("layers.2.", "layers.3.", "qa_outputs.")) for name in changed)
    with torch.no_grad():  # the teacher stays the model as given
        after = trainer._teacher(**batch, skim=False)
    torch.testing.assert_close(after.start_logits, teacher.start_logits)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"skim_training_thresholds": [0.5]}, "needs train_with_skimming=True"),
        ({"train_with_skimming": True, "skim_training_thresholds": [0.0, 1.5]}, "must be one or more tau"),
        ({"train_with_skimming": True, "train_predictors_only": True}, "separate stages"),
        ({"distill_unskimmed": True}, "distill_unskimmed=True needs train_with_skimming=True"),
        ({"skim_targets": "model"}, "needs train_predictors_only=True"),
        ({"skim_targets": "gold", "train_predictors_only": True}, "skim_targets='gold' is not one of"),
    ],
)
def test_model_targets_need_a_frozen_model_and_unknown_targets_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        BlockSkimTrainer(model=tiny_model("bert"), args=_args(tmp_path), **settings)


@pytest.mark.parametrize("stage", ["train_predictors_only", "train_with_skimming"])
def test_training_stages_are_refused_for_a_model_without_predictors(tmp_path, stage):
    with pytest.raises(ValueError, match=stage):
        BlockSkimTrainer(model=tiny_model("bert", skim_layers=[]), args=_args(tmp_path), **{stage: True})


def _argmax_answers(examples, features, start_logits, end_logits):
    """A stand-in for span decoding: the answer of feature i is its arg-max start position, as text."""
    predictions = [
        {"id": str(index), "prediction_text": str(int(row[: len(ids)].argmax()))}
        for index, (row, ids) in enumerate(zip(start_logits, features["input_ids"], strict=True))
    ]
    references = [
        {"id": str(index), "answers": {"text": [str(start)], "answer_start": [0]}}
        for index, start in enumerate(features["start_positions"])
    ]
    return predictions, references


def _exact_match(prediction):
    pairs = zip(prediction.predictions, prediction.label_ids, strict=True)
    hits = [answer["prediction_text"] in reference["answers"]["text"] for answer, reference in pairs]
    return {"exact_match": 100.0 * sum(hits) / len(hits)}


def _evaluate(tmp_path, model, features, skim_threshold):
    trainer = BlockSkimTrainer(
        model=model,
        args=_args(tmp_path, per_device_eval_batch_size=3),
        eval_dataset=features,
        eval_examples=features,
        post_process_function=_argmax_answers,
        compute_metrics=_exact_match,
        skim_threshold=skim_threshold,
    )
    return trainer.evaluate()


def test_evaluation_reports_both_passes_predictor_quality_and_kept_fractions_at_tau(tmp_path):
    model, features = tiny_model("bert"), _features(rows=7)
    batch = {name: torch.tensor(values) for name, values in features.to_dict().items()}
    with torch.no_grad():
        labels = model(**batch, output_skim_details=True).block_labels  # (7, blocks)
    labelled, positive = (labels != -100).sum().item(), (labels == 1).sum().item()
    assert 0 < positive < labelled

    # tau = 0 keeps every block: recall 1, accuracy = share of positive blocks, nothing dropped, same answers.
    keep_all = _evaluate(tmp_path, model, features, skim_threshold=0.0)
    for layer in model.config.skim_layers:
        assert keep_all[f"eval_predictor_recall_layer_{layer}"] == 1.0
        assert keep_all[f"eval_predictor_accuracy_layer_{layer}"] == pytest.approx(positive / labelled)
    assert [keep_all[f"eval_skim_kept_fraction_layer_{i}"] for i in range(3)] == [1.0, 1.0, 1.0]
    assert keep_all["eval_skim_ideal_speedup"] == 1.0
    # Nothing is saved and the predictors cost what they compute: every block of every window at each layer.
    layers, lengths = model.config.num_hidden_layers, batch["attention_mask"].sum(dim=1).tolist()
    plain = sum(forward_flops(model.config, [n] * layers, predictors=False) for n in lengths)
    with_predictors = sum(forward_flops(model.config, [n] * layers) for n in lengths)
    assert keep_all["eval_skim_flops_speedup"] == pytest.approx(plain / with_predictors, rel=1e-9)
    assert plain / with_predictors < 1.0
    assert keep_all["eval_skim_answer_block_recall"] == 1.0
    assert keep_all["eval_skim_exact_match"] == keep_all["eval_exact_match"]
    assert "eval_loss" in keep_all and "eval_skim_loss" not in keep_all

    # tau = 1 drops every passage block at the first predictor: only [CLS]+question (block 0) and the block of the
    # final [SEP] (block 4) stay, 16 of 40 tokens per row; the predictors now find no answer block.
    drop_all = _evaluate(tmp_path, model, features, skim_threshold=1.0)
    assert model.config.skim_threshold == 1.0  # the run's tau reached the model
    for layer in model.config.skim_layers:
        assert drop_all[f"eval_predictor_recall_layer_{layer}"] == 0.0
        assert drop_all[f"eval_predictor_accuracy_layer_{layer}"] == pytest.approx(1 - positive / labelled)
    kept = [drop_all[f"eval_skim_kept_fraction_layer_{i}"] for i in range(3)]
    assert kept == [1.0, pytest.approx(16 / 40), pytest.approx(16 / 40)]
    assert drop_all["eval_skim_ideal_speedup"] == pytest.approx(3 / (1 + 0.4 + 0.4))
    assert drop_all["eval_skim_flops_speedup"] > 1.5
    assert drop_all["eval_skim_answer_block_recall"] == 0.0
    assert drop_all["eval_exact_match"] == keep_all["eval_exact_match"]  # the unskimmed pass does not depend on tau

    # One tau per layer: layer 0 keeps every block (tau = 0), layer 1 none it judges (tau = 1).
    per_layer = _evaluate(tmp_path, model, features, skim_threshold={0: 0.0, 1: 1.0})
    assert per_layer["eval_predictor_recall_layer_0"] == 1.0
    assert per_layer["eval_predictor_accuracy_layer_0"] == pytest.approx(positive / labelled)
    assert per_layer["eval_predictor_recall_layer_1"] == 0.0
    assert per_layer["eval_predictor_accuracy_layer_1"] == pytest.approx(1 - positive / labelled)
    kept = [per_layer[f"eval_skim_kept_fraction_layer_{i}"] for i in range(3)]
    assert kept == [1.0, 1.0, pytest.approx(16 / 40)]
