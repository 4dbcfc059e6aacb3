"""The device mesh and where arrays live on it.

The mesh has the axes ('data', 'fsdp', 'tensor'). The batch is split over data x fsdp; parameters
and optimizer state are replicated for now (the logical-axis rules for fsdp and tensor sharding
belong here, never inside layers).
"""

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from seqmodels.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


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
  """A mesh over the first devices; fixed sizes may use fewer devices than are present."""
  devices = jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices[:math.prod(shape)]).reshape(shape), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's local rows into one global array sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
