"""``finetune serve RUN``: one loaded run behind HTTP + JSON, concurrent requests batched dynamically.

The model is loaded once, as ``finetune predict`` loads it (``load_run``, the adapter merged, the same precision
decision); one worker thread runs every forward pass under
``torch.inference_mode`` while a threaded HTTP server (the standard library's) parses requests. A
prediction request becomes a job on a queue; the worker takes the first job, then keeps taking jobs for
up to ``max_wait_ms`` or until ``max_batch`` records are gathered, runs ``task.predict`` once on all of
them and answers each request with its own rows. Text generation (the OpenAI-compatible endpoints of a
task that implements ``Task.generate_text``) runs one request at a time in the same worker, streamed
piece by piece when asked.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from finetune.engine.guard import PREDICTION_PREFIXES
from finetune.errors import DataError, FinetuneError, RecipeError

#: Defaults of ``finetune serve``'s limits.
MAX_REQUEST_BYTES = 1_000_000
MAX_RECORDS = 256
MAX_BATCH = 32
MAX_WAIT_MS = 5.0
#: The most tokens one generation request may ask for (``max_tokens``).
MAX_TOKENS_LIMIT = 4096

ROUTES = {
    "/health": ("GET",),
    "/metadata": ("GET",),
    "/predict": ("POST",),
    "/v1/models": ("GET",),
    "/v1/completions": ("POST",),
    "/v1/chat/completions": ("POST",),
}


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message naming what is wrong."""

    def __init__(self, status: int, message: str, field_name: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field_name


@dataclass
class _Job:
    kind: str  # "predict" or "generate"
    payload: Any
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    on_text: Callable[[str], bool] | None = None


@dataclass
class Stats:
    requests: int = 0
    records: int = 0
    batches: int = 0
    largest_batch: int = 0
    generations: int = 0
    errors: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Batcher:
    """The worker thread that owns the model: prediction jobs are gathered into one ``task.predict`` call
    (up to ``max_batch`` records, waiting at most ``max_wait_ms`` after the first), generation jobs run alone."""

    def __init__(self, task: Any, model: Any, processor: Any, *, max_batch: int = MAX_BATCH,
                 max_wait_ms: float = MAX_WAIT_MS) -> None:
        self.task, self.model, self.processor = task, model, processor
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.stats = Stats()
        self.lock = threading.Lock()
        self.carry: _Job | None = None
        self.arriving = 0  #: prediction requests received and not yet answered
        self.concurrent = False  #: the last batch held several requests
        self.thread = threading.Thread(target=self._work, name="finetune-serve-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def enter(self) -> None:
        """A prediction request arrived (its body is being read): the worker may wait for it to join a batch."""
        with self.lock:
            self.arriving += 1

    def leave(self) -> None:
        """That request was answered (or refused)."""
        with self.lock:
            self.arriving -= 1

    def in_flight(self) -> int:
        with self.lock:
            return self.arriving

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: _Job) -> Any:
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def predict(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.submit(_Job("predict", records))

    def generate(self, request: dict[str, Any], on_text: Callable[[str], bool]) -> dict[str, Any]:
        return self.submit(_Job("generate", request, on_text=on_text))

    # -- the worker ------------------------------------------------------
    def _next(self, timeout: float | None) -> _Job | None:
        if self.carry is not None:
            job, self.carry = self.carry, None
            return job
        return self.jobs.get(timeout=timeout) if timeout is not None else self.jobs.get()

    def _work(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                first = self._next(None)
                if first is None:
                    return
                if first.kind == "generate":
                    self._run_generate(first)
                    continue
                batch, count = [first], len(first.payload)
                deadline = time.perf_counter() + self.max_wait
                stopping = False
                while count < self.max_batch:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    if self.carry is None and self.jobs.empty() and self.in_flight() <= len(batch) \
                            and not self.concurrent:
                        break  # no other request is on its way: waiting would only add latency
                    try:
                        job = self._next(min(remaining, 0.001))  # short polls: in_flight is looked at again
                    except queue.Empty:
                        continue
                    if job is None:
                        stopping = True
                        break
                    if job.kind != "predict" or count + len(job.payload) > self.max_batch:
                        self.carry = job  # the next round starts with it
                        break
                    batch.append(job)
                    count += len(job.payload)
                # requests that came together once tend to keep coming together (clients in a loop): then
                # the next batch waits its max_wait_ms for them even before their bodies arrive
                self.concurrent = len(batch) > 1
                self._run_predict(batch)
                if stopping:
                    return

    def _run_predict(self, batch: list[_Job]) -> None:
        from finetune.run.predictions import predict_records

        records = [r for job in batch for r in job.payload]
        try:
            rows = predict_records(self.task, self.model, self.processor, records, batch_size=self.max_batch)
        except Exception as exc:  # noqa: BLE001 - answered as a 500; the server keeps serving
            if len(batch) > 1:  # one bad request must not fail its neighbours: each again on its own
                for job in batch:
                    self._run_predict([job])
                return
            with self.lock:
                self.stats.errors += 1
            batch[0].error = exc
            batch[0].done.set()
            return
        with self.lock:
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(records))
            self.stats.records += len(records)
        start = 0
        for job in batch:
            job.result = rows[start:start + len(job.payload)]
            start += len(job.payload)
            job.done.set()

    def _run_generate(self, job: _Job) -> None:
        try:
            job.result = self.task.generate_text(self.model, self.processor, job.payload["prompt"],
                                                 max_tokens=job.payload["max_tokens"],
                                                 temperature=job.payload["temperature"],
                                                 top_p=job.payload["top_p"], on_text=job.on_text)
            with self.lock:
                self.stats.generations += 1
        except Exception as exc:  # noqa: BLE001 - answered as a 500; the server keeps serving
            with self.lock:
                self.stats.errors += 1
            job.error = exc
        job.done.set()


class StopStrings:
    """Text pieces in, text pieces out, cut at the first stop string: what could be the start of a stop
    string is held back until the next piece shows it is not."""

    def __init__(self, stops: list[str], emit: Callable[[str], None],
                 gone: threading.Event | None = None) -> None:
        self.stops = [s for s in stops if s]
        self.gone = gone or threading.Event()  #: set when the client went away: generation stops
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.emit = emit
        self.pending = ""
        self.text = ""
        self.stopped = False

    def __call__(self, piece: str) -> bool:
        """Takes the next piece; True once a stop string was found (generation should stop)."""
        if self.stopped or self.gone.is_set():
            return True
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._out(self.pending[:cut])
            self.pending, self.stopped = "", True
            return True
        ready = len(self.pending) - self.hold
        if ready > 0:
            self._out(self.pending[:ready])
            self.pending = self.pending[ready:]
        return self.gone.is_set()

    def flush(self) -> None:
        if not self.stopped:
            self._out(self.pending)
        self.pending = ""

    def _out(self, text: str) -> None:
        if text:
            self.text += text
            self.emit(text)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays, tensors
        return value.tolist()
    return str(value)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, default=_json_default).encode("utf-8")


class Service:
    """What the HTTP handler calls: request checking, the batcher, the answers' shapes."""

    def __init__(self, task: Any, model: Any, processor: Any, run_path: Path, *, max_batch: int = MAX_BATCH,
                 max_wait_ms: float = MAX_WAIT_MS, max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_records: int = MAX_RECORDS) -> None:
        self.task = task
        self.run_path = Path(run_path)
        self.max_request_bytes, self.max_records = max_request_bytes, max_records
        self.columns = list(task.predict_input_columns())
        self.generates = bool(task.implements("generate_text"))
        self.batcher = Batcher(task, model, processor, max_batch=max_batch, max_wait_ms=max_wait_ms)
        self.started = time.time()
        self.model_name = self.run_path.name
        self.inference = "as loaded"  #: how the model predicts (merged? which precision, why): open_service sets it

    # -- GET ---------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        with self.batcher.lock:
            stats = self.batcher.stats.to_dict()
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 3), **stats}

    def metadata(self) -> dict[str, Any]:
        recipe = self.task.recipe
        metrics: dict[str, Any] = {}
        metrics_file = self.run_path / "metrics.json"
        if metrics_file.exists():
            try:
                metrics = json.loads(metrics_file.read_text())
            except (OSError, ValueError):
                metrics = {}
        state = self.task.state or {}
        with self.batcher.lock:
            stats = self.batcher.stats.to_dict()
        return {
            "run": str(self.run_path), "model": self.model_name, "task": self.task.name,
            "backbone": recipe.model.backbone, "labels": state.get("labels"),
            "input_columns": self.columns, "prediction_fields": dict(self.task.prediction_fields),
            "text_shortcuts": len(self.columns) == 1, "inference": self.inference,
            "openai_endpoints": ["/v1/completions", "/v1/chat/completions"] if self.generates else [],
            "metrics": {k: metrics.get(k) for k in ("best", "test") if metrics.get(k) is not None},
            "limits": {"max_request_bytes": self.max_request_bytes, "max_records": self.max_records,
                       "max_batch": self.batcher.max_batch, "max_wait_ms": self.batcher.max_wait * 1000},
            "stats": stats,
        }

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": int(self.started),
                                            "owned_by": "finetune"}]}

    # -- POST /predict -----------------------------------------------------
    def records_of(self, body: Any) -> list[dict[str, Any]]:
        if not isinstance(body, dict):
            raise RequestError(400, f"request body: expected a JSON object such as {self._example()}, got "
                                    f"{type(body).__name__}.")
        given = [k for k in ("records", "text", "texts") if k in body]
        unknown = sorted(set(body) - {"records", "text", "texts"})
        if unknown:
            raise RequestError(400, f"{unknown[0]}: unknown field; /predict takes one of \"records\", \"text\", "
                                    f"\"texts\" (e.g. {self._example()}).", unknown[0])
        if len(given) != 1:
            raise RequestError(400, "request body: give exactly one of \"records\" (a list of objects), \"text\" "
                                    f"(a string) or \"texts\" (a list of strings); got {given or 'none'}. "
                                    f"Example: {self._example()}.", given[1] if len(given) > 1 else "records")
        key = given[0]
        value = body[key]
        if key in ("text", "texts"):
            if len(self.columns) != 1:
                raise RequestError(400, f"{key}: this run reads the fields {self.columns} for each input, so a "
                                        "text alone is not enough; send {\"records\": [{...}]} with those fields.",
                                   key)
            texts = [value] if key == "text" else value
            if key == "texts" and not isinstance(value, list):
                raise RequestError(400, f"texts: expected a list of strings, got {type(value).__name__}.", key)
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    where = "text" if key == "text" else f"texts[{i}]"
                    raise RequestError(400, f"{where}: expected a string, got {type(t).__name__}.", where)
            records = [{self.columns[0]: t} for t in texts]
        else:
            if not isinstance(value, list):
                raise RequestError(400, f"records: expected a list of objects, got {type(value).__name__}.", key)
            records = value
            for i, rec in enumerate(records):
                if not isinstance(rec, dict):
                    raise RequestError(400, f"records[{i}]: expected an object with the field(s) {self.columns}, "
                                            f"got {type(rec).__name__}.", f"records[{i}]")
                missing = [c for c in self.columns if c not in rec]
                if missing:
                    raise RequestError(400, f"records[{i}]: missing the field {missing[0]!r} (this run reads "
                                            f"{self.columns}; the record has {sorted(rec) or 'no fields'}).",
                                       f"records[{i}].{missing[0]}")
                taken = [k for k in rec if k.startswith(PREDICTION_PREFIXES)]
                if taken:
                    raise RequestError(400, f"records[{i}]: the field {taken[0]!r} starts with "
                                            f"{' or '.join(PREDICTION_PREFIXES)}, where predictions are written; "
                                            "rename or drop it.", f"records[{i}].{taken[0]}")
        if not records:
            raise RequestError(400, f"{key}: empty; give at least one input.", key)
        if len(records) > self.max_records:
            raise RequestError(413, f"{key}: {len(records)} inputs in one request; the limit is {self.max_records} "
                                    "(finetune serve --max-records). Split the request, or use `finetune predict "
                                    "--input FILE` for files.", key)
        return records

    def predict(self, body: Any) -> dict[str, Any]:
        records = self.records_of(body)
        with self.batcher.lock:
            self.batcher.stats.requests += 1
        return {"predictions": self.batcher.predict(records)}

    def _example(self) -> str:
        if len(self.columns) == 1:
            return '{"text": "..."}'
        return json.dumps({"records": [dict.fromkeys(self.columns, "...")]})

    # -- OpenAI-compatible -------------------------------------------------
    def generation_request(self, body: Any, chat: bool) -> dict[str, Any]:
        route = "/v1/chat/completions" if chat else "/v1/completions"
        if not self.generates:
            raise RequestError(404, f"{route}: this run's task {self.task.name!r} does not generate text (the "
                                    "OpenAI-compatible endpoints serve causal-lm runs); use POST /predict.")
        if not isinstance(body, dict):
            raise RequestError(400, f"request body: expected a JSON object, got {type(body).__name__}.")
        known = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n", "stream",
                 "user"} | ({"messages"} if chat else {"prompt"})
        unknown = sorted(set(body) - known)
        if unknown:
            raise RequestError(400, f"{unknown[0]}: not supported by finetune serve (it takes "
                                    f"{', '.join(sorted(known))}).", unknown[0])
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError(400, "messages: required, a non-empty list of {\"role\", \"content\"} objects.",
                                   "messages")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                        or m.get("role") not in ("system", "user", "assistant"):
                    raise RequestError(400, f"messages[{i}]: expected {{\"role\": \"system\"|\"user\"|\"assistant\", "
                                            "\"content\": \"text\"}.", f"messages[{i}]")
            prompt: Any = [{"role": m["role"], "content": m["content"]} for m in messages]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise RequestError(400, "prompt: required, a string (one prompt per request).", "prompt")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or not 1 <= max_tokens <= MAX_TOKENS_LIMIT):
            raise RequestError(400, f"max_tokens: expected a whole number from 1 to {MAX_TOKENS_LIMIT}, got "
                                    f"{max_tokens!r}.", "max_tokens")
        numbers = {}
        for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            value = body.get(name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not low <= value <= high or (name == "top_p" and value == 0)):
                raise RequestError(400, f"{name}: expected a number in {'(0' if name == 'top_p' else '[0'}, "
                                        f"{high}], got {value!r}.", name)
            numbers[name] = None if value is None else float(value)
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
            raise RequestError(400, "stop: expected a string or a list of up to 4 strings.", "stop")
        if body.get("n", 1) != 1:
            raise RequestError(400, f"n: only n = 1 is supported, got {body.get('n')!r}.", "n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, f"stream: expected true or false, got {stream!r}.", "stream")
        return {"prompt": prompt, "max_tokens": max_tokens, "stop": stops, "stream": stream, "chat": chat,
                **numbers}

    def generate(self, request: dict[str, Any], emit: Callable[[str], None],
                 gone: threading.Event | None = None) -> dict[str, Any]:
        """Runs one generation; ``emit`` hears each piece of text (stop strings already cut); generation stops
        early once ``gone`` is set (a streaming client went away)."""
        with self.batcher.lock:
            self.batcher.stats.requests += 1
        cutter = StopStrings(request["stop"], emit, gone)
        result = self.batcher.generate(request, cutter)
        if not isinstance(result, dict):
            raise FinetuneError(f"{self.task.name}: generate_text returned {type(result).__name__}, not a dict")
        cutter.flush()
        finish = "stop" if cutter.stopped else result.get("finish_reason", "stop")
        prompt_tokens, completion_tokens = int(result.get("prompt_tokens", 0)), int(result.get("completion_tokens", 0))
        return {"text": cutter.text, "finish_reason": finish,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def completion_body(self, request: dict[str, Any], result: dict[str, Any], ident: str, created: int) -> dict:
        if request["chat"]:
            choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                      "logprobs": None, "finish_reason": result["finish_reason"]}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": result["text"], "logprobs": None, "finish_reason": result["finish_reason"]}
            kind = "text_completion"
        return {"id": ident, "object": kind, "created": created, "model": self.model_name, "choices": [choice],
                "usage": result["usage"]}

    def chunk(self, request: dict[str, Any], ident: str, created: int, text: str | None,
              finish: str | None = None, first: bool = False) -> dict[str, Any]:
        if request["chat"]:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return {"id": ident, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "finetune-serve"
    timeout = 120  # seconds a connection may stay silent (an idle keep-alive, a stalled upload or reader)
    # Headers and body go out in two writes; with Nagle's algorithm the body would wait for the client's
    # delayed ACK of the headers (40 ms on Linux), longer than a prediction takes.
    disable_nagle_algorithm = True
    service: Service  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # -- plumbing ------------------------------------------------------------
    def _send(self, status: int, obj: Any, close: bool = False) -> None:
        data = _dumps(obj)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, field_name: str | None = None, close: bool = False) -> None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        self._send(status, {"error": {"message": message, "type": kind, "param": field_name, "code": status}},
                   close=close)

    def _route(self, method: str) -> bool:
        path = self.path.split("?", 1)[0]
        methods = ROUTES.get(path.rstrip("/") or "/")
        if methods is None:
            self._error(404, f"{path}: no such endpoint; this server has {', '.join(sorted(ROUTES))}.",
                        close=method == "POST")
            return False
        if method not in methods:
            self.send_response(405)
            data = _dumps({"error": {"message": f"{path}: {method} is not allowed here; use {' or '.join(methods)}.",
                                     "type": "invalid_request_error", "param": None, "code": 405}})
            self.send_header("Allow", ", ".join(methods))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if method == "POST":  # its body was not read
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)
            return False
        return True

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            raise RequestError(411, "request body: send it with a Content-Length header (chunked uploads are not "
                                    "accepted).")
        try:
            size = int(length)
        except ValueError:
            raise RequestError(400, f"Content-Length: {length!r} is not a number.") from None
        limit = self.service.max_request_bytes
        if size > limit:
            raise RequestError(413, f"request body: {size} bytes; the limit is {limit} bytes (finetune serve "
                                    "--max-request-bytes). Send fewer or shorter inputs per request.")
        raw = self.rfile.read(size)
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise RequestError(400, f"request body: not UTF-8 text ({exc}).") from None
        except json.JSONDecodeError as exc:
            raise RequestError(400, f"request body: not valid JSON: {exc.msg} at line {exc.lineno} column "
                                    f"{exc.colno}.") from None

    # -- methods -------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._route("GET"):
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        service = self.service
        answer = {"/health": service.health, "/metadata": service.metadata, "/v1/models": service.models}[path]
        self._send(200, answer())

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._route("PATCH")

    def do_POST(self) -> None:  # noqa: N802
        if not self._route("POST"):
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        batcher = self.service.batcher
        if path == "/predict":
            batcher.enter()
        try:
            self._post(path)
        finally:
            if path == "/predict":
                batcher.leave()

    def _post(self, path: str) -> None:
        try:
            try:
                body = self._body()
            except RequestError as exc:  # the body may be unread: close this connection after answering
                self._error(exc.status, exc.message, exc.field, close=True)
                return
            if path == "/predict":
                self._send(200, self.service.predict(body))
            else:
                self._generate(body, chat=path == "/v1/chat/completions")
        except RequestError as exc:
            self._error(exc.status, exc.message, exc.field)
        except BrokenPipeError:
            self.close_connection = True
        except (DataError, RecipeError) as exc:  # the task refused this input: the request's fault
            self._error(400, str(exc))
        except Exception as exc:  # noqa: BLE001 - a failing prediction: 500, the server keeps serving
            self._error(500, f"prediction failed: {exc}" if isinstance(exc, FinetuneError)
                        else f"prediction failed: {type(exc).__name__}: {exc}")

    def _generate(self, body: Any, chat: bool) -> None:
        service = self.service
        request = service.generation_request(body, chat)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not request["stream"]:
            result = service.generate(request, lambda _text: None)
            self._send(200, service.completion_body(request, result, ident, created))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.close_connection = True
        self.end_headers()

        gone = threading.Event()

        def event(obj: Any) -> None:
            if gone.is_set():
                return
            try:
                self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else _dumps(obj)) + b"\n\n")
                self.wfile.flush()
            except OSError:  # the client went away: generation stops at its next piece
                gone.set()

        if chat:
            event(service.chunk(request, ident, created, "", first=True))
        try:
            result = service.generate(request, lambda text: event(service.chunk(request, ident, created, text)),
                                      gone)
        except Exception as exc:  # noqa: BLE001 - headers are out: the error goes in the stream
            event({"error": {"message": f"generation failed: {type(exc).__name__}: {exc}", "type": "server_error",
                             "param": None, "code": 500}})
        else:
            event(service.chunk(request, ident, created, None if chat else "", finish=result["finish_reason"]))
        event(b"[DONE]")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False) -> Server:
    """The HTTP server for ``service`` (bound, not yet serving) with its worker started; ``port=0`` picks a
    free port (``server.server_address``)."""
    import socket

    handler = type("BoundHandler", (Handler,), {"service": service})
    server_class = type("Server6", (Server,), {"address_family": socket.AF_INET6}) if ":" in host else Server
    server = server_class((host, port), handler)
    server.verbose = verbose  # type: ignore[attr-defined]
    service.batcher.start()
    return server


def check_address(host: str, port: int) -> None:
    """Raises OSError when ``host:port`` cannot be listened on (checked before the model loads)."""
    import socket

    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


#: The batch size of ``finetune predict``'s default (``--batch-size``): the bf16 check predicts with it, so that
#: serve and predict share one check result (``predict_precision.json`` in the run folder).
PREDICT_BATCH_SIZE = 32


def open_service(run_path: str | Path, overrides: list[str] | None = None, *, trust_remote_code: bool = False,
                 announce: Callable[[str], None] | None = None, precision: str = "auto", merge: bool = True,
                 **limits: Any) -> Service:
    """Loads the run as ``finetune predict`` does and wraps it for serving: the best adapter, folded into the
    weights (``merge=False``: kept apart, as ``predict --no-merge``), in the precision ``predict --precision``
    would choose (``auto``: bf16 only on a CPU with AMX where it agrees with fp32 on the run's eval rows; the
    check's result in the run folder is shared with predict), so the served answers are predict's. Before
    torch is imported, its threads and OpenMP wait policy are chosen from the machine's state as for
    training (``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY`` override); ``announce`` hears the choices."""
    from finetune.engine import threads
    from finetune.run.inference import load_run, prepare_for_inference

    choice = threads.apply(threads.choose())
    if announce is not None:
        announce(f"torch threads: {choice.describe()}")

    task, model, processor, run = load_run(run_path, overrides, trust_remote_code=trust_remote_code,
                                           announce=announce)
    model, inference = prepare_for_inference(task, model, processor, run, precision=precision,
                                             batch_size=PREDICT_BATCH_SIZE, merge=merge, overrides=overrides)
    if announce is not None:
        announce(f"predicting: {inference}")
    service = Service(task, model, processor, run.path, **limits)
    service.inference = inference
    return service


def serve_forever(server: Server, service: Service, announce: Callable[[str], None] = print) -> None:
    """Serves until Ctrl-C or SIGTERM, then stops cleanly (open requests are dropped, the worker ends)."""
    import signal

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        announce("stopping")
    finally:
        server.server_close()
        service.batcher.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def shutdown(server: Server, service: Service) -> None:
    """Stops a server started in another thread (tests, embedding)."""
    server.shutdown()
    server.server_close()
    service.batcher.stop()


def warn(line: str) -> None:
    print(line, file=sys.stderr)
