"""Pushing runs to a Hub-compatible server (a local test server) and loading what was pushed."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import yaml
from conftest import run_cli
from hub_server import HubServer, git_blob_sha
from vision_fixtures import tiny_timm_cnn  # noqa: F401,F811 - fixture

from finetune.engine.console import Console
from finetune.engine.run_folder import RunDir
from finetune.run.hub import HubError, parse_front_matter, push_run
from finetune.run.inference import load_run
from finetune.run.training import run_recipe

TOKEN = "hf_test_secret_token_123"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield server


def hub_env(server) -> dict[str, str]:
    return {"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN}


@pytest.fixture
def finished_run(make_recipe):
    return run_recipe(make_recipe(train="epochs = 2"), [], console=Console(quiet=True))


def commits(server, repo_id="me/tiny", branch="main"):
    return server.state.repos[repo_id].branches[branch]


def test_push_commits_everything_needed_and_a_valid_card(hub, finished_run):
    result = run_cli("push", str(finished_run.path), "--repo-id", "me/tiny", env=hub_env(hub))
    assert result.returncode == 0, result.stderr
    (commit,) = commits(hub)
    files = commit["files"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "finetune_task.json", "tokenizer.json",
                 "tokenizer_config.json", "recipe.toml", "metrics.json", "curves.png", "README.md"):
        assert name in files, name
    card = files["README.md"].decode()
    meta = parse_front_matter(card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-classification"
    assert set(meta["tags"]) >= {"finetune", "text-classification", "lora"}
    assert "base_model" not in meta  # the tiny fixture is a local folder: no Hub id to claim
    assert "datasets" not in meta
    results = meta["model-index"][0]["results"][0]
    assert {m["type"] for m in results["metrics"]} >= {"accuracy", "macro_f1", "eval_loss"}
    assert hub.state.validated_yaml and hub.state.validated_yaml[-1] == card  # the Hub's YAML check was asked
    recipe = files["recipe.toml"].decode()
    pushed = __import__("tomllib").loads(recipe)
    assert pushed["data"]["train"] == "train.csv" and pushed["output"]["dir"] == "runs/run"  # no local paths
    assert str(finished_run.path) not in recipe
    assert "## Usage" in card and "PeftModel.from_pretrained" in card
    info = finished_run.info()["pushed"]
    assert info["repo_id"] == "me/tiny" and info["commit"] == commit["oid"]


def test_pushed_repo_loads_with_plain_peft_and_gives_the_same_outputs(hub, finished_run, tiny_bert):
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    push_run(finished_run.path, "me/tiny")
    local = snapshot_download("me/tiny", endpoint=hub.url)
    labels = json.loads(open(f"{local}/finetune_task.json").read())["state"]["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=len(labels))
    plain = PeftModel.from_pretrained(base, local).eval()
    tokenizer = AutoTokenizer.from_pretrained(local)
    _, ours, _, _ = load_run(finished_run.path)
    batch = tokenizer(["good day", "awful evil food"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ours(**batch).logits, atol=1e-6)


def test_pull_and_predict_from_a_hub_id(hub, finished_run):
    push_run(finished_run.path, "me/tiny")
    pulled = run_cli("pull", "me/tiny", env={**hub_env(hub), "HF_HOME": str(finished_run.path.parent / "hh")})
    assert pulled.returncode == 0, pulled.stderr
    local = pulled.stdout.strip()
    assert RunDir(local).adapter_dir == RunDir(local).path  # a pulled repo is a flat run folder
    from_hub = run_cli("predict", "me/tiny", "--text", "good great day", env=hub_env(hub))
    from_run = run_cli("predict", str(finished_run.path), "--text", "good great day")
    assert from_hub.returncode == 0, from_hub.stderr
    assert json.loads(from_hub.stdout) == json.loads(from_run.stdout)


def test_a_hub_id_that_cannot_be_pulled_says_both_no_local_folder_and_what_the_hub_answered(hub, tmp_path):
    missing = run_cli("predict", "me/nothing", "--text", "x", env=hub_env(hub), cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "me/nothing: no folder of that name here; tried as a Hub repo id: could not pull me/nothing" \
        in missing.stderr and "no such repository (HTTP 404)" in missing.stderr
    down = run_cli("predict", "me/nothing", "--text", "x", env={"HF_ENDPOINT": "http://127.0.0.1:9"}, cwd=tmp_path)
    assert down.returncode == 2 and "no folder of that name here" in down.stderr and "cannot reach" in down.stderr


def test_repush_is_idempotent_and_a_newer_run_is_one_commit(hub, finished_run, make_recipe):
    first = push_run(finished_run.path, "me/tiny")
    again = push_run(finished_run.path, "me/tiny")
    assert first["changed"] and not again["changed"]
    assert len(commits(hub)) == 1
    result = run_cli("push", str(finished_run.path), "--repo-id", "me/tiny", env=hub_env(hub))
    assert "nothing to push" in result.stdout and len(commits(hub)) == 1
    newer = run_recipe(make_recipe(train="epochs = 3", name="newer.toml"), [], console=Console(quiet=True),
                       overwrite=True)
    update = push_run(newer.path, "me/tiny")
    assert update["changed"] and len(commits(hub)) == 2
    assert commits(hub)[-1]["files"]["README.md"] == newer.card_file.read_bytes()
    assert "README.md" in commits(hub)[-1]["added"]


def test_branch_and_pull_request(hub, finished_run):
    push_run(finished_run.path, "me/tiny")
    push_run(finished_run.path, "me/tiny", revision="experiment")
    assert "experiment" in hub.state.repos["me/tiny"].branches
    result = run_cli("push", str(finished_run.path), "--repo-id", "me/tiny", "--create-pr", env=hub_env(hub))
    assert result.returncode == 0, result.stderr
    # identical content: nothing to propose, no PR opened
    assert hub.state.repos["me/tiny"].prs == [] or "discussions" in result.stdout


def test_refuses_unfinished_runs_unless_asked(hub, finished_run):
    finished_run.update_info(status="interrupted")
    with pytest.raises(HubError, match="did not finish.*--allow-incomplete"):
        push_run(finished_run.path, "me/tiny")
    assert "me/tiny" not in hub.state.repos
    assert push_run(finished_run.path, "me/tiny", allow_incomplete=True)["changed"]


def test_refuses_an_all_zero_adapter(hub, finished_run):
    from safetensors.torch import load_file, save_file

    path = finished_run.adapter_dir / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(path)).items()}, str(path))
    result = run_cli("push", str(finished_run.path), "--repo-id", "me/tiny", env=hub_env(hub))
    assert result.returncode == 2 and "zero" in result.stderr and "Traceback" not in result.stderr
    assert "me/tiny" not in hub.state.repos


def test_refuses_a_card_with_a_local_base_model_path(hub, finished_run):
    card = finished_run.card_file.read_text()
    finished_run.card_file.write_text(card.replace("library_name: peft", "base_model: /home/me/model\n"
                                                                         "library_name: peft"))
    with pytest.raises(HubError, match="base_model '/home/me/model' is not a Hub model id"):
        push_run(finished_run.path, "me/tiny")


@pytest.mark.parametrize("kind,status,expect", [("create", 403, "no permission"),
                                                 ("commit", 500, "HTTP 500"),
                                                 ("preupload", 401, "HTTP 401")])
def test_server_failures_are_clear_and_leave_no_half_push(hub, finished_run, kind, status, expect):
    if kind != "create":
        push_run(finished_run.path, "me/tiny")  # an existing repo with one commit
        finished_run.card_file.write_text(finished_run.card_file.read_text() + "\nchanged\n")
    before = finished_run.path.joinpath("run.json").read_text()
    hub.state.fail[kind] = (status, 20)  # persistent: the client retries 5xx with backoff
    result = run_cli("push", str(finished_run.path), "--repo-id", "me/tiny", env=hub_env(hub))
    assert result.returncode == 2 and expect in result.stderr and "Traceback" not in result.stderr
    assert "Nothing was" in result.stderr
    if kind != "create":
        assert len(commits(hub)) == 1  # one commit or none
    assert finished_run.path.joinpath("run.json").read_text() == before  # run folder untouched


def test_wrong_token_and_server_down(hub, finished_run):
    result = run_cli("push", str(finished_run.path), "--repo-id", "me/tiny",
                     env={**hub_env(hub), "HF_TOKEN": "hf_wrong"})
    assert result.returncode == 2 and "HTTP 401" in result.stderr and "HF_TOKEN" in result.stderr
    assert "hf_wrong" not in result.stderr + result.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    down = run_cli("push", str(finished_run.path), "--repo-id", "me/tiny",
                   env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": TOKEN})
    assert down.returncode == 2 and "cannot reach" in down.stderr and "Traceback" not in down.stderr


def test_a_server_that_stops_answering_times_out_with_a_clear_message(hub, finished_run):
    hub.state.slow["create"] = 8.0  # longer than the client's limit below
    result = run_cli("push", str(finished_run.path), "--repo-id", "me/tiny",
                     env={**hub_env(hub), "FINETUNE_HUB_TIMEOUT": "1"})
    assert result.returncode == 2 and "did not answer in time" in result.stderr
    assert "Nothing was changed" in result.stderr and "Traceback" not in result.stderr


def test_recipe_push_true_pushes_when_the_run_finishes_and_never_writes_the_token(hub, make_recipe):
    recipe = make_recipe(extra='[hub]\npush = true\nrepo_id = "me/auto"')
    result = run_cli("run", str(recipe), env=hub_env(hub))
    assert result.returncode == 0, result.stderr
    assert "pushed to me/auto" in result.stdout
    (commit,) = commits(hub, "me/auto")
    run = RunDir(yaml.safe_load(json.dumps({"d": str(recipe.parent / "run")}))["d"])
    everything = result.stdout + result.stderr
    for path in run.path.rglob("*"):
        if path.is_file():
            everything += path.read_bytes().decode("latin-1")
    for content in commit["files"].values():
        everything += content.decode("latin-1")
    assert TOKEN not in everything


def test_push_true_needs_a_repo_id(make_recipe, tmp_path):
    result = run_cli("run", str(make_recipe(extra="[hub]\npush = true")))
    assert result.returncode == 2 and "hub.repo_id" in result.stderr
    assert not (tmp_path / "run").exists()


def test_server_stores_blobs_by_git_sha():
    assert git_blob_sha(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob


@pytest.fixture
def vision_run(tmp_path, tiny_timm_cnn):  # noqa: F811 - the imported fixture
    from vision_fixtures import write_colour_images

    images = write_colour_images(tmp_path / "images")
    recipe = tmp_path / "vision.toml"
    recipe.write_text(f"""
[task]
name = "image-classification"
[model]
backbone = "{tiny_timm_cnn}"
[data]
train = "{images}"
split = 0.25
image_size = 32
[peft]
r = 4
alpha = 8
[train]
epochs = 1
batch_size = 8
mixed_precision = "no"
[output]
dir = "{tmp_path / 'vision-run'}"
""")
    return run_recipe(recipe, [], console=Console(quiet=True)), images


@pytest.fixture
def generation_run(make_gen_recipe):
    return run_recipe(make_gen_recipe(train="epochs = 1", output=None), [], console=Console(quiet=True))


def test_every_task_family_round_trips_through_the_hub(hub, vision_run, generation_run):
    """Pushed, pulled and used by id: the same predictions as from the run folder, for each family."""
    run, images = vision_run
    image = next(p for p in images.rglob("*.png"))
    cases = {"me/vision": (run, ["--text", str(image)], "peft"),
             "me/generation": (generation_run, ["--prompt", "What is 2 + 3?"], "peft")}
    for repo_id, (family_run, args, library) in cases.items():
        push_run(family_run.path, repo_id)
        meta = parse_front_matter(commits(hub, repo_id)[-1]["files"]["README.md"].decode())
        assert meta["library_name"] == library
        from_hub = run_cli("predict", repo_id, *args, env=hub_env(hub))
        from_run = run_cli("predict", str(family_run.path), *args)
        assert from_hub.returncode == 0, from_hub.stderr[-2000:]
        assert json.loads(from_hub.stdout.splitlines()[-1]) == json.loads(from_run.stdout.splitlines()[-1])


def test_token_multi_label_and_regression_runs_train_on_two_processes_and_round_trip_through_the_hub(
        hub, tmp_path, tiny_bert):
    """The NLP tasks added after the first wave: a 2-process run each, pushed, and predicted by id as from
    the run folder."""
    from conftest import make_sentiment_rows
    from fake_plugins import tagging_rows, write_jsonl

    tags = [{"tokens": r["tokens"], "tags": [t if t == "O" else "B-" + t for t in r["tags"]]}
            for r in tagging_rows(48)]
    labels = [{"text": r["text"], "labels": [r["label"]] + (["long"] if len(r["text"]) > 30 else [])}
              for r in make_sentiment_rows(48)]
    cases = {
        "token-classification": (write_jsonl(tmp_path / "tags.jsonl", tags), ["--text", "good bad table"]),
        "multi-label-classification": (write_jsonl(tmp_path / "labels.jsonl", labels), ["--text", "good movie"]),
        "text-regression": (write_jsonl(tmp_path / "scores.jsonl", [{"text": r["text"], "target": len(r["text"]) / 10}
                                                                     for r in make_sentiment_rows(48)]),
                            ["--text", "good movie"]),
    }
    for name, (data, args) in cases.items():
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text(f'[task]\nname = "{name}"\n[model]\nbackbone = "{tiny_bert}"\n'
                          f'[data]\ntrain = "{data}"\nsplit = 0.25\nmax_length = 16\n[peft]\nr = 4\nalpha = 8\n'
                          '[train]\nepochs = 1\nbatch_size = 8\nlearning_rate = 1e-2\nmixed_precision = "no"\n'
                          f'[output]\ndir = "{tmp_path / name}"\n')
        trained = run_cli("run", str(recipe), "--num-processes", "2", env=hub_env(hub))
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert RunDir(tmp_path / name).info()["processes"] == 2
        push_run(tmp_path / name, f"me/{name}")
        meta = parse_front_matter(commits(hub, f"me/{name}")[-1]["files"]["README.md"].decode())
        assert meta["pipeline_tag"] == ("token-classification" if name.startswith("token") else "text-classification")
        from_hub = run_cli("predict", f"me/{name}", *args, env=hub_env(hub))
        from_run = run_cli("predict", str(tmp_path / name), *args)
        assert from_hub.returncode == 0, from_hub.stderr[-2000:]
        assert json.loads(from_hub.stdout.splitlines()[-1]) == json.loads(from_run.stdout.splitlines()[-1])


def test_question_answering_trains_on_two_processes_and_round_trips_through_the_hub(hub, tmp_path, tiny_bert):
    """question-answering as token-classification above: a 2-process run (windows of one question dealt to
    different processes, gathered for the metric), pushed, and predicted by id as from the run folder."""
    from fake_plugins import write_jsonl
    from qa_fixtures import qa_rows

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(48, unanswerable=0.2, words=(4, 30)))
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"question": "which is good", "context": "a day was nice"},
                                                          {"question": "which", "context": " ".join(["the"] * 40)}])
    recipe = tmp_path / "qa.toml"
    recipe.write_text(f'[task]\nname = "question-answering"\n[model]\nbackbone = "{tiny_bert}"\n'
                      f'[data]\ntrain = "{data}"\nsplit = 0.25\nmax_length = 24\ndoc_stride = 4\n[peft]\nr = 4\n'
                      'alpha = 8\n[train]\nepochs = 1\nbatch_size = 8\nlearning_rate = 1e-2\nmixed_precision = "no"\n'
                      f'[output]\ndir = "{tmp_path / "qa"}"\n')
    trained = run_cli("run", str(recipe), "--num-processes", "2", env=hub_env(hub))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert RunDir(tmp_path / "qa").info()["processes"] == 2
    metrics = json.loads((tmp_path / "qa" / "metrics.json").read_text())
    assert metrics["best"]["total"] == metrics["data"]["eval_examples"]  # every question once, all windows gathered
    push_run(tmp_path / "qa", "me/qa")
    meta = parse_front_matter(commits(hub, "me/qa")[-1]["files"]["README.md"].decode())
    assert meta["pipeline_tag"] == "question-answering"
    from_hub = run_cli("predict", "me/qa", "--input", str(questions), env=hub_env(hub))
    from_run = run_cli("predict", str(tmp_path / "qa"), "--input", str(questions))
    assert from_hub.returncode == 0, from_hub.stderr[-2000:]
    assert [json.loads(li) for li in from_hub.stdout.splitlines()] == \
        [json.loads(li) for li in from_run.stdout.splitlines()]
