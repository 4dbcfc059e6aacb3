#!/bin/bash
# Shows what bounds the Mosaic GPU selective-scan kernels on an NVIDIA GPU (issue 4): ptxas's
# resource report, the SASS, and Nsight Compute's stall, scheduler, occupancy and per-instruction
# (source page) views of one forward and one backward launch at bench_scan.py's default shape.
#
#   OUT=/tmp/prof bash scripts/profile_scan_gpu.sh [--set selective_scan_gpu.NAME=VALUE ...]
#
# Writes under $OUT: ptxas.log (registers, spills), sass.tgz (each kernel's SASS and its opcode
# counts), ncu_sections.txt and ncu_source.tgz (per-instruction stall samples, CSV); prints the
# resource lines, the opcode counts that matter for latency (LDL/STL spills, LDS/STS, BAR, MUFU)
# and each kernel's top warp stall reasons.
set -uo pipefail
: "${OUT:?set OUT to the output folder}"
work=$(mktemp -d)
run=(python3 scripts/bench_scan.py --workload selective_scan --impl pallas --once "$@")

echo "== ptxas report and SASS"
MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_TO="$work/dump" "${run[@]}" \
  >"$work/dump.log" 2>&1 || { tail -20 "$work/dump.log"; exit 1; }
cat "$work/dump.log" "$work"/dump/*ptxas* 2>/dev/null | grep -E "Compiling|registers|spill|stack" \
  | tee "$OUT/ptxas.log"
mkdir -p "$work/sass"
for f in "$work"/dump/*sass* "$work/dump.log"; do
  [ -f "$f" ] || continue
  grep -oE "^\s+/\*[0-9a-f]{4,}\*/\s+[A-Z0-9_.]+" "$f" | awk '{print $2}' | sed 's/\..*//' \
    | sort | uniq -c | sort -rn >"$work/sass/$(basename "$f").opcodes"
  echo "$(basename "$f"): $(awk '{s+=$1} END {print s}' "$work/sass/$(basename "$f").opcodes") \
instructions; $(grep -wE "LDL|STL|LDS|STS|BAR|MUFU|FENCE|SHFL|LDSM" \
    "$work/sass/$(basename "$f").opcodes" | awk '{printf "%s %s, ", $2, $1}')"
done
cp -r "$work"/dump/. "$work/sass/" 2>/dev/null
tar -czf "$OUT/sass.tgz" -C "$work" sass

echo "== Nsight Compute"
ncu --clock-control none --kernel-name regex:mosaic_gpu --launch-count 2 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats \
  --section InstructionStats --section SourceCounters -o "$work/prof" -f "${run[@]}" \
  >"$work/ncu_run.log" 2>&1 || tail -20 "$work/ncu_run.log"
ncu -i "$work/prof.ncu-rep" >"$OUT/ncu_sections.txt" 2>&1
ncu -i "$work/prof.ncu-rep" --page source --csv --print-source sass >"$work/ncu_source.csv" 2>&1
tar -czf "$OUT/ncu_source.tgz" -C "$work" ncu_source.csv ncu_run.log
grep -E "mosaic_gpu|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible|\
Warp Cycles Per Issued|Stall|Executed Ipc A" "$OUT/ncu_sections.txt" | head -60
