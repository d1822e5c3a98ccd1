"""The hooks: every function finetune calls in a plugin's module.

A plugin is an ordinary Python package that names a module in the ``finetune``
entry-point group::

    # the plugin's pyproject.toml
    [project.entry-points.finetune]
    my_plugin = "my_plugin"

and implements some of the hooks below in that module with the
:data:`finetune.hookimpl` marker::

    from finetune import hookimpl

    @hookimpl
    def finetune_register_tasks(register):
        from my_plugin.task import MyTask   # keep torch imports out of the module top
        register(MyTask)

Rules of the house:

* The plugin's top-level module must import quickly: no torch, transformers,
  timm or peft at import time. The CLI loads every plugin at start-up to
  collect commands and tasks; ``finetune --help`` must stay fast. Import heavy
  libraries inside Task methods.
* Use only the public names exported by :mod:`finetune` (see
  ``finetune.__all__``); the rest of the core may change without notice.
* ``FINETUNE_HOOK_VERSION`` in :mod:`finetune` is the contract's version. A
  plugin may declare ``finetune_hook_version = "1"`` at module level; a
  plugin declaring another major version is refused with a message.
"""

from __future__ import annotations

import pluggy

#: The contract's version. A plugin may declare ``finetune_hook_version = "1"`` at module level; a plugin
#: declaring another major version is refused with a message naming it (the others still load).
HOOK_VERSION = "1"

hookspec = pluggy.HookspecMarker("finetune")
#: Marks a plugin's hook implementations: ``@hookimpl def finetune_register_tasks(register): ...``.
hookimpl = pluggy.HookimplMarker("finetune")


@hookspec
def finetune_register_tasks(register):
    """Register task families (subclasses of :class:`finetune.Task`).

    Called once, when the plugin manager is first built (every CLI start).

    :param register: call ``register(TaskClass)`` once per task. The task's
        name is ``TaskClass.name`` (e.g. ``"text-classification"``). Two
        plugins registering the same name is an error naming both
        distributions; nothing is silently shadowed.
    :returns: nothing (the return value is ignored).
    """


@hookspec
def finetune_register_callbacks(register):
    """Register observers of training-loop events (loggers, early-stopping rules).

    Called at the start of every training run. A callback observes every run, whatever its task
    (read ``run.info()`` or ``state`` to tell runs apart).

    :param register: call ``register(callback)`` with an object that has any of the methods of
        :class:`finetune.Callback` (``on_train_start``, ``on_log``, ``on_evaluate``, ``on_checkpoint``,
        ``on_train_end``; all optional, all called with keyword arguments). Callbacks observe; the only
        way they may change the loop's course is ``state.should_stop = True``.
    :returns: nothing.
    """


@hookspec
def finetune_register_commands(cli):
    """Add commands to the ``finetune`` command-line interface.

    :param cli: the root :class:`click.Group`; call ``cli.add_command(cmd)``
        or decorate functions with ``@cli.command()``. Import heavy libraries
        inside the command's function body, not at module level.
    :returns: nothing.
    """


@hookspec(firstresult=True)
def finetune_resolve_backbone(name, trust_remote_code):
    """Turn a backbone name from a recipe into local model files.

    Called when ``[model] backbone`` is not an existing local folder, before
    the local Hugging Face cache is consulted. The first plugin that
    returns something other than ``None`` wins; return ``None`` for names you
    do not know. This is how the offline model zoo works and how a company
    plugs in its private model store.

    :param name: the backbone string as written in the recipe
        (e.g. ``"sentence-transformers/all-MiniLM-L6-v2"``).
    :param trust_remote_code: whether the recipe allows remote code.
    :returns: ``None``, or a :class:`finetune.ResolvedBackbone` whose ``path``
        is a folder that ``from_pretrained`` can load, with ``upstream_id``
        (the true Hub id, used on model cards) and ``source`` (a human
        readable provenance string, recorded in the run folder).
    """


@hookspec
def finetune_offline_backbones():
    """Name the backbones this plugin's ``finetune_resolve_backbone`` serves without the network.

    Called only when a backbone cannot be resolved: the error lists these names and suggests the closest
    one to a mistyped name (``all-MiniLM-L6-v3`` -> ``sentence-transformers/all-MiniLM-L6-v2``). Keep it
    cheap: return names from a constant, without loading or converting anything.

    :returns: a list of names a recipe's ``model.backbone`` may hold (the canonical name of each backbone,
        e.g. its Hub id; a name's last ``/`` part is matched too, so aliases need not be listed).
    """


@hookspec
def finetune_register_rewards(register):
    """Register reward functions by name: what tasks that learn from rewards (the generation plugin's
    ``grpo`` task: ``[task] rewards = {"exact-number" = 1.0}``) score generated text with.

    Called once, the first time a task asks for reward functions (:func:`finetune.reward_functions`).

    :param register: call ``register(name, function, description="...")`` once per function. ``name`` is
        what recipes write (lower-case words joined by ``-``); ``function(completions, examples)`` gets the
        generated texts and, for each, its data row as a dict (every field, plus ``"prompt"`` and
        ``"reference"``) and returns one number per completion (higher is better). Two plugins registering
        the same name is an error naming both. See :class:`finetune.RewardFunction`.
    :returns: nothing.
    """


@hookspec
def finetune_claim_data(probe):
    """Say whether a data path fits one of this plugin's tasks, for ``finetune init DATA``.

    Called once per ``finetune init``, with the same probe for every plugin. Look only at what the probe
    offers (it reads each file once and caches it: ``probe.table``, ``probe.json``, ``probe.head_lines``,
    ``probe.tree``, ``probe.child(name)``); do not read the data yourself, and import nothing heavy.

    :param probe: a :class:`finetune.DataProbe` of the path the user gave (a file or a folder).
    :returns: ``None`` (not mine), a :class:`finetune.Claim`, or a list of them (several tasks, or an
        alternative with a lower score). A claim names the task, a score in 0..1, the reasons in words and
        the recipe settings it proposes (backbone, data paths and columns, a few training values), each
        with a short comment. ``finetune init`` takes the best claim of all plugins, refuses with the
        candidates listed when two tasks score alike, and ``--task`` picks one of the claimed tasks.
    """
