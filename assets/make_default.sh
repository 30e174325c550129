#!/usr/bin/env bash
# Makes the shipped default runs again (assets/README.md says what they are and what they measure). `train` can be
# run again after a stop: it resumes from its last checkpoint. `finish` replaces assets/default/ with the new runs.
#
#   bash assets/make_default.sh train     # extraction to 21M rows (about 2 h 35 min from nothing), then the three SAEs
#                                         # in one pass (about 1 h 35 min in bf16 on 2 AVX-512 BF16 cores); nohup ... & is fine
#   bash assets/make_default.sh finish    # copy into assets/ in float16; evaluate, analyse, benchmark, gallery
#   bash assets/make_default.sh finish analyze_v bench   # only the steps named (FINISH_STEPS below)
#   bash assets/make_default.sh all       # train, then finish: run it again after any stop to go on
#
# `finish` run again after a stop goes on where it stopped: each step that ends marks itself done in $OUT/finished/
# with the digest of the Matryoshka weights it finished, and a plain `finish` skips the steps marked with the
# weights there now (steps named are run whatever their mark; new weights make every mark stale).
#
# CORPUS, TOKENS, STEPS (empty: each training row read once), WIDTHS, NARROW, BALANCE, SEED and ANALYZE_TOKENS
# override the settings of the runs shipped now (the defaults below), e.g. the 8,192-latent trio shipped before,
# 5,000 steps over the built-in corpus's 1.5M rows:
#   CORPUS=builtin TOKENS=1500000 STEPS=5000 WIDTHS=256,816,2576,8192 NARROW=2576 ANALYZE_TOKENS= OUT=/work/shipped/v2 \
#     bash assets/make_default.sh all
# OUT is where the float32 runs are trained (default /work/shipped/v4); WORDNET: the built-in corpus holds WordNet's
# definitions only where Debian's wordnet-base is installed, so the same runs need it (apt-get install wordnet-base);
# the large corpus's Debian packages come with `make corpus` (msae corpus --info lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/work/shipped/v4}
MSAE=.venv/bin/msae
# The layout the sweep chose (benchmarks/sweep_levels.py, 2,048 latents: 4 levels from 1/32 with balance 0.5 had the
# best full-width and fresh-text FVU and no group above 35% of the L0), scaled to 16,384 latents, the widest pair
# assets/ holds (benchmarks/sweep_width.py --ship-width). At 8,192 latents balance 0.5 let the first group take 51% of
# the L0 by step 1,000, still rising; with balance 0.25 (level weights 1/64, 1/16, 1/4, 1) no group held more than 33%
# at step 600, where the full-width training FVU was the same (0.307 against 0.306) (benchmarks/results/probe_8192.json,
# benchmarks/group_share.py), so 0.25 it stays.
WIDTHS=${WIDTHS:-512,1632,5168,16384}
NARROW=${NARROW:-5168}
BALANCE=${BALANCE:-0.25}
STEPS=${STEPS-}
# What it trains on: the corpus and how many rows of it to extract (the last shard is held out). STEPS empty reads
# every training row once (one pass), as the width sweep does: ≥ 20M distinct tokens of --corpus large, each read once.
CORPUS=${CORPUS:-large}
TOKENS=${TOKENS:-21000000}
SEED=${SEED:-0}

train() {
  local resume=()
  [ -f "$OUT/checkpoint/state.safetensors" ] && resume=(--resume)
  local balance=() steps=()
  [ -n "$BALANCE" ] && balance=(--balance "$BALANCE")
  [ -n "$STEPS" ] && steps=(--steps "$STEPS")
  # One pass over the ~20.9M training rows is 5,089 steps of 4,096 rows (about 1.1 s a step for the three SAEs in bf16
  # here). A checkpoint every 100 steps, so a stop loses at most 100 steps.
  "$MSAE" train --model smollm2-135m --layer 15 --corpus "$CORPUS" --tokens "$TOKENS" \
    --arch matryoshka --also-vanilla --also-narrow "$NARROW" --widths "$WIDTHS" --k 32 "${balance[@]}" \
    "${steps[@]}" --batch-size 4096 --seed "$SEED" --checkpoint-every 100 --log-every 20 --out "$OUT" "${resume[@]}"
}

copy() {
  # The float32 runs in float16 (what ships and what the app loads); everything after is measured on those.
  .venv/bin/python - "$OUT" "$NARROW" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from msae.io import load_sae, save_sae
out, narrow = Path(sys.argv[1]), sys.argv[2]
names = ("matryoshka", "vanilla", f"vanilla-{narrow}")
new = Path("assets/default.new")
shutil.rmtree(new, ignore_errors=True)
for name in names:  # every new run written beside the shipped ones first: a bad one replaces nothing
    sae, cfg = load_sae(out / name)
    save_sae(sae, new / name, cfg={"msae": cfg["msae"]}, dtype=torch.float16)
    shutil.copy(out / name / "metrics.jsonl", new / name / "metrics.jsonl")
for stale in Path("assets/default").glob("vanilla-*"):  # a narrow run of another width is not shipped beside these
    if stale.name != f"vanilla-{narrow}":
        shutil.rmtree(stale)
for name in names:
    dst = Path("assets/default") / name
    shutil.rmtree(dst, ignore_errors=True)  # no file of the runs it replaces stays beside the new SAE
    (new / name).rename(dst)
new.rmdir()
EOF
}

M=assets/default/matryoshka V=assets/default/vanilla N=assets/default/vanilla-$NARROW

evaluate() {
  .venv/bin/python - "$M" "$V" "$N" <<'EOF'
import sys
from msae.activations import cache_root
from msae.evaluate import evaluate_run
from msae.lm import load_lm
from msae.run import Run
lm = load_lm("smollm2-135m")
for run in sys.argv[1:]:
    evaluate_run(run, cache_root() / Run(run).info().extraction.cache_id, lm)
EOF
}

# ANALYZE_TOKENS: the cache rows analysed (empty: all of them; all 21M rows would take hours per run at 16k latents).
ANALYZE_TOKENS=${ANALYZE_TOKENS-2000000}
ANALYZE=("$MSAE" analyze ${ANALYZE_TOKENS:+--tokens "$ANALYZE_TOKENS"})
analyze_m() { "${ANALYZE[@]}" "$M" --against "$V"; }
analyze_v() { "${ANALYZE[@]}" "$V" --against "$N" --no-absorption; }
analyze_n() { "${ANALYZE[@]}" "$N" --no-absorption; }
bench() { "$MSAE" taxonomy-bench "$M" --against "$V" --against "$N"; }
gallery() { "$MSAE" gallery "$M" --wide "$V" --narrow "$N"; }
quality() { .venv/bin/python benchmarks/bench_quality.py "$M" "$V" "$N"; }
# The link rule's trade-off (links kept against held-out P(p | c) per left-out corpus part) and the Hierarchy page's
# default view (hub share, WordNet coherence against random trees), on the shipped Matryoshka run's store.
links() { .venv/bin/python benchmarks/bench_links.py "$M" ${ANALYZE_TOKENS:+--tokens "$ANALYZE_TOKENS"}; }
trees() { .venv/bin/python benchmarks/bench_trees.py "$M"; }

FINISH_STEPS=(copy evaluate analyze_m analyze_v analyze_n bench gallery quality links trees)

finish() {
  # Every step, or the ones named (`finish analyze_v bench ...`: a stop in the middle loses only the step it hit:
  # every step after `copy` writes its files through a temporary file and a rename). About 30 min in all here (16,384
  # latents, 2M rows analysed); each step's time is printed.
  local steps=("$@") named=1 weights
  [ ${#steps[@]} -eq 0 ] && { steps=("${FINISH_STEPS[@]}"); named=0; }
  weights=$(sha256sum "$OUT/matryoshka/sae_weights.safetensors" | cut -c1-16)
  mkdir -p "$OUT/finished"
  for step in "${steps[@]}"; do
    [[ " ${FINISH_STEPS[*]} " == *" $step "* ]] || { echo "unknown step $step (${FINISH_STEPS[*]})" >&2; exit 2; }
    if [ $named = 0 ] && [ "$(cut -d' ' -f1 "$OUT/finished/$step" 2>/dev/null)" = "$weights" ]; then
      echo "== $step: done before for these weights ($(cut -d' ' -f2- "$OUT/finished/$step")), skipped"
      continue
    fi
    local t0=$SECONDS
    echo "== $(date +%T) $step"
    "$step"
    echo "== $step took $((SECONDS - t0)) s"
    echo "$weights $(date -u +%FT%TZ), $((SECONDS - t0)) s" > "$OUT/finished/$step"
  done
}

all() { train; finish; }

cmd=${1:?train, finish [STEP ...] or all}
shift
"$cmd" "$@"
