"""``grpo``: reinforcement learning with verifiable rewards (Group Relative Policy Optimization) for a causal LM.

For every prompt of a training batch the policy (the model with its LoRA adapter) samples
``task.group_size`` completions (KV-cached ``generate`` at ``task.temperature``), reward functions chosen
by name in the recipe (``task.rewards = {name = weight}``; built-ins of this plugin or any plugin's
``finetune_register_rewards``) score them, each completion's advantage is its weighted reward relative to
its group, and the loss is the clipped policy-gradient surrogate plus ``task.kl_weight`` times a KL
estimate to the reference model (the backbone with the adapter disabled): see ``grpo_losses``.

Data: chat ``messages`` (the prompt is every turn before the last assistant turn, the reference answer that
turn; a conversation ending with a user turn is a prompt without reference) or prompt / completion rows
(the completion is the reference; the completion column may be absent: prompts only). Rewards that need a
reference (``exact-number``, ``exact-match``) refuse prompt-only data before the run starts.

Evaluation: greedy answers to every eval prompt, scored by the same rewards: ``reward`` (weighted sum, the
default selection metric, higher is better), ``reward_<name>`` per function and ``completion_length``
(tokens); the answers and their rewards are written to ``samples/step-N.jsonl`` (step 0 too).

Sampling draws from torch's global RNG, which the core seeds from ``train.seed`` and saves in every
checkpoint (and restores around evaluations), so a run stopped and resumed samples the same completions
as an uninterrupted one.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from finetune import DataError, PathStr, RecipeError, RewardFunction, did_you_mean, reward_functions
from finetune_generation.causal_lm import SAMPLES_DIR, CausalLM, GenerationOptions, _one_line, _write_atomic
from finetune_generation.data import IGNORE, Example, TokenDataset, detect_shape, normalise
from finetune_generation.rewards import DEFAULT_ANSWER_REGEX, DEFAULT_FORMAT_REGEX, NEEDS_REFERENCE

REWARD_MODEL = "reward-model"  #: the reward name of task.reward_model's scores


class GRPOOptions(GenerationOptions):
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"exact-number": 1.0},
        description="Reward functions by name with their weights: {name = weight, ...}; a completion's reward is "
                    "the weighted sum. `finetune rewards` lists the names (built-ins: exact-number, exact-match, "
                    "format, length-penalty; plugins add more).")
    group_size: int = Field(8, ge=2, description="Completions sampled per prompt; advantages are rewards relative "
                                                 "to their group.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the training completions (> 0 to "
                                                      "train); evaluation answers are greedy; 0 = greedy for "
                                                      "`finetune predict`.")
    max_new_tokens: int = Field(64, gt=0, description="Most new tokens per sampled completion (and per evaluation "
                                                      "answer).")
    kl_weight: float = Field(0.04, ge=0, description="Weight of the KL term to the reference model (the backbone "
                                                     "with the adapter disabled); 0 = off (the reference pass is "
                                                     "skipped).")
    clip_range: float = Field(0.2, gt=0, lt=1, description="PPO clip range of the probability ratio (binds only "
                                                           "when a sampled group is reused; see docs/design.md).")
    scale_rewards: bool = Field(True, description="Divide advantages by their group's standard deviation (false: "
                                                  "only subtract the group mean, as in Dr. GRPO).")
    answer_regex: str = Field(DEFAULT_ANSWER_REGEX, description="exact-match reward: the regex whose first group "
                                                                "(else whole match) is compared.")
    format_regex: str = Field(DEFAULT_FORMAT_REGEX, description="format reward: the regex the whole completion must "
                                                                "match.")
    length_target: int = Field(100, gt=0, description="length-penalty reward: length above which completions are "
                                                      "penalised.")
    length_unit: Literal["characters", "words"] = Field("characters", description="length-penalty reward: what "
                                                                                  "length_target counts.")
    reward_model: PathStr | None = Field(
        None, description="A finished `reward-model` run folder: its scores join the rewards under the name "
        "`reward-model` (weigh it in `rewards`, e.g. {exact-number = 1.0, reward-model = 0.5}); each completion is "
        "scored with its prompt.")


def _prompt_length(item: dict[str, Any]) -> int:
    return len(item["prompt_ids"])


class GRPO(CausalLM):
    name = "grpo"
    description = "GRPO: reinforcement learning with verifiable rewards (sampled groups, reward functions by name)."
    task_options = GRPOOptions
    default_metric = "reward"
    metric_names = None  # reward, completion_length and reward_<name> for each function of task.rewards
    eval_pad_value = IGNORE

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self._rows: list[dict[str, Any]] = []  # reward inputs of every example of every built dataset
        self._rewards: dict[str, Any] = {}
        self._logs: dict[str, list[float]] = {}
        self._last_eval: list[dict[str, Any]] = []

    # -- data ----------------------------------------------------------
    def _examples(self, records: list[tuple[str, dict[str, Any]]], path: str, key: str,
                  shape: str | None) -> tuple[list[Example], str]:
        data = self.recipe.data
        if not records:
            raise DataError(f"{key}: {path} holds no prompts; GRPO needs at least one.")
        columns = set().union(*(rec.keys() for _, rec in records))
        if (data.shape == "auto" and data.messages_column not in columns and data.prompt_column in columns
                and data.completion_column not in columns):
            found = "prompt_completion"  # prompts only
        else:
            found = detect_shape(data, columns, path, key)
        if found not in ("messages", "prompt_completion"):
            raise DataError(f"{key}: {path} holds {found!r} data; GRPO learns from prompts: give chat `messages` "
                            f"(the last assistant turn, if any, is the reference answer) or {data.prompt_column!r} "
                            f"(+ {data.completion_column!r} as the reference) fields.")
        if shape is not None and found != shape:
            raise DataError(f"{key}: {path} holds {found!r} data but data.train holds {shape!r}; give both files "
                            "the same shape.")
        return [self._example(where, rec, found, key) for where, rec in records], found

    def _example(self, where: str, rec: dict[str, Any], shape: str, key: str) -> Example:
        data = self.recipe.data
        if shape == "messages":
            turns = rec.get(data.messages_column)
            has_answer = isinstance(turns, list) and any(isinstance(t, dict) and t.get("role") == "assistant"
                                                         for t in turns)
            if isinstance(turns, list) and turns and not has_answer:  # a prompt without reference
                checked = normalise([(where, {data.messages_column: [*turns, {"role": "assistant", "content": "-"}]})],
                                    data, shape, key)[0].messages[:-1]
                messages, reference = checked, None
            else:
                messages = normalise([(where, rec)], data, shape, key)[0].messages
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                messages, reference = messages[:last], messages[last]["content"]
            users = [m for m in messages if m["role"] == "user"]
            if not users or not users[-1]["content"].strip():
                raise DataError(f"{key}: {where}: no (non-empty) user message before the answer: GRPO needs a prompt "
                                "to sample completions for (fill it or remove the line).")
            example = Example(where=where, messages=messages)
            prompt = users[-1]["content"]
        else:
            given = rec.get(data.completion_column) is not None
            checked = normalise([(where, rec if given else {**rec, data.completion_column: "-"})], data, shape,
                                key)[0]
            reference = checked.completion if given else None
            example = Example(where=where, prompt=checked.prompt, plain_prompt=checked.plain_prompt)
            prompt = checked.prompt or ""
        example.extra = {"row": {**rec, "prompt": prompt, "reference": reference}}
        return example

    def prepare_data(self) -> Any:
        if self.recipe.task.temperature <= 0:
            raise RecipeError("task.temperature: GRPO learns from sampled completions, so training needs a "
                              "temperature > 0 (1.0 is usual); 0 (greedy) is for `finetune predict` only.")
        splits = super().prepare_data()
        self._check_rewards([*splits.train, *splits.eval])
        self._info["rewards"] = dict(self.recipe.task.rewards)
        return splits

    def _check_rewards(self, examples: list[Example]) -> None:
        chosen = self.recipe.task.rewards
        if not chosen:
            raise RecipeError("task.rewards is empty; name at least one reward function with its weight, e.g. "
                              "rewards = {exact-number = 1.0} (`finetune rewards` lists them).")
        for key in ("answer_regex", "format_regex"):
            try:
                re.compile(getattr(self.recipe.task, key))
            except re.error as exc:
                raise RecipeError(f"task.{key}: {getattr(self.recipe.task, key)!r} is not a valid regular expression "
                                  f"({exc}).") from None
        known = self._known_rewards()
        for name in chosen:
            if name == REWARD_MODEL and name not in known:
                raise RecipeError(f"task.rewards: {REWARD_MODEL!r} scores completions with a trained reward model; "
                                  "set task.reward_model to a finished reward-model run folder.")
            if name not in known:
                raise RecipeError(f"task.rewards: no reward function {name!r}{did_you_mean(name, list(known))}. "
                                  f"Known: {', '.join(sorted(known))} (`finetune rewards` lists them with their "
                                  "plugins; a plugin registers more with the finetune_register_rewards hook).")
        if REWARD_MODEL in known and REWARD_MODEL not in chosen:
            raise RecipeError(f"task.reward_model is set, but task.rewards gives {REWARD_MODEL!r} no weight; add it "
                              f"(e.g. rewards = {{exact-number = 1.0, {REWARD_MODEL} = 0.5}}) or unset "
                              "task.reward_model.")
        self._rewards = {name: known[name] for name in chosen}
        missing = next((e for e in examples if e.extra["row"]["reference"] is None), None)
        needing = [n for n in chosen if n in NEEDS_REFERENCE]
        if missing is not None and needing:
            raise DataError(f"task.rewards: {needing[0]!r} compares completions with the reference answer, and "
                            f"{missing.where} has none (a prompt only). Add reference answers (the last assistant "
                            "turn, or a completion field) or choose rewards that need none.")
        # A trial call before anything is trained (or a run folder made): a reward function that raises or
        # returns no finite number fails now, named with its plugin (PluginError), not after the first samples.
        rows = [{**e.extra["row"], "_options": self._reward_options()} for e in examples[:4]]
        texts = [str(row["reference"] or "") for row in rows]
        self._score(texts, rows)

    def _known_rewards(self) -> dict[str, RewardFunction]:
        """The registered reward functions, plus ``reward-model`` when ``task.reward_model`` names a run."""
        known = dict(reward_functions())
        path = self.recipe.task.reward_model
        if path:
            if REWARD_MODEL in known:
                raise RecipeError(f"task.reward_model: a plugin ({known[REWARD_MODEL].plugin}) registers a reward "
                                  f"function named {REWARD_MODEL!r} too; unset task.reward_model or uninstall it.")
            if not Path(path).is_dir():
                raise RecipeError(f"task.reward_model: {path} is not a folder; give a finished reward-model run "
                                  "folder (finetune run on a recipe with [task] name = \"reward-model\").")
            from finetune_generation.reward_model import load_reward_scorer

            known[REWARD_MODEL] = RewardFunction(name=REWARD_MODEL, function=load_reward_scorer(str(path)),
                                                 description=f"the reward model of {path}",
                                                 plugin="task.reward_model")
        return known

    def _reward_options(self) -> dict[str, Any]:
        opts = self.recipe.task
        return {"answer_regex": opts.answer_regex, "format_regex": opts.format_regex,
                "length_target": opts.length_target, "length_unit": opts.length_unit}

    def build_dataset(self, examples: Any, processor: Any, training: bool) -> Any:
        encoder = self._encoder(processor)
        limit = self.recipe.data.max_length
        options = self._reward_options()
        items = []
        for example in examples:
            ids = encoder.prompt_ids(example)
            if len(ids) > limit:
                raise DataError(f"data.max_length: the prompt of {example.where} has {len(ids)} tokens, more than "
                                f"data.max_length = {limit}; raise data.max_length (it bounds the prompts; "
                                "task.max_new_tokens bounds the completions).")
            items.append({"prompt_ids": ids, "row": len(self._rows)})
            self._rows.append({**example.extra["row"], "_options": options})
        return TokenDataset(items, length=_prompt_length)  # prompt ids, their row in self._rows

    def collate_fn(self, processor: Any):
        pad_id = processor.pad_token_id

        def fn(items: list[dict[str, Any]]) -> dict[str, Any]:
            import torch

            width = max(len(x["prompt_ids"]) for x in items)
            ids = torch.full((len(items), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(items), width), dtype=torch.long)
            for i, x in enumerate(items):  # left padding: every prompt ends where generation starts
                ids[i, width - len(x["prompt_ids"]):] = torch.tensor(x["prompt_ids"], dtype=torch.long)
                mask[i, width - len(x["prompt_ids"]):] = 1
            return {"input_ids": ids, "attention_mask": mask,
                    "row": torch.tensor([x["row"] for x in items], dtype=torch.long)}

        return fn

    def speed_notes(self) -> list[str]:
        opts = self.recipe.task
        return [f"each training prompt samples {opts.group_size} completions of at most {opts.max_new_tokens} tokens "
                f"(task.group_size, task.max_new_tokens): a step costs about group_size generations"]

    # -- training ------------------------------------------------------
    def _generate(self, model: Any, batch: dict[str, Any], repeat: int, sample: bool) -> tuple[Any, Any]:
        """``(completion ids [rows * repeat, new], completion mask)``: the mask covers each completion's tokens
        up to and including its end token (what it stopped with is learned) and nothing after it."""
        import torch

        from finetune_generation.generate import generation_kwargs
        from finetune_generation.logprobs import unwrap

        opts = self.recipe.task
        peft_model = unwrap(model)
        stop = self.encoder.stop_ids
        kwargs = generation_kwargs(opts, stop, peft_model.config.pad_token_id)
        if not sample:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        was_training = peft_model.training
        peft_model.eval()
        try:
            with torch.no_grad():
                seqs = sample_groups(peft_model, batch["input_ids"], batch["attention_mask"], repeat, kwargs)
        finally:
            peft_model.train(was_training)
        new = seqs[:, batch["input_ids"].shape[1]:]
        is_stop = torch.isin(new, torch.tensor(stop, device=new.device))
        after_stop = (is_stop.long().cumsum(1) - is_stop.long()) > 0
        return new, ~after_stop

    def _texts(self, new: Any, keep: Any) -> list[str]:
        stop = set(self.encoder.stop_ids)
        out = []
        for row, m in zip(new.tolist(), keep.tolist()):
            tokens = [t for t, k in zip(row, m) if k and t not in stop]
            out.append(self.encoder.tokenizer.decode(tokens, skip_special_tokens=True))
        return out

    def _score(self, texts: list[str], rows: list[dict[str, Any]]) -> tuple[list[float], dict[str, list[float]]]:
        if not self._rewards:  # `finetune evaluate RUN`: prepare_data did not run; names were checked in training
            known = self._known_rewards()
            self._rewards = {name: known[name] for name in self.recipe.task.rewards}
        per = {name: self._rewards[name](texts, rows) for name in self._rewards}
        weights = self.recipe.task.rewards
        total = [sum(weights[name] * per[name][i] for name in per) for i in range(len(texts))]
        return total, per

    def training_loss(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch

        from finetune_generation.grpo_losses import group_advantages, grpo_loss
        from finetune_generation.logprobs import reference

        opts = self.recipe.task
        group = opts.group_size
        new, keep = self._generate(model, batch, group, sample=True)
        rows = [self._rows[i] for i in batch["row"].tolist() for _ in range(group)]
        texts = self._texts(new, keep)
        total, per = self._score(texts, rows)
        rewards = torch.tensor(total, dtype=torch.float32, device=new.device)
        advantages = group_advantages(rewards, group, scale=opts.scale_rewards)
        grouped = rewards.view(-1, group)
        self._log("reward", grouped.mean().item())
        self._log("reward_std", grouped.std(dim=1).mean().item())
        self._log("groups_with_signal", (grouped != grouped[:, :1]).any(1).float().mean().item())
        self._log("completion_length", keep.sum(1).float().mean().item())
        for name, values in per.items():
            self._log(f"reward_{name}", sum(values) / len(values))
        share = 1.0
        if opts.kl_weight == 0:  # rows of groups without signal add exactly 0 to the loss and its gradient
            prompts, kept, share = groups_with_signal(rewards, group)
            if share < 1:
                batch = {**batch, "input_ids": batch["input_ids"][prompts],
                         "attention_mask": batch["attention_mask"][prompts]}
                new, keep, advantages = new[kept], keep[kept], advantages[kept]
        inputs = self._sequences(batch, new, keep, group)
        logps = completion_logps(model, inputs)
        if opts.kl_weight > 0:
            with reference(model) as ref_model:
                ref_logps = completion_logps(ref_model, inputs)
        else:  # no KL term: the reference pass (a third of a step) is skipped; kl is not logged
            ref_logps = logps.detach()
        loss, kl = grpo_loss(logps, logps.detach(), ref_logps, keep, advantages, opts.clip_range, opts.kl_weight)
        if opts.kl_weight > 0:
            self._log("kl", kl.item())
        return loss * share  # the mean over every sampled row, as if the skipped ones (all 0) were there


    def _sequences(self, batch: dict[str, Any], new: Any, keep: Any, group: int) -> dict[str, Any]:
        return {"prompt_ids": batch["input_ids"], "prompt_mask": batch["attention_mask"], "completion_ids": new,
                "completion_mask": keep, "group": group}

    def _log(self, name: str, value: float) -> None:
        self._logs.setdefault(name, []).append(value)

    def training_logs(self) -> dict[str, float]:
        """Means of what training measured since the last call: reward (weighted), reward_std (within groups,
        mean over groups), groups_with_signal (the share of groups whose answers did not all score the same:
        the others teach nothing), kl, completion_length (tokens) and reward_<name> per function."""
        out = {name: sum(values) / len(values) for name, values in self._logs.items() if values}
        self._logs = {}
        return out

    # -- evaluation ----------------------------------------------------
    def evaluation_step(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        new, keep = self._generate(model, batch, 1, sample=False)
        texts = self._texts(new, keep)
        lengths = keep.sum(1).tolist()
        rows = batch["row"].tolist()
        return {"predictions": [{"text": t, "tokens": n} for t, n in zip(texts, lengths)],
                "references": rows}

    def compute_metrics(self, predictions: Any, references: Any) -> dict[str, Any]:
        rows = [self._rows[int(i)] for i in references]
        texts = [p["text"] for p in predictions]
        total, per = self._score(texts, rows)
        n = max(1, len(texts))
        metrics: dict[str, Any] = {"reward": sum(total) / n}
        for name, values in per.items():
            metrics[f"reward_{name}"] = sum(values) / n
        metrics["completion_length"] = sum(p["tokens"] for p in predictions) / n
        order = sorted(range(len(rows)), key=lambda i: int(references[i]))
        self._last_eval = [{"prompt": rows[i]["prompt"], "reference": rows[i]["reference"], "completion": texts[i],
                            "reward": total[i], "rewards": {name: per[name][i] for name in per}} for i in order]
        return metrics

    def finalize_eval(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return metrics

    def after_evaluate(self, model: Any, processor: Any, run_path: Path, step: int,
                       metrics: dict[str, Any]) -> None:
        folder = Path(run_path) / SAMPLES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        rows = [{"step": step, **row} for row in self._last_eval]
        _write_atomic(folder / f"step-{step:08d}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def finalize_run(self, run_path: Path, metrics: dict[str, Any]) -> None:
        metrics.setdefault("data", {}).update({k: v for k, v in self._info.items() if k in ("shape", "rewards")})
        best = metrics.get("best", {})
        step = best.get("step")
        path = Path(run_path) / SAMPLES_DIR / f"step-{step:08d}.jsonl" if isinstance(step, int) else None
        if path is not None and path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            print(f"\nsample answers (eval prompts, step {step}):", file=sys.stderr)
            for row in rows[:3]:
                print(f"  prompt:    {_one_line(row['prompt'])}\n  answer:    {_one_line(row['completion'])} "
                      f"(reward {row['reward']:.2f})\n  reference: {_one_line(str(row['reference']))}",
                      file=sys.stderr)


def groups_with_signal(rewards: Any, group: int) -> tuple[Any, Any, float]:
    """``(prompts, rows, share)``: the index of each prompt whose ``group`` sampled answers did not all score
    the same, the index of those groups' rows in ``rewards`` (``[prompts * group]``, each group consecutive),
    and the share of groups kept. The other groups have zero advantages: without a KL term their rows add
    exactly 0 to the loss and its gradient, so the policy pass skips them (with a weak policy or easy prompts
    that is often half of them) and multiplies the mean over the kept rows by ``share``: the mean over all
    rows, the same loss. With no group informative, the first is kept (a zero loss that still has a graph)."""
    import torch

    grouped = rewards.view(-1, group)
    informative = (grouped != grouped[:, :1]).any(1)
    prompts = informative.nonzero().flatten()
    if not len(prompts):
        prompts = torch.zeros(1, dtype=torch.long, device=rewards.device)
    rows = (prompts[:, None] * group + torch.arange(group, device=rewards.device)).flatten()
    return prompts, rows, len(prompts) / len(grouped)


def _cache_key(model: Any) -> tuple[str, bool]:
    """``(name of the forward's cache argument, whether the forward takes logits_to_keep)``."""
    import inspect

    from finetune_generation.logprobs import unwrap

    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    parameters = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters  # 5.x: cache


def sample_groups(model: Any, prompt_ids: Any, prompt_mask: Any, repeat: int, kwargs: dict[str, Any],
                  share_prompt: bool = True) -> Any:
    """``generate`` ``repeat`` continuations of each (left-padded) prompt, the ``repeat`` of one prompt
    consecutive: ``[prompts * repeat, width + new]`` token ids. The prompts are computed once (all but their
    last token, into a KV cache that is then repeated for the group) instead of once per sampled row: with
    the quickstart's ~40-token prompts, groups of 8 and ~12-token answers that is most of the work of
    sampling. Models whose forward lacks ``logits_to_keep`` or whose cache cannot be repeated (and
    ``share_prompt=False``) generate from the repeated prompts; tests check that both give the same tokens."""
    import torch

    ids = prompt_ids.repeat_interleave(repeat, 0)
    mask = prompt_mask.repeat_interleave(repeat, 0)
    extra: dict[str, Any] = {}
    cache_key, keeps_logits = _cache_key(model)
    head, head_mask = prompt_ids[:, :-1], prompt_mask[:, :-1]
    if share_prompt and repeat > 1 and keeps_logits and head.shape[1] and bool((head_mask.sum(1) > 0).all()):
        positions = (head_mask.cumsum(1) - 1).clamp(min=0)  # as generate numbers them (left padding)
        with torch.no_grad():
            out = model(input_ids=head, attention_mask=head_mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1)
        cache = out.get("cache", out.get("past_key_values"))
        if cache is not None and hasattr(cache, "batch_repeat_interleave"):
            cache.batch_repeat_interleave(repeat)
            extra[cache_key] = cache  # generate computes only the prompts' last token, then samples on
    return model.generate(input_ids=ids, attention_mask=mask, **kwargs, **extra)


def completion_logps(model: Any, inputs: dict[str, Any]) -> Any:
    """``[rows, new]`` log-probabilities of each sampled completion's tokens given its prompt.

    ``inputs``: ``prompt_ids`` / ``prompt_mask`` (``[prompts, length]``, left-padded), ``completion_ids`` /
    ``completion_mask`` (``[prompts * group, new]``: the ``group`` completions of each prompt consecutive) and
    ``group``. The prompt of a group is computed once: its keys and values (with their gradient) are
    repeated for the group's completions, which then run as a continuation (the KV cache of generation,
    kept differentiable). For the quickstart (40 prompt tokens, ~12 per answer, groups of 8) this is about
    a third of the tokens of running every (prompt + completion) row. Only the positions that predict a
    completion token go through the output head. Models whose forward lacks ``logits_to_keep`` or whose
    cache cannot be repeated take the plain path (every row in full); tests check both give the same."""
    import torch

    prompt, pmask = inputs["prompt_ids"], inputs["prompt_mask"]
    new, keep, group = inputs["completion_ids"], inputs["completion_mask"], inputs["group"]
    rows_mask = pmask.repeat_interleave(group, 0)
    attention = torch.cat([rows_mask, keep.long()], 1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    width, n = prompt.shape[1], new.shape[1]
    cache_key, keeps_logits = _cache_key(model)
    logits = None
    if keeps_logits and inputs.get("share_prompt", True):
        out = model(input_ids=prompt, attention_mask=pmask, position_ids=positions[::group, :width], use_cache=True,
                    logits_to_keep=1)
        cache = out.get("cache", out.get("past_key_values"))  # not the deprecated attribute
        if cache is not None and hasattr(cache, "batch_repeat_interleave"):
            cache.batch_repeat_interleave(group)
            rest = model(input_ids=new, attention_mask=attention, position_ids=positions[:, width:],
                         use_cache=True, **{cache_key: cache})
            logits = torch.cat([out.logits[:, -1:].repeat_interleave(group, 0), rest.logits[:, :-1]], 1)
    if logits is None:
        ids = torch.cat([prompt.repeat_interleave(group, 0), new], 1)
        kwargs = {"input_ids": ids, "attention_mask": attention, "position_ids": positions, "use_cache": False}
        if keeps_logits:
            logits = model(**kwargs, logits_to_keep=n + 1).logits[:, :-1]
        else:
            logits = model(**kwargs).logits[:, width - 1:-1]
    logits = logits.float()
    return torch.gather(logits, -1, new.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


__all__ = ["GRPO", "GRPOOptions", "completion_logps", "groups_with_signal", "sample_groups"]
