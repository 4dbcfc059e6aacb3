#!/bin/bash
# Shows what bounds the Mosaic GPU selective-scan kernels on an NVIDIA GPU (issue 4): ptxas's
# register and spill report, each kernel's own time, and Nsight Compute's stall, scheduler,
# occupancy and per-instruction (SASS) views of one forward and one backward launch at
# bench_scan.py's default shape.
#
#   OUT=/tmp/prof bash scripts/profile_scan_gpu.sh [--set selective_scan_gpu.NAME=VALUE ...]
#
# Prints the resource lines, every kernel's time in one forward+backward, the main section
# metrics, and per kernel the stall reasons and the opcodes that take the stall samples. Writes
# under $OUT: ptxas.log, ncu_times.txt, ncu_sections.txt and ncu_source.csv (per-instruction
# samples by stall reason, with the SASS).
set -uo pipefail
: "${OUT:?set OUT to the output folder}"
work=$(mktemp -d)
run=(python3 scripts/bench_scan.py --workload selective_scan --impl pallas --once "$@")

echo "== ptxas"
MOSAIC_GPU_DUMP_PTXAS=1 "${run[@]}" >"$work/dump.log" 2>&1 || { tail -20 "$work/dump.log"; exit 1; }
grep -aE "^ptxas info +: (Compiling|Used)|bytes stack frame" "$work/dump.log" | tee "$OUT/ptxas.log"

echo "== each kernel's time (us) in one forward+backward"
ncu --clock-control none --metrics gpu__time_duration.sum "${run[@]}" >"$OUT/ncu_times.txt" 2>&1
awk '/Context/ {name = $1} /gpu__time_duration.sum/ {v = $NF; u = $(NF - 1); gsub(",", "", v);
  if (u ~ /^ms|^msecond/) v *= 1000; if (u ~ /^ns|^nsecond/) v /= 1000;
  if (name !~ /^stream_executor/) printf "%10.1f  %s\n", v, name}' "$OUT/ncu_times.txt"

echo "== Nsight Compute sections"
ncu --clock-control none --kernel-name regex:mosaic_gpu --launch-count 2 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats \
  --section InstructionStats --section SourceCounters -o "$work/prof" -f "${run[@]}" \
  >"$work/ncu_run.log" 2>&1 || tail -20 "$work/ncu_run.log"
ncu -i "$work/prof.ncu-rep" >"$OUT/ncu_sections.txt" 2>&1
grep -E "mosaic_gpu_kernel|Duration|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per \
Issued|Executed Instructions  |Active Warps Per Scheduler" "$OUT/ncu_sections.txt"
ncu -i "$work/prof.ncu-rep" --page source --csv --print-source sass >"$OUT/ncu_source.csv" 2>&1

echo "== stall samples by reason and by opcode"
python3 - "$OUT/ncu_source.csv" <<'EOF'
import collections, csv, re, sys

kernels, header = [], []
for row in csv.reader(open(sys.argv[1])):
  if row and row[0] == "Kernel Name":
    kernels.append((row[1], []))
  elif row and row[0] == "Address":
    header = {name: i for i, name in enumerate(row)}
  elif row and kernels:
    kernels[-1][1].append(row)
reasons = [name for name in header if name.startswith("stall_") and "Not Issued" not in name]
for name, rows in kernels:
  by_reason, by_op, executed = collections.Counter(), collections.Counter(), collections.Counter()
  for row in rows:
    op = re.match(r"(@!?U?P\w+\s+)?([A-Z0-9_]+)", row[header["Source"]].strip())
    op = op.group(2) if op else "?"
    executed[op] += int(row[header["Instructions Executed"]] or 0)
    by_op[op] += int(row[header["Warp Stall Sampling (All Samples)"]] or 0)
    for reason in reasons:
      by_reason[reason[6:]] += int(row[header[reason]] or 0)
  samples, total = sum(by_reason.values()) or 1, sum(executed.values()) or 1
  print(f"{name}: {len(rows)} SASS instructions, {total} executed (warp level)")
  print("  reasons: " + ", ".join(f"{r} {100 * v / samples:.0f}%" for r, v in by_reason.most_common(6)))
  print("  opcodes (samples, executed): " + ", ".join(
      f"{op} {100 * v / samples:.0f}% {100 * executed[op] / total:.0f}%" for op, v in by_op.most_common(10)))
EOF
