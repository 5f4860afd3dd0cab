# Sourced by reproduce.sh and ablations.sh: which extra flags evaluate.py takes, and what a run folder's stages were
# made from.

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
# checkpoint keeps that stage's ID in its DIR/FROM. If the input stage is trained again (deleted after a change of
# settings, say), FROM no longer matches its ID, and what was made from the old one is not taken for current.
# Folders made before these files existed (or a checkpoint from elsewhere, MAE=) have no ID: nothing to compare.
arg_of() {  # arg_of FLAG ARGS...: the value after the last FLAG in ARGS, empty if none
  local flag=$1 value= prev= a; shift
  for a in "$@"; do if [ "$prev" = "$flag" ]; then value=$a; fi; prev=$a; done
  echo "$value"
}
input_id() {  # input_id CHECKPOINT: the ID of the stage folder it is in, empty if none
  if [ -n "$1" ] && [ -f "$(dirname "$1")/ID" ]; then cat "$(dirname "$1")/ID"; fi
}
made_from_current() {  # made_from_current DIR CHECKPOINT: false if DIR was made from an earlier training of it
  local id; id=$(input_id "$2")
  [ -z "$id" ] || [ ! -f "$1/FROM" ] || [ "$(cat "$1/FROM")" = "$id" ]
}
record_from() {  # record_from DIR CHECKPOINT
  local id; id=$(input_id "$2")
  if [ -n "$id" ]; then echo "$id" > "$1/FROM"; fi
}
finish_stage() {  # finish_stage DIR SECONDS: DONE holds the wall seconds of the call that finished it
  echo "$2" > "$1/DONE"
  echo "$(date +%s%N)-$$-$RANDOM" > "$1/ID"
}
