"""`BlockSkimTrainer`: joint Block-Skim training and the evaluation that shows what skimming costs and buys.

Training (paper section 3.3) minimises `L_QA + alpha * combine_layers(CE_beta(block logits, block labels))` on the
full sequence; the model computes that loss itself from its config, so the run's alpha/beta/reduction are written
into `model.config` (and hence into every saved checkpoint) and the two terms are logged separately.

Evaluation of a Block-Skim model runs twice over the same features: without skimming (EM/F1 and the predictors'
accuracy and recall of answer-holding blocks at the run's tau) and with skimming at tau (EM/F1, the fraction of
real tokens each layer kept, the answer blocks that survived, and the FLOPs speedup against the same model without
skimming, from the analytic count in `modeling_blockskim.flops`). A model without predictors (the vanilla baseline,
trained by the same script) is evaluated once, as any QA model.

Written against the transformers 5.x Trainer API: `compute_loss(model, inputs, return_outputs, num_items_in_batch)`,
`processing_class`, `evaluation_loop`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import EvalPrediction, Trainer
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import PredictionOutput, speed_metrics

from .configuration_blockskim import layer_thresholds
from .flops import forward_flops
from .loss_blockskim import skim_loss, span_block_targets, span_distillation_loss
from .model_card import write_model_card
from .modeling_blockskim import SKIMMED_LOGIT
from .skimming_blockskim import IGNORE_INDEX

PREDICTOR_PREFIX = "skim_predictors."
SKIM_TARGETS = ("answer", "model")

PostProcessFunction = Callable[[Dataset, Dataset, Any, Any], tuple[list[dict], list[dict]]]
"""(examples, features, start_logits, end_logits) -> (predictions, references) in the SQuAD metric's format."""


def _frozen_parts_to_eval(model: torch.nn.Module) -> None:
    """Every part whose parameters are all frozen to evaluation mode (`Trainer` puts the whole model in training
    mode): a frozen part then runs exactly as at inference (no dropout, running statistics), so what the trained parts
    learn from is what they will see. Parts are the model's children, and each layer or predictor of a list."""
    for child in model.children():
        parts = child.children() if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)) else [child]
        for part in parts:
            parameters = list(part.parameters())
            if parameters and not any(parameter.requires_grad for parameter in parameters):
                part.eval()


def _without_dropout(model: torch.nn.Module) -> None:
    """Every submodule to evaluation mode (no dropout), the model itself left in training mode so that its forward
    still trains (skims with the answer's blocks kept). Distillation compares with a teacher that runs without
    dropout; a student with dropout would be pulled away from the teacher even on a window nothing is skimmed from."""
    for module in model.children():
        module.eval()


def _trained_in_skim_aware_tuning(name: str, last_predictor_layer: int) -> bool:
    """Skim-aware fine-tuning trains the layers after the last predictor layer and the span head; everything before
    (so the skim decisions are those of the evaluated model) and the predictors themselves stay frozen."""
    if name.startswith("layers."):
        return int(name.split(".")[1]) > last_predictor_layer
    return not name.startswith((PREDICTOR_PREFIX, "embeddings.", "embeddings_project."))


def _train_only(model: torch.nn.Module, trained: Callable[[str], bool]) -> None:
    """Freeze every parameter whose name `trained` rejects (a training stage of part of the model)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trained(name))


class BlockSkimTrainer(Trainer):
    """A `Trainer` for extractive QA that trains the skim predictors jointly and evaluates with and without skimming.

    Args:
        eval_examples (`datasets.Dataset`, *optional*): the examples (questions with contexts) behind
            `eval_dataset`'s features, needed to turn logits into answers.
        post_process_function (`PostProcessFunction`, *optional*): logits -> answers and references, e.g.
            `modeling_blockskim.data.postprocess_qa_predictions` with the run's settings bound.
        harmony_coefficient, balance_factor (`float`, *optional*): alpha and beta for this run; default to the
            model config's values.
        skim_loss_reduction (`"sum"` or `"mean"`, *optional*): how layer terms combine; defaults to the config's.
        skim_threshold (`float` or `dict[int, float]`, *optional*): tau used for skimming evaluation and predictor
            recall, one for all predictor layers or one per layer; defaults to the config's.
        skim_predictor_learning_rate (`float`, *optional*): peak learning rate of the (randomly initialised) skim
            predictors, which may learn faster than the pretrained backbone tolerates; follows the same schedule.
            Defaults to `args.learning_rate`.
        train_predictors_only (`bool`, defaults to `False`): a second stage after joint training (or Block-Skim
            predictors added to an already fine-tuned QA model): every parameter but the predictors' is frozen and
            the frozen part runs as at inference (no dropout), so the predictors learn from exactly the attention
            they will judge, and the loss is the skim loss alone. Each step costs about a forward pass, so several
            epochs are cheap next to joint training, whose few steps leave the new predictors under-trained. The
            QA answers of the model without skimming do not change.
        skim_targets (`"answer"` or `"model"`, defaults to `"answer"`): what the predictors learn to keep. `"answer"`:
            the blocks holding the gold answer (the paper's labels). `"model"`, only with `train_predictors_only`:
            the blocks the frozen model itself answers from (`loss_blockskim.span_block_targets`, soft), since
            skimming costs F1 only where it removes those.
        train_with_skimming (`bool`, defaults to `False`): a stage after the predictors are trained: the model skims
            while it trains, at the run's tau, so the layers after the last predictor layer and the span head learn to
            answer from the shortened sequence they read at inference (joint training never skims, and most of the
            F1 skimming costs is lost on questions whose answer survived it). The embeddings, the layers up to the
            last predictor layer and the predictors are frozen and run as at inference, so the skim decisions are
            exactly those of the model being tuned; the blocks holding the gold answer are always kept, and the
            loss is the QA loss alone.
        skim_training_thresholds (sequence of `float`, *optional*): with `train_with_skimming`, each optimisation step
            skims at one of these tau, drawn uniformly (seeded by `args.seed` and the step, so a resumed run draws
            the same); 0 keeps every block, so `(0, 0.6)` mixes whole and skimmed windows and the tuned layers keep
            reading whole windows as well as before. Defaults to the run's `skim_threshold` for every step.
        All other arguments are those of `transformers.Trainer`; `compute_metrics` receives
        `EvalPrediction(predictions=answers, label_ids=references)` after post-processing.
    """

    def __init__(
        self,
        *args,
        eval_examples: Dataset | None = None,
        post_process_function: PostProcessFunction | None = None,
        harmony_coefficient: float | None = None,
        balance_factor: float | None = None,
        skim_loss_reduction: str | None = None,
        skim_threshold: float | Mapping[int, float] | None = None,
        skim_predictor_learning_rate: float | None = None,
        train_predictors_only: bool = False,
        skim_targets: Literal["answer", "model"] = "answer",
        train_with_skimming: bool = False,
        skim_training_thresholds: Sequence[float] | None = None,
        distill_unskimmed: bool = False,
        **kwargs,
    ):
        model = kwargs.get("model", args[0] if args else None)
        if train_with_skimming:
            if train_predictors_only:
                raise ValueError(
                    "train_with_skimming=True and train_predictors_only=True are separate stages: first train the "
                    "predictors, then fine-tune the later layers with skimming."
                )
            if len(getattr(model, "skim_predictors", ())) == 0:
                raise ValueError("train_with_skimming=True needs a Block-Skim model with skim predictors.")
            last_predictor_layer = max(model.config.skim_layers)
            _train_only(model, lambda name: _trained_in_skim_aware_tuning(name, last_predictor_layer))
        if skim_training_thresholds is not None:
            if not train_with_skimming:
                raise ValueError("skim_training_thresholds needs train_with_skimming=True.")
            if not skim_training_thresholds or not all(0.0 <= tau <= 1.0 for tau in skim_training_thresholds):
                raise ValueError(
                    f"skim_training_thresholds={list(skim_training_thresholds)!r} must be one or more tau in [0, 1]."
                )
        if distill_unskimmed and not train_with_skimming:
            raise ValueError("distill_unskimmed=True needs train_with_skimming=True: it is the loss of that stage.")
        if skim_targets not in SKIM_TARGETS:
            raise ValueError(f"skim_targets={skim_targets!r} is not one of {list(SKIM_TARGETS)}.")
        if skim_targets == "model" and not train_predictors_only:
            raise ValueError(
                "skim_targets='model' needs train_predictors_only=True: the model's own answers are a fixed target "
                "only while the model is frozen."
            )
        if train_predictors_only:
            if len(getattr(model, "skim_predictors", ())) == 0:
                raise ValueError("train_predictors_only=True needs a Block-Skim model with skim predictors.")
            _train_only(model, lambda name: name.startswith(PREDICTOR_PREFIX))
        super().__init__(*args, **kwargs)
        self.skim_predictor_learning_rate = skim_predictor_learning_rate
        self.train_predictors_only = train_predictors_only
        self.train_with_skimming = train_with_skimming
        self.skim_training_thresholds = None if skim_training_thresholds is None else list(skim_training_thresholds)
        self.skim_targets = skim_targets
        self.distill_unskimmed = distill_unskimmed
        self._teacher: torch.nn.Module | None = None
        if distill_unskimmed:  # the model as given (also when resuming: the checkpoint's weights load later)
            self._teacher = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval().requires_grad_(False)
        self.eval_examples = eval_examples
        self.post_process_function = post_process_function
        if self._is_block_skim:
            overrides = {
                "harmony_coefficient": harmony_coefficient,
                "balance_factor": balance_factor,
                "skim_loss_reduction": skim_loss_reduction,
                "skim_threshold": skim_threshold,
            }
            config = self.model.config
            for name, value in overrides.items():
                if value is not None:
                    setattr(config, name, value)
            config._validate_skim_settings(config.num_hidden_layers)
        self._loss_parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._eval_statistics: dict[str, Any] = {}
        self.last_eval_metrics: dict[str, float] = {}
        self.last_eval_predictions: dict[str, list[dict]] = {}
        """The last evaluation's answers per pass: `{prefix}` without skimming, `{prefix}_skim` with skimming."""

    @property
    def _is_block_skim(self) -> bool:
        return len(getattr(self.accelerator.unwrap_model(self.model), "skim_predictors", ())) > 0

    # Training ----------------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """The usual optimizer; with `skim_predictor_learning_rate`, the predictors get their own parameter group."""
        optimizer = super().create_optimizer(model)
        if self.skim_predictor_learning_rate is None or not self._is_block_skim:
            return optimizer
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        predictor_ids = {id(p) for name, p in unwrapped.named_parameters() if name.startswith(PREDICTOR_PREFIX)}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in predictor_ids]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in predictor_ids]
                settings = {key: value for key, value in group.items() if key != "params"}
                optimizer.add_param_group({**settings, "params": moved, "lr": self.skim_predictor_learning_rate})
        # Groups left empty (every trainable parameter a predictor's) would only put their lr into the logs.
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's joint loss (the skim loss alone with `train_predictors_only`, the QA loss of the skimmed
        sequence alone with `train_with_skimming`); while training, its QA and skim terms are kept for the next log
        line."""
        has_labels = inputs.get("start_positions") is not None and inputs.get("end_positions") is not None
        if not (self._is_block_skim and has_labels):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training and self._teacher is not None:  # every part as at inference, the frozen ones included
            _without_dropout(self.accelerator.unwrap_model(model))
        elif model.training and (self.train_predictors_only or self.train_with_skimming):
            _frozen_parts_to_eval(self.accelerator.unwrap_model(model))
        skim = True if model.training and self.train_with_skimming else None
        threshold = self._training_step_threshold() if skim else None
        outputs = model(**inputs, skim=skim, skim_threshold=threshold, output_skim_details=True)
        predictor_loss = outputs.skim_loss
        if model.training and self.skim_targets == "model":
            config = self.accelerator.unwrap_model(model).config
            token_valid = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
            span = outputs.start_logits.detach(), outputs.end_logits.detach()
            targets = span_block_targets(*span, token_valid, outputs.block_labels, config.block_size)
            predictor_loss = skim_loss(
                outputs.block_logits, targets, config.balance_factor, config.skim_loss_reduction
            )
        if model.training:
            self._loss_parts["qa_loss"].append(outputs.qa_loss.detach())
            self._loss_parts["skim_loss"].append(predictor_loss.detach())
        loss = outputs.loss
        if model.training and self.train_predictors_only:
            loss = predictor_loss
        elif model.training and self._teacher is not None:
            loss = self._distillation_loss(inputs, outputs)
            self._loss_parts["distillation_loss"].append(loss.detach())
        elif model.training and self.train_with_skimming:
            loss = outputs.qa_loss
        return (loss, outputs) if return_outputs else loss

    def _distillation_loss(self, inputs: Mapping[str, torch.Tensor], outputs) -> torch.Tensor:
        """`span_distillation_loss` of the skimmed span logits against the teacher's on the whole window."""
        model_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in inputs}
        with torch.no_grad():
            teacher = self._teacher(**model_inputs, skim=False)
        token_kept = outputs.start_logits != SKIMMED_LOGIT
        if "attention_mask" in inputs:
            token_kept &= inputs["attention_mask"].bool()
        return span_distillation_loss(
            outputs.start_logits, outputs.end_logits, teacher.start_logits, teacher.end_logits, token_kept
        )

    def _training_step_threshold(self) -> float | None:
        """This optimisation step's tau from `skim_training_thresholds` (`None`: the config's). A generator of its
        own, seeded by the run's seed and the step, so neither dropout's random stream nor a resumed run changes it."""
        if self.skim_training_thresholds is None:
            return None
        draw = random.Random(self.args.seed * 1_000_003 + self.state.global_step)
        return draw.choice(self.skim_training_thresholds)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_parts:
            for name, values in self._loss_parts.items():
                logs[name] = nested_gather(torch.stack(values), self.args.parallel_mode).float().mean().item()
            self._loss_parts.clear()
        super().log(logs, start_time)

    # Evaluation --------------------------------------------------------------------------------------------------

    def evaluate(
        self,
        eval_dataset: Dataset | None = None,
        eval_examples: Dataset | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """EM/F1 without skimming and, for a Block-Skim model, with skimming at tau plus its cost statistics.

        The answers of each pass are kept in `last_eval_predictions`.

        Metric names: `{prefix}_exact_match`, `{prefix}_f1` (no skimming), `{prefix}_skim_exact_match`,
        `{prefix}_skim_f1`, `{prefix}_skim_flops_speedup`, `{prefix}_skim_ideal_speedup`,
        `{prefix}_skim_kept_fraction_layer_<i>`, `{prefix}_skim_answer_block_recall`, and per predictor layer
        `{prefix}_predictor_accuracy_layer_<i>` / `{prefix}_predictor_recall_layer_<i>`.
        """
        features = self.eval_dataset if eval_dataset is None else eval_dataset
        examples = self.eval_examples if eval_examples is None else eval_examples
        start_time = time.time()
        metrics = self._evaluate_passes(features, examples, ignore_keys, metric_key_prefix, "Evaluation")
        metrics.update(
            speed_metrics(
                metric_key_prefix,
                start_time,
                num_samples=len(features),
                num_steps=math.ceil(len(features) / (self.args.eval_batch_size * self.args.world_size)),
            )
        )
        self.last_eval_metrics = metrics
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """The Block-Skim model card (`README.md` in `output_dir`), which `push_to_hub` uploads.

        The last evaluation's EM/F1 with and without skimming and its FLOPs speedup are recorded when `dataset`
        names the (Hub) data set they were measured on.
        """
        if not self._is_block_skim:
            return super().create_model_card(
                language, license, tags, model_name, finetuned_from, tasks, dataset_tags, dataset, dataset_args
            )
        if not self.is_world_process_zero():
            return None
        dataset_name = dataset[0] if isinstance(dataset, list) else dataset
        write_model_card(
            self.args.output_dir,
            model=self.accelerator.unwrap_model(self.model),
            metrics=self.last_eval_metrics if dataset_name else None,
            training_args=self.args,
            dataset_name=dataset_name,
            base_model=finetuned_from,
            model_name=model_name,
            license=license or "apache-2.0",
            language=language or "en",
        )
        return None

    def predict(
        self,
        predict_dataset: Dataset,
        predict_examples: Dataset,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "predict",
    ) -> PredictionOutput:
        """Answers for `predict_examples` as the model is configured to run (skimming on for Block-Skim models).

        Returns:
            `PredictionOutput` whose `predictions` are the post-processed answers, `label_ids` the references and
            `metrics` EM/F1 plus skim statistics when references and `compute_metrics` are available.
        """
        skim = self._is_block_skim and self.accelerator.unwrap_model(self.model).config.skim_at_inference
        answers, references, output = self._run_pass(
            predict_dataset, predict_examples, ignore_keys, skim, "Prediction"
        )
        metrics = self._pass_metrics(answers, references, output, skim)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}
        return PredictionOutput(predictions=answers, label_ids=references, metrics=metrics)

    def _evaluate_passes(
        self, features: Dataset, examples: Dataset, ignore_keys, metric_key_prefix: str, description: str
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        self.last_eval_predictions = {}
        for skim in (False, True) if self._is_block_skim else (False,):
            answers, references, output = self._run_pass(features, examples, ignore_keys, skim, description)
            prefix = f"{metric_key_prefix}_skim_" if skim else f"{metric_key_prefix}_"
            self.last_eval_predictions[prefix.rstrip("_")] = answers
            for name, value in self._pass_metrics(answers, references, output, skim).items():
                metrics[prefix + name] = value
        return metrics

    def _run_pass(self, features: Dataset, examples: Dataset, ignore_keys, skim: bool, description: str):
        """One evaluation loop over `features`, skimming or not, and its post-processed answers."""
        if self.post_process_function is None or examples is None:
            raise ValueError("BlockSkimTrainer needs eval_examples and post_process_function to evaluate QA.")
        compute_metrics, self.compute_metrics = self.compute_metrics, None  # metrics need answers, not logits
        self._eval_statistics = defaultdict(float)
        try:
            with self._skimming(skim):
                output = self.evaluation_loop(
                    self.get_eval_dataloader(features),
                    description=f"{description} ({'skimming' if skim else 'no skimming'})",
                    prediction_loss_only=False,
                    ignore_keys=ignore_keys,
                )
        finally:
            self.compute_metrics = compute_metrics
        start_logits, end_logits = output.predictions[:2]
        answers, references = self.post_process_function(examples, features, start_logits, end_logits)
        return answers, references, output

    def _pass_metrics(self, answers, references, output, skim: bool) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.compute_metrics is not None and references:
            metrics.update(self.compute_metrics(EvalPrediction(predictions=answers, label_ids=references)))
        if output.metrics.get("eval_loss") is not None and not skim:  # skimmed positions make a QA loss meaningless
            metrics["loss"] = output.metrics["eval_loss"]
        if self._is_block_skim:
            metrics.update(self._statistics_metrics(skim))
        return metrics

    @contextlib.contextmanager
    def _skimming(self, skim: bool) -> Iterator[None]:
        """Switch the model's default skimming for one evaluation loop (restored afterwards)."""
        config = self.accelerator.unwrap_model(self.model).config
        if not hasattr(config, "skim_at_inference"):
            yield
            return
        previous = config.skim_at_inference
        config.skim_at_inference = skim
        try:
            yield
        finally:
            config.skim_at_inference = previous

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Start/end logits as usual; for a Block-Skim model also accumulate its skim statistics."""
        if not self._is_block_skim:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        has_labels = inputs.get("start_positions") is not None and inputs.get("end_positions") is not None
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs, output_skim_details=True)
        self._accumulate_statistics(inputs, outputs)
        loss = outputs.loss.detach().mean() if has_labels else None
        if prediction_loss_only:
            return loss, None, None
        labels = (inputs["start_positions"], inputs["end_positions"]) if has_labels else None
        return loss, (outputs.start_logits, outputs.end_logits), labels

    def _accumulate_statistics(self, inputs: dict[str, torch.Tensor], outputs) -> None:
        """Per pass: real tokens per layer, analytic FLOPs with and without skimming, predictor confusion counts."""
        config = self.accelerator.unwrap_model(self.model).config
        stats = self._eval_statistics
        counts = outputs.kept_token_counts  # (B, layers)
        stats.setdefault("kept_tokens", torch.zeros(counts.shape[1], dtype=torch.float64))
        stats["kept_tokens"] = stats["kept_tokens"] + counts.sum(dim=0).double().cpu()
        layers = config.num_hidden_layers
        for row in counts.tolist():
            stats["flops"] += forward_flops(config, row)
            stats["baseline_flops"] += forward_flops(config, [row[0]] * layers, predictors=False)
        if outputs.block_labels is None:
            return
        taus = layer_thresholds(config.skim_threshold, config.skim_layers)
        tau = outputs.block_logits.new_tensor([taus[layer] for layer in sorted(taus)], dtype=torch.float32)  # (P,)
        keep = outputs.block_logits.float().softmax(dim=-1)[..., 1] >= tau[None, :, None]  # (B, P, K)
        labels = outputs.block_labels[:, None, :].expand_as(keep)  # (B, P, K)
        labelled = labels != IGNORE_INDEX
        positive = labels == 1
        stats["labelled"] = stats.get("labelled", 0) + labelled.sum(dim=(0, 2)).double().cpu()
        stats["correct"] = stats.get("correct", 0) + ((keep == positive) & labelled).sum(dim=(0, 2)).double().cpu()
        stats["positive"] = stats.get("positive", 0) + positive.sum(dim=(0, 2)).double().cpu()
        stats["recalled"] = stats.get("recalled", 0) + (keep & positive).sum(dim=(0, 2)).double().cpu()
        survived = outputs.block_keep_mask[:, -1] & (outputs.block_labels == 1)
        stats["answer_blocks"] += float((outputs.block_labels == 1).sum())
        stats["answer_blocks_kept"] += float(survived.sum())

    def _statistics_metrics(self, skim: bool) -> dict[str, float]:
        stats = {name: self._reduce(value) for name, value in self._eval_statistics.items()}
        if "kept_tokens" not in stats:
            return {}
        kept = stats["kept_tokens"]
        metrics: dict[str, float] = {}
        if skim:
            for layer, value in enumerate(kept.tolist()):
                metrics[f"kept_fraction_layer_{layer}"] = value / kept[0].item()
            metrics["ideal_speedup"] = len(kept) * kept[0].item() / kept.sum().item()
            metrics["flops_speedup"] = stats["baseline_flops"] / stats["flops"]
            if stats.get("answer_blocks"):
                metrics["answer_block_recall"] = stats["answer_blocks_kept"] / stats["answer_blocks"]
            return metrics
        if "labelled" in stats:
            config = self.accelerator.unwrap_model(self.model).config
            for position, layer in enumerate(config.skim_layers):
                if stats["labelled"][position] > 0:
                    metrics[f"predictor_accuracy_layer_{layer}"] = (
                        stats["correct"][position] / stats["labelled"][position]
                    ).item()
                if stats["positive"][position] > 0:
                    metrics[f"predictor_recall_layer_{layer}"] = (
                        stats["recalled"][position] / stats["positive"][position]
                    ).item()
        return metrics

    def _reduce(self, value):
        """Sum a statistic over data-parallel processes."""
        if self.args.world_size <= 1:
            return value
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.args.device)
        reduced = self.accelerator.reduce(tensor, reduction="sum").cpu()
        return reduced if reduced.dim() else reduced.item()
