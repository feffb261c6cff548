"""The model card (`README.md`) of a trained Block-Skim checkpoint: Hub metadata plus the facts a user needs.

The card's prose lives in `model_card_template.md`, shipped inside the package (and mirrored by `MODEL_CARD.md` at
the top of the repository for readers of the source); this module fills its `$placeholders` with what is known about
one checkpoint: the Block-Skim settings from its config (Guan et al., AAAI 2022, section 3: block size, predictor
layers, tau, alpha, beta), the training arguments, the data and the evaluation results. Only numbers that were passed
in are written; everything else reads "not measured" or "not recorded", never a made-up value.

Library code only: checkpoints do not need this file to load.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PretrainedConfig, PreTrainedModel

from .configuration_blockskim import BlockSkimConfig, threshold_label

MODEL_CARD_TEMPLATE = "model_card_template.md"
"""File name of the template inside the `modeling_blockskim` package (package data)."""

MODEL_CARD_FILE = "README.md"
"""Where the Hub looks for a model card."""

NOT_MEASURED = "not measured"
NOT_RECORDED = "not recorded"

TRAINER_SPEEDUP_DETAILS = (
    "analytic FLOPs (`modeling_blockskim.flops`) of the same model without skimming on the same unpadded inputs, "
    "divided by those of the skimmed evaluation pass over the evaluation set (`BlockSkimTrainer.evaluate`, "
    "`skim_flops_speedup`); a hardware-independent count, not a wall-clock time"
)
"""How the speedup taken from `BlockSkimTrainer.evaluate` metrics was measured, for the card."""

TRAINING_ARGUMENTS: dict[str, str] = {
    "learning_rate": "learning rate",
    "lr_scheduler_type": "learning-rate schedule",
    "warmup_ratio": "warm-up ratio",
    "warmup_steps": "warm-up steps",
    "weight_decay": "weight decay",
    "num_train_epochs": "epochs",
    "max_steps": "maximum steps",
    "per_device_train_batch_size": "batch size per device",
    "gradient_accumulation_steps": "gradient accumulation steps",
    "seed": "seed",
    "bf16": "bf16 mixed precision",
    "fp16": "fp16 mixed precision",
}
"""`TrainingArguments` fields worth a line in the card, with their labels, in the order shown."""


def model_card_template() -> str:
    """The Block-Skim model card template, read from the installed package (it ships as package data).

    Returns:
        `str`: Markdown with `$placeholders` for `string.Template`.
    """
    return resources.files(__package__).joinpath(MODEL_CARD_TEMPLATE).read_text(encoding="utf-8")


def write_model_card(
    save_directory: str | os.PathLike,
    *,
    model: PreTrainedModel | PretrainedConfig,
    metrics: Mapping[str, float] | None = None,
    training_args: Any = None,
    dataset_name: str | None = None,
    dataset_license: str | None = None,
    eval_dataset_name: str | None = None,
    eval_split: str = "validation",
    base_model: str | None = None,
    speedup: float | None = None,
    speedup_details: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str = "apache-2.0",
    language: str | list[str] | None = "en",
    metric_key_prefix: str = "eval",
) -> Path:
    """Write a filled model card, `README.md` with Hub metadata, into a saved checkpoint folder.

    The Hub shows the card as the model page and indexes its YAML header (task, library, data, base model, results),
    so a checkpoint without it is hard to find and impossible to judge. Numbers appear only when passed in: a missing
    EM, F1 or speedup reads "not measured".

    Args:
        save_directory (`str` or `os.PathLike`): the checkpoint folder (created if missing).
        model (`PreTrainedModel` or `PretrainedConfig`): the Block-Skim model or its config, for the settings.
        metrics (`Mapping[str, float]`, *optional*): EM/F1 in percent, as `BlockSkimTrainer.evaluate` returns them
            (`eval_exact_match`, `eval_f1` without skimming; `eval_skim_exact_match`, `eval_skim_f1`,
            `eval_skim_flops_speedup`, `eval_skim_ideal_speedup` with skimming); the `metric_key_prefix` is optional.
            Other keys are ignored.
        training_args (`TrainingArguments` or `Mapping`, *optional*): the run's arguments; the learning rate,
            schedule, epochs, batch size, seed and precision are shown.
        dataset_name (`str`, *optional*): Hub id of the training data set (e.g. `"rajpurkar/squad"`).
        dataset_license (`str`, *optional*): its licence (e.g. `"cc-by-sa-4.0"`).
        eval_dataset_name (`str`, *optional*): Hub id of the evaluation data set; defaults to `dataset_name`.
            Required when `metrics` holds EM or F1 (a score means nothing without its data set).
        eval_split (`str`, *optional*, defaults to `"validation"`): the evaluated split.
        base_model (`str`, *optional*): Hub id of the pretrained backbone (not a local path).
        speedup (`float`, *optional*): FLOPs speedup of skimming over the full model. Overrides
            `skim_flops_speedup` from `metrics`; then `speedup_details` is required.
        speedup_details (`str`, *optional*): how and where the speedup was measured (data, baseline, hardware).
        hyperparameters (`Mapping[str, Any]`, *optional*): further settings to list (e.g. `max_seq_length`,
            `doc_stride`).
        repo_id (`str`, *optional*): the Hub id the card will live under, used in the loading examples.
        model_name (`str`, *optional*): the card's title and `model-index` name; defaults to the last part of
            `repo_id`, else the folder name.
        license (`str`, *optional*, defaults to `"apache-2.0"`): licence of the weights (Hub licence id).
        language (`str` or `list[str]`, *optional*, defaults to `"en"`): language(s) of the training data.
        metric_key_prefix (`str`, *optional*, defaults to `"eval"`): prefix stripped from `metrics` keys.

    Returns:
        `Path`: the written `README.md`.

    Raises:
        `ValueError`: a value the Hub would reject or a reader could misread (EM outside [0, 100], a speedup without
            its measurement, a local path as `base_model`, results without a data set).
        `TypeError`: `model` is not a Block-Skim model or config, or `training_args` is neither arguments nor a
            mapping.

    Example:

    ```python
    >>> from modeling_blockskim.model_card import write_model_card

    >>> metrics = trainer.evaluate()  # a BlockSkimTrainer
    >>> write_model_card(
    ...     "outputs/bert-base-blockskim-squad",
    ...     model=trainer.model,
    ...     metrics=metrics,
    ...     training_args=trainer.args,
    ...     dataset_name="rajpurkar/squad",
    ...     dataset_license="cc-by-sa-4.0",
    ...     base_model="google-bert/bert-base-uncased",
    ...     hyperparameters={"max_seq_length": 384, "doc_stride": 128},
    ...     repo_id="my-org/bert-base-blockskim-squad",
    ... )
    ```
    """
    config = model.config if isinstance(model, PreTrainedModel) else model
    if not isinstance(config, BlockSkimConfig) and getattr(config, "model_type", None) != BlockSkimConfig.model_type:
        raise TypeError(
            f"model must be a Block-Skim model or its BlockSkimConfig, got {type(model).__name__} "
            f"(model_type={getattr(config, 'model_type', None)!r})."
        )
    if base_model is not None:
        _check_hub_id("base_model", base_model)
    for name, value in (("dataset_name", dataset_name), ("eval_dataset_name", eval_dataset_name)):
        if value is not None:
            _check_hub_id(name, value)
    eval_dataset_name = eval_dataset_name or dataset_name
    results = _results(metrics or {}, metric_key_prefix)
    if results and eval_dataset_name is None:
        raise ValueError(
            f"metrics hold {sorted(results)} but no data set was named: pass eval_dataset_name= (or dataset_name=) "
            "with the Hub id of the data the scores were measured on."
        )
    speedup, speedup_details = _speedup(speedup, speedup_details, metrics or {}, metric_key_prefix)

    model_name = model_name or (repo_id.split("/")[-1] if repo_id else Path(save_directory).resolve().name)
    tau = config.skim_threshold
    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag="question-answering",
        tags=["block-skim", "question-answering", "extractive-question-answering", config.backbone_config.model_type],
        base_model=base_model,
        datasets=[dataset_name] if dataset_name else None,
        metrics=["exact_match", "f1"],
        model_name=model_name if results else None,
        eval_results=_eval_results(results, eval_dataset_name, eval_split, tau) or None,
        ignore_metadata_errors=False,
    )
    content = Template(model_card_template()).substitute(
        metadata=card_data.to_yaml(),
        model_name=model_name,
        architecture=_architecture(config, base_model),
        training_data=_training_data(dataset_name, dataset_license),
        hyperparameters=_hyperparameters(config, training_args, hyperparameters),
        evaluation=_evaluation(
            results,
            eval_dataset_name,
            eval_split,
            tau,
            speedup,
            speedup_details,
            ideal_speedup=_metric(metrics or {}, "skim_ideal_speedup", metric_key_prefix),
        ),
        repo_id=repo_id or "path/to/checkpoint",
    )
    ModelCard(content, ignore_metadata_errors=False)  # parse the header back: bad metadata fails here, not on upload
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    path = save_directory / MODEL_CARD_FILE
    path.write_text(content, encoding="utf-8")
    return path


def _check_hub_id(name: str, value: str) -> None:
    if os.path.isabs(value) or os.path.exists(value):
        raise ValueError(
            f"{name}={value!r} is a local path; the card's metadata needs a Hub id such as "
            "'google-bert/bert-base-uncased', so readers can find it."
        )
    try:
        validate_repo_id(value)
    except HFValidationError as error:
        raise ValueError(f"{name}={value!r} is not a valid Hub id: {error}") from error


def _metric(metrics: Mapping[str, float], name: str, prefix: str) -> float | None:
    for key in (f"{prefix}_{name}", name):
        if key in metrics and metrics[key] is not None:
            value = metrics[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"metrics[{key!r}]={value!r} is not a finite number.")
            return float(value)
    return None


def _results(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """EM/F1 with and without skimming that are present, keyed `exact_match`, `f1`, `skim_exact_match`, `skim_f1`."""
    results = {}
    for name in ("exact_match", "f1", "skim_exact_match", "skim_f1"):
        value = _metric(metrics, name, prefix)
        if value is None:
            continue
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"{name}={value!r} is out of range: EM and F1 are percentages in [0, 100].")
        results[name] = value
    return results


def _speedup(
    speedup: float | None, details: str | None, metrics: Mapping[str, float], prefix: str
) -> tuple[float | None, str | None]:
    """The FLOPs speedup to report and how it was measured: the explicit one, else the trainer's, else none."""
    if speedup is not None:
        if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not 0 < speedup < math.inf:
            raise ValueError(f"speedup={speedup!r} must be a positive finite number (full FLOPs / skimmed FLOPs).")
        if not details:
            raise ValueError(
                f"speedup={speedup} needs speedup_details= saying how and where it was measured (data, baseline, "
                "FLOPs or wall-clock, hardware); a bare factor cannot be compared with anything."
            )
        return float(speedup), details
    from_trainer = _metric(metrics, "skim_flops_speedup", prefix)
    if from_trainer is not None:
        return from_trainer, details or TRAINER_SPEEDUP_DETAILS
    return None, None


def _eval_results(
    results: dict[str, float], dataset: str | None, split: str, tau: float | dict[int, float]
) -> list[EvalResult]:
    eval_results = []
    for key, value in results.items():
        skim = key.startswith("skim_")
        metric = key.removeprefix("skim_")
        label = "Exact match" if metric == "exact_match" else "F1"
        eval_results.append(
            EvalResult(
                task_type="question-answering",
                task_name="Extractive question answering",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=split,
                metric_type=metric,
                metric_value=value,
                metric_name=f"{label} (skimming, tau={threshold_label(tau)})" if skim else f"{label} (no skimming)",
                metric_args={"skim": True, "skim_threshold": _yaml_tau(tau)} if skim else {"skim": False},
            )
        )
    return eval_results


def _yaml_tau(tau: float | dict[int, float]) -> float | dict[str, float]:
    """tau for the card's metadata; per-layer keys as strings, as in `config.json`."""
    return {str(layer): value for layer, value in tau.items()} if isinstance(tau, dict) else tau


def _architecture(config: BlockSkimConfig, base_model: str | None) -> str:
    backbone = config.backbone_config
    layers = ", ".join(str(layer) for layer in config.skim_layers) or "none (the plain backbone QA model)"
    source = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else NOT_RECORDED
    return (
        f"This checkpoint: a `{backbone.model_type}` backbone with {backbone.num_hidden_layers} layers, hidden size "
        f"{backbone.hidden_size} and {backbone.num_attention_heads} attention heads; blocks of {config.block_size} "
        f"tokens; skim predictors after layers {layers} (0-based), reading {_predictor_inputs(config)}. "
        f"Pretrained backbone: {source}."
    )


def _predictor_inputs(config: BlockSkimConfig) -> str:
    if not config.predictor_diagonal_block:
        context = ", in context of the neighbouring and best blocks" if config.predictor_block_context else ""
        hidden = config.predictor_hidden_size
        classifier = f"one hidden layer of {hidden} units" if hidden else "a linear classifier"
        if config.predictor_token_matching:
            return (
                f"the block-question attention masses{context} and token matches of the block against the question "
                f"on the layer's hidden states ({classifier}, no CNN)"
            )
        return f"only the block-question attention masses{context} ({classifier}, no CNN)"
    if config.predictor_question_features:
        return "the diagonal attention square (CNN) and the block-question attention masses"
    return "the diagonal attention square (the paper's CNN)"


def _training_data(dataset_name: str | None, dataset_license: str | None) -> str:
    data = f"[`{dataset_name}`](https://huggingface.co/datasets/{dataset_name})" if dataset_name else NOT_RECORDED
    return f"- Data set: {data}\n- Data licence: {dataset_license or NOT_RECORDED}"


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(getattr(value, "value", value))  # enums (e.g. the scheduler type) by their value


def _hyperparameters(config: BlockSkimConfig, training_args: Any, hyperparameters: Mapping[str, Any] | None) -> str:
    rows = [
        ("block size (tokens)", config.block_size),
        ("skim predictor layers (0-based)", ", ".join(map(str, config.skim_layers)) or "none"),
        ("skim threshold tau", threshold_label(config.skim_threshold)),
        ("harmony coefficient alpha (skim-loss weight)", config.harmony_coefficient),
        ("balance factor beta (positive-block weight)", config.balance_factor),
        ("skim-loss reduction over layers", config.skim_loss_reduction),
        ("skims at inference by default", config.skim_at_inference),
    ]
    if training_args is None:
        arguments: Mapping[str, Any] = {}
    elif isinstance(training_args, Mapping):
        arguments = training_args
    elif hasattr(training_args, "to_dict"):
        arguments = training_args.to_dict()
    else:
        raise TypeError(f"training_args must be TrainingArguments or a mapping, got {type(training_args).__name__}.")
    training_rows = [
        (label, arguments[name])
        for name, label in TRAINING_ARGUMENTS.items()
        if arguments.get(name) is not None and not (name == "max_steps" and arguments[name] <= 0)
    ]
    training_rows += [(name, value) for name, value in (hyperparameters or {}).items()]
    lines = ["Block-Skim settings (from `config.json`):", "", "| setting | value |", "|---|---|"]
    lines += [f"| {label} | {_format(value)} |" for label, value in rows]
    lines += ["", "Training:", ""]
    if training_rows:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {label} | {_format(value)} |" for label, value in training_rows]
    else:
        lines.append(f"Training hyper-parameters: {NOT_RECORDED}.")
    return "\n".join(lines)


def _evaluation(
    results: dict[str, float],
    dataset: str | None,
    split: str,
    tau: float | dict[int, float],
    speedup: float | None,
    speedup_details: str | None,
    ideal_speedup: float | None,
) -> str:
    def cell(key: str) -> str:
        return f"{results[key]:.2f}" if key in results else NOT_MEASURED

    data = f"`{dataset}`, split `{split}`" if dataset else NOT_RECORDED
    speedup_cell = f"{speedup:.2f}x" if speedup is not None else NOT_MEASURED
    lines = [
        f"Evaluation data: {data}. EM and F1 in percent (SQuAD metric).",
        "",
        "| | Exact match | F1 | FLOPs speedup |",
        "|---|---|---|---|",
        f"| without skimming | {cell('exact_match')} | {cell('f1')} | 1x (reference) |",
        f"| with skimming (tau = {threshold_label(tau)}) | {cell('skim_exact_match')} | {cell('skim_f1')} | "
        f"{speedup_cell} |",
        "",
    ]
    if speedup is None:
        lines.append(f"Speedup: {NOT_MEASURED}.")
    else:
        lines.append(f"Speedup measurement: {speedup_details}.")
    if ideal_speedup is not None:
        lines.append(f"Ideal speedup from the kept-token fractions (paper Eq. 4): {ideal_speedup:.2f}x.")
    return "\n".join(lines)


__all__ = ["MODEL_CARD_FILE", "NOT_MEASURED", "model_card_template", "write_model_card"]
