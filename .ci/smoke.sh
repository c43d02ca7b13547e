#!/usr/bin/env bash
# Install fluxjax as users do, a wheel into a fresh virtual environment, and use it there: import,
# no top-level `convert`, the wheel holds the packaged shapes model's files, the README's first
# command (`fluxjax generate` with no --model: the shapes model), `fluxjax plan --sharding fsdp`,
# and FluxPipeline.from_pretrained("tiny", sharding="fsdp") on 8 simulated CPU devices.
# Nothing runs from the source tree: an editable install hides files a wheel leaves out.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

start=$SECONDS
# Build from a copy: setuptools reuses an in-tree build/, which can hold files the tree no longer has.
mkdir "$WORK/src"
tar --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.egg-info' --exclude=./.venv -cf - . \
    | tar -xf - -C "$WORK/src"
python3 -m pip wheel --no-deps --quiet --wheel-dir "$WORK/dist" "$WORK/src"
# Every file of the packaged models (fluxjax/shapes/weights) is in the wheel: package-data globs miss quietly.
python3 - "$WORK"/dist/fluxjax-*.whl <<'EOF'
import os, sys, zipfile
held = {n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith("fluxjax/shapes/weights/")}
tree = {os.path.join(d, f) for d, _, fs in os.walk("fluxjax/shapes/weights") for f in fs}
assert tree and held == tree, f"the wheel lacks {sorted(tree - held)[:5]} and has {sorted(held - tree)[:5]} extra"
print(f"smoke: the wheel holds the {len(tree)} files of fluxjax/shapes/weights")
EOF
python3 -m venv "$WORK/venv"  # no system site-packages: only what the wheel declares
"$WORK/venv/bin/pip" install --quiet "$WORK"/dist/fluxjax-*.whl
echo "smoke: wheel built and installed in a fresh venv in $((SECONDS - start)) s"

cd "$WORK"  # away from the source tree, so only the installed package can be imported
PY="$WORK/venv/bin/python"
FLUXJAX="$WORK/venv/bin/fluxjax"
# Fresh caches: the CPU kernel is compiled from the wheel's own source files, and an empty hub
# cache makes generate's default model the packaged shapes model on any machine (a cached
# FLUX.1-schnell would take it at full size on a CPU).
export FLUXJAX_COMPILATION_CACHE="$WORK/xla" FLUXJAX_KERNEL_CACHE="$WORK/kernels" HF_HOME="$WORK/hf"

"$PY" - <<'EOF'
import os, sys
import fluxjax
from fluxjax.parallel.strategies import Strategy, available

site = os.path.dirname(os.path.dirname(fluxjax.__file__))
assert site.startswith(sys.prefix), f"fluxjax imported from {site}, not the venv {sys.prefix}"
assert {"dp", "fsdp", "tp", "fsdp_tp"} <= set(available()), available()
Strategy.load("fsdp")
print("smoke: import fluxjax from", site)
EOF

if "$PY" -c "import convert" 2>/dev/null; then
    echo "smoke: FAILED: the wheel installs a top-level 'convert' package" >&2
    exit 1
fi
echo "smoke: no top-level convert"

step=$SECONDS  # the README's first command, from the installed wheel, with no --model
"$FLUXJAX" generate "a red circle on a blue background" --out "$WORK/shapes.png" 2>&1 | tee "$WORK/generate.txt"
grep -q "^fluxjax generate: no FLUX.1 weights in the local hub cache, so this uses the built-in .shapes. model" \
    "$WORK/generate.txt"
"$PY" - "$WORK/shapes.png" <<'EOF'
import json, sys
from importlib.resources import files
from PIL import Image
d = json.loads((files("fluxjax") / "shapes" / "weights" / "defaults.json").read_text())
im = Image.open(sys.argv[1])
assert im.size == (d["width"], d["height"]) and im.text["model"] == "shapes", (im.size, im.text)
EOF
echo "smoke: fluxjax generate (the shapes model by default) wrote shapes.png in $((SECONDS - step)) s"

step=$SECONDS
"$FLUXJAX" plan --model dev --sharding fsdp --devices 8 --hbm 16GiB | tee "$WORK/plan.txt"
grep -q "^fits in 16.0 GiB" "$WORK/plan.txt"
echo "smoke: fluxjax plan in $((SECONDS - step)) s"

step=$SECONDS
XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu "$PY" - <<'EOF'
import jax
import numpy as np
import fluxjax

assert jax.device_count() == 8, jax.devices()
pipe = fluxjax.FluxPipeline.from_pretrained("tiny", sharding="fsdp")
qkv = pipe.transformer.params["double_blocks"]["img_attn"]["qkv"]["kernel"]
assert len({s.device for s in qkv.addressable_shards}) == 8
assert qkv.addressable_shards[0].data.shape != qkv.shape, "fsdp should split the weights"
images = pipe(["a cat", "a dog", "a boat"], num_steps=2, output="np")
assert images.shape == (3, 256, 256, 3) and np.isfinite(images).all()
print("smoke: tiny pipeline under fsdp on", pipe.mesh.shape)
EOF
echo "smoke: fsdp on 8 simulated devices in $((SECONDS - step)) s"
echo "smoke: passed in $((SECONDS - start)) s"
