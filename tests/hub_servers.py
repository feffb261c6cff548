"""Hugging Face Hub stand-ins on 127.0.0.1 for the Hub tests: nothing here reaches the internet.

- [`OlahHub`]: `olah`, a self-hosted Hub mirror, in offline mode, serving local git repositories through the real
  Hub download API, behind [`EntryNotFoundProxy`], which corrects one answer of olah's offline mode (see there).
- [`RecordingHub`]: a minimal Hub upload API (create repo, validate YAML, list files, pre-upload, LFS batch and PUT,
  NDJSON commit) that keeps what it receives in memory and records every call, so a test can check both the request
  sequence and the uploaded files.

Both are context managers that always stop what they started, also when the test body fails.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http import HTTPStatus
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

START_TIMEOUT_S = 60.0
"""Generous on a loaded 2-core machine (olah starts in about 2 s); a server that is not up by then is broken."""

STOP_TIMEOUT_S = 10.0

PORT_ATTEMPTS = 3


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def is_listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def commit_folder_as_git_repo(folder: Path, repository: Path) -> str:
    """Copy a checkpoint folder's files into a new git repository and commit them on `main`; return the commit sha.

    This is how olah's `mirrors-path` publishes a model: a plain git repository at `<root>/models/<org>/<name>`.
    """
    repository.mkdir(parents=True)
    for path in folder.rglob("*"):
        if path.is_file():
            target = repository / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="BlockSkim tests",
        GIT_AUTHOR_EMAIL="tests@localhost",
        GIT_COMMITTER_NAME="BlockSkim tests",
        GIT_COMMITTER_EMAIL="tests@localhost",
    )
    for command in (
        ["git", "init", "--quiet", "--initial-branch=main"],
        ["git", "add", "--all"],
        ["git", "commit", "--quiet", "--no-gpg-sign", "--message", "Publish checkpoint"],
    ):
        subprocess.run(command, cwd=repository, env=env, check=True, capture_output=True, timeout=60)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repository, check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


# Pull: olah behind a correcting proxy --------------------------------------------------------------------------------


@dataclass
class RecordedCall:
    method: str
    path: str
    """URL path without the query string."""
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def endpoint(self) -> str:
        return f"{self.method} {self.path}"


class EntryNotFoundProxy:
    """Forwards every request to olah and answers "entry not found" where olah's offline mode says "no repository".

    For a repository served from `mirrors-path`, olah's offline mode answers a request for a file or folder that the
    repository does not have (`HEAD .../resolve/main/vocab.txt`, `GET /api/models/<repo>/tree/main/
    additional_chat_templates`) with 401 `RepoNotFound`, because it looks for the revision in its own cache, which a
    mirror never fills. The real Hub answers 404 `EntryNotFound`, which transformers expects while it probes optional
    files (every tokenizer load does). For the published repositories only, this proxy turns that 401 into the Hub's
    404; everything else passes through unchanged, and every call is recorded.
    """

    def __init__(self, upstream_port: int, published: set[str]):
        self.upstream_port = upstream_port
        self.published = published
        self.calls: list[RecordedCall] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="entry-not-found-proxy",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(STOP_TIMEOUT_S)
        self._server.server_close()

    def _is_entry_of_published_repo(self, path: str) -> bool:
        """A file or folder of a published repository: `/{org}/{name}/resolve/{revision}/{path}` or
        `/api/models/{org}/{name}/tree/{revision}/{path}` (not the repository itself)."""
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo, action, entry = parts[2:4], parts[4:5], parts[6:]
            return "/".join(repo) in self.published and action == ["tree"] and bool(entry)
        repo, action, entry = parts[0:2], parts[2:3], parts[4:]
        return "/".join(repo) in self.published and action == ["resolve"] and bool(entry)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {key: value for key, value in self.headers.items() if key.lower() != "host"}
                connection = HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    status, payload = response.status, response.read()
                    response_headers = [
                        (key, value)
                        for key, value in response.getheaders()
                        if key.lower() not in ("transfer-encoding", "connection", "keep-alive", "content-length")
                    ]
                    content_length = response.getheader("Content-Length")
                finally:
                    connection.close()
                path = urlsplit(self.path).path
                if (
                    status == HTTPStatus.UNAUTHORIZED
                    and dict((k.lower(), v) for k, v in response_headers).get("x-error-code") == "RepoNotFound"
                    and proxy._is_entry_of_published_repo(unquote(path))
                ):
                    status, payload = HTTPStatus.NOT_FOUND, json.dumps({"error": "Entry not found"}).encode()
                    response_headers = [
                        ("Content-Type", "application/json"),
                        ("X-Error-Code", "EntryNotFound"),
                        ("X-Error-Message", "Entry not found"),
                    ]
                    content_length = None
                with proxy._lock:
                    proxy.calls.append(RecordedCall(self.command, path, status))
                self.send_response(status)
                for key, value in response_headers:
                    self.send_header(key, value)
                is_head = self.command == "HEAD"
                self.send_header("Content-Length", content_length if is_head and content_length else str(len(payload)))
                self.end_headers()
                if not is_head:
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_POST = _forward

        return Handler


class OlahHub:
    """`olah-cli` in offline mode serving git repositories from `<root>/mirrors`, reachable at [`url`].

    Args:
        root (`Path`): an empty folder for olah's configuration, cache, logs and the published repositories.
        repositories (`dict[str, Path]`): repo id (`"org/name"`) -> checkpoint folder to publish on `main`.
    """

    def __init__(self, root: Path, repositories: dict[str, Path]):
        self.root = root
        self.repositories = repositories
        self.commits: dict[str, str] = {}
        self._process: subprocess.Popen | None = None
        self._proxy: EntryNotFoundProxy | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._proxy.port}"

    @property
    def calls(self) -> list[RecordedCall]:
        return list(self._proxy.calls)

    def __enter__(self) -> OlahHub:
        mirrors = self.root / "mirrors"
        for repo_id, folder in self.repositories.items():
            self.commits[repo_id] = commit_folder_as_git_repo(folder, mirrors / "models" / repo_id)
        self._proxy = EntryNotFoundProxy(upstream_port=0, published=set(self.repositories))
        try:
            self._proxy.start()
            self._log = (self.root / "olah.log").open("wb")
            for _ in range(PORT_ATTEMPTS):
                # A free port can be taken between the probe and olah's bind; then olah exits and another is tried.
                self._proxy.upstream_port = free_port()
                self._process = subprocess.Popen(
                    [olah_cli(), "-c", str(self._write_config(mirrors))],
                    cwd=self.root,
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                )
                if self._wait_until_serving():
                    break
            else:
                raise RuntimeError(f"olah exited during start-up {PORT_ATTEMPTS} times:\n{self.log_tail()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _write_config(self, mirrors: Path) -> Path:
        """olah's TOML configuration; the mirror address is the proxy's, since olah writes it into its redirects."""
        config = self.root / "olah.toml"
        config.write_text(
            f"""
[basic]
host = "127.0.0.1"
port = {self._proxy.upstream_port}
repos-path = "{self.root / "olah-cache"}"
mirror-scheme = "http"
mirror-netloc = "127.0.0.1:{self._proxy.port}"
mirror-lfs-netloc = "127.0.0.1:{self._proxy.port}"
mirrors-path = ["{mirrors}"]

[accessibility]
offline = true

[[accessibility.proxy]]
repo = "*/*"
allow = true

[[accessibility.cache]]
repo = "*/*"
allow = true
""",
            encoding="utf-8",
        )
        return config

    def _wait_until_serving(self) -> bool:
        """True once olah answers for the first published repository; False if it exited; raises on time-out."""
        repo_id = next(iter(self.repositories))
        probe = f"http://127.0.0.1:{self._proxy.upstream_port}/api/models/{repo_id}/revision/main"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(probe, timeout=5) as response:
                    if json.load(response).get("sha") == self.commits[repo_id]:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"olah did not serve {probe} within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, characters: int = 3000) -> str:
        self._log.flush()
        return (self.root / "olah.log").read_text(errors="replace")[-characters:]

    def __exit__(self, *exc_info: Any) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(STOP_TIMEOUT_S)
        if self._proxy is not None:
            self._proxy.stop()
        if self._log is not None:
            self._log.close()


def olah_cli() -> str:
    """The `olah-cli` script of the running interpreter's environment (or the first on `PATH`)."""
    candidate = Path(sys.executable).with_name("olah-cli")
    found = str(candidate) if candidate.is_file() else shutil.which("olah-cli")
    if found is None:
        raise FileNotFoundError("olah-cli is not installed: pip install -e '.[dev]' (olah serves the Hub API offline)")
    return found


# Push: a recording upload server -------------------------------------------------------------------------------------


@dataclass
class StoredRepo:
    files: dict[str, bytes] = field(default_factory=dict)
    lfs_paths: set[str] = field(default_factory=set)
    commits: list[str] = field(default_factory=list)
    private: bool = False


INITIAL_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
"""What a new repository starts with, as on the Hub (abridged): weight files go through LFS."""


class RecordingHub:
    """Just enough of the Hub's upload API for `huggingface_hub.upload_folder` (Xet disabled), kept in memory.

    Endpoints: `POST /api/repos/create` (409 when the repository exists), `POST /api/validate-yaml`,
    `HEAD`/`GET /{repo}/resolve/main/{path}` (stored files, 404 `EntryNotFound` for others),
    `GET /api/models/{repo}/tree/{rev}` (file listing, for `delete_patterns`), `POST /api/models/{repo}/preupload/
    {rev}` (LFS for paths matched by `.gitattributes`), `POST /{repo}.git/info/lfs/objects/batch`, `PUT` of the LFS
    objects (sha256 checked), `POST /api/models/{repo}/commit/{rev}` (NDJSON: header, file, lfsFile, deletedFile,
    deletedFolder). Anything else answers 404 and is recorded, so a test notices new calls. Write calls need
    `Authorization: Bearer <token>` when a token is set.
    """

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, StoredRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.calls: list[RecordedCall] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="recording-hub", daemon=True
        )

    def __enter__(self) -> RecordingHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT_S)

    @property
    def endpoints(self) -> list[str]:
        """The recorded calls as `"METHOD /path"`, in order."""
        return [call.endpoint for call in self.calls]

    def export(self, repo_id: str, folder: Path) -> Path:
        """Lay the repository's current files out as a folder, as a clone would."""
        for path, content in self.repos[repo_id].files.items():
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        return folder

    # Request handling -------------------------------------------------------------------------------------------

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any, dict]:
        parts = [unquote(part) for part in path.strip("/").split("/")]
        authorised = self.token is None or headers.get("authorization") == f"Bearer {self.token}"
        if method == "PUT" and parts[0] == "lfs-objects" and len(parts) == 2:
            return self._store_lfs_object(parts[1], body)  # the pre-signed upload URL needs no token, as on the Hub
        if not authorised:
            return 401, {"error": "Invalid credentials in Authorization header"}, {"X-Error-Code": "Unauthorized"}
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body))
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        if method == "POST" and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1].removesuffix('.git')}", json.loads(body))
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            if repo_id not in self.repos:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            if revision != "main":
                return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
            if method == "GET" and action == "tree":
                return self._list_tree(repo_id, "/".join(parts[6:]))
            if method == "POST" and action == "preupload":
                return self._preupload(repo_id, json.loads(body))
            if method == "POST" and action == "commit":
                return self._commit(repo_id, body)
        return 404, {"error": f"{method} {path} is not implemented by the test Hub"}, {}

    def _resolve(self, repo_id: str, revision: str, path: str) -> tuple[int, Any, dict]:
        """A stored file, as `hf_hub_download` fetches it (`transformers`' `push_to_hub` reads the current card)."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        if revision != "main":
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        if path not in repo.files:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
        content = repo.files[path]
        headers = {"ETag": f'"{hashlib.sha1(content).hexdigest()}"', "X-Repo-Commit": repo.commits[-1]}
        return 200, content, headers

    def _create_repo(self, payload: dict) -> tuple[int, Any, dict]:
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        repo = StoredRepo(private=payload.get("visibility") == "private")
        repo.files[".gitattributes"] = INITIAL_GITATTRIBUTES
        repo.commits.append(hashlib.sha1(repo_id.encode()).hexdigest())
        self.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _validate_yaml(self, payload: dict) -> tuple[int, Any, dict]:
        content = payload["content"]
        try:
            if not content.startswith("---\n"):
                raise ValueError("README.md has no YAML metadata block")
            metadata = yaml.safe_load(content.split("---\n")[1])
            if not isinstance(metadata, dict):
                raise ValueError("the metadata block is not a mapping")
        except (ValueError, yaml.YAMLError) as error:
            return 400, {"errors": [{"message": str(error)}], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _list_tree(self, repo_id: str, folder: str) -> tuple[int, Any, dict]:
        repo = self.repos[repo_id]
        entries = [
            {"type": "file", "path": path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
            for path, content in sorted(repo.files.items())
            if not folder or path.startswith(folder.rstrip("/") + "/")
        ]
        return 200, entries, {}

    def _is_lfs(self, repo_id: str, path: str) -> bool:
        attributes = self.repos[repo_id].files.get(".gitattributes", b"").decode()
        patterns = [line.split()[0] for line in attributes.splitlines() if "filter=lfs" in line]
        return any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern) for pattern in patterns)

    def _preupload(self, repo_id: str, payload: dict) -> tuple[int, Any, dict]:
        files = [
            {
                "path": item["path"],
                "uploadMode": "lfs" if self._is_lfs(repo_id, item["path"]) else "regular",
                "shouldIgnore": False,
            }
            for item in payload["files"]
        ]
        return 200, {"files": files, "commitOid": self.repos[repo_id].commits[-1]}, {}

    def _lfs_batch(self, repo_id: str, payload: dict) -> tuple[int, Any, dict]:
        if repo_id not in self.repos:
            return 404, {"message": "Repository not found"}, {}
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-objects/{item['oid']}", "header": {}}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _store_lfs_object(self, oid: str, body: bytes) -> tuple[int, Any, dict]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": f"content does not hash to {oid}"}, {}
        self.lfs_objects[oid] = body
        return 200, {}, {}

    def _commit(self, repo_id: str, body: bytes) -> tuple[int, Any, dict]:
        repo = self.repos[repo_id]
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header" or not lines[0]["value"].get("summary"):
            return 400, {"error": "the first NDJSON line must be the commit header with a summary"}, {}
        files, lfs_paths = dict(repo.files), set(repo.lfs_paths)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs_paths.discard(value["path"])
            elif key == "lfsFile":
                content = self.lfs_objects.get(value["oid"])
                if content is None or len(content) != value["size"]:
                    return 400, {"error": f"LFS object {value['oid']} of {value['path']} was not uploaded"}, {}
                files[value["path"]] = content
                lfs_paths.add(value["path"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    return 404, {"error": "A file with this name doesn't exist"}, {"X-Error-Code": "EntryNotFound"}
                del files[value["path"]]
            elif key == "deletedFolder":
                files = {path: data for path, data in files.items() if not path.startswith(value["path"] + "/")}
            else:
                return 400, {"error": f"unknown NDJSON key {key!r}"}, {}
        repo.files, repo.lfs_paths = files, lfs_paths & set(files)
        oid = hashlib.sha1(body + repo.commits[-1].encode()).hexdigest()
        repo.commits.append(oid)
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}, {}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _serve(self) -> None:
                body = self._read_body()
                path = urlsplit(self.path).path
                headers = {key.lower(): value for key, value in self.headers.items()}
                with hub._lock:
                    try:
                        status, payload, extra_headers = hub._handle(self.command, path, headers, body)
                    except (KeyError, ValueError, IndexError) as error:
                        status, payload, extra_headers = 400, {"error": f"malformed request: {error!r}"}, {}
                    hub.calls.append(RecordedCall(self.command, path, status, headers, body))
                is_file = isinstance(payload, bytes)
                data = payload if is_file else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if is_file else "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in extra_headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

        return Handler
