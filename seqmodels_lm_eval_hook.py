"""Makes lm-eval's own `lm_eval` command find the model "seqmodels" (seqmodels/lm_eval_adapter.py).

lm-eval 0.4 looks models up in a registry that only its package fills (lm_eval/models/__init__.py)
and has no plugin entry point. seqmodels_lm_eval.pth, installed next to this module in
site-packages, imports it at interpreter start; it then waits for lm-eval to fill that registry and
adds "seqmodels" as a lazy "module:class" name, so neither lm-eval nor seqmodels is imported before
a program asks for them. It runs in every Python process, so it imports nothing but sys.
"""

import sys

_WATCHED = "lm_eval.models"
_TARGET = "seqmodels.lm_eval_adapter:SeqmodelsLM"


def register() -> None:
  """Adds "seqmodels" to lm-eval's model registry unless a program registered it already."""
  from lm_eval.api.registry import model_registry
  if "seqmodels" not in model_registry:
    model_registry.register("seqmodels", target=_TARGET)


class _RegisterAfter:
  """lm_eval.models' own loader, then the registration."""

  def __init__(self, loader):
    self.loader = loader

  def create_module(self, spec):
    return self.loader.create_module(spec)

  def exec_module(self, module):
    self.loader.exec_module(module)
    register()

  def __getattr__(self, name):  # Resource readers, get_filename, ...
    return getattr(self.loader, name)


class _Finder:

  def find_spec(self, name, path, target=None):
    if name != _WATCHED:
      return None
    sys.meta_path.remove(self)  # One import of lm_eval.models is all it takes.
    for finder in sys.meta_path:
      spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
      if spec is not None:
        if spec.loader is not None:
          spec.loader = _RegisterAfter(spec.loader)
        return spec
    return None


def install() -> None:
  if _WATCHED in sys.modules:
    register()
  elif not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
