"""``causal-lm``: supervised (instruction / chat) fine-tuning of a causal language model with LoRA.

Data: JSONL (or any table file) with chat ``messages``, prompt/completion pairs, Alpaca-style
instruction/input/output, or plain text. The backbone's chat template renders the examples when it
has one; the loss covers only the answer tokens (``task.train_on = "all"`` learns everything) and
the end-of-answer token is always learned, so the fine-tuned model stops. Eval: loss, perplexity,
and sample generations from held-out prompts written to ``samples/`` at every evaluation, also the
one before training (step 0), which ``samples/before_after.md`` compares with the best checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from finetune import (
    DataError,
    DataOptions,
    DataSplits,
    PathStr,
    RecipeError,
    Task,
    TaskOptions,
    attention_projections,
    missing_input_column,
    open_dataset,
    quantization_kwargs,
    transformer_layers,
)
from finetune_generation.data import (
    IGNORE,
    Encoder,
    Example,
    TokenDataset,
    alpaca_plain_prompt,
    alpaca_user_prompt,
    clean_record,
    collate,
    detect_shape,
    encode_all,
    normalise,
    pack,
    prompt_and_reference,
    read_records,
)

SAMPLES_DIR = "samples"


class GenerationData(DataOptions):
    train: PathStr | None = Field(
        None, description="Training examples: a .jsonl file (one JSON object per line: chat `messages`, prompt and "
        "completion, Alpaca instruction/input/output, or text; see `shape`), or a .csv/.tsv/.json/.parquet table "
        "with those columns (or give `dataset`).")
    eval: PathStr | None = Field(None, description="Evaluation examples of the same shape as `train`; if absent, "
                                 "`split` of train is held out.")
    shape: Literal["auto", "messages", "prompt_completion", "alpaca", "text"] = Field(
        "auto", description="Data shape; 'auto' decides from the fields: messages, prompt+completion, "
                            "instruction+output (Alpaca), or text (continued pre-training).")
    messages_column: str = Field("messages", description="Field holding chat turns [{role, content}, ...].")
    prompt_column: str = Field("prompt", description="Field holding the prompt (shape prompt_completion).")
    completion_column: str = Field("completion", description="Field holding the completion to learn.")
    instruction_column: str = Field("instruction", description="Alpaca-style instruction field.")
    input_column: str = Field("input", description="Alpaca-style optional input field.")
    output_column: str = Field("output", description="Alpaca-style output field (learned).")
    text_column: str = Field("text", description="Field holding plain text (shape text).")
    max_length: int = Field(512, gt=1, le=131072, description="Tokens per example; longer examples are cut on "
                                                              "the right (reported).")
    packing: bool = Field(False, description="Pack several short training examples per row (position ids "
                                             "restart per example, so attention stays within an example).")


class TemplateOptions(TaskOptions):
    """``[task]`` options of every task that renders prompts and answers as supervised fine-tuning does."""

    chat_template: str = Field("auto", description="'auto': the tokenizer's chat template if it has one, else "
                                                   "plain prompt + completion; 'none': never; or a Jinja "
                                                   "template text.")
    chat_template_file: PathStr | None = Field(None, description="A .jinja file with the chat template "
                                                                 "(wins over chat_template).")
    system_prompt: str | None = Field(None, description="System message added to every conversation that has "
                                                        "none (chat template only).")


def apply_chat_template_options(tokenizer: Any, opts: Any) -> None:
    """``task.chat_template_file`` / ``task.chat_template`` on a tokenizer (as the ``causal-lm`` task does)."""
    if opts.chat_template_file:
        path = Path(opts.chat_template_file)
        if not path.is_file():
            raise RecipeError(f"task.chat_template_file: {path} not found.")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    elif opts.chat_template == "none":
        tokenizer.chat_template = None
    elif opts.chat_template != "auto":
        if "{{" not in opts.chat_template and "{%" not in opts.chat_template:
            raise RecipeError(f"task.chat_template: {opts.chat_template!r} is not 'auto', 'none' or a Jinja "
                              "template (with {{ ... }} / {% ... %}); for a file use task.chat_template_file.")
        tokenizer.chat_template = opts.chat_template


class GenerationOptions(TemplateOptions):
    """``[task]`` options every generation task shares: how prompts are rendered and how text is generated."""

    max_new_tokens: int = Field(128, gt=0, description="Generation: most new tokens per prompt.")
    temperature: float = Field(0.0, ge=0, description="Generation: 0 is greedy; > 0 samples.")
    top_p: float = Field(1.0, gt=0, le=1, description="Generation: nucleus sampling (temperature > 0).")
    top_k: int = Field(0, ge=0, description="Generation: top-k sampling, 0 = off (temperature > 0).")
    repetition_penalty: float = Field(1.0, gt=0, description="Generation: 1.0 = off.")
    seed: int | None = Field(None, description="Generation: seed for sampling (reproducible samples).")
    sample_prompts: int = Field(4, ge=0, description="Held-out prompts generated at every evaluation "
                                                     "(samples/step-N.jsonl); 0 = off.")
    sample_max_new_tokens: int = Field(64, gt=0, description="Most new tokens for those eval samples "
                                                             "(also before training, samples/step-00000000.jsonl).")


class CausalLMOptions(GenerationOptions):
    train_on: Literal["completion", "all"] = Field(
        "completion", description="'completion': loss on the answer tokens (and their end token) only; "
                                  "'all': on every token.")


class CausalLM(Task):
    name = "causal-lm"
    description = "Instruction / chat / text fine-tuning of a causal language model (completion-only loss)."
    task_options = CausalLMOptions
    data_options = GenerationData
    default_metric = "eval_loss"
    metric_names = ("perplexity",)
    pipeline_tag = "text-generation"
    library_name = "peft"
    prompt_learning = True  # answer_loss takes the PEFT model's own forward for prompt/prefix tuning
    quantizable = True  # load_model passes quantization_kwargs (model.quantize) to from_pretrained
    prediction_fields = {"pred_text": "the generated answer",
                         "pred_finish_reason": "why generation stopped: 'stop' (a stop token) or 'length' "
                                               "(task.max_new_tokens)",
                         "pred_new_tokens": "how many tokens were generated"}

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self._info: dict[str, Any] = {}
        self._model: Any = None
        self._report_rows: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])  # set by finalize_run
        self._eval_examples: list[Example] = []
        self.encoder: Encoder | None = None

    # -- data ----------------------------------------------------------
    def _read(self, path: str, key: str, shape: str | None) -> tuple[list[Example], str]:
        return self._examples(read_records(path, self.recipe.data.format, key), path, key, shape)

    def _read_dataset(self) -> tuple[list[Example], str, list[Example] | None, list[Example] | None]:
        """Train examples, their shape, eval examples (None: hold out) and test examples (None: none) from
        data.dataset (a Hub or local data set); rows are named ``name[split]: row N`` in messages."""
        data = self.recipe.data
        source = open_dataset(data, self.recipe.source.parent if self.recipe.source else None)
        self._info.update(source.info)
        train_split, eval_split = source.train_and_eval(data)

        def examples(part, key, shape):
            rows = [(f"{part.where}: row {i + 1}", clean_record(r))
                    for i, r in enumerate(part.frame().to_dict("records"))]
            return self._examples(rows, part.where, key, shape)

        train, shape = examples(train_split, "data.dataset_split", None)
        eval_ = examples(eval_split, "data.dataset_eval_split", shape)[0] if eval_split is not None else None
        test_split = source.test_split(data)
        test = examples(test_split, "data.dataset_test_split", shape)[0] if test_split is not None else None
        return train, shape, eval_, test

    def _examples(self, records: list[tuple[str, dict[str, Any]]], path: str, key: str,
                  shape: str | None) -> tuple[list[Example], str]:
        data = self.recipe.data
        columns = set().union(*(rec.keys() for _, rec in records))
        found = detect_shape(data, columns, path, key)
        if shape is not None and found != shape:
            raise DataError(f"{key}: {path} holds {found!r} data but data.train holds {shape!r}; give both "
                            "files the same shape (or set data.shape).")
        return normalise(records, data, found, key), found

    def prepare_data(self) -> DataSplits:
        data = self.recipe.data
        eval_ = test = None
        if data.dataset:
            train, shape, eval_, test = self._read_dataset()
        else:
            train, shape = self._read(data.train, "data.train", None)
        if data.test_split:  # held out first, so the test examples never depend on the eval settings
            train, test = self._hold_out(train, data.test_split, "data.test_split")
        if data.limit:
            import random

            train = random.Random(self.recipe.train.seed).sample(train, min(data.limit, len(train)))
        if eval_ is None and data.eval:
            eval_, _ = self._read(data.eval, "data.eval", shape)
        if eval_ is None:  # hold out data.split of train
            train, eval_ = self._hold_out(train, data.split, "data.split")
        self.state = {"shape": shape}
        if data.test:
            test = self.read_examples(data.test, "data.test")
        self._eval_examples = eval_
        self._info.update(shape=shape, train_examples=len(train), eval_examples=len(eval_))
        if test is not None:
            self._info["test_examples"] = len(test)
        return DataSplits(train=train, eval=eval_, info=self._info, test=test)

    def read_examples(self, path: Any, key: str) -> list[Example]:
        """Examples (data.test, ``finetune evaluate --input``) of the shape the run trained on."""
        return self._read(str(path), key, self.state["shape"])[0]

    def _hold_out(self, examples: list[Example], fraction: float, key: str) -> tuple[list[Example], list[Example]]:
        """``(kept, held_out)``: ``fraction`` of the examples, chosen by a shuffle seeded by train.seed."""
        import random

        order = list(range(len(examples)))
        random.Random(self.recipe.train.seed).shuffle(order)
        n_held = max(1, round(len(examples) * fraction))
        if n_held >= len(examples):
            other = "data.test" if key == "data.test_split" else "data.eval"
            raise DataError(f"{key}: holding out {fraction} of {len(examples)} examples leaves no training data; "
                            f"add examples or give {other}.")
        return [examples[i] for i in sorted(order[n_held:])], [examples[i] for i in sorted(order[:n_held])]

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        data = self.recipe.data
        encoded = encode_all(list(examples), self._encoder(processor), data.max_length)
        split = "train" if training else "eval"
        self._info[f"{split}_truncated"] = encoded.truncated
        if encoded.truncated or encoded.dropped:
            msg = (f"warning: {encoded.truncated} of {len(examples)} {split} examples are longer than "
                   f"data.max_length = {data.max_length} tokens and were cut on the right (their end token is lost)")
            if encoded.dropped:
                self._info[f"{split}_dropped"] = encoded.dropped
                msg += (f"; {encoded.dropped} had no answer token left and are left out (e.g. "
                        f"{encoded.dropped_where[0]})")
            print(msg + ". Raise data.max_length to keep them whole.", file=sys.stderr)
        if not encoded.items:
            raise DataError(f"data.max_length: all {len(examples)} {split} examples lose their whole answer when cut "
                            f"to {data.max_length} tokens (e.g. {encoded.dropped_where[0]}); raise data.max_length.")
        items = encoded.items
        if training and data.packing:
            self._check_packing_support()
            items = pack(items, data.max_length)
            self._info["train_packed_rows"] = len(items)
        return TokenDataset(items)

    def _encoder(self, processor: Any) -> Encoder:
        if self.encoder is None or self.encoder.tokenizer is not processor:
            self.encoder = Encoder(tokenizer=processor, use_template=bool(getattr(processor, "chat_template", None)),
                                   stop_ids=self._stop_ids(processor), system_prompt=self.recipe.task.system_prompt,
                                   train_on_all=getattr(self.recipe.task, "train_on", "completion") == "all")
        return self.encoder

    def _stop_ids(self, tokenizer: Any) -> list[int]:
        if tokenizer.eos_token_id is None:
            raise RecipeError("model.backbone: the tokenizer has no EOS token, so a fine-tuned model could not learn "
                              "to stop; use a backbone whose tokenizer defines eos_token.")
        ids = [tokenizer.eos_token_id]
        extra = getattr(getattr(self._model, "generation_config", None), "eos_token_id", None)
        for t in extra if isinstance(extra, list) else [extra]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
        return ids

    def collate_fn(self, processor: Any):
        pad_id = processor.pad_token_id

        def fn(items: list[dict[str, list[int]]]) -> dict[str, Any]:
            return collate(items, pad_id)

        return fn

    def example_lengths(self, dataset: Any) -> list[int] | None:
        # tokens per row (packed rows too): train.group_by_length batches similar lengths together
        return dataset.lengths() if hasattr(dataset, "lengths") else None

    def _check_packing_support(self) -> None:
        """Packing is only safe when the model builds its attention mask from restarting position ids."""
        import torch

        model = self._model
        if model is None:
            return
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                a, b = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])
                alone = model(input_ids=b, use_cache=False).logits
                both = model(input_ids=torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 0, 1]]),
                             use_cache=False).logits[:, 3:]
        finally:
            model.train(was_training)
        if not torch.allclose(alone, both, atol=1e-4):
            raise RecipeError(f"data.packing: this model ({type(model).__name__}) does not keep packed examples "
                              "apart (its attention ignores restarting position ids), so packing would let "
                              "examples attend to each other; set data.packing = false (train.group_by_length, "
                              "on by default, also saves most of the padding).")

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: Any) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"local_files_only": True, "trust_remote_code": backbone.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(backbone.path, **kwargs)
        dtype = "auto" if torch.cuda.is_available() else torch.float32
        # model.quantize: the frozen base in 4-/8-bit through bitsandbytes (QLoRA); {} when "none"
        load = {"dtype": dtype, **quantization_kwargs(self.recipe)}
        model = AutoModelForCausalLM.from_pretrained(backbone.path, **load, **kwargs)
        apply_chat_template_options(tokenizer, self.recipe.task)
        if tokenizer.pad_token is None:
            # Padding is masked out of the loss by position, never by token id, so reusing EOS is safe.
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self._model = model
        self.encoder = None
        self._stop_ids(tokenizer)  # fail early without an EOS token
        return model, tokenizer

    def lora_targets(self, model: Any) -> list[str]:
        return attention_projections(model)

    def peft_task_type(self) -> str:
        return "CAUSAL_LM"

    # -- training and evaluation ---------------------------------------
    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        return answer_loss(model, batch)

    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        return {"loss": answer_loss(model, batch)}

    def finalize_eval(self, metrics: dict[str, Any]) -> dict[str, Any]:
        if "eval_loss" in metrics:
            metrics["perplexity"] = _perplexity(metrics["eval_loss"])
        return metrics

    def after_evaluate(self, model: Any, processor: Any, run_path: Path, step: int,
                       metrics: dict[str, Any]) -> None:
        self.write_samples(model, processor, run_path, step)

    def write_samples(self, model: Any, processor: Any, run_path: Path, step: int) -> list[dict[str, Any]]:
        """Greedy answers to the first ``task.sample_prompts`` held-out prompts -> samples/step-N.jsonl."""
        from finetune_generation.generate import generate, generation_kwargs

        opts = self.recipe.task
        chosen = self._eval_examples[: opts.sample_prompts]
        if not chosen:
            return []
        encoder = self._encoder(processor)
        pairs = [prompt_and_reference(e) for e in chosen]
        kwargs = generation_kwargs(opts, encoder.stop_ids, processor.pad_token_id, opts.sample_max_new_tokens)
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)  # samples are greedy
        outs = generate(model, processor, [encoder.prompt_ids(p) for p, _ in pairs], kwargs)
        rows = [{"step": step, "prompt": _prompt_text(p), "reference": ref, "generation": g.text,
                 "exact": g.text.strip() == ref.strip(), "finish_reason": g.finish_reason}
                for (p, ref), g in zip(pairs, outs)]
        folder = Path(run_path) / SAMPLES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / f"step-{step:08d}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def finalize_run(self, run_path: Path, metrics: dict[str, Any]) -> None:
        """Add truncation counts and sample scores to ``metrics`` (the core writes metrics.json after
        this) and write samples/before_after.md."""
        metrics.setdefault("data", {}).update({k: v for k, v in self._info.items()
                                               if k.endswith(("_truncated", "_dropped", "_packed_rows", "shape"))})
        folder = Path(run_path) / SAMPLES_DIR
        before = _read_jsonl(folder / "step-00000000.jsonl")
        best_step = metrics.get("best", {}).get("step")
        after = _read_jsonl(folder / f"step-{best_step:08d}.jsonl") if isinstance(best_step, int) else []
        self._report_rows = (before, after)  # for report_samples, called after this
        if after:
            metrics["samples"] = {"best_step": best_step, "exact_after": sum(r["exact"] for r in after) / len(after)}
            if before:
                metrics["samples"]["exact_before"] = sum(r["exact"] for r in before) / len(before)
            lines = ["# Sample answers: base model (before) and fine-tuned (best checkpoint)", ""]
            for i, row in enumerate(after):
                lines += [f"## {i + 1}. {row['prompt']}", "", f"- reference: `{row['reference']}`"]
                if i < len(before):
                    lines.append(f"- before: `{before[i]['generation']}`")
                lines += [f"- after (step {best_step}): `{row['generation']}`", ""]
            _write_atomic(folder / "before_after.md", "\n".join(lines))
            print("\nsample answers (held-out prompts):")
            for i, row in enumerate(after[:3]):
                print(f"  prompt:    {_one_line(row['prompt'])}")
                if i < len(before):
                    print(f"  before:    {_one_line(before[i]['generation'])}")
                print(f"  after:     {_one_line(row['generation'])}")
                print(f"  reference: {_one_line(row['reference'])}")

    def report_samples(self, model: Any, processor: Any, examples: Any, run_path: Path,
                       limit: int) -> list[dict[str, Any]]:
        """The sample answers already generated at the best checkpoint (samples/step-N.jsonl), beside the
        untouched model's (step 0); nothing is generated again."""
        before, after = self._report_rows
        return [{"input": row["prompt"], "reference": row["reference"], "prediction": row["generation"],
                 "correct": bool(row["exact"]),
                 **({"before": before[i]["generation"]} if i < len(before) else {})}
                for i, row in enumerate(after[:limit])]

    # -- inference -----------------------------------------------------
    def predict_input_columns(self) -> list[str]:
        data, shape = self.recipe.data, self.state.get("shape", "prompt_completion")
        return {"messages": ["prompt"], "prompt_completion": [data.prompt_column],
                "alpaca": [data.instruction_column], "text": [data.text_column]}[shape]

    def read_predict_input(self, path: Path) -> list[dict[str, Any]]:
        """A prompts file: .txt (one prompt per line) or a table / JSONL with the prompt column (chat data
        may instead give a ``messages`` list ending with a user turn)."""
        column = self.predict_input_columns()[0]
        if path.suffix.lower() == ".txt":
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not lines:
                raise DataError(f"--input: {path} holds no prompts (one prompt per line).")
            return [{column: line} for line in lines]
        records = [rec for _, rec in read_records(str(path), "auto", "--input")]
        accepted = {column, self.recipe.data.messages_column}
        for i, rec in enumerate(records):
            if accepted & set(rec):
                continue
            where = f"{path}: record {i + 1}"
            if self.state.get("shape") == "messages":  # the prompt field's name is fixed; the list's is a key
                fields = ", ".join(map(repr, rec)) or "none"
                raise DataError(f"--input: {where} has neither a {column!r} field nor a "
                                f"{self.recipe.data.messages_column!r} list (fields: {fields}). Give one of them "
                                "(`--set data.messages_column=<field>` names the list's field), or a .txt file with "
                                "one prompt per line.")
            error = missing_input_column(where, column, list(rec), self.recipe.data)
            raise DataError(f"{error} A .txt file with one prompt per line works too.")
        return records

    def _record_example(self, record: dict[str, Any]) -> Example:
        data, shape = self.recipe.data, self.state.get("shape", "prompt_completion")
        messages = record.get(data.messages_column)
        if shape == "messages" and isinstance(messages, list):
            return Example(where="input", messages=messages)
        column = self.predict_input_columns()[0]
        text = str(record.get(column) or "")
        if shape == "text":
            return Example(where="input", text=text)
        if shape == "alpaca":
            extra = str(record.get(data.input_column) or "").strip()
            return Example(where="input", prompt=alpaca_user_prompt(text, extra),
                           plain_prompt=alpaca_plain_prompt(text, extra))
        return Example(where="input", prompt=text, plain_prompt=text)

    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        from finetune_generation.generate import default_stream, generate, generation_kwargs

        opts = self.recipe.task
        encoder = self._encoder(processor)
        prompts = [encoder.prompt_ids(self._record_example(r)) for r in records]
        kwargs = generation_kwargs(opts, encoder.stop_ids, processor.pad_token_id)
        if stream:  # one prompt at a time, its text shown as it is generated
            sink, column, outs = default_stream(), self.predict_input_columns()[0], []
            for record, prompt in zip(records, prompts):
                sink.write(f"\n>>> {_one_line(str(record.get(column, '')))}\n")
                outs += generate(model, processor, [prompt], kwargs, stream_to=sink, seed=opts.seed)
        else:
            outs = generate(model, processor, prompts, kwargs, batch_size=batch_size, seed=opts.seed)
        return [{**r, "pred_text": g.text, "pred_finish_reason": g.finish_reason, "pred_new_tokens": g.new_tokens}
                for r, g in zip(records, outs)]

    # -- export --------------------------------------------------------
    export_formats = ("gguf", "safetensors")

    def export_file(self, fmt: str, model: Any, processor: Any, folder: Path,
                    options: dict[str, Any]) -> dict[str, Any]:
        """``gguf``: the merged model for llama.cpp, read back and checked (finetune_generation.gguf_export);
        ``safetensors``: the default (save_pretrained: model + tokenizer)."""
        if fmt != "gguf":
            report = super().export_file(fmt, model, processor, folder, options)
            report["usage"] = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                               "model = AutoModelForCausalLM.from_pretrained('.')  # this folder\n"
                               "tokenizer = AutoTokenizer.from_pretrained('.')\n"
                               "messages = [{'role': 'user', 'content': 'What is 12 + 7?'}]\n"
                               "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                               "return_tensors='pt', return_dict=True)\n"
                               "out = model.generate(**ids, max_new_tokens=32)[0, ids['input_ids'].shape[1]:]\n"
                               "print(tokenizer.decode(out, skip_special_tokens=True))\n")
            return report
        from finetune_generation.gguf_export import export_gguf

        name = Path(str(self.recipe.output.dir)).name or "model"
        return export_gguf(model, processor, folder, options.get("quantize"), options.get("batch"), name)

    def generate_text(self, model: Any, processor: Any, prompt: str | list[dict[str, str]], *,
                      max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                      on_text: Any) -> dict[str, Any]:
        """``finetune serve``'s OpenAI-compatible endpoints: a prompt rendered as :meth:`predict` renders one
        (a string as the run's prompt column, messages through the chat template), streamed piece by piece."""
        from finetune_generation.generate import generate_streaming, generation_kwargs

        update = {k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None}
        opts = self.recipe.task.model_copy(update=update) if update else self.recipe.task
        encoder = self._encoder(processor)
        if isinstance(prompt, list):
            example = Example(where="request", messages=prompt)
        else:
            example = self._record_example({self.predict_input_columns()[0]: prompt})
        ids = encoder.prompt_ids(example)
        kwargs = generation_kwargs(opts, encoder.stop_ids, processor.pad_token_id, max_new_tokens=max_tokens)
        out = generate_streaming(model, processor, ids, kwargs, on_text, seed=opts.seed)
        return {"finish_reason": out.finish_reason, "prompt_tokens": len(ids), "completion_tokens": out.new_tokens}

    def usage_snippet(self, base: str) -> str:
        return (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
            "model = PeftModel.from_pretrained(base, 'adapter').eval()  # the run's adapter/ folder\n"
            "tokenizer = AutoTokenizer.from_pretrained('adapter')\n"
            "messages = [{'role': 'user', 'content': 'your prompt'}]\n"
            "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')\n"
            "out = model.generate(input_ids=ids, max_new_tokens=64)\n"
            "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))\n"
            + ("# prompt/prefix tuning: the virtual tokens need peft (there is no merged model)"
               if self.recipe.peft.method in ("prompt-tuning", "prefix-tuning") else
               "# or a merged standalone model: finetune merge RUN_DIR OUT_DIR"))


# Causal LMs whose logits are exactly ``lm_head(last hidden state)`` (no soft-capping or scaling after
# the head) and whose forward takes ``logits_to_keep``; tests check the loss is unchanged for them.
_PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2"}


def answer_loss(model: Any, batch: dict[str, Any]) -> Any:
    """The mean cross-entropy over the learned (label != -100) tokens of a batch.

    For models with a plain output head the vocabulary projection runs only on the positions that
    are learned: with the loss on answers only, most positions are prompt, and the head (49,152 x 576
    for SmolLM2) plus its softmax were ~20% of a training step spent on logits nobody reads. When the
    rows of a batch start with the same unlearned tokens (a system prompt, a chat header) and nothing
    random touches them, that prefix is computed once per batch instead of once per row (see
    ``shared_prefix_length``). Same loss and gradients as ``model(**batch).loss`` up to float rounding
    (tests check both); other models take that standard path.
    """
    # use_cache=False: no KV cache in training, and packed rows need it off for the packed-sequence mask
    head = _plain_head(model)
    if head is None or "labels" not in batch:
        return model(**batch, use_cache=False).loss
    prefix = shared_prefix_length(model, batch)
    if prefix:
        return shared_prefix_loss(model, batch, prefix, head)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return _learned_loss(head, out.hidden_states[-1][:, :-1], batch["labels"][:, 1:])


def _learned_loss(head: Any, hidden: Any, target: Any) -> Any:
    """Cross-entropy of ``head(hidden)`` against ``target`` at the learned positions only."""
    import torch.nn.functional as F

    learned = target != IGNORE
    return F.cross_entropy(head(hidden[learned]).float(), target[learned])


def shared_prefix_length(model: Any, batch: dict[str, Any]) -> int:
    """How many leading tokens every row of a right-padded batch shares and may compute once; 0 for none.

    The prefix is the longest run of tokens that are equal in every row, not padding, and predict no
    learned label. Sharing it is exact only when nothing random touches it, so it is 0 while any dropout
    of the model (LoRA's included) is active, for packed rows (their own position ids) and for
    attention implementations other than SDPA (the shared batch needs a custom boolean mask). It is also
    0 when the shared layout would cost more: the rows become one sequence whose attention is dense
    over all of its tokens, so a short prefix with long rows can lose more in attention than it saves
    in the linear layers (estimated from the model's size and the batch's shape).
    """
    ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
    rows, width = ids.shape
    if rows < 2 or mask is None or mask.dim() != 2 or "position_ids" in batch:
        return 0
    config = model.get_base_model().config
    if getattr(config, "_attn_implementation", None) != "sdpa" or _dropout_active(model):
        return 0
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and width > window:  # the custom mask would not apply the window
        return 0
    target = labels[:, 1:]
    same = (ids == ids[:1]).all(0) & (mask == 1).all(0)
    same[:-1] &= (target == IGNORE).all(0)
    prefix = int(same.int().cumprod(0).sum())
    prefix = min(prefix, int(mask.sum(1).min()) - 1)  # every row keeps at least one token of its own
    if prefix <= 0:
        return 0
    tokens = int(mask.sum()) - (rows - 1) * prefix
    per_token = 2 * _layer_parameters(model)  # multiply-adds of the linear layers, per token and layer
    hidden = config.hidden_size
    padded = rows * width * per_token + 4 * rows * width * width * hidden
    shared = tokens * per_token + 4 * tokens * tokens * hidden
    return prefix if shared < 0.9 * padded else 0


def shared_prefix_loss(model: Any, batch: dict[str, Any], prefix: int, head: Any) -> Any:
    """``answer_loss`` with the first ``prefix`` tokens of a right-padded batch computed once.

    The rows become one sequence: the prefix, then every row's remaining tokens without padding. Each
    token keeps its row's position id and attends (causally) to the prefix and to its own row only, so
    every learned token sees exactly the context it has in the batch; the prefix's keys and values are
    shared, and their gradients are summed over the rows by autograd.
    """
    import torch

    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    rows, width = ids.shape
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]
    keep, positions, allowed = shared_prefix_layout(mask, prefix)
    out = model(input_ids=ids[keep][None], attention_mask=allowed[None, None], position_ids=positions[None],
                use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return _learned_loss(head, out.hidden_states[-1][0], target[keep])


def shared_prefix_layout(mask: Any, prefix: int) -> tuple[Any, Any, Any]:
    """``(keep, positions, allowed)`` for the rows of a right-padded batch joined into one sequence: ``keep``
    [rows, width] marks the tokens kept (the first ``prefix`` tokens from the first row only, no padding),
    ``positions`` each kept token's position id in its row, ``allowed`` [n, n] the causal mask in which a
    token sees the shared prefix and its own row. Pass ``ids[keep][None]``, ``allowed[None, None]`` and
    ``positions[None]`` to the model."""
    import torch

    rows, width = mask.shape
    keep = mask.bool().clone()
    keep[1:, :prefix] = False  # the prefix once, from the first row
    positions = torch.arange(width, device=mask.device).expand(rows, width)[keep]
    segment = torch.arange(rows, device=mask.device)[:, None].expand(rows, width).clone()
    segment[:, :prefix] = -1
    segment = segment[keep]
    allowed = (positions[None, :] <= positions[:, None]) & (
        (segment[None, :] == segment[:, None]) | (segment[None, :] == -1))
    return keep, positions, allowed


def _dropout_active(model: Any) -> bool:
    import torch

    for module in model.modules():
        if not module.training:
            continue
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return True
        rate = getattr(module, "attention_dropout", 0)  # Llama-style attention takes a float rate
        if isinstance(rate, (int, float)) and rate > 0:
            return True
    return False


def _layer_parameters(model: Any) -> int:
    _, _, layers = transformer_layers(model)
    return sum(p.numel() for p in layers[0].parameters())


def _plain_head(model: Any) -> Any:
    import inspect

    if not hasattr(model, "get_base_model"):  # wrapped for DDP/FSDP (sharded parameters): the standard path
        return None
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):  # virtual tokens shift the positions: PEFT's forward
        return None
    base = model.get_base_model()
    if getattr(getattr(base, "config", None), "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None
    return base.get_output_embeddings()


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 80 else float("inf")


def _prompt_text(example: Example) -> str:
    if example.messages is not None:
        return next((m["content"] for m in reversed(example.messages) if m["role"] == "user"),
                    example.messages[-1]["content"])
    return example.text if example.text is not None else (example.prompt or "")


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["IGNORE", "CausalLM", "CausalLMOptions", "GenerationData", "GenerationOptions", "TemplateOptions",
           "apply_chat_template_options"]
