"""``reward-model``: the Bradley-Terry loss, where the score is read, a tiny run end to end (metrics before and
after, predict, the GRPO scorer, plain peft loading) and a bad pair refused before anything runs."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random

import pytest
import torch
from generation_fixtures import write_jsonl

from finetune.engine.console import Console
from finetune.errors import RecipeError
from finetune.run.inference import load_run
from finetune.run.session import build_model, open_session
from finetune.run.training import run_recipe
from finetune_generation.reward_model import (
    bradley_terry_loss,
    encode_scored,
    last_token_index,
    load_reward_scorer,
    sequence_scores,
)


def cli_in_process(*args: str):
    from click.testing import CliRunner

    from finetune.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def pref_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """A trivially learnable preference: the chosen answer starts with "quick", the rejected with "the"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"add {a} and {b}", "chosen": f"quick {a}+{b}={a + b}",
                     "rejected": f"the {a}+{b}={a + b}"})
    return rows


def rm_recipe(folder, backbone, data, *, epochs: int = 1, extra_data: dict | None = None,
              extra_task: dict | None = None):
    import tomli_w

    recipe = folder / "recipe.toml"
    recipe.write_text(tomli_w.dumps({
        "task": {"name": "reward-model", **(extra_task or {})},
        "model": {"backbone": str(backbone)},
        "data": {"train": str(data), "split": 0.25, "max_length": 48, **(extra_data or {})},
        "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": epochs, "batch_size": 8, "learning_rate": 2e-2, "mixed_precision": "no",
                  "checkpoint_every_steps": 0, "seed": 0, "warmup_ratio": 0.0},
        "output": {"dir": str(folder / "run")}}))
    return recipe


# ---------------------------------------------------------------------------
# the loss and the score

def test_bradley_terry_loss_equals_the_hand_computed_value():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])  # differences 1 and -1
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2  # 0.31326 and 1.31326
    assert float(bradley_terry_loss(chosen, rejected)) == pytest.approx(expected, abs=1e-6)
    margin = torch.tensor([0.5, 0.0])  # differences 0.5 and -1
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.0))) / 2
    assert float(bradley_terry_loss(chosen, rejected, margin)) == pytest.approx(expected, abs=1e-6)


def test_last_token_index_from_the_mask_for_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


@pytest.fixture(scope="module")
def session(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("rm-session")
    recipe = rm_recipe(folder, tiny_llama, write_jsonl(folder / "pairs.jsonl", pref_rows(16)))
    s = open_session(recipe)
    model, tok, _ = build_model(s)
    return s, model, tok


def test_the_scored_text_is_prompt_answer_and_end_token(session):
    s, _, tok = session
    example = s.splits.train[0]
    ids, truncated, labels = encode_scored(s.task.encoder or s.task._encoder(tok), example.prompt, example.chosen, 48)
    assert not truncated and ids[-1] == tok.eos_token_id  # ends with the answer's <|im_end|>, no trailing "\n"
    prompt = tok.apply_chat_template([{"role": "user", "content": example.prompt.prompt}], tokenize=False,
                                     add_generation_prompt=True)
    assert tok.decode(ids) == prompt + example.chosen + "<|im_end|>"
    assert [t for t in labels if t != -100] == tok(example.chosen, add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]


def test_the_score_is_read_at_the_last_real_token_of_a_padded_batch(session):
    s, model, tok = session
    task = s.task
    items = task.build_dataset(s.splits.train, tok, training=True)[:4]
    batch = task.collate_fn(tok)(items)
    assert batch["index"].shape[0] == 4 and batch["input_ids"].shape[0] == 8  # B pairs, 2B rows
    assert len({len(x["chosen_input_ids"]) for x in items} | {len(x["rejected_input_ids"]) for x in items}) > 1
    model.eval()
    with torch.no_grad():
        together = sequence_scores(model, batch)
        rows = [x["chosen_input_ids"] for x in items] + [x["rejected_input_ids"] for x in items]
        alone = torch.cat([sequence_scores(model, {"input_ids": torch.tensor([r]),
                                                   "attention_mask": torch.ones(1, len(r), dtype=torch.long)})
                           for r in rows])
        # the model's own pooling, one unpadded row and no pad token: the last token, as here
        model.config.pad_token_id = None
        try:
            own = torch.cat([model(input_ids=torch.tensor([r])).logits[:, 0] for r in rows])
        finally:
            model.config.pad_token_id = tok.pad_token_id
        # ... whereas with pad = EOS (the fixture's tokenizer has no pad token) it skips the final EOS
        skipped = model(input_ids=torch.tensor([rows[0]])).logits[0, 0]
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(own, alone, atol=1e-5)
    assert tok.pad_token_id == tok.eos_token_id and not torch.isclose(skipped, alone[0], atol=1e-5)


def test_the_shared_prefix_path_gives_the_same_scores_and_gradients(tmp_path, tiny_llama):
    from finetune_generation.causal_lm import shared_prefix_length

    recipe = rm_recipe(tmp_path, tiny_llama, write_jsonl(tmp_path / "pairs.jsonl", pref_rows(16)),
                       extra_task={"system_prompt": "the quick answer " * 8})  # a long start every row shares
    s = open_session(recipe)
    model, tok, _ = build_model(s)
    task = s.task
    items = task.build_dataset(s.splits.train, tok, training=True)[:4]
    batch = task.collate_fn(tok)(items)
    model.train()
    assert shared_prefix_length(model, batch) > 0  # the rows' common start is computed once
    plain = {k: v for k, v in batch.items() if k != "labels"}  # no labels: the plain padded path
    shared = sequence_scores(model, batch)
    shared.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = sequence_scores(model, plain)
    alone.sum().backward()
    assert torch.allclose(shared, alone, atol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, atol=1e-5), name


# ---------------------------------------------------------------------------
# a run end to end

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("rm-run")
    test = write_jsonl(folder / "test.jsonl", pref_rows(8, seed=3))
    recipe = rm_recipe(folder, tiny_llama, write_jsonl(folder / "pairs.jsonl", pref_rows(48)), epochs=3,
                       extra_data={"test": str(test)})
    return recipe, run_recipe(recipe, [], console=Console(quiet=True))


def test_run_reports_accuracy_and_margin_before_and_after(trained):
    _, run = trained
    metrics = json.loads(run.metrics_file.read_text())
    before, best = metrics["before"], metrics["best"]
    for m in (before, best):
        assert {"accuracy", "margin", "chosen_score", "rejected_score", "eval_loss"} <= set(m)
        assert m["margin"] == pytest.approx(m["chosen_score"] - m["rejected_score"], abs=1e-5)
    assert before["step"] == 0 and best["accuracy"] == 1.0 and best["margin"] > before["margin"] + 1
    assert best["eval_loss"] < before["eval_loss"]
    assert metrics["test"]["accuracy"] == 1.0 and metrics["data"]["test_examples"] == 8  # data.test, once
    card = run.card_file.read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card


def test_predict_cli_gives_pred_score(trained, tmp_path):
    _, run = trained
    data = write_jsonl(tmp_path / "score.jsonl", [
        {"prompt": "add 2 and 3", "completion": "quick 2+3=5"},
        {"prompt": [{"role": "user", "content": "add 2 and 3"}], "completion": "the 2+3=5"}])
    result = cli_in_process("predict", str(run.path), "--input", str(data))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [set(r) for r in rows] == [{"prompt", "completion", "pred_score"}] * 2
    assert rows[0]["pred_score"] > rows[1]["pred_score"]


def test_evaluate_cli_scores_a_pairs_file(trained, tmp_path):
    _, run = trained
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pref_rows(6, seed=11))
    result = cli_in_process("evaluate", str(run.path), "--input", str(pairs))
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "margin" in result.output


def test_load_reward_scorer_prefers_the_chosen_answers(trained):
    _, run = trained
    scorer = load_reward_scorer(str(run.path), batch_size=3)
    held_out = pref_rows(8, seed=7)
    completions = [r["chosen"] for r in held_out] + [r["rejected"] for r in held_out]
    examples = [{"prompt": r["prompt"], "reference": None} for r in held_out] * 2
    scores = scorer(completions, examples)
    assert len(scores) == 16 and all(isinstance(s, float) for s in scores)
    assert all(c > r for c, r in zip(scores[:8], scores[8:]))
    # the same numbers one at a time, and as finetune's checked reward function
    from finetune import RewardFunction

    assert scorer(completions[:1], examples[:1])[0] == pytest.approx(scores[0], abs=1e-5)
    assert RewardFunction("rm", scorer)(completions, examples) == pytest.approx(scores, abs=1e-6)


def test_usage_snippet_loads_the_adapter_and_score_head_with_plain_peft(trained, tiny_llama):
    _, run = trained
    task, model, tok, _ = load_run(run.path)
    snippet = task.usage_snippet(str(tiny_llama))
    cwd = os.getcwd()
    out = io.StringIO()
    try:
        os.chdir(run.path)  # the snippet names the adapter folder 'adapter'
        with contextlib.redirect_stdout(out):
            exec(compile(snippet, "usage_snippet", "exec"), {})
    finally:
        os.chdir(cwd)
    expected = task.score(model, tok, ["your prompt"], ["an answer to score"])[0]
    assert float(out.getvalue().strip()) == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------------------
# bad input

def test_identical_chosen_and_rejected_exits_2_naming_the_line(tmp_path, tiny_llama):
    rows = pref_rows(6)
    rows[3]["rejected"] = rows[3]["chosen"]
    recipe = rm_recipe(tmp_path, tiny_llama, write_jsonl(tmp_path / "pairs.jsonl", rows))
    result = cli_in_process("run", str(recipe))
    assert result.exit_code == 2
    assert "pairs.jsonl: line 4" in result.output and "identical" in result.output
    assert not (tmp_path / "run").exists()



def test_margin_column_shifts_the_loss_and_a_bad_margin_names_the_line(tmp_path, tiny_llama):
    from finetune.errors import DataError

    rows = [{**r, "margin": 2.0} for r in pref_rows(8)]
    recipe = rm_recipe(tmp_path, tiny_llama, write_jsonl(tmp_path / "pairs.jsonl", rows),
                       extra_data={"margin_column": "margin"})
    s = open_session(recipe)
    model, tok, _ = build_model(s)
    batch = s.task.collate_fn(tok)(s.task.build_dataset(s.splits.train, tok, training=True))
    assert batch["margin"].tolist() == [2.0] * batch["index"].shape[0]
    chosen, rejected = sequence_scores(model, batch).chunk(2)
    assert float(s.task.training_loss(model, batch).detach()) == pytest.approx(
        float(bradley_terry_loss(chosen, rejected, 2.0)), abs=1e-5)
    rows[5]["margin"] = "a lot"
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"data.margin_column: .*pairs.jsonl: line 6: field 'margin' is 'a lot'"):
        open_session(recipe)


def test_a_reward_model_starts_from_an_sft_runs_adapter(tmp_path, tiny_llama):
    """model.start_from: the reward model's transformer starts from a causal-lm run's LoRA (the usual recipe:
    the reward model begins where supervised fine-tuning ended); the score head starts fresh."""
    import tomli_w
    from generation_fixtures import make_qa_rows
    from safetensors.torch import load_file

    sft = tmp_path / "sft.toml"
    sft.write_text(tomli_w.dumps({
        "task": {"name": "causal-lm", "sample_prompts": 0},
        "model": {"backbone": str(tiny_llama)},
        "data": {"train": str(write_jsonl(tmp_path / "qa.jsonl", make_qa_rows(16))), "split": 0.25,
                 "max_length": 48},
        "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "mixed_precision": "no", "seed": 0,
                  "checkpoint_every_steps": 0},
        "output": {"dir": str(tmp_path / "sft-run")}}))
    run_recipe(sft, [], console=Console(quiet=True))
    recipe = rm_recipe(tmp_path, tiny_llama, write_jsonl(tmp_path / "pairs.jsonl", pref_rows(8)))
    s = open_session(recipe, [f"model.start_from={tmp_path / 'sft-run'}"])
    model, _, report = build_model(s)
    assert report.started_from == str(tmp_path / "sft-run" / "adapter")
    saved = load_file(str(tmp_path / "sft-run" / "adapter" / "adapter_model.safetensors"))
    mine = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert len(saved) == len(mine) > 0 and all(torch.equal(mine[n], t) for n, t in saved.items())
    fresh, _, _ = build_model(open_session(recipe))  # the same seed without start_from: the same new head
    head = "base_model.model.score.modules_to_save.default.weight"
    assert torch.equal(dict(model.named_parameters())[head], dict(fresh.named_parameters())[head])


def test_a_reward_model_run_serves_as_a_grpo_reward(trained, tmp_path, make_gen_recipe):
    """task.reward_model: the trained reward model scores GRPO's completions under the name `reward-model`."""
    _, run = trained
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                                     for r in pref_rows(12, seed=5)])
    task = ('name = "grpo"\ngroup_size = 2\nmax_new_tokens = 4\n'
            f'reward_model = "{run.path}"\nrewards = {{ reward-model = 1.0, exact-number = 0.5 }}\n')
    recipe = make_gen_recipe(task=task, data=f'train = "{data}"', output=str(tmp_path / "grpo"),
                             train="epochs = 1\nbatch_size = 4\nlog_every_steps = 1")
    done = run_recipe(recipe, [], console=Console(quiet=True))
    metrics = json.loads(done.metrics_file.read_text())
    assert {"reward", "reward_reward-model", "reward_exact-number"} <= set(metrics["before"])
    logged = [r for r in done.read_metrics_log() if r["kind"] == "train"]
    assert all("reward_reward-model" in r for r in logged)
    # the eval answers' reward-model scores are the scorer's on the same texts
    from finetune_generation.reward_model import load_reward_scorer

    rows = [json.loads(line) for line in (done.path / "samples" / "step-00000000.jsonl").read_text().splitlines()]
    scores = load_reward_scorer(str(run.path))([r["completion"] for r in rows],
                                               [{"prompt": r["prompt"]} for r in rows])
    assert [r["rewards"]["reward-model"] for r in rows] == pytest.approx(scores, abs=1e-4)


@pytest.mark.parametrize(("task", "message"), [
    ('rewards = { reward-model = 1.0 }', "set task.reward_model to a finished reward-model run folder"),
    ('reward_model = "RUN"\nrewards = { exact-number = 1.0 }', "gives 'reward-model' no weight"),
    ('reward_model = "RUN/nowhere"\nrewards = { reward-model = 1.0 }', "is not a folder"),
])
def test_reward_model_settings_that_do_not_fit_are_clear_errors(trained, tmp_path, make_gen_recipe, task, message):
    from finetune.run.session import open_session

    _, run = trained
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                                     for r in pref_rows(8, seed=5)])
    recipe = make_gen_recipe(task='name = "grpo"\n' + task.replace("RUN", str(run.path)), data=f'train = "{data}"')
    with pytest.raises(RecipeError, match=message):
        open_session(recipe)
