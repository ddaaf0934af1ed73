"""The one exception users see: bad input, named.

Command lines (:mod:`jaxformer.commands.cli`) print an :class:`InputError` as ``error: <message>`` with no
traceback, so its message must name what is wrong: the file, key, value or line, and the fix.
"""


class InputError(ValueError):
    """A problem with what the user gave: a file, a setting, a checkpoint, a request."""


class CheckpointError(InputError):
    """A checkpoint that is damaged, foreign, or does not fit its config: names the key, file or shapes."""
