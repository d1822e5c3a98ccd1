"""``token-classification``: a tag per word (named entities, chunks) on any transformers encoder.

Data: JSON lines with a list of words and a list of tags per sentence, or CoNLL-style column files
(one word per line, its tag in the last column, a blank line between sentences, ``-DOCSTART-``
lines ignored). Tags in IOB2, IOB1, BIOES or IO are detected (or named by ``data.tag_scheme``)
and converted to IOB2. Only the first sub-token of a word is labelled; a sentence longer than
``data.max_length`` sub-tokens is cut into windows of whole words, so every word gets a
prediction. Metrics: entity-level precision, recall and F1 (micro, and per type) as
conlleval/seqeval count them, and word accuracy. Baseline: each word's most frequent training tag.
"""

from __future__ import annotations

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
    open_dataset,
    read_jsonl,
    split_frame,
)
from finetune_nlp.text_shared import pad_fields

SCHEMES = ("IOB2", "IOB1", "BIOES", "IO")
CONLL_SUFFIXES = (".conll", ".txt", ".iob", ".iob2", ".bio", ".conllu")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PREFIX_MODEL_TYPES = ("roberta", "gpt2", "longformer", "bart", "deberta", "mpnet", "camembert", "xlm-roberta")


class TokenClassificationData(DataOptions):
    train: PathStr | None = Field(None, description="Training sentences: a .jsonl file (one sentence per line, "
                                  "with `tokens_column` and `tags_column` lists) or a CoNLL-style column file "
                                  "(.conll, .txt, .iob: one word per line, its tag in the last column, a blank "
                                  "line between sentences, -DOCSTART- lines ignored); or give `dataset` (a data set "
                                  "with a words column and a tags column, e.g. conll2003 with tags_column = "
                                  "\"ner_tags\").")
    eval: PathStr | None = Field(None, description="Evaluation sentences in the same form; if absent, `split` of "
                                 "the training sentences is held out.")
    tokens_column: str = Field("tokens", description="JSON lines or data set: the field holding the list of words.")
    tags_column: str = Field("tags", description="JSON lines or data set: the field holding the list of tags (one "
                             "per word): tag strings, or a data set's ClassLabel ids (read as their names).")
    tag_scheme: Literal["auto", "IOB2", "IOB1", "BIOES", "IO"] = Field(
        "auto", description="Tag scheme of the data files; 'auto' detects it from the training tags. Tags are "
        "converted to IOB2 for training and prediction; an invalid sequence in a strict scheme (IOB2, BIOES) "
        "is an error naming the file and line.")
    max_length: int = Field(128, gt=2, le=8192, description="Sub-tokens per model input; longer sentences are "
                            "cut into windows of whole words (every word still gets a prediction).")


class TokenClassificationOptions(TaskOptions):
    baseline: bool = Field(True, description="Also score the most-frequent-tag-per-word baseline on the split.")


# -- tag schemes ---------------------------------------------------------------


def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '')."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not kind:
        raise ValueError(tag)
    return prefix, kind


def detect_scheme(sentences: list[list[str]]) -> str:
    """The tag scheme of IOB-style tag sequences: BIOES when E-/S- appear, IO without B-, IOB2 when a B-
    starts a chunk after O or another type, else IOB1 (B- only between two chunks of the same type)."""
    prefixes = {_split_tag(tag)[0] for tags in sentences for tag in tags}
    if prefixes & {"E", "S"}:
        return "BIOES"
    if "B" not in prefixes:
        return "IO"
    for tags in sentences:
        prev = ""
        for tag in tags:
            prefix, kind = _split_tag(tag)
            if prefix == "B" and prev != kind:
                return "IOB2"
            prev = kind
    return "IOB1"


def check_sequence(tags: list[str], scheme: str) -> tuple[int, str] | None:
    """The first invalid position of ``tags`` in ``scheme`` and why, or None."""
    open_kind = ""  # BIOES: the type of an unfinished B-/I- chunk; IOB2: the type of the previous tag
    for i, tag in enumerate(tags):
        prefix, kind = _split_tag(tag)
        if scheme == "IO" and prefix not in ("I", "O"):
            return i, f"{tag} in IO data (only I- and O)"
        if scheme == "IOB1" and prefix not in ("B", "I", "O"):
            return i, f"{tag} in IOB1 data (only B-, I- and O)"
        if scheme == "IOB2":
            if prefix not in ("B", "I", "O"):
                return i, f"{tag} in IOB2 data (only B-, I- and O)"
            if prefix == "I" and open_kind != kind:
                before = tags[i - 1] if i else "the sentence start"
                return i, f"{tag} after {before} (an I- tag must continue a B- or I- of its type)"
            open_kind = kind
        if scheme == "BIOES":
            before = tags[i - 1] if i else "the sentence start"
            if prefix in ("I", "E") and open_kind != kind:
                return i, f"{tag} after {before} ({prefix}- must continue a B- or I- of its type)"
            if prefix in ("O", "B", "S") and open_kind:
                return i, f"{tag} after {before} (a B-/I- chunk must end with E-)"
            open_kind = kind if prefix in ("B", "I") else ""
    if scheme == "BIOES" and open_kind:
        return len(tags) - 1, f"the sentence ends inside a chunk ({tags[-1]}; a chunk must end with E-)"
    return None


def to_iob2(tags: list[str], scheme: str) -> list[str]:
    """``tags`` (valid in ``scheme``) in IOB2: every chunk starts with B-, continues with I-."""
    out, prev_prefix, prev_kind = [], "O", ""
    for tag in tags:
        prefix, kind = _split_tag(tag)
        if prefix == "O":
            out.append("O")
        elif scheme == "BIOES":
            out.append(("B-" if prefix in ("B", "S") else "I-") + kind)
        elif scheme in ("IOB1", "IO"):
            starts = prefix == "B" or prev_prefix == "O" or prev_kind != kind
            out.append(("B-" if starts else "I-") + kind)
        else:
            out.append(tag)
        prev_prefix, prev_kind = prefix, kind
    return out


# -- metrics (conlleval / seqeval default mode) ----------------------------------


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def get_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """The chunks of one sentence as (type, first word, last word), as seqeval's default mode (and
    conlleval) finds them: an I- tag without a B- before it starts a chunk."""
    chunks, prev_tag, prev_type, begin = [], "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag = chunk[0]
        type_ = chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def _prf(correct: int, predicted: int, true: int) -> dict[str, float]:
    p = correct / predicted if predicted else 0.0
    r = correct / true if true else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def entity_metrics(references: list[list[str]], predictions: list[list[str]]) -> dict[str, Any]:
    """Entity-level micro precision/recall/F1, per-type reports (nested) and word accuracy."""
    true_set, pred_set = set(), set()
    correct_words = total_words = 0
    for n, (ref, pred) in enumerate(zip(references, predictions, strict=True)):
        if len(ref) != len(pred):
            raise ValueError(f"sentence {n}: {len(ref)} reference tags but {len(pred)} predicted")
        true_set.update((n, *e) for e in get_entities(ref))
        pred_set.update((n, *e) for e in get_entities(pred))
        correct_words += sum(r == p for r, p in zip(ref, pred))
        total_words += len(ref)
    correct = true_set & pred_set
    types = sorted({e[1] for e in true_set | pred_set})
    per_type = {}
    for kind in types:
        n_true = sum(e[1] == kind for e in true_set)
        per_type[kind] = {**_prf(sum(e[1] == kind for e in correct), sum(e[1] == kind for e in pred_set), n_true),
                          "support": n_true}
    return {**_prf(len(correct), len(pred_set), len(true_set)),
            "token_accuracy": correct_words / total_words if total_words else 0.0,
            "per_type": per_type}


# -- reading ---------------------------------------------------------------------


def _read_conll(path: Path, key: str, tagged: bool = True) -> list[dict[str, Any]]:
    """Sentences of a CoNLL column file; ``tagged=False`` (prediction input) also takes one-column lines
    (a word without a tag: its ``tags`` entry is None)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{key}: {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    sentences: list[dict[str, Any]] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []

    def flush():
        if tokens:
            sentences.append({"tokens": list(tokens), "tags": list(tags), "lines": list(lines)})
        tokens.clear()
        tags.clear()
        lines.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        columns = line.split()
        if not columns:
            flush()
            continue
        if columns[0] == "-DOCSTART-":
            flush()
            continue
        if len(columns) < 2 and tagged:
            raise DataError(f"{key}: {path}, line {number}: {line.strip()!r} has one column; a CoNLL file holds "
                            "a word and its tag (in the last column) per line, separated by spaces or tabs.")
        tokens.append(columns[0])
        tags.append(columns[-1] if len(columns) > 1 else None)
        lines.append(number)
    flush()
    return sentences


def _sentence(record: dict[str, Any], where: str, number: int, key: str, data: Any,
              unit: str = "line") -> dict[str, Any]:
    """One sentence of a JSON line or a data set row: its words and tags checked for shape."""
    values = {}
    for column, ckey in ((data.tokens_column, "data.tokens_column"), (data.tags_column, "data.tags_column")):
        if column not in record:
            raise DataError(f"{key}: {where}, {unit} {number}: no {column!r} field ({ckey}); the {unit} has "
                            f"{sorted(record)}. Rename the field or set {ckey}.")
        value = record[column]
        value = value.tolist() if hasattr(value, "tolist") else value  # a data set row holds numpy arrays
        if not isinstance(value, list) or any(isinstance(v, (list, dict)) or v is None for v in value):
            raise DataError(f"{key}: {where}, {unit} {number}: {column!r} ({ckey}) must be a list of strings, "
                            f"not {value!r:.80}.")
        values[column] = [str(v) for v in value]
    tokens, tags = values[data.tokens_column], values[data.tags_column]
    if len(tokens) != len(tags):
        raise DataError(f"{key}: {where}, {unit} {number}: {len(tokens)} tokens but {len(tags)} tags; give one "
                        "tag per token.")
    if not tokens:
        raise DataError(f"{key}: {where}, {unit} {number}: an empty sentence (no tokens); remove the {unit}.")
    return {"tokens": tokens, "tags": tags, "lines": [number] * len(tokens), "unit": unit}


def _read_jsonl(path: Path, key: str, data: Any) -> list[dict[str, Any]]:
    return [_sentence(record, str(path), number, key, data) for number, record in read_jsonl(path, key)]


def _read_split(split: Any, key: str, data: Any) -> list[dict[str, Any]]:
    """The sentences of a data set split (``finetune.open_dataset``): words and tags columns, tags as names (a
    ``ClassLabel`` tag column, as in conll2003's ``ner_tags``, is read as its tag names)."""
    split.require_columns({"data.tokens_column": data.tokens_column, "data.tags_column": data.tags_column})
    return [_sentence(record, split.where, number, key, data, unit="row")
            for number, record in enumerate(split.frame().to_dict("records"), start=1)]


def sentences_fingerprint(*columns: list[Any]) -> str:
    """A hash of lists of words (or tags) per sentence, sentence by sentence and in order
    (``finetune.frame_fingerprint`` of each sentence's JSON), so an edited, added, removed or reordered word,
    tag or sentence changes it."""
    import json

    import pandas as pd

    from finetune import frame_fingerprint

    frame = pd.DataFrame({f"c{i}": [json.dumps([str(v) for v in row]) for row in column]
                          for i, column in enumerate(columns)})
    return frame_fingerprint(frame, list(frame.columns))


def _where(path: Any, sentence: dict[str, Any], i: int = 0) -> str:
    return f"{path}, {sentence.get('unit', 'line')} {sentence['lines'][i]}"


# -- the task ----------------------------------------------------------------------


class TokenClassification(Task):
    name = "token-classification"
    description = "Tag every word (named entities, chunks) with a transformers encoder; entity-level F1."
    task_options = TokenClassificationOptions
    data_options = TokenClassificationData
    default_metric = "f1"
    metric_names = ("f1", "precision", "recall", "token_accuracy")
    pipeline_tag = "token-classification"
    library_name = "peft"
    prediction_fields = {"pred_tags": "the IOB2 tag of each word",
                         "pred_entities": "the entities found: a list of {text, type, start, end, score} "
                                          "(start/end: word indices, end exclusive; score: the mean "
                                          "probability of its words' tags)"}

    # -- data ----------------------------------------------------------
    def _read_raw(self, path: Path | str, key: str) -> list[dict[str, Any]]:
        """Sentences of a file, with the line of each word; shapes checked, tags not yet."""
        path = Path(path)
        fmt = self.recipe.data.format
        suffix = path.suffix.lower()
        if not path.is_file():
            raise DataError(f"{key}: {path} does not exist or is not a file.")
        if fmt == "jsonl" or (fmt == "auto" and suffix in JSONL_SUFFIXES):
            sentences = _read_jsonl(path, key, self.recipe.data)
        elif fmt == "auto" and suffix in CONLL_SUFFIXES:
            sentences = _read_conll(path, key)
        else:
            raise DataError(f"{key}: {path}: token-classification reads JSON lines ({', '.join(JSONL_SUFFIXES)}) "
                            f"or CoNLL column files ({', '.join(CONLL_SUFFIXES)}), not "
                            f"{fmt if fmt != 'auto' else repr(suffix or path.name)}.")
        if not sentences:
            raise DataError(f"{key}: {path} holds no sentences.")
        for sentence in sentences:
            for i, tag in enumerate(sentence["tags"]):
                try:
                    _split_tag(tag)
                except ValueError:
                    raise DataError(f"{key}: {_where(path, sentence, i)}: tag {tag!r} is not O or B-/I-/E-/S- "
                                    "followed by a type (e.g. B-PER).") from None
        return sentences

    def _to_frame(self, sentences: list[dict[str, Any]], path: Any, key: str, scheme: str) -> Any:
        """Check every sentence against ``scheme``, convert its tags to IOB2: a DataFrame."""
        import pandas as pd

        for sentence in sentences:
            bad = check_sequence(sentence["tags"], scheme)
            if bad is not None:
                i, why = bad
                hint = " (detected from the training tags; set data.tag_scheme if that is wrong)" \
                    if self.recipe.data.tag_scheme == "auto" else ""
                raise DataError(f"{key}: {_where(path, sentence, i)}: invalid {scheme} tag sequence{hint}: {why}.")
            sentence["tags"] = to_iob2(sentence["tags"], scheme)
            sentence["where"] = _where(path, sentence)
        return pd.DataFrame({"tokens": [s["tokens"] for s in sentences], "tags": [s["tags"] for s in sentences],
                             "where": [s["where"] for s in sentences]})

    def _check_types(self, df: Any, key: str, labels: list[str]) -> None:
        known = {tag.partition("-")[2] for tag in labels if tag != "O"}
        for tags, where in zip(df["tags"], df["where"]):
            for tag in tags:
                if tag != "O" and tag.partition("-")[2] not in known:
                    raise DataError(f"{key}: {where}: tag {tag!r} has an entity type that never appears in the "
                                    f"training data (training types: {sorted(known)}); add training sentences "
                                    "with it or remove it.")

    def read_examples(self, path: Path, key: str) -> Any:
        """Labelled sentences (data.test, ``finetune evaluate --input``) in the run's tag scheme, types known."""
        df = self._to_frame(self._read_raw(path, key), path, key, self.state["scheme"])
        self._check_types(df, key, self.state["labels"])
        return df

    def prepare_data(self) -> DataSplits:
        data = self.recipe.data
        if data.group_column:
            raise RecipeError("data.group_column: token-classification does not group sentences; remove it.")
        eval_split = test_split = None
        provenance: dict[str, Any] = {}
        if data.dataset:
            source = open_dataset(data, self.recipe.source.parent if self.recipe.source else None)
            train_split, eval_split = source.train_and_eval(data)
            test_split, provenance = source.test_split(data), source.info
            train_where, raw = train_split.where, _read_split(train_split, "data.dataset_split", data)
        else:
            train_where, raw = data.train, self._read_raw(data.train, "data.train")
        scheme = data.tag_scheme if data.tag_scheme != "auto" else detect_scheme([s["tags"] for s in raw])
        train = self._to_frame(raw, train_where, "data.dataset_split" if data.dataset else "data.train", scheme)
        seed = self.recipe.train.seed
        test = None
        if test_split is not None:
            test = self._to_frame(_read_split(test_split, "data.dataset_test_split", data), test_split.where,
                                  "data.dataset_test_split", scheme)
        if data.test_split:  # held out first, so the test sentences never depend on the eval settings
            train, test = split_frame(train, data.test_split, seed, key="data.test_split")
        if data.limit:
            train = train.sample(n=min(data.limit, len(train)), random_state=seed).reset_index(drop=True)
        if data.eval:
            eval_ = self._to_frame(self._read_raw(data.eval, "data.eval"), data.eval, "data.eval", scheme)
        elif eval_split is not None:
            eval_ = self._to_frame(_read_split(eval_split, "data.dataset_eval_split", data), eval_split.where,
                                   "data.dataset_eval_split", scheme)
        else:
            train, eval_ = split_frame(train, data.split, seed)
        kinds = sorted({tag[2:] for tags in train["tags"] for tag in tags if tag != "O"})
        if not kinds:
            raise DataError(f"data.train: {train_where}: every training tag is O; tag some entities.")
        labels = ["O"] + [f"{p}-{kind}" for kind in kinds for p in ("B", "I")]
        self.state = {"labels": labels, "scheme": scheme}
        self._check_types(eval_, "data.eval" if data.eval else "data.dataset_eval_split", labels)
        if data.test:
            test = self.read_examples(Path(data.test), "data.test")
        elif test is not None:
            self._check_types(test, "data.test_split" if data.test_split else "data.dataset_test_split", labels)
        counts = {kind: sum(tag == f"B-{kind}" for tags in train["tags"] for tag in tags) for kind in kinds}
        info = {"train_sentences": len(train), "eval_sentences": len(eval_),
                **({"test_sentences": len(test)} if test is not None else {}),
                "train_words": int(sum(len(t) for t in train["tokens"])), "tag_scheme": scheme,
                "entity_types": kinds, "train_entity_counts": counts, **provenance}
        return DataSplits(train=train, eval=eval_, info=info, test=test)

    # -- windows -------------------------------------------------------
    def _windows(self, sentences: list[list[str]], tokenizer: Any,
                 tags: list[list[str]] | None = None, first: int = 0) -> list[dict[str, Any]]:
        """Model inputs of at most data.max_length sub-tokens, each holding whole words: the first
        sub-token of a word carries its label (-100 elsewhere); ``sentence``/``word_start`` place it
        (``first``: the number of sentences before these, for error messages)."""
        label_ids = {label: i for i, label in enumerate(self.state["labels"])}
        max_length = self.recipe.data.max_length
        budget = max(1, max_length - tokenizer.num_special_tokens_to_add(pair=False))
        items = []
        for n, words in enumerate(sentences):
            words = list(words)
            counts = [0] * len(words)
            if words:
                enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
                for word in enc.word_ids():
                    if word is not None:
                        counts[word] += 1
            # a word the tokenizer drops entirely (e.g. a control character) is read as the unknown token
            words = [w if c else (tokenizer.unk_token or w) for w, c in zip(words, counts)]
            counts = [min(max(c, 1), budget) for c in counts]  # a word longer than a window keeps its start
            start = 0
            while True:
                end, used = start, 0
                while end < len(words) and used + counts[end] <= budget:
                    used += counts[end]
                    end += 1
                enc = tokenizer(words[start:end], is_split_into_words=True, truncation=True, max_length=max_length)
                labels, seen = [], set()
                for word in enc.word_ids():
                    if word is None or word in seen:
                        labels.append(-100)
                    else:
                        seen.add(word)
                        labels.append(label_ids[tags[n][start + word]] if tags is not None else 0)
                if len(seen) != end - start:
                    raise DataError(f"sentence {first + n + 1}: the tokenizer gave no sub-token for some of its words "
                                    f"{words[start:end]!r:.200}.")
                items.append({"input_ids": list(enc["input_ids"]), "attention_mask": list(enc["attention_mask"]),
                              "labels": labels, "sentence": n, "word_start": start})
                if end >= len(words):
                    break
                start = end
        return items

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        """The windows of ``examples``, tokenized once per (sentences and tags, tokenizer, max length, labels)
        fingerprint and kept in the token cache (finetune.cached_encode): the next run on the same data and a
        resumed run read them back instead of tokenizing (finetune_nlp.windows)."""
        from finetune import tokenizer_fingerprint
        from finetune_nlp.windows import cached_windows

        tokens, tags = list(examples["tokens"]), list(examples["tags"])
        key = {"kind": "finetune_nlp.token-classification-windows", "version": 1,
               "sentences": sentences_fingerprint(tokens, tags), "tokenizer": tokenizer_fingerprint(processor),
               "add_prefix_space": getattr(processor, "add_prefix_space", None),
               "max_length": self.recipe.data.max_length, "labels": list(self.state["labels"])}
        return cached_windows(
            key, len(tokens), lambda a, b: self._windows(tokens[a:b], processor, tags[a:b], first=a),
            token_fields={"input_ids": 1, "attention_mask": 1, "labels": 1}, window_fields=("word_start",),
            example_field="sentence",
            drop=("sentence", "word_start") if training else ())  # the loss needs no placement

    def example_lengths(self, dataset: Any) -> list[int]:
        if hasattr(dataset, "lengths"):
            return dataset.lengths()
        return [len(item["input_ids"]) for item in dataset]

    def collate_fn(self, processor: Any):
        pad_id = processor.pad_token_id if processor.pad_token_id is not None else 0

        def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
            batch = pad_fields(items, {"input_ids": pad_id, "attention_mask": 0, "labels": -100},
                               same=("sentence", "word_start"))
            return batch

        return collate

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: Any) -> tuple[Any, Any]:
        from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

        labels = self.state["labels"]
        kwargs = {"local_files_only": True, "trust_remote_code": backbone.trust_remote_code}
        config = AutoConfig.from_pretrained(backbone.path, **kwargs)
        extra = {"add_prefix_space": True} if config.model_type in _PREFIX_MODEL_TYPES else {}
        tokenizer = AutoTokenizer.from_pretrained(backbone.path, **kwargs, **extra)
        if not getattr(tokenizer, "is_fast", False):
            raise RecipeError(f"model.backbone: {backbone.name} has no fast tokenizer, which token-classification "
                              "needs to map sub-tokens to words.")
        model = AutoModelForTokenClassification.from_pretrained(
            backbone.path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True, **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer

    def lora_targets(self, model: Any) -> list[str]:
        return attention_projections(model)

    def modules_to_save(self, model: Any) -> list[str]:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        return [n for n in ("classifier", "score") if n in names]

    def peft_task_type(self) -> str:
        return "TOKEN_CLS"

    # -- evaluation ----------------------------------------------------
    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        inputs = {k: v for k, v in batch.items() if k not in ("sentence", "word_start")}
        return model(**inputs).loss

    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        inputs = {k: v for k, v in batch.items() if k not in ("sentence", "word_start")}
        out = model(**inputs)
        labels = inputs["labels"]
        predicted = out.logits.argmax(-1)
        predictions, references = [], []
        for row, (sentence, start) in enumerate(zip(batch["sentence"].tolist(), batch["word_start"].tolist())):
            mask = labels[row] != -100
            predictions.append((sentence, start, predicted[row][mask].tolist()))
            references.append((sentence, start, labels[row][mask].tolist()))
        return {"loss": out.loss, "predictions": predictions, "references": references}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        labels = self.state["labels"]

        def sentences(windows: list[Any]) -> dict[int, list[str]]:
            by_sentence: dict[int, list[tuple[int, list[int]]]] = {}
            for sentence, start, ids in windows:
                by_sentence.setdefault(int(sentence), []).append((int(start), list(ids)))
            return {n: [labels[i] for _, ids in sorted(parts) for i in ids] for n, parts in by_sentence.items()}

        pred, ref = sentences(predictions), sentences(references)
        order = sorted(ref)
        metrics = entity_metrics([ref[n] for n in order], [pred[n] for n in order])
        metrics["sentences"] = len(order)
        return metrics

    def baseline(self, splits: DataSplits) -> dict[str, Any] | None:
        if not self.recipe.task.baseline:
            return None
        from collections import Counter

        counts: dict[str, Counter] = {}
        for words, tags in zip(splits.train["tokens"], splits.train["tags"]):
            for word, tag in zip(words, tags):
                counts.setdefault(word, Counter())[tag] += 1
        best = {word: c.most_common(1)[0][0] for word, c in counts.items()}
        refs = [list(tags) for tags in splits.eval["tags"]]
        preds = [[best.get(word, "O") for word in words] for words in splits.eval["tokens"]]
        metrics = entity_metrics(refs, preds)
        return {"name": "most frequent training tag per word (O when unseen)",
                **{k: float(metrics[k]) for k in ("f1", "precision", "recall", "token_accuracy")}}

    # -- inference -----------------------------------------------------
    def predict_input_columns(self) -> list[str]:
        return [self.recipe.data.tokens_column]

    def read_predict_input(self, path: Path) -> list[dict[str, Any]]:
        """A CoNLL column file (a word per line, tags optional) or, as by default, a table file."""
        if Path(path).suffix.lower() not in CONLL_SUFFIXES:
            return super().read_predict_input(path)
        if not Path(path).is_file():
            raise DataError(f"--input: {path} does not exist or is not a file.")
        records = []
        for sentence in _read_conll(Path(path), "--input", tagged=False):
            record = {self.recipe.data.tokens_column: sentence["tokens"]}
            if all(tag is not None for tag in sentence["tags"]):  # gold tags are kept beside the predictions
                record[self.recipe.data.tags_column] = sentence["tags"]
            records.append(record)
        if not records:
            raise DataError(f"--input: {path} holds no sentences.")
        return records

    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        import torch

        column = self.recipe.data.tokens_column
        labels = self.state["labels"]
        sentences = []
        for record in records:
            value = record.get(column)
            if isinstance(value, str):
                words = value.split()
            elif isinstance(value, (list, tuple)) or hasattr(value, "tolist"):  # a list, or an array (parquet)
                words = [str(v) for v in list(value)]
            else:
                raise DataError(f"prediction input: {column!r} (data.tokens_column) must be a list of words or a "
                                f"string, not {value!r:.80}.")
            sentences.append(words)
        windows = self._windows(sentences, processor)
        collate = self.collate_fn(processor)
        device = next(model.parameters()).device
        tags: list[list[str]] = [[""] * len(words) for words in sentences]
        scores: list[list[float]] = [[0.0] * len(words) for words in sentences]
        for first in range(0, len(windows), batch_size):
            chunk = windows[first:first + batch_size]
            batch = collate(chunk)
            probs = torch.softmax(model(input_ids=batch["input_ids"].to(device),
                                        attention_mask=batch["attention_mask"].to(device)).logits.float(), -1).cpu()
            for row, item in enumerate(chunk):
                mask = batch["labels"][row] != -100
                best = probs[row][mask].max(-1)
                for offset, (p, i) in enumerate(zip(best.values.tolist(), best.indices.tolist())):
                    tags[item["sentence"]][item["word_start"] + offset] = labels[i]
                    scores[item["sentence"]][item["word_start"] + offset] = p
        rows = []
        for record, words, sentence_tags, sentence_scores in zip(records, sentences, tags, scores):
            entities = [{"text": " ".join(words[start:end + 1]), "type": kind, "start": start, "end": end + 1,
                         "score": sum(sentence_scores[start:end + 1]) / (end + 1 - start)}
                        for kind, start, end in get_entities(sentence_tags)]
            rows.append({**record, "pred_tags": sentence_tags, "pred_entities": entities})
        return rows

    def usage_snippet(self, base: str) -> str:
        labels = self.state.get("labels", [])
        return (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForTokenClassification, AutoTokenizer\n\n"
            f"labels = {labels!r}\n"
            f"base = AutoModelForTokenClassification.from_pretrained({base!r}, num_labels=len(labels))\n"
            "model = PeftModel.from_pretrained(base, 'adapter').eval()  # the run's adapter/ folder\n"
            "tokenizer = AutoTokenizer.from_pretrained('adapter')\n"
            "words = 'Ada Lovelace lived in London'.split()\n"
            "enc = tokenizer(words, is_split_into_words=True, return_tensors='pt')\n"
            "ids = model(**enc).logits.argmax(-1)[0].tolist()\n"
            "first = {}  # word -> its first sub-token, which carries the word's tag\n"
            "for position, word in enumerate(enc.word_ids()):\n"
            "    if word is not None:\n"
            "        first.setdefault(word, position)\n"
            "print([(w, labels[ids[first[i]]]) for i, w in enumerate(words)])")
