"""The plugin contract: every hook finetune calls, documented.

This is the page a plugin author reads first. A plugin is an ordinary Python
package that names a module in the ``finetune`` entry-point group::

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

hookspec = pluggy.HookspecMarker("finetune")


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
    """Register observers of training-loop events.

    :param register: call ``register(callback)`` with an object that has any
        of these methods (all optional, all receive keyword arguments):

        * ``on_train_start(run, state)``
        * ``on_log(run, state, logs)``  -- after a logged training step; ``logs``
          is a dict of floats (``loss``, ``lr``, ``samples_per_s``, ...).
        * ``on_evaluate(run, state, metrics)`` -- after each evaluation;
          ``metrics`` is a dict such as ``{"eval_loss": .., "accuracy": ..}``.
        * ``on_checkpoint(run, state, path)`` -- after a checkpoint is written.
        * ``on_train_end(run, state, metrics)``

        ``run`` is the :class:`finetune.RunDir`, ``state`` the loop's
        :class:`finetune.LoopState` (``global_step``, ``epoch``, ...).
        Callbacks observe; the only way they may change the loop's control
        flow is to set ``state.should_stop = True`` (for example an
        early-stopping rule), which ends training after the current step
        with a final evaluation and save.
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
