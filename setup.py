"""Installs seqmodels_lm_eval.pth into site-packages (see seqmodels_lm_eval_hook.py); the rest of
the packaging is in pyproject.toml.

A .pth file must sit in site-packages itself, outside any package, which pyproject.toml cannot
express; as a data file it lands there. An editable install (pip install -e) asks the distribution
for `has_data` where setuptools defines `has_data_files` (setuptools 84's editable_wheel
`_run_install("data")`), so without the alias below it would skip data files.
"""

import os
import sysconfig

from setuptools import setup
from setuptools.dist import Distribution


class _Distribution(Distribution):
  def has_data(self):
    return self.has_data_files()


site_packages = os.path.relpath(sysconfig.get_path("purelib"), sysconfig.get_path("data"))
setup(distclass=_Distribution, data_files=[(site_packages, ["seqmodels_lm_eval.pth"])])
