# Sourced by reproduce.sh and ablations.sh. `eval_flags FLAGS...` sets the array `pass` to the extra flags that
# evaluate.py takes too; a training flag such as --compile 0 or --crop_min would stop it. A flag left without its
# value is refused here, before any stage runs. It also sets `dev` to the --device given (the last, as argparse).
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
