"""``finetune serve`` on a causal-lm run: the OpenAI-compatible endpoints (plain and streamed, greedy), the same
text as ``finetune predict``, stop strings, and bad generation requests."""

from __future__ import annotations

import http.client
import json
import threading

import pytest
import tomli_w
from generation_fixtures import make_qa_rows, write_jsonl

from finetune.engine.console import Console
from finetune.run.predictions import predict_records
from finetune.run.serve import make_server, open_service, shutdown
from finetune.run.training import run_recipe

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("serve-lm")
    data = write_jsonl(folder / "train.jsonl", make_qa_rows(32))
    recipe = {"task": {"name": "causal-lm", "sample_prompts": 0, "max_new_tokens": MAX_TOKENS},
              "model": {"backbone": str(tiny_llama)},
              "data": {"train": str(data), "split": 0.25, "max_length": 64},
              "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "mixed_precision": "no",
                        "checkpoint_every_steps": 0, "seed": 0},
              "output": {"dir": str(folder / "run")}}
    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    run = run_recipe(path, [], console=Console(quiet=True))
    service = open_service(run.path, max_wait_ms=1)
    server = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield service, server.server_address[1]
    shutdown(server, service)
    thread.join(timeout=10)


def post(port: int, path: str, body) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, payload, response


def events(payload: bytes) -> list:
    """The server-sent events of a stream: each ``data: ...`` line, JSON parsed, then the final [DONE]."""
    out = []
    for block in payload.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


PROMPT = "add 3 and 4"


def test_completions_equal_predict_and_stream_joins_to_the_same_text(served):
    service, port = served
    status, payload, _ = post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": MAX_TOKENS})
    assert status == 200
    body = json.loads(payload)
    assert body["object"] == "text_completion" and body["model"] == service.model_name
    text = body["choices"][0]["text"]
    assert text  # the tiny model says something
    want = predict_records(service.task, service.batcher.model, service.batcher.processor,
                           [{"prompt": PROMPT}], batch_size=1)[0]
    assert text == want["pred_text"]
    assert body["choices"][0]["finish_reason"] == want["pred_finish_reason"]
    assert body["usage"]["completion_tokens"] == want["pred_new_tokens"]
    assert body["usage"]["prompt_tokens"] > 0

    status, payload, response = post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                                "stream": True})
    assert status == 200 and response.getheader("Content-Type") == "text/event-stream"
    chunks = events(payload)
    assert chunks[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == text
    assert chunks[-2]["choices"][0]["finish_reason"] == want["pred_finish_reason"]
    assert len(chunks) >= 3  # pieces came one by one, then the finish chunk


def test_chat_completions_plain_and_streamed(served):
    _, port = served
    request = {"model": "anything", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}
    status, payload, _ = post(port, "/v1/chat/completions", request)
    assert status == 200
    body = json.loads(payload)
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    # the prompt column's text and the same text as a user message render alike (the run's chat template)
    completion = json.loads(post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": MAX_TOKENS})[1])
    assert message["content"] == completion["choices"][0]["text"]

    status, payload, _ = post(port, "/v1/chat/completions", {**request, "stream": True})
    chunks = events(payload)
    assert chunks[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    joined = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert joined == message["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-2]["choices"][0]["delta"] == {}


def test_stop_strings_and_max_tokens(served):
    _, port = served
    full = json.loads(post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": MAX_TOKENS})[1])
    text = full["choices"][0]["text"]
    assert len(text) >= 3
    stop = text[2:4] if text[2:4].strip() else text[1:3]
    for stream in (False, True):
        status, payload, _ = post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                            "stop": [stop], "stream": stream})
        assert status == 200
        if stream:
            chunks = events(payload)
            got = "".join(c["choices"][0]["text"] for c in chunks[:-1])
            reason = chunks[-2]["choices"][0]["finish_reason"]
        else:
            body = json.loads(payload)
            got, reason = body["choices"][0]["text"], body["choices"][0]["finish_reason"]
        assert got == text[:text.index(stop)] and reason == "stop"
    one = json.loads(post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})[1])
    assert one["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize(("path", "body", "words"), [
    ("/v1/completions", {"prompt": PROMPT, "n": 2}, ["n", "only n = 1"]),
    ("/v1/completions", {"prompt": 5}, ["prompt", "string"]),
    ("/v1/completions", {"prompt": PROMPT, "temperature": 9}, ["temperature"]),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, ["max_tokens"]),
    ("/v1/completions", {"prompt": PROMPT, "stop": [1]}, ["stop"]),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": {}}, ["logit_bias", "not supported"]),
    ("/v1/chat/completions", {"messages": []}, ["messages"]),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, ["messages[0]"]),
    ("/v1/chat/completions", {"prompt": PROMPT}, ["prompt", "not supported"]),
])
def test_bad_generation_requests(served, path, body, words):
    _, port = served
    status, payload, _ = post(port, path, body)
    assert status == 400
    message = json.loads(payload)["error"]["message"]
    for word in words:
        assert word in message, message
    assert post(port, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 200


def test_predict_endpoint_and_metadata_for_a_causal_lm(served):
    _, port = served
    status, payload, _ = post(port, "/predict", {"texts": [PROMPT, "add 1 and 2"]})
    assert status == 200
    rows = json.loads(payload)["predictions"]
    assert [r["prompt"] for r in rows] == [PROMPT, "add 1 and 2"] and all("pred_text" in r for r in rows)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metadata")
    meta = json.loads(conn.getresponse().read())
    conn.close()
    assert meta["task"] == "causal-lm" and meta["input_columns"] == ["prompt"]
    assert meta["openai_endpoints"] == ["/v1/completions", "/v1/chat/completions"]
