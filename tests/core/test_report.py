"""report.html and `finetune report`: two real tiny runs (labels that are HTML), the page's content read as
HTML, rebuilt and compared through the CLI, and opened in a real headless Chromium (no request leaves
file:, no console error, key elements present, a screenshot)."""

from __future__ import annotations

import json
import os
import shutil
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import make_sentiment_rows, run_cli, write_csv

from finetune.contract.task import DataSplits, Task
from finetune.engine.console import Console
from finetune.engine.guard import GuardedTask
from finetune.errors import PluginError, RunError
from finetune.run.report import nice_ticks, read_run, recipe_differences, render_report, write_report
from finetune.run.report_data import collect_report_data, length_stats
from finetune.run.training import run_recipe

SCRIPT_LABEL = "<script>window.pwned=1</script>"
AMP_LABEL = 'neg & "bad"'
#: Elements a one-run page must have (ids), and a comparison page.
RUN_IDS = ("metrics-table", "curve-loss", "curve-metrics", "per-class-table", "confusion-matrix", "samples-table",
           "data-table", "label-counts", "speed-facts", "recipe-toml", "provenance")
COMPARE_IDS = ("compare-table", "recipe-diff-table", "compare-curve")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert):
    """Two finished tiny text-classification runs whose labels are HTML, differing in two recipe keys."""
    import tomli_w

    tmp = tmp_path_factory.mktemp("report")
    rows = make_sentiment_rows(64)
    for row in rows:
        row["label"] = SCRIPT_LABEL if row["label"] == "pos" else AMP_LABEL
    data = write_csv(tmp / "data" / "train.csv", rows)
    folders = []
    for name, lr, r in (("a", 1e-2, 4), ("b", 3e-2, 8)):
        recipe = tmp / f"{name}.toml"
        recipe.write_text(tomli_w.dumps({
            "task": {"name": "text-classification"}, "model": {"backbone": str(tiny_bert)},
            "data": {"train": str(data), "split": 0.25, "max_length": 16}, "peft": {"r": r, "alpha": 8},
            "train": {"epochs": 2, "batch_size": 16, "learning_rate": lr, "mixed_precision": "no", "seed": 0,
                      "log_every_steps": 1},
            "output": {"dir": str(tmp / "runs" / name)}}))
        folders.append(run_recipe(recipe, [], console=Console(enabled=False)).path)
    return folders


class _Page(HTMLParser):
    """Ids, tags and attributes of a page, and the text of each table row by the row's class."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if attributes.get("id"):
            self.ids.add(attributes["id"])


def test_every_finished_run_has_a_report_and_its_data(runs):
    run = runs[0]
    assert (run / "report.html").stat().st_size > 5000
    data = json.loads((run / "report_data.json").read_text())
    assert data["data"]["rows"] == {"train": 48, "eval": 16}
    assert data["data"]["label_counts"]["eval"] == {SCRIPT_LABEL: 8, AMP_LABEL: 8}
    assert data["data"]["lengths"]["train"]["max"] <= 16  # tokens, after truncation to data.max_length
    samples = data["samples"]
    assert 0 < len(samples) <= 16 and all(isinstance(s["correct"], bool) for s in samples)
    assert all(s["correct"] == (s["prediction"] == s["reference"]) for s in samples)
    assert {s["reference"] for s in samples} <= {SCRIPT_LABEL, AMP_LABEL}
    assert data["memory"]["peak_rss_mib"] > 50
    assert data["task_plugin"]["plugin"] == "nlp" and data["provenance"]["command"]
    # the confusion matrix the report draws: every eval row once
    matrix = json.loads((run / "metrics.json").read_text())["best_details"]["confusion_matrix"]
    assert sum(map(sum, matrix)) == 16


def test_report_shows_every_section_and_escapes_what_the_run_holds(runs):
    text = (runs[0] / "report.html").read_text()
    page = _Page(text)
    assert set(RUN_IDS) <= page.ids
    # the labels are shown as text, never as markup: no script element, the escaped form present
    assert SCRIPT_LABEL not in text and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in text
    assert "neg &amp; &quot;bad&quot;" in text
    assert not [tag for tag, _ in page.tags if tag in ("script", "link", "iframe", "object", "embed")]
    # nothing to fetch: only the SVG namespace names a URL, and no attribute points anywhere but data:
    urls = {value for _, attrs in page.tags for key, value in attrs.items()
            if key in ("src", "href") and value}
    assert all(u.startswith(("data:", "#")) for u in urls), urls
    assert text.replace('xmlns="http://www.w3.org/2000/svg"', "").count("http:") == 0
    assert "https:" not in text
    # wrong samples are the highlighted rows, one per wrong sample
    data = json.loads((runs[0] / "report_data.json").read_text())
    wrong = [attrs for tag, attrs in page.tags if tag == "tr" and attrs.get("data-correct") == "false"]
    assert len(wrong) == sum(not s["correct"] for s in data["samples"]) and all("wrong" in a["class"] for a in wrong)
    # the recipe as the run folder holds it
    assert "learning_rate = 0.01" in text and "[peft]" in text


def test_finetune_report_rebuilds_a_run_and_compares_runs(runs, tmp_path):
    a, b = runs
    (a / "report.html").unlink()
    result = run_cli("report", str(a))
    assert result.returncode == 0, result.stderr
    assert (a / "report.html").is_file() and set(RUN_IDS) <= _Page((a / "report.html").read_text()).ids
    out = tmp_path / "compare.html"
    result = run_cli("report", str(a), str(b), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    text = out.read_text()
    assert set(COMPARE_IDS) <= _Page(text).ids
    differ = recipe_differences([read_run(a), read_run(b)])
    assert set(differ) == {"train.learning_rate", "peft.r"}  # output.dir aside
    assert "<code>train.learning_rate</code>" in text and "<code>peft.r</code>" in text
    assert SCRIPT_LABEL not in text


def test_report_errors_name_the_folder_and_the_fix(runs, tmp_path):
    result = run_cli("report", str(runs[0].parent / "c"))
    assert result.returncode != 0 and "no such run folder" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "recipe.toml").write_text("[task]\n")
    result = run_cli("report", str(tmp_path))
    assert result.returncode != 0 and "not a run folder (it has no run.json)" in result.stderr
    result = run_cli("report", str(runs[0]), "-o", str(tmp_path / "missing" / "r.html"))
    assert result.returncode != 0 and "-o: the folder" in result.stderr and "does not exist" in result.stderr
    result = run_cli("report")
    assert result.returncode == 2 and "RUN" in result.stderr


def test_report_of_an_unfinished_or_old_run_says_what_is_missing(runs, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(runs[0], copy)
    for name in ("metrics.json", "report_data.json", "report.html"):
        (copy / name).unlink()
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    text = write_report(copy).read_text()
    page = _Page(text)
    assert {"metrics-table", "curve-loss", "recipe-toml", "provenance"} <= page.ids  # from metrics.jsonl
    assert "This run is interrupted" in text
    assert "No sample predictions: report_data.json is missing" in text
    assert "No speed figures: metrics.json" in text
    assert "per-class-table" not in page.ids and "reports no per-class metrics" in text


def test_a_resumed_run_writes_its_report_at_its_end(runs, tmp_path):
    copy = tmp_path / "resumed"
    shutil.copytree(runs[0], copy)
    recipe = copy / "recipe.toml"
    recipe.write_text(recipe.read_text().replace(str(runs[0]), str(copy)))
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**info, "status": "interrupted"}))
    for name in ("metrics.json", "report_data.json", "report.html"):
        (copy / name).unlink()
    run_recipe(recipe, [], resume=True, console=Console(enabled=False))
    assert set(RUN_IDS) <= _Page((copy / "report.html").read_text()).ids
    assert json.loads((copy / "report_data.json").read_text())["samples"]


class _Tiny(Task):
    name = "tiny-report"

    def example_lengths(self, dataset):
        return [len(x) for x in dataset]

    def data_summary(self, splits):
        return {"label_counts": {"train": {"x": 2}}, "facts": {"mean letters": 2.5}}

    def report_samples(self, model, processor, examples, run_path, limit):
        raise ValueError("boom")


class _Module:
    def eval(self):
        return self


def test_a_failing_task_method_leaves_the_section_empty_with_the_reason(tmp_path):
    task = GuardedTask(_Tiny(recipe=None), "plugin 'tiny' (tiny-dist)")
    splits = DataSplits(train=["ab", "abc"], eval=["a"], info={"train_examples": 2})
    data = collect_report_data(task=task, splits=splits, datasets={"train": ["ab", "abc"], "eval": ["a"]},
                               run_path=tmp_path, predict_with=(_Module(), None))
    assert data["data"]["lengths"]["train"] == {"min": 2.0, "mean": 2.5, "median": 2.5, "max": 3.0}
    assert data["data"]["facts"] == {"mean letters": 2.5} and data["samples"] == []
    assert "plugin 'tiny' (tiny-dist) raised in _Tiny.report_samples: ValueError: boom" in data["errors"]["samples"]
    # a return value against the contract is named the same way
    task.task.report_samples = types.MethodType(lambda self, *a: [{"input": "x"}], task.task)
    with pytest.raises(PluginError, match="without 'prediction'"):
        task.report_samples(None, None, [], tmp_path, 3)
    task.task.data_summary = types.MethodType(lambda self, splits: {"classes": {}}, task.task)
    with pytest.raises(PluginError, match="'label_counts' and 'facts'"):
        task.data_summary(splits)


def test_small_helpers():
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 3, 6, whole=True) == [0, 1, 2, 3]
    assert length_stats(None) is None and length_stats([4, 2]) == {"min": 2.0, "mean": 3.0, "median": 3.0, "max": 4.0}
    with pytest.raises(RunError, match="no such run folder"):
        render_report(read_run("/nonexistent/run"))


def _browser_or_skip():
    """Skips with the reason outside CI; under CI=true (where `make test` installs both) a missing browser
    fails, since a skipped browser test proves nothing."""
    skip = pytest.fail if os.environ.get("CI") == "true" else pytest.skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip("the playwright package is not installed (it is in the dev extra: pip install -e '.[dev]')")
    if not CHROMIUM.is_file():
        skip(f"no Chromium at {CHROMIUM} (`make test` installs it with apt-get where apt-get is usable)")
    return sync_playwright


def _open(browser, page_file: Path, shot: Path) -> tuple[object, list[str], list[str]]:
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    requests, problems = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(page_file.resolve().as_uri(), wait_until="load")
    page.screenshot(path=str(shot), full_page=True)
    return page, requests, problems


def test_report_in_headless_chromium(runs, tmp_path):
    sync_playwright = _browser_or_skip()
    a, b = runs
    compare = tmp_path / "compare.html"
    assert run_cli("report", str(a), str(b), "-o", str(compare)).returncode == 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page, requests, problems = _open(browser, a / "report.html", tmp_path / "run.png")
            assert requests == [(a / "report.html").resolve().as_uri()]  # nothing else loaded, nothing remote
            assert problems == []
            for ident in RUN_IDS:
                assert page.locator(f"#{ident}").is_visible(), ident
            assert page.evaluate("window.pwned") is None  # the label <script> did not run
            assert SCRIPT_LABEL in page.locator("#per-class-table").inner_text()  # it is shown as text
            assert page.locator("#curve-loss polyline").count() == 2  # train loss, eval loss
            assert page.locator("#curve-metrics polygon[data-best]").count() == 1  # the best checkpoint's star
            data = json.loads((a / "report_data.json").read_text())
            assert page.locator("#samples-table tbody tr").count() == len(data["samples"])
            box = page.locator("#metrics-table").bounding_box()
            assert box["width"] > 200 and box["height"] > 50  # laid out, not collapsed

            page, requests, problems = _open(browser, compare, tmp_path / "compare.png")
            assert requests == [compare.resolve().as_uri()] and problems == []
            for ident in COMPARE_IDS:
                assert page.locator(f"#{ident}").is_visible(), ident
            assert page.locator("#recipe-diff-table tbody tr").count() == 2
            assert page.locator("#compare-curve polyline").count() == 2  # one curve per run
        finally:
            browser.close()
    for shot in ("run.png", "compare.png"):
        png = (tmp_path / shot).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
