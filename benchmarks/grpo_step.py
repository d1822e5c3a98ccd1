"""Time the parts of one GRPO training step on the SFT quickstart's adapter: sampling the groups (prompts
computed once per group, or once per sampled row as before) and the policy pass (forward + backward).

Real prompts (the first ``--prompts`` of ``recipes/data/arithmetic_prompts.jsonl``, the chat template of the
run), the run's adapter made trainable, bf16 autocast where the CPU has native bf16 (as training uses it).
Alternates the two sampling variants (A B A B ...) and reports the median of ``--repeats``.

    python benchmarks/grpo_step.py runs/generation-quickstart --prompts 4 --group 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    import torch

    from finetune import load_run
    from finetune_generation.grpo import completion_logps, sample_groups

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished causal-lm (SFT) run folder")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto")
    args = parser.parse_args()

    task, model, processor = load_run(args.run)[:3]
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    rows = [json.loads(x) for x in (HERE.parent / "recipes/data/arithmetic_prompts.jsonl").read_text().splitlines()]
    prompts = [processor.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=True)
               for r in rows[:args.prompts]]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), processor.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    stop = [processor.convert_tokens_to_ids("<|im_end|>"), processor.eos_token_id]
    kwargs = {"max_new_tokens": args.max_new_tokens, "eos_token_id": stop, "pad_token_id": processor.pad_token_id,
              "use_cache": True, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": None}
    from finetune.engine.precision import resolve_mixed_precision

    bf16 = resolve_mixed_precision("auto") == "bf16" if args.bf16 == "auto" else args.bf16 == "yes"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    times: dict[str, list[float]] = {"sample, prompt once per group": [], "sample, prompt once per row": [],
                                     "policy pass (forward + backward)": []}
    torch.manual_seed(0)
    for _ in range(args.repeats):
        for share, label in ((True, "sample, prompt once per group"), (False, "sample, prompt once per row")):
            model.eval()
            t0 = time.perf_counter()
            with torch.no_grad(), autocast:
                seqs = sample_groups(model, ids, mask, args.group, kwargs, share_prompt=share)
            times[label].append(time.perf_counter() - t0)
        new = seqs[:, width:]
        is_stop = torch.isin(new, torch.tensor(stop))
        keep = ~((is_stop.long().cumsum(1) - is_stop.long()) > 0)
        model.train()
        t0 = time.perf_counter()
        with autocast:
            logps = completion_logps(model, {"prompt_ids": ids, "prompt_mask": mask, "completion_ids": new,
                                             "completion_mask": keep, "group": args.group})
        (logps * keep).sum().backward()
        model.zero_grad(set_to_none=True)
        times["policy pass (forward + backward)"].append(time.perf_counter() - t0)
    print(f"{args.prompts} prompts x {args.group} answers, <= {args.max_new_tokens} new tokens, prompt width {width}, "
          f"bf16 {bf16}, torch threads {torch.get_num_threads()}; median of {args.repeats} (all):")
    for label, values in times.items():
        print(f"  {label}: {statistics.median(values):.2f} s ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
