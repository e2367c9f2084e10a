# Sourced by scripts/gpu_check.sh and scripts/gpu_bench.sh: install from WHEELS (a folder made by
# scripts/gpu_wheels.sh, or empty) what PYTHON cannot import, one package at a time, logging to $OUT/pip.log.
# Needs PYTHON, WHEELS, OUT and the array NEEDED (module to import -> package to install).
missing=()
for module in "${!NEEDED[@]}"; do
  "$PYTHON" -c "import $module" 2>/dev/null || missing+=("${NEEDED[$module]}")
done
if ((${#missing[@]})); then
  if [[ -n "$WHEELS" && -d "$WHEELS" ]]; then
    echo "installing from $WHEELS: ${missing[*]}"
    # One package at a time: a wheel that is not there (onnx* when the folder had no room) must not stop the rest.
    for package in "${missing[@]}"; do
      "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "$package" >>"$OUT/pip.log" 2>&1 \
        || echo "  not installed: $package (see $OUT/pip.log)"
    done
  else
    echo "missing and no WHEELS_DIR given: ${missing[*]}"
  fi
fi
