"""``finetune export --format gguf`` of a causal-lm run: the GGUF read back with the gguf package (metadata, tensor
names, shapes and types, tokenizer) and with the plugin's own reader (zoo.read_gguf: the same ids, the same logits
for f32 and f16; close for q8_0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from generation_fixtures import make_qa_rows, write_jsonl

from finetune.errors import RecipeError
from finetune.run.export import export_run
from finetune.run.inference import load_run

TRAIN = {"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "mixed_precision": "no", "log_every_steps": 2,
         "checkpoint_every_steps": 0, "seed": 0, "eval_before_training": False}


def _train(folder: Path, backbone: Path) -> Path:
    import tomli_w

    from finetune.engine.console import Console
    from finetune.run.training import run_recipe

    data = write_jsonl(folder / "train.jsonl", make_qa_rows(24))
    recipe = {"task": {"name": "causal-lm", "sample_prompts": 0}, "model": {"backbone": str(backbone)},
              "data": {"train": str(data), "split": 0.25, "max_length": 64},
              "peft": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": TRAIN, "output": {"dir": str(folder / "run")}}
    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return run_recipe(path, [], console=Console(enabled=False)).path


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, tiny_llama) -> Path:
    return _train(tmp_path_factory.mktemp("export-causal"), tiny_llama)


def test_gguf_round_trip(causal_run, tmp_path):
    import gguf

    from finetune_generation.zoo import read_gguf

    _, model, tokenizer, _ = load_run(causal_run)
    enc = tokenizer(["add 3 and 4 3+4=7", "add 9 and 9"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).logits
    sizes = {}
    for qtype, bound in (("f32", 1e-5), ("f16", 5e-3), ("q8_0", None)):
        out = tmp_path / qtype
        report = export_run(causal_run, "gguf", out, quantize=qtype, say=lambda line: None)
        path = out / f"run.{qtype}.gguf"
        assert report["gguf"]["file"] == path.name and path.exists()
        sizes[qtype] = path.stat().st_size
        reader = gguf.GGUFReader(str(path))
        assert reader.fields["general.architecture"].contents() == "llama"
        assert reader.fields["llama.block_count"].contents() == 2
        assert reader.fields["llama.attention.head_count_kv"].contents() == 2
        assert reader.fields["tokenizer.ggml.tokens"].contents()[:len(tokenizer)] == \
            [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
        assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
        assert shapes["token_embd.weight"] == (len(tokenizer), 32)
        assert shapes["blk.1.attn_k.weight"] == (16, 32) and shapes["blk.0.ffn_gate.weight"] == (64, 32)
        assert "output.weight" not in shapes  # tied to the embeddings, as llama.cpp writes it
        kinds = {t.tensor_type.name for t in reader.tensors}
        assert kinds == {"f32": {"F32"}, "f16": {"F16", "F32"}, "q8_0": {"Q8_0", "F32"}}[qtype]
        back, back_tokenizer = read_gguf(path)  # the project's reader (the offline SmolLM2 goes through it)
        assert back_tokenizer.encode("add 3 and 4 3+4=7") == tokenizer.encode("add 3 and 4 3+4=7")
        with torch.no_grad():
            diff = float((back.eval()(**enc).logits - want).abs().max())
        if bound is not None:
            assert diff <= bound and report["checks"]["max_abs_logit_diff"] <= report["checks"]["tolerance"]
        else:
            assert diff < 0.1 and report["checks"]["top1_agreement"] > 0.9  # 8-bit weights: close, not equal
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    assert "llama-cli -m run.f16.gguf" in (tmp_path / "f16" / "README.md").read_text()


def test_gguf_refuses_an_architecture_it_does_not_write(tmp_path, tiny_gpt2):
    run = _train(tmp_path, tiny_gpt2)
    with pytest.raises(RecipeError, match=r"writes the llama architecture .* this run's model is 'gpt2'\. Export "
                                          r"it with --format safetensors"):
        export_run(run, "gguf", tmp_path / "out", say=lambda line: None)
    assert not (tmp_path / "out").exists()
