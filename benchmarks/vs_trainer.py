"""Vision, speech, generation and segmentation quickstarts: `finetune run` vs a plain Hugging Face Trainer +
PEFT script (a plain torch loop for segmentation).

For each workload the same backbone weights, data split, LoRA config, epochs, batch size, learning
rate, warm-up and seed run (a) through `finetune run` on the quickstart recipe and (b) through the
straightforward Trainer + PEFT script below, written the way a competent user would (the model's
own preprocessing, dynamic padding, features computed per batch). Runs alternate A B A B; each is
a fresh process, so wall time includes imports and model loading; peak RSS is the process's own
high-water mark (getrusage) up to the end of its final evaluation, before the FLOP replay, whose
time is not counted in the wall time either.
Both sides skip checkpoints and evaluate once at the end; finetune's extras that cost time outside
training (baselines, the evaluation before training, sample generations) are switched off.

Training FLOPs are counted the same way on both sides (benchmarks/flop_probe.py: the batch shapes
each process really trained, replayed under torch's FlopCounterMode, padding included) and shown
against the machine's fp32 matmul peak measured in the same run.

    .venv/bin/python benchmarks/vs_trainer.py                          # all three, 2 repeats
    .venv/bin/python benchmarks/vs_trainer.py --workloads vision --repeats 1
    .venv/bin/python benchmarks/vs_trainer.py --quick                  # a small slice of each, to try it

Workloads and what each Trainer script does:
  vision      recipes/vision-quickstart.toml: timm MobileNetV2 (torchvision weights), sklearn digits at
              96 px, LoRA r8 on every non-depthwise conv + full head, 3 epochs. Trainer: timm's eval
              transform per image, BatchNorm in train mode (model.train(), as a plain script does;
              finetune keeps BatchNorm statistics frozen under LoRA).
  speech      recipes/speech-quickstart.toml: Whisper tiny.en encoder, 10 spoken words, voices held
              out, LoRA r8 on q/v + projector/classifier, 3 epochs. Trainer: the stock
              WhisperForAudioClassification with WhisperFeatureExtractor's usual 30-s padding (the
              encoder refuses shorter input); finetune cuts the features to the clip.
  generation  recipes/generation-quickstart.toml: SmolLM2-135M-Instruct, chat template, loss on the
              answers only, LoRA r8 on q/v, 1 epoch, batch 8. Trainer: prompt tokens (and the newline
              the template adds after <|im_end|>) masked with -100, so both losses are over the same tokens;
              DataCollatorForSeq2Seq (dynamic padding); finetune's defaults (length-grouped batches).
  multilabel-image recipes/multi-label-image-quickstart.toml: timm MobileNetV2 (torchvision weights), BCCD
              images tagged with the cell types they show (205 train / 87 eval), 224 px (shorter side, centre
              crop), horizontal flips, LoRA r8 on every non-depthwise conv + the 3-output head, 6 epochs,
              batch 16. Trainer: timm's eval transform after a flip, BatchNorm in train mode, binary
              cross-entropy; the metric is mAP over the labels (threshold-free: finetune tunes thresholds
              on the eval split, a plain script does not), by finetune's own multilabel_report.
  detection   recipes/detection-quickstart.toml: timm MobileNetV2 features (torchvision weights) + torchvision
              FPN (64 channels) + FCOS head (2 convs), BCCD at 320x240, LoRA r8 on the backbone's
              non-depthwise convs + FPN and head in full, 4 epochs, batch 8, AdamW 3e-3. Plain script (no
              Trainer: torchvision detectors take lists of images and targets): a DataLoader with
              transforms.v2 flips on tv_tensors boxes, model.train() (BatchNorm in train mode), the same
              linear warm-up/decay; mAP by the same pycocotools code on the val list. finetune also scores
              the recipe's test list (72 images) in its wall time. FLOPs not counted (the probe cannot
              replay lists of images).
  segmentation recipes/segmentation-quickstart.toml: timm MobileNetV2 features (torchvision weights) + the
              FPN decoder, 2018 DSB nuclei at 128 px (150 train / 50 eval), flips, LoRA r8 on every
              non-depthwise backbone conv + the decoder in full, 6 epochs, batch 16. Not a Trainer: a plain
              torch loop (DataLoader, AdamW, linear warm-up/decay, clipping as finetune's defaults),
              model.train() (BatchNorm in train mode), contiguous input; mean IoU by the same confusion code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import peak_matmul_gflops, timed

REPO = Path(__file__).resolve().parents[1]
PROBE = str(Path(__file__).resolve().parent / "flop_probe.py")

PRELUDE = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])  # benchmarks/, for flop_probe
import flop_probe
flop_probe.install()
import numpy as np, pandas as pd, torch
from transformers import Trainer, TrainingArguments, set_seed
out, epochs, limit, bf16 = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[6] == "bf16"
SEED = int(__import__("os").environ.get("BENCH_SEED", "0"))  # vs_trainer.py --seed
set_seed(SEED)

def args(batch, lr, **kw):
    return TrainingArguments(output_dir=out, per_device_train_batch_size=batch, per_device_eval_batch_size=2 * batch,
                             learning_rate=lr, num_train_epochs=epochs, warmup_steps=0.06, weight_decay=0.0,
                             max_grad_norm=1.0, lr_scheduler_type="linear", eval_strategy="no", save_strategy="no",
                             logging_steps=50, report_to=[], seed=SEED, use_cpu=not torch.cuda.is_available(),
                             dataloader_num_workers=0, bf16=bf16, **kw)

class Files(torch.utils.data.Dataset):
    """Rows of a table: ``{key: load(path), "labels": class index}``."""
    def __init__(self, frame, column, key, load):
        self.paths, self.labels = frame[column].tolist(), [classes.index(v) for v in frame["label"]]
        self.key, self.load = key, load
    def __len__(self):
        return len(self.paths)
    def __getitem__(self, i):
        return {self.key: self.load(self.paths[i]), "labels": self.labels[i]}

def accuracy(p):
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

def finish(trainer, n_train, metric):
    t0 = time.perf_counter(); trainer.train(); train_s = time.perf_counter() - t0
    m = trainer.evaluate()
    flop_probe.write(out + "/flops.json")
    print(json.dumps({"train_s": train_s, "samples": n_train * epochs, "metric": m[f"eval_{metric}"]}))
'''

VISION = PRELUDE + r'''
import timm
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config
from finetune import split_frame
from finetune_vision.sources import export_source
from finetune_vision.zoo import resolve

folder = export_source("sklearn-digits")
df = pd.DataFrame([(str(p), p.parent.name) for p in sorted(folder.glob("*/*.png"))], columns=["image", "label"])
train, test = split_frame(df, 0.2, 0, stratify="label")
if limit:
    train = train.sample(n=min(limit, len(train)), random_state=0)
classes = sorted(df["label"].unique(), key=int)
model = timm.create_model("mobilenetv2_100", num_classes=len(classes))
state = {k: v for k, v in load_file(resolve("mobilenetv2_100.tv_in1k").path + "/model.safetensors").items()
         if not k.startswith("classifier.")}
model.load_state_dict(state, strict=False)
cfg = resolve_data_config({}, model=model)
transform = create_transform(input_size=(3, 96, 96), interpolation=cfg["interpolation"], mean=cfg["mean"],
                             std=cfg["std"], crop_pct=1.0)
targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                         modules_to_save=["classifier"]))

class Net(torch.nn.Module):
    def __init__(self, model):
        super().__init__(); self.model = model
    def forward(self, pixel_values, labels=None):
        logits = self.model(pixel_values)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}

images = lambda frame: Files(frame, "image", "pixel_values", lambda p: transform(Image.open(p).convert("RGB")))
trainer = Trainer(model=Net(model), args=args(32, 2e-3, remove_unused_columns=False), train_dataset=images(train),
                  eval_dataset=images(test), compute_metrics=accuracy)
finish(trainer, len(train), "accuracy")
'''

MULTILABEL_IMAGE = PRELUDE + r'''
import timm
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config
from torchvision import transforms
from finetune import multi_hot, multilabel_report, parse_labels
from finetune_vision.zoo import resolve

data = sys.argv[5]  # recipes/data: the CSVs' image paths are relative to it
train, test = pd.read_csv(data + "/bccd_multilabel_train.csv"), pd.read_csv(data + "/bccd_multilabel_eval.csv")
if limit:
    train = train.sample(n=min(limit, len(train)), random_state=0)
classes = sorted({x for v in train["labels"] for x in parse_labels(v)})
model = timm.create_model("mobilenetv2_100", num_classes=len(classes))
state = {k: v for k, v in load_file(resolve("mobilenetv2_100.tv_in1k").path + "/model.safetensors").items()
         if not k.startswith("classifier.")}
model.load_state_dict(state, strict=False)
cfg = resolve_data_config({}, model=model)
plain = create_transform(input_size=(3, 224, 224), interpolation=cfg["interpolation"], mean=cfg["mean"],
                         std=cfg["std"], crop_pct=1.0)  # shorter side to 224, the central 224 x 224
flipped = transforms.Compose([transforms.RandomHorizontalFlip(), plain])
targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                         modules_to_save=["classifier"]))

class Tagged(torch.utils.data.Dataset):
    def __init__(self, frame, transform):
        self.paths = [data + "/" + f for f in frame["file"]]
        self.labels = torch.tensor(multi_hot([parse_labels(v) for v in frame["labels"]], classes), dtype=torch.float32)
        self.transform = transform
    def __len__(self):
        return len(self.paths)
    def __getitem__(self, i):
        return {"pixel_values": self.transform(Image.open(self.paths[i]).convert("RGB")), "labels": self.labels[i]}

class Net(torch.nn.Module):
    def __init__(self, model):
        super().__init__(); self.model = model
    def forward(self, pixel_values, labels=None):
        logits = self.model(pixel_values)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}

def scores(p):  # mean average precision over the labels (threshold-free), finetune's own function
    probs = 1 / (1 + np.exp(-p.predictions))
    return {"map": multilabel_report(probs, p.label_ids, classes, [0.5] * len(classes))["map"]}

trainer = Trainer(model=Net(model), args=args(16, 2e-3, remove_unused_columns=False),
                  train_dataset=Tagged(train, flipped), eval_dataset=Tagged(test, plain), compute_metrics=scores)
finish(trainer, len(train), "map")
'''

SPEECH = PRELUDE + r'''
import soundfile as sf
from peft import LoraConfig, get_peft_model
from scipy.signal import resample_poly
from transformers import WhisperFeatureExtractor, WhisperForAudioClassification
from finetune import split_frame
from finetune_speech.whisper_zoo import resolve

data = sys.argv[5]
df = pd.read_csv(data + "/manifest.csv")
train, test = split_frame(df, 0.25, 0, group="speaker")
if limit:
    train = train.sample(n=min(limit, len(train)), random_state=0)
classes = sorted(df["label"].unique())
path = resolve("openai/whisper-tiny.en").path
extractor = WhisperFeatureExtractor.from_pretrained(path)
model = WhisperForAudioClassification.from_pretrained(path, num_labels=len(classes))
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                         modules_to_save=["projector", "classifier"]))

def load(p):
    audio, rate = sf.read(data + "/" + p, dtype="float32", always_2d=True)
    audio = audio.mean(1)[: 2 * rate]  # mono, at most 2 s (the recipe's data.max_seconds)
    return audio if rate == 16000 else resample_poly(audio, 16000, rate).astype("float32")

def collate(items):  # log-mel features per batch, padded to 30 s as Whisper expects
    feats = extractor([it["audio"] for it in items], sampling_rate=16000, return_tensors="pt")
    return {"input_features": feats.input_features, "labels": torch.tensor([it["labels"] for it in items])}

clips = lambda frame: Files(frame, "path", "audio", load)
trainer = Trainer(model=model, args=args(16, 1e-3, remove_unused_columns=False), train_dataset=clips(train),
                  eval_dataset=clips(test), data_collator=collate, compute_metrics=accuracy)
finish(trainer, len(train), "accuracy")
'''

GENERATION = PRELUDE + r'''
import random
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq
from finetune_generation.zoo import resolve

rows = [json.loads(line) for line in open(sys.argv[5]) if line.strip()]
order = list(range(len(rows)))
random.Random(0).shuffle(order)
n_eval = round(len(rows) * 0.15)
test = [rows[i] for i in sorted(order[:n_eval])]
train = [rows[i] for i in sorted(order[n_eval:])]
if limit:
    train = random.Random(0).sample(train, min(limit, len(train)))
path = resolve("HuggingFaceTB/SmolLM2-135M-Instruct").path
tok = AutoTokenizer.from_pretrained(path)
if tok.pad_token is None:
    tok.pad_token = tok.eos_token

end = tok.convert_tokens_to_ids("<|im_end|>")

def encode(row):  # loss on the answer and its <|im_end|> only: prompt (and the template's final newline) -100
    prompt = tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(row["messages"], tokenize=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"][:128]
    stop = ids.index(end, len(p_ids)) + 1 if end in ids[len(p_ids):] else len(ids)
    labels = [-100] * len(p_ids) + ids[len(p_ids):stop] + [-100] * (len(ids) - stop)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

model = AutoModelForCausalLM.from_pretrained(path)
model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                         target_modules=["q_proj", "v_proj"]))
enc = lambda rs: Dataset.from_list([encode(r) for r in rs])
trainer = Trainer(model=model, args=args(8, 2e-3), train_dataset=enc(train), eval_dataset=enc(test),
                  data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
finish(trainer, len(train), "loss")
'''

DETECTION = PRELUDE + r"""
import xml.etree.ElementTree as ET
from collections import OrderedDict
import timm
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7
from torchvision.transforms import v2
from torchvision import tv_tensors
from finetune_vision.detection_model import coco_metrics
from finetune_vision.zoo import resolve

root = sys.argv[5]
classes = ["Platelets", "RBC", "WBC"]

def read(name):  # a VOC image list -> [(image path, boxes, label ids)]
    rows = []
    for i in open(f"{root}/ImageSets/Main/{name}.txt").read().split():
        tree = ET.parse(f"{root}/Annotations/{i}.xml").getroot()
        objects = tree.findall("object")
        rows.append((f"{root}/JPEGImages/{i}.jpg",
                     [[float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objects],
                     [classes.index(o.findtext("name")) for o in objects]))
    return rows

train, val = read("train"), read("val")
if limit:
    train = train[:limit]
augment = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])

class Boxes(torch.utils.data.Dataset):
    def __init__(self, rows, training):
        self.rows, self.training = rows, training
    def __len__(self):
        return len(self.rows)
    def __getitem__(self, i):
        path, boxes, labels = self.rows[i]
        image = v2.functional.to_image(Image.open(path).convert("RGB"))
        boxes = tv_tensors.BoundingBoxes(torch.tensor(boxes).reshape(-1, 4), format="XYXY",
                                         canvas_size=image.shape[-2:])
        if self.training:
            image, boxes = augment(image, boxes)
        return v2.functional.to_dtype(image, torch.float32, scale=True), {
            "boxes": boxes.as_subclass(torch.Tensor), "labels": torch.tensor(labels, dtype=torch.long)}

class TimmFPN(torch.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body, self.out_channels = body, 64
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), 64, extra_blocks=LastLevelP6P7(64, 64))
    def forward(self, x):
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))

body = timm.create_model("mobilenetv2_100", features_only=True, out_indices=(2, 3, 4))
weights = load_file(resolve("mobilenetv2_100.tv_in1k").path + "/model.safetensors")
body.load_state_dict({k: v for k, v in weights.items() if k in body.state_dict()})
head = FCOSHead(64, 1, len(classes), num_convs=2)
torch.nn.init.constant_(head.regression_head.bbox_reg.bias, 2.0)  # the same start as finetune's (FCOS_BOX_INIT)
model = FCOS(TimmFPN(body), len(classes), anchor_generator=AnchorGenerator(((8,), (16,), (32,), (64,), (128,)),
             ((1.0,),) * 5), head=head, min_size=320, max_size=320, image_mean=[0.485, 0.456, 0.406],
             image_std=[0.229, 0.224, 0.225], score_thresh=0.05, detections_per_img=100)
targets = [n for n, m in model.named_modules() if n.startswith("backbone.body.") and isinstance(m, torch.nn.Conv2d)
           and m.groups == 1]
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                       modules_to_save=["backbone.fpn", "head.classification_head", "head.regression_head"]))
batches = lambda rows, training: torch.utils.data.DataLoader(Boxes(rows, training), batch_size=8, shuffle=training,
                                                             collate_fn=lambda items: tuple(zip(*items)))
steps = epochs * len(batches(train, True))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
warmup = max(1, round(0.06 * steps))
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup,
                                                                     (steps - s) / max(1, steps - warmup)))
t0 = time.perf_counter()
model.train()  # BatchNorm in train mode, as a plain script does
for epoch in range(epochs):
    for images, targets_ in batches(train, True):
        loss = sum(model(list(images), list(targets_)).values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(); schedule.step(); optimizer.zero_grad()
train_s = time.perf_counter() - t0
model.eval()
predictions, references = [], []
with torch.no_grad():
    for images, targets_ in batches(val, False):
        for found, t, image in zip(model(list(images)), targets_, images):
            predictions.append({k: found[k].tolist() for k in ("boxes", "scores", "labels")})
            references.append({"boxes": t["boxes"].tolist(), "labels": t["labels"].tolist(),
                               "width": image.shape[-1], "height": image.shape[-2]})
flop_probe.write(out + "/flops.json")
print(json.dumps({"train_s": train_s, "samples": len(train) * epochs,
                  "metric": coco_metrics(predictions, references, classes)["map"]}))
"""
SEGMENTATION = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])  # benchmarks/, for flop_probe
import flop_probe
flop_probe.install()
from pathlib import Path
import numpy as np, timm, torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from finetune_vision.segmentation_masks import confusion, metrics_from_confusion
from finetune_vision.segmentation_model import FPNDecoder  # the same decoder as finetune's task.decoder = "fpn"
from finetune_vision.zoo import resolve

out, epochs, limit, data = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
bf16 = sys.argv[6] == "bf16"
torch.manual_seed(int(__import__("os").environ.get("BENCH_SEED", "0")))  # vs_trainer.py --seed


class Net(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.backbone = timm.create_model("mobilenetv2_100", features_only=True, out_indices=(1, 2, 3, 4))
        self.decoder = FPNDecoder(self.backbone.feature_info.channels(), num_classes)

    def forward(self, x):
        return F.interpolate(self.decoder(self.backbone(x)), size=x.shape[-2:], mode="bilinear")


model = Net(2)
weights = load_file(resolve("mobilenetv2_100.tv_in1k").path + "/model.safetensors")
own = model.backbone.state_dict()
model.backbone.load_state_dict({k: v for k, v in weights.items() if k in own})
targets = [n for n, m in model.named_modules()
           if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and n.startswith("backbone.")]
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                         modules_to_save=["decoder"]))
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
tail = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]  # images only; masks stay int64
train_tf = T.Compose([T.ToImage(), T.Resize((128, 128)), T.RandomHorizontalFlip(), T.RandomVerticalFlip(), *tail])
eval_tf = T.Compose([T.ToImage(), T.Resize((128, 128)), *tail])


class Pairs(torch.utils.data.Dataset):
    def __init__(self, folder, transform):
        self.images = sorted((folder / "images").glob("*.png"))
        self.folder, self.transform = folder, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = Image.open(self.images[i]).convert("RGB")
        mask = np.array(Image.open(self.folder / "masks" / self.images[i].name))
        mask = tv_tensors.Mask(torch.from_numpy(mask).long())
        return self.transform(image, mask)


train = Pairs(data / "train", train_tf)
if limit:
    train = torch.utils.data.Subset(train, torch.randperm(len(train))[:limit].tolist())
loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
steps = epochs * len(loader)
warmup = max(1, int(0.06 * steps))
schedule = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda s: s / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
t0 = time.perf_counter()
model.train()
for epoch in range(epochs):
    for x, y in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y, ignore_index=255)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
train_s = time.perf_counter() - t0
model.eval()
total = torch.zeros(2, 2, dtype=torch.long)
with torch.no_grad():
    for x, y in Pairs(data / "eval", eval_tf):
        total += confusion(model(x[None]).argmax(1)[0], y, 2, 255)
flop_probe.write(out + "/flops.json")
print(json.dumps({"train_s": train_s, "samples": len(train) * epochs,
                  "metric": metrics_from_confusion(total.numpy(), ["background", "nucleus"])["mean_iou"]}))
'''

WORKLOADS = {
    "vision": {"recipe": "vision-quickstart.toml", "script": VISION, "data": "", "metric": "accuracy",
               "unit": "images", "overrides": [], "quick_limit": 256},
    "speech": {"recipe": "speech-quickstart.toml", "script": SPEECH, "data": "data/speech_commands",
               "metric": "accuracy", "unit": "clips", "overrides": ["task.baseline=false"], "quick_limit": 64},
    "generation": {"recipe": "generation-quickstart.toml", "script": GENERATION,
                   "data": "data/arithmetic_instructions.jsonl", "metric": "eval_loss", "unit": "examples",
                   "overrides": ["task.sample_prompts=0"], "quick_limit": 96},
    "multilabel-image": {"recipe": "multi-label-image-quickstart.toml", "script": MULTILABEL_IMAGE, "data": "data",
                         "metric": "map", "unit": "images", "overrides": ["task.baseline=false"], "quick_limit": 48},
    "detection": {"recipe": "detection-quickstart.toml", "script": DETECTION, "data": "data/bccd", "metric": "map",
                  "unit": "images", "overrides": [],
                  "quick_limit": 32},
    "segmentation": {"recipe": "segmentation-quickstart.toml", "script": SEGMENTATION, "data": "data/nuclei",
                     "metric": "mean_iou", "unit": "images", "overrides": [], "quick_limit": 48},
}


def run_finetune(w: dict, folder: Path, epochs: int | None, limit: int, precision: str) -> dict:
    out = folder / "finetune-run"
    flops = folder / "finetune-flops.json"
    sets = [*w["overrides"], f"output.dir=\"{out}\"", "train.checkpoint_every_steps=0",
            "train.eval_before_training=false", f"train.seed={os.environ.get('BENCH_SEED', '0')}",
            f"train.mixed_precision=\"{'bf16' if precision == 'bf16' else 'no'}\""]
    if epochs:
        sets.append(f"train.epochs={epochs}")
    if limit:
        sets.append(f"data.limit={limit}")
    cmd = [sys.executable, PROBE, str(flops), "-m", "finetune.cli", "run", str(REPO / "recipes" / w["recipe"]),
           "--overwrite", "-q", *[arg for s in sets for arg in ("--set", s)]]
    wall, _, _ = timed(cmd, REPO)
    m = json.loads((out / "metrics.json").read_text())
    probe = json.loads(flops.read_text())
    return {"train_s": m["train"]["train_time_s"], "samples": m["train"]["samples_seen"],
            "metric": m["last"][w["metric"]], "wall_s": wall - probe["replay_s"],
            "rss": probe["peak_rss_mib"], "flops": probe["flops"]}


def run_trainer(name: str, w: dict, folder: Path, epochs: int | None, limit: int, precision: str) -> dict:
    import tomllib

    script = folder / f"trainer_{name}.py"
    script.write_text(w["script"])
    out = folder / "trainer-out"
    out.mkdir(exist_ok=True)
    recipe_epochs = tomllib.loads((REPO / "recipes" / w["recipe"]).read_text())["train"]["epochs"]
    cmd = [sys.executable, str(script), str(Path(PROBE).parent), str(out), str(epochs or recipe_epochs),
           str(limit), str(REPO / "recipes" / w["data"]), precision]
    wall, _, stdout = timed(cmd, REPO)
    res = json.loads(stdout.strip().splitlines()[-1])
    probe = json.loads((out / "flops.json").read_text())
    return {**res, "wall_s": wall - probe["replay_s"],
            "rss": probe["peak_rss_mib"], "flops": probe["flops"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="override the recipes' epochs on both sides")
    parser.add_argument("--seed", type=int, default=0, help="training seed on both sides (train.seed; the scripts' "
                        "seed): several seeds tell a metric difference from seed noise")
    parser.add_argument("--quick", action="store_true", help="a small slice of each training set, 1 epoch")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="the same on both sides (default fp32; the generation quickstart's own 'auto' "
                             "picks bf16 on AMX CPUs and GPUs)")
    args = parser.parse_args()
    os.environ["BENCH_SEED"] = str(args.seed)  # read by the plain scripts
    if args.quick:
        args.epochs = args.epochs or 1
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for name in args.workloads:
        w = WORKLOADS[name]
        limit = w["quick_limit"] if args.quick else 0
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            for i in range(args.repeats):
                for side in ("finetune", "trainer"):
                    r = (run_finetune(w, Path(tmp), args.epochs, limit, args.precision) if side == "finetune"
                         else run_trainer(name, w, Path(tmp), args.epochs, limit, args.precision))
                    rows.append({"workload": name, "side": side, "run": i + 1, **r})
                    print(f"  {name} {side} {i + 1}: {r['samples'] / r['train_s']:.2f} {w['unit']}/s, "
                          f"{w['metric']} {r['metric']:.4f}, wall {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    peak = peak_matmul_gflops()
    print(f"\n{started}; {args.precision} on both sides; machine peak matmul: fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s{'; --quick' if args.quick else ''}\n")
    print("| workload | side | run | train samples/s | train s | wall s | peak RSS MiB | metric | TFLOP trained | "
          f"GFLOP/s | % of {args.precision} peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w = WORKLOADS[r["workload"]]
        gflops = r["flops"] / r["train_s"] / 1e9 if r["flops"] else None
        flops = (f"{r['flops'] / 1e12:.2f} | {gflops:.0f} | {100 * gflops / peak[args.precision]:.0f}%" if gflops
                 else "– | – | –")
        print(f"| {r['workload']} | {r['side']} | {r['run']} | {r['samples'] / r['train_s']:.2f} | "
              f"{r['train_s']:.1f} | {r['wall_s']:.1f} | {r['rss']} | {w['metric']} {r['metric']:.4f} | {flops} |")
    print()
    for name in args.workloads:
        mine = {s: [r for r in rows if r["workload"] == name and r["side"] == s] for s in ("finetune", "trainer")}

        def mean(side: str, key: str, mine: dict = mine) -> float:
            values = [r[key] if key != "speed" else r["samples"] / r["train_s"] for r in mine[side]]
            return sum(values) / len(values)

        print(f"{name}: throughput finetune / trainer {mean('finetune', 'speed') / mean('trainer', 'speed'):.2f}x, "
              f"wall time {mean('trainer', 'wall_s') / mean('finetune', 'wall_s'):.2f}x shorter, peak RSS "
              f"{mean('finetune', 'rss'):.0f} vs {mean('trainer', 'rss'):.0f} MiB, {WORKLOADS[name]['metric']} "
              f"{mean('finetune', 'metric'):.4f} vs {mean('trainer', 'metric'):.4f}")


if __name__ == "__main__":
    main()
