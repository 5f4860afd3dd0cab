#!/usr/bin/env bash
# MAE-CT end to end: stage 1 (MAE) -> evaluate -> stage 2 (NNCLR head) -> stage 3 (contrastive tuning) -> evaluate,
# then MAE vs MAE-CT side by side (also written to RUN/table.md).
#
#   bash reproduce.sh smoke --device cpu          # generated tiled shapes, vit_nano, CPU: MAE vs MAE-CT in 4-8 min
#   bash reproduce.sh cifar10_5k --device cpu      # ../shared/data/cifar10-5k (imagefolder), CPU preset: ~26 min on 2
#                                                  # idle cores, 24 with ARMS=parallel (session 14); 48 with
#                                                  # ARMS=parallel on a 2x slower 2-core machine (session 15)
#   bash reproduce.sh fashion_mnist                # ViT-T/4 on 28 px, one GPU
#   bash reproduce.sh cifar10 --data_path data/    # ViT-T/4 on 32 px; cifar100 likewise
#   bash reproduce.sh imagenet100 --data_path /data/imagenet100   # ViT-B/16, 224 px, all visible GPUs
#   MAE=mae_pretrain_vit_base.pth bash reproduce.sh imagenet --data_path /data/imagenet   # the paper's ViT-B/16 run:
#                                                  # stages 2-3 from facebookresearch/mae's weights, all visible GPUs
#
# Stages 2-3 run twice from the same stage 1: MAE-CT (crop + flip only, the paper's method) and MAE-CT_aug (plus the
# BYOL colour pipeline in both stages, head lr 5e-4: the paper's variant, which matters most for small models; as the
# authors, its head is trained on the colour views too, and stage 3 takes the views and the paper's _aug settings from
# that head; cifar10_5k's at 10x the paper's encoder lr, below); the table has one row each. smoke runs MAE-CT only
# unless AUG=1: its MAE-CT_aug arm would take the chain on 2 slow cores past 10 minutes (RESULTS.md, session 17).
# Extra flags go to every training stage (e.g. --device cpu, --data_path); evaluate.py gets those it takes too
# (--device --data_path --img_size --num_workers --precision; EVAL for its own). Any other flag is checked against
# each stage's parser before stage 1 starts: one that a stage does not take stops the chain there, not hours later.
# Environment: SEED (default 0), RUN (run folder, default runs/RECIPE_sSEED), E1/E2/E3 (epochs of stages 1/2/3; E3_AUG,
# MAE-CT_aug's stage 3, default E3, except the ImageNet recipes': the paper's 80, whatever E3 says), STEPS (cap every
# stage at this many steps, for tests), EVAL (extra flags for evaluate.py), AUG=0|1 (skip MAE-CT_aug or run it; default
# 1, smoke 0), POOLING=cls|mean (the encoder feature stages 2 and 3 tune and the table leads with; default the recipe's:
# the paper's for the model size, mean of patch tokens for ViT-B and smaller, except the CLS token of fashion_mnist and
# smoke; it is part of stage 2's settings, so a run made with one is not continued with the other), MAE=FILE (start from
# this stage-1 checkpoint, ours, an official MAE .pth or the MAE-CT authors' mae_reimpl_*.th (README), instead of
# training stage 1; a path relative to this folder, like --data_path; it is evaluated as the MAE row; RUN/MAE records
# it, and a rerun that gives another or none stops), HEADS=N (with MAE=: the attention heads of a file that records
# none; default the preset's for its width and depth, as the official models have),
# GRAPHS=all|mae|none (where the ViT-T recipes use CUDA graphs on one GPU: stages 1 and 3 (default), stage 1 only (the
# recipes before session 9 of RESULTS.md; with POOLING=mean for fashion_mnist), or nowhere), ARMS=parallel (one GPU,
# meant for the small-image recipes: MAE-CT_aug's arm, which needs only stage 1, runs beside MAE-CT's on the same
# device, its output in RUN/arm_aug.log, and their stage seconds overlap; whether it shortens the chain on a GPU is not
# measured yet, BENCHMARKS.md; on CPU each arm gets half the cores unless OMP_NUM_THREADS is set, and 2 cores ran the
# smoke (both arms) and cifar10_5k chains in 13% and ~7% less time). All visible GPUs are used through torchrun; with
# --device cpu, none (each stage one CPU process, whatever GPUs are visible).
# A rerun continues: a finished stage is skipped, an interrupted one resumes from its checkpoint; a rerun with other
# settings for a stage stops with an error, and so does a stage made from an earlier training of its input stage
# (deleted and trained again; an evaluation is then simply redone: lib.sh), and one of a run whose stages 2-3 were made before session 10
# (their code changed: AdamW beta2 0.95 and the head's default init; keep its stage 1 with MAE= in a new RUN=), and a
# smoke run made before session 11 (the generated shapes are tiled since then: its stage 1 saw other images).
set -euo pipefail
cd "$(dirname "$0")"
source ./lib.sh  # a missing file stops here (set -e)
help_or_usage "usage: bash reproduce.sh smoke|cifar10_5k|fashion_mnist|cifar10|cifar100|imagenet100|imagenet [flags]" "${1:-}"
name=$1
shift
SEED=${SEED:-0}

# Recipes. Stage 1 follows MAE (blr 1.5e-4, mask 0.75); stages 2/3 the paper (blr 1e-4, 20% warm-up, top-k 20,
# temperature 0.15 for B and smaller). Small-image choices (ours): patch 4, ViT-T, a queue of about a third of the
# training set (a queue larger than the data holds stale copies of every image), 20% warm-up everywhere the run is
# short; stages 1 and 3 of ViT-T as CUDA graphs on one GPU (compile mode reduce-overhead): their step is bound by the
# host (stage 3 on an H200: 57,600 against 38,100 img/s, BENCHMARKS.md); both stage-3 arms get the same epochs and
# top-k, except in the ImageNet recipes, whose MAE-CT_aug takes the paper's (80 epochs, top-10, from
# contrastive_tune.py's defaults). Fashion-MNIST's stage 3 (ours, chosen on GPU seed 0, RESULTS.md): 40 epochs and
# crops of at least half the image (--crop_min 0.5 instead of 0.08: an 8% crop of a 28-px garment is an 8x8-pixel
# patch) gave k-means ACC 62.7 against 56.2 with the paper's 20 epochs and 0.08 (k-NN@10 88.1 vs 87.7); on seed 1,
# 62.9 vs 59.9. Its stages 2-3 tune the CLS token, not the paper's mean of patch tokens: paired from one stage 1 on
# GPU seeds 0, 1, 2, k-means ACC +1.7, +6.0, +3.9, NMI +3.2 to +4.1, at k-NN@10 -0.8, -0.05, -0.07 (a ViT-T/4's CLS
# token clusters better than its mean from stage 1 on; RESULTS.md). smoke tunes the CLS token too (session 11): on the
# tiled shapes its ViT-nano MAE's CLS token is the better k-NN feature (k-NN@10 +2.8 to +13.1 over the mean, seeds
# 0-3); MAE-CT tuned from it beat both MAE features on k-NN@10 in every seed (+1.5 to +4.2 over the CLS token), and
# MAE-CT tuned from the mean beat the mean in every seed but the CLS token in one of four (RESULTS.md).
# cifar10_5k tunes for 100 epochs, not the paper's 20 (session 14): 20 epochs of 4000 images are 300 steps, over which
# the loss barely moves. From the same stage-1 MAEs, seeds 0-2, 100 epochs at the paper's blr 1e-4 gave MAE-CT_aug
# k-NN@10 / k-means ACC over its MAE of +2.1 / +2.0 (20 epochs: +1.7 / +1.3) and MAE-CT +1.1 / -0.7 (20 epochs: -0.1 /
# -0.3); seed 3, held out, +3.6 / +2.3 and +0.6 / -0.5. Stage 3 then costs more than this recipe's short stage 1
# (RESULTS.md); E3=20 is the paper's. Its MAE-CT_aug tunes the encoder at blr 1e-3, 10x the paper's (session 21): from
# the same heads, seeds 0-2, k-NN@10 +6.1, +7.4, +3.3 and NMI +1.5 to +1.8 over blr 1e-4, k-means ACC -0.6, +1.3, +1.7
# (over its MAE: +7.8 / +2.4; held-out seed 3 +7.2 / +2.2); 3e-3 was level on k-NN@10, +1.0 k-means ACC, within noise
# (session 22, 4 seeds), and 40 epochs at 1e-3 lost on both. Its MAE-CT keeps 1e-4: at 1e-3 (seeds 0-2) only its linear
# probe gained (+2.9 over the MAE; k-NN@10 +0.3, k-means ACC -0.3).
graphs=0; pool=; mae_extra=; ct_extra=; extra_ct_aug=; e3aug=; aug=1  # set by the recipe only, never taken from the environment
case $name in
  smoke)         data="--dataset synthetic"; model=vit_nano; e=(30 10 10); bs=(256 256 256)
                 head="--proj_hidden 512 --proj_dim 128 --pred_hidden 512 --queue_size 2048"; extra_ct="--topk 5"; pool=cls; aug=0 ;;
  cifar10_5k)    data="--dataset imagefolder --data_path ../shared/data/cifar10-5k --img_size 32"; model=vit_nano
                 e=(100 20 100); bs=(256 256 256); head="--proj_hidden 512 --proj_dim 128 --pred_hidden 512 --queue_size 1024"; extra_ct="--topk 5"
                 extra_ct_aug="--blr 1e-3" ;;
  fashion_mnist) data="--dataset fashion_mnist"; model=vit_tiny; e=(100 20 40); bs=(1024 1024 1024)
                 head="--queue_size 16384"; extra_ct="--topk 20 --crop_min 0.5"; graphs=1; pool=cls ;;
  cifar10|cifar100) data="--dataset $name"; model=vit_tiny; e=(800 20 20); bs=(1024 1024 1024)
                 head="--queue_size 16384"; extra_ct="--topk 20"; graphs=1 ;;
  imagenet100|imagenet) data="--dataset imagefolder --img_size 224"; model=vit_base; e=(800 20 20); bs=(1024 1024 1024)
                 head="--queue_size 65536"; extra_ct=; e3aug=80; mae_extra="--patch_size 16" ;;
  *) echo "error: unknown recipe '$name' (smoke, cifar10_5k, fashion_mnist, cifar10, cifar100, imagenet100, imagenet)" >&2; exit 2 ;;
esac
if [ -n "${MAE:-}" ]; then
  [ -f "$MAE" ] || { echo "error: MAE=$MAE: no such file (a stage-1 checkpoint or official MAE weights, relative to $(pwd))" >&2; exit 2; }
  case $MAE in /*) ;; *) MAE=$(pwd)/$MAE ;; esac  # one spelling, so that a rerun compares equal
fi
POOLING=${POOLING:-$pool}
case $POOLING in
  ""|cls|mean) ;;
  *) echo "error: POOLING='$POOLING' (cls, mean, or unset for the recipe's default)" >&2; exit 2 ;;
esac
eval_flags "$@"  # pass: the extra flags evaluate.py takes too; dev: the --device given
E1=${E1:-${e[0]}}; E2=${E2:-${e[1]}}; E3=${E3:-${e[2]}}; E3_AUG=${E3_AUG:-${e3aug:-$E3}}
RUN=${RUN:-runs/${name}_s${SEED}}
cap=${STEPS:+--max_steps $STEPS}
if [ -n "${HEADS:-}" ] && [ -z "${MAE:-}" ]; then
  echo "error: HEADS= is for MAE=FILE (a file that does not record its head count); stage 1 here uses the preset's" >&2
  exit 2
fi
heads=${HEADS:+--num_heads $HEADS}
if [ "${#pass[@]}" -lt $# ]; then  # flags beyond those every stage takes: ask each stage's parser now
  MAE_GIVEN=${MAE:+1} python - "$@" <<'EOF' || exit 2
import contextlib, io, os, sys
for name in ([] if os.environ["MAE_GIVEN"] else ["pretrain_mae"]) + ["init_head", "contrastive_tune"]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            __import__(name).parse_args(sys.argv[1:] + ([] if name == "pretrain_mae" else ["--init_from", "-"]))
    except SystemExit:
        said = (err.getvalue().strip().splitlines() or ["?"])[-1].removeprefix("error: ")
        sys.exit(f"error: {name}.py: {said}; reproduce.sh gives its extra flags to every training stage")
EOF
fi
# --device cpu (dev, from eval_flags): no GPU is used, and none is counted (a torch import); --device cuda:N: that one
case $dev in
  cpu) ngpu=0 ;;
  cuda:*) ngpu=1 ;;
  *) ngpu=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0) ;;
esac
case $name in smoke|cifar10_5k) ;; *) if [ "$ngpu" = 0 ]; then
  echo "note: no GPU in use: the $name recipe is sized for GPUs and takes hours to days on a CPU;" \
       "smoke and cifar10_5k are the CPU recipes" >&2; fi ;;
esac
AUG=${AUG:-$aug}
case $AUG in 0|1) ;; *) echo "error: AUG='$AUG' (0 or 1)" >&2; exit 2 ;; esac
GRAPHS=${GRAPHS:-all}
case $GRAPHS in all|mae|none) ;; *) echo "error: GRAPHS='$GRAPHS' (all, mae or none)" >&2; exit 2 ;; esac
ARMS=${ARMS:-serial}
case $ARMS in serial|parallel) ;; *) echo "error: ARMS='$ARMS' (serial or parallel)" >&2; exit 2 ;; esac
if [ "$ARMS" = parallel ] && [ "$ngpu" -gt 1 ]; then
  echo "error: ARMS=parallel is for one GPU (or CPU); with $ngpu GPUs each arm already uses them all" >&2; exit 2
fi
if [ "$graphs" = 1 ] && [ "$ngpu" = 1 ]; then  # measured on one GPU, not under DDP (nor on CPU: no compile there)
  if [ "$GRAPHS" != none ]; then mae_extra="$mae_extra --compile_mode reduce-overhead"; fi
  if [ "$GRAPHS" = all ]; then ct_extra="--compile_mode reduce-overhead"; fi
fi
# --standalone: a free port and a run id of this launch's own (two chains on one machine do not collide)
if [ "$ngpu" -gt 1 ]; then launch=(torchrun --standalone --nproc_per_node="$ngpu"); else launch=(python); fi
# Where the run's stage 1 comes from (RUN/MAE): trained here, or a given file. A rerun that says otherwise stops here,
# before it would train a stage 1 that the later stages do not use or tune a head on another encoder than the table's.
if [ -e "$RUN" ] && [ ! -d "$RUN" ]; then echo "error: RUN=$RUN is a file, not a folder" >&2; exit 2; fi
origin=${MAE:-trained here}
before=$(cat "$RUN/MAE" 2>/dev/null || { [ -d "$RUN/mae" ] && echo "trained here"; } || true)
if [ -n "$before" ] && [ "$before" != "$origin" ]; then
  echo "error: $RUN has its stage 1 from '$before', not '$origin'; use another RUN= or set MAE= as before" >&2; exit 2
fi
mkdir -p "$RUN" 2>/dev/null || { echo "error: RUN=$RUN cannot be made (a file on its path, or no permission)" >&2; exit 2; }
echo "$origin" > "$RUN/MAE"

stage() {  # stage NAME SCRIPT FLAGS...: run unless RUN/NAME/DONE exists; resume when a checkpoint is there.
  # RUN/NAME/SETTINGS keeps the stage's command line: a rerun with other settings (another recipe, E1/E2/E3, STEPS,
  # flags) stops instead of skipping or resuming a stage that was made differently. A stage that saved nothing yet
  # (it failed on a mistyped flag or missing data, say) simply starts again with the new settings.
  local dir=$RUN/$1 script=$2; shift 2
  local settings="$script $data --seed $SEED $*"
  # Stages 2-3 changed in code, not in flags, in session 10 (AdamW beta2 0.95 and the head's default init, as the
  # authors): the tag keeps a head or tuning made before from being continued or reused as if made now.
  # The generated shapes changed in code in session 11 (tiled): the tag keeps a smoke stage trained on the old ones.
  case $script in init_head.py|contrastive_tune.py) settings="[stages 2-3 of session 10] $settings" ;; esac
  if [ "$name" = smoke ]; then settings="[tiled shapes of session 11] $settings"; fi
  if made_something "$dir" && [ "$(cat "$dir/SETTINGS")" != "$settings" ]; then
    if [[ $settings == "[tiled shapes"* && $(cat "$dir/SETTINGS") != "[tiled shapes"* ]]; then
      echo "error: $dir has no tag of session 11's tiled generated shapes, so it may have seen the untiled ones;" \
           "use another RUN= (and no stage 1 from such a folder as MAE=)" >&2
    elif [[ $settings == *"[stages 2-3"* && $(cat "$dir/SETTINGS") != *"[stages 2-3"* ]]; then
      echo "error: $dir was made before session 10's stage-2/3 settings (AdamW beta2 0.95, the head's default" \
           "init); use another RUN= (MAE=$RUN/mae/ckpt.pt keeps a stage 1 trained there)" >&2
    else
      echo "error: $dir was made with other settings ($(cat "$dir/SETTINGS")); use another RUN= or delete it and" \
           "the stages after it" >&2
    fi
    exit 2
  fi
  # The same settings, but its input stage was trained again since (lib.sh): neither skip nor resume it.
  local input; input=$(arg_of --init_from "$@")
  if ! made_from_current "$dir" "$input"; then
    echo "error: $dir was made from an earlier $(dirname "$input"), trained again since; delete $dir and the stages" \
         "after it, or use another RUN=" >&2
    exit 2
  fi
  if [ -f "$dir/DONE" ]; then echo "== $dir: done already, skipped"; return; fi
  local resume=""; [ -f "$dir/ckpt.pt" ] && resume="--resume"
  echo "== $script -> $dir"
  mkdir -p "$dir" && echo "$settings" > "$dir/SETTINGS" && record_from "$dir" "$input"
  local t0=$SECONDS
  "${launch[@]}" "$script" $data --seed "$SEED" --out_dir "$dir" $resume "$@" || {
    local rc=$? next="it saved nothing: correct the command and run it again"
    [ -f "$dir/ckpt.pt" ] && next="the same command continues from its last checkpoint"
    echo "error: $script stopped (exit $rc) in $dir; $next" >&2
    exit $rc; }
  finish_stage "$dir" $((SECONDS - t0))
}
evaluate() {  # evaluate NAME CHECKPOINT: skipped if done, unless the checkpoint's stage was trained again since
  local dir=$RUN/$1
  if evaluated_already "$dir" "$2"; then return; fi
  echo "== evaluate.py $2 -> $dir"
  "${launch[@]}" evaluate.py --init_from "$2" $data $heads --seed "$SEED" --out_dir "$dir" ${EVAL:-} "${pass[@]}"
  record_from "$dir" "$2"
}

ct_arm() {  # MAE-CT: the MAE's evaluation, then stage 2 and stage 3 with crop + flip, and their evaluation
  evaluate eval_mae "$mae"
  stage head init_head.py --init_from "$mae" $head $heads ${POOLING:+--pooling "$POOLING"} --epochs "$E2" --batch_size "${bs[1]}" --warmup_epochs $((E2 / 5)) $cap "$@"
  stage ct contrastive_tune.py --init_from "$RUN/head/ckpt.pt" $head $extra_ct $ct_extra --epochs "$E3" --batch_size "${bs[2]}" --warmup_epochs $((E3 / 5)) $cap "$@"
  evaluate eval_ct "$RUN/ct/ckpt.pt"
}
aug_arm() {  # MAE-CT_aug: its own head, on the colour views; stage 3 takes the views and the _aug defaults from it
  stage head_aug init_head.py --init_from "$mae" $head $heads ${POOLING:+--pooling "$POOLING"} --views aug --epochs "$E2" \
      --batch_size "${bs[1]}" --warmup_epochs $((E2 / 5)) $cap "$@"
  stage ct_aug contrastive_tune.py --init_from "$RUN/head_aug/ckpt.pt" $head $extra_ct $extra_ct_aug $ct_extra \
      --epochs "$E3_AUG" --batch_size "${bs[2]}" --warmup_epochs $((E3_AUG / 5)) $cap "$@"
  evaluate eval_ct_aug "$RUN/ct_aug/ckpt.pt"
}

if [ -n "${MAE:-}" ]; then
  mae=$MAE  # given: stage 1 is not run
else
  stage mae pretrain_mae.py --model $model $mae_extra --epochs "$E1" --batch_size "${bs[0]}" --warmup_epochs $((E1 / 20 + 1)) $cap "$@"
  mae=$RUN/mae/ckpt.pt
fi
if [ "$AUG" = 0 ]; then
  ct_arm "$@"
elif [ "$ARMS" = serial ]; then
  ct_arm "$@"; aug_arm "$@"
else  # ARMS=parallel: both arms need only stage 1, so MAE-CT_aug's runs beside MAE-CT's, its output in a log file
  if [ "$ngpu" = 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then  # CPU: each arm gets half the cores, not all of them
    OMP_NUM_THREADS=$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 )); export OMP_NUM_THREADS
  fi
  set -m  # its own process group (job control on for this one job), so that it can be stopped as a whole
  aug_arm "$@" > "$RUN/arm_aug.log" 2>&1 &
  aug_pid=$!
  set +m
  # If this script ends before that arm does (this arm failed, Ctrl-C, a time limit), the arm is stopped with it.
  trap 'kill -TERM -- "-$aug_pid" 2>/dev/null || true' EXIT
  echo "== MAE-CT_aug's arm runs beside this one (ARMS=parallel): $RUN/arm_aug.log"
  ct_arm "$@"
  rc=0; wait "$aug_pid" || rc=$?
  trap - EXIT
  if [ "$rc" != 0 ]; then  # its own exit code: 2 for a refused rerun, as in serial
    echo "error: MAE-CT_aug's arm failed; the end of $RUN/arm_aug.log:" >&2; tail -5 "$RUN/arm_aug.log" >&2; exit "$rc"
  fi
  cat "$RUN/arm_aug.log"
fi
echo "== this call took $SECONDS s ($name, ARMS=$ARMS)"

python - "$RUN" "$AUG" <<'EOF'
import json, os, sys
run, aug = sys.argv[1], sys.argv[2] == "1"
# The arms this call ran (an MAE-CT_aug evaluation left from an earlier call with AUG=1 may be of another stage 1)
arms = [("MAE", "eval_mae"), ("MAE-CT", "eval_ct")] + ([("MAE-CT_aug", "eval_ct_aug")] if aug else [])
rows = [(name, d) for name, d in arms if os.path.exists(f"{run}/{d}/results.json")]
res = {d: json.load(open(f"{run}/{d}/results.json")) for _, d in rows}
keys = [("knn10", "k-NN@10"), ("knn20", "k-NN@20"), ("linear", "linear"), ("kmeans_acc_mean", "k-means ACC"),
        ("nmi", "NMI"), ("ari", "ARI")]
fmt = lambda v: "-" if v is None else f"{v:.1f}"
secs = {s: open(f"{run}/{s}/DONE").read().strip() for s in ("mae", "head", "ct") + (("head_aug", "ct_aug") if aug else ())
        if os.path.exists(f"{run}/{s}/DONE")}
# The MAE is evaluated with both poolings; its headline row is the one stages 2/3 tuned (POOLING). The other is shown
# too: it can be the better-clustering feature of the MAE (the CLS token on Fashion-MNIST, RESULTS.md), so MAE-CT
# must beat it as well.
mae = res["eval_mae"]
by_pooling = {p: mae[p] for p in ("cls", "mean") if isinstance(mae.get(p), dict)} or {mae.get("pooling"): mae}
pooling = next((res[d].get("pooling") for d in ("eval_ct", "eval_ct_aug") if d in res), mae.get("pooling"))
label = {"cls": "CLS token", "mean": "mean pooling"}
table = [(f"MAE ({label.get(p, p)})", r) for p, r in sorted(by_pooling.items(), key=lambda pr: pr[0] != pooling)]
table += [(name, res[d]) for name, d in rows if name != "MAE"]
lines = [f"{run}: stages 2-3 tuned the MAE's {label.get(pooling, pooling)} (its row first); stage seconds "
         + ", ".join(f"{k} {v}" for k, v in secs.items()),
         "", "| | " + " | ".join(n for _, n in keys) + " |", "|---" * (len(keys) + 1) + "|"]
lines += ["| " + name + " | " + " | ".join(fmt(r.get(k)) for k, _ in keys) + " |" for name, r in table]
open(f"{run}/table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
