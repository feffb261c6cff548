"""Checkpoints load anywhere: `trust_remote_code` in a process where this package cannot be imported, and the Auto
classes directly where it is installed. The remote-code files keep the import rules that make that possible."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForQuestionAnswering

import modeling_blockskim
from modeling_blockskim import BlockSkimForQuestionAnswering

from .testing_utils import qa_batch, run_without_package, tiny_model

PACKAGE_DIR = Path(modeling_blockskim.__file__).parent
REMOTE_CODE_FILES = {
    "configuration_blockskim.py",
    "modeling_blockskim.py",
    "attention_blockskim.py",
    "predictor_blockskim.py",
    "skimming_blockskim.py",
    "loss_blockskim.py",
    "pipeline_blockskim.py",
    "decoding_blockskim.py",
}
"""What `model.save_pretrained` copies: the model file and everything it reaches through relative imports, the
question-answering pipeline included."""


@pytest.fixture
def saved_checkpoint(tmp_path):
    model = tiny_model("bert")
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    return model, checkpoint


def test_save_writes_auto_map_safetensors_and_flat_remote_code(saved_checkpoint):
    _, checkpoint = saved_checkpoint
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_blockskim.BlockSkimConfig",
        "AutoModelForQuestionAnswering": "modeling_blockskim.BlockSkimForQuestionAnswering",
    }
    assert (checkpoint / "model.safetensors").is_file()
    assert config["custom_pipelines"]["question-answering"]["impl"] == (
        "pipeline_blockskim.BlockSkimQuestionAnsweringPipeline"
    )
    assert {path.name for path in checkpoint.glob("*.py")} == REMOTE_CODE_FILES


def test_remote_code_loads_with_identical_logits_where_the_package_is_not_importable(saved_checkpoint, tmp_path):
    model, checkpoint = saved_checkpoint
    batch = qa_batch("bert")
    torch.save(batch, tmp_path / "batch.pt")
    result = run_without_package(
        f"""
        import torch
        try:
            import modeling_blockskim
            raise SystemExit("the package must not be importable here")
        except ModuleNotFoundError:
            pass
        from transformers import AutoModelForQuestionAnswering
        model = AutoModelForQuestionAnswering.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        batch = torch.load("batch.pt")
        with torch.no_grad():
            out = {{
                "plain": model(**batch, skim=False).start_logits,
                "skim": model(**batch, skim=True, skim_threshold=0.5).start_logits,
            }}
        torch.save(out, "logits.pt")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        assert torch.equal(remote["plain"], model(**batch, skim=False).start_logits)
        assert torch.equal(remote["skim"], model(**batch, skim=True, skim_threshold=0.5).start_logits)


def test_without_the_package_and_without_trust_remote_code_loading_is_refused(saved_checkpoint, tmp_path):
    _, checkpoint = saved_checkpoint
    result = run_without_package(
        f"""
        from transformers import AutoModelForQuestionAnswering
        AutoModelForQuestionAnswering.from_pretrained({str(checkpoint)!r}, trust_remote_code=False)
        """,
        tmp_path,
    )
    assert result.returncode != 0
    assert "trust_remote_code" in result.stderr


def test_installed_package_registers_auto_classes_so_no_remote_code_is_needed(saved_checkpoint):
    model, checkpoint = saved_checkpoint
    assert isinstance(AutoConfig.from_pretrained(checkpoint), modeling_blockskim.BlockSkimConfig)
    loaded = AutoModelForQuestionAnswering.from_pretrained(checkpoint).eval()
    assert type(loaded) is BlockSkimForQuestionAnswering
    batch = qa_batch("bert")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).start_logits, model(**batch).start_logits)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import statement; level > 0 for relative imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend((0, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


@pytest.mark.parametrize("filename", sorted(REMOTE_CODE_FILES))
def test_remote_code_files_import_only_siblings_stdlib_torch_and_transformers(filename):
    allowed_roots = {"torch", "transformers"} | set(sys.stdlib_module_names)
    siblings = {name.removesuffix(".py") for name in REMOTE_CODE_FILES}
    for level, module in _imports(PACKAGE_DIR / filename):
        if level:
            assert level == 1 and module in siblings, f"{filename}: only `from .sibling import x` travels ({module!r})"
        else:
            assert module.split(".")[0] in allowed_roots, f"{filename}: {module!r} may be missing where it loads"
