"""``finetune serve``: every endpoint, predictions equal to ``finetune predict``'s, concurrent requests batched,
bad requests answered with a 4xx and a message, size limits, and the server still answering afterwards."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import tomli_w
from conftest import REPO, make_sentiment_rows, run_cli, write_csv

from finetune.engine.console import Console
from finetune.run.predictions import predict_records
from finetune.run.serve import Batcher, StopStrings, make_server, open_service, shutdown
from finetune.run.training import run_recipe

MAX_BYTES = 20_000
MAX_RECORDS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    folder = tmp_path_factory.mktemp("serve")
    data = write_csv(folder / "train.csv", make_sentiment_rows(96))
    recipe = {"task": {"name": "text-classification"}, "model": {"backbone": str(tiny_bert)},
              "data": {"train": str(data), "split": 0.25, "max_length": 16}, "peft": {"r": 4, "alpha": 8},
              "train": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-2, "mixed_precision": "no",
                        "checkpoint_every_steps": 0, "seed": 0},
              "output": {"dir": str(folder / "run")}}
    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return run_recipe(path, [], console=Console(quiet=True))


@pytest.fixture(scope="module")
def served(trained):
    service = open_service(trained.path, max_batch=32, max_wait_ms=50, max_request_bytes=MAX_BYTES,
                           max_records=MAX_RECORDS)
    server = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield service, server.server_address[1]
    shutdown(server, service)
    thread.join(timeout=10)


def call(port: int, method: str, path: str, body=None, raw: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = payload
    return response.status, parsed, response


def reference(service, records):
    return predict_records(service.task, service.batcher.model, service.batcher.processor, records, batch_size=32)


def same_rows(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        assert g["text"] == w["text"] and g["pred_label"] == w["pred_label"]
        for key in w:
            if key.startswith("prob_"):
                assert g[key] == pytest.approx(w[key], abs=1e-5)


def test_health_metadata_and_models(served, trained):
    service, port = served
    status, health, _ = call(port, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    status, meta, _ = call(port, "GET", "/metadata")
    assert status == 200
    assert meta["task"] == "text-classification"
    assert sorted(meta["labels"]) == ["neg", "pos"]
    assert meta["backbone"] == service.task.recipe.model.backbone
    assert meta["input_columns"] == ["text"]
    assert "pred_label" in meta["prediction_fields"]
    best = json.loads(trained.metrics_file.read_text())["best"]
    assert meta["metrics"]["best"]["accuracy"] == pytest.approx(best["accuracy"])
    assert meta["limits"]["max_records"] == MAX_RECORDS and meta["openai_endpoints"] == []
    status, models, _ = call(port, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == trained.path.name


def test_predict_equals_predict_records(served):
    service, port = served
    records = [{"text": "good great day", "id": 1}, {"text": "awful bad food", "id": 2},
               {"text": "the movie was so evil", "id": 3}]
    status, body, _ = call(port, "POST", "/predict", {"records": records})
    assert status == 200
    want = reference(service, records)
    same_rows(body["predictions"], want)
    assert [r["id"] for r in body["predictions"]] == [1, 2, 3]  # the records' own fields come back
    status, body, _ = call(port, "POST", "/predict", {"texts": [r["text"] for r in records]})
    assert status == 200
    same_rows(body["predictions"], reference(service, [{"text": r["text"]} for r in records]))
    status, body, _ = call(port, "POST", "/predict", {"text": "happy love"})
    assert status == 200 and len(body["predictions"]) == 1
    same_rows(body["predictions"], reference(service, [{"text": "happy love"}]))


def test_served_answers_equal_finetune_predicts(served, trained):
    """serve loads the run as `finetune predict` does (the adapter merged, the same precision decision): the
    served probabilities equal those of a `finetune predict` process on the same texts."""
    service, port = served
    texts = ["good great day", "awful bad food", "the movie was so evil", "happy"]
    proc = run_cli("predict", str(trained.path), *[a for t in texts for a in ("--text", t)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    predicted = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    said = re.search(r"predicting: (.*)", proc.stderr).group(1)
    status, body, _ = call(port, "POST", "/predict", {"texts": texts})
    assert status == 200
    same_rows(body["predictions"], predicted)
    assert said.startswith("adapter merged into the weights")
    meta = call(port, "GET", "/metadata")[1]
    assert meta["inference"] == said == service.inference  # the same loading path, the same precision decision
    merged = [m.merged for m in service.batcher.model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A")]
    assert merged and all(merged)


def test_the_adapter_kept_apart_gives_the_same_answers(served, trained):
    from finetune.run.inference import load_run

    service, _ = served
    task, model, processor, _ = load_run(trained.path)  # not merged, fp32: what serve used to predict with
    records = [{"text": t} for t in ("good great day", "awful bad food", "meh", "evil movie good")]
    assert not any(getattr(m, "merged", False) for m in model.modules())
    same_rows(reference(service, records), predict_records(task, model, processor, records, batch_size=32))


def test_concurrent_requests_are_batched_and_answered_correctly(served):
    service, port = served
    texts = [row["text"] for row in make_sentiment_rows(16, seed=3)]
    want = reference(service, [{"text": t} for t in texts])
    before = service.health()
    barrier = threading.Barrier(len(texts))
    answers: dict[int, tuple] = {}

    def client(i: int) -> None:
        barrier.wait()
        answers[i] = call(port, "POST", "/predict", {"text": texts[i]})[:2]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(len(texts)):
        status, body = answers[i]
        assert status == 200
        same_rows(body["predictions"], [want[i]])  # each request got its own answer
    after = call(port, "GET", "/health")[1]
    assert after["records"] - before["records"] == 16
    assert after["batches"] - before["batches"] < 16  # several requests shared a forward pass
    assert after["largest_batch"] > 1


def test_a_lone_request_does_not_wait_for_company(served):
    service, _ = served
    lazy = Batcher(service.task, service.batcher.model, service.batcher.processor, max_batch=32, max_wait_ms=5000)
    lazy.start()
    try:
        start = time.perf_counter()
        rows = lazy.predict([{"text": "good day"}])
        assert time.perf_counter() - start < 2.5  # not the 5 s a batch may wait while others arrive
        assert rows[0]["pred_label"] in ("pos", "neg")
    finally:
        lazy.stop()


@pytest.mark.parametrize(("method", "path", "body", "status", "words"), [
    ("POST", "/predict", b"{not json", 400, ["not valid JSON"]),
    ("POST", "/predict", {"txt": "good"}, 400, ["txt", "unknown field"]),
    ("POST", "/predict", {}, 400, ["exactly one of"]),
    ("POST", "/predict", {"text": "a", "texts": ["b"]}, 400, ["exactly one of"]),
    ("POST", "/predict", {"texts": "good"}, 400, ["texts", "list of strings"]),
    ("POST", "/predict", {"texts": ["good", 3]}, 400, ["texts[1]", "string"]),
    ("POST", "/predict", {"records": [{"review": "good"}]}, 400, ["records[0]", "'text'"]),
    ("POST", "/predict", {"records": ["good"]}, 400, ["records[0]", "object"]),
    ("POST", "/predict", {"records": [{"text": "a", "pred_label": "pos"}]}, 400, ["pred_label"]),
    ("POST", "/predict", {"records": []}, 400, ["empty"]),
    ("POST", "/predict", [1, 2], 400, ["JSON object"]),
    ("POST", "/predict", {"texts": ["good"] * (MAX_RECORDS + 1)}, 413, ["limit is 40", "--max-records"]),
    ("POST", "/predict", {"text": "good " * MAX_BYTES}, 413, ["limit is 20000 bytes", "--max-request-bytes"]),
    ("GET", "/nowhere", None, 404, ["/nowhere", "no such endpoint"]),
    ("POST", "/nowhere", {"text": "a"}, 404, ["no such endpoint"]),
    ("GET", "/predict", None, 405, ["GET is not allowed", "POST"]),
    ("POST", "/health", {}, 405, ["POST is not allowed"]),
    ("DELETE", "/metadata", None, 405, ["DELETE"]),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 404,
     ["text-classification", "does not generate text", "/predict"]),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(served, method, path, body, status, words):
    _, port = served
    raw = body if isinstance(body, bytes) else None
    got, answer, response = call(port, method, path, body if raw is None else None, raw=raw)
    assert got == status, answer
    message = answer["error"]["message"]
    for word in words:
        assert word in message, message
    assert answer["error"]["code"] == status
    if status == 405:
        assert response.getheader("Allow")
    assert call(port, "POST", "/predict", {"text": "good day"})[0] == 200


def test_missing_content_length_and_keep_alive(served):
    _, port = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/predict")
    conn.endheaders()  # no body, no Content-Length
    response = conn.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]["message"]
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # one connection, several requests
    for text in ("good", "bad", "nice"):
        conn.request("POST", "/predict", body=json.dumps({"text": text}))
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["predictions"][0]["text"] == text
    conn.close()


def test_a_failing_prediction_is_a_500_and_its_neighbours_are_answered(served, monkeypatch):
    service, port = served
    task = service.batcher.task.task  # the plugin's own object, behind the guard
    real = type(task).predict

    def fragile(self, model, processor, records, **kwargs):
        if any(r["text"] == "boom" for r in records):
            raise RuntimeError("the tokenizer exploded")
        return real(self, model, processor, records, **kwargs)

    monkeypatch.setattr(type(task), "predict", fragile)
    answers: dict[str, tuple] = {}
    barrier = threading.Barrier(4)

    def client(text: str) -> None:
        barrier.wait()
        answers[text] = call(port, "POST", "/predict", {"text": text})[:2]

    threads = [threading.Thread(target=client, args=(t,)) for t in ("boom", "good", "bad", "nice")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    status, body = answers["boom"]
    assert status == 500 and "the tokenizer exploded" in body["error"]["message"]
    for text in ("good", "bad", "nice"):
        assert answers[text][0] == 200 and answers[text][1]["predictions"][0]["text"] == text
    monkeypatch.undo()
    assert call(port, "GET", "/health")[1]["errors"] >= 1
    assert call(port, "POST", "/predict", {"text": "good day"})[0] == 200


def test_stop_strings_cut_across_pieces():
    out: list[str] = []
    cut = StopStrings(["END", "\n\n"], out.append)
    assert not cut("hello E")
    assert not cut("N")
    assert cut("D and more")
    cut.flush()
    assert "".join(out) == cut.text == "hello "
    out.clear()
    cut = StopStrings([], out.append)
    for piece in ("a", "b", "c"):
        assert not cut(piece)
    cut.flush()
    assert "".join(out) == "abc"


def test_cli_serves_and_stops_on_sigterm(trained):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "serve", str(trained.path), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=str(REPO))
    try:
        port = None
        deadline = time.time() + 90
        lines = []
        while time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port is not None, "".join(lines)
        assert any("predicting: adapter merged into the weights" in line for line in lines), "".join(lines)
        status, body, _ = call(port, "POST", "/predict", {"texts": ["good", "bad"]})
        assert status == 200 and len(body["predictions"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopping" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_a_port_in_use(trained, served):
    _, port = served
    proc = subprocess.run([sys.executable, "-m", "finetune.cli", "serve", str(trained.path), "--port", str(port)],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode != 0
    assert "cannot listen there" in proc.stderr and "--port" in proc.stderr
