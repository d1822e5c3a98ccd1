"""A small Hub-compatible HTTP server for tests (127.0.0.1 only).

It implements what huggingface_hub's client calls to create a repo, commit files
(regular uploads, base64 in NDJSON), validate README YAML, read repo info (with file sizes), list a
revision's files and download them (HEAD/GET, ``Range`` requests for resumed downloads), for model and
data set repos. Repos live in memory as a list of commits per branch; ``server.add_repo`` /
``server.add_commit`` fill one directly. ``fail`` injects failures: ``server.fail["commit"] = 500``
makes the next commit answer HTTP 500; ``(500, 10)`` the next ten; ``server.fail["truncate"] = 1``
cuts the next file download in the middle (``("model.safetensors", 1)``: the next download of that file);
the client retries, resuming with a ``Range`` request from what it wrote.
``server.state.headers`` records the request headers, in order.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


class Repo:
    def __init__(self, repo_id: str, private: bool) -> None:
        self.repo_id = repo_id
        self.private = private
        self.branches: dict[str, list[dict]] = {"main": []}  # branch -> commits (oldest first)
        self.prs: list[dict] = []

    def files(self, rev: str) -> dict[str, bytes]:
        commits = self.branches.get(rev)
        if commits is None:
            for branch in self.branches.values():
                for c in branch:
                    if c["oid"] == rev:
                        return c["files"]
            for pr in self.prs:
                if pr["oid"] == rev:
                    return pr["files"]
            return {}
        return commits[-1]["files"] if commits else {}

    def head(self, rev: str) -> str | None:
        commits = self.branches.get(rev)
        if commits:
            return commits[-1]["oid"]
        for branch in self.branches.values():
            if any(c["oid"] == rev for c in branch):
                return rev
        return None


class HubState:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.datasets: dict[str, Repo] = {}
        self.headers: list[tuple[str, str, dict[str, str]]] = []
        self.fail: dict[str, int] = {}
        self.slow: dict[str, float] = {}
        self.requests: list[tuple[str, str]] = []
        self.validated_yaml: list[str] = []
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: HubServer

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- helpers --------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Message": message})

    def _authorized(self) -> bool:
        return self.headers.get("authorization") == f"Bearer {self.state.token}"

    def _injected(self, kind: str) -> bool:
        if kind in self.state.slow:
            time.sleep(self.state.slow.pop(kind))
        entry = self.state.fail.get(kind)
        if entry is None:
            return False
        status, times = entry if isinstance(entry, tuple) else (entry, 1)
        if times <= 1:
            self.state.fail.pop(kind)
        else:
            self.state.fail[kind] = (status, times - 1)
        self._error(status, f"injected failure on {kind}")
        return True

    def _body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    # -- routes ---------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        self.state.requests.append(("POST", path))
        body = self._body()
        if path == "/api/validate-yaml":
            self.state.validated_yaml.append(json.loads(body)["content"])
            return self._json(200, {"errors": [], "warnings": []})
        if not self._authorized():
            return self._error(401, "Invalid credentials")
        if path == "/api/repos/create":
            if self._injected("create"):
                return None
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            with self.state.lock:
                if repo_id in self.state.repos:  # the Hub answers 409 with the repo's url
                    return self._json(409, {"error": "You already created this model repo",
                                            "url": f"{self.server.url}/{repo_id}"})
                self.state.repos[repo_id] = Repo(repo_id, data.get("visibility") == "private" or
                                                 bool(data.get("private")))
            return self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})
        parts = path.split("/")
        # /api/models/{ns}/{name}/preupload/{rev}  and  /api/models/{ns}/{name}/commit/{rev}
        if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models":
            repo = self.state.repos.get(f"{parts[3]}/{parts[4]}")
            if repo is None:
                return self._error(404, "Repository not found")
            action, rev = parts[5], "/".join(parts[6:])
            if action == "preupload":
                if self._injected("preupload"):
                    return None
                files = repo.files(rev)
                out = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                        "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None}
                       for f in json.loads(body)["files"]]
                return self._json(200, {"files": out, "commitOid": repo.head(rev)})
            if action == "commit":
                if self._injected("commit"):
                    return None
                return self._commit(repo, rev, body, create_pr="create_pr" in query)
            if action == "branch":
                branch = rev
                with self.state.lock:
                    if branch in repo.branches:
                        return self._error(409, "Branch already exists")
                    repo.branches[branch] = list(repo.branches["main"])
                return self._json(200, {})
        return self._error(404, f"no route for POST {path}")

    def _commit(self, repo: Repo, rev: str, body: bytes, create_pr: bool) -> None:
        header, files, deleted = None, {}, []
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                deleted.append(item["value"]["path"])
            else:
                return self._error(400, f"unsupported commit operation {item['key']}")
        with self.state.lock:
            if rev not in repo.branches:
                return self._error(404, f"Revision not found: {rev}")
            current = dict(repo.files(rev))
            current.update(files)
            for path in deleted:
                current.pop(path, None)
            oid = hashlib.sha1(f"{repo.repo_id}{time.time_ns()}{len(files)}".encode()).hexdigest()
            commit = {"oid": oid, "summary": header["summary"] if header else "", "files": current,
                      "added": sorted(files)}
            if create_pr:
                repo.prs.append(commit)
                num = len(repo.prs)
                return self._json(200, {"commitUrl": f"{self.server.url}/{repo.repo_id}/commit/{oid}",
                                        "commitOid": oid,
                                        "pullRequestUrl": f"{self.server.url}/{repo.repo_id}/discussions/{num}"})
            repo.branches[rev].append(commit)
        return self._json(200, {"commitUrl": f"{self.server.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                                "pullRequestUrl": None})

    def do_GET(self) -> None:  # noqa: N802
        self._get()

    def do_HEAD(self) -> None:  # noqa: N802
        self._get()

    def _get(self) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        self.state.requests.append((self.command, path))
        self.state.headers.append((self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        parts = path.split("/")
        if len(parts) >= 5 and parts[1] == "api" and parts[2] in ("models", "datasets"):
            repos = self.state.repos if parts[2] == "models" else self.state.datasets
            repo = repos.get(f"{parts[3]}/{parts[4]}")
            if repo is None or (repo.private and not self._authorized()):
                return self._error(404, "Repository not found")
            rev = "/".join(parts[6:]) if len(parts) > 6 and parts[5] in ("revision", "tree") else "main"
            sha = repo.head(rev)
            missing = ({"error": f"Revision not found: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
            if len(parts) > 6 and parts[5] == "tree":
                if sha is None:
                    return self._json(404, *missing)
                return self._json(200, [{"type": "file", "path": name, "size": len(data), "oid": git_blob_sha(data)}
                                        for name, data in sorted(repo.files(rev).items())])
            if sha is None:
                return self._json(404, *missing)
            files = repo.files(rev)
            return self._json(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                                    "siblings": [{"rfilename": name, "size": len(data), "blobId": git_blob_sha(data)}
                                                 for name, data in sorted(files.items())],
                                    "tags": [], "downloads": 0, "likes": 0})
        # /{ns}/{name}/resolve/{rev}/{file...}  and  /datasets/{ns}/{name}/resolve/{rev}/{file...}
        repos = self.state.repos
        if len(parts) >= 7 and parts[1] == "datasets" and parts[4] == "resolve":
            repos, parts = self.state.datasets, parts[1:]
        if len(parts) >= 6 and parts[3] == "resolve":
            if self._injected("download"):
                return None
            repo = repos.get(f"{parts[1]}/{parts[2]}")
            if repo is None or (repo.private and not self._authorized()):
                return self._error(404, "Repository not found")
            rev, file = parts[4], "/".join(parts[5:])
            files, sha = repo.files(rev), repo.head(rev)
            if file not in files or sha is None:
                return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            data = files[file]
            start = 0
            ranged = self.headers.get("range", "")
            if self.command == "GET" and ranged.startswith("bytes="):
                start = int(ranged[len("bytes="):].split("-")[0] or 0)
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{git_blob_sha(data)}"')
            self.send_header("X-Repo-Commit", sha)
            self.end_headers()
            if self.command == "GET":
                body = data[start:]
                cut = self.state.fail.get("truncate")  # a count, or (file name, count)
                name, count = cut if isinstance(cut, tuple) else (None, cut or 0)
                if count > 0 and name in (None, file.rsplit("/", 1)[-1]) and len(body) > 1:
                    self.state.fail["truncate"] = (name, count - 1) if name else count - 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return None
                self.wfile.write(body)
            return None
        return self._error(404, f"no route for GET {path}")


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token: str = "hf_test_secret_token_123") -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState(token)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def add_repo(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model",
                 private: bool = False) -> str:
        """A repo holding ``files`` in one commit on main; returns the commit hash."""
        repos = self.state.repos if repo_type == "model" else self.state.datasets
        repos[repo_id] = Repo(repo_id, private)
        return self.add_commit(repo_id, files, repo_type=repo_type)

    def add_commit(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model",
                   branch: str = "main") -> str:
        """A new commit on ``branch`` with ``files`` replacing the repo's files; returns its hash."""
        repo = (self.state.repos if repo_type == "model" else self.state.datasets)[repo_id]
        oid = hashlib.sha1(f"{repo_id}{time.time_ns()}{sorted(files)}".encode()).hexdigest()
        repo.branches.setdefault(branch, []).append({"oid": oid, "summary": "test", "files": dict(files),
                                                     "added": sorted(files)})
        return oid

    def requested(self, fragment: str) -> list[tuple[str, str]]:
        """The requests whose path contains ``fragment``."""
        return [r for r in self.state.requests if fragment in r[1]]

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def use_server(monkeypatch, server: HubServer, cache: Path) -> None:
    """Point this process at ``server`` (``HF_ENDPOINT``) with empty Hub and ``datasets`` caches under
    ``cache``, online: for in-process tests of downloads."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "hub-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache / "datasets-cache"))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def parquet_bytes(dataset) -> bytes:
    """A ``datasets.Dataset`` as the parquet file a Hub data set repo holds (features kept, media embedded)."""
    import io

    out = io.BytesIO()
    dataset.to_parquet(out)
    return out.getvalue()


def fetched(server: HubServer) -> list[str]:
    """The repo file paths downloaded so far (GET /.../resolve/REV/PATH)."""
    return [path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in server.state.requests
            if method == "GET" and "/resolve/" in path]
