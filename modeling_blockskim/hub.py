"""Publishing a Block-Skim checkpoint on the Hugging Face Hub: check that it is complete, then upload it.

A checkpoint on the Hub is only useful if `pipeline("question-answering", model=<repo id>, trust_remote_code=True)`
works for someone who has nothing but transformers installed. That needs, side by side: the weights in safetensors,
`config.json` with `auto_map` and the `custom_pipelines` entry, every remote-code file those name (and the files
they import), the tokenizer, and a filled model card. `push_checkpoint` refuses to upload a folder that lacks any of
them and says what is missing, because a half-uploaded repo fails only later, on the user's side.

Uploads go through `huggingface_hub` (`create_repo`, `upload_folder`); nothing here speaks HTTP itself.

`model.push_to_hub(repo_id)` and `tokenizer.push_to_hub(repo_id)` work too (the model's `save_pretrained` writes
`auto_map`, `custom_pipelines` and the remote code), but transformers keeps the card already on the Hub or else
writes its own generic one; push with `push_checkpoint` first, or write the card with `write_model_card`, for the
filled Block-Skim card.

Library code only: checkpoints do not need this file to load.
"""

from __future__ import annotations

import ast
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .model_card import MODEL_CARD_FILE, write_model_card

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer_config.json", "tokenizer.json")
"""The pipeline needs a fast tokenizer (offset mapping), which `tokenizer.json` defines."""

REQUIRED_AUTO_MAP: tuple[str, ...] = ("AutoConfig", "AutoModelForQuestionAnswering")
PIPELINE_TASK = "question-answering"

DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = (
    "checkpoint-*/",
    "runs/",
    "__pycache__/",
    "*.pyc",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "training_args.bin",
    "trainer_state.json",
)
"""What a Trainer leaves in its output folder that is not part of the model: intermediate checkpoints, TensorBoard
logs, and training state (pickles, which the Hub flags and which nobody loading the model needs)."""

STALE_WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin*")
"""Weight files already in the repository that are deleted unless this upload replaces them, so a re-push never leaves
old shards (or an old index pointing at them) next to new weights."""


def checkpoint_problems(
    folder: str | os.PathLike, ignore_patterns: Iterable[str] = DEFAULT_IGNORE_PATTERNS
) -> list[str]:
    """Everything that keeps a saved folder from being a complete, loadable Block-Skim checkpoint on the Hub.

    Only the files that would be uploaded count: a required file excluded by `ignore_patterns` is missing too.

    Args:
        folder (`str` or `os.PathLike`): the saved checkpoint folder.
        ignore_patterns (`Iterable[str]`, *optional*): patterns of files that are not uploaded (as in
            `huggingface_hub.upload_folder`); defaults to [`DEFAULT_IGNORE_PATTERNS`].

    Returns:
        `list[str]`: one sentence per problem, naming the missing or broken file; empty when the folder is complete.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder: save the checkpoint first (model.save_pretrained(folder))."]
    uploaded = set(
        filter_repo_objects(
            (path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()),
            ignore_patterns=list(ignore_patterns),
        )
    )
    problems = _weights_problems(folder, uploaded)
    problems += _config_problems(folder, uploaded)
    missing_tokenizer = [name for name in TOKENIZER_FILES if name not in uploaded]
    if missing_tokenizer:
        problems.append(
            f"tokenizer files {missing_tokenizer} are missing: save the model's fast tokenizer into the folder "
            "(tokenizer.save_pretrained(folder)); the pipeline cannot load without it."
        )
    problems += _model_card_problems(folder, uploaded)
    return problems


def check_checkpoint(folder: str | os.PathLike, ignore_patterns: Iterable[str] = DEFAULT_IGNORE_PATTERNS) -> None:
    """Raise a `ValueError` listing every problem [`checkpoint_problems`] finds; return quietly otherwise."""
    problems = checkpoint_problems(folder, ignore_patterns)
    if problems:
        listing = "\n".join(f"- {problem}" for problem in problems)
        raise ValueError(f"{folder} is not a complete Block-Skim checkpoint, nothing was uploaded:\n{listing}")


def push_checkpoint(
    folder_or_model: str | os.PathLike | PreTrainedModel,
    repo_id: str,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    model_card_kwargs: Mapping[str, Any] | None = None,
    commit_message: str = "Upload Block-Skim checkpoint",
    commit_description: str | None = None,
    private: bool = False,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    ignore_patterns: Iterable[str] = DEFAULT_IGNORE_PATTERNS,
) -> CommitInfo:
    """Upload a complete, loadable Block-Skim checkpoint to the Hugging Face Hub in one commit.

    The folder is checked first (weights in safetensors, `config.json` with `auto_map` and `custom_pipelines`, the
    remote-code files they reach, the tokenizer, a filled `README.md` model card); anything missing raises before a
    single request is made. The repository is created if needed, and weight files of an earlier upload that this one
    does not replace are deleted in the same commit.

    Args:
        folder_or_model (`str`, `os.PathLike` or `PreTrainedModel`): a saved checkpoint folder, or a model in memory,
            which is saved (with `tokenizer` and a model card) into a temporary folder first.
        repo_id (`str`): the Hub repository, `"org/name"` (or `"name"` under the token's user).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the model's fast tokenizer; required with a model, refused
            with a folder (save it into the folder instead).
        model_card_kwargs (`Mapping[str, Any]`, *optional*): with a model, arguments of
            [`~model_card.write_model_card`] (`metrics`, `training_args`, `dataset_name`, `base_model`, ...).
        commit_message (`str`, *optional*): summary of the commit.
        commit_description (`str`, *optional*): longer description of the commit.
        private (`bool`, *optional*, defaults to `False`): create the repository as private (an existing repository
            keeps its visibility).
        token (`str` or `bool`, *optional*): Hub token; defaults to the saved login or `HF_TOKEN`.
        revision (`str`, *optional*): branch to commit to; defaults to `main`.
        create_pr (`bool`, *optional*, defaults to `False`): open a pull request instead of committing directly.
        endpoint (`str`, *optional*): Hub address; defaults to `HF_ENDPOINT` (read when called, not at import).
        ignore_patterns (`Iterable[str]`, *optional*): files of the folder not to upload; defaults to
            [`DEFAULT_IGNORE_PATTERNS`] (Trainer checkpoints, logs and training state).

    Returns:
        `huggingface_hub.CommitInfo`: the commit (`.oid`, `.commit_url`, `.repo_url`, `.pr_url`).

    Raises:
        `ValueError`: the checkpoint is incomplete (every problem listed), or the arguments do not fit together.
        `TypeError`: `folder_or_model` is neither a folder nor a model.

    Example:

    ```python
    >>> from modeling_blockskim.hub import push_checkpoint
    >>> from modeling_blockskim.model_card import write_model_card

    >>> # After training: the Trainer saved model and tokenizer into output_dir; add the card, then push.
    >>> write_model_card(output_dir, model=model, metrics=metrics, dataset_name="rajpurkar/squad",
    ...                  repo_id="my-org/bert-base-blockskim-squad")
    >>> push_checkpoint(output_dir, "my-org/bert-base-blockskim-squad")

    >>> # Or straight from memory:
    >>> push_checkpoint(model, "my-org/bert-base-blockskim-squad", tokenizer=tokenizer,
    ...                 model_card_kwargs={"metrics": metrics, "dataset_name": "rajpurkar/squad"})
    ```
    """
    ignore_patterns = list(ignore_patterns)
    upload = dict(
        commit_message=commit_message,
        commit_description=commit_description,
        private=private,
        token=token,
        revision=revision,
        create_pr=create_pr,
        endpoint=endpoint,
    )
    if isinstance(folder_or_model, PreTrainedModel):
        if tokenizer is None:
            raise ValueError(
                "push_checkpoint(model, ...) needs tokenizer=: the pipeline on the Hub loads the tokenizer from the "
                "same repository."
            )
        with tempfile.TemporaryDirectory(prefix="blockskim-push-") as folder:
            folder_or_model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            write_model_card(folder, model=folder_or_model, **{"repo_id": repo_id, **(model_card_kwargs or {})})
            return _check_and_upload(folder, repo_id, ignore_patterns, **upload)
    if not isinstance(folder_or_model, (str, os.PathLike)):
        raise TypeError(
            f"folder_or_model must be a checkpoint folder or a PreTrainedModel, got {type(folder_or_model).__name__}."
        )
    for name, value in (("tokenizer", tokenizer), ("model_card_kwargs", model_card_kwargs)):
        if value is not None:
            raise ValueError(
                f"{name}= only applies when pushing a model object; for a folder, save the tokenizer into it "
                "(tokenizer.save_pretrained(folder)) and write its card (write_model_card(folder, ...)) first."
            )
    return _check_and_upload(folder_or_model, repo_id, ignore_patterns, **upload)


def _check_and_upload(
    folder: str | os.PathLike,
    repo_id: str,
    ignore_patterns: list[str],
    *,
    commit_message: str,
    commit_description: str | None,
    private: bool,
    token: str | bool | None,
    revision: str | None,
    create_pr: bool,
    endpoint: str | None,
) -> CommitInfo:
    check_checkpoint(folder, ignore_patterns)
    # A fresh client reads HF_ENDPOINT now; the module-level `huggingface_hub` functions froze it at import time.
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=folder,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        ignore_patterns=list(ignore_patterns),  # upload_folder extends the list it is given
        delete_patterns=list(STALE_WEIGHT_PATTERNS),
    )


def _weights_problems(folder: Path, uploaded: set[str]) -> list[str]:
    if WEIGHTS_FILE in uploaded:
        return []
    if WEIGHTS_INDEX_FILE in uploaded:
        try:
            shards = set(json.loads((folder / WEIGHTS_INDEX_FILE).read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as error:
            return [f"{WEIGHTS_INDEX_FILE} is not a valid safetensors index ({error})."]
        missing = sorted(shards - uploaded)
        return [f"weight shards {missing} listed in {WEIGHTS_INDEX_FILE} are missing."] if missing else []
    pickled = sorted(name for name in uploaded if name.startswith("pytorch_model") and name.endswith(".bin"))
    hint = f" (found only {pickled}: save with safetensors, the transformers default)" if pickled else ""
    return [f"weights {WEIGHTS_FILE} (or {WEIGHTS_INDEX_FILE} with its shards) are missing{hint}."]


def _config_problems(folder: Path, uploaded: set[str]) -> list[str]:
    """`config.json` must name the remote code (`auto_map`, `custom_pipelines`), and that code must be there."""
    if "config.json" not in uploaded:
        return ["config.json is missing: save the model with model.save_pretrained(folder)."]
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as error:
        return [f"config.json is not valid JSON ({error})."]
    problems = []
    references = []
    auto_map = config.get("auto_map") or {}
    for auto_class in REQUIRED_AUTO_MAP:
        if auto_class in auto_map:
            references.append(auto_map[auto_class])
        else:
            problems.append(
                f"config.json has no auto_map entry for {auto_class}: without it the model does not load with "
                "trust_remote_code=True (save a registered Block-Skim model with save_pretrained)."
            )
    impl = ((config.get("custom_pipelines") or {}).get(PIPELINE_TASK) or {}).get("impl")
    if impl:
        references.append(impl)
    else:
        problems.append(
            f"config.json has no custom_pipelines[{PIPELINE_TASK!r}] entry: transformers 5 has no question-answering "
            "pipeline of its own, so pipeline(..., trust_remote_code=True) would fail."
        )
    modules = {reference.rsplit(".", 1)[0] for reference in references if "--" not in reference}
    missing = sorted(f"{module}.py" for module in _reachable_modules(folder, modules, uploaded) - _present(uploaded))
    if missing:
        problems.append(f"remote-code files {missing} named in config.json or imported by its code are missing.")
    return problems


def _present(uploaded: set[str]) -> set[str]:
    return {name.removesuffix(".py") for name in uploaded if name.endswith(".py") and "/" not in name}


def _reachable_modules(folder: Path, modules: set[str], uploaded: set[str]) -> set[str]:
    """The given flat modules plus every sibling they import with `from .x import y` / `import .x`, transitively.

    These are the files transformers copies next to the weights and downloads with them (it follows the same
    relative imports), so each must be in the checkpoint.
    """
    reached: set[str] = set()
    pending = list(modules)
    while pending:
        module = pending.pop()
        if module in reached:
            continue
        reached.add(module)
        if f"{module}.py" not in uploaded:
            continue
        tree = ast.parse((folder / f"{module}.py").read_text(encoding="utf-8"))
        pending += [
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is not None
        ]
    return reached


def _model_card_problems(folder: Path, uploaded: set[str]) -> list[str]:
    fix = "write it with modeling_blockskim.model_card.write_model_card(folder, model=..., ...)"
    if MODEL_CARD_FILE not in uploaded:
        return [f"the model card {MODEL_CARD_FILE} is missing: {fix}."]
    try:
        data = ModelCard.load(folder / MODEL_CARD_FILE, ignore_metadata_errors=False).data
    except ValueError as error:
        return [f"{MODEL_CARD_FILE} has invalid metadata ({error}): {fix}."]
    wrong = [
        f"{key}={value!r}"
        for key, value, expected in (
            ("library_name", data.library_name, "transformers"),
            ("pipeline_tag", data.pipeline_tag, PIPELINE_TASK),
        )
        if value != expected
    ]
    if "block-skim" not in (data.tags or []):
        wrong.append(f"tags={data.tags!r} without 'block-skim'")
    if wrong:
        return [f"{MODEL_CARD_FILE} is not a filled Block-Skim model card ({', '.join(wrong)}): {fix}."]
    return []


__all__ = ["DEFAULT_IGNORE_PATTERNS", "check_checkpoint", "checkpoint_problems", "push_checkpoint"]
