#!/usr/bin/env bash
# The paper's three checks as runnable experiments (MAE-CT, Lehner et al. 2024), one markdown table each:
#   1. an NNCLR head on the frozen MAE encoder: k-NN in its own embedding (projector, predictor) vs the encoder's
#   2. the top-k lookup as a data-driven augmentation: contrastive tuning with k = 1, 5, 10, 20, 50 vs MAE-CT_aug
#   3. MAE + lambda * NNCLR from the start (pretrain_mae.py --nnclr_weight) vs the sequential MAE -> head -> tuning
#
#   bash ablations.sh smoke                  # generated shapes, vit_nano, CPU, 10/5/5 epochs (ABLATIONS.md: 28 min
#                                            # 34 s on the untiled shapes, on a CPU shared with test runs)
#   bash ablations.sh cifar10_5k --device cpu
#
# Stage 1, 2 and the recipe's stage 3 come from reproduce.sh, run first into the same RUN folder (a finished stage
# is skipped, so an existing RUN is reused). Every arm of one comparison gets the same budget: each tuning arm E3
# epochs from the same stage-2 head (MAE-CT_aug from its own, on colour views, as reproduce.sh runs it: E2 more
# epochs of head training); each joint arm E1+E2+E3 epochs, the epochs of the whole sequential recipe.
# Environment as reproduce.sh: SEED, RUN (default runs/abl_NAME_sSEED), E1/E2/E3, STEPS (cap every run at this many
# steps, for tests); TOPKS (default "1 5 10 20 50"), LAMBDAS (default "1"; empty: no joint arm), METRICS (evaluate.py metrics,
# default knn,linear). Extra flags go to every training run, and to evaluate.py those it takes too (as reproduce.sh).
# Tables: RUN/ablations.md.
set -euo pipefail
cd "$(dirname "$0")"
source ./lib.sh  # a missing file stops here (set -e)
help_or_usage "usage: bash ablations.sh smoke|cifar10_5k [flags]" "${1:-}"
name=$1
shift
SEED=${SEED:-0}

# The data and head flags must match reproduce.sh's recipe of the same name, so its checkpoints are reused.
# Ours: shorter default epochs than reproduce.sh, so that all arms fit a CPU session (override with E1/E2/E3).
if [ -n "${MAE:-}" ]; then  # the joint arm trains from scratch on the sequential recipe's budget, so stage 1 must too
  echo "error: ablations.sh trains its own stage 1 (the joint arm is compared with it); unset MAE" >&2; exit 2
fi
# The joint arm's head sits on the model's pooling (pretrain_mae.py: the mean of patch tokens for ViT-nano), so the
# sequential arms tune the mean too: the cifar10_5k recipe does by default, and smoke, whose reproduce.sh recipe tunes
# the CLS token since session 11, is told so (POOLING=mean below).
if [ "${POOLING:-mean}" != mean ]; then
  echo "error: POOLING='$POOLING': ablations.sh compares arms on the mean of patch tokens (the joint arm's pooling)" >&2; exit 2
fi
case $name in
  smoke)      data="--dataset synthetic"; model=vit_nano; e=(10 5 5); bs=256
              head="--proj_hidden 512 --proj_dim 128 --pred_hidden 512 --queue_size 2048"; topk=5 ;;
  cifar10_5k) data="--dataset imagefolder --data_path ../shared/data/cifar10-5k --img_size 32"; model=vit_nano; e=(30 10 10); bs=256
              head="--proj_hidden 512 --proj_dim 128 --pred_hidden 512 --queue_size 1024"; topk=5 ;;
  *) echo "error: unknown recipe '$name' (smoke, cifar10_5k)" >&2; exit 2 ;;
esac
export SEED E1=${E1:-${e[0]}} E2=${E2:-${e[1]}} E3=${E3:-${e[2]}}
export E3_AUG=$E3  # MAE-CT_aug tunes as long as the other arms
export RUN=${RUN:-runs/abl_${name}_s${SEED}} EVAL=${EVAL:---metrics ${METRICS:-knn,linear}}
TOPKS=${TOPKS-1 5 10 20 50}; LAMBDAS=${LAMBDAS-1}; METRICS=${METRICS:-knn,linear}
eval_flags "$@"  # pass: the extra flags evaluate.py takes too
cap=${STEPS:+--max_steps $STEPS}
A=$RUN/abl
mkdir -p "$A"

pin=; if [ "$name" = smoke ]; then pin=mean; fi  # unset for cifar10_5k: its run folders' SETTINGS stay as they were
POOLING=$pin AUG=1 bash reproduce.sh "$name" "$@"  # RUN/mae, RUN/head, RUN/ct (top-k $topk), RUN/ct_aug, RUN/eval_*

run() {  # run DIR SCRIPT FLAGS...: train unless DIR/DONE exists (it holds the wall seconds); resume if begun.
  # As reproduce.sh: DIR/SETTINGS keeps the command line, and a rerun with other settings (E3, STEPS, flags), or
  # after the input stage was trained again (lib.sh), stops rather than reuse the arm; one that saved nothing starts again.
  local dir=$1 script=$2; shift 2
  local settings="$script $data --seed $SEED --batch_size $bs $*" input; input=$(arg_of --init_from "$@")
  if made_something "$dir" && [ "$(cat "$dir/SETTINGS")" != "$settings" ]; then
    echo "error: $dir was made with other settings ($(cat "$dir/SETTINGS")); use another RUN= or delete it" >&2; exit 2
  fi
  if ! made_from_current "$dir" "$input"; then
    echo "error: $dir was made from an earlier $(dirname "$input"), trained again since; delete it or use another RUN=" >&2
    exit 2
  fi
  if [ -f "$dir/DONE" ]; then echo "== $dir: done already, skipped"; return; fi
  local resume=""; [ -f "$dir/ckpt.pt" ] && resume="--resume"
  echo "== $script -> $dir"
  mkdir -p "$dir" && echo "$settings" > "$dir/SETTINGS" && record_from "$dir" "$input"
  local t0=$SECONDS
  python "$script" $data --seed "$SEED" --out_dir "$dir" --batch_size "$bs" $resume "$@"
  finish_stage "$dir" $((SECONDS - t0))
}
evaluate() {  # evaluate DIR CHECKPOINT FLAGS...: skipped if done, unless the checkpoint was trained again since
  local dir=$1 ckpt=$2; shift 2
  if evaluated_already "$dir" "$ckpt"; then return; fi
  echo "== evaluate.py $ckpt $* -> $dir"
  python evaluate.py --init_from "$ckpt" $data --seed "$SEED" --out_dir "$dir" --metrics "$METRICS" "$@"
  record_from "$dir" "$ckpt"
}

# ---- 1: the head's own embedding vs the frozen encoder's features (one stage-2 checkpoint) ----
# The encoder's row is RUN/eval_mae's mean pooling: stage 2 leaves the encoder bit-identical and tunes the mean here.
# (eval_mae is made with EVAL, these with --metrics METRICS: the same unless EVAL is set by hand.)
for f in projector predictor; do evaluate "$A/f1_$f" "$RUN/head/ckpt.pt" --features $f "${pass[@]}"; done

# ---- 2: top-k lookup strength from the same stage-2 head, and hand-made augmentation (MAE-CT_aug) ----
warm=$((E3 / 5))
for k in $TOPKS; do
  if [ "$k" = "$topk" ]; then  # reproduce.sh's stage 3 is this arm (same head, epochs and flags)
    ln -sfn ../ct "$A/ct_k$k"; ln -sfn ../eval_ct "$A/eval_ct_k$k"; continue
  fi
  run "$A/ct_k$k" contrastive_tune.py --init_from "$RUN/head/ckpt.pt" $head --topk "$k" --epochs "$E3" --warmup_epochs $warm $cap "$@"
  evaluate "$A/eval_ct_k$k" "$A/ct_k$k/ckpt.pt" "${pass[@]}"
done
# reproduce.sh's MAE-CT_aug is this arm: same stage 1, top-k and epochs; as the authors, its own head on colour views
# (cifar10_5k's recipe tunes it at encoder blr 1e-3, the top-k arms at the paper's 1e-4: its table row says so)
ln -sfn ../ct_aug "$A/ct_aug"; ln -sfn ../eval_ct_aug "$A/eval_ct_aug"

# ---- 3: joint MAE + lambda * NNCLR from scratch, the budget of the whole sequential recipe ----
EJ=$((E1 + E2 + E3))
for l in $LAMBDAS; do
  run "$A/joint_l$l" pretrain_mae.py --model $model --nnclr_weight "$l" $head --epochs "$EJ" --warmup_epochs $((EJ / 20 + 1)) --log_every 5 --pictures 0 $cap "$@"
  evaluate "$A/eval_joint_l$l" "$A/joint_l$l/ckpt.pt" "${pass[@]}"
done

# ---- tables ----
python - "$RUN" "$TOPKS" "$LAMBDAS" "$topk" "$E1" "$E2" "$E3" "$SEED" <<'EOF'
import json, os, sys
run, topks, lambdas, topk = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
E1, E2, E3, seed = map(int, sys.argv[5:9])
A = f"{run}/abl"
res = lambda d: json.load(open(f"{d}/results.json"))
log = lambda d: [json.loads(l) for l in open(f"{d}/log.jsonl") if l.strip() and "loss" in l]
secs = lambda d: open(f"{d}/DONE").read().strip()
fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
row = lambda cells: "| " + " | ".join(map(str, cells)) + " |"
out = [f"# Ablations: {run} (dataset {res(f'{run}/eval_mae')['dataset']}, seed {seed}, stage epochs {E1}/{E2}/{E3})", ""]

out += ["## 1. NNCLR head on the frozen MAE encoder: k-NN in each embedding (the encoder's from stage 1's evaluation, "
        "the head's from the stage-2 checkpoint)", "",
        "| features | dim | k-NN@10 | k-NN@20 | linear |", "|---|---|---|---|---|"]
mae = res(f"{run}/eval_mae")
enc = mae.get("mean", mae if mae.get("pooling") == "mean" else None)  # both poolings, or the mean alone
if enc is None:
    sys.exit(f"error: {run}/eval_mae has no mean-pooling result (pooling {mae.get('pooling')}); delete it to redo it")
for f in ("encoder", "projector", "predictor"):
    r = enc if f == "encoder" else res(f"{A}/f1_{f}")
    out.append(f"| {f} | {r['feature_dim']} | {fmt(r.get('knn10'))} | {fmt(r.get('knn20'))} | {fmt(r.get('linear'))} |")

out += ["", f"## 2. Contrastive tuning, {E3} epochs each, from the same head (the aug arm: from its own): "
        "top-k lookup vs hand-made augmentation", "",
        "| arm | k-NN@10 | k-NN@20 | linear | final NNCLR loss | final nn_acc | train s |", "|---|---|---|---|---|---|---|"]
arms = [(f"top-{k}, crop+flip" + (" (reproduce.sh stage 3)" if k == topk else ""), f"ct_k{k}") for k in topks]
aug_flags = open(f"{run}/ct_aug/SETTINGS").read().replace("--blr=", "--blr ").split()  # reproduce.sh's command line
blr = "".join([f", encoder blr {v}" for f, v in zip(aug_flags, aug_flags[1:]) if f == "--blr"][-1:])  # the last counts
arms.append((f"top-{topk}, BYOL colour views, head_blr 5e-4{blr}, its own colour-view head (reproduce.sh MAE-CT_aug)",
             "ct_aug"))
for label, d in arms:
    r, last = res(f"{A}/eval_{d}"), log(f"{A}/{d}")[-1]
    out.append(f"| {label} | {fmt(r.get('knn10'))} | {fmt(r.get('knn20'))} | {fmt(r.get('linear'))} | "
               f"{fmt(last['loss'], 3)} | {fmt(last.get('nn_acc'), 3)} | {secs(f'{A}/{d}')} |")

out += ["", f"## 3. Sequential MAE -> head -> tuning vs joint MAE + lambda * NNCLR from scratch ({E1 + E2 + E3} epochs)", "",
        "| arm | epochs | k-NN@10 | k-NN@20 | linear | train s |", "|---|---|---|---|---|---|"]
mae, ct = res(f"{run}/eval_mae"), res(f"{run}/eval_ct")
st = [int(secs(f"{run}/{s}")) for s in ("mae", "head", "ct")]
out.append(f"| MAE only (stage 1) | {E1} | {fmt(mae.get('knn10'))} | {fmt(mae.get('knn20'))} | {fmt(mae.get('linear'))} | {st[0]} |")
out.append(f"| MAE -> head -> tuning (top-{topk}) | {E1}+{E2}+{E3} | {fmt(ct.get('knn10'))} | {fmt(ct.get('knn20'))} | {fmt(ct.get('linear'))} | {sum(st)} |")
for l in lambdas:
    r = res(f"{A}/eval_joint_l{l}")
    out.append(f"| joint, lambda = {l} | {E1 + E2 + E3} | {fmt(r.get('knn10'))} | {fmt(r.get('knn20'))} | {fmt(r.get('linear'))} | {secs(f'{A}/joint_l{l}')} |")
# The loss curves: joint NNCLR loss vs the stage-2 head's NNCLR loss on the frozen MAE (same head, queue, temperature).
head = {r["step"]: r for r in log(f"{run}/head")}
joints = {l: {r["step"]: r for r in log(f"{A}/joint_l{l}")} for l in lambdas}
logged = set(head).union(*joints.values())
pick = sorted({s for s in logged if s in (5, 10) or (s % 20 == 0 and (s // 20) & (s // 20 - 1) == 0)}  # 5, 10, 20, 40, 80, ...
              | {max(d) for d in [head, *joints.values()] if d})
out += ["", "NNCLR loss (and nn_acc: how often the looked-up neighbour has the query's class) during training; the "
        "stage-2 column is the same loss for the head on the frozen stage-1 encoder (logged every 20 steps).", "",
        row(["step", *(f"joint lambda={l}: nnclr_loss / mae_loss / nn_acc" for l in lambdas), "stage 2: loss / nn_acc"]),
        "|---" * (len(lambdas) + 2) + "|"]
for s in pick:
    cells = [(f"{j[s]['nnclr_loss']:.3f} / {j[s]['mae_loss']:.3f} / {j[s]['nn_acc']:.3f}" if s in j else "") for j in joints.values()]
    h = head.get(s)
    out.append(row([s, *cells, f"{h['loss']:.3f} / {h['nn_acc']:.3f}" if h else ""]))
open(f"{run}/ablations.md", "w").write("\n".join(out) + "\n")
print("\n".join(out))
EOF
