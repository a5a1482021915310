#!/bin/bash
# Scores opacity v6 as training/recipes/opacity_normals8.md pre-registered (after runs/opacity_v6 ends;
# run from the repository root, about 20 min on 2 threads; figures in that note and the opacity card).
set -x
P=".venv/bin/python -m training"
N="../shared/data/covid_opacity_negatives"
$P soup opacity shipped runs/opacity_v6/best.pt --out runs/opacity_v6/soup50.pt
for m in soup50 best shipped; do
  if [ $m = shipped ]; then C=""; else C="--opacity-checkpoint runs/opacity_v6/$m.pt"; fi
  $P evaluate severity-rules --folds 3 4 $C --normals $N --normals-where class=Normal --normals-split runs/opacity_v6/split.json --threads 2 --out runs/eval/v6_$m/rules_nih
  $P evaluate severity-rules --folds 3 4 $C --normals ../shared/data/lung/jsrt --threads 2 --out runs/eval/v6_$m/rules_jsrt
  $P evaluate extent --folds 3 4 $C --threads 2 --out runs/eval/v6_$m/extent
  if [ $m = shipped ]; then K=""; else K="--checkpoint runs/opacity_v6/$m.pt"; fi
  $P evaluate opacity $K --data ../shared/data/covid_opacity --split runs/opacity_v6/split.json --subset validation --threads 2 --out runs/eval/v6_$m/opacity
done
echo done
