#!/bin/bash
# Builds .gpu/, the bundle benchmarks/gpu_checks.sh unpacks on a lent GPU machine (Python 3.12, torch with CUDA, no
# registry, not the project's packages), from this machine's registry, before any device time is spent:
#   bash benchmarks/gpu_bundle.sh targets    # what `gpu_checks.sh targets|train_step*` needs: open_clip (~2 MB)
#   bash benchmarks/gpu_bundle.sh pretrain   # and what `gpu_checks.sh pretrain` needs: Ray, DeepSpeed, decord, PyAV
# Pass `.gpu` in the device tool's `carry`. Versions are this venv's (what the suite ran), for CPython 3.12 on x86-64.
# What the machine's image already holds (the device tool's KINDS.md, 2026-11-17) is not carried: torch, numpy,
# pyarrow, aiohttp, grpcio, opencv, ...; `make gpu-preflight` tries the bundle beside stand-ins for that image.
set -euo pipefail
MODE=${1:-}
VENV_PY=${VENV_PY:-.venv/bin/python}
DEST=${DEST:-.gpu}
LIMIT_BYTES=$(( 64 * 1024 * 1024 ))  # the device tool's carry limit, for the whole working tree

# The targets need open_clip beyond the image. The pretrain list is the closure of ray[default,train,data,tune],
# deepspeed, decord, av, open_clip_torch and opencv in this venv, less what the image holds, less Ray itself (trimmed,
# below) and less what only features the checks never use import, to stay under the carry limit:
# virtualenv with distlib and python-discovery (Ray's pip/uv runtime environments), cryptography with cffi and
# pycparser (TLS and certificate credentials), py-spy (the dashboard's stack dumps).
TARGETS=(open_clip_torch ftfy wcwidth)
PRETRAIN=(aiohttp-cors annotated-types av colorful decord google-api-core google-auth googleapis-common-protos hjson
  httpcore2 httpx2 jsonschema jsonschema-specifications opencensus opencensus-context opentelemetry-api
  opentelemetry-exporter-prometheus opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions
  platformdirs proto-plus pyasn1 pyasn1-modules pydantic pydantic-core referencing rpds-py smart-open tensorboardx
  truststore typing-inspection)

case "$MODE" in
targets|pretrain) ;;
*) echo "usage: bash benchmarks/gpu_bundle.sh targets|pretrain" >&2; exit 2 ;;
esac

version() { "$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
# pip matches manylinux tags exactly: name the ones the wheels of these packages use.
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
download() {  # name==version ... into $1; pip's exit status, without this machine's "Location ... is ignored" lines
  local into=$1 log rc=0; shift; log=$(mktemp)
  "$VENV_PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$into" "$@" > "$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" || true; rm -f "$log"; return $rc
}

rm -rf "$DEST"
mkdir -p "$DEST/whl"
pins() { for n in "$@"; do echo "$n==$(version "$n")"; done; }
echo "wheels: $(pins "${TARGETS[@]}" | tr '\n' ' ')"
download "$DEST/whl" $(pins "${TARGETS[@]}")

if [ "$MODE" = pretrain ]; then
  # As wheels these are over the carry limit (Ray's alone is 79 MB, PyAV's 36 MB): everything the pretrain checks
  # add goes into one tree, unpacked as pip would, and one tar.xz. Left out of Ray: its Java jars, RLlib, Serve,
  # the LLM library and the dashboard's source maps, which the checks never load (the dashboard needs its client).
  # DeepSpeed is pure Python and only an sdist on the registry: this venv's installed tree is copied.
  work=$(mktemp -d)
  echo "into site.tar.xz: $(pins "${PRETRAIN[@]}" ray | tr '\n' ' ')deepspeed==$(version deepspeed)"
  download "$work/whl" $(pins "${PRETRAIN[@]}" ray)
  "$VENV_PY" - "$work/site" "$work"/whl/*.whl <<'PY'  # as pip unpacks: executables (Ray's raylet) stay executable
import os, sys, zipfile
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = archive.extract(info, sys.argv[1])
            if (info.external_attr >> 16) & 0o111:
                os.chmod(path, (info.external_attr >> 16) & 0o777)
PY
  rm -rf "$work"/site/ray/{jars,rllib,serve,llm}
  site=$("$VENV_PY" -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('deepspeed').origin))")
  cp -r "$site" "$(dirname "$site")/deepspeed-$(version deepspeed).dist-info" "$work/site/"  # find_spec: no import
  find "$work/site" \( -name '*.map' -o -name __pycache__ \) -prune -exec rm -rf {} +
  # Only Ray's own three binaries are stripped: the auditwheel-patched libraries of the other wheels (decord's,
  # PyAV's) no longer load once stripped ("ELF load command address/offset not page-aligned").
  strip --strip-unneeded "$work"/site/ray/_raylet.so "$work"/site/ray/core/src/ray/gcs/gcs_server \
    "$work"/site/ray/core/src/ray/raylet/raylet
  # xz's x86 filter and a 64 MiB window: 57 MB where plain `xz -6` gives 70 MB (mostly machine code); ~2 min here.
  tar -C "$work/site" -cf - . | xz -T0 --x86 --lzma2=preset=9e,dict=64MiB > "$DEST/site.tar.xz"
  rm -rf "$work"
fi

size=$(du -sb "$DEST" | cut -f1)
echo "$DEST: $(( size / 1024 / 1024 )) MiB ($(ls "$DEST"/whl | wc -l) wheels$(ls "$DEST"/*.tar.xz >/dev/null 2>&1 \
  && echo ", $(cd "$DEST" && ls *.tar.xz | tr '\n' ' ')"))"
if [ "$size" -ge "$LIMIT_BYTES" ]; then
  echo "$DEST is over the device tool's 64 MiB carry limit: it cannot travel" >&2; exit 1
fi
