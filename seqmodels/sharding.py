"""The device mesh, and the one place that decides where every array lives on it.

The mesh has the axes ('data', 'fsdp', 'tensor'):

  data    data parallelism: the batch is split, parameters are replicated.
  fsdp    ZeRO-3: the batch is split, and so is every parameter with its optimizer state; XLA
          all-gathers a weight where it is used and reduce-scatters its gradient.
  tensor  tensor parallelism (Megatron): heads, Mamba's inner channels, MLP hidden units and the
          vocabulary are split; every device of a tensor group sees the same batch rows.

Model code names logical axes only (layers.logical_axes on parameters, `constrain` on activations,
and the scan kernels' arguments below); PARAM_RULES and ACTIVATION_RULES map them onto the mesh.
The scan kernels run inside `shard_map` over the batch and the head / channel axes: their
recurrences are independent per batch row and per channel (or head), so each device scans its own
block and nothing is gathered.
"""

import functools
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import kernels
from seqmodels.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Parameters: each dimension's logical name -> the mesh axis that splits it, where it divides.
PARAM_RULES = {"vocab": "tensor", "heads": "tensor", "mlp": "tensor", "inner": "tensor", "embed": "fsdp"}
# Activations: the batch over data x fsdp, the tensor-parallel axes over tensor, the rest whole.
ACTIVATION_RULES = {"batch": BATCH_AXES, "heads": "tensor", "inner": "tensor"}


def mesh_shape(mesh_config, n_devices: int) -> tuple[int, ...]:
  sizes = [int(mesh_config[a]) for a in AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh {dict(zip(AXES, sizes))}: sizes must be positive, with at most one -1; "
                    "fix config.mesh")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if n_devices % fixed:
      raise UserError(f"mesh {dict(zip(AXES, sizes))} does not divide {n_devices} devices; fix config.mesh")
    sizes[free[0]] = n_devices // fixed
  if math.prod(sizes) > n_devices:
    raise UserError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but only "
                    f"{n_devices} are present; fix config.mesh")
  return tuple(sizes)


def make_mesh(mesh_config) -> Mesh:
  """A mesh over the first devices; fixed sizes may use fewer devices than are present.

  jax.devices() lists each process's devices together, so a process holds a contiguous block of
  the mesh, with the tensor axis innermost (the fastest links within a host).
  """
  devices = jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  if jax.process_count() > 1 and math.prod(shape) != len(devices):
    raise UserError(f"mesh {dict(zip(AXES, shape))} leaves some of the {len(devices)} devices of this "
                    f"{jax.process_count()}-process run idle; make config.mesh cover all of them")
  return Mesh(np.asarray(devices[:math.prod(shape)]).reshape(shape), AXES)


def tensor_parallel_widths(model_cfg) -> dict[str, int]:
  """The model dimensions that tensor parallelism splits inside the kernels, by config key."""
  widths = {}
  if "n_head" in model_cfg:
    widths["model.n_head"] = model_cfg.n_head
  if "expand" in model_cfg:
    widths["d_inner (model.expand x model.d_model)"] = model_cfg.expand * model_cfg.d_model
  return widths


def check_mesh(config, mesh: Mesh) -> None:
  """Raises UserError when the batch or the model cannot be split as the mesh asks."""
  rows = batch_divisor(mesh)
  if config.batch_size % rows:
    raise UserError(f"batch_size {config.batch_size} is not divisible by the {rows} devices on the mesh's batch "
                    "axes (data x fsdp); pick a multiple")
  tensor = mesh.shape["tensor"]
  for name, width in tensor_parallel_widths(config.model).items():
    if width % tensor:
      raise UserError(f"mesh.tensor={tensor} does not divide {name}={width}; pick a tensor size that divides it")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def param_spec(names, shape, mesh_sizes) -> P:
  """Where one parameter (or its optimizer moment) lives, from its dimensions' logical names.

  A dimension the rule's mesh axis does not divide stays whole. ZeRO-3 splits every parameter over
  fsdp: one without a divisible "embed" dimension splits its largest divisible one instead.
  """
  names = tuple(names or ()) + (None,) * (len(shape) - len(names or ()))
  spec = []
  for name, size in zip(names, shape):
    axis = PARAM_RULES.get(name)
    spec.append(axis if axis and axis not in spec and size % mesh_sizes[axis] == 0 else None)
  if "fsdp" not in spec and mesh_sizes["fsdp"] > 1:
    ways = [mesh_sizes[a] if a else 1 for a in spec]
    divisible = [i for i, size in enumerate(shape) if size % (ways[i] * mesh_sizes["fsdp"]) == 0]
    if divisible:
      i = max(divisible, key=lambda i: shape[i])
      spec[i] = "fsdp" if spec[i] is None else (spec[i], "fsdp")
  return P(*spec)


def place(abstract_tree, mesh: Mesh):
  """ShapeDtypeStructs of `abstract_tree` with their shardings: nnx Variables by their logical axes
  (so optimizer moments, which keep their parameter's metadata, land with it), anything else
  replicated."""
  sizes = dict(mesh.shape)

  def placed(leaf):
    if isinstance(leaf, nnx.Variable):
      value = leaf.get_value()
      names = leaf.get_metadata().get("out_sharding") or ()
      if leaf.get_metadata().get("stacked_layers"):  # model.scan_layers stacks the blocks on a leading axis.
        names = (None, *names)
      spec = param_spec(names, value.shape, sizes)
      return leaf.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec)))
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated(mesh))

  return jax.tree.map(placed, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def jit(mesh: Mesh, fn, **jit_kwargs):
  """jax.jit(fn) traced and run with `mesh` as the context mesh, which `constrain` and the kernel
  wrappers read."""
  jitted = jax.jit(fn, **jit_kwargs)

  @functools.wraps(fn)
  def on_mesh(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  def lower(*args):  # For ahead-of-time compilation (scripts/bench_train.py).
    with jax.set_mesh(mesh):
      return jitted.lower(*args)

  on_mesh.lower = lower
  return on_mesh


def context_mesh():
  """The mesh a `jit` above is tracing on, or None outside one (plain evaluation and decoding)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or set(mesh.axis_names) != set(AXES) else mesh


def _manual_axes() -> frozenset:
  """The mesh axes a shard_map above has made manual (accumulate.py's data-parallel groups): inside
  it arrays are already one group's block, so specs and sums leave those axes out."""
  mesh = jax.sharding.get_abstract_mesh()
  return frozenset() if mesh.empty else frozenset(mesh.manual_axes)


def activation_spec(*names) -> P:
  manual = _manual_axes()

  def axes(name):
    rule = ACTIVATION_RULES.get(name)
    kept = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if a not in manual)
    return kept[0] if len(kept) == 1 else kept or None

  return P(*(axes(name) for name in names))


def splits_data(mesh) -> bool:
  """Whether `mesh` (a context mesh, or None) splits the batch over a 'data' axis still to be
  mapped, so that data-parallel groups can each sum their own gradients first.

  Not where fsdp and tensor both split too: XLA's partitioner (jax 0.11.2) fails a check
  (spmd_partitioner_util.cc: partition group sizes) on the embedding's gather from a table split
  over both, inside a shard_map manual over 'data'."""
  if mesh is None or mesh.shape["data"] == 1 or "data" in _manual_axes():
    return False
  return mesh.shape["fsdp"] == 1 or mesh.shape["tensor"] == 1


def constrain(x, *names):
  """x laid out by the logical names of its dimensions; unchanged outside a mesh."""
  if context_mesh() is None:
    return x
  return jax.lax.with_sharding_constraint(x, activation_spec(*names))


def _run_local(kernel, arrays, out_names, **options):
  """kernel(**arrays, **options) run on each device's block, as laid out by the logical names.

  arrays: argument name -> (array or None, its dimensions' logical names); None arguments are left
  out. Outside a mesh, or on a mesh of one device, the kernel just runs.

  The backward pass is a second shard_map that recomputes the kernel on the block and takes its
  VJP there: XLA (jax 0.11.2, CPU and GPU) crashes compiling the transpose of a shard_map around
  the associative scan, and keeping no per-step residuals saves memory besides.
  """
  present = {k: a for k, (a, _) in arrays.items() if a is not None}
  mesh = context_mesh()
  if mesh is None or _mapped_size(mesh) == 1:  # One device holds every block: nothing to map or recompute.
    return kernel(**present, **options)
  in_specs = {k: activation_spec(*names) for k, (a, names) in arrays.items() if a is not None}
  out_specs = jax.tree.map(lambda names: activation_spec(*names), out_names,
                           is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, str) or n is None for n in x))

  def local(a):
    return kernel(**a, **options)

  outer_manual = _manual_axes()  # Read here: inside the maps below every axis is manual.

  def local_grads(a, cotangent):
    grads = jax.vjp(local, a)[1](cotangent)[0]
    # An argument the spec leaves whole on some mesh axes got one partial gradient per block there.
    return {k: _sum_over_unsplit_axes(g, in_specs[k], outer_manual) for k, g in grads.items()}

  # check_vma=False: the kernels start their carries from plain zeros, which JAX's varying-axis
  # typing would reject inside the map; the specs above say exactly how every block is laid out.
  forward = jax.shard_map(local, in_specs=(in_specs,), out_specs=out_specs, check_vma=False)
  backward = jax.shard_map(local_grads, in_specs=(in_specs, out_specs), out_specs=in_specs, check_vma=False)
  run = jax.custom_vjp(forward)
  run.defvjp(lambda a: (forward(a), a), lambda a, cotangent: (backward(a, cotangent),))
  return run(present)


def _mapped_size(mesh) -> int:
  """Devices over the axes no shard_map above has made manual: how many blocks a kernel sees."""
  manual = _manual_axes()
  return math.prod(mesh.shape[a] for a in AXES if a not in manual)


def _sum_over_unsplit_axes(x, spec: P, outer_manual):
  """x summed over the mesh axes that neither spec splits nor a shard_map outside the kernel's has
  made manual (its groups' sums meet later, accumulate.py)."""
  split = {axis for entry in spec if entry for axis in (entry if isinstance(entry, tuple) else (entry,))}
  unsplit = tuple(axis for axis in AXES if axis not in split and axis not in outer_manual)
  return jax.lax.psum(x, unsplit) if unsplit else x


def selective_scan(x, dt, A, B, C, D=None, *, z=None, dt_bias=None, h0=None, return_state=False, **options):
  """kernels.selective_scan (same arguments), each device scanning its batch rows and channels.

  B and C carry no channel axis; grouped ones (batch, length, groups, n) split their groups with the
  channels, which keeps channel c with its group c // (d // groups).
  """
  channels = ("batch", "length", "inner")
  groups = () if B.ndim == 3 else ("inner" if B.shape[2] > 1 else None,)
  arrays = {"x": (x, channels), "dt": (dt, channels), "A": (A, ("inner", None)),
            "B": (B, ("batch", "length", *groups, None)), "C": (C, ("batch", "length", *groups, None)),
            "D": (D, ("inner",)), "z": (z, channels), "dt_bias": (dt_bias, ("inner",)),
            "h0": (h0, ("batch", "inner", None))}
  out = (channels, ("batch", "inner", None)) if return_state else channels
  return _run_local(kernels.selective_scan, arrays, out, return_state=return_state, **options)


def linear_attention(q, k, v, log_decay=None, *, h0=None, return_state=False, **options):
  """kernels.linear_attention (same arguments), each device running its batch rows and heads."""
  heads = ("batch", "length", "heads", None)
  decay = None if log_decay is None else {1: ("heads",), 3: heads[:3], 4: heads}[log_decay.ndim]
  arrays = {"q": (q, heads), "k": (k, heads), "v": (v, heads), "log_decay": (log_decay, decay),
            "h0": (h0, ("batch", "heads", None, None))}
  out = (heads, ("batch", "heads", None, None)) if return_state else heads
  return _run_local(kernels.linear_attention, arrays, out, return_state=return_state, **options)


def causal_attention(q, k, v, implementation=None):
  """Causal softmax attention (jax.nn.dot_product_attention, with its `implementation`) on each
  device's batch rows and heads."""
  heads = ("batch", "length", "heads", None)
  return _run_local(functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=implementation),
                    {"query": (q, heads), "key": (k, heads), "value": (v, heads)}, heads)


def process_batch_slice(mesh: Mesh) -> tuple[int, int]:
  """(index, count): this process's devices hold slice `index` of the global batch cut in `count`.

  Processes whose devices share batch rows (a tensor group spanning hosts) get the same slice, and
  so read the same data.
  """
  rows = batch_divisor(mesh)
  row_of_device = {d: i // mesh.shape["tensor"] for i, d in enumerate(mesh.devices.flat)}
  mine = sorted({row_of_device[d] for d in mesh.devices.flat if d.process_index == jax.process_index()})
  if mine != list(range(mine[0], mine[0] + len(mine))) or rows % len(mine) or mine[0] % len(mine):
    raise UserError(f"mesh {dict(mesh.shape)} gives process {jax.process_index()} batch rows {mine} of {rows}, "
                    "not one equal slice; pick mesh sizes that split evenly over the processes")
  return mine[0] // len(mine), rows // len(mine)


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's slice of the rows (process_batch_slice) into global arrays sharded
  over the batch axes."""
  sharding = batch_sharding(mesh)
  _, count = process_batch_slice(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (len(v) * count, *np.shape(v)[1:]))
          for k, v in batch.items()}


def put_global_batch(batch: dict, mesh: Mesh) -> dict:
  """A batch every process holds whole (validation), sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_callback(np.shape(v), sharding, lambda index, v=v: np.asarray(v)[index])
          for k, v in batch.items()}


def initialize_distributed(distributed_config) -> None:
  """Joins the processes of a multi-host run; must come before any device work.

  An explicit coordinator_address (with num_processes and process_id) wins; `auto_detect` lets JAX
  find them itself (SLURM, Open MPI, Kubernetes, or JAX_COORDINATOR_ADDRESS and friends in the
  environment). Neither: one process.
  """
  cfg = distributed_config
  if jax.distributed.is_initialized() or not (cfg.coordinator_address or cfg.auto_detect):
    return
  if cfg.coordinator_address and not 0 <= cfg.process_id < cfg.num_processes:
    raise UserError(f"distributed.process_id={cfg.process_id} must be in [0, distributed.num_processes="
                    f"{cfg.num_processes}); set both for every process")
  try:
    if cfg.coordinator_address:
      jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    else:
      jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:
    raise UserError(f"jax.distributed.initialize failed ({str(e).splitlines()[0]}); check config.distributed "
                    "or the cluster environment") from None
