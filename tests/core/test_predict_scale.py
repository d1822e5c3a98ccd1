"""`finetune predict` at scale: length-sorted batches in the input's order, the adapter merged, bf16 only where
it agrees with fp32, streaming input and output with bounded memory, a progress line only on a terminal."""

from __future__ import annotations

import csv
import io
import json
import random
import tracemalloc

import pytest
import torch
from conftest import make_sentiment_rows, run_cli, write_csv

from finetune.engine.console import Console
from finetune.errors import DataError
from finetune.run import inference
from finetune.run.inference import (
    Agreement,
    choose_precision,
    compare_predictions,
    inference_precision,
    load_run,
    merge_for_inference,
)
from finetune.run.predictions import (
    PredictionWriter,
    Progress,
    iter_record_chunks,
    predict_records,
    read_records,
    stream_predictions,
    write_predictions,
)
from finetune.run.training import run_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_bert):
    """One small trained run shared by the module (1 epoch on 64 rows)."""
    import tomli_w

    folder = tmp_path_factory.mktemp("predict-scale")
    data = write_csv(folder / "train.csv", make_sentiment_rows(64))
    recipe = {"task": {"name": "text-classification", "baseline": False}, "model": {"backbone": str(tiny_bert)},
              "data": {"train": str(data), "split": 0.25, "max_length": 16}, "peft": {"r": 4, "alpha": 8},
              "train": {"epochs": 1, "batch_size": 16, "learning_rate": 5e-2, "mixed_precision": "no", "seed": 0,
                        "checkpoint_every_steps": 0, "eval_before_training": False},
              "output": {"dir": str(folder / "run")}}
    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return run_recipe(path, [], console=Console(quiet=True))


@pytest.fixture(scope="module")
def loaded(run):
    task, model, processor, _ = load_run(run.path)
    return task, model, processor


def mixed_records(n: int, seed: int = 1) -> list[dict[str, str]]:
    """Texts of 1 to 12 words in random order (so length sorting really reorders them)."""
    rng = random.Random(seed)
    words = ["good", "bad", "day", "food", "the", "awful", "great", "movie", "so", "very"]
    return [{"id": str(i), "text": " ".join(rng.choices(words, k=rng.randint(1, 12)))} for i in range(n)]


def test_length_sorted_batches_come_back_in_the_input_order(loaded):
    task, model, processor = loaded
    records = mixed_records(40)
    widths = []
    hook = model.get_base_model().bert.register_forward_pre_hook(
        lambda _m, args, kwargs: widths.append(kwargs["input_ids"].shape[1] if "input_ids" in kwargs
                                               else args[0].shape[1]), with_kwargs=True)
    try:
        rows = predict_records(task, model, processor, records, batch_size=8)
    finally:
        hook.remove()
    assert [r["id"] for r in rows] == [r["id"] for r in records]  # the input's order, not the sorted one
    assert widths == sorted(widths) and widths[0] < widths[-1]  # batched shortest first: little padding
    alone = [predict_records(task, model, processor, [r], batch_size=1)[0] for r in records]
    for got, want in zip(rows, alone):  # each row is its own text's prediction (no padding effect either)
        assert got["text"] == want["text"] and got["pred_label"] == want["pred_label"]
        assert got["prob_pos"] == pytest.approx(want["prob_pos"], abs=1e-5)


def test_the_merged_adapter_predicts_what_the_unmerged_one_does(run):
    task, model, processor, _ = load_run(run.path)
    records = mixed_records(24)
    before = predict_records(task, model, processor, records, batch_size=8)
    assert merge_for_inference(model) == "adapter merged into the weights"
    lora = [m for m in model.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert lora and all(m.merged for m in lora)  # folded in: the forward skips the LoRA matmuls
    after = predict_records(task, model, processor, records, batch_size=8)
    assert [r["pred_label"] for r in after] == [r["pred_label"] for r in before]
    diff = max(abs(a[k] - b[k]) for a, b in zip(after, before) for k in ("prob_neg", "prob_pos"))
    assert diff < 1e-5
    model.unmerge_adapter()  # and the merge really changed weights: unmerged, the same again
    assert predict_records(task, model, processor, records[:3], batch_size=8)[0]["prob_pos"] == \
        pytest.approx(before[0]["prob_pos"], abs=1e-5)


def test_bf16_is_chosen_only_when_it_agrees_with_fp32():
    good = Agreement(rows=256, label_agreement=1.0, max_prob_difference=0.01)
    assert choose_precision(good)[0] == "bf16"
    for bad in (Agreement(256, 0.98, 0.01), Agreement(256, 1.0, 0.2)):
        precision, reason = choose_precision(bad)
        assert precision == "fp32" and "fell back to fp32" in reason and "label agreement >= 0.99" in reason
    assert choose_precision(None, "no eval data") == ("fp32", "fp32 (no eval data)")
    rounded = Agreement(256, 1.0, 0.12)  # int8: the same labels, probabilities bounded more loosely than bf16's
    assert choose_precision(rounded)[0] == "fp32" and choose_precision(rounded, low="int8")[0] == "int8"
    precision, reason = choose_precision(Agreement(256, 0.98, 0.01), low="int8")
    assert precision == "fp32" and reason.startswith("fp32: int8 was checked") and "<= 0.2)" in reason
    # the comparison itself: identical rows agree fully; a flipped label and a moved probability count
    ref = [{"text": "a", "pred_label": "pos", "pred_score": 0.9, "prob_pos": 0.9, "prob_neg": 0.1},
           {"text": "b", "pred_label": "neg", "pred_score": 0.6, "prob_pos": 0.4, "prob_neg": 0.6}]
    assert compare_predictions(ref, ref) == Agreement(2, 1.0, 0.0)
    moved = [ref[0], {**ref[1], "pred_label": "pos", "pred_score": 0.55, "prob_pos": 0.55, "prob_neg": 0.45}]
    agreement = compare_predictions(ref, moved)
    assert agreement.label_agreement == 0.5 and agreement.max_prob_difference == pytest.approx(0.15)
    values = [{"pred_value": 0.0}, {"pred_value": 10.0}]  # a regression's value: relative to fp32's range
    assert compare_predictions(values, [{"pred_value": 0.5}, {"pred_value": 10.0}]).max_prob_difference == 0.05


def test_auto_precision_follows_the_check_on_the_eval_rows_and_keeps_its_result(run, monkeypatch):
    task, model, processor, run_dir = load_run(run.path)
    monkeypatch.setattr(inference, "cpu_has_amx", lambda: False)
    assert inference_precision(task, model, processor, run_dir, "auto")[1].startswith("fp32 (this CPU has no AMX")
    monkeypatch.setattr(inference, "cpu_has_amx", lambda: True)
    seen = []

    def fake(reference, other):  # the real rows reach the comparison: fp32 then bf16 predictions of the eval rows
        seen.append((len(reference), {r["text"] for r in reference} == {r["text"] for r in other}))
        return Agreement(len(reference), 0.9, 0.3)

    monkeypatch.setattr(inference, "compare_predictions", fake)
    (run_dir.path / inference.CHECK_FILE).unlink(missing_ok=True)
    chosen, reason = inference_precision(task, model, processor, run_dir, "auto")
    assert chosen is model and next(model.parameters()).dtype == torch.float32
    assert reason.startswith("fp32: bf16 was checked") and seen == [(16, True)]  # the 16 eval rows
    monkeypatch.setattr(inference, "compare_predictions", lambda *_: pytest.fail("the kept result is reused"))
    assert inference_precision(task, model, processor, run_dir, "auto")[1] == reason
    saved = json.loads((run_dir.path / inference.CHECK_FILE).read_text())
    saved["bf16"]["agreement"] = {"rows": 16, "label_agreement": 1.0, "max_prob_difference": 0.004}
    (run_dir.path / inference.CHECK_FILE).write_text(json.dumps(saved))
    chosen, reason = inference_precision(task, model, processor, run_dir, "auto")
    assert next(chosen.parameters()).dtype == torch.bfloat16 and reason.startswith("bf16 (agrees with fp32")
    rows = predict_records(task, chosen, processor, mixed_records(5), batch_size=4)  # and it predicts
    assert all(r["pred_label"] in ("neg", "pos") for r in rows)
    (run_dir.path / inference.CHECK_FILE).unlink()



def quantized_linears(model) -> int:
    return sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def test_int8_quantizes_the_linear_layers_where_it_agrees_with_fp32_and_keeps_the_check(run, monkeypatch):
    task, model, processor, run_dir = load_run(run.path)
    merge_for_inference(model)
    records = mixed_records(24)
    want = predict_records(task, model, processor, records, batch_size=8)
    (run_dir.path / inference.CHECK_FILE).unlink(missing_ok=True)
    seen = []
    real = inference.compare_predictions
    monkeypatch.setattr(inference, "compare_predictions", lambda a, b: seen.append(len(a)) or real(a, b))
    chosen, reason = inference_precision(task, model, processor, run_dir, "int8")
    saved = json.loads((run_dir.path / inference.CHECK_FILE).read_text())
    assert seen == [16] and set(saved) == {"int8"} and saved["int8"]["agreement"]["rows"] == 16
    # the real check on the 16 eval rows decided (here: int8, probabilities within 0.02; the tiny model's
    # scores sit near 0.5, so another CPU's rounding could flip a label, and then fp32 would be right too)
    assert reason == choose_precision(Agreement(**saved["int8"]["agreement"]), low="int8")[1]
    # a kept passing result: the next call quantizes without checking again
    saved["int8"]["agreement"] = {"rows": 16, "label_agreement": 1.0, "max_prob_difference": 0.01}
    (run_dir.path / inference.CHECK_FILE).write_text(json.dumps(saved))
    monkeypatch.setattr(inference, "compare_predictions", lambda *_: pytest.fail("the kept result is reused"))
    task, model, processor, run_dir = load_run(run.path)
    merge_for_inference(model)
    chosen, reason = inference_precision(task, model, processor, run_dir, "int8")
    assert reason.startswith("int8 (agrees with fp32 on 16 eval rows: label agreement 1.0000")
    kept = {n for n, m in chosen.named_modules() if type(m) is torch.nn.Linear}
    assert quantized_linears(chosen) >= 12 and kept and all("modules_to_save" in n or "original_module" in n
                                                            for n in kept), kept  # the head stays fp32
    got = predict_records(task, chosen, processor, records, batch_size=8)
    assert [r["id"] for r in got] == [r["id"] for r in records]
    assert all(a["pred_label"] == b["pred_label"] for a, b in zip(got, want) if b["pred_score"] > 0.6)
    diffs = [abs(a["prob_pos"] - b["prob_pos"]) for a, b in zip(got, want)]
    assert 0 < max(diffs) <= inference.MAX_INT8_PROB_DIFFERENCE  # rounded, not equal; and close
    # a failed check falls back to fp32, and is kept apart from bf16's
    saved["int8"]["agreement"] = {"rows": 16, "label_agreement": 0.9, "max_prob_difference": 0.2}
    (run_dir.path / inference.CHECK_FILE).write_text(json.dumps(saved))
    task, model, processor, run_dir = load_run(run.path)
    chosen, reason = inference_precision(task, model, processor, run_dir, "int8")
    assert chosen is model and quantized_linears(model) == 0
    assert reason.startswith("fp32: int8 was checked and does not agree") and "fell back to fp32" in reason

    def cannot(*_args, **_kwargs):
        raise RuntimeError("no int8 kernels here")

    monkeypatch.setattr(inference, "quantize_int8", cannot)  # a torch that cannot quantize: fp32, and why
    assert inference_precision(task, model, processor, run_dir, "int8") == \
        (model, "fp32 (int8 is not available here: RuntimeError: no int8 kernels here)")
    monkeypatch.setattr(inference, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(inference, "compare_predictions", lambda ref, _: Agreement(len(ref), 1.0, 0.001))
    assert inference_precision(task, model, processor, run_dir, "auto")[1].startswith("bf16 (agrees")
    assert set(json.loads((run_dir.path / inference.CHECK_FILE).read_text())) == {"int8", "bf16"}
    (run_dir.path / inference.CHECK_FILE).unlink()

def read_back(path, fmt: str) -> list[dict]:
    if fmt in ("csv", "tsv"):
        return list(csv.DictReader(path.open(newline=""), delimiter="," if fmt == "csv" else "\t"))
    if fmt == "json":
        return json.loads(path.read_text())
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json"])
def test_streamed_output_equals_the_output_written_at_once(loaded, tmp_path, fmt):
    task, model, processor = loaded
    records = [{**r, "tags": ["x", "y"] if int(r["id"]) % 3 else []} for r in mixed_records(23)]
    rows = predict_records(task, model, processor, records, batch_size=4)
    whole = tmp_path / f"whole.{fmt}"
    write_predictions(rows, whole)
    streamed = tmp_path / f"streamed.{fmt}"
    with PredictionWriter(streamed) as writer:  # the same rows, written 5 at a time: the same bytes
        for start in range(0, len(rows), 5):
            writer.write(rows[start:start + 5])
    assert streamed.read_bytes() == whole.read_bytes()
    # end to end: chunks predicted and written as they come (batches differ, so floats may differ in the last bits)
    predicted = tmp_path / f"predicted.{fmt}"
    chunks = (records[i:i + 5] for i in range(0, len(records), 5))
    with PredictionWriter(predicted) as writer:
        assert stream_predictions(task, model, processor, chunks, writer, batch_size=4) == 23
    got, want = read_back(predicted, fmt), read_back(whole, fmt)
    assert [r["id"] for r in got] == [r["id"] for r in want] and list(got[0]) == list(want[0])
    assert [r["pred_label"] for r in got] == [r["pred_label"] for r in want]
    assert max(abs(float(a["prob_pos"]) - float(b["prob_pos"])) for a, b in zip(got, want)) < 1e-5
    empty = tmp_path / f"empty.{fmt}"
    with PredictionWriter(empty):
        pass
    write_predictions([], tmp_path / f"empty-once.{fmt}")
    assert empty.read_bytes() == (tmp_path / f"empty-once.{fmt}").read_bytes()


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_chunked_input_reads_the_same_records_as_the_whole_file(loaded, tmp_path, suffix):
    task = loaded[0]
    records = [{"id": i, "text": r["text"], "note": "" if i % 4 else "a, \"quoted\"\nline"}
               for i, r in enumerate(mixed_records(30))]
    path = tmp_path / f"in.{suffix}"
    if suffix == "csv":
        write_csv(path, records)
    else:
        path.write_text("".join(json.dumps(r) + "\n" + ("\n" if r["id"] == 3 else "") for r in records))
    chunks = list(iter_record_chunks(task, path, chunk_rows=7))
    assert [len(c) for c in chunks] == [7, 7, 7, 7, 2]
    flat = [r for c in chunks for r in c]
    whole = read_records(task, path)
    assert json.dumps(flat, default=str) == json.dumps(whole, default=str)


def test_streaming_writes_each_chunk_before_reading_the_next(loaded, tmp_path):
    task, model, processor = loaded
    out = tmp_path / "out.jsonl"
    lines_seen = []

    def chunks():
        for start in range(0, 30, 10):
            lines_seen.append(len(out.read_text().splitlines()) if out.exists() else None)
            yield mixed_records(30)[start:start + 10]

    with PredictionWriter(out) as writer:
        stream_predictions(task, model, processor, chunks(), writer, batch_size=4)
    assert lines_seen == [0, 10, 20]  # the rows of each chunk were in the file before the next was read


def test_a_file_much_larger_than_the_memory_budget_streams_in_bounded_memory(loaded, tmp_path):
    """A file whose records alone take several times the budget is predicted within it (Python allocations,
    tracemalloc: the records, their tokens, the rows written)."""
    task, model, processor = loaded
    path = tmp_path / "big.csv"
    rng = random.Random(0)
    words = ["good", "bad", "day", "food", "the", "so"]
    with open(path, "w", newline="") as fh:
        fh.write("id,text\n")
        fh.writelines(f"{i}," + " ".join(rng.choices(words, k=rng.randint(1, 4))) + "\n" for i in range(20_000))
    budget = 3 * 2**19  # 1.5 MiB
    tracemalloc.start()
    try:
        whole = read_records(task, path)  # what holding the input at once would cost, without any prediction
        held = tracemalloc.get_traced_memory()[0]
        del whole
        tracemalloc.reset_peak()
        out = tmp_path / "big.jsonl"
        with PredictionWriter(out) as writer:
            total = stream_predictions(task, model, processor, iter_record_chunks(task, path, chunk_rows=256),
                                       writer, batch_size=256)
        peak = tracemalloc.get_traced_memory()[1] - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held > 3 * budget, f"the input held at once: {held / 2**20:.1f} MiB"
    assert peak < budget, f"peak while streaming {peak / 2**20:.1f} MiB"
    assert total == 20_000
    lines = out.read_text().splitlines()
    count, last = len(lines), lines[-1]
    assert count == 20_000 and json.loads(last)["id"] == 19_999 and "pred_label" in json.loads(last)


def test_input_errors_name_the_line_or_record(loaded, tmp_path):
    task = loaded[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid JSON"):
        list(iter_record_chunks(task, bad))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "good"}\n{"body": "bad"}\n')
    with pytest.raises(DataError, match=r"missing.jsonl, record 2: has no 'text' field \(it has 'body'\)"):
        list(iter_record_chunks(task, missing))
    header_only = write_csv(tmp_path / "h.csv", [{"text": "x"}])
    header_only.write_text("text\n")
    with pytest.raises(DataError, match="has no rows"):
        list(iter_record_chunks(task, header_only))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_line_shows_on_a_terminal_only(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr("time.perf_counter", lambda: float(next(clock)))
    shown = Terminal()
    progress = Progress(shown)
    progress.update(500)
    progress.update(700)
    progress.close()
    assert "\rpredicted 500 rows" in shown.getvalue() and "predicted 1,200 rows" in shown.getvalue()
    assert "rows/s" in shown.getvalue() and shown.getvalue().endswith("\n")
    silent = io.StringIO()  # a file or pipe: nothing at all
    quiet = Progress(silent)
    quiet.update(500)
    quiet.close()
    assert silent.getvalue() == ""


def test_predict_cli_streams_a_file_and_says_how_it_predicts(run, loaded, tmp_path):
    task, model, processor = loaded  # unmerged, fp32: the reference
    records = mixed_records(12)
    inp = write_csv(tmp_path / "in.csv", records)
    out = tmp_path / "out.csv"
    result = run_cli("predict", str(run.path), "--input", str(inp), "--output", str(out), "--batch-size", "5")
    assert result.returncode == 0, result.stderr
    assert "predicting: adapter merged into the weights; " in result.stderr  # then bf16 or fp32, and why
    assert "torch threads: " in result.stderr  # chosen from the machine's state (or OMP_*), as for training
    assert "rows/s" not in result.stderr and "\r" not in result.stderr  # stderr is a pipe here: no progress line
    assert "wrote 12 predictions" in result.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    want = predict_records(task, model, processor, records, batch_size=5)
    assert [r["pred_label"] for r in rows] == [r["pred_label"] for r in want]
    tolerance = 1e-5 if "weights; fp32" in result.stderr else inference.MAX_PROB_DIFFERENCE  # bf16 on an AMX CPU
    assert max(abs(float(a["prob_pos"]) - b["prob_pos"]) for a, b in zip(rows, want)) <= tolerance


def test_no_merge_and_explicit_precision_options(run, loaded, tmp_path):
    from click.testing import CliRunner

    from finetune.cli import cli

    task, model, processor = loaded
    records = mixed_records(6)
    inp = write_csv(tmp_path / "in.csv", records)
    want = predict_records(task, model, processor, records, batch_size=4)
    cases = ((["--no-merge", "--precision", "fp32"], ("adapter kept apart (--no-merge); fp32",), 1e-5),
             (["--precision", "bf16"], ("merged into the weights; bf16 (--precision bf16: not checked",), 0.05),
             # the real check on the eval rows decides; fp32, said with the check's numbers, where it disagrees
             (["--precision", "int8"], ("merged into the weights; int8 (agrees with fp32 on 16 eval rows",
                                        "merged into the weights; fp32: int8 was checked"),
              inference.MAX_INT8_PROB_DIFFERENCE))
    for options, notes, tolerance in cases:
        out = tmp_path / "out.jsonl"
        result = CliRunner().invoke(cli, ["predict", str(run.path), "--input", str(inp), "--output", str(out),
                                          *options], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert any(note in result.output for note in notes), result.output
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [str(r["id"]) for r in rows] == [r["id"] for r in records]
        assert max(abs(a["prob_pos"] - b["prob_pos"]) for a, b in zip(rows, want)) <= tolerance
