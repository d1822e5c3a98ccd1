"""Bad generation data and settings: a clear error naming the recipe key, file and line; nothing written."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from generation_fixtures import write_jsonl

from finetune.errors import DataError, RecipeError
from finetune.run.session import build_model, open_session


def build(recipe):
    """Everything the core runs before the run folder exists."""
    session = open_session(recipe)
    _, tok, _ = build_model(session)
    session.task.build_dataset(session.splits.train, tok, training=True)
    session.task.build_dataset(session.splits.eval, tok, training=False)
    return session


def lines(path, *rows: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


GOOD = json.dumps({"prompt": "add 1 and 2", "completion": "1+2=3"})
CHAT = json.dumps({"messages": [{"role": "user", "content": "add 1 and 2"}, {"role": "assistant", "content": "3"}]})


@pytest.mark.parametrize(("rows", "fragments"), [
    ([GOOD, GOOD, '{"prompt": "x", "completion": oops}'], ["line 3 is not valid JSON"]),
    ([GOOD, "[1, 2]"], ["line 2 is a JSON list, not an object"]),
    ([GOOD, "", GOOD, json.dumps({"prompt": "add 2 and 2", "completion": "  "})],
     ["line 4: field 'completion' (data.completion_column) is empty"]),
    ([GOOD, json.dumps({"prompt": "add 2 and 2"})], ["line 2: field 'completion' (data.completion_column) is missing"]),
    ([CHAT, json.dumps({"messages": [{"role": "user", "content": "hi"}, {"content": "hello"}]})],
     ["line 2: message 1 has no \"role\""]),
    ([CHAT, json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]})],
     ["line 2: message 1 has role 'bot'"]),
    ([CHAT, json.dumps({"messages": [{"role": "user", "content": "hi"}]})], ["line 2: no \"assistant\" message"]),
    ([CHAT, json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]})],
     ["line 2: the last assistant message is empty"]),
    ([CHAT, json.dumps({"messages": "hello"})], ["line 2: field 'messages'", "non-empty list"]),
    ([json.dumps({"question": "q", "answer": "a"})], ["cannot tell the data shape", "'answer', 'question'",
                                                      "data.shape"]),
], ids=["bad-json", "not-object", "empty-completion", "missing-completion", "missing-role", "unknown-role",
        "no-assistant", "empty-assistant", "messages-not-list", "unknown-fields"])
def test_bad_rows_name_the_line(make_gen_recipe, tmp_path, rows, fragments):
    data = lines(tmp_path / "bad.jsonl", *rows)
    with pytest.raises(DataError) as info:
        open_session(make_gen_recipe(data=f'train = "{data}"'))
    message = str(info.value)
    assert str(data) in message
    for fragment in fragments:
        assert fragment in message, message


def test_every_example_longer_than_max_length(make_gen_recipe, tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "add " * 50, "completion": "x"}] * 4)
    with pytest.raises(DataError, match=r"data.max_length: all 3 train examples lose their whole answer when cut "
                                        r"to 16 tokens \(e.g. .*long.jsonl: line \d\); raise data.max_length"):
        build(make_gen_recipe(data=f'train = "{data}"\nmax_length = 16'))


def test_chat_messages_need_a_chat_template(make_gen_recipe, tiny_gpt2, tmp_path):
    data = lines(tmp_path / "chat.jsonl", *[CHAT] * 4)
    with pytest.raises(RecipeError, match="task.chat_template: chat `messages` data needs a chat template"):
        build(make_gen_recipe(backbone=tiny_gpt2, data=f'train = "{data}"'))


def test_chat_template_must_be_a_template(make_gen_recipe):
    with pytest.raises(RecipeError, match="task.chat_template: 'chatml' is not 'auto', 'none' or a Jinja template"):
        build(make_gen_recipe(task='chat_template = "chatml"'))


def test_eval_file_of_another_shape(make_gen_recipe, tmp_path):
    data = lines(tmp_path / "eval.jsonl", CHAT, CHAT)
    with pytest.raises(DataError, match="data.eval: .*eval.jsonl holds 'messages' data but data.train holds "
                                        "'prompt_completion'"):
        open_session(make_gen_recipe(data=f'eval = "{data}"'))


def test_cli_reports_bad_line_cleanly_and_writes_nothing(make_gen_recipe, tmp_path):
    data = lines(tmp_path / "bad.jsonl", GOOD, CHAT.replace('"role": "user", ', ""))
    recipe = make_gen_recipe(data=f'train = "{data}"\nshape = "messages"')
    result = run_cli("run", str(recipe))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: data.train: ") and "Traceback" not in result.stderr
    assert "line 1: field 'messages' (data.messages_column) must be a non-empty list" in result.stderr
    assert not (tmp_path / "run").exists()


def test_chat_template_that_looks_ahead_is_refused(make_gen_recipe):
    # marks the last message: rendering the prompt is then not a prefix of rendering prompt + answer
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} END{% endif %}\n"
                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(RecipeError, match="task.chat_template: the chat template does not render a conversation "
                                          "as a growing prefix"):
        build(make_gen_recipe(task=f"chat_template = {json.dumps(template)}"))


def test_a_predict_input_without_the_prompt_field_names_the_key_that_fixes_it(make_gen_recipe, tmp_path):
    from finetune.run.predictions import read_records

    task = open_session(make_gen_recipe()).task  # prompt/completion data: data.prompt_column names the field
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"question": "add 1 and 2", "answer": "3"}])
    with pytest.raises(DataError) as error:
        read_records(task, questions)
    message = str(error.value)
    assert "questions.jsonl: record 1 has no column 'prompt'" in message and "'question', 'answer'" in message
    assert "`finetune predict RUN --set data.prompt_column=<column>`" in message and "one prompt per line" in message
    task.recipe.data.prompt_column = "question"  # what that --set does
    assert read_records(task, questions) == [{"question": "add 1 and 2", "answer": "3"}]
