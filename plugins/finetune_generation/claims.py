"""``finetune init`` for the generation tasks (the ``finetune_claim_data`` hook): chat / instruction data
(the shapes :mod:`finetune_generation.data` reads: messages, prompt + completion, Alpaca, text), preference
pairs (prompt / chosen / rejected; KTO's prompt / completion / label), and prompts with checkable answers
for GRPO. Looks only at the probe."""

from __future__ import annotations

import re
from typing import Any

from finetune import Claim, DataProbe

BACKBONE = "HuggingFaceTB/SmolLM2-135M-Instruct"
_BACKBONE_NOTE = "offline SmolLM2-135M-Instruct (the generation quickstarts' model); any causal LM online"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _max_length(chars: float) -> int:
    tokens = chars / 3.5 + 16
    for limit in (128, 256, 512, 1024):
        if tokens * 1.5 <= limit:
            return limit
    return 2048


def _settings(probe: DataProbe, chars: float, lr: float) -> dict[str, dict[str, Any]]:
    return {"model": {"backbone": BACKBONE},
            "data": {"train": probe.path, "split": 0.15, "max_length": _max_length(chars)},
            "peft": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "auto"},
            "train": {"epochs": 1, "batch_size": 8, "learning_rate": lr, "seed": 0}}


def _comments(**extra: str) -> dict[str, str]:
    return {"model.backbone": _BACKBONE_NOTE, "data.split": "held out for the eval loss and samples",
            "data.max_length": "tokens per example (longer ones are cut on the right, reported)",
            "peft.target_modules": "q_proj, v_proj for Llama-style models", **extra}


def _answers(records: list[dict[str, Any]], column: str, chat: bool) -> list[str]:
    out = []
    for record in records:
        value = record.get(column)
        if chat and isinstance(value, list):
            said = [m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
            if said:
                out.append(str(said[-1]))
        elif isinstance(value, str):
            out.append(value)
    return out


def _grpo_claim(probe: DataProbe, answers: list[str], data: dict[str, Any], chars: float) -> Claim | None:
    """GRPO fits prompts whose reference answers a reward can check: short answers holding a number."""
    if not answers:
        return None
    short = sum(len(a.split()) <= 12 for a in answers) / len(answers)
    numeric = sum(bool(_NUMBER.search(a)) for a in answers) / len(answers)
    if short < 0.9 or numeric < 0.9:
        return None
    settings = _settings(probe, chars, 5e-4)
    settings["data"].update({k: v for k, v in data.items() if k != "shape"})
    settings["task"] = {"rewards": {"exact-number": 1.0}, "group_size": 8,
                        "max_new_tokens": max(16, int(max(len(a) for a in answers) / 2.5) + 8)}
    settings["train"].update(batch_size=4)
    return Claim(task="grpo", score=0.6, settings=settings, comments=_comments(**{
        "task.rewards": "reward functions by name (finetune rewards lists them)",
        "task.group_size": "answers sampled per prompt"}),
        reasons=[f"the answers are short and hold numbers ({numeric:.0%}): a verifiable reward (exact-number) can "
                 "check them; but GRPO data has the same shape as SFT data, so init cannot tell it apart: choose "
                 "--task grpo for RL, usually after an SFT run (model.start_from)"])


def claim_data(probe: DataProbe) -> list[Claim]:
    """The generation plugin's claims on ``probe``."""
    table = probe.table
    if table is None:
        return []
    cols = table.columns
    names = set(cols)
    records = table.records
    chars = sum(c.mean_chars for c in cols.values() if c.kind in ("text", "category"))
    out: list[Claim] = []
    chat = [c for c in cols.values() if c.kind == "chat"]
    if {"prompt", "chosen", "rejected"} <= names or ({"chosen", "rejected"} <= names
                                                     and cols["chosen"].kind == "chat"):
        settings = _settings(probe, chars, 5e-4)
        settings["task"] = {"objective": "dpo", "beta": 0.1}
        comments = _comments(**{"task.objective": "DPO (or orpo, simpo)", "task.beta": "strength of the preference"})
        reasons = ["records with `prompt`, `chosen` and `rejected`: preference pairs"]
        if "prompt" in cols and cols["prompt"].repeated_share > 0:
            settings["data"]["group_column"] = "prompt"
            comments["data.group_column"] = "the pairs of one prompt stay on one side of the split"
            reasons.append(f"prompts repeat ({cols['prompt'].repeated_share:.0%} of rows share theirs): the split "
                           "keeps each prompt's pairs together")
        out.append(Claim(task="preference-tuning", score=0.9, reasons=reasons, settings=settings,
                         comments=comments, notes=["DPO is best started from an SFT run's adapter: set "
                                                   "model.start_from to a finished causal-lm run"]))
        rm = _settings(probe, chars, 3e-3)
        rm["data"].update({k: v for k, v in settings["data"].items() if k == "group_column"})
        out.append(Claim(task="reward-model", score=0.6, settings=rm, comments=comments,
                         reasons=["the same pairs can train a reward model (a score head, Bradley-Terry), e.g. as "
                                  "a GRPO reward"]))
        return out
    if {"prompt", "completion", "label"} <= names and cols["label"].distinct <= 2:
        settings = _settings(probe, chars, 5e-4)
        settings["task"] = {"objective": "kto"}
        return [Claim(task="preference-tuning", score=0.85, settings=settings,
                      comments=_comments(**{"task.objective": "KTO: unpaired desirable / undesirable answers"}),
                      reasons=["records with `prompt`, `completion` and a two-valued `label`: KTO data (each "
                               "answer marked desirable or not)"])]
    shape = data = None
    answers: list[str] = []
    if chat:
        column = chat[0].name
        shape, data = "messages", ({} if column == "messages" else {"messages_column": column})
        reason = f"column `{column}` holds chat message lists [{{role, content}}, ...]"
        answers = _answers(records, column, chat=True)
        chars = sum(len(str(m.get("content", ""))) for r in records for m in (r.get(column) or [])
                    if isinstance(m, dict)) / max(1, len(records))
    elif {"prompt", "completion"} <= names:
        shape, data, reason = "prompt_completion", {}, "records with `prompt` and `completion`"
        answers = _answers(records, "completion", chat=False)
    elif {"instruction", "output"} <= names:
        shape, data, reason = "alpaca", {}, "records with `instruction` and `output` (Alpaca style)"
        answers = _answers(records, "output", chat=False)
    if shape is not None:
        settings = _settings(probe, chars, 2e-3)
        settings["data"].update(data)
        settings["data"]["shape"] = shape
        settings["task"] = {"train_on": "completion"}
        out.append(Claim(task="causal-lm", score=0.9, settings=settings, reasons=[reason],
                         comments=_comments(**{"data.shape": "the data's shape, as found",
                                               "task.train_on": "loss on the answers only"})))
        grpo = _grpo_claim(probe, answers, data, chars)
        if grpo is not None:
            out.append(grpo)
        else:
            out[0].notes.append("not offered as grpo: the answers are not short numbers a built-in reward can check")
        return out
    texts = [c for c in cols.values() if c.kind == "text"]
    others = [c for c in cols.values() if c.kind not in ("text", "empty")]
    if "text" in cols and cols["text"].kind == "text" and len(texts) == 1 and not others \
            and cols["text"].mean_words >= 20:
        settings = _settings(probe, cols["text"].mean_chars, 2e-3)
        settings["data"]["shape"] = "text"
        return [Claim(task="causal-lm", score=0.6, settings=settings,
                      comments=_comments(**{"data.shape": "plain text: continued pre-training"}),
                      reasons=[f"one long `text` column ({cols['text'].describe()}) and nothing else: continued "
                               "pre-training on plain text"])]
    if len(texts) == 2 and not others:
        prompt, completion = texts
        settings = _settings(probe, chars, 2e-3)
        settings["data"].update(shape="prompt_completion", prompt_column=prompt.name, completion_column=completion.name)
        return [Claim(task="causal-lm", score=0.45, settings=settings, comments=_comments(),
                      reasons=[f"two text columns (`{prompt.name}`, `{completion.name}`) and no label: perhaps "
                               "prompts and the answers to learn"])]
    return []
