"""``preference-tuning``: DPO, ORPO, SimPO or KTO on preference data, with LoRA, in finetune's own loop.

Data (:mod:`finetune_generation.preference_data`): ``prompt`` + ``chosen`` + ``rejected`` (text or chat
messages, or whole conversations without a prompt column); KTO takes ``prompt`` + ``completion`` +
``label`` (desirable or not). Each answer is rendered as supervised fine-tuning renders the last
assistant turn, and only its tokens (and its end token) count.

One forward pass scores a batch's chosen and rejected answers together (``2B`` rows). DPO and KTO
compare with the reference model, which is the backbone with the LoRA adapter disabled (no second copy
of the weights); its log-probabilities are computed once per example and cached (keyed by the data set
and the example's index), so later epochs and evaluations reuse them. ORPO and SimPO need no
reference. Every evaluation (also step 0, before training) reports reward accuracy, the mean reward
margin and the chosen and rejected log-probabilities (KTO: the desirable and undesirable rewards and
whether each lies on the side of the reference point its label says), and the held-out prompts are
answered as in ``causal-lm`` (samples/, reference = the chosen answer).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from finetune import DataError, RecipeError
from finetune_generation.causal_lm import (
    CausalLM,
    GenerationOptions,
    _plain_head,
    shared_prefix_layout,
    shared_prefix_length,
)
from finetune_generation.data import IGNORE, Example, TokenDataset, collate
from finetune_generation.preference_data import (
    PreferenceData,
    PreferenceExample,
    collate_preferences,
    encode_preference,
    preference_splits,
)

#: the usual beta of each objective (ORPO: its lambda)
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "simpo": 2.0, "orpo": 0.1}


class PreferenceOptions(GenerationOptions):
    objective: Literal["dpo", "orpo", "simpo", "kto"] = Field(
        "dpo", description="'dpo' (Direct Preference Optimization, against the reference = the base without the "
        "adapter), 'orpo' (odds-ratio preference + SFT loss, no reference), 'simpo' (length-normalised margin, no "
        "reference) or 'kto' (unpaired desirable/undesirable completions, data.completion_column + "
        "data.label_column).")
    beta: float | None = Field(
        None, gt=0, description="Strength of the preference term; unset = the method's usual value: dpo 0.1, kto "
        "0.1, simpo 2.0, orpo 0.1 (ORPO's lambda, the weight of its odds-ratio term).")
    simpo_gamma: float = Field(
        0.5, ge=0, description="SimPO: the target reward margin gamma as a ratio of beta (gamma = simpo_gamma * "
        "beta; the SimPO paper's recommended gamma/beta is about 0.5).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="DPO: probability that a preference label is wrong (conservative DPO); 0 = "
        "plain DPO.")
    sft_weight: float = Field(
        0.0, ge=0, description="DPO: weight of an added SFT term, the chosen answer's mean token negative "
        "log-likelihood (RPO, Pang et al. 2024; trl's rpo_alpha); keeps the chosen answers likely while the "
        "rejected ones are pushed down. 0 = plain DPO.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight lambda_D of desirable examples (raise it "
                                                           "when they are the rarer kind).")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight lambda_U of undesirable examples.")


def _pair_length(item: dict[str, Any]) -> int:
    """The longer row of a pair (what a batch pads to); a KTO item's one row."""
    return max(len(item.get("chosen_input_ids", item.get("input_ids", []))), len(item.get("rejected_input_ids", [])))


class PreferenceTuning(CausalLM):
    name = "preference-tuning"
    description = "Preference tuning of a causal language model: DPO, ORPO, SimPO or KTO (task.objective)."
    task_options = PreferenceOptions
    data_options = PreferenceData
    default_metric = "eval_loss"
    metric_names = ("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps", "chosen_rewards",
                    "rejected_rewards", "desirable_rewards", "undesirable_rewards", "kl")

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self._reference_cache: dict[tuple[int, int], Any] = {}
        self._datasets = 0
        self._pad_id = 0

    @property
    def objective(self) -> str:
        return self.recipe.task.objective

    @property
    def beta(self) -> float:
        beta = self.recipe.task.beta
        return DEFAULT_BETA[self.objective] if beta is None else beta

    # -- data ----------------------------------------------------------
    def prepare_data(self) -> Any:
        opts = self.recipe.task
        for key in ("label_smoothing", "sft_weight"):
            if getattr(opts, key) and self.objective != "dpo":
                raise RecipeError(f"task.{key} applies to objective 'dpo' only (objective is {self.objective!r}); "
                                  "remove it.")
        splits = preference_splits(self.recipe, self.objective == "kto", self._info)
        first = splits.train[0].prompt
        self.state = {"shape": "messages" if first.messages is not None else "prompt_completion",
                      "objective": self.objective}
        self._info["objective"] = self.objective
        seen: set[str] = set()  # one sample per prompt (a prompt may have several pairs)
        self._eval_examples = []
        for ex in splits.eval:
            key = repr(ex.prompt.messages or ex.prompt.prompt)
            if ex.desirable is not False and key not in seen:
                seen.add(key)
                self._eval_examples.append(_as_sft(ex))
        return splits

    def read_examples(self, path: Any, key: str) -> list[PreferenceExample]:
        from finetune_generation.data import read_records
        from finetune_generation.preference_data import read_preferences

        return read_preferences(read_records(str(path), self.recipe.data.format, key), self.recipe.data, key,
                                self.objective == "kto")

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        max_length = self.recipe.data.max_length
        encoder = self._encoder(processor)
        split = self._datasets  # the key of this data set's cached reference log-probabilities
        self._datasets += 1
        items, dropped = [], []
        for i, ex in enumerate(examples):
            if ex.completion is not None:
                one = encode_preference(encoder, ex.prompt, ex.completion, max_length)
                if one is None:
                    dropped.append(ex.where)
                    continue
                items.append({"input_ids": one[0], "labels": one[1], "desirable": bool(ex.desirable), "index": i,
                              "split": split})
                continue
            chosen = encode_preference(encoder, ex.prompt, ex.chosen, max_length)
            rejected = encode_preference(encoder, ex.prompt, ex.rejected, max_length)
            if chosen is None or rejected is None:
                dropped.append(ex.where)
                continue
            items.append({"chosen_input_ids": chosen[0], "chosen_labels": chosen[1], "rejected_input_ids": rejected[0],
                          "rejected_labels": rejected[1], "index": i, "split": split})
        name = "train" if training else "eval"
        if dropped:
            self._info[f"{name}_dropped"] = len(dropped)
            print(f"warning: {len(dropped)} of {len(examples)} {name} examples have no answer token left when cut to "
                  f"data.max_length = {max_length} tokens and are left out (e.g. {dropped[0]}). Raise "
                  "data.max_length to keep them.", file=sys.stderr)
        if not items:
            raise DataError(f"data.max_length: all {len(examples)} {name} examples lose their whole answer when cut "
                            f"to {max_length} tokens (e.g. {dropped[0]}); raise data.max_length.")
        if self.objective == "kto" and len({x["desirable"] for x in items}) < 2:
            raise DataError(f"data.max_length: after leaving out the examples cut away by data.max_length = "
                            f"{max_length}, the {name} split holds only one kind of KTO label; raise "
                            "data.max_length.")
        return TokenDataset(items, length=_pair_length)

    def collate_fn(self, processor: Any):
        pad_id = self._pad_id = processor.pad_token_id

        def fn(items: list[dict[str, Any]]) -> dict[str, Any]:
            return collate_preferences(items, pad_id)

        return fn

    # -- training and evaluation ---------------------------------------
    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        return self._losses(model, batch)[0].mean()

    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        losses, predictions, references = self._losses(model, batch)
        return {"loss": losses.mean(), "predictions": predictions.float(), "references": references.float()
                if torch.is_tensor(references) else references}

    def _losses(self, model: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        """``(losses [B], predictions [B, k], references [B, k'])`` of one batch (the last two for metrics)."""
        import torch

        from finetune_generation.preference_losses import dpo_loss, kto_loss, orpo_loss, simpo_loss

        opts, beta = self.recipe.task, self.beta
        size = batch["index"].shape[0]
        sums, counts = answer_logps(model, batch)
        if self.objective == "kto":
            ref = self._reference(model, batch)
            kl = self._kl_estimate(model, batch)
            losses, rewards, point = kto_loss(sums, ref, batch["desirable"], kl, beta, opts.desirable_weight,
                                              opts.undesirable_weight)
            predictions = torch.stack([rewards, point.expand_as(rewards), sums.detach()], 1)
            return losses, predictions, batch["desirable"].float()[:, None]
        chosen, rejected = sums[:size], sums[size:]
        if self.objective == "dpo":
            ref = self._reference(model, batch)
            losses, chosen_r, rejected_r = dpo_loss(chosen, rejected, ref[:size], ref[size:], beta,
                                                    opts.label_smoothing)
            if opts.sft_weight:
                losses = losses + opts.sft_weight * -(chosen / counts[:size].clamp(min=1))
        else:
            avg = sums / counts.clamp(min=1)
            if self.objective == "simpo":
                losses, chosen_r, rejected_r = simpo_loss(avg[:size], avg[size:], beta, opts.simpo_gamma * beta)
            else:
                losses, chosen_r, rejected_r = orpo_loss(avg[:size], avg[size:], -avg[:size], beta)
        predictions = torch.stack([chosen_r, rejected_r, chosen.detach(), rejected.detach()], 1)
        return losses, predictions, counts.view(2, size).t().float()

    def _reference(self, model: Any, batch: dict[str, Any]) -> Any:
        """The reference (adapter disabled) summed log-probabilities of the batch's rows, from the cache
        (computed once per example: the base model never changes)."""
        import torch

        from finetune_generation.logprobs import reference

        keys = list(zip(batch["split"].tolist(), batch["index"].tolist()))
        if any(k not in self._reference_cache for k in keys):
            path = answer_path(model, batch)  # the policy's, decided before the reference context changes its mode
            with reference(model) as base:
                sums, _ = answer_logps(base, batch, path=path)
            rows = sums.detach().view(-1, len(keys)).t()  # [B, 1] (KTO) or [B, 2] (chosen, rejected)
            for k, value in zip(keys, rows):
                self._reference_cache.setdefault(k, value.clone())
        values = torch.stack([self._reference_cache[k] for k in keys])  # [B, rows per example]
        return values.t().reshape(-1).to(batch["input_ids"].device)

    def _kl_estimate(self, model: Any, batch: dict[str, Any]) -> Any:
        """KTO's reference point: the mean of log pi - log ref over mismatched pairs (prompt i with the
        completion of example i + 1 of the batch), without gradient (the clamp at 0 is kto_loss's)."""
        import torch

        from finetune_generation.logprobs import reference

        mismatched = mismatched_batch(batch, self._pad_id, self.recipe.data.max_length)
        with torch.no_grad():
            path = answer_path(model, mismatched)
            policy, _ = answer_logps(model, mismatched, path=path)
            with reference(model) as base:
                ref, _ = answer_logps(base, mismatched, path=path)
        return (policy - ref).mean()

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        import numpy as np

        if self.objective == "kto":
            rewards, point, desirable = predictions[:, 0], predictions[:, 1], references[:, 0] > 0.5
            right = np.where(desirable, rewards > point, rewards < point)
            out = {"reward_accuracy": float(right.mean()), "kl": float(point.mean() / self.beta)}
            if desirable.any():
                out["desirable_rewards"] = float(rewards[desirable].mean())
            if (~desirable).any():
                out["undesirable_rewards"] = float(rewards[~desirable].mean())
            return out
        chosen_r, rejected_r, chosen, rejected = (predictions[:, i] for i in range(4))
        return {"reward_accuracy": float((chosen_r > rejected_r).mean()),
                "reward_margin": float((chosen_r - rejected_r).mean()),
                "chosen_rewards": float(chosen_r.mean()), "rejected_rewards": float(rejected_r.mean()),
                "chosen_logps": float(chosen.mean()), "rejected_logps": float(rejected.mean())}

    def finalize_eval(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return metrics  # no perplexity: the loss is not a language-model loss

    def speed_notes(self) -> list[str]:
        if self.objective in ("dpo", "kto"):
            return ["reference log-probabilities (the backbone without the adapter) are computed once per example "
                    "and cached in memory"]
        return []

    # -- inference -----------------------------------------------------
    def read_predict_input(self, path: Path) -> list[dict[str, Any]]:
        from finetune import missing_input_column
        from finetune_generation.data import read_records

        column = self.recipe.data.prompt_column
        if path.suffix.lower() == ".txt":
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not lines:
                raise DataError(f"--input: {path} holds no prompts (one prompt per line).")
            return [{column: line} for line in lines]
        records = [rec for _, rec in read_records(str(path), "auto", "--input")]
        for i, rec in enumerate(records):
            if column not in rec:
                error = missing_input_column(f"{path}: record {i + 1}", column, list(rec), self.recipe.data)
                raise DataError(f"{error} A .txt file with one prompt per line works too.")
        return records

    def predict_input_columns(self) -> list[str]:
        return [self.recipe.data.prompt_column]

    def _record_example(self, record: dict[str, Any]) -> Example:
        value = record.get(self.recipe.data.prompt_column)
        if isinstance(value, list):
            return Example(where="input", messages=value)
        text = str(value or "")
        return Example(where="input", prompt=text, plain_prompt=text)


def _as_sft(ex: PreferenceExample) -> Example:
    """The example as supervised data (prompt + the chosen or desirable answer), for the sample generations."""
    answer = ex.chosen if ex.chosen is not None else ex.completion
    if ex.prompt.messages is not None:
        return Example(where=ex.where, messages=[*ex.prompt.messages, {"role": "assistant", "content": answer}])
    return Example(where=ex.where, prompt=ex.prompt.prompt, plain_prompt=ex.prompt.plain_prompt, completion=answer)


def answer_path(model: Any, batch: dict[str, Any]) -> tuple[bool, int]:
    """How :func:`answer_logps` computes ``batch`` under ``model``: ``(head, prefix)``, whether through the
    output head on the learned positions only (not under a DDP/FSDP wrapper, nor for heads it cannot call
    alone) and how many shared leading tokens are computed once (0: none; never while dropout is active).
    A reference pass given the policy's path rounds exactly as the policy's pass: with a fresh adapter the
    implicit rewards are exactly 0 (under DDP the policy takes the standard path and the unwrapped reference
    used to take the other, 1e-7 apart)."""
    if _plain_head(model) is None:
        return False, 0
    return True, shared_prefix_length(model, batch)


def answer_logps(model: Any, batch: dict[str, Any], *,
                 path: tuple[bool, int] | None = None) -> tuple[Any, Any]:
    """``(summed, counts)`` per row: the summed log-probability of the learned tokens (label != -100) and how
    many there are. Same values as :func:`finetune_generation.logprobs.sequence_logps`; for models with a plain
    output head the vocabulary projection runs only on the learned positions (most positions are prompt), and
    the tokens every row starts with (the system prompt, the chat header; for a pair, the prompt too when the
    batch is one pair) are computed once when ``causal_lm.shared_prefix_length`` finds that exact and cheaper,
    as ``causal_lm.answer_loss`` does. ``path``: how to compute (:func:`answer_path`; by default ``model``'s
    own), given by a reference pass so that it follows its policy's."""
    import torch

    from finetune_generation.logprobs import sequence_logps

    use_head, prefix = path if path is not None else answer_path(model, batch)
    head = _plain_head(model) if use_head else None
    if head is None:
        return sequence_logps(model, batch)
    labels = batch["labels"]
    size, width = labels.shape
    counts = (labels[:, 1:] != IGNORE).sum(-1)
    target = torch.full_like(labels, IGNORE)  # target[:, t] = the token position t predicts
    target[:, :-1] = labels[:, 1:]
    row_of = torch.arange(size, device=labels.device)[:, None].expand(size, width)
    if prefix:  # the rows' shared start (system prompt, chat header, a pair's prompt) computed once
        keep, positions, allowed = shared_prefix_layout(batch["attention_mask"], prefix)
        out = model(input_ids=batch["input_ids"][keep][None], attention_mask=allowed[None, None],
                    position_ids=positions[None], use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden, target, rows = out.hidden_states[-1][0], target[keep], row_of[keep]
    else:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden, rows = out.hidden_states[-1], row_of
    learned = target != IGNORE
    logits = head(hidden[learned]).float()
    picked = logits.gather(-1, target[learned].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    sums = torch.zeros(size, dtype=picked.dtype, device=picked.device).index_add(0, rows[learned], picked)
    return sums, counts


def mismatched_batch(batch: dict[str, Any], pad_id: int, max_length: int) -> dict[str, Any]:
    """KTO's KL rows: row ``i`` is the prompt of row ``i`` followed by the answer (and its labels) of row
    ``i + 1`` (wrapping around) of a right-padded batch; a one-row batch pairs the row with itself."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    size = ids.shape[0]
    parts = []
    for i in range(size):
        n = int(mask[i].sum())
        start = int((labels[i, :n] != IGNORE).nonzero()[0, 0])
        parts.append((ids[i, :start].tolist(), ids[i, start:n].tolist(), labels[i, start:n].tolist()))
    rows = []
    for i in range(size):
        prompt, (answer, learned) = parts[i][0], parts[(i + 1) % size][1:]
        rows.append({"input_ids": (prompt + answer)[:max_length],
                     "labels": ([IGNORE] * len(prompt) + learned)[:max_length]})
    out = collate(rows, pad_id)
    return {k: v.to(ids.device) for k, v in out.items()}


__all__ = ["PreferenceOptions", "PreferenceTuning"]
