#!/usr/bin/env bash
# The protocol behind docs/RESULTS.md (the MNIST runs alone take about 90 min of one CPU core).
# The full grids and seeds of the paper stay available through the same flags (e.g. --seeds 10, --grid-epochs 20).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-docs/results}
ALL=sven,sven-damped,adam,sgd,rmsprop,lbfgs,polyak,lm
# the settings tried for the demo's Sven variants, seeds 0-9 (grids.DEMO_STUDY)
$PY -m sven.bench toy1d --study demo --epochs 20 --seeds 10 --out $OUT --no-progress
# toy1d also runs sven-gn-damped, the time-to-target race against lm
$PY -m sven.bench toy1d --optimizers sven,sven-damped,sven-gn-damped,${ALL#sven,sven-damped,} --grid --grid-epochs 2 \
  --epochs 20 --seeds 3 --out $OUT --no-progress
$PY -m sven.bench poly --optimizers sven,sven-damped,sven-gn-damped,${ALL#sven,sven-damped,} --grid --grid-epochs 2 \
  --epochs 20 --seeds 3 --threads 1 --out $OUT --no-progress
# MNIST, the paper's protocol: 20 epochs, 3 seeds, every baseline at its default settings. lm is left out (see
# docs/RESULTS.md: about 410 ms a step here, some 2 hours a seed). Each compare run saves after every optimizer;
# rerunning its command with --append runs only the optimizers a stopped run left pending.
$PY -m sven.bench mnist-regression --optimizers sven,sven-damped,adam,sgd,rmsprop,polyak,lbfgs --epochs 20 --seeds 3 \
  --threads 1 --out $OUT --no-progress
# the exact step at the demo's default (lr 0.5 with line_search; --set names the file)
$PY -m sven.bench mnist-regression --optimizers sven --set lr=0.5 --epochs 20 --seeds 3 --threads 1 --out $OUT \
  --no-progress
for study in k rtol; do
  $PY -m sven.bench mnist-regression --study $study --epochs 3 --out $OUT --no-progress
done
# Figure 4: Sven's kept singular values, label regression against cross-entropy
$PY -m sven.bench mnist-regression --study spectrum --epochs 20 --threads 1 --out $OUT --no-progress
# the lr of the RMSProp-scaled Sven (sven-rmsprop) on mnist-ce: the best sets grids.RMSPROP_LR
$PY -m sven.bench mnist-ce --study rmsprop_lr --epochs 2 --seeds 1 --threads 1 --out $OUT --no-progress
$PY -m sven.bench mnist-ce --optimizers adam,sven-rmsprop,sgd,rmsprop,polyak,sven,sven-damped,lbfgs --epochs 20 \
  --seeds 3 --threads 1 --out $OUT --no-progress
for task in toy1d poly; do
  for study in microbatch_size param_fraction; do
    $PY -m sven.bench $task --study $study --epochs 10 --seeds 10 --out $OUT --no-progress
  done
done
$PY -m sven.bench digits-ce --optimizers sven,sven-damped,adam --grid --grid-epochs 2 --epochs 10 --seeds 3 --out $OUT --no-progress
# issue 8: the Sven variants (kappa 2, kappa 1, fixed λ, adaptive λ) against lm, Adam and L-BFGS, same seeds
for task in toy1d poly; do
  $PY -m sven.bench $task --study lm --epochs 20 --seeds 3 --out $OUT --no-progress
done
$PY -m sven.bench report --results $OUT --figures docs/figures --page docs/RESULTS.md
