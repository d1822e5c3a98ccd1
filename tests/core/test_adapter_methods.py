"""Adapter methods beyond plain LoRA (``peft.method`` dora / ia3 / prompt-tuning / prefix-tuning; ``use_rslora``,
``init``, ``loraplus_lr_ratio``): each run's adapter loads with plain peft on the original base and gives the
logits the trained model gave when it was saved; merge works where the method allows it and is refused where
it does not; options and layers a method cannot take are refused before any run folder exists.

One tiny run per method (1 epoch, 8 steps), shared by the tests of this module."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import make_sentiment_rows, write_csv
from generation_fixtures import make_qa_rows, to_messages, write_jsonl
from vision_fixtures import colour_folder, tiny_timm_cnn, vision_recipe  # noqa: F401 - fixtures

from finetune.contract.recipe import PeftSection
from finetune.engine.console import Console
from finetune.engine.lora import attach_lora
from finetune.errors import RecipeError
from finetune.run.training import run_recipe

QUIET = Console(enabled=False)
TRAINED_STATE: dict[str, dict[str, torch.Tensor]] = {}  #: method -> the adapter state dict as last saved
TEXTS = ["good day", "awful food", "the movie was so evil"]

#: method key -> (task, [peft] overrides)
METHODS = {
    "dora": ("text", ['peft.method="dora"']),
    "ia3": ("text", ['peft.method="ia3"', "train.learning_rate=0.05"]),
    "rslora-loraplus": ("text", ["peft.use_rslora=true", "peft.loraplus_lr_ratio=16"]),
    "pissa": ("text", ['peft.init="pissa"']),
    "olora": ("text", ['peft.init="olora"']),
    "prompt-tuning": ("gen", ['peft.method="prompt-tuning"', "peft.num_virtual_tokens=4"]),
    "prefix-tuning": ("gen", ['peft.method="prefix-tuning"', "peft.num_virtual_tokens=4"]),
}


def cli_in_process(*args: str):
    from click.testing import CliRunner

    from finetune.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _recipe(folder: Path, task: str, backbone: Path, data: Path) -> Path:
    import tomli_w

    if task == "text":
        recipe = {"task": {"name": "text-classification"},
                  "data": {"train": str(data), "split": 0.25, "max_length": 16},
                  "peft": {"r": 4, "alpha": 8}}
    else:
        recipe = {"task": {"name": "causal-lm", "sample_prompts": 1, "sample_max_new_tokens": 4,
                           "max_new_tokens": 4},
                  "data": {"train": str(data), "split": 0.25, "max_length": 64},
                  "peft": {"dropout": 0.0}}
    recipe["model"] = {"backbone": str(backbone)}
    recipe["train"] = {"epochs": 1, "batch_size": 16, "learning_rate": 1e-2, "mixed_precision": "no",
                       "checkpoint_every_steps": 0, "seed": 0}
    recipe["output"] = {"dir": str(folder / "run")}
    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


def _inputs(task: str, backbone: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(backbone))
    if task == "text":
        return dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    return {"input_ids": torch.tensor([tokenizer("add 1 and 2 1+2=3")["input_ids"]])}


def _logits(model, inputs) -> torch.Tensor:
    """The model's logits in eval mode; every module's mode restored after (a vision task keeps frozen
    BatchNorms in eval mode while training)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
        out = getattr(out, "logits", out).detach().clone()
    for module, mode in modes.items():
        module.training = mode
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, tiny_llama):
    """``trained(method) -> (run, logits of the model as it was saved, inputs, backbone)``, trained once."""
    import finetune.run.training as training

    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("adapter-methods")
    text_csv = write_csv(root / "text.csv", make_sentiment_rows(160))
    gen_jsonl = write_jsonl(root / "gen.jsonl", to_messages(make_qa_rows(48)))

    def get(method: str):
        if method not in cache:
            task, overrides = METHODS[method]
            backbone = tiny_bert if task == "text" else tiny_llama
            folder = root / method
            folder.mkdir()
            recipe = _recipe(folder, task, backbone, text_csv if task == "text" else gen_jsonl)
            inputs = _inputs(task, backbone)
            saved: list[torch.Tensor] = []
            real = training.adapter_writer

            def capturing(*args, **kwargs):
                save = real(*args, **kwargs)

                def wrapped(model, state_dict=None):
                    from peft import get_peft_model_state_dict

                    save(model, state_dict)
                    saved.append(_logits(model, inputs))
                    TRAINED_STATE[method] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
                return wrapped

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(training, "adapter_writer", capturing)
                run = run_recipe(recipe, overrides, console=QUIET)
            assert saved, "the run saved no adapter"
            cache[method] = (run, saved[-1], inputs, backbone)
        return cache[method]

    return get


def _fresh_base(task: str, backbone: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "text":
        return AutoModelForSequenceClassification.from_pretrained(str(backbone), num_labels=2)
    return AutoModelForCausalLM.from_pretrained(str(backbone))


@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_loads_with_plain_peft_on_the_original_base_with_the_trained_logits(trained, method):
    from peft import PeftModel

    run, trained_logits, inputs, backbone = trained(method)
    task = METHODS[method][0]
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    expected = {"dora": ("LORA", "use_dora", True), "ia3": ("IA3", "feedforward_modules", ["output.dense"]),
                "rslora-loraplus": ("LORA", "use_rslora", True), "pissa": ("LORA", "r", 8),
                "olora": ("LORA", "r", 8), "prompt-tuning": ("PROMPT_TUNING", "num_virtual_tokens", 4),
                "prefix-tuning": ("PREFIX_TUNING", "num_virtual_tokens", 4)}[method]
    assert config["peft_type"] == expected[0]
    assert config[expected[1]] == expected[2] or sorted(config[expected[1]]) == expected[2]
    if method in ("pissa", "olora"):  # converted to a plain LoRA of rank 2r: no init that changes the base
        assert config["init_lora_weights"] is True and config["lora_alpha"] == 16
    card = (run.path / "README.md").read_text()
    tag = {"rslora-loraplus": "lora", "pissa": "lora", "olora": "lora"}.get(method, method)
    assert f"- {tag}\n" in card and "PeftModel.from_pretrained(base, 'adapter')" in card
    if method == "rslora-loraplus":
        assert "use_rslora = True, loraplus_lr_ratio = 16.0" in card
    if method in ("pissa", "olora"):
        assert f"init = {method} (saved converted to a plain LoRA of rank 2r" in card
    if task == "gen":
        assert "trained virtual tokens" in card and "finetune merge" not in card
    plain = PeftModel.from_pretrained(_fresh_base(task, backbone), str(run.adapter_dir)).eval()
    with torch.no_grad():
        got = plain(**inputs).logits
        assert torch.allclose(got, trained_logits, atol=2e-5), (got - trained_logits).abs().max()
        untouched = _fresh_base(task, backbone).eval()(**inputs).logits
    if task == "gen":
        trained_logits = trained_logits[:, -untouched.shape[1]:]  # prompt tuning: the virtual tokens' positions
    assert not torch.allclose(untouched, trained_logits, atol=1e-3), "training changed nothing"


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_a_converted_adapter_gives_back_the_trained_matrices(trained, method):
    """The selected adapter is put back into the model that trained it (to score the test split): the
    converted file's trained halves are exactly the residual-base model's A and B."""
    from safetensors.torch import load_file

    from finetune.run.adapter import unconvert_lora

    run, *_ = trained(method)
    back = unconvert_lora(load_file(str(run.adapter_dir / "adapter_model.safetensors")))
    state = TRAINED_STATE[method]
    assert set(back) == set(state) and any("classifier" in k for k in back)  # the head is kept
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_loraplus_gives_the_b_matrices_a_higher_learning_rate(trained):
    run, *_ = trained("rslora-loraplus")
    from finetune.engine.loop import TrainingLoop
    from finetune.run.session import build_model, open_session

    session = open_session(run.path / "recipe.toml")
    model, _, _ = build_model(session)
    loop = TrainingLoop.__new__(TrainingLoop)
    loop.model, loop.recipe, loop.cfg = model, session.recipe, session.recipe.train
    loop.plan = type("Plan", (), {"steps_total": 10})()
    loop.set_up_optimizer()
    lr_of = {id(p): group["lr"] for group in loop.optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    b = [lr_of[id(p)] for n, p in named.items() if "lora_B" in n]
    a = [lr_of[id(p)] for n, p in named.items() if "lora_A" in n]
    assert b and a and set(b) == {16 * 1e-2} and set(a) == {1e-2}


@pytest.mark.parametrize("method", ["ia3", "dora"])
def test_predict_and_evaluate_on_the_run(trained, method, tmp_path):
    run, *_ = trained(method)
    rows = make_sentiment_rows(12, seed=5)
    labelled = write_csv(tmp_path / "labelled.csv", rows)
    out = tmp_path / "preds.csv"
    result = cli_in_process("predict", str(run.path), "--input", str(labelled), "--output", str(out))
    assert result.exit_code == 0, result.output
    predicted = list(csv.DictReader(out.open()))
    assert len(predicted) == 12 and {r["pred_label"] for r in predicted} <= {"pos", "neg"}
    scored = tmp_path / "scored.json"
    result = cli_in_process("evaluate", str(run.path), "--input", str(labelled), "--output", str(scored))
    assert result.exit_code == 0, result.output
    accuracy = sum(r["pred_label"] == row["label"] for r, row in zip(predicted, rows)) / 12
    assert json.loads(scored.read_text())["metrics"]["accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize("method", ["dora", "ia3", "rslora-loraplus", "pissa"])
def test_merge_and_safetensors_export_fold_the_adapter_into_a_plain_model(trained, method, tmp_path):
    """``finetune merge`` and ``finetune export --format safetensors`` are one merge (finetune/run/merge.py):
    both folders load with plain transformers and give the trained logits (IA3 too, whose PEFT unloading fails
    on BERT's pooler trained in full unless the merge takes the trained copy back first)."""
    from transformers import AutoModelForSequenceClassification

    run, trained_logits, inputs, _ = trained(method)
    result = cli_in_process("merge", str(run.path), str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    result = cli_in_process("export", str(run.path), "--format", "safetensors", "-o", str(tmp_path / "export"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "export" / "export.json").read_text())["merged"] is True
    for folder in ("merged", "export"):
        merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / folder)).eval()
        assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters()), folder
        with torch.no_grad():
            assert torch.allclose(merged(**inputs).logits, trained_logits, atol=1e-4), folder


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_merge_refuses_prompt_and_prefix_tuning(trained, method, tmp_path):
    run, *_ = trained(method)
    result = cli_in_process("merge", str(run.path), str(tmp_path / "merged"))
    assert result.exit_code == 2
    assert f'peft.method = "{method}"' in result.output and "no weights to merge" in result.output
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
def test_export_refuses_prompt_tuning_before_loading(trained, fmt, tmp_path):
    run, *_ = trained("prompt-tuning")
    result = cli_in_process("export", str(run.path), "--format", fmt, "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert 'peft.method = "prompt-tuning"' in result.output and "no merged model" in result.output
    assert not (tmp_path / "out").exists()


def test_prompt_tuning_run_predicts(trained, tmp_path):
    run, *_ = trained("prompt-tuning")
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "add 1 and 2"}])
    result = cli_in_process("predict", str(run.path), "--input", str(inp))
    assert result.exit_code == 0, result.output
    assert "pred_text" in json.loads(result.output.splitlines()[-1])


# -- refusals --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,fragments", [
    (['peft.method="prompt-tuning"'], ['peft.method = "prompt-tuning"', "'text-classification'", "causal-lm",
                                        'use method = "lora"']),
    (['peft.method="ia3"', "peft.use_rslora=true"], ["peft.use_rslora is an option of method lora / dora",
                                                     "Remove peft.use_rslora"]),
    (['peft.method="ia3"', "peft.loraplus_lr_ratio=16"], ["peft.loraplus_lr_ratio is an option of method"]),
    (["peft.num_virtual_tokens=8"], ["peft.num_virtual_tokens is an option of method prompt-tuning / "
                                     "prefix-tuning", 'set peft.method = "prompt-tuning"']),
    (['peft.feedforward_modules=["output.dense"]'], ["peft.feedforward_modules is an option of method ia3"]),
    (['peft.method="dora"', 'peft.init="pissa"'], ['peft.init = "pissa" works with method = "lora" only']),
    (['peft.method="ia3"', "peft.layers=[-1]"], ["peft.layers", 'does not apply to peft.method = "ia3"']),
    (['peft.method="ia3"', 'peft.target_modules=["query"]', 'peft.feedforward_modules=["intermediate.dense"]'],
     ["peft.feedforward_modules: ['intermediate.dense'] are not among the target modules"]),
])
def test_refused_before_the_run_folder_exists(make_recipe, tmp_path, overrides, fragments):
    with pytest.raises(RecipeError) as err:
        run_recipe(make_recipe(), overrides, console=QUIET)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert not (tmp_path / "run").exists()


def test_validate_shows_the_method_or_refuses_with_one_clear_line(make_recipe, tmp_path):
    result = cli_in_process("validate", str(make_recipe()), "--set", 'peft.method="prefix-tuning"')
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "causal-lm" in result.output and not (tmp_path / "run").exists()
    result = cli_in_process("validate", str(make_recipe()), "--set", 'peft.method="ia3"')
    assert result.exit_code == 0, result.output
    assert "peft.method:      ia3" in result.output and "IA3 targets:      ['key', 'value', 'output.dense']" in \
        result.output
    assert "peft.r is not used: peft.method is 'ia3' (it does not use r)" in result.output


class _Task:
    name = "toy"

    def modules_to_save(self, model):
        return []

    def lora_targets(self, model):
        return ["conv", "proj"]

    def peft_task_type(self):
        return None


def _toy_model():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.norm = torch.nn.LayerNorm(8)
            self.attn = torch.nn.MultiheadAttention(8, 2)
            self.proj = torch.nn.Linear(8, 8)

    return Toy()


@pytest.mark.parametrize("options,fragments", [
    ({"init": "pissa"}, ['peft.init = "pissa" initialises Linear layers only', "Conv2d (conv)",
                         'init = "default"']),
    ({"init": "olora", "target_modules": ["conv"]}, ["Conv2d (conv)"]),
    ({"method": "ia3", "target_modules": ["norm"]}, ['peft.method = "ia3"', "LayerNorm"]),
    ({"method": "dora", "target_modules": ["attn"]}, ['peft.method = "dora"', "MultiheadAttention",
                                                       "DoRA"]),
])
def test_layer_types_a_method_cannot_take_are_refused_by_name(options, fragments):
    with pytest.raises(RecipeError) as err:
        attach_lora(_toy_model(), PeftSection(**options), _Task())
    for fragment in fragments:
        assert fragment in str(err.value)


def test_dora_and_ia3_take_convolutions():
    for method in ("dora", "ia3"):
        model, report = attach_lora(_toy_model(), PeftSection(method=method, target_modules=["conv"]), _Task())
        assert report.trainable_params > 0
        conv = model.get_base_model().conv
        assert type(conv).__module__.startswith(f"peft.tuners.{'lora' if method == 'dora' else 'ia3'}")
        assert conv(torch.zeros(1, 3, 5, 5)).shape == (1, 8, 3, 3)


# -- convolutions: a vision task's LoRA targets (frozen BatchNorm folded into them) ---------------------

@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_on_a_cnn_reload_with_the_trained_logits(vision_recipe, method):  # noqa: F811
    import finetune.run.training as training
    from finetune.run.inference import load_run

    images = torch.rand(2, 3, 32, 32)
    saved: list[torch.Tensor] = []
    real = training.adapter_writer

    def capturing(*args, **kwargs):
        save = real(*args, **kwargs)

        def wrapped(model, state_dict=None):
            save(model, state_dict)
            saved.append(_logits(model, {"x": images}))
        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "adapter_writer", capturing)
        run = run_recipe(vision_recipe(train="epochs = 1"), [f'peft.method="{method}"'], console=QUIET)
    _, model, _, _ = load_run(run.path)
    with torch.no_grad():
        assert torch.allclose(model(images), saved[-1], atol=1e-4)


def test_full_fine_tuning_saves_a_tied_lm_head_once_and_reloads_it_tied(tiny_llama, tmp_path):
    """peft.method = "full" on a causal LM whose lm_head shares the embedding matrix (SmolLM2, the tiny Llama):
    safetensors refuses tensors that share memory, which failed the generation quickstart's first save; the
    tied weight is written once and the reloaded model has the trained weights, still tied."""
    from transformers import AutoModelForCausalLM

    from finetune.run.adapter import (
        expected_adapter_tensors,
        load_trained_weights,
        save_trained_weights,
        verify_adapter,
    )

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained"
    save_trained_weights(model, tmp_path / "trained.safetensors", "full")
    verify_adapter(tmp_path, "full", expected_adapter_tensors(model, "full"))  # the completeness check agrees
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    load_trained_weights(fresh, tmp_path / "trained.safetensors")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    for (name, want), got in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(want, got), name


def test_full_fine_tuning_of_a_tied_causal_lm_trains_saves_and_reloads(tiny_llama, tmp_path):
    """The same end to end: a full fine-tuning run of the tied tiny Llama finishes (its adapter verified complete)
    and reloads tied, with the weights it saved."""
    from finetune.run.inference import load_run

    data = write_jsonl(tmp_path / "gen.jsonl", to_messages(make_qa_rows(16)))
    run = run_recipe(_recipe(tmp_path, "gen", tiny_llama, data), ['peft.method="full"', "train.learning_rate=1e-3"],
                     console=QUIET)
    _, model, _, _ = load_run(run.path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    from safetensors.torch import load_file

    saved = load_file(str(run.path / "adapter" / "trained.safetensors"))
    assert "lm_head.weight" not in saved and torch.equal(saved["model.embed_tokens.weight"], model.lm_head.weight)
