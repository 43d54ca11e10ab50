"""A stand-in for the Hugging Face Hub HTTP API, just big enough for `HfApi` pushes (huggingface_hub 2.x).

Usage (pytest): the `hub_server` fixture in tests/test_hub.py starts one per test; push with
`endpoint=hub_server.url`. By hand: `server = StandInHub().start(); ...; server.stop()`.

What huggingface_hub 2.4 sends for create_repo + create_branch + upload_folder (read from its source):

    POST /api/repos/create                          {"name", "organization", "visibility", "type"}
    GET  /api/models/{repo_id}[/revision/{rev}]     repo_info (create_repo falls back to it on 401/402/403)
    POST /api/models/{repo_id}/branch/{branch}      {"startingPoint": rev}?
    POST /api/validate-yaml                         {"content": README text, "repoType"}
    POST /api/models/{repo_id}/preupload/{rev}      {"files": [{"path", "sample", "size"}]}
    POST /api/models/{repo_id}/commit/{rev}         NDJSON: header line, then one {"key": "file", ...} per file
    GET  /api/whoami-v2

Preupload answers `uploadMode: "regular"` for every file, so contents arrive base64-inline in the commit
body and the LFS/Xet flow (a separate storage protocol) is never exercised. Every request is recorded, and
failures can be injected per endpoint: `fail_next("commit", 500, times=2)`, `delay_next("create", 2.0)`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

USER = "tester"

# (endpoint name, method, path regex). Order matters: the repo-scoped operations before plain repo_info.
_ROUTES = [
    ("whoami", "GET", re.compile(r"^/api/whoami-v2$")),
    ("create", "POST", re.compile(r"^/api/repos/create$")),
    ("validate-yaml", "POST", re.compile(r"^/api/validate-yaml$")),
    ("preupload", "POST", re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/preupload/(?P<rev>[^/]+)$")),
    ("commit", "POST", re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/commit/(?P<rev>[^/]+)$")),
    ("branch", "POST", re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/branch/(?P<rev>[^/]+)$")),
    ("repo_info", "GET", re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/revision/(?P<rev>[^/]+)$")),
    ("repo_info", "GET", re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)$")),
]


@dataclass
class RecordedRequest:
    endpoint: str  # route name from _ROUTES, or "unknown"
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict] = field(default_factory=list)


class StandInHub:
    """In-memory Hub: repos, branches, committed files, a request log and failure injection."""

    def __init__(self, accepted_tokens: set[str] | None = None):
        # None: any (or no) token is accepted; otherwise a request must carry `Bearer <one of them>`.
        self.accepted_tokens = accepted_tokens
        self.repos: dict[str, Repo] = {}
        self.requests: list[RecordedRequest] = []
        self._failures: dict[str, list[int]] = {}
        self._delays: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> StandInHub:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="stand-in-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in an injected delay
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        assert self._httpd is not None, "call start() first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ test controls and inspection

    def fail_next(self, endpoint: str, status: int, times: int = 1) -> None:
        """The next `times` requests to `endpoint` (a route name, or "*" for any) answer `status`."""
        with self._lock:
            self._failures.setdefault(endpoint, []).extend([status] * times)

    def delay_next(self, endpoint: str, seconds: float, times: int = 1) -> None:
        """The next `times` requests to `endpoint` sleep `seconds` before being handled (timeout tests)."""
        with self._lock:
            self._delays.setdefault(endpoint, []).extend([seconds] * times)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The committed tree of `repo_id` at branch `revision`: {path_in_repo: bytes}."""
        return dict(self.repos[repo_id].branches[revision])

    def requests_to(self, endpoint: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.endpoint == endpoint]

    # ------------------------------------------------------------------ internals used by the handler

    def _pop(self, table: dict, endpoint: str):
        with self._lock:
            for key in (endpoint, "*"):
                if table.get(key):
                    return table[key].pop(0)
        return None

    def _full_repo_id(self, repo: str) -> str:
        return repo if "/" in repo else f"{USER}/{repo}"


class _Handler(BaseHTTPRequestHandler):
    server_hub: StandInHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - keep pytest output clean
        pass

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def do_DELETE(self):
        self._handle()

    # ------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        hub = self.server_hub
        path = urlsplit(self.path).path
        body = self._read_body()
        endpoint, params = "unknown", {}
        for name, method, pattern in _ROUTES:
            match = pattern.match(path)
            if match and method == self.command:
                endpoint, params = name, {k: unquote(v) for k, v in match.groupdict().items()}
                break
        record = RecordedRequest(endpoint, self.command, self.path, dict(self.headers.items()), body)
        with hub._lock:
            hub.requests.append(record)

        delay = hub._pop(hub._delays, endpoint)
        if delay is not None and hub._stopping.wait(delay):
            return
        status = hub._pop(hub._failures, endpoint)
        if status is not None:
            return self._reply(record, status, {"error": f"injected failure {status}"})
        if hub.accepted_tokens is not None:
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or auth[len("Bearer ") :] not in hub.accepted_tokens:
                headers = {"X-Error-Message": "Invalid credentials in Authorization header"}
                return self._reply(record, 401, {"error": "Invalid username or password."}, headers)
        if endpoint == "unknown":
            return self._reply(
                record, 404, {"error": f"stand-in Hub does not implement {self.command} {path}"}
            )
        try:
            status, payload, headers = getattr(self, "_api_" + endpoint.replace("-", "_"))(body, **params)
        except (ValueError, KeyError) as err:  # malformed request: the client library broke its protocol
            status, payload, headers = 400, {"error": f"bad request: {err!r}"}, {}
        self._reply(record, status, payload, headers)

    def _reply(self, record: RecordedRequest, status: int, payload, headers: dict | None = None) -> None:
        record.status = status
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def _repo_or_404(self, repo: str, rev: str | None = None):
        hub = self.server_hub
        repo_id = hub._full_repo_id(repo)
        if repo_id not in hub.repos:
            return None, (404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if rev is not None and rev not in hub.repos[repo_id].branches:
            return None, (404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
        return hub.repos[repo_id], None

    # ------------------------------------------------------------------ endpoints

    def _api_whoami(self, body: bytes):
        return 200, {"type": "user", "name": USER, "orgs": []}, {}

    def _api_create(self, body: bytes):
        hub = self.server_hub
        request = json.loads(body)
        if request.get("type", "model") != "model":
            return 400, {"error": "stand-in Hub only hosts model repos"}, {}
        repo_id = f"{request.get('organization') or USER}/{request['name']}"
        url = f"{hub.url}/{repo_id}"
        with hub._lock:
            if repo_id in hub.repos:
                return 409, {"error": "You already created this model repo", "url": url}, {}
            hub.repos[repo_id] = Repo(repo_id, private=request.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _api_repo_info(self, body: bytes, repo: str, rev: str = "main"):
        found, error = self._repo_or_404(repo, rev)
        if error:
            return error
        siblings = [{"rfilename": p} for p in sorted(found.branches[rev])]
        return (
            200,
            {"id": found.repo_id, "sha": found.heads[rev], "private": found.private, "siblings": siblings},
            {},
        )

    def _api_branch(self, body: bytes, repo: str, rev: str):
        found, error = self._repo_or_404(repo)
        if error:
            return error
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        with self.server_hub._lock:
            if rev in found.branches:
                return 409, {"error": f"Reference already exists: refs/heads/{rev}"}, {}
            found.branches[rev] = dict(found.branches[start])
            found.heads[rev] = found.heads[start]
        return 200, {}, {}

    def _api_validate_yaml(self, body: bytes):
        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        if match is None:
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}, {}
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"yaml does not parse: {err}"}]}, {}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "metadata must be a mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _api_preupload(self, body: bytes, repo: str, rev: str):
        _, error = self._repo_or_404(repo, rev)
        if error:
            return error
        files = json.loads(body)["files"]
        answer = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
        ]
        return 200, {"files": answer, "commitOid": "0" * 40}, {}

    def _api_commit(self, body: bytes, repo: str, rev: str):
        found, error = self._repo_or_404(repo, rev)
        if error:
            return error
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise ValueError("commit body must start with a header line")
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file" and value.get("encoding") == "base64":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            else:
                raise ValueError(f"unsupported commit operation {key!r} (LFS uploads are not implemented)")
        oid = hashlib.sha1(body).hexdigest()
        hub = self.server_hub
        with hub._lock:
            tree = found.branches[rev]
            for path in deleted:
                tree.pop(path, None)
            tree.update(added)
            found.heads[rev] = oid
            found.commits.append({"oid": oid, "revision": rev, "summary": lines[0]["value"].get("summary")})
        return (
            200,
            {"commitUrl": f"{hub.url}/{found.repo_id}/commit/{oid}", "commitOid": oid, "success": True},
            {},
        )
