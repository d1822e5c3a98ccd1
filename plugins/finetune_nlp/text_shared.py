"""What the NLP plugin's encoder classification tasks share (``text-classification``,
``multi-label-classification``): a transformers encoder with a sequence-classification head, LoRA on its
attention, the frozen-prefix cache and the shortened last layer, batching by padding, reading tables
with errors naming file and line. Not a task of its own (never registered)."""

from __future__ import annotations

import sys
from typing import Any

from finetune import DataError, RecipeError, Task, attention_projections, open_dataset, split_frame
from finetune_nlp.prefix_cache import FrozenPrefixCache

HEAD_NAMES = ("classifier", "score", "pre_classifier", "pooler")
ENCODE_CHUNK_ROWS = 10_000  # rows tokenized at a time: at most one chunk is held as Python lists
BASELINE_MAX_ROWS = 50_000  # the TF-IDF baselines fit and score on a seeded sample of at most this many rows


class EncoderClassifier(Task):
    """Base of the encoder classification tasks: everything but data, labels, metrics and predictions.

    A subclass fills ``state["labels"]`` in ``prepare_data`` and may extend the head's configuration with
    :meth:`head_config`. Its recipe's task options need ``cache_frozen_layers`` and ``last_layer_cls_only``
    (``pooling`` is optional: finetune_nlp.mean_pooling); its data options ``text_column``,
    ``text_pair_column`` and ``max_length``."""

    # -- data ----------------------------------------------------------
    def check_texts(self, df: Any, key: str, where: str, locations: Any) -> Any:
        """No empty text, nor empty second text of a pair (naming rows via ``locations``); texts as strings."""
        data = self.recipe.data
        for column, ckey in ((data.text_column, "data.text_column"), (data.text_pair_column, "data.text_pair_column")):
            if column is not None:
                check_not_empty(df, column, ckey, key, where, locations)
                df[column] = df[column].astype(str)
        return df

    def encode(self, examples: Any, processor: Any) -> Any:
        """The token arrays of ``examples`` (``{field: per-example token lists}``), tokenized once per (texts,
        tokenizer, max length) fingerprint and cached on disk (finetune.cached_encode): the next run on the same
        data, and a resumed run, read them back memory-mapped instead of tokenizing."""
        from finetune import cached_encode, frame_fingerprint, tokenizer_fingerprint

        data = self.recipe.data
        columns = [data.text_column] + ([data.text_pair_column] if data.text_pair_column else [])
        key = {"kind": "finetune_nlp.encoder-texts", "texts": frame_fingerprint(examples, columns),
               "columns": columns, "tokenizer": tokenizer_fingerprint(processor), "max_length": data.max_length,
               "truncation": True}

        def chunks():
            for start in range(0, len(examples), ENCODE_CHUNK_ROWS):
                part = examples.iloc[start:start + ENCODE_CHUNK_ROWS]
                texts = part[data.text_column].astype(str).tolist()
                pairs = part[data.text_pair_column].astype(str).tolist() if data.text_pair_column else None
                yield dict(processor(texts, pairs, truncation=True, max_length=data.max_length))

        return cached_encode(key, len(examples), chunks)

    def example_ids(self, n: int, training: bool) -> list[int] | None:
        """Ids for the frozen-layer cache (None when it is off): 0..n-1 for training; each eval dataset (eval,
        then test) gets negative ids of its own, since the cache is keyed by id."""
        if not self.recipe.task.cache_frozen_layers:
            return None
        if training:
            return list(range(n))
        start = getattr(self, "_next_eval_id", -1)
        self._next_eval_id = start - n
        return [start - i for i in range(n)]

    def encode_records(self, processor: Any, records: list[dict[str, Any]], device: Any) -> Any:
        """A padded batch of tensors from raw prediction records, on ``device``."""
        data = self.recipe.data
        texts = [str(r[data.text_column]) for r in records]
        pairs = [str(r[data.text_pair_column]) for r in records] if data.text_pair_column else None
        return processor(texts, pairs, truncation=True, max_length=data.max_length, padding=True,
                         return_tensors="pt").to(device)

    def baseline_splits(self, splits: Any) -> Any:
        """``splits`` with train and eval cut to a seeded sample of ``BASELINE_MAX_ROWS`` rows each where they are
        longer (said on stderr): a TF-IDF baseline on a million rows would take longer than the fine-tuning."""
        import dataclasses

        cut = {}
        for name in ("train", "eval"):
            frame = getattr(splits, name)
            if len(frame) > BASELINE_MAX_ROWS:
                cut[name] = frame.sample(n=BASELINE_MAX_ROWS, random_state=self.recipe.train.seed)
                print(f"note: the baseline uses a sample of {BASELINE_MAX_ROWS:,} of the {len(frame):,} {name} rows "
                      "(task.baseline = false skips it)", file=sys.stderr)
        return dataclasses.replace(splits, **cut) if cut else splits

    def batched_logits(self, model: Any, processor: Any, records: list[dict[str, Any]], batch_size: int) -> Any:
        """The model's logits (float32, on the CPU) for ``records``, in their order. The texts are tokenized
        once, sorted by token length and batched in that order (so a batch pads its rows to a similar length,
        not to the longest text of the input), and the rows are put back in the input's order."""
        import torch

        if not records:
            return torch.empty(0)
        data = self.recipe.data
        texts = [str(r[data.text_column]) for r in records]
        pairs = [str(r[data.text_pair_column]) for r in records] if data.text_pair_column else None
        enc = processor(texts, pairs, truncation=True, max_length=data.max_length)
        order = sorted(range(len(records)), key=lambda i: len(enc["input_ids"][i]))
        device = next(model.parameters()).device
        fill = {"input_ids": processor.pad_token_id or 0, "token_type_ids": processor.pad_token_type_id}
        left = processor.padding_side == "left"
        parts = []
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(enc["input_ids"][i]) for i in rows)
            batch = {}
            for key in enc.keys():
                padded = []
                for i in rows:
                    values, pad = enc[key][i], [fill.get(key, 0)] * (width - len(enc[key][i]))
                    padded.append(pad + values if left else values + pad)
                batch[key] = torch.tensor(padded, device=device)
            parts.append(model(**batch).logits.float().cpu())
        logits = torch.cat(parts)
        restored = torch.empty_like(logits)
        restored[torch.tensor(order)] = logits
        return restored

    def baseline_texts(self, df: Any) -> list[str]:
        data = self.recipe.data
        if data.text_pair_column:
            return (df[data.text_column] + " [SEP] " + df[data.text_pair_column].astype(str)).tolist()
        return df[data.text_column].tolist()

    def example_lengths(self, dataset: Any) -> list[int]:
        ids = dataset.encodings["input_ids"]
        return ids.lengths() if hasattr(ids, "lengths") else [len(row) for row in ids]

    def collate_fn(self, processor: Any):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(processor, return_tensors="pt")

    def predict_input_columns(self) -> list[str]:
        data = self.recipe.data
        return [data.text_column] + ([data.text_pair_column] if data.text_pair_column else [])

    # -- model ---------------------------------------------------------
    def head_config(self) -> dict[str, Any]:
        """Keyword arguments of ``AutoModelForSequenceClassification.from_pretrained`` for the head."""
        labels = self.state["labels"]
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {label: i for i, label in enumerate(labels)}}

    def pooling_snippet(self) -> str:
        """Lines for the usage snippet after ``base = ...``: plain-torch hooks when ``task.pooling = "mean"``."""
        if getattr(self.recipe.task, "pooling", "cls") != "mean":
            return ""
        from finetune_nlp.mean_pooling import PLAIN_SNIPPET

        return PLAIN_SNIPPET

    def load_model(self, backbone: Any) -> tuple[Any, Any]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        kwargs = {"local_files_only": True, "trust_remote_code": backbone.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(backbone.path, **kwargs)
        model = AutoModelForSequenceClassification.from_pretrained(
            backbone.path, ignore_mismatched_sizes=True, **self.head_config(), **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
        if self.recipe.task.cache_frozen_layers:
            self._first_trainable = self._check_prefix_cache(model, tokenizer)
        mean = getattr(self.recipe.task, "pooling", "cls") == "mean"
        if mean and self.recipe.task.cache_frozen_layers:
            raise RecipeError("task.pooling = \"mean\" and task.cache_frozen_layers do not go together (the cache "
                              "runs the layers without the hooks that pool); turn one of them off.")
        if mean:
            from finetune_nlp.mean_pooling import add_mean_pooling

            add_mean_pooling(model)  # the head reads every token's output: the last layer stays whole
        self._last_layer_shortened = (self.recipe.task.last_layer_cls_only and not mean
                                      and self._shorten_last_layer(model, tokenizer))
        from finetune_nlp.bert_layers import explicit_attention

        explicit_attention(model)  # applies train.fast_dropout's dropout modules inside attention too
        return model, tokenizer

    def _shorten_last_layer(self, model: Any, tokenizer: Any) -> bool:
        """task.last_layer_cls_only (finetune_nlp.bert_layers), checked on a padded probe batch."""
        from finetune_nlp.bert_layers import last_layer, shorten_last_layer

        if last_layer(model) is None:
            return False  # not a BERT-style layer: nothing to shorten, nothing changes
        probe = tokenizer(["the last layer is checked on this probe text", "a short one"], padding=True,
                          truncation=True, max_length=self.recipe.data.max_length, return_tensors="pt")
        shortened, why = shorten_last_layer(model, lambda: model(**probe).logits)
        if not shortened:
            print(f"warning: task.last_layer_cls_only: {why}, so the last layer computes every token (slower, "
                  "same results); set it to false to silence this", file=sys.stderr)
        return shortened

    def _check_prefix_cache(self, model: Any, tokenizer: Any) -> int:
        """The lowest LoRA layer, after checking the cache can be exact (before the run folder exists)."""
        from finetune import resolve_layers

        peft = self.recipe.peft
        if peft.method != "lora" or peft.layers is None:
            raise RecipeError("task.cache_frozen_layers needs LoRA in the top layers only: set peft.method = "
                              "\"lora\" and peft.layers (e.g. [-2, -1]), or set task.cache_frozen_layers = false.")
        _, layers = resolve_layers(model, peft.layers)
        if layers[0] == 0:
            raise RecipeError(f"task.cache_frozen_layers: peft.layers {peft.layers} includes layer 0, so no layer "
                              "is frozen below LoRA; use the top layers (e.g. [-2, -1]) or turn the cache off.")
        if getattr(tokenizer, "padding_side", "right") != "right":
            raise RecipeError("task.cache_frozen_layers needs a tokenizer that pads on the right; turn the cache off.")
        return layers[0]

    def speed_notes(self) -> list[str]:
        notes = []
        if getattr(self, "_last_layer_shortened", False):
            notes.append("task.last_layer_cls_only: the last layer computes only the first token, the one the "
                         "classifier reads: faster; results equal within rounding, except that dropout there draws "
                         "other random values (set it to false to compute every token)")
        if self.recipe.task.cache_frozen_layers:
            notes.append("task.cache_frozen_layers: the frozen layers below peft.layers run once per example and "
                         "their output is reused every epoch, with no dropout there: much faster; results differ "
                         "slightly from training without the cache (set it to false to run every layer every time)")
        return notes

    def _prefix(self, model: Any) -> FrozenPrefixCache | None:
        if not self.recipe.task.cache_frozen_layers:
            return None
        cache = getattr(self, "_prefix_cache", None)
        if cache is None:
            first = getattr(self, "_first_trainable", None)
            if first is None:
                from finetune import resolve_layers

                first = resolve_layers(model, self.recipe.peft.layers)[1][0]
            cache = self._prefix_cache = FrozenPrefixCache(model, first)
        return cache

    def forward(self, model: Any, batch: dict[str, Any]) -> Any:
        """``model(**batch)``, through the frozen-prefix cache when it is on."""
        cache = self._prefix(model)
        return cache.forward(model, batch) if cache is not None else model(**batch)

    def train_mode(self, model: Any) -> None:
        cache = self._prefix(model)
        if cache is None:
            model.train()
        else:
            cache.train_mode(model)

    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        return self.forward(model, batch).loss

    def lora_targets(self, model: Any) -> list[str]:
        return attention_projections(model)

    def modules_to_save(self, model: Any) -> list[str]:
        # The head, and the pooler in front of it: all-MiniLM-L6-v2 was trained with mean pooling, so its
        # CLS pooler is effectively untrained and must learn too.
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        return [n for n in HEAD_NAMES if n in names]

    def peft_task_type(self) -> str:
        return "SEQ_CLS"

    # -- export --------------------------------------------------------
    export_formats = ("onnx", "safetensors")

    def export_graph(self, model: Any, processor: Any, batch: dict[str, Any]) -> Any:
        """The tokenizer's tensors (input_ids, attention_mask, token_type_ids where the model takes them) ->
        logits; batch and sequence axes dynamic. Mean pooling (task.pooling) is in the graph: its hooks are
        part of the model's forward."""
        from finetune import named_inputs_graph

        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batch]
        data = self.recipe.data
        pair = ", ['its pair']" if data.text_pair_column else ""
        usage = ("import numpy as np\nimport onnxruntime as ort\nfrom transformers import AutoTokenizer\n\n"
                 "tokenizer = AutoTokenizer.from_pretrained('.')  # this folder\n"
                 "session = ort.InferenceSession('model.onnx')\n"
                 f"enc = tokenizer(['some text']{pair}, truncation=True, max_length={data.max_length}, padding=True,"
                 " return_tensors='np')\n"
                 "inputs = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}\n"
                 "logits = session.run(None, inputs)[0]\n" + self.export_decision())
        return named_inputs_graph(model, batch, names, dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
                                  usage=usage)

    def export_decision(self) -> str:
        """The card's last lines: from ``logits`` (numpy, [batch, outputs]) to the answer."""
        return f"labels = {self.state.get('labels', [])!r}\nprint(labels[int(logits[0].argmax())])\n"



class EncodedDataset:
    """Tokenizer output + one label (or label vector) per example, and its id for the frozen-prefix cache."""

    def __init__(self, encodings: Any, labels: list[Any], ids: list[int] | None = None) -> None:
        self.encodings = encodings
        self.labels = labels
        self.ids = ids

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        if self.ids is not None:
            item[FrozenPrefixCache.ID_KEY] = self.ids[i]
        return item


def check_not_empty(df: Any, column: str, ckey: str, key: str, where: str, locations: Any) -> None:
    """DataError naming up to five rows whose ``column`` is missing or blank."""
    values = df[column]
    empty = values.isna() | values.map(lambda v: isinstance(v, str) and not v.strip())
    bad = [i for i, is_empty in enumerate(empty.tolist()) if is_empty]  # positions, not index labels
    if bad:
        raise DataError(f"{key}: {where}: {len(bad)} row(s) have an empty {ckey} ({column!r}), e.g. on "
                        f"{locations(bad[:5])}; fill or remove them.")


def row_locations(path: str, fmt: str, positions: list[int]) -> str:
    """'line(s) 3, 7' for text formats (csv/tsv: after the header line), else 'row(s) 1, 5' (1-based)."""
    suffix = str(path).lower().rsplit(".", 1)[-1]
    kind = fmt if fmt != "auto" else {"ndjson": "jsonl", "pq": "parquet"}.get(suffix, suffix)
    if kind in ("csv", "tsv"):
        return "line(s) " + ", ".join(str(i + 2) for i in positions)  # +2: header line, 1-based
    if kind == "jsonl":
        return "line(s) " + ", ".join(str(i + 1) for i in positions)
    return "row(s) " + ", ".join(str(i + 1) for i in positions)


def is_integer(label: str) -> bool:
    return label.lstrip("-").isdigit()


def table_splits(task: Task, read_file: Any, read_split: Any) -> tuple[Any, Any, Any, str, dict[str, Any]]:
    """``(train, eval, test, train_where, provenance)`` tables per the recipe's ``[data]`` keys, the way every
    table task reads them: ``dataset`` (its train / eval / test splits) or ``train``; then ``test_split``
    held out first (so the test rows never depend on the eval settings), ``limit``, ``eval`` (a file) or
    ``split`` held out of train. ``read_file(path, key)`` reads a file, ``read_split(split, key)`` a data-set
    split (a :class:`finetune.DatasetSplit`); eval is never None, test is None unless a split gives one
    (``data.test``, a file, is the caller's: ``read_examples``)."""
    recipe = task.recipe
    data, seed = recipe.data, recipe.train.seed
    eval_ = test = None
    provenance: dict[str, Any] = {}
    if data.dataset:
        source = open_dataset(data, recipe.source.parent if recipe.source else None)
        train_split, eval_split = source.train_and_eval(data)
        test_split, provenance = source.test_split(data), source.info
        train_where, train = train_split.where, read_split(train_split, "data.dataset_split")
        if eval_split is not None:
            eval_ = read_split(eval_split, "data.dataset_eval_split")
        if test_split is not None:
            test = read_split(test_split, "data.dataset_test_split")
    else:
        train_where, train = str(data.train), read_file(data.train, "data.train")
    if data.test_split:
        train, test = split_frame(train, data.test_split, seed, group=data.group_column, key="data.test_split")
    if data.limit:
        train = train.sample(n=min(data.limit, len(train)), random_state=seed).reset_index(drop=True)
    if data.eval:
        eval_ = read_file(data.eval, "data.eval")
    elif eval_ is None:
        train, eval_ = split_frame(train, data.split, seed, group=data.group_column)
    return train, eval_, test, train_where, provenance


def pad_fields(items: list[dict[str, Any]], pads: dict[str, Any], same: tuple[str, ...] = ()) -> dict[str, Any]:
    """A batch of token-level items: each field in ``pads`` (present in the items) right-padded with its
    value to the longest ``input_ids``; the fields in ``same`` (one value per item) stacked as they are."""
    import torch

    width = max(len(item["input_ids"]) for item in items)
    batch = {name: torch.tensor([list(i[name]) + [value] * (width - len(i[name])) for i in items])
             for name, value in pads.items() if name in items[0]}
    batch.update({name: torch.tensor([i[name] for i in items]) for name in same if name in items[0]})
    return batch


def label_counts(splits: Any, column: str, labels: list[str]) -> dict[str, dict[str, int]]:
    """``{split: {label: rows}}`` of a classification task's tables, labels in training order (the run report)."""
    counts = {}
    for name, df in (("train", splits.train), ("eval", splits.eval), ("test", splits.test)):
        if df is not None:
            found = df[column].value_counts().to_dict()
            counts[name] = {label: int(found.get(label, 0)) for label in labels}
    return counts


def mistakes_first(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` report samples, up to half of them wrong ones, in their original order."""
    wrong = [i for i, r in enumerate(rows) if r.get("correct") is False][: limit // 2]
    right = [i for i, r in enumerate(rows) if i not in set(wrong)][: limit - len(wrong)]
    return [rows[i] for i in sorted(wrong + right)]
