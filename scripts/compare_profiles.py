"""Reads `bench_train.py --profile` output offline: where two steps' device time differs, and what
the compiled step's loops run.

  python scripts/compare_profiles.py DIR [DIR_B] [--steps 3] [--top 25] [--hlo]

DIR is one config's profile directory (`bench_train.py --profile P` writes P/<index>_<config>/,
holding ops.tsv, every device op in time order, and hlo.txt.gz, the compiled step). The big
perfetto traces beside them are not read, so a device run may delete them before bringing the
directory back. Prints the device time a step by kernel family (a kernel's name without its
numbering: loop_add_fusion_1 and loop_add_fusion_7 are one family, memcpy128 is memcpy) and
category; with DIR_B, both side by side and B - A, the largest differences first: for instance
a step without `model.scan_layers` against one with it.

--hlo also reads each directory's compiled HLO: for the entry computation and every while loop's
body (with its trip count), the custom calls by target, copies, broadcasts and fusions and the
bytes their outputs write; then every custom call (the Mosaic GPU kernels among them) with where
it runs (inside a fusion, such as XLA's dynamic-slice fusion, it is named with the fusion) and
the ops that read its outputs. Two calls of one kernel on the same operands show as two lines.
"""

import argparse
import collections
import gzip
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from seqmodels import profiling  # noqa: E402

# A kernel's family: its name without the numbering XLA appends (fusion_12) or PTX names carry.
NUMBERING = re.compile(r"(_\d+)+$|(?<=[a-z])\d+$")
ARRAY_TYPE = re.compile(r"\b([a-z]+\d*[a-z\d]*)\[([\d,]*)\]")


def family(kernel):
  return NUMBERING.sub("", kernel)


def device_ms_by_family(directory, steps):
  """{(category, family): [ms a step, kernels a step]} from a profile directory's ops.tsv."""
  path = os.path.join(directory, "ops.tsv")
  if not os.path.exists(path):
    raise SystemExit(f"error: {path} not found: pass a config's directory under bench_train.py's "
                     "--profile folder (it holds ops.tsv and hlo.txt.gz)")
  totals = collections.defaultdict(lambda: [0.0, 0.0])
  with open(path) as f:
    header = f.readline().rstrip("\n").split("\t")
    column = {name: i for i, name in enumerate(header)}
    for line in f:
      fields = line.rstrip("\n").split("\t")
      key = (fields[column["category"]], family(fields[column["kernel"]]))
      totals[key][0] += float(fields[column["us"]]) / 1e3 / steps
      totals[key][1] += 1 / steps
  return totals


def print_families(directories, steps, top):
  tables = [device_ms_by_family(d, steps) for d in directories]
  keys = set().union(*tables)
  zero = [0.0, 0.0]
  if len(tables) == 1:
    rows = sorted(keys, key=lambda k: -tables[0][k][0])
  else:
    rows = sorted(keys, key=lambda k: -abs(tables[1].get(k, zero)[0] - tables[0].get(k, zero)[0]))
  names = " ".join(f"{'ms (' + chr(65 + i) + ')':>10} {'count':>7}" for i in range(len(tables)))
  print(f"{names}{'  B - A ms' if len(tables) == 2 else ''}  category  kernel family")
  for key in rows[:top]:
    values = [t.get(key, zero) for t in tables]
    cells = " ".join(f"{ms:10.3f} {count:7.1f}" for ms, count in values)
    delta = f" {values[1][0] - values[0][0]:+9.3f}" if len(values) == 2 else ""
    print(f"{cells}{delta}  {key[0]:8s}  {key[1]}")
  for label, table in zip("AB", tables):
    print(f"total ({label}): {sum(ms for ms, _ in table.values()):.3f} ms a step, "
          f"{sum(count for _, count in table.values()):.0f} device ops a step")


def output_bytes(type_text):
  """Bytes of an HLO type (an array or a tuple of them), from its dtypes' bit widths."""
  total = 0
  for dtype, dims in ARRAY_TYPE.findall(type_text):
    bits = re.search(r"\d+", dtype)
    size = math.prod(int(d) for d in dims.split(",") if d)
    total += size * (int(bits.group()) if bits else 8) // 8  # pred: one byte
  return total


def split_type(rest):
  """'TYPE opcode(operands), attributes' -> (TYPE, opcode, the text after the opcode)."""
  if rest.startswith("("):  # a tuple type, which holds spaces
    depth = 0
    for i, char in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        break
    type_text, rest = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    type_text, _, rest = rest.partition(" ")
  opcode, _, tail = rest.partition("(")
  return type_text, opcode, tail


def parse_hlo(text):
  """{computation: [(name, type, opcode, tail)]}, the entry's name, and while bodies with trip
  counts."""
  computations, entry = {}, None
  for computation, is_entry, name, rest in profiling.hlo_instructions(text):
    computations.setdefault(computation, []).append((name, *split_type(rest)))
    entry = computation if is_entry else entry
  loops = {}
  for instructions in computations.values():
    for _, _, opcode, tail in instructions:
      if opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", tail).group(1)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', tail)
        loops[body] = trips.group(1) if trips else "?"
  return computations, entry, loops


def print_hlo(directory):
  path = os.path.join(directory, "hlo.txt.gz")
  if not os.path.exists(path):
    raise SystemExit(f"error: {path} not found: --hlo needs the compiled HLO that bench_train.py's "
                     "--profile writes")
  with gzip.open(path, "rt") as f:
    computations, entry, loops = parse_hlo(f.read())
  callers = {}  # fused computation -> (its fusion instruction, the computation that runs it)
  for computation, instructions in computations.items():
    for name, _, opcode, tail in instructions:
      for called in re.findall(r"calls=%?([\w.\-]+)", tail):
        callers[called] = (name, computation)

  print(f"== {directory}")
  for computation in [entry, *loops]:
    counts, written = collections.Counter(), collections.Counter()
    for name, type_text, opcode, tail in computations.get(computation, []):
      kind = re.search(r"kind=(k\w+)", tail)
      key = opcode if opcode in ("custom-call", "copy", "broadcast", "dynamic-update-slice") else (
          f"fusion {kind.group(1)}" if opcode == "fusion" and kind else None)
      if key and key.startswith("fusion") and "broadcast" in name:
        key += " broadcast"  # XLA:GPU wraps a lone broadcast (a buffer's initialization) in a fusion
      if opcode == "custom-call":
        key += " " + re.search(r'custom_call_target="([^"]+)"', tail).group(1)
      if key:
        counts[key] += 1
        written[key] += output_bytes(type_text)
    where = "entry" if computation == entry else f"while body {computation} ({loops[computation]} trips)"
    print(f"{where}: " + ", ".join(f"{n} {key} ({written[key] / 1e6:.0f} MB)" for key, n in sorted(counts.items())))

  for computation, instructions in computations.items():
    users = collections.defaultdict(list)
    for name, _, opcode, tail in instructions:
      for operand in set(re.findall(r"%([\w.\-]+)", tail.split("), ")[0])):
        users[operand].append((name, opcode))
    for name, type_text, opcode, tail in instructions:
      if opcode != "custom-call":
        continue
      target = re.search(r'custom_call_target="([^"]+)"', tail).group(1)
      op_name = re.search(r'op_name="([^"]*)"', tail)
      place = computation
      if computation in callers:
        fusion, place = callers[computation]
        place = f"fusion {fusion} in {place}"
      readers = []
      for user, user_opcode in users[name]:
        if user_opcode == "get-tuple-element":
          readers += [f"{user}->{reader}" for reader, _ in users[user]]
        else:
          readers.append(user)
      label = f"{target} {op_name.group(1)[-70:]}" if op_name else target
      print(f"custom-call {name} ({label}, {output_bytes(type_text) / 1e6:.1f} MB out) in {place}; "
            f"read by: {', '.join(readers) or '(the computation output)'}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("directories", nargs="+", help="one or two profile directories of configs")
  parser.add_argument("--steps", type=int, default=3, help="steps each trace holds (bench_train.py traces 3)")
  parser.add_argument("--top", type=int, default=25, help="kernel families to print")
  parser.add_argument("--hlo", action="store_true", help="also summarize each compiled HLO")
  args = parser.parse_args(argv)
  if len(args.directories) > 2:
    parser.error("give one directory, or two to compare")
  print_families(args.directories, args.steps, args.top)
  if args.hlo:
    for directory in args.directories:
      print_hlo(directory)
  return 0


if __name__ == "__main__":
  sys.exit(main())
