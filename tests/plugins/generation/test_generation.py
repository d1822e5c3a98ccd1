"""causal-lm on tiny fixture models: exact loss masks with EOS, shapes, truncation, packing, length grouping,
training with before/after samples, prediction and merging."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from generation_fixtures import CHATML, make_qa_rows, to_messages, write_jsonl

from finetune.engine.console import Console
from finetune.run.inference import load_run
from finetune.run.session import build_model, open_session
from finetune.run.training import run_recipe

IGNORE = -100


def cli_in_process(*args: str):
    """The real CLI in this process (no interpreter start-up: the heavy imports are already done)."""
    from click.testing import CliRunner

    from finetune.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def session_and_tokenizer(recipe):
    session = open_session(recipe)
    model, tokenizer, _ = build_model(session)
    return session, model, tokenizer


def learned(item):
    return [t for t, label in zip(item["input_ids"], item["labels"]) if label != IGNORE]


# ---------------------------------------------------------------------------
# loss masks

@pytest.mark.parametrize("shape", ["prompt_completion", "messages"])
def test_chat_template_mask_covers_exactly_the_answer_and_its_eos(make_gen_recipe, tmp_path, shape):
    rows = make_qa_rows(12)
    data = write_jsonl(tmp_path / f"{shape}.jsonl", rows if shape == "prompt_completion" else to_messages(rows))
    session, _, tok = session_and_tokenizer(make_gen_recipe(data=f'train = "{data}"'))
    assert tok.pad_token is not None and tok.pad_token_id == tok.eos_token_id  # fixture has no pad: EOS reused
    task = session.task
    ds = task.build_dataset(session.splits.train, tok, training=True)
    for example, item in zip(session.splits.train, ds.items):
        completion = example.completion if shape == "prompt_completion" else example.messages[-1]["content"]
        answer_ids = tok(completion, add_special_tokens=False)["input_ids"]
        assert learned(item) == answer_ids + [tok.eos_token_id]  # the answer, then <|im_end|>, nothing else
        prompt = tok.apply_chat_template([{"role": "user", "content": example.prompt or
                                           example.messages[0]["content"]}], tokenize=False,
                                         add_generation_prompt=True)
        assert tok.decode(item["input_ids"]).startswith(prompt)
        first = item["labels"].index(answer_ids[0])
        assert item["input_ids"][:first] == tok(prompt, add_special_tokens=False)["input_ids"]
        assert all(label == IGNORE for label in item["labels"][:first])
        assert item["labels"][first + len(answer_ids)] == tok.eos_token_id
        assert item["labels"][first + len(answer_ids) + 1:] == [IGNORE] * (len(item["labels"]) - first -
                                                                           len(answer_ids) - 1)  # trailing "\n"


def test_eos_stays_learned_when_pad_is_eos_and_padding_is_masked(make_gen_recipe):
    session, _, tok = session_and_tokenizer(make_gen_recipe())
    task = session.task
    ds = task.build_dataset(session.splits.train, tok, training=True)
    items = [ds[i] for i in range(4)]
    items[0] = {"input_ids": items[0]["input_ids"][:-5], "labels": items[0]["labels"][:-5]}  # force padding
    batch = task.collate_fn(tok)(items)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["labels"][row, :n].tolist() == item["labels"]
        assert (batch["labels"][row, n:] == IGNORE).all() and (batch["attention_mask"][row, n:] == 0).all()
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
    assert (batch["labels"] == tok.eos_token_id).sum() >= 3  # the EOS of the unpadded rows is a target


def test_multi_turn_learns_every_assistant_turn(make_gen_recipe, tmp_path):
    conv = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 1 and 2"},
                         {"role": "assistant", "content": "1+2=3"}, {"role": "user", "content": "add 2 and 2"},
                         {"role": "assistant", "content": "2+2=4"}]}
    data = write_jsonl(tmp_path / "multi.jsonl", [conv] * 8)
    session, _, tok = session_and_tokenizer(make_gen_recipe(data=f'train = "{data}"'))
    item = session.task.build_dataset(session.splits.train, tok, training=True)[0]
    ids = tok("1+2=3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + \
        tok("2+2=4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert learned(item) == ids
    full = tok.apply_chat_template(conv["messages"], tokenize=False)
    assert tok.decode(item["input_ids"]) == full


def test_train_on_all_learns_every_token(make_gen_recipe):
    session, _, tok = session_and_tokenizer(make_gen_recipe(task='train_on = "all"'))
    for item in session.task.build_dataset(session.splits.train, tok, training=True).items:
        assert item["labels"] == item["input_ids"]


def test_plain_prompt_completion_without_template_appends_eos(make_gen_recipe, tiny_gpt2):
    session, _, tok = session_and_tokenizer(make_gen_recipe(backbone=tiny_gpt2))
    assert tok.chat_template is None
    for example, item in zip(session.splits.train, session.task.build_dataset(session.splits.train, tok, True).items):
        prompt = tok(example.prompt)["input_ids"]
        answer = tok(example.completion, add_special_tokens=False)["input_ids"]
        assert item["input_ids"] == prompt + answer + [tok.eos_token_id]
        assert item["labels"] == [IGNORE] * len(prompt) + answer + [tok.eos_token_id]


def test_alpaca_and_text_shapes(make_gen_recipe, tiny_gpt2, tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "add the numbers", "input": f"{i} and 2", "output": f"{i}+2={i + 2}"} for i in range(8)])
    session, _, tok = session_and_tokenizer(make_gen_recipe(backbone=tiny_gpt2,
                                                          data=f'train = "{alpaca}"\nmax_length = 250'))
    assert session.splits.info["shape"] == "alpaca"
    example = session.splits.train[0]
    item = session.task.build_dataset([example], tok, True)[0]
    text = tok.decode(item["input_ids"])
    assert "### Instruction:\nadd the numbers\n\n### Input:\n" in text and text.endswith("<|endoftext|>")
    assert tok.decode(learned(item)) == example.completion + "<|endoftext|>"

    plain = write_jsonl(tmp_path / "text.jsonl", [{"text": f"the quick answer {i}"} for i in range(8)])
    session, _, tok = session_and_tokenizer(make_gen_recipe(data=f'train = "{plain}"'))
    assert session.splits.info["shape"] == "text"
    item = session.task.build_dataset(session.splits.train, tok, True)[0]
    assert item["labels"] == item["input_ids"] and item["input_ids"][-1] == tok.eos_token_id


def test_custom_column_names_and_chat_template_from_recipe(make_gen_recipe, tiny_gpt2, tmp_path):
    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in make_qa_rows(8)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    recipe = make_gen_recipe(backbone=tiny_gpt2, task=f'chat_template_file = "{template}"',
                             data=f'train = "{data}"\nprompt_column = "question"\ncompletion_column = "answer"')
    session, _, tok = session_and_tokenizer(recipe)
    item = session.task.build_dataset(session.splits.train, tok, True)[0]
    assert tok.decode(item["input_ids"]).startswith("<|im_start|>user\n")
    assert learned(item)[-1] == tok.eos_token_id


def test_truncation_is_reported_and_examples_without_answer_are_left_out(make_gen_recipe, tmp_path, capsys):
    rows = make_qa_rows(8)
    rows[0]["completion"] = "1+1=2 " * 30  # long answer: cut, keeps its beginning
    rows[1]["prompt"] = "add " * 80  # the prompt alone exceeds max_length: nothing to learn, left out
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    recipe = make_gen_recipe(data=f'train = "{data}"\neval = "{data}"\nmax_length = 40')
    session, _, tok = session_and_tokenizer(recipe)
    ds = session.task.build_dataset(session.splits.train, tok, True)
    assert len(ds) == 7 and max(ds.lengths()) == 40
    assert session.splits.info["train_truncated"] == 2 and session.splits.info["train_dropped"] == 1
    err = capsys.readouterr().err
    assert "2 of 8 train examples are longer than data.max_length = 40" in err and "line 2" in err


# ---------------------------------------------------------------------------
# packing and length grouping

def test_packing_keeps_examples_apart_and_gives_the_same_loss(make_gen_recipe):
    session, model, tok = session_and_tokenizer(make_gen_recipe(data="packing = true\nmax_length = 64"))
    task = session.task
    examples = session.splits.train[:6]
    plain = task.build_dataset(examples, tok, training=False)
    packed = task.build_dataset(examples, tok, training=True)
    assert len(packed) < len(plain)  # several examples per row
    assert sum(len(r["input_ids"]) for r in packed.items) == sum(plain.lengths())
    collate = task.collate_fn(tok)
    model.eval()
    with torch.no_grad():
        padded_batch = collate(plain.items)
        packed_batch = collate(packed.items)
        assert "attention_mask" not in packed_batch and "position_ids" in packed_batch
        loss_plain = task.evaluation_step(model, padded_batch)["loss"]
        loss_packed = task.evaluation_step(model, packed_batch)["loss"]
        assert torch.allclose(loss_plain, loss_packed, atol=1e-5)
        # logits of the last example of a packed row equal its logits alone
        row = packed.items[0]
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        last = row["input_ids"][starts[-1]:]
        alone = model(input_ids=torch.tensor([last]), use_cache=False).logits
        inside = model(input_ids=torch.tensor([row["input_ids"]]), position_ids=torch.tensor([row["position_ids"]]),
                       use_cache=False).logits[:, starts[-1]:]
        assert torch.allclose(alone, inside, atol=1e-4)


def _llama_like(tiny_llama, folder, model_type):
    """The tiny Llama's tokenizer with a tiny Mistral / Qwen2 / Qwen3 of the same shape."""
    import shutil

    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny_llama).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "tie_word_embeddings")
    cfg = transformers.AutoConfig.for_model(model_type, **{k: config[k] for k in keep})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


PLAIN_HEAD_TESTED = ["llama", "gpt2", "mistral", "qwen2", "qwen3"]


def test_every_model_type_on_the_answer_only_path_is_tested():
    from finetune_generation.causal_lm import _PLAIN_HEAD_TYPES

    assert _PLAIN_HEAD_TYPES == set(PLAIN_HEAD_TESTED)


@pytest.mark.parametrize("model_name", PLAIN_HEAD_TESTED)
@pytest.mark.parametrize("packing", [False, True])
def test_answer_only_logits_give_the_standard_loss_and_gradients(make_gen_recipe, tiny_llama, tiny_gpt2, tmp_path,
                                                                 model_name, packing):
    """The vocabulary projection runs on the learned positions only; loss and LoRA gradients are those of
    ``model(**batch).loss``, for padded and packed batches, for every model type on the fast path."""
    from finetune_generation.causal_lm import _PLAIN_HEAD_TYPES, _plain_head, answer_loss

    backbone = {"llama": None, "gpt2": tiny_gpt2}.get(model_name) or _llama_like(tiny_llama, tmp_path / model_name,
                                                                                    model_name)
    assert model_name in _PLAIN_HEAD_TYPES
    session, model, tok = session_and_tokenizer(make_gen_recipe(
        backbone=backbone, data=f"packing = {'true' if packing else 'false'}\nmax_length = 64"))
    assert _plain_head(model) is not None  # the fast path is taken for these models
    batch = session.task.collate_fn(tok)(session.task.build_dataset(session.splits.train[:6], tok, True).items)
    model.train()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # non-zero LoRA B, so the adapter's gradients are all non-trivial
    grads = []
    for fn in (lambda: model(**batch, use_cache=False).loss, lambda: answer_loss(model, batch)):
        model.eval()  # no dropout: both passes see the same network
        loss = fn()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grad_a.keys() == grad_b.keys() and grad_a
    for name in grad_a:
        assert torch.allclose(grad_a[name], grad_b[name], atol=1e-6), name


SYSTEM = "You are a careful assistant. Answer in one short line, with the unit, and nothing else."


def _loss_and_grads(model, fn):
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("model_name", PLAIN_HEAD_TESTED)
def test_shared_prefix_is_computed_once_with_the_standard_loss_and_gradients(make_gen_recipe, tiny_llama, tiny_gpt2,
                                                                             tmp_path, model_name):
    """Rows that start with the same system prompt: the prefix is computed once per batch, and loss and LoRA
    gradients are those of ``model(**batch).loss`` for every model type on the fast path."""
    from finetune_generation.causal_lm import _plain_head, answer_loss, shared_prefix_length

    backbone = {"llama": None, "gpt2": tiny_gpt2}.get(model_name) or _llama_like(tiny_llama, tmp_path / model_name,
                                                                                    model_name)
    session, model, tok = session_and_tokenizer(make_gen_recipe(
        backbone=backbone, task=f"system_prompt = {SYSTEM!r}", data="max_length = 96"))
    items = session.task.build_dataset(session.splits.train[:6], tok, True).items
    if not tok.chat_template:  # plain prompt/completion (the tiny GPT-2): the system prompt goes in front by hand
        system = tok(SYSTEM + "\n")["input_ids"]
        items = [{"input_ids": system + x["input_ids"], "labels": [IGNORE] * len(system) + x["labels"]} for x in items]
    batch = session.task.collate_fn(tok)(items)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    # the recipe's LoRA dropout is 0, so sharing is exact in training too; the tiny GPT-2 has dropout in its
    # config, so it is compared in evaluation mode (no dropout)
    model.train(not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()))
    prefix = shared_prefix_length(model, batch)
    ids = batch["input_ids"]
    assert prefix >= len(tok(SYSTEM)["input_ids"])  # at least the system prompt
    assert (ids[:, :prefix] == ids[:1, :prefix]).all() and (batch["labels"][:, :prefix + 1] == IGNORE).all()
    # the longest such prefix: the next token differs between rows or the one after it is learned
    assert (ids[:, prefix] != ids[0, prefix]).any() or (batch["labels"][:, prefix + 1] != IGNORE).any()
    standard = _loss_and_grads(model, lambda: model(**batch, use_cache=False).loss)
    shared = _loss_and_grads(model, lambda: answer_loss(model, batch))
    assert torch.allclose(standard[0], shared[0], atol=1e-6)
    assert standard[1].keys() == shared[1].keys() and shared[1]
    for name in standard[1]:
        assert torch.allclose(standard[1][name], shared[1][name], atol=1e-6), name
    assert _plain_head(model) is not None


def test_shared_prefix_only_without_active_dropout_padding_rows_or_a_gain(make_gen_recipe):
    from finetune_generation.causal_lm import shared_prefix_length

    recipe = make_gen_recipe(task=f"system_prompt = {SYSTEM!r}", data="max_length = 96")
    session, model, tok = session_and_tokenizer(recipe)
    collate = session.task.collate_fn(tok)
    batch = collate(session.task.build_dataset(session.splits.train[:6], tok, True).items)
    model.train()
    assert shared_prefix_length(model, batch) > 0
    attention = next(m for m in model.modules() if hasattr(m, "attention_dropout"))
    attention.attention_dropout = 0.1  # a random mask per row: the rows' prefixes are no longer one computation
    assert shared_prefix_length(model, batch) == 0
    model.eval()  # evaluation has no dropout: shared again
    assert shared_prefix_length(model, batch) > 0
    lora_dropout = open_session(recipe, ["peft.dropout=0.1"])
    lora_model, _, _ = build_model(lora_dropout)
    lora_model.train()
    assert shared_prefix_length(lora_model, batch) == 0
    lora_model.eval()
    assert shared_prefix_length(lora_model, batch) > 0
    config = model.get_base_model().config
    config.sliding_window = batch["input_ids"].shape[1] - 1  # a window the custom mask would not apply
    assert shared_prefix_length(model, batch) == 0
    config.sliding_window = None
    one = {k: v[:1] for k, v in batch.items()}
    assert shared_prefix_length(model, one) == 0  # a single row: nothing to share
    different = {k: v.clone() for k, v in batch.items()}
    different["input_ids"][1, 0] += 1  # rows differ from the first token
    assert shared_prefix_length(model, different) == 0
    # a 1-token shared prefix before long rows: the dense attention over the joined rows would cost more
    # than the shared token saves
    long_rows = {"input_ids": torch.randint(3, 50, (8, 60)), "attention_mask": torch.ones(8, 60, dtype=torch.long),
                 "labels": torch.full((8, 60), IGNORE)}
    long_rows["input_ids"][:, 0] = 1
    long_rows["labels"][:, 30:] = long_rows["input_ids"][:, 30:]
    assert shared_prefix_length(model, long_rows) == 0


def test_length_grouped_batches_are_exact_deterministic_and_save_padding(make_gen_recipe):
    from finetune import epoch_batches, length_grouped_batches

    lengths = [(i * 37) % 101 + 1 for i in range(203)]
    a = length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert a == length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert a != length_grouped_batches(lengths, 8, seed=1, epoch=1)
    assert len(a) == 26 and sorted(i for b in a for i in b) == list(range(203))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(a) < 0.3 * padding(epoch_batches(203, 8, 1, 0))


def test_group_by_length_run_trains(make_gen_recipe):
    run = run_recipe(make_gen_recipe(train="epochs = 1\ngroup_by_length = true"), [],
                     console=Console(quiet=True))
    assert any("group_by_length" in note for note in run.info()["speed_settings"])
    assert json.loads(run.metrics_file.read_text())["train"]["steps"] == 6


def test_packing_refused_for_models_that_ignore_position_resets(make_gen_recipe):
    """transformers 5 isolates packed examples for Llama and GPT-2; a model that ignores position ids
    (simulated: its forward drops them) would let examples attend to each other, and is refused."""
    from finetune.errors import RecipeError

    session = open_session(make_gen_recipe(data="packing = true"))
    model, tok, _ = build_model(session)
    base = session.task._model
    original = base.forward
    base.forward = lambda *args, position_ids=None, **kwargs: original(*args, **kwargs)
    with pytest.raises(RecipeError, match="data.packing: this model .* does not keep packed examples apart"):
        session.task.build_dataset(session.splits.train, tok, training=True)
    base.forward = original
    assert len(session.task.build_dataset(session.splits.train, tok, training=True)) < len(session.splits.train)


# ---------------------------------------------------------------------------
# a run end to end, prediction, merge

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """A tiny Llama trained hard on the QA format, with samples at every eval (module scope: reused)."""
    import tomli_w

    folder = tmp_path_factory.mktemp("gen-run")
    data = write_jsonl(folder / "train.jsonl", to_messages(make_qa_rows(96)))
    test = write_jsonl(folder / "test.jsonl", to_messages(make_qa_rows(12, seed=5)))
    recipe = folder / "recipe.toml"
    recipe.write_text(tomli_w.dumps({
        "task": {"name": "causal-lm", "sample_prompts": 3, "sample_max_new_tokens": 8, "max_new_tokens": 8},
        "model": {"backbone": str(tiny_llama)},
        "data": {"train": str(data), "test": str(test), "split": 0.25, "max_length": 48},
        "peft": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "train": {"epochs": 4, "batch_size": 8, "learning_rate": 3e-2, "mixed_precision": "no",
                  "checkpoint_every_steps": 0, "seed": 0, "warmup_ratio": 0.0},
        "output": {"dir": str(folder / "run")}}))
    return recipe, run_recipe(recipe, [], console=Console(quiet=True))


def test_run_reports_before_after_loss_perplexity_and_samples(trained):
    _, run = trained
    metrics = json.loads(run.metrics_file.read_text())
    best, before = metrics["best"], metrics["before"]  # before: the core's evaluation at step 0
    assert best["perplexity"] == pytest.approx(2.718281828 ** best["eval_loss"], rel=1e-6)
    assert before["step"] == 0 and before["eval_loss"] > best["eval_loss"] + 0.1
    assert before["perplexity"] == pytest.approx(2.718281828 ** before["eval_loss"], rel=1e-6)
    assert metrics["baseline"] == {}  # no task-specific baseline: "before" is the untouched model
    test = metrics["test"]  # the test file, scored once with the selected adapter
    assert metrics["data"]["test_examples"] == 12 and test["step"] == best["step"]
    assert test["perplexity"] == pytest.approx(2.718281828 ** test["eval_loss"], rel=1e-6)
    assert test["eval_loss"] < before["eval_loss"]
    assert metrics["data"]["shape"] == "messages" and metrics["data"]["train_truncated"] == 0
    samples = sorted(p.name for p in (run.path / "samples").iterdir())
    evals = [r["step"] for r in run.read_metrics_log() if r["kind"] == "eval"]
    assert evals[0] == 0 and samples == ["before_after.md", *[f"step-{s:08d}.jsonl" for s in evals]]
    rows = [json.loads(x) for x in (run.path / "samples" / f"step-{evals[-1]:08d}.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) >= {"prompt", "reference", "generation", "exact", "finish_reason"}
    assert "before:" in (run.path / "samples" / "before_after.md").read_text()
    card = run.card_file.read_text()
    assert "pipeline_tag: text-generation" in card and "perplexity" in card
    # the run report shows the best checkpoint's sample answers beside the untouched model's
    report = json.loads((run.path / "report_data.json").read_text())["samples"]
    best_rows = [json.loads(x) for x in (run.path / "samples" / f"step-{best['step']:08d}.jsonl").read_text()
                 .splitlines()]
    assert [s["prediction"] for s in report] == [r["generation"] for r in best_rows]
    assert all("before" in s and isinstance(s["correct"], bool) for s in report)
    assert 'id="samples-table"' in (run.path / "report.html").read_text()


def test_reloaded_adapter_reproduces_eval_loss_and_predicts(trained):
    recipe, run = trained
    task, model, tok, _ = load_run(run.path)
    session = open_session(recipe)
    eval_ds = task.build_dataset(session.splits.eval, tok, training=False)
    batch = task.collate_fn(tok)(eval_ds.items)
    with torch.no_grad():
        loss = float(task.evaluation_step(model, batch)["loss"])
    best = json.loads(run.metrics_file.read_text())["best"]["eval_loss"]
    assert loss == pytest.approx(best, rel=0.05)  # one batch (token mean) vs the loop's per-batch mean
    with torch.no_grad():
        rows = task.predict(model, tok, [{"prompt": "add 3 and 4"}, {"prompt": "add 9 and 9"}])
    assert [set(r) == {"prompt", "pred_text", "pred_finish_reason", "pred_new_tokens"} for r in rows] == [True, True]
    assert all(r["pred_new_tokens"] <= 8 for r in rows)


def test_predict_streams_to_stderr(trained, capsys):
    _, run = trained
    task, model, tok, _ = load_run(run.path)
    with torch.no_grad():
        rows = task.predict(model, tok, [{"prompt": "add 3 and 4"}], stream=True)
    err = capsys.readouterr().err
    assert ">>> add 3 and 4" in err and rows[0]["pred_text"].strip() in err


def test_predict_cli_prompt_and_prompts_file(trained, tmp_path):
    _, run = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("add 1 and 1\n\nadd 2 and 5\n")
    result = run_cli("predict", str(run.path), "--input", str(prompts), "--set", "task.max_new_tokens=4",
                     "--prompt", "add 3 and 3")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["add 3 and 3"]  # --prompt wins over --input
    assert rows[0]["pred_new_tokens"] <= 4
    result = cli_in_process("predict", str(run.path), "--input", str(prompts), "--set", "task.temperature=0.8",
                            "--set", "task.seed=1")
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["prompt"] for line in result.stdout.splitlines()] == ["add 1 and 1", "add 2 and 5"]


def test_merge_writes_a_plain_transformers_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    _, run = trained
    out = tmp_path / "merged"
    result = cli_in_process("merge", str(run.path), str(out))
    assert result.exit_code == 0, result.stderr
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    _, peft_model, tok, _ = load_run(run.path)
    ids = torch.tensor([tok("add 1 and 2")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-4)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    result = cli_in_process("merge", str(run.path), str(out))
    assert result.exit_code == 2 and "already exists" in result.stderr


def test_merge_refuses_a_quantized_base_without_the_flag(tmp_path, tiny_llama, make_gen_recipe):
    import shutil

    base = tmp_path / "q-base"
    shutil.copytree(tiny_llama, base)
    (base / "finetune_provenance.json").write_text(json.dumps(
        {"quantized_from": "Q4_1 GGUF (4-bit)", "source": "test: converted from 4-bit Q4_1 GGUF"}))
    run = run_recipe(make_gen_recipe(backbone=base, train="epochs = 1", task="sample_prompts = 0"),
                     [], console=Console(quiet=True))
    result = cli_in_process("merge", str(run.path), str(tmp_path / "m"))
    assert result.exit_code == 2 and "Q4_1 GGUF" in result.stderr and "--allow-quantized-base" in result.stderr
    assert result.stderr.startswith("error: merge:") and not (tmp_path / "m").exists()
    result = cli_in_process("merge", str(run.path), str(tmp_path / "m"), "--allow-quantized-base")
    assert result.exit_code == 0, result.stderr
    assert "warning:" in result.stderr and "Q4_1" in (tmp_path / "m" / "README.md").read_text()


def test_every_key_of_the_generation_quickstart_is_documented():
    import tomllib

    from conftest import REPO

    reference = (REPO / "docs" / "recipes.md").read_text()
    recipe = tomllib.loads((REPO / "recipes" / "generation-quickstart.toml").read_text())
    for section, keys in recipe.items():
        assert f"## [{section}]" in reference
        for key in keys:
            assert f"`{key}`" in reference, f"{section}.{key} missing from docs/recipes.md"


def test_chat_and_instruction_data_sets_from_the_hub(make_gen_recipe, tmp_path, monkeypatch):
    """Online (a local Hub-compatible server): a parquet chat data set (a ``messages`` list column) with a
    validation split, and a JSON-lines instruction data set; downloaded, then trained on like local files."""
    import datasets
    from hub_server import HubServer, parquet_bytes, use_server

    chats = datasets.Dataset.from_list(to_messages(make_qa_rows(24)))
    with HubServer() as hub:
        use_server(monkeypatch, hub, tmp_path)
        commit = hub.add_repo("acme/chats", {"data/train-00000-of-00001.parquet": parquet_bytes(chats),
                                             "data/validation-00000-of-00001.parquet": parquet_bytes(chats.select(
                                                 range(6)))}, repo_type="dataset")
        recipe = make_gen_recipe(data='train = ""\ndataset = "acme/chats"\ndataset_eval_split = "validation"')
        session, model, tokenizer = session_and_tokenizer(recipe)
        assert session.splits.info["shape"] == "messages" and session.splits.info["dataset_commit"] == commit
        assert (session.splits.info["train_examples"], session.splits.info["eval_examples"]) == (24, 6)
        item = session.task.build_dataset(session.splits.train, tokenizer, True)[0]
        assert tokenizer.decode(learned(item)).startswith(make_qa_rows(24)[0]["completion"])

        rows = "".join(json.dumps({"instruction": r["prompt"], "output": r["completion"]}) + "\n"
                       for r in make_qa_rows(20, seed=1))
        hub.add_repo("acme/alpaca-tiny", {"train.jsonl": rows.encode()}, repo_type="dataset")
        recipe = make_gen_recipe(data='train = ""\ndataset = "acme/alpaca-tiny"', train="epochs = 1",
                                 name="alpaca.toml")
        run = run_recipe(recipe, [], console=Console(quiet=True))
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["data"]["dataset"] == "acme/alpaca-tiny" and metrics["data"]["train_examples"] == 15
