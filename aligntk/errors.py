"""Errors that reach the user as one line, not a traceback."""

from __future__ import annotations


class AligntkError(Exception):
    """A mistake the user can fix (recipe, data, plugin, files). The CLI prints it in one line."""

    #: The command line's exit status for this error.
    exit_code: int = 1


class RecipeError(AligntkError):
    """The recipe is malformed: the message names the key path and what was expected."""


class DataError(AligntkError):
    """A data file or row is bad: the message names the file and line."""


class PluginError(AligntkError):
    """A plugin is broken, missing, or registers a name another plugin already has."""


class DuplicateComponentError(PluginError):
    """Two plugins registered the same component name: the message names both."""


class TrainingError(AligntkError):
    """Training cannot go on (a non-finite loss, for example); earlier checkpoints are kept."""


class Interrupted(AligntkError):
    """SIGTERM or SIGINT stopped the run after an optimizer step, with a checkpoint to resume from.

    The exit status is 75 (``EX_TEMPFAIL``: try again later), so a job script can tell a
    preempted run, to be resumed, from a failed one.
    """

    exit_code = 75
