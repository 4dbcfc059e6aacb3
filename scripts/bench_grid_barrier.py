"""What a grid-wide barrier costs inside one Mosaic GPU kernel: the piece a persistent kernel needs to
run several stages of a decoding layer (the conv, x_proj's partial products, their reduction, the SSM
step) in one launch (kernels/NOTES.md, "Session 13").

  python scripts/bench_grid_barrier.py                      # 64, 128 and 132 blocks; 0, 1, 10, 100 barriers

One block per SM (at most the GPU's SM count, so that all are resident at once: a barrier over
blocks that cannot all run would never finish). The barrier: every block adds one to a global
semaphore and polls it, with plain loads, until the round's total (blocks x rounds so far). At the
end every block adds one to a second semaphore, and block 0 waits for all of them and takes both
back to 0, as global semaphores must be for the next launch. Each block counts the barriers it
passed and the script checks the counts. Prints the kernel's device time (CUPTI, median of
--repeats) against the number of barriers, and the time a barrier adds. Needs a Hopper GPU; the
CPU interpreter does not run `pl.get_global`.
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def barrier_kernel(blocks, count):
  """A kernel of `blocks` blocks that each pass `count` grid-wide barriers; returns (blocks, 128)
  float32, every element the number of barriers its block passed."""

  def kernel(out_gmem, out_smem):
    block = lax.axis_index("blocks")
    arrived = pl.get_global(plgpu.SemaphoreType.REGULAR(()))
    finished = pl.get_global(plgpu.SemaphoreType.REGULAR(()))

    def barrier(round_index, passed):
      plgpu.semaphore_signal(arrived, 1, memory_scope="gpu")
      # Polling without decrementing: a decrementing wait is a compare-and-swap loop, and all
      # blocks contending on one address made a barrier take 19 us (kernels/NOTES.md).
      plgpu.semaphore_wait(arrived, blocks * (round_index + 1), decrement=False, memory_scope="gpu")
      return passed + 1.0

    passed = lax.fori_loop(0, count, barrier, jnp.float32(0))
    if count:
      plgpu.semaphore_signal(finished, 1, memory_scope="gpu")

      @pl.when(block == 0)
      def _():  # Every block is past its last wait: both semaphores can go back to 0.
        plgpu.semaphore_wait(finished, blocks, memory_scope="gpu")
        plgpu.semaphore_signal(arrived, -blocks * count, memory_scope="gpu")

    out_smem[...] = jnp.full((128,), passed, jnp.float32)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[block])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((blocks, 128), jnp.float32),
                      scratch_types=[plgpu.SMEM((128,), jnp.float32)], grid=(blocks,), grid_names=("blocks",),
                      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--blocks", default="64,128,132", help="comma-separated block counts, each at most the SMs")
  parser.add_argument("--counts", default="0,1,10,100", help="comma-separated numbers of barriers a launch")
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit("error: bench_grid_barrier needs a GPU (Hopper); run it on the device machine")
  from jax.experimental.mosaic.gpu import profiler

  sms = jax.devices()[0].core_count
  for blocks in map(int, args.blocks.split(",")):
    if blocks > sms:
      raise SystemExit(f"error: --blocks {blocks} exceeds the {sms} SMs; blocks that cannot all be resident "
                       "would wait on each other forever")
    without = None
    for count in map(int, args.counts.split(",")):
      call = jax.jit(barrier_kernel(blocks, count))
      passed = call()
      if not bool(jnp.all(passed == count)):
        raise SystemExit(f"error: with {blocks} blocks and {count} barriers the blocks passed "
                         f"{sorted(set(passed[:, 0].tolist()))} barriers")
      measured = profiler.measure(call)
      us = statistics.median(1e3 * measured()[1] for _ in range(args.repeats + 1))
      without = us if count == 0 else without
      added = f", {(us - without) / count:.2f} us a barrier" if count and without is not None else ""
      print(f"{blocks} blocks, {count} barriers: {us:.2f} us{added}", flush=True)


if __name__ == "__main__":
  main()
