"""A tiny local stand-in for the Hugging Face Hub's file-resolve protocol, for download tests.

It answers what `huggingface_hub.hf_hub_download` asks of `HF_ENDPOINT`:

    HEAD/GET {endpoint}/{spaces/|datasets/|}{owner}/{name}/resolve/{revision}/{filename}

with `X-Repo-Commit` (the commit a branch points to), `ETag` (git blob sha1) and
`Content-Length`; 404s carry the Hub's `X-Error-Code` (RepoNotFound,
RevisionNotFound, EntryNotFound) so the client raises its typed errors. Files
marked `lfs` behave like large files on the Hub: the resolve URL redirects to
another host (`localhost` instead of `127.0.0.1`, i.e. a "CDN") and the HEAD
answer carries `X-Linked-Etag` (the sha256) and `X-Linked-Size`. Private repos
answer 401 without the right bearer token. Every request is recorded.

Faults, for interrupted-download tests: `cut(filename, after=N, times=k)` sends
only the first N bytes of the file's body (from the resolve URL or the "CDN")
and then closes the connection, for the next k GETs of it; `hold=True` stalls
after those N bytes instead (the `stalled` event is set) until `release()` or
the server stops. GETs with `Range: bytes=START-[END]` get a 206 with that
slice, unless `ranges=False` (then the whole file, 200, as a server that
ignores Range does).

The server binds 127.0.0.1 on a free port, serves from a daemon thread, and
shuts itself down after `lifetime_s` even if a test never stops it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import re
import threading
from urllib.parse import quote, unquote, urlsplit

PREFIXES = {"spaces": "space", "datasets": "dataset"}
RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclasses.dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    range: str | None = None  # the Range header
    status: int | None = None  # the status answered
    sent: int = 0  # body bytes sent


@dataclasses.dataclass
class Fault:
    """What goes wrong with the next `times` GETs of one file's body."""

    after: int  # body bytes sent before the connection is closed (or stalls)
    times: int
    hold: bool = False


@dataclasses.dataclass
class Repo:
    repo_type: str = "model"
    branches: dict[str, str] = dataclasses.field(default_factory=dict)  # revision name -> commit
    files: dict[str, dict[str, bytes]] = dataclasses.field(default_factory=dict)  # commit -> {filename: bytes}
    lfs: set[str] = dataclasses.field(default_factory=set)  # filenames served through the "CDN"
    token: str | None = None  # private: requests need "Bearer <token>"


def fake_commit(label: str) -> str:
    """A 40-hex commit id derived from `label`."""
    return hashlib.sha1(label.encode()).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repositories in memory, served over HTTP on 127.0.0.1."""

    def __init__(self, lifetime_s: float = 120.0, ranges: bool = True):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self.ranges = ranges
        self.faults: dict[str, Fault] = {}  # filename -> fault
        self.stalled = threading.Event()  # a held response has sent its bytes
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._watchdog = threading.Timer(lifetime_s, self.stop)
        self._watchdog.daemon = True
        self._stopped = False

    # ---- content ------------------------------------------------------------------------------
    def add_file(self, repo_id: str, filename: str, data: bytes, *, repo_type: str = "model", revision: str = "main",
                 lfs: bool = False, token: str | None = None) -> str:
        """Put `data` at `filename` on branch `revision` (a new commit per branch); returns the commit."""
        repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_type=repo_type))
        repo.token = token if token is not None else repo.token
        commit = repo.branches.setdefault(revision, fake_commit(f"{repo_type}/{repo_id}@{revision}"))
        repo.files.setdefault(commit, {})[filename] = data
        if lfs:
            repo.lfs.add(filename)
        return commit

    def cut(self, filename: str, after: int, times: int = 1, hold: bool = False) -> None:
        """The next `times` GETs of `filename`'s body stop after `after` bytes: closed, or stalled with `hold`."""
        self.faults[filename] = Fault(after, times, hold)

    def release(self) -> None:
        """Let held responses go on (they then close the connection)."""
        self._release.set()

    # ---- life cycle ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://localhost:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        self._thread.start()
        self._watchdog.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._release.set()
        self._watchdog.cancel()
        self._server.shutdown()
        self._server.server_close()

    def count(self, method: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if method is None or r.method == method)

    # ---- protocol -----------------------------------------------------------------------------
    def _lookup(self, path: str, authorization: str | None) -> tuple[int, dict[str, str], bytes | None, str | None]:
        """(status, headers, body, filename) for a request path."""
        parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
        if parts[:1] == ["cdn"] and len(parts) == 2:  # the "CDN" serving LFS blobs by sha256
            for repo in self.repos.values():
                for files in repo.files.values():
                    for filename, data in files.items():
                        if hashlib.sha256(data).hexdigest() == parts[1]:
                            return 200, {"ETag": f'"{parts[1]}"'}, data, filename
            return 404, {}, None, None
        repo_type = "model"
        if parts and parts[0] in PREFIXES:
            repo_type, parts = PREFIXES[parts[0]], parts[1:]
        if len(parts) < 5 or parts[2] != "resolve":
            return 404, {"X-Error-Code": "RepoNotFound"}, None, None
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.token and authorization != f"Bearer {repo.token}"):
            return (401 if repo is not None else 404), {"X-Error-Code": "RepoNotFound"}, None, None
        commit = repo.branches.get(revision, revision)
        if commit not in repo.files:
            return 404, {"X-Error-Code": "RevisionNotFound"}, None, None
        data = repo.files[commit].get(filename)
        if data is None:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, None, None
        headers = {"X-Repo-Commit": commit}
        if filename in repo.lfs:
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"Location": f"{self.cdn}/cdn/{sha256}", "X-Linked-Etag": f'"{sha256}"',
                            "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_sha1(data)}"'})
            return 302, headers, None, None
        headers["ETag"] = f'"{git_blob_sha1(data)}"'
        return 200, headers, data, filename

    def _fault(self, filename: str | None) -> Fault | None:
        """The fault to apply to this GET of `filename` (used up one time), or None."""
        with self._lock:
            fault = self.faults.get(filename) if filename is not None else None
            if fault is None or fault.times <= 0:
                return None
            fault.times -= 1
            return fault

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # a stuck client cannot hold a server thread forever

            def _answer(self, with_body: bool) -> None:
                authorization = self.headers.get("authorization")
                record = Request(self.command, self.path, authorization, self.headers.get("range"))
                with hub._lock:
                    hub.requests.append(record)
                status, headers, body, filename = hub._lookup(self.path, authorization)
                wanted = RANGE.match(record.range or "")
                if with_body and status == 200 and body is not None and wanted and hub.ranges:
                    total, start = len(body), int(wanted[1])
                    end = min(int(wanted[2]) if wanted[2] else total - 1, total - 1)
                    status, body = 206, body[start:end + 1]
                    headers["Content-Range"] = f"bytes {start}-{end}/{total}"
                record.status = status
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body) if body is not None else 0))
                self.end_headers()
                if not with_body or body is None:
                    return
                fault = hub._fault(filename) if status in (200, 206) else None
                if fault is None:
                    self.wfile.write(body)
                    record.sent = len(body)
                    return
                self.wfile.write(body[:fault.after])
                record.sent = min(fault.after, len(body))
                if fault.hold:
                    hub.stalled.set()
                    hub._release.wait(timeout=60)
                self.close_connection = True  # the client gets fewer bytes than Content-Length

            def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
                self._answer(with_body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(with_body=True)

            def log_message(self, format: str, *args) -> None:  # keep test output clean
                pass

        return Handler


def resolve_path(repo_id: str, filename: str, revision: str = "main", repo_type: str = "model") -> str:
    """The URL path the client requests for a file (for asserting on recorded requests)."""
    prefix = {"space": "spaces/", "dataset": "datasets/"}.get(repo_type, "")
    return f"/{prefix}{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"
