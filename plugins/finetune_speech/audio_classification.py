"""``audio-classification``: label clips (keywords, speakers, emotions, sounds) with LoRA on an audio encoder.

Backbones: Whisper (its encoder, clip-length inputs, see :mod:`finetune_speech.models`) or any
``AutoModelForAudioClassification`` model (wav2vec2, HuBERT, ...). Data: a folder with one subfolder per
class, or a manifest with path,label columns. Metrics: accuracy, macro-F1, per-class report. Baseline:
log-mel statistics + logistic regression on the same split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from finetune import DataError, DataSplits, PathStr, attention_projections
from finetune_speech.audio import AudioData
from finetune_speech.common import SpeechOptions, SpeechTask, WaveDataset, model_type


class AudioClassificationData(AudioData):
    train: PathStr | None = Field(
        None, description="A folder of audio clips with one subfolder per class (the subfolder names are the "
        "labels), or a manifest (.csv/.tsv/.jsonl/.parquet) with `path_column` and `label_column`, its paths "
        "relative to its folder. Or give `dataset`.")
    eval: PathStr | None = Field(None, description="Evaluation clips: a class-subfolder folder or a manifest, as "
                                 "`train`; if absent, `split` of train is held out (each label keeps its share).")
    label_column: str = Field("label", description="Manifest column holding the label.")


class AudioClassificationOptions(SpeechOptions):
    baseline: bool = Field(True, description="Also score a log-mel + logistic regression baseline on the split.")


class AudioClassification(SpeechTask):
    name = "audio-classification"
    description = "Classify audio clips (keywords, speakers, emotions, sounds) with Whisper or wav2vec2-style encoders."
    task_options = AudioClassificationOptions
    data_options = AudioClassificationData
    default_metric = "accuracy"
    metric_names = ("accuracy", "macro_f1")
    pipeline_tag = "audio-classification"
    prediction_fields = {"pred_label": "the most likely label", "pred_score": "its probability"}

    def target_column(self) -> str:
        return self.recipe.data.label_column

    def check_targets(self, df: Any, key: str) -> None:
        empty = df.index[df["target"].map(lambda t: not str(t).strip())].tolist()
        if empty:
            raise DataError(f"{key}: {len(empty)} clip(s) have an empty data.label_column, "
                            f"e.g. {df['path'][empty[0]]}.")

    def prepare_data(self) -> DataSplits:
        splits = self.read_splits(stratify=True)
        labels = sorted(splits.train["target"].unique())
        if len(labels) < 2:
            raise DataError(f"data.train: only one class ({labels[0]!r}) in the training clips; classification "
                            "needs at least two.")
        unseen = sorted(set(splits.eval["target"]) - set(labels))
        if unseen:
            raise DataError(f"data.eval: labels {unseen} appear in the eval clips but never in training; add "
                            "training clips for them or drop those clips.")
        self.state = {"labels": labels}
        data = self.recipe.data
        if data.test:
            splits.test = self.read_examples(Path(data.test), "data.test")
            splits.info["test_examples"] = len(splits.test)
        elif splits.test is not None:
            self.check_known_targets(splits.test, "data.test_split" if data.test_split else "data.dataset_test_split")
        counts = splits.train["target"].value_counts().to_dict()
        splits.info["labels"] = labels
        splits.info["train_label_counts"] = {k: int(counts[k]) for k in labels}
        return splits

    def check_known_targets(self, df: Any, key: str) -> None:
        unseen = sorted(set(df["target"]) - set(self.state["labels"]))
        if unseen:
            raise DataError(f"{key}: labels {unseen} appear in its clips but never in training (training labels: "
                            f"{self.state['labels']}); add training clips for them or drop those clips.")

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        ids = {label: i for i, label in enumerate(self.state["labels"])}
        paths = examples["path"].tolist()
        return WaveDataset(self.decode_all(paths, self.sampling_rate(processor)),
                           [ids[t] for t in examples["target"]], paths)

    def collate_fn(self, processor: Any):
        import torch

        def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
            batch = self.features(processor, [it["audio"] for it in items])
            batch["labels"] = torch.tensor([it["target"] for it in items], dtype=torch.long)
            return batch

        return collate

    # -- model ---------------------------------------------------------
    def load_model(self, backbone: Any) -> tuple[Any, Any]:
        from transformers import AutoFeatureExtractor

        labels = self.state["labels"]
        kind = model_type(backbone.path)
        self.state["backbone_type"] = kind
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {label: i for i, label in enumerate(labels)}, "local_files_only": True,
                  "trust_remote_code": backbone.trust_remote_code}
        if kind == "whisper":
            from transformers import WhisperFeatureExtractor

            from finetune_speech.models import WhisperClipClassifier

            model = WhisperClipClassifier.from_pretrained(backbone.path, **kwargs)
            processor = WhisperFeatureExtractor.from_pretrained(backbone.path, local_files_only=True)
        else:
            from transformers import AutoModelForAudioClassification

            try:
                model = AutoModelForAudioClassification.from_pretrained(backbone.path, ignore_mismatched_sizes=True,
                                                                        **kwargs)
            except ValueError as exc:
                raise DataError(f"model.backbone: {backbone.name!r} ({kind or 'unknown type'}) has no audio-"
                                f"classification head in transformers: {exc}") from None
            processor = AutoFeatureExtractor.from_pretrained(backbone.path, local_files_only=True)
        return model, processor

    def lora_targets(self, model: Any) -> list[str]:
        return attention_projections(model)

    def modules_to_save(self, model: Any) -> list[str]:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        return [n for n in ("projector", "classifier") if n in names]

    # -- evaluation ----------------------------------------------------
    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        out = model(**batch)
        return {"loss": out.loss, "predictions": out.logits.argmax(-1), "references": batch["labels"]}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

        labels = self.state["labels"]
        ids = list(range(len(labels)))
        p, r, f, s = precision_recall_fscore_support(references, predictions, labels=ids, zero_division=0)
        return {"accuracy": float(accuracy_score(references, predictions)),
                "macro_f1": float(f1_score(references, predictions, labels=ids, average="macro", zero_division=0)),
                "per_class": {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                          "support": int(s[i])} for i in ids}}

    def baseline(self, splits: DataSplits) -> dict[str, Any] | None:
        if not self.recipe.task.baseline:
            return None
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, f1_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from finetune_speech.baseline import logmel_features

        seconds = self.max_seconds()
        x_train = logmel_features(splits.train["path"].tolist(), seconds)
        x_eval = logmel_features(splits.eval["path"].tolist(), seconds)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
        clf.fit(x_train, splits.train["target"])
        pred = clf.predict(x_eval)
        ref = splits.eval["target"]
        return {"name": "log-mel statistics + logistic regression", "accuracy": float(accuracy_score(ref, pred)),
                "macro_f1": float(f1_score(ref, pred, average="macro"))}

    # -- inference -----------------------------------------------------
    def predict(self, model: Any, processor: Any, records: list[dict[str, Any]],
                batch_size: int = 32, stream: bool = False) -> list[dict[str, Any]]:
        import torch

        labels = self.state["labels"]
        waves = self.predict_waves(records, self.sampling_rate(processor))
        device = next(model.parameters()).device
        rows = []
        for start in range(0, len(records), batch_size):
            batch = {k: v.to(device) for k, v in self.features(processor, waves[start:start + batch_size]).items()}
            probs = torch.softmax(model(**batch).logits.float(), dim=-1).cpu()
            for record, p in zip(records[start:start + batch_size], probs):
                best = int(p.argmax())
                rows.append({**record, "pred_label": labels[best], "pred_score": round(float(p[best]), 4)})
        return rows

    # -- export --------------------------------------------------------
    export_formats = ("onnx", "safetensors")

    def export_graph(self, model: Any, processor: Any, batch: dict[str, Any]) -> Any:
        """The feature extractor's tensors -> logits: Whisper's log-mel ``input_features`` [batch, mels, frames]
        (clip length: the frame axis is dynamic; task.whisper_input = "30s": always 3000 frames) or a wav2vec2-
        style ``input_values`` [batch, samples], each with its ``attention_mask``."""
        from finetune import named_inputs_graph

        names = [n for n in ("input_features", "input_values", "attention_mask") if n in batch]
        whisper = "input_features" in batch
        clip = not whisper or self.recipe.task.whisper_input == "clip"
        length = "frames" if whisper else "samples"
        axes = {n: ({0: "batch", (2 if n == "input_features" else 1): length} if clip else {0: "batch"})
                for n in names}
        labels = self.state.get("labels", [])
        extract = ("x = fe(audio, sampling_rate=16000, padding='longest', return_attention_mask=True, "
                   "return_tensors='np')\n# Whisper's encoder halves the frames: keep their count even\n"
                   "if x['input_features'].shape[-1] % 2:\n"
                   "    x['input_features'] = np.pad(x['input_features'], ((0, 0), (0, 0), (0, 1)), "
                   "constant_values=x['input_features'].min())\n"
                   "    x['attention_mask'] = np.pad(x['attention_mask'], ((0, 0), (0, 1)))\n"
                   if whisper and clip else
                   "x = fe(audio, sampling_rate=16000, return_attention_mask=True, return_tensors='np'"
                   + (", padding='max_length'" if whisper else "") + ")\n")
        usage = ("import numpy as np\nimport onnxruntime as ort\nimport soundfile as sf\n"
                 "from transformers import AutoFeatureExtractor\n\n"
                 "fe = AutoFeatureExtractor.from_pretrained('.')  # this folder\n"
                 "session = ort.InferenceSession('model.onnx')\n"
                 "audio, rate = sf.read('clip.wav', dtype='float32')  # 16 kHz mono\n" + extract
                 + "inputs = {i.name: x[i.name].astype(np.int64 if i.name == 'attention_mask' else np.float32)\n"
                 "          for i in session.get_inputs()}\n"
                 f"labels = {labels!r}\n"
                 "print(labels[int(session.run(None, inputs)[0][0].argmax())])\n")
        return named_inputs_graph(model, batch, names, dynamic_axes=axes, usage=usage)

    def usage_snippet(self, base: str) -> str:
        labels = self.state.get("labels", [])
        if self.state.get("backbone_type") == "whisper":
            return ("import soundfile as sf\nfrom peft import PeftModel\n"
                    "from transformers import WhisperFeatureExtractor\n"
                    "from finetune_speech.models import WhisperClipClassifier  # clip-length Whisper encoder\n\n"
                    f"labels = {labels!r}\n"
                    f"base = WhisperClipClassifier.from_pretrained({base!r}, num_labels=len(labels))\n"
                    "model = PeftModel.from_pretrained(base, 'adapter').eval()  # the run's adapter/ folder\n"
                    "fe = WhisperFeatureExtractor.from_pretrained('adapter')\n"
                    "audio, rate = sf.read('clip.wav', dtype='float32')  # 16 kHz mono\n"
                    "x = fe(audio, sampling_rate=16000, padding='longest', return_attention_mask=True,\n"
                    "       return_tensors='pt')\n"
                    "print(labels[model(**x).logits.argmax(-1).item()])")
        return ("import soundfile as sf\nfrom peft import PeftModel\n"
                "from transformers import AutoFeatureExtractor, AutoModelForAudioClassification\n\n"
                f"labels = {labels!r}\n"
                f"base = AutoModelForAudioClassification.from_pretrained({base!r}, num_labels=len(labels))\n"
                "model = PeftModel.from_pretrained(base, 'adapter').eval()\n"
                "fe = AutoFeatureExtractor.from_pretrained('adapter')\n"
                "audio, rate = sf.read('clip.wav', dtype='float32')\n"
                "print(labels[model(**fe(audio, sampling_rate=rate, return_tensors='pt')).logits.argmax(-1).item()])")
