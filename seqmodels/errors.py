"""The one exception type for mistakes a user can fix.

Command-line entry points catch `UserError` and print its message as a single line, so bad input
never ends in a deep traceback. The message names the problem and the fix.
"""


class UserError(Exception):
  """A problem with the user's input (config, files, flags) and how to fix it."""
