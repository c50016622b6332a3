#!/usr/bin/env bash
# CALD evidence: all-MiniLM-L6 fine-tuned on Rotten Tomatoes -> Linformer and bimamba2 students,
# unguided vs target guidance. Writes outputs/evidence/summary.md. About 30-40 minutes on 2 cores.
#   bash benchmarks/cald_minilm_rt.sh [extra --set overrides for every run]
set -euo pipefail
cd "$(dirname "$0")/.."
RAYLIN=${RAYLIN:-.venv/bin/raylin}
CONFIG=raylin/configs/minilm-rt-linformer.yaml
OUT=outputs/evidence
mkdir -p "$OUT"
[ -f $OUT/teacher-run/teacher/config.json ] || "$RAYLIN" finetune "$CONFIG" --set output_dir=$OUT/teacher-run "$@"
for mixer in linformer bimamba2; do
  for mode in unguided target; do
    "$RAYLIN" convert "$CONFIG" --set output_dir=$OUT/$mixer-$mode --set target_teacher=$OUT/teacher-run/teacher \
      --set plan.mixer=$mixer --set guidance.mode=$mode "$@"
  done
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
teacher = json.loads((out / "teacher-run" / "metrics.json").read_text())
rows = ["| model | guidance | held-out accuracy | steps | wall (s) |", "|---|---|---:|---:|---:|",
        f"| teacher (all-MiniLM-L6, fine-tuned) | - | {teacher['teacher']['accuracy']:.4f} | {teacher['steps']} | {teacher['wall_s']} |"]
for run in sorted(p for p in out.iterdir() if (p / "metrics.json").exists() and p.name != "teacher-run"):
    m = json.loads((run / "metrics.json").read_text())
    rows.append(f"| {m['mixer']} student | {m['guidance']} | {m['student']['accuracy']:.4f} | {m['steps']} | {m['wall_s']} |")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
