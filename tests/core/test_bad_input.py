"""Bad input through the real CLI: a clear `error: ...`, exit code 2, no traceback, and the run folder is
neither created nor changed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import make_sentiment_rows, run_cli, write_csv

from finetune.engine.plugins import reset_registry
from finetune.engine.recipe_file import load_recipe


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("FINETUNE_PLUGINS", raising=False)
    reset_registry()
    yield
    reset_registry()


def snapshot(folder: Path) -> dict[str, tuple[bytes, int] | str]:
    """Every entry below ``folder`` with file contents and mtimes (what "untouched" means)."""
    if not folder.exists():
        return {}
    out: dict[str, tuple[bytes, int] | str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = (path.read_bytes(), path.stat().st_mtime_ns) if path.is_file() else "dir"
    return out


def assert_user_error(result, *fragments: str) -> str:
    stderr = result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{stderr}"
    assert stderr.startswith("error: "), stderr
    assert "Traceback" not in stderr and "Traceback" not in result.stdout, stderr
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in:\n{stderr}"
    return stderr


def assert_no_run_folder(out: Path) -> None:
    assert not out.exists(), f"{out} was created: {sorted(p.name for p in out.iterdir())}"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


def write_rows(path: Path, header: str, *lines: str) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


# ---------------------------------------------------------------------------
# data files

def test_missing_data_file(make_recipe, sentiment_csv, tmp_path):
    recipe = make_recipe()
    sentiment_csv.unlink()
    result = run_cli("run", str(recipe))
    assert_user_error(result, f"data.train: file not found: {sentiment_csv}",
                      "relative paths resolve against the recipe's folder")
    assert_no_run_folder(tmp_path / "run")


def test_missing_eval_file_relative_to_recipe(make_recipe, tmp_path):
    recipe = make_recipe(data='eval = "data/missing-eval.csv"')
    result = run_cli("run", str(recipe))
    assert_user_error(result, f"data.eval: file not found: {tmp_path / 'data' / 'missing-eval.csv'}")
    assert_no_run_folder(tmp_path / "run")


@pytest.mark.parametrize(("content", "fragments"), [
    ("text,label\n", ["data.train:", "has no rows", "columns found: text, label"]),
    ("", ["data.train:", "is empty", "header row and at least one example"]),
    ("\n\n", ["data.train:", "is empty"]),
], ids=["header-only", "zero-bytes", "blank-lines"])
def test_empty_data_file(make_recipe, sentiment_csv, tmp_path, content, fragments):
    recipe = make_recipe()
    sentiment_csv.write_text(content)
    result = run_cli("run", str(recipe))
    assert_user_error(result, str(sentiment_csv), *fragments)
    assert_no_run_folder(tmp_path / "run")


def test_missing_text_column_lists_columns_found(make_recipe, sentiment_csv, tmp_path):
    recipe = make_recipe()
    write_rows(sentiment_csv, "sentence,label", "good day,pos", "bad day,neg")
    result = run_cli("run", str(recipe))
    assert_user_error(result, "data.text_column: column 'text' not found in", str(sentiment_csv),
                      "Columns found: 'sentence', 'label'", "Set data.text_column to one of them")
    assert_no_run_folder(tmp_path / "run")


def test_missing_label_column_with_did_you_mean(make_recipe, sentiment_csv, tmp_path):
    recipe = make_recipe()
    write_rows(sentiment_csv, "text,labels", "good day,pos", "bad day,neg")
    result = run_cli("validate", str(recipe))
    assert_user_error(result, "data.label_column: column 'label' not found", "(did you mean 'labels'?)",
                      "Columns found: 'text', 'labels'")
    assert_no_run_folder(tmp_path / "run")


def test_tsv_read_as_csv_hints_at_format(make_recipe, sentiment_csv, tmp_path):
    recipe = make_recipe()
    write_rows(sentiment_csv, "text\tlabel", "good day\tpos", "bad day\tneg")
    result = run_cli("run", str(recipe))
    assert_user_error(result, "data.text_column: column 'text' not found", "data.format")
    assert_no_run_folder(tmp_path / "run")


def test_tsv_with_commas_in_a_csv_file_suggests_the_tsv_format(make_recipe, sentiment_csv, tmp_path):
    recipe = make_recipe()
    write_rows(sentiment_csv, "text\tlabel", "good day\tpos", "good, very good\tpos", "bad day\tneg")
    stderr = assert_user_error(run_cli("validate", str(recipe)), f"data.train: cannot read {sentiment_csv} as csv",
                               "line 3", "first line splits cleanly on tabs (columns 'text', 'label')",
                               "read as comma-separated (csv)", 'Set data.format = "tsv"')
    assert "quote" not in stderr  # the old hint, wrong for this file
    fixed = run_cli("validate", str(recipe), "--set", 'data.format="tsv"')
    assert fixed.returncode == 0, fixed.stderr


@pytest.mark.parametrize(("sep", "named"), [(";", "semicolons"), ("|", "pipes")])
def test_other_delimiters_are_named_with_a_way_to_convert(make_recipe, sentiment_csv, tmp_path, sep, named):
    recipe = make_recipe()
    write_rows(sentiment_csv, f"text{sep}label", f"good, very good{sep}pos", f"bad day{sep}neg")
    stderr = assert_user_error(run_cli("validate", str(recipe)), f"first line splits cleanly on {named}",
                               "reads comma-separated (.csv) and tab-separated (.tsv) files",
                               f"pd.read_csv('train.csv', sep='{sep}').to_csv('train-commas.csv', index=False)")
    assert "quote" not in stderr


def test_single_class(make_recipe, sentiment_csv, tmp_path):
    recipe = make_recipe()
    write_csv(sentiment_csv, [r for r in make_sentiment_rows(40) if r["label"] == "pos"])
    result = run_cli("run", str(recipe))
    assert_user_error(result, "data.label_column: only one class ('pos')", str(sentiment_csv),
                      "at least two")
    assert_no_run_folder(tmp_path / "run")


def test_eval_labels_not_seen_in_train(make_recipe, tmp_path):
    eval_csv = write_rows(tmp_path / "data" / "eval.csv", "text,label",
                          "good day,pos", "bad day,neg", "so so,meh", "what,zzz", "again,meh")
    recipe = make_recipe(data=f'eval = "{eval_csv}"')
    result = run_cli("run", str(recipe))
    assert_user_error(result, "data.eval: labels ['meh', 'zzz'] appear in the eval data", str(eval_csv),
                      "training labels: ['neg', 'pos']")
    assert_no_run_folder(tmp_path / "run")


@pytest.mark.parametrize("empty", ["", "   "], ids=["empty", "whitespace"])
def test_empty_text_cell_names_the_line(make_recipe, sentiment_csv, tmp_path, empty):
    recipe = make_recipe()
    rows = make_sentiment_rows(20)
    rows[3]["text"] = empty  # 4th data row -> line 5 (line 1 is the header)
    write_csv(sentiment_csv, rows)
    result = run_cli("run", str(recipe))
    assert_user_error(result, f"data.train: {sentiment_csv}: 1 row(s) have an empty data.text_column ('text')",
                      "line(s) 5", "fill or remove them")
    assert_no_run_folder(tmp_path / "run")


def test_empty_label_cells_name_the_lines(make_recipe, sentiment_csv, tmp_path):
    recipe = make_recipe()
    rows = make_sentiment_rows(20)
    rows[0]["label"] = rows[9]["label"] = ""
    write_csv(sentiment_csv, rows)
    result = run_cli("run", str(recipe))
    assert_user_error(result, "2 row(s) have an empty data.label_column ('label')", "line(s) 2, 11")
    assert_no_run_folder(tmp_path / "run")


def test_row_with_too_many_fields_names_the_line(make_recipe, sentiment_csv, tmp_path):
    recipe = make_recipe()
    write_rows(sentiment_csv, "text,label", "good, very good,pos", "bad day,neg")
    result = run_cli("run", str(recipe))
    assert_user_error(result, f"{sentiment_csv}: line 2 has 3 fields but the header has 2", "quote")
    assert_no_run_folder(tmp_path / "run")


def test_bad_jsonl_line_is_named(make_recipe, tmp_path):
    data = tmp_path / "data" / "train.jsonl"
    data.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n{"text": oops}\n')
    recipe = make_recipe()
    result = run_cli("run", str(recipe), "--set", f"data.train={data}")
    assert_user_error(result, f"data.train: {data}: line 3 is not valid JSON")
    assert_no_run_folder(tmp_path / "run")


def test_unknown_file_extension(make_recipe, tmp_path):
    data = write_rows(tmp_path / "data" / "train.txt", "text,label", "good,pos")
    result = run_cli("run", str(make_recipe()), "--set", f"data.train={data}")
    assert_user_error(result, "cannot tell the file format from the extension '.txt'", "data.format")
    assert_no_run_folder(tmp_path / "run")


def test_data_path_is_a_folder(make_recipe, tmp_path):
    result = run_cli("run", str(make_recipe()), "--set", "data.train=data")
    assert_user_error(result, f"data.train: {tmp_path / 'data'} is a folder")
    assert_no_run_folder(tmp_path / "run")


# ---------------------------------------------------------------------------
# backbones

def test_unresolvable_backbone_fails_fast(make_recipe, tmp_path):
    import tomllib

    import tomli_w

    recipe = make_recipe()
    raw = tomllib.loads(recipe.read_text())
    raw["model"]["backbone"] = "nobody/no-such-model"
    recipe.write_text(tomli_w.dumps(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    started = time.perf_counter()
    result = run_cli("run", str(recipe), env=env)
    elapsed = time.perf_counter() - started
    assert_user_error(result, "model.backbone: 'nobody/no-such-model' is not a local folder",
                      "not in the local Hugging Face cache", "it cannot be downloaded now",
                      "huggingface-cli download nobody/no-such-model", "Online, any Hub model id works")
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert_no_run_folder(tmp_path / "run")


def test_mistyped_backbone_gets_the_closest_offline_name(make_recipe, tmp_path):
    recipe = str(make_recipe())
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    result = run_cli("validate", recipe, "--set", 'model.backbone="all-MiniLM-L6-v3"', env=env)
    assert_user_error(result, "model.backbone: 'all-MiniLM-L6-v3' is not a local folder",
                      "Did you mean 'sentence-transformers/all-MiniLM-L6-v2'?",
                      # every installed plugin's offline names are listed, not only the core's
                      "Offline backbones available here: sentence-transformers/all-MiniLM-L6-v2",
                      "mobilenetv2_100.tv_in1k", "openai/whisper-tiny.en", "HuggingFaceTB/SmolLM2-135M-Instruct")
    # a model in the local Hugging Face cache is a candidate too (a timm name typed with dashes)
    snapshot = tmp_path / "hub-cache" / "models--timm--vit_tiny_patch16_224" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    result = run_cli("validate", recipe, "--set", 'model.backbone="vit-tiny-patch16-22"', env=env)
    assert_user_error(result, "Did you mean 'timm/vit_tiny_patch16_224'?")
    unrelated = run_cli("validate", recipe, "--set", 'model.backbone="acme/nothing-like-it"', env=env)
    assert "did you mean" not in assert_user_error(unrelated, "is not a local folder").lower()
    assert_no_run_folder(tmp_path / "run")


def test_closest_backbone_skips_a_plugin_whose_listing_fails():
    from finetune import hookimpl
    from finetune.engine.backbones import closest_backbone, offline_backbones
    from finetune.engine.plugins import get_registry

    class Broken:
        @staticmethod
        @hookimpl
        def finetune_offline_backbones():
            raise RuntimeError("listing failed")

    class Store:
        @staticmethod
        @hookimpl
        def finetune_offline_backbones():
            return ["acme/sentiment-small", "sentence-transformers/all-MiniLM-L6-v2"]

    registry = get_registry()
    registry.pm.register(Broken(), name="broken")
    registry.pm.register(Store(), name="store")
    names = offline_backbones(registry)
    assert names.count("sentence-transformers/all-MiniLM-L6-v2") == 1 and "acme/sentiment-small" in names
    assert closest_backbone("acme/sentiment-smal", registry) == "acme/sentiment-small"
    assert closest_backbone("sentiment-smll", registry) == "acme/sentiment-small"  # the name's last part
    assert closest_backbone("something-else-entirely", registry) is None


def test_missing_local_backbone_path(make_recipe, tmp_path):
    recipe = make_recipe()
    result = run_cli("run", str(recipe), "--set", "model.backbone=./models/missing")
    assert_user_error(result, f"model.backbone: '{tmp_path / 'models' / 'missing'}' is not an existing folder")
    assert_no_run_folder(tmp_path / "run")

    absolute = tmp_path / "nowhere" / "model"
    result = run_cli("run", str(recipe), "--set", f"model.backbone={absolute}")
    assert_user_error(result, f"model.backbone: '{absolute}' is not an existing folder")
    assert_no_run_folder(tmp_path / "run")


def test_backbone_folder_without_model_files(make_recipe, tmp_path):
    empty_model = tmp_path / "empty-model"
    empty_model.mkdir()
    result = run_cli("run", str(make_recipe()), "--set", f"model.backbone={empty_model}")
    assert_user_error(result, "holds no config.json or *.safetensors", "save_pretrained")
    assert_no_run_folder(tmp_path / "run")


# ---------------------------------------------------------------------------
# the output folder

def fake_run(folder: Path, status: str, recipe_toml: str = "[task]\nname = \"x\"\n") -> Path:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"status": status}))
    (folder / "recipe.toml").write_text(recipe_toml)
    (folder / "metrics.json").write_text("{}")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    return folder


def test_finished_run_is_refused_without_overwrite(make_recipe, tmp_path):
    recipe = make_recipe()
    out = fake_run(tmp_path / "run", "finished")
    before = snapshot(out)
    result = run_cli("run", str(recipe))
    assert_user_error(result, f"output.dir: {out} holds a finished run", "--overwrite", "output.dir")
    assert snapshot(out) == before


def test_overwrite_with_bad_data_keeps_the_finished_run(make_recipe, sentiment_csv, tmp_path):
    recipe = make_recipe()
    out = fake_run(tmp_path / "run", "finished")
    before = snapshot(out)
    sentiment_csv.write_text("text,label\n")
    result = run_cli("run", str(recipe), "--overwrite")
    assert_user_error(result, "has no rows")
    assert snapshot(out) == before


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]], ids=["plain", "overwrite", "resume"])
def test_existing_non_run_folder_is_refused_and_untouched(make_recipe, tmp_path, flags):
    recipe = make_recipe()
    out = tmp_path / "run"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "figures").mkdir()
    (out / "figures" / "plot.png").write_bytes(b"\x89PNG")
    before = snapshot(out)
    result = run_cli("run", str(recipe), *flags)
    assert_user_error(result, f"output.dir: {out} exists and is not a finetune run folder",
                      "choose another output.dir")
    assert snapshot(out) == before


def test_unfinished_run_with_different_recipe_lists_differences(make_recipe, tmp_path):
    recipe_path = make_recipe()
    current = load_recipe(recipe_path)
    old = load_recipe(recipe_path)
    old.train.learning_rate = 0.1
    old.train.epochs = 5
    out = fake_run(tmp_path / "run", "running", old.to_toml())
    before = snapshot(out)
    result = run_cli("run", str(recipe_path))
    expected = [f"train.epochs: 5 -> {current.train.epochs!r}",
                f"train.learning_rate: 0.1 -> {current.train.learning_rate!r}"]
    stderr = assert_user_error(result, f"output.dir: {out} holds an unfinished run with a different recipe",
                               *expected, "--overwrite")
    differing = [line.strip() for line in stderr.splitlines() if " -> " in line]
    assert differing == expected  # only the keys that differ, nothing from defaults or path resolution
    assert snapshot(out) == before


def test_unreadable_run_status_is_refused(make_recipe, tmp_path):
    recipe = make_recipe()
    out = fake_run(tmp_path / "run", "running")
    (out / "run.json").write_text("{not json")
    before = snapshot(out)
    result = run_cli("run", str(recipe))
    assert_user_error(result, "run.json: unreadable run status file", "--overwrite")
    assert snapshot(out) == before


def test_resume_without_a_run_is_an_error(make_recipe, tmp_path):
    recipe = make_recipe()
    result = run_cli("run", str(recipe), "--resume")
    assert_user_error(result, "--resume: there is no run to resume in", str(tmp_path / "run"), "drop --resume")
    assert_no_run_folder(tmp_path / "run")

    (tmp_path / "run").mkdir()  # an empty folder has nothing to resume either, and stays empty
    result = run_cli("run", str(recipe), "--resume")
    assert_user_error(result, "--resume: there is no run to resume")
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize("case", ["file", "not a run", "finished", "nothing to resume", "other recipe",
                                  "other data", "resume and overwrite"])
def test_run_folder_refusals_come_before_the_backbone_loads(make_recipe, sentiment_csv, tmp_path, monkeypatch,
                                                            case):
    from finetune.errors import RunError
    from finetune.run import training
    from finetune.run.data_files import data_fingerprints

    def no_model(session):
        raise AssertionError("the backbone was loaded before the run folder was checked")

    monkeypatch.setattr(training, "build_model", no_model)
    recipe_path = make_recipe()
    recipe = load_recipe(recipe_path)
    out = tmp_path / "run"
    flags = {}
    if case == "file":
        out.write_text("not a folder")
        expected = f"output.dir: {out} is a file"
    elif case == "not a run":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = f"output.dir: {out} exists and is not a finetune run folder"
    elif case == "finished":
        fake_run(out, "finished", recipe.to_toml())
        expected = f"output.dir: {out} holds a finished run; pass --overwrite"
    elif case == "nothing to resume":
        flags = {"resume": True}
        expected = f"--resume: there is no run to resume in {out}"
    elif case == "other recipe":
        recipe.train.learning_rate = 0.5
        fake_run(out, "running", recipe.to_toml())
        expected = f"output.dir: {out} holds an unfinished run with a different recipe"
    elif case == "other data":
        fake_run(out, "interrupted", recipe.to_toml())
        (out / "run.json").write_text(json.dumps({"status": "interrupted",
                                                  "data_files": data_fingerprints(recipe.data)}))
        write_csv(sentiment_csv, make_sentiment_rows(160, seed=1))
        expected = f"output.dir: {out} holds an unfinished run that started on other data"
    else:
        fake_run(out, "running", recipe.to_toml())
        flags = {"resume": True, "overwrite": True}
        expected = "--resume and --overwrite together"
    def state():
        return out.read_text() if out.is_file() else snapshot(out)

    before = state()
    with pytest.raises(RunError) as info:
        training.run_recipe(recipe_path, [], **flags)
    assert str(info.value).startswith(expected), str(info.value)
    assert state() == before
    assert out.exists() == (case != "nothing to resume")


def test_validate_never_writes_a_run_folder(make_recipe, sentiment_csv, tmp_path):
    recipe = make_recipe()
    sentiment_csv.write_text("")
    result = run_cli("validate", str(recipe))
    assert_user_error(result, "is empty")
    result = run_cli("run", str(recipe), "--dry-run")
    assert_user_error(result, "is empty")
    assert_no_run_folder(tmp_path / "run")


# ---------------------------------------------------------------------------
# formerly known gaps, now fixed

def test_output_dir_that_is_a_file(make_recipe, tmp_path):
    recipe = make_recipe()
    (tmp_path / "run").write_text("not a folder")
    result = run_cli("run", str(recipe))
    assert_user_error(result, "output.dir")
    assert (tmp_path / "run").read_text() == "not a folder"


def test_bad_lora_targets_create_no_run_folder(make_recipe, tmp_path):
    result = run_cli("run", str(make_recipe()), "--set", 'peft.target_modules=["nope"]')
    assert_user_error(result, "peft.target_modules: ['nope'] match no module of this model", "query")
    assert_no_run_folder(tmp_path / "run")


def test_misspelled_metric_fails_before_training(make_recipe, tmp_path):
    result = run_cli("run", str(make_recipe()), "--set", "train.metric=acuracy")
    assert result.returncode == 2
    assert "train.metric" in result.stderr and "did you mean 'accuracy'" in result.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------
# each NLP task's own broken data, through the CLI


def task_recipe(tmp_path: Path, tiny_bert: Path, task: str, data: dict) -> Path:
    import tomli_w

    recipe = {"task": {"name": task}, "model": {"backbone": str(tiny_bert)},
              "data": {"split": 0.25, "max_length": 16, **data}, "peft": {"r": 4, "alpha": 8},
              "train": {"epochs": 1, "mixed_precision": "no"}, "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


NER_LINES = ['{"tokens": ["good", "day"], "tags": ["B-PER", "O"]}'] * 8
LABEL_LINES = ['{"text": "good day", "labels": ["pos"]}', '{"text": "bad day", "labels": ["neg"]}'] * 4


@pytest.mark.parametrize("task,train,eval_lines,fragments", [
    ("token-classification", NER_LINES + ['{"tokens": ["a", "good", "day"], "tags": ["O", "B-PER"]}'], None,
     ["train.jsonl, line 9: 3 tokens but 2 tags"]),
    ("token-classification", NER_LINES + ['{"tokens": ["a", "good"], "tags": ["O", "I-PER"]}'], None,
     ["train.jsonl, line 9: invalid IOB2 tag sequence", "I-PER"]),
    ("token-classification", NER_LINES, ['{"tokens": ["bad", "day"], "tags": ["B-LOC", "O"]}'],
     ["data.eval:", "eval.jsonl, line 1: tag 'B-LOC'"]),
    ("multi-label-classification", LABEL_LINES, ['{"text": "so so", "labels": ["meh"]}'],
     ["data.eval: labels ['meh'] appear in", "eval.jsonl", "line(s) 1"]),
    ("multi-label-classification", LABEL_LINES + ['{"text": "", "labels": ["pos"]}'], None,
     ["1 row(s) have an empty data.text_column", "line(s) 9"]),
], ids=["ner-misaligned", "ner-invalid-iob2", "ner-unknown-eval-tag", "multilabel-unknown-eval-label",
        "multilabel-empty-text"])
def test_task_data_errors_name_the_file_and_line(tmp_path, tiny_bert, task, train, eval_lines, fragments):
    (tmp_path / "data").mkdir()
    data = {"train": str(write_rows(tmp_path / "data" / "train.jsonl", *train))}
    if eval_lines:
        data["eval"] = str(write_rows(tmp_path / "data" / "eval.jsonl", *eval_lines))
    result = run_cli("run", str(task_recipe(tmp_path, tiny_bert, task, data)))
    assert_user_error(result, *fragments)
    assert_no_run_folder(tmp_path / "run")


# ---------------------------------------------------------------------------
# question-answering data

@pytest.mark.parametrize(("record", "fragments"), [
    ({"context": "a good day", "question": "which is good", "answers": {"text": ["good"], "answer_start": [4]}},
     ["line 2: answer 'good' does not start at answer_start 4: the context there reads 'od d'",
      "answer_start counts characters from 0", "the text occurs at character 2; set answer_start to the one meant"]),
    ({"context": "", "question": "which is good", "answers": {"text": [], "answer_start": []}},
     ["line 2: the context ('context') is empty", "Fill it in or remove the question"]),
    ({"context": "a good day", "answers": {"text": ["good"], "answer_start": [2]}},
     ["line 2: no 'question' field (data.question_column)", "Rename the field or set data.question_column"]),
], ids=["answer-start-mismatch", "empty-context", "missing-question"])
def test_question_answering_bad_rows_name_file_and_line(tiny_bert, tmp_path, record, fragments):
    good = {"context": "the day was nice", "question": "which is good", "answers": {"text": ["nice"],
                                                                                 "answer_start": [12]}}
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (good, record, good)) + "\n")
    recipe = tmp_path / "qa.toml"
    recipe.write_text(f'[task]\nname = "question-answering"\n[model]\nbackbone = "{tiny_bert}"\n'
                      f'[data]\ntrain = "{data}"\nmax_length = 24\ndoc_stride = 4\n'
                      f'[output]\ndir = "{tmp_path / "run"}"\n')
    for command in ("validate", "run"):
        assert_user_error(run_cli(command, str(recipe)), f"data.train: {data}, ", *fragments)
        assert_no_run_folder(tmp_path / "run")
