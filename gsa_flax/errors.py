"""The one error type every wing raises for a mistake of the user.

A :class:`UserError` is a bad config, dataset, workdir, checkpoint or weights file: its
message names the problem and the fix, and the command lines print it as one ``error:``
line with exit status 2 (:mod:`gsa_flax.tools.cli`), never a traceback. It lives below the
four wings so that the command line can catch every such error without importing them.
"""


class UserError(ValueError):
  """A mistake in what the user gave; the message says what is wrong and how to fix it."""
