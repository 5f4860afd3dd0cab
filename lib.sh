# Sourced by reproduce.sh, ablations.sh and gpu_check.sh: their --help, which extra flags evaluate.py takes, and what
# a run folder's stages were made from.

help_or_usage() {  # help_or_usage USAGE FIRST_ARG: --help prints the calling script's header comment; no argument,
  # the usage line (exit 2). Called after the script's cd to its own folder.
  case $2 in
    -h|--help) sed -n '2,/^set -euo/p' "$(basename "$0")" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") echo "$1 (--help: what it runs and its settings)" >&2; exit 2 ;;
  esac
}

# `eval_flags FLAGS...` sets the array `pass` to the extra flags that evaluate.py takes too; a training flag such as
# --compile 0 or --crop_min would stop it. A flag left without its value is refused here, before any stage runs. It
# also sets `dev` to the --device given (the last, as argparse).
eval_flags() {
  local i j
  pass=(); dev=
  for ((i = 1; i <= $#; i++)); do
    case ${!i} in
      --device|--data_path|--img_size|--num_workers|--precision)
        j=$((i + 1)); [ $j -le $# ] || { echo "error: ${!i} needs a value" >&2; exit 2; }
        if [ "${!i}" = --device ]; then dev=${!j}; fi
        pass+=("${!i}" "${!j}"); i=$j ;;
      --device=*) dev=${!i#--device=}; pass+=("${!i}") ;;
      --data_path=*|--img_size=*|--num_workers=*|--precision=*) pass+=("${!i}") ;;
    esac
  done
}

# A finished stage gets DIR/ID, a token of that one training; a stage or an evaluation made from another stage's
# checkpoint keeps that stage's ID in its DIR/FROM (also when that checkpoint is another run folder's, MAE=). If the
# input stage is trained again (deleted after a change of settings, say), FROM no longer matches its ID, and what was
# made from the old one is not taken for current. A folder made before these files existed has no FROM: once its
# input has an ID, that input was trained again since, so it is not current either. A checkpoint without an ID
# beside it (an official MAE file; a stage of such an old folder) is current by definition.
arg_of() {  # arg_of FLAG ARGS...: the value after the last FLAG in ARGS, empty if none
  local flag=$1 value= prev= a; shift
  for a in "$@"; do if [ "$prev" = "$flag" ]; then value=$a; fi; prev=$a; done
  echo "$value"
}
input_id() {  # input_id CHECKPOINT: the ID of the stage folder it is in, empty if none
  if [ -n "$1" ] && [ -f "$(dirname "$1")/ID" ]; then cat "$(dirname "$1")/ID"; fi
}
holds_output() {  # holds_output DIR: DIR holds a checkpoint, DONE or an evaluation's results.json
  [ -e "$1/ckpt.pt" ] || [ -e "$1/DONE" ] || [ -e "$1/results.json" ]
}
made_from_current() {  # made_from_current DIR CHECKPOINT: false if DIR holds anything made from an earlier training
  local id; id=$(input_id "$2")
  if [ -z "$id" ] || ! holds_output "$1"; then return 0; fi  # nothing made yet: nothing to be stale
  [ -f "$1/FROM" ] && [ "$(cat "$1/FROM")" = "$id" ]  # no FROM: made before FROM existed, from an earlier training
}
evaluated_already() {  # evaluated_already DIR CHECKPOINT: true (and says so) if DIR/results.json is of CHECKPOINT as
  # it is now; one of an earlier training of it is removed, so that the evaluation runs again
  [ -f "$1/results.json" ] || return 1
  if made_from_current "$1" "$2"; then echo "== $1: evaluated already, skipped"; return 0; fi
  echo "== $1: $2 was trained again since; evaluating it again"; rm "$1/results.json"; return 1
}
made_something() {  # made_something DIR: a stage folder with its SETTINGS and something made: settings to keep to
  [ -f "$1/SETTINGS" ] && holds_output "$1"
}
record_from() {  # record_from DIR CHECKPOINT
  local id; id=$(input_id "$2")
  if [ -n "$id" ]; then echo "$id" > "$1/FROM"; fi
}
finish_stage() {  # finish_stage DIR SECONDS: DONE holds the wall seconds of the call that finished it
  echo "$(date +%s%N)-$$-$RANDOM" > "$1/ID"  # first: a kill between the two leaves an ID without DONE (resumed)
  echo "$2" > "$1/DONE"
}
