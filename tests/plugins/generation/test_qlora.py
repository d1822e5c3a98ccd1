"""``model.quantize`` (QLoRA): the recipe keys and their refusals (before a run folder exists); merge / export of a
run recorded as trained on a quantized base load the full-precision base (no bitsandbytes needed); and, where
bitsandbytes is installed, the real path on this CPU (its CPU backend, which recipes may not use: not worth it,
docs/adapters.md; turned on here with ``CPU_4BIT_USEFUL``): a few steps on a 4-bit NF4 base, merged into the
full-precision base, never into the 4-bit weights."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from generation_fixtures import make_qa_rows, write_jsonl

from finetune.engine import quantize
from finetune.engine.quantize import CPU_4BIT_SINCE, _bnb_version, check_quantization, keep_training_layout
from finetune.errors import RecipeError

BNB = _bnb_version()
CPU_PATH = BNB is not None and (torch.cuda.is_available() or BNB >= CPU_4BIT_SINCE)
SKIP = ("bitsandbytes >= 0.48 is not installed (the qlora extra, not in dev: a recipe may not use its CPU backend), "
        "so a quantized base cannot load here; pip install 'finetune[qlora]' to run these")
needs_bnb = pytest.mark.skipif(not CPU_PATH, reason=SKIP)


@pytest.fixture(scope="module", autouse=True)
def cpu_4bit_allowed():
    """The real path on this CPU: bitsandbytes' CPU backend, which recipes may not use (not worth it here)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "CPU_4BIT_USEFUL", True)
        yield


def _recipe_file(folder: Path, backbone: Path, **model: object) -> Path:
    import tomli_w

    data = write_jsonl(folder / "train.jsonl", make_qa_rows(48))
    recipe = {"task": {"name": "causal-lm", "sample_prompts": 0},
              "model": {"backbone": str(backbone), **model},
              "data": {"train": str(data), "split": 0.25, "max_length": 64},
              "peft": {"r": 8, "alpha": 16, "dropout": 0.0},
              "train": {"epochs": 2, "batch_size": 8, "learning_rate": 2e-2, "mixed_precision": "no", "seed": 0,
                        "checkpoint_every_steps": 0, "log_every_steps": 1},
              "output": {"dir": str(folder / "run")}}
    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


def _recipe(tmp_path, tiny_llama, overrides=()):
    from finetune.engine.plugins import get_registry
    from finetune.engine.recipe_file import load_recipe

    registry = get_registry()
    recipe = load_recipe(_recipe_file(tmp_path, tiny_llama), list(overrides), registry.get_task)
    return recipe, registry.create_task(recipe)


# -- the recipe keys and their refusals (no bitsandbytes needed) -----------------------------------------------
def test_refusals_name_the_key_what_is_needed_and_how_to_run_without(tmp_path, tiny_llama):
    def refusal(overrides, **machine):
        recipe, task = _recipe(tmp_path, tiny_llama, overrides)
        with pytest.raises(RecipeError) as info:
            check_quantization(recipe, task, **machine)
        return str(info.value)

    cpu = {"cuda": False, "bnb": (0, 50)}
    text = refusal(["model.quantize=4bit"], cuda=True, bnb=None)
    assert "bitsandbytes, which is not installed" in text and "finetune[qlora]" in text
    assert 'model.quantize = "none"' in text
    assert "needs a CUDA GPU" in refusal(["model.quantize=8bit"], **cpu)
    assert "bitsandbytes >= 0.48" in refusal(["model.quantize=4bit"], cuda=False, bnb=(0, 45))
    quantize.CPU_4BIT_USEFUL = False  # as recipes see it (the module fixture puts it back)
    try:
        text = refusal(["model.quantize=4bit"], **cpu)
        assert "needs a CUDA GPU" in text and "saved no memory" in text and 'model.quantize = "none"' in text
        assert "needs a CUDA GPU" in refusal(["model.quantize=4bit"], cuda=False, bnb=None)
    finally:
        quantize.CPU_4BIT_USEFUL = True
    assert 'peft.method = "full"' in refusal(["model.quantize=4bit", "peft.method=full"], **cpu)
    assert 'peft.init = "pissa"' in refusal(["model.quantize=4bit", "peft.init=pissa"], **cpu)
    assert "fsdp" in refusal(["model.quantize=4bit", "distributed.strategy=fsdp"], **cpu)
    assert "option of model.quantize = \"4bit\"" in refusal(["model.quant_type=fp4"], **cpu)
    assert "option of model.quantize = \"4bit\"" in refusal(["model.quantize=8bit", "model.double_quant=false"],
                                                            cuda=True, bnb=(0, 50))
    # what passes: 4-bit on this CPU with a new enough bitsandbytes, 8-bit and fp4 on a GPU, "none" anywhere
    gpu, bare = {"cuda": True, "bnb": (0, 43)}, {"cuda": False, "bnb": None}
    for overrides, machine in ((["model.quantize=4bit"], cpu), (["model.quantize=8bit"], gpu),
                               (["model.quantize=4bit", "model.quant_type=fp4"], cpu), ([], bare)):
        recipe, task = _recipe(tmp_path, tiny_llama, overrides)
        check_quantization(recipe, task, **machine)


def test_a_task_that_does_not_load_quantized_is_refused_naming_the_ones_that_do(tmp_path, tiny_llama):
    recipe, _ = _recipe(tmp_path, tiny_llama, ["model.quantize=4bit"])
    vision = types.SimpleNamespace(name="image-classification", quantizable=False)
    with pytest.raises(RecipeError) as info:
        check_quantization(recipe, vision, cuda=True, bnb=(0, 50))
    text = str(info.value)
    assert "'image-classification' does not load its model quantized" in text and "nn.Linear" in text
    assert "causal-lm" in text and "reward-model" in text and "preference-tuning" in text


def test_an_unknown_quantize_value_is_a_recipe_error(tmp_path, tiny_llama):
    with pytest.raises(RecipeError) as info:
        _recipe(tmp_path, tiny_llama, ["model.quantize=3bit"])
    assert "model.quantize" in str(info.value)


def test_a_refused_run_leaves_no_run_folder(tmp_path, tiny_llama):
    from finetune.engine.console import Console
    from finetune.run.training import run_recipe

    recipe = _recipe_file(tmp_path, tiny_llama, quantize="4bit")
    overrides = ["peft.method=full"] if CPU_PATH else []  # refused either way: the method, or no bitsandbytes
    with pytest.raises(RecipeError, match="model.quantize"):
        run_recipe(recipe, overrides, console=Console(enabled=False))
    assert not (tmp_path / "run").exists()


# -- the CPU path: a 4-bit NF4 base trained, then merged into the full-precision base -----------------------------
@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_llama) -> Path:
    if not CPU_PATH:
        pytest.skip("bitsandbytes >= 0.48 (its CPU backend) or a CUDA GPU is needed for a quantized base")
    from finetune.engine.console import Console
    from finetune.run.training import run_recipe

    folder = tmp_path_factory.mktemp("qlora")
    return run_recipe(_recipe_file(folder, tiny_llama, quantize="4bit"), [], console=Console(enabled=False)).path


def _ids(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    return torch.tensor([tok("add 3 and 4 3+4=7")["input_ids"]])


@needs_bnb
def test_training_on_a_4bit_base_learns_and_records_the_quantization(qlora_run):
    rows = [json.loads(line) for line in (qlora_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if r["kind"] == "eval"]
    assert all(torch.isfinite(torch.tensor(evals))) and len(evals) == 3
    # each epoch learns, the second too: an evaluation in between must not freeze the 4-bit layers
    assert evals[0] > evals[1] > evals[2], evals
    info = json.loads((qlora_run / "run.json").read_text())["quantization"]
    assert info["quantize"] == "4bit" and info["quant_type"] == "nf4" and info["double_quant"] is True
    assert "4-bit NF4 with double quantization" in (qlora_run / "README.md").read_text()


@needs_bnb
def test_the_adapter_loads_with_plain_peft_on_the_full_precision_base(qlora_run, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(qlora_run / "adapter")).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=_ids(tiny_llama)).logits, plain(input_ids=_ids(tiny_llama)).logits)


@needs_bnb
def test_load_run_reloads_the_4bit_base_and_full_precision_on_request(qlora_run):
    from finetune.run.inference import load_run

    _, quantized, _, _ = load_run(qlora_run)
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.modules())
    _, full, _, _ = load_run(qlora_run, full_precision=True)
    assert not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in full.modules())


@needs_bnb
def test_merge_and_export_use_the_full_precision_base_not_the_4bit_weights(qlora_run, tiny_llama, tmp_path):
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.cli import cli
    from finetune.run.export import export_run
    from finetune.run.inference import load_run

    result = CliRunner().invoke(cli, ["merge", str(qlora_run), str(tmp_path / "merged")], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "merged here into the full-precision base" in (tmp_path / "merged" / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32),
                                     str(qlora_run / "adapter")).eval()
    _, on_4bit, _, _ = load_run(qlora_run)  # the base quantized, as it trained
    ids = _ids(tiny_llama)
    with torch.no_grad():
        want, got, quantized = full(input_ids=ids).logits, merged(input_ids=ids).logits, on_4bit(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert (quantized - want).abs().max() > 100 * (got - want).abs().max() + 1e-4  # not the 4-bit weights
    report = export_run(qlora_run, "safetensors", tmp_path / "export", say=lambda _: None)
    assert report["trained_on_quantized_base"]["quantize"] == "4bit"
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=ids).logits, want, atol=1e-5)


@needs_bnb
def test_bitsandbytes_cpu_eval_repacking_is_turned_off(tiny_llama):
    """bitsandbytes 0.50.2 repacks 4-bit weights for CPU inference at the first eval-mode forward and never back:
    training after an evaluation then stopped learning. The run turns the repacking off."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), quantization_config=config,
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    keep_training_layout(model)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())


# -- the choice of the full-precision base, without bitsandbytes ----------------------------------------------------
@pytest.fixture(scope="module")
def recorded_quantized_run(tmp_path_factory, tiny_llama) -> Path:
    """A finished full-precision run whose recipe and run.json then say it trained on a 4-bit base (what a
    QLoRA run on a GPU leaves): merge and export must not need bitsandbytes or a GPU for it."""
    import tomllib

    import tomli_w

    from finetune.engine.console import Console
    from finetune.run.training import run_recipe

    folder = tmp_path_factory.mktemp("recorded")
    run = run_recipe(_recipe_file(folder, tiny_llama), ["train.epochs=1"], console=Console(enabled=False)).path
    recipe = tomllib.loads((run / "recipe.toml").read_text())
    recipe["model"]["quantize"] = "4bit"
    (run / "recipe.toml").write_text(tomli_w.dumps(recipe))
    info = json.loads((run / "run.json").read_text())
    info["quantization"] = {"quantize": "4bit", "quant_type": "nf4", "double_quant": True}
    (run / "run.json").write_text(json.dumps(info))
    return run


def test_merge_and_export_of_a_quantized_run_load_the_full_precision_base(recorded_quantized_run, tiny_llama,
                                                                          tmp_path):
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.cli import cli
    from finetune.run.export import export_run
    from finetune.run.inference import load_run

    run = recorded_quantized_run
    if not CPU_PATH:  # as it trained: the 4-bit base, which needs bitsandbytes (a clear error, not a traceback)
        with pytest.raises(RecipeError, match="bitsandbytes"):
            load_run(run)
    _, full, _, _ = load_run(run, full_precision=True)
    assert not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in full.modules())
    result = CliRunner().invoke(cli, ["merge", str(run), str(tmp_path / "merged")], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "merged here into the full-precision base" in (tmp_path / "merged" / "README.md").read_text()
    report = export_run(run, "safetensors", tmp_path / "export", say=lambda _: None)
    assert report["trained_on_quantized_base"]["quant_type"] == "nf4"
    assert "merged here into the full-precision base" in (tmp_path / "export" / "README.md").read_text()
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32),
                                     str(run / "adapter")).eval()
    ids = _ids(tiny_llama)
    with torch.no_grad():
        expected = want(input_ids=ids).logits
        for folder in (tmp_path / "merged", tmp_path / "export"):
            merged = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
            assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5), folder
