"""Is a 4-bit / 8-bit base (bitsandbytes' CPU backend) worth it on this CPU? One LoRA (q_proj, v_proj, r 8)
training measurement per process, so peak RSS is that mode's own; docs/adapters.md has the results.

    pip install bitsandbytes==0.50.2       # the qlora extra; not installed by `make`
    python benchmarks/qlora_cpu.py smollm2 fp32 12      # SmolLM2-135M (the generation quickstart's), 12 steps
    python benchmarks/qlora_cpu.py smollm2 nf4-fp32 12  # NF4 + double quantization, computing in fp32
    python benchmarks/qlora_cpu.py smollm2 nf4-bf16 12  # ... computing in bf16
    python benchmarks/qlora_cpu.py smollm2 8bit 12      # LLM.int8
    python benchmarks/qlora_cpu.py random-0.5b fp32 4   # a random 0.46B Llama (written once to /tmp)
    python benchmarks/qlora_cpu.py random-0.5b nf4-fp32 4

SmolLM2 trains on batches of 8 quickstart chats (loss on every token); the random model on 2 x 64 random ids
(time and memory only). One torch thread. Prints one JSON line.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RANDOM_MODEL = Path("/tmp/finetune-qlora-random-0.5b")


def rss(field: str = "VmRSS") -> float:
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def smollm2_path() -> str:
    sys.path.insert(0, str(REPO / "plugins"))
    from finetune_generation.zoo import resolve

    return resolve("smollm2").path


def random_model_path(tokenizer_from: str) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (RANDOM_MODEL / "config.json").is_file():
        config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                             num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(RANDOM_MODEL)
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(RANDOM_MODEL)
    return str(RANDOM_MODEL)


def main(model_name: str, mode: str, steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    if model_name == "random-0.5b":
        path = random_model_path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs: dict = {"dtype": torch.float32}
    if mode != "fp32":
        import bitsandbytes  # noqa: F401 - its import is not the model's memory
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if mode.endswith("bf16") else torch.float32
        config = (BitsAndBytesConfig(load_in_8bit=True) if mode == "8bit" else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=compute))
        kwargs.update(quantization_config=config, device_map={"": "cpu"}, dtype=compute)
    before = rss()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    load_s = time.perf_counter() - started
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded, anon_loaded = rss(), rss("RssAnon")
    if mode != "fp32":
        for module in model.modules():  # what finetune does too (keep_training_layout)
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    rows = [json.loads(line) for line in (REPO / "recipes/data/arithmetic_instructions.jsonl").open()][:8 * steps]
    losses, times, anon_max = [], [], 0.0
    model.train()
    for i in range(steps):
        if model_name == "random-0.5b":
            ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(i))
            batch = {"input_ids": ids, "labels": ids}
        else:
            texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows[i * 8:(i + 1) * 8]]
            batch = dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128))
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t)
        losses.append(round(loss.item(), 4))
        anon_max = max(anon_max, rss("RssAnon"))
    steady = sorted(times[1:])[len(times[1:]) // 2]
    print(json.dumps({
        "model": model_name, "mode": mode, "steps": steps, "load_s": round(load_s, 1),
        "weights_MB": round(weights / 1e6, 1), "rss_before_load_MB": round(before), "rss_after_load_MB": round(loaded),
        "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "anon_after_load_MB": round(anon_loaded), "anon_max_MB": round(anon_max),
        "file_rss_end_MB": round(rss("RssFile")),
        "median_step_s": round(steady, 2), "loss_first": losses[:3], "loss_last": losses[-3:]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 12)
