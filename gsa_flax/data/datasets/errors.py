"""The error every dataset module raises for data that is missing or unreadable."""

from gsa_flax import errors


class DatasetNotFoundError(errors.UserError):
  """A dataset is not prepared in the data directory, or its source files are unusable.

  The message is one line naming the path and the fix.
  """
