"""A small Hugging Face Hub over real HTTP on 127.0.0.1, for tests: the real `huggingface_hub` client talks to it.

It speaks the subset of the Hub API that huggingface_hub 2.x calls for what loraops does: repo create, model info
at a revision (with siblings and sha), tree listing, refs, resolve (HEAD and GET, with X-Repo-Commit, ETag,
X-Linked-Etag/Size, Content-Length and byte ranges, or whole files whatever the Range: `ignore_ranges`; file GETs
redirected to a CDN path: `redirect_files`), preupload
+ NDJSON commit (regular files inline, LFS files through the LFS batch endpoint and a basic PUT), branches, tags, pull requests (refs/pr/N), discussions and
pull requests' status (`set_status`: open, draft, closed, merged; a closed or merged one's ref can be deleted, as the
Hub's "Delete ref" does; `/api/models/{repo}/discussions/{num}`), tokens, private and gated repos, and the X-Error-Code headers the client maps to its exceptions. It does NOT speak Xet: like a
self-hosted or mirror endpoint, its xet-token routes answer 404.

Repos are real commits in a content-addressed store: blobs by sha256 on disk, commits as {path: blob} snapshots
with a sha1 over (parent, files, message). Tests seed repos directly (`FakeHub.commit`) or through the client.
Every request is logged in `FakeHub.requests` (method, path, Range header, bytes sent) so tests can assert what
was, and was not, transferred.
"""
from __future__ import annotations

import base64
import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()


class HubHTTPError(Exception):
    """An error answer: status, X-Error-Code, message (sent as X-Error-Message and {"error": ...})."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    lfs: bool
    git_oid: str  # git's blob sha1: the oid the Hub shows for regular files

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Blob]
    date: str


@dataclass
class Thread:
    """A discussion or pull request (one number space, as on the Hub). A pull request's commits are on refs/pr/N
    (Repo.prs) until its ref is deleted, which the Hub offers once it is closed or merged. A commit to the ref of a
    closed or merged one is accepted here, as by a git ref: what the Hub answers is not documented."""

    num: int
    title: str
    author: str
    pull_request: bool
    base: str | None = None
    """The branch a pull request targets."""
    status: str = "open"
    """open, closed, merged, or draft (a pull request opened empty, before it is published)."""
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # users allowed through the gate
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)
    threads: dict[int, Thread] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]

    def ref(self, name: str) -> str | None:
        if name.startswith("refs/pr/") and name[8:].isdigit():
            return self.prs.get(int(name[8:]))
        return self.branches.get(name) or self.tags.get(name)

    def resolve(self, revision: str) -> Commit:
        sha = self.ref(revision)
        if sha is None and revision in self.commits:
            sha = revision
        if sha is None and len(revision) >= 7:
            matches = [s for s in self.commits if s.startswith(revision.lower())]
            sha = matches[0] if len(matches) == 1 else None
        if sha is None:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]


class FakeHub:
    """The store and the server. `url` is what HF_ENDPOINT should be set to."""

    def __init__(self, root: Path, tokens: dict[str, str] | None = None):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens or {"hf_owner": "me", "hf_other": "someone"})
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict] = []
        self.ignore_ranges = False
        """Answer file GETs with the whole file (200) whatever their Range asks, as some mirrors and plain file
        servers do; `sent` then counts what went out before the client closed the connection."""
        self.redirect_files = False
        """Answer file GETs with a 302 to the file's bytes at /cdn/<sha256>, as the Hub sends LFS and Xet files to
        its CDN (which answers ranges, or ignores them with ignore_ranges)."""
        self.lock = threading.RLock()
        self.server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # serve_forever looks for shutdown() every poll_interval: its default 0.5 s was half a second of every
        # test that used the Hub (a minute of the suite).
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- store -----------------------------------------------------------------------------------------------

    def store_blob(self, data: bytes, lfs: bool | None = None, path: str = "") -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.root / "blobs" / sha256
        if not target.exists():
            target.write_bytes(data)
        if lfs is None:
            lfs = path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
        git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return Blob(sha256, len(data), lfs, git_oid)

    def blob_bytes(self, blob: Blob) -> bytes:
        return (self.root / "blobs" / blob.sha256).read_bytes()

    def create(self, repo_id: str, *, private: bool = False, gated: bool = False) -> Repo:
        """A new repo with the Hub's initial commit (a .gitattributes that routes weights through LFS)."""
        with self.lock:
            if repo_id in self.repos:
                raise HubHTTPError(409, "You already created this model repo")
            repo = self.repos[repo_id] = Repo(repo_id, private=private, gated=gated)
            self.commit(repo_id, {".gitattributes": GITATTRIBUTES}, message="initial commit")
            return repo

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", message: str = "update",
               delete: tuple[str, ...] = (), parent: str | None = None, blobs: dict[str, Blob] | None = None) -> str:
        """Commit files (bytes, or already stored `blobs`) onto a branch or refs/pr/N; returns the commit sha."""
        with self.lock:
            repo = self.repos.get(repo_id) or self.create(repo_id)
            head = repo.ref(branch)
            if head is None and branch != "main":
                raise HubHTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent is not None and head is not None and not head.startswith(parent):
                raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
            snapshot = dict(repo.commits[head].files) if head else {}
            for path in delete:
                snapshot = {p: b for p, b in snapshot.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            snapshot.update(blobs or {})
            snapshot.update({path: self.store_blob(data, path=path) for path, data in files.items()})
            body = json.dumps([head, message, sorted((p, b.sha256) for p, b in snapshot.items()), time.time_ns()])
            sha = hashlib.sha1(body.encode()).hexdigest()
            date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            repo.commits[sha] = Commit(sha, head, message, snapshot, date)
            if branch.startswith("refs/pr/"):
                repo.prs[int(branch[8:])] = sha
            else:
                repo.branches[branch] = sha
            return sha

    def commit_folder(self, repo_id: str, folder: Path, *, prefix: str = "", **kwargs) -> str:
        """Commit every file under a local folder (or one file), under ``prefix`` in the repo."""
        folder = Path(folder)
        paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        files = {prefix + (p.name if folder.is_file() else p.relative_to(folder).as_posix()): p.read_bytes()
                 for p in paths}
        return self.commit(repo_id, files, **kwargs)

    def open_pr(self, repo_id: str, base: str = "main", *, author: str = "someone", title: str = "update") -> int:
        """A new pull request against ``base`` (its ref at base's head, no commit of its own yet); its number."""
        with self.lock:
            repo = self.repos[repo_id]
            number = max(repo.threads, default=0) + 1
            repo.threads[number] = Thread(number, title, author, pull_request=True, base=base)
            repo.prs[number] = repo.resolve(base).sha
            return number

    def open_discussion(self, repo_id: str, *, author: str = "someone", title: str = "question") -> int:
        with self.lock:
            repo = self.repos[repo_id]
            number = max(repo.threads, default=0) + 1
            repo.threads[number] = Thread(number, title, author, pull_request=False)
            return number

    def set_status(self, repo_id: str, number: int, status: str, *, delete_ref: bool = False) -> None:
        """Close, merge (the status only: nothing lands on the base branch) or reopen a discussion or pull request;
        ``delete_ref`` also deletes a closed or merged pull request's refs/pr/N, as the Hub's "Delete ref" does."""
        with self.lock:
            repo = self.repos[repo_id]
            repo.threads[number].status = status
            if delete_ref:
                assert status in ("closed", "merged"), "the Hub deletes the ref of a closed or merged pull request only"
                del repo.prs[number]

    def tag(self, repo_id: str, tag: str, revision: str = "main") -> None:
        with self.lock:
            repo = self.repos[repo_id]
            if tag in repo.tags:
                raise HubHTTPError(409, f"Tag {tag} already exists")
            repo.tags[tag] = repo.resolve(revision).sha

    def branch(self, repo_id: str, branch: str, revision: str = "main") -> None:
        with self.lock:
            repo = self.repos[repo_id]
            if branch.startswith("refs/"):  # (refs/pr/N is a pull request's, made by a commit with create_pr)
                raise HubHTTPError(400, f"Invalid reference for a branch: {branch}")
            if branch in repo.branches:
                raise HubHTTPError(409, f"Reference refs/heads/{branch} already exists")
            repo.branches[branch] = repo.resolve(revision).sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of a repo at a revision (for assertions)."""
        commit = self.repos[repo_id].resolve(revision)
        return {path: self.blob_bytes(blob) for path, blob in commit.files.items()}

    def downloads(self, path_suffix: str = "") -> list[dict]:
        """Logged GET requests on resolve URLs whose path ends with path_suffix."""
        return [r for r in self.requests if r["method"] == "GET" and "/resolve/" in r["path"]
                and r["path"].endswith(path_suffix)]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that went away (a killed `loraops pull`, a download it cut short) is no server error:
        socketserver printed its ConnectionResetError's traceback on stderr."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, *args) -> None:  # quiet: the request log is kept in hub.requests
        pass

    # ---- plumbing --------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.segments = [unquote(s) for s in split.path.split("/")[1:]]
        self.entry = {"method": method, "path": unquote(split.path), "range": self.headers.get("Range"), "sent": 0}
        with self.hub.lock:
            self.hub.requests.append(self.entry)
        body = self._read_body()
        try:
            self._route(method, body)
        except HubHTTPError as exc:
            headers = {"X-Error-Message": exc.message}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            if exc.commit:
                headers["X-Repo-Commit"] = exc.commit
            self._send_json(exc.status, {"error": exc.message}, headers, head=method == "HEAD")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        chunk = 64 * 1024  # in pieces: a client that closes the connection early stops the count
        try:
            for start in range(0, len(body), chunk):
                self.wfile.write(body[start:start + chunk])
                self.entry["sent"] += len(body[start:start + chunk])
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_json(self, status: int, data, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    # ---- auth ------------------------------------------------------------------------------------------------

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, *, write: bool = False, content: bool = False) -> Repo:
        """The repo if this request may see it; write needs its owner; content (files) passes the gate."""
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        visible = repo is not None and (not repo.private or user == repo.owner)
        if not visible:
            # The Hub answers 401 to anonymous requests and 404 otherwise, RepoNotFound either way.
            raise HubHTTPError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and user != repo.owner:
            raise HubHTTPError(403, f"You don't have the rights to write to {repo_id}")
        if content and repo.gated and user != repo.owner and user not in repo.granted:
            raise HubHTTPError(
                401 if user is None else 403,
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to "
                "access it. Please log in.", "GatedRepo")
        return repo

    # ---- routes ----------------------------------------------------------------------------------------------

    def _route(self, method: str, body: bytes) -> None:
        s = self.segments
        if s[:2] == ["api", "whoami-v2"]:
            user = self._user()
            if user is None:
                raise HubHTTPError(401, "Invalid credentials in Authorization header")
            return self._send_json(200, {"type": "user", "name": user, "auth": {"type": "access_token"}})
        if s[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body))
        if s[:2] == ["api", "validate-yaml"]:
            return self._send_json(200, {"errors": [], "warnings": []})
        if s[:2] == ["api", "models"] and len(s) >= 4:
            repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
            return self._api_model(method, repo_id, rest, body)
        if len(s) >= 4 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(method, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        if len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{s[0]}/{s[1][:-4]}", json.loads(body))
        if s[:1] == ["cdn"] and len(s) == 2 and method == "GET" and (self.hub.root / "blobs" / s[1]).is_file():
            data = (self.hub.root / "blobs" / s[1]).read_bytes()
            return self._send_ranged(data, {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        if s[:1] == ["lfs-upload"] and method == "PUT":
            return self._lfs_put(s[1], body)
        if s[:1] == ["lfs-verify"] and method == "POST":
            oid = json.loads(body)["oid"]
            status = 200 if (self.hub.root / "blobs" / oid).exists() else 404
            return self._send_json(status, {"success": status == 200})
        raise HubHTTPError(404, f"Sorry, we can't find the page you are looking for ({self.path})")

    def _create_repo(self, payload: dict) -> None:
        user = self._user()
        namespace = payload.get("organization") or user
        if user is None or namespace != user:
            raise HubHTTPError(401 if user is None else 403,
                               f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        repo_id = f"{namespace}/{payload['name']}"
        private = payload.get("visibility", "public") != "public" or bool(payload.get("private"))
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:  # the Hub's 409 still carries the url (create_repo(exist_ok=True) reads it)
            return self._send_json(409, {"error": "You already created this model repo", "url": url},
                                   {"X-Error-Message": "You already created this model repo"})
        self.hub.create(repo_id, private=private)
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _api_model(self, method: str, repo_id: str, rest: list[str], body: bytes) -> None:
        if method == "GET" and (not rest or rest[0] == "revision"):
            repo = self._repo(repo_id)
            commit = repo.resolve(rest[1] if rest else "main")
            return self._send_json(200, self._model_info(repo, commit, blobs=self.query.get("blobs", "").lower() == "true"))
        if method == "GET" and rest[:1] == ["tree"]:
            repo = self._repo(repo_id)
            commit = repo.resolve(rest[1])
            return self._send_json(200, self._tree(repo, commit, "/".join(rest[2:]),
                                                   self.query.get("recursive", "").lower() == "true"))
        if method == "GET" and rest == ["refs"]:
            repo = self._repo(repo_id)
            refs = lambda kind, names: [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha}  # noqa: E731
                                        for n, sha in names.items()]
            return self._send_json(200, {"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags),
                                         "converts": []})
        if method == "GET" and len(rest) == 2 and rest[0] == "discussions":
            return self._send_json(200, self._thread(self._repo(repo_id), rest[1]))
        if method == "POST" and rest[:1] == ["preupload"]:
            repo = self._repo(repo_id, write=True)
            head = repo.ref(rest[1])
            current = repo.commits[head].files if head else {}
            files = []
            for f in json.loads(body)["files"]:
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
                existing = current.get(f["path"])
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": existing.etag if existing else None})
            return self._send_json(200, {"files": files, "commitOid": head})
        if method == "POST" and rest[:1] == ["commit"]:
            return self._commit(self._repo(repo_id, write=True), rest[1], body)
        if method == "POST" and rest[:1] == ["branch"]:
            repo = self._repo(repo_id, write=True)
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            self.hub.branch(repo.repo_id, rest[1], start)
            return self._send_json(200, {})
        if method == "POST" and rest[:1] == ["tag"]:
            repo = self._repo(repo_id, write=True)
            self.hub.tag(repo.repo_id, json.loads(body)["tag"], rest[1])
            return self._send_json(200, {})
        # Xet token routes (and anything else) are unknown here: a Hub endpoint without Xet.
        raise HubHTTPError(404, f"Sorry, we can't find the page you are looking for ({self.path})")

    def _thread(self, repo: Repo, number: str) -> dict:
        """GET /api/models/{repo}/discussions/{num}, what huggingface_hub's get_discussion_details reads."""
        thread = repo.threads.get(int(number)) if number.isdigit() else None
        if thread is None:
            raise HubHTTPError(404, "Discussion not found")
        details = {"num": thread.num, "title": thread.title, "status": thread.status, "author": {"name": thread.author},
                   "createdAt": thread.date, "isPullRequest": thread.pull_request, "events": [],
                   "repo": {"name": repo.repo_id, "type": "model"}}
        if thread.pull_request:
            details.update(changes={"base": f"refs/heads/{thread.base}"}, filesWithConflicts=[], diff="")
        return details

    def _model_info(self, repo: Repo, commit: Commit, blobs: bool) -> dict:
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=blob.size, blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": 134}
            siblings.append(sibling)
        return {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": repo.owner, "sha": commit.sha, "lastModified": commit.date,
                "createdAt": repo.commits[next(iter(repo.commits))].date, "private": repo.private,
                "gated": "auto" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": [], "siblings": siblings}

    def _tree(self, repo: Repo, commit: Commit, folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict] = {}
        for path, blob in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                sub = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(sub, {"type": "directory", "oid": hashlib.sha1(sub.encode()).hexdigest(),
                                             "size": 0, "path": sub})
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": 134}
                entries[path] = entry
        if folder and not entries:
            raise HubHTTPError(404, f"{folder} does not exist on \"{commit.sha}\"", "EntryNotFound", commit.sha)
        return list(entries.values())

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id, content=True)
        commit = repo.resolve(revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubHTTPError(404, "Entry not found", "EntryNotFound", commit.sha)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream", "Content-Disposition": f'inline; filename="{path}";'}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        if method == "HEAD":
            return self._send(200, b"", {**headers, "Content-Length": str(blob.size)}, head=True)
        if self.hub.redirect_files:
            return self._send(302, b"", {**headers, "Location": f"{self.hub.url}/cdn/{blob.sha256}"})
        self._send_ranged(self.hub.blob_bytes(blob), headers)

    def _send_ranged(self, data: bytes, headers: dict[str, str]) -> None:
        """The bytes the request's Range asks for (206, or 416 past the end), else all of them (200)."""
        wanted = None if self.hub.ignore_ranges else self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            size = len(data)
            first, _, last = wanted[6:].split(",")[0].partition("-")
            start, end = (int(first), int(last) if last else size - 1) if first else (size - int(last), size - 1)
            end = min(end, size - 1)
            if start >= size:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            return self._send(206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{size}"})
        self._send(200, data, headers)

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        header, files, blobs, delete = {}, {}, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                stored = self.hub.root / "blobs" / value["oid"]
                if not stored.exists():
                    raise HubHTTPError(422, f"LFS file {value['path']} was not uploaded (oid {value['oid']})")
                blobs[value["path"]] = self.hub.store_blob(stored.read_bytes(), lfs=True)
            elif key in ("deletedFile", "deletedFolder"):
                delete.append(value["path"])
        if any(part in ("", ".", "..") for path in [*files, *blobs] for part in path.split("/")):
            raise HubHTTPError(400, "Invalid path in commit")
        branch, pr_url = revision, None
        if self.query.get("create_pr") == "1":
            number = self.hub.open_pr(repo.repo_id, revision, author=self._user(), title=header.get("summary", ""))
            branch, pr_url = f"refs/pr/{number}", f"{self.hub.url}/{repo.repo_id}/discussions/{number}"
        elif revision not in repo.branches and not (revision.startswith("refs/pr/") and repo.ref(revision)):
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")  # (a commit to an open PR: ok)
        sha = self.hub.commit(repo.repo_id, files, blobs=blobs, branch=branch, message=header.get("summary", ""),
                              delete=tuple(delete), parent=header.get("parentCommit"))
        self._send_json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}",
                              "hookOutput": "", "pullRequestUrl": pr_url})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        self._repo(repo_id, write=True)
        objects = []
        for obj in payload["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not (self.hub.root / "blobs" / obj["oid"]).exists():
                item["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}", "header": {}},
                                   "verify": {"href": f"{self.hub.url}/lfs-verify", "header": {}}}
            objects.append(item)
        self._send_json(200, {"transfer": "basic", "objects": objects},
                        {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubHTTPError(400, "sha256 of the uploaded content does not match its oid")
        (self.hub.root / "blobs" / oid).write_bytes(body)
        self._send(200, b"", {})
