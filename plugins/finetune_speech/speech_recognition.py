"""``speech-recognition``: fine-tune Whisper (seq2seq; LoRA on the attention projections) on (audio, transcript).

Data: a manifest with path,text columns. Metrics: WER and CER on normalised text (lower case, punctuation
removed, whitespace collapsed). Baseline: the unadapted backbone's WER/CER on the same eval split, with
Whisper's native 30-s input.
Generation settings (``task.language``/``task.task`` for multilingual models, ``task.max_new_tokens``,
``task.num_beams``) live in ``[task]``.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from finetune import DataError, DataSplits, PathStr, RecipeError
from finetune_speech.audio import AudioData
from finetune_speech.common import SpeechOptions, SpeechTask, WaveDataset, model_type

PAD = -100


class SpeechRecognitionData(AudioData):
    train: PathStr | None = Field(
        None, description="A manifest (.csv/.tsv/.jsonl/.parquet) with `path_column` (audio files, relative to the "
        "manifest's folder) and `text_column` (the transcript); a folder is not enough, it has no transcripts. "
        "Or give `dataset`.")
    eval: PathStr | None = Field(None, description="Evaluation manifest with the same columns; if absent, `split` "
                                 "of train is held out.")
    text_column: str = Field("text", description="Manifest column holding the transcript.")


class SpeechRecognitionOptions(SpeechOptions):
    whisper_input: Literal["clip", "30s"] = Field(
        "30s", description="'30s' (default: as Whisper was trained, best zero-shot quality) or 'clip' "
                           "(truncate features to the clip: much faster, adapts with fine-tuning).")
    language: str | None = Field(None, description="Multilingual Whisper: spoken language (e.g. 'en', 'de').")
    task: Literal["transcribe", "translate"] = Field("transcribe", description="Multilingual Whisper: task token.")
    max_new_tokens: int = Field(64, gt=0, le=440, description="Longest transcript generated per clip (tokens).")
    num_beams: int = Field(1, gt=0, le=8, description="Beam search width at evaluation and prediction.")
    baseline: bool = Field(True, description="Also score the unadapted backbone (zero-shot) on the eval split.")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s']", " ", text)
    return " ".join(text.replace("'", "").split())


def edit_distance(a: list[Any], b: list[Any]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def error_rates(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus WER and CER on normalised text."""
    w_err = w_n = c_err = c_n = 0
    for h, r in zip(hyps, refs):
        h, r = normalize(h), normalize(r)
        w_err += edit_distance(h.split(), r.split())
        w_n += len(r.split())
        c_err += edit_distance(list(h), list(r))
        c_n += len(r)
    return {"wer": w_err / max(1, w_n), "cer": c_err / max(1, c_n)}


class SpeechRecognition(SpeechTask):
    name = "speech-recognition"
    description = "Transcribe speech: fine-tune Whisper (LoRA on attention projections); WER/CER."
    task_options = SpeechRecognitionOptions
    data_options = SpeechRecognitionData
    default_metric = "wer"
    metric_names = ("wer", "cer")
    pipeline_tag = "automatic-speech-recognition"
    prediction_fields = {"pred_text": "the transcript"}
    target_key = "data.text_column"

    def target_column(self) -> str:
        return self.recipe.data.text_column

    def check_targets(self, df: Any, key: str) -> None:
        empty = df.index[df["target"].map(lambda t: not str(t).strip())].tolist()
        if empty:
            raise DataError(f"{key}: {len(empty)} clip(s) have an empty transcript (data.text_column), e.g. "
                            f"{df['path'][empty[0]]}; fill or remove them.")

    def prepare_data(self) -> DataSplits:
        splits = self.read_splits(stratify=False)
        if self.recipe.data.test:
            splits.test = self.read_examples(Path(self.recipe.data.test), "data.test")
            splits.info["test_examples"] = len(splits.test)
        return splits

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: Any) -> tuple[Any, Any]:
        kind = model_type(backbone.path)
        if kind != "whisper":
            raise RecipeError(f"model.backbone: speech-recognition supports Whisper backbones; "
                              f"{backbone.name!r} is {kind or 'of unknown type'}.")
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from finetune_speech.models import allow_short_inputs

        self.state["backbone_type"] = kind
        self._backbone = backbone
        processor = WhisperProcessor.from_pretrained(backbone.path, local_files_only=True)
        model = allow_short_inputs(WhisperForConditionalGeneration.from_pretrained(backbone.path,
                                                                                   local_files_only=True))
        opts = self.recipe.task
        multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
        if opts.language and not multilingual:
            raise RecipeError(f"task.language = {opts.language!r}: {backbone.name!r} is an English-only model; "
                              "remove task.language (or use a multilingual Whisper).")
        prefix = {"language": opts.language, "task": opts.task} if multilingual else {}
        processor.tokenizer.set_prefix_tokens(predict_timestamps=False, **prefix)
        self._processor = processor
        self._start_id = int(model.config.decoder_start_token_id)
        self._max_target = int(model.config.max_target_positions) - 8
        self._gen_kwargs = {"max_new_tokens": opts.max_new_tokens, "num_beams": opts.num_beams, **prefix}
        return model, processor

    def lora_targets(self, model: Any) -> list[str]:
        return ["q_proj", "v_proj"]

    # -- data ----------------------------------------------------------
    def encode_text(self, processor: Any, texts: list[str], paths: list[str], key: str) -> list[list[int]]:
        tok = processor.tokenizer
        limit = self._max_label_tokens()
        out = []
        for text, path in zip(texts, paths):
            ids = tok(text).input_ids
            back = tok.decode(ids, skip_special_tokens=True)
            if normalize(back) != normalize(text):
                raise DataError(f"{key}: the transcript of {path} does not survive the tokenizer ({text!r} -> "
                                f"{back!r}); remove the characters it lacks.")
            if len(ids) > limit:
                raise DataError(f"{key}: the transcript of {path} is {len(ids)} tokens, over the model's limit "
                                f"of {limit}; shorten it or split the clip.")
            if ids and ids[0] == self._decoder_start:
                ids = ids[1:]  # the model prepends decoder_start_token_id itself
            out.append(ids)
        return out

    def _max_label_tokens(self) -> int:
        return int(getattr(self, "_max_target", 448))

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        paths = examples["path"].tolist()
        labels = self.encode_text(processor, examples["target"].tolist(), paths,
                                  "data.train" if training else "data.eval")
        return WaveDataset(self.decode_all(paths, self.sampling_rate(processor)), labels, paths)

    @property
    def _decoder_start(self) -> int:
        return int(getattr(self, "_start_id", 50257))

    def collate_fn(self, processor: Any):
        import torch

        def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
            batch = self.features(processor, [it["audio"] for it in items])
            batch.pop("attention_mask", None)  # Whisper's encoder does not mask
            width = max(len(it["target"]) for it in items)
            labels = torch.full((len(items), width), PAD, dtype=torch.long)
            for i, it in enumerate(items):
                labels[i, : len(it["target"])] = torch.tensor(it["target"], dtype=torch.long)
            batch["labels"] = labels
            return batch

        return collate

    # -- evaluation ----------------------------------------------------
    def _generate(self, model: Any, input_features: Any) -> Any:
        target = model
        while hasattr(target, "module"):  # DDP wrapper
            target = target.module
        return target.generate(input_features=input_features, **self._gen_kwargs)

    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:

        out = model(**batch)
        # Generated ids and labels differ in width from batch to batch: the core pads them (with -100, PAD).
        return {"loss": out.loss, "predictions": self._generate(model, batch["input_features"]),
                "references": batch["labels"]}

    def _decode(self, rows: Any) -> list[str]:
        tok = self._processor.tokenizer
        return [tok.decode([int(t) for t in row if t >= 0], skip_special_tokens=True).strip() for row in rows]

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        hyps, refs = self._decode(predictions), self._decode(references)
        metrics: dict[str, Any] = error_rates(hyps, refs)
        metrics["samples"] = [{"reference": r, "prediction": h} for h, r in list(zip(hyps, refs))[:10]]
        return metrics

    def baseline(self, splits: DataSplits) -> dict[str, Any] | None:
        if not self.recipe.task.baseline:
            return None
        import torch
        from transformers import WhisperForConditionalGeneration

        from finetune_speech.models import allow_short_inputs

        model = allow_short_inputs(WhisperForConditionalGeneration.from_pretrained(
            self._backbone.path, local_files_only=True)).eval()
        waves = self.decode_all(splits.eval["path"].tolist(), self.sampling_rate(self._processor))
        hyps = []
        with torch.no_grad():
            for start in range(0, len(waves), 16):
                # Whisper's native input (30 s) whatever task.whisper_input says: the strongest zero-shot
                feats = self.features(self._processor, waves[start:start + 16], "30s")["input_features"]
                ids = model.generate(input_features=feats, **self._gen_kwargs)
                hyps += self._processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        rates = error_rates(hyps, splits.eval["target"].tolist())
        return {"name": "unadapted backbone (zero-shot, 30-s input)", **rates}

    # -- inference -----------------------------------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        waves = self.predict_waves(records, self.sampling_rate(processor))
        device = next(model.parameters()).device
        rows = []
        for start in range(0, len(records), batch_size):
            feats = self.features(processor, waves[start:start + batch_size])["input_features"].to(device)
            ids = self._generate(model, feats)
            texts = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
            rows += [{**r, "pred_text": t.strip()} for r, t in zip(records[start:start + batch_size], texts)]
        return rows

    def usage_snippet(self, base: str) -> str:
        return ("import soundfile as sf\nfrom peft import PeftModel\n"
                "from transformers import WhisperForConditionalGeneration, WhisperProcessor\n\n"
                f"base = WhisperForConditionalGeneration.from_pretrained({base!r})\n"
                "model = PeftModel.from_pretrained(base, 'adapter').eval()  # the run's adapter/ folder\n"
                "processor = WhisperProcessor.from_pretrained('adapter')\n"
                "audio, rate = sf.read('clip.wav', dtype='float32')  # 16 kHz mono\n"
                "ids = model.generate(input_features=processor(audio, sampling_rate=16000, "
                "return_tensors='pt').input_features)\n"
                "print(processor.batch_decode(ids, skip_special_tokens=True)[0])")
