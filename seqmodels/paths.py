"""Joining untrusted names to a directory without leaving it.

Names read from files (a checkpoint's manifest or weight index, a sweep file) are data, not
trusted paths: `safe_join` refuses any that is absolute or climbs out with `..`. The check is on
the name, not on resolved links, so a directory whose files are links elsewhere (the Hugging Face
cache links snapshot files to blobs) still loads.
"""

import os

from seqmodels.errors import UserError


def safe_join(directory: str, name: str, *, what: str = "file") -> str:
  """directory/name, or a UserError if `name` is not a relative path that stays inside `directory`.

  `what` names the source of the name in the error, e.g. "checkpoint manifest entry".
  """
  if not isinstance(name, str) or not name or "\0" in name:
    raise UserError(f"{what} {name!r} in {directory} is not a file name; refusing to use it")
  parts = name.replace("\\", "/").split("/")
  if os.path.isabs(name) or name.startswith("\\") or ".." in parts:
    raise UserError(f"{what} {name!r} in {directory} leads outside its directory; refusing to use it")
  return os.path.join(directory, os.path.normpath(name))
