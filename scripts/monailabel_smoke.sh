#!/usr/bin/env bash
# End-to-end check of a few-shot bundle in MONAI Label's bundle app ("monaibundle"), offline, on 127.0.0.1:
# inference, then the labelling loop: labels for 3 images saved through the datastore API, POST /train (a
# second POST while it runs is refused), the new model served, its mask checked; then active learning: the
# app gets the lines the bundle docs give, POST /scoring scores the unlabelled images by the head ensemble's
# entropy and POST /activelearning serves the most uncertain.
#
# Usage: scripts/monailabel_smoke.sh [MODEL_PT]
#   MODEL_PT  a trained models/model.pt of $BUNDLE; without it a tiny GlaS model is trained on synthetic data.
# Environment:
#   BUNDLE           bundle under bundles/ (default mdm_glas_fewshot)
#   IMAGE            image sent for inference (default: a synthetic GlaS test image, non-square)
#   MONAILABEL_VENV  virtual environment to use or create (default ~/.cache/monai_mdm/monailabel-venv)
#   PYTHON           interpreter that creates it (default python3)
#   KEEP_WORK=1      keep the temporary folder (data, app, server log, returned mask)
#   TRAIN_EPOCHS     max_epochs of the training request (default 8 of epoch_length=25 head steps, as in step 2)
#
# MONAI Label imports torchvision, which has no build for the CPU torch 2.13.0 this project otherwise pins,
# so its venv gets torch 2.14.1 + torchvision 0.29.1 (several GB, minutes on the first run).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE=${BUNDLE:-mdm_glas_fewshot}
VENV=${MONAILABEL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/monai_mdm/monailabel-venv}
MODEL=${1:-}
START=$(date +%s)
WORK=$(mktemp -d -t monailabel_smoke.XXXXXX)
SERVER_PID=""

cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ ${KEEP_WORK:-0} == 1 ]]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
say() { echo "[$(( $(date +%s) - START ))s] $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

[[ -d $REPO/bundles/$BUNDLE ]] || fail "no bundle '$BUNDLE' under $REPO/bundles"
[[ -z $MODEL || -f $MODEL ]] || fail "model '$MODEL' not found"

# 1. The virtual environment: MONAI Label, then this project (editable, so it runs the code of this checkout).
# pydicom-seg 0.4.1 (imported by the server) fails with pydicom 3 (MONAILabel issue #1841): keep the 2.x line.
[[ -x $VENV/bin/python ]] || { say "creating $VENV"; "${PYTHON:-python3}" -m venv "$VENV"; }
PY=$VENV/bin/python
if ! (cd "$WORK" && "$PY" -c "import torchvision, monailabel.app" > /dev/null 2>&1); then
    say "installing torch 2.14.1, torchvision 0.29.1, monailabel 0.8.5 into $VENV"
    "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 monailabel==0.8.5 \
        "pydicom<3" "dicomweb-client<0.60" "pynetdicom<3"
fi
export PATH="$VENV/bin:$PATH"  # the monailabel launcher runs the `python` it finds first
if ! (cd "$WORK" && "$PY" -c "import monai_mdm, sys; sys.exit(not monai_mdm.__file__.startswith('$REPO/'))" 2>/dev/null); then
    say "installing this project into $VENV"
    "$VENV/bin/pip" install -q -e "$REPO"
fi
(cd "$WORK" && "$PY" -c "import monailabel, monai, torch, torchvision, monai_mdm
print('monailabel', monailabel.__version__, '| monai', monai.__version__, '| torch', torch.__version__,
      '| torchvision', torchvision.__version__)")

# 2. A trained bundle model (tiny, from synthetic data) unless one was given.
say "writing synthetic GlaS data"
"$PY" -m monai_mdm.data.synthetic --out "$WORK/data" > /dev/null
GLAS=$WORK/data/GlaS
if [[ -z $MODEL ]]; then
    [[ $BUNDLE == mdm_glas_fewshot ]] || fail "pass a trained model.pt for $BUNDLE (only GlaS is trained here)"
    say "pretraining the tiny MDM (20 iterations)"
    (cd "$REPO" && "$PY" -m monai.bundle run --config_file bundles/mdm_pretrain/configs/train.json \
        --dataset_dir "$GLAS" --output_dir "$WORK/pretrain" --max_iterations 20 --batch_size 4 \
        --image_size 48 --save_interval 20 --grid_interval 0 --progress_bar False --num_workers 0 > "$WORK/pretrain.log" 2>&1) \
        || { tail -20 "$WORK/pretrain.log"; fail "pretraining"; }
    say "training the few-shot head (2 labelled images)"
    (cd "$REPO" && "$PY" -m monai.bundle run --config_file bundles/mdm_glas_fewshot/configs/train.json \
        --dataset_dir "$GLAS" --pretrained_weights "$WORK/pretrain/models/model_ema.pt" --label_budget 2 \
        --crops_per_image 8 --max_epochs 8 --warmup_epochs 1 --output_dir "$WORK/fewshot" > "$WORK/fewshot.log" 2>&1) \
        || { tail -20 "$WORK/fewshot.log"; fail "few-shot training"; }
    MODEL=$WORK/fewshot/models/model.pt
fi

# 3. The bundle app from the monailabel package, with the bundle in <app>/model/<name>/ and its weights.
say "setting up the monaibundle app"
(cd "$WORK" && "$VENV/bin/monailabel" apps --download --name monaibundle --output "$WORK/apps" > /dev/null)
APP=$WORK/apps/monaibundle
[[ -f $APP/main.py ]] || fail "monaibundle app not found in the monailabel package"
# active learning by the head ensemble's uncertainty: the lines the bundle docs tell users to add
"$PY" - "$APP/main.py" "$BUNDLE" <<'EOF'
import sys
from pathlib import Path

main, bundle = Path(sys.argv[1]), sys.argv[2]
text = main.read_text()
additions = {
    "import monailabel\n": "from monai_mdm.apps import monailabel as mdm\n",
    "        methods: Dict[str, ScoringMethod] = {}\n":
        f"        methods['{bundle}_entropy'] = mdm.scoring_method(self.models['{bundle}'])\n",
    '            "first": First(),\n': "            'mdm_entropy': mdm.strategy(),\n",
}
for anchor, line in additions.items():
    assert text.count(anchor) == 1, f"{main}: no single {anchor.strip()!r} to add the active-learning lines after"
    text = text.replace(anchor, anchor + line)
main.write_text(text)
EOF
mkdir -p "$APP/model/$BUNDLE/models"
cp -r "$REPO/bundles/$BUNDLE/configs" "$APP/model/$BUNDLE/"
cp "$MODEL" "$APP/model/$BUNDLE/models/model.pt"

IMAGE=${IMAGE:-$GLAS/testA_1.bmp}
[[ -f $IMAGE ]] || fail "image '$IMAGE' not found"
mkdir -p "$WORK/studies"
cp "$IMAGE" "$WORK/studies/"
LABELLED=(train_1 train_2 train_3)  # labelled in step 6
UNLABELLED=(testA_2 testA_3)  # with the inference image: what active learning ranks in step 9
for name in "${LABELLED[@]}" "${UNLABELLED[@]}"; do cp "$GLAS/$name.bmp" "$WORK/studies/"; done

# 4. The server, offline: a local bundle (no model-zoo look-up), no SAM2 model, the bundle's trainer on.
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
say "starting monailabel on 127.0.0.1:$PORT"
# the studies folder lists only MONAI_LABEL_DATASTORE_FILE_EXT files, whose default has no *.bmp (GlaS)
export MONAI_LABEL_DATASTORE_FILE_EXT='["*.bmp", "*.png", "*.jpg", "*.tif", "*.tiff"]'
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the server and the training it starts
export MONAI_LABEL_AUTO_UPDATE_SCORING=false  # step 9 scores on request, so no background scoring races it
(cd "$WORK" && exec "$VENV/bin/monailabel" start_server --app "$APP" --studies "$WORK/studies" \
    --host 127.0.0.1 --port "$PORT" \
    --conf models "$BUNDLE" --conf zoo_source github --conf sam2 false \
    --conf preload false > "$WORK/server.log" 2>&1) &
SERVER_PID=$!

for _ in $(seq 1 180); do
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -40 "$WORK/server.log"; fail "server exited"; }
    curl -sf "http://127.0.0.1:$PORT/info/" -o "$WORK/info.json" && break
    sleep 2
done
[[ -s $WORK/info.json ]] || { tail -40 "$WORK/server.log"; fail "server did not answer /info/"; }
"$PY" - "$WORK/info.json" "$BUNDLE" <<'EOF'
import json, sys
info = json.load(open(sys.argv[1]))
model = info["models"].get(sys.argv[2])
assert model, f"{sys.argv[2]} not among the server's models {sorted(info['models'])}"
print("server models:", sorted(info["models"]), "| labels:", model["labels"], "| dimension:", model["dimension"])
assert sys.argv[2] in info.get("trainers", {}), f"no trainer for {sys.argv[2]}: {sorted(info.get('trainers', {}))}"
print("server trainers:", sorted(info["trainers"]))
EOF

# 5. Inference: the image is uploaded, the mask comes back as a file of the same format.
EXT=".${IMAGE##*.}"
say "POST /infer/$BUNDLE with $(basename "$IMAGE")"
curl -sf -X POST "http://127.0.0.1:$PORT/infer/$BUNDLE?output=image" \
    -F "file=@$IMAGE" -F 'params={"device": "cpu"}' -o "$WORK/mask$EXT" \
    || { tail -40 "$WORK/server.log"; fail "inference request"; }
STEM=$(basename "$IMAGE" "$EXT")
say "POST /infer/$BUNDLE?image=$STEM (the same image from the studies folder)"
curl -sf -X POST "http://127.0.0.1:$PORT/infer/$BUNDLE?image=$STEM&output=image" -o "$WORK/mask_by_id$EXT" \
    || { tail -40 "$WORK/server.log"; fail "inference request by image id"; }
cmp -s "$WORK/mask$EXT" "$WORK/mask_by_id$EXT" || fail "uploaded and studies-folder requests gave different masks"

check_mask() {  # IMAGE MASK: the mask has the image's size, label values only, and is no single class
"$PY" - "$1" "$2" "$WORK/info.json" "$BUNDLE" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image

image, mask_file = Image.open(sys.argv[1]), Path(sys.argv[2])
labels = json.load(open(sys.argv[3]))["models"][sys.argv[4]]["labels"]
mask = np.asarray(Image.open(mask_file))
print(f"image {image.size[0]}x{image.size[1]} -> mask {mask.shape[1]}x{mask.shape[0]} {mask.dtype}, "
      f"values {np.unique(mask).tolist()}, labels {labels}")
assert mask.shape == (image.size[1], image.size[0]), "mask size differs from the image's"
assert set(np.unique(mask).tolist()) <= {0, *labels.values()}, "mask holds values that are no label"
# plausible: no class covers (nearly) the whole image (for face parts the "background" class may be absent)
values, counts = np.unique(mask, return_counts=True)
largest = float(counts.max() / mask.size)
print(f"foreground fraction {float((mask > 0).mean()):.3f}, largest class {int(values[counts.argmax()])} "
      f"covers {largest:.3f}")
assert largest < 0.98, "implausible mask: (nearly) all one class"
anno = Path(sys.argv[1]).with_name(Path(sys.argv[1]).stem + "_anno.bmp")
if anno.is_file():  # the synthetic GlaS truth: how good the tiny model is, for information
    truth = np.asarray(Image.open(anno)) > 0
    dice = 2 * (truth & (mask > 0)).sum() / (truth.sum() + (mask > 0).sum())
    print(f"Dice against the synthetic truth {dice:.3f}")
EOF
}
check_mask "$IMAGE" "$WORK/mask$EXT"
say "inference PASS: $BUNDLE served by MONAI Label returned a plausible mask of the image's size"

# 6. Labels for 3 images, as a viewer saves them: PUT /datastore/label, one class index per pixel (PNG).
"$PY" - "$GLAS" "$WORK/labels" "${LABELLED[@]}" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image

glas, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
for name in sys.argv[3:]:
    gland = (np.asarray(Image.open(glas / f"{name}_anno.bmp")) > 0).astype(np.uint8)
    Image.fromarray(gland).save(out / f"{name}.png")
EOF
for name in "${LABELLED[@]}"; do
    curl -sf -X PUT "http://127.0.0.1:$PORT/datastore/label?image=$name&tag=final" \
        -F "label=@$WORK/labels/$name.png" -o /dev/null || { tail -40 "$WORK/server.log"; fail "saving the label of $name"; }
done
say "saved labels of ${LABELLED[*]}"

# 7. Training from the labels: POST /train/<model>, a second POST while it runs, poll until it ends.
MODEL_PT=$APP/model/$BUNDLE/models/model.pt
BEFORE=$(sha256sum "$MODEL_PT" | cut -c1-16)
PARAMS="{\"device\": \"cpu\", \"max_epochs\": ${TRAIN_EPOCHS:-8}, \"val_split\": 0.2}"
say "POST /train/$BUNDLE $PARAMS"
TRAIN_START=$(date +%s)
curl -sf -X POST "http://127.0.0.1:$PORT/train/$BUNDLE" -H "Content-Type: application/json" -d "$PARAMS" \
    -o "$WORK/train.json" || { tail -40 "$WORK/server.log"; fail "training request"; }
# MONAI Label counts a training as running once its process has started; a request before that is queued
for _ in $(seq 1 50); do
    curl -sf "http://127.0.0.1:$PORT/train/?check_if_running=true" -o /dev/null && break
    sleep 0.2
done
CODE=$(curl -s -o "$WORK/train_again.json" -w "%{http_code}" -X POST "http://127.0.0.1:$PORT/train/$BUNDLE" \
    -H "Content-Type: application/json" -d "$PARAMS")
echo "a second POST /train while training: HTTP $CODE $(cat "$WORK/train_again.json")"
[[ $CODE == 429 ]] && grep -q "Already Running" "$WORK/train_again.json" \
    || fail "a second training request was not refused (HTTP $CODE)"
STATUS=""
for _ in $(seq 1 450); do
    curl -sf "http://127.0.0.1:$PORT/train/" -o "$WORK/train_status.json" || true
    STATUS=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1])).get('status', ''))" \
        "$WORK/train_status.json" 2>/dev/null || true)
    [[ $STATUS == DONE || $STATUS == ERROR || $STATUS == STOPPED ]] && break
    sleep 2
done
"$PY" - "$WORK/train_status.json" <<'EOF'
import json, sys
task = json.load(open(sys.argv[1]))
print(f"training {task.get('status')}; last lines of its log:")
for line in task.get("details", [])[-6:]:
    print("   ", str(line).rstrip()[-160:])
EOF
[[ $STATUS == DONE ]] || { tail -60 "$WORK/server.log"; fail "training ended with status '${STATUS:-none}'"; }
say "training DONE in $(( $(date +%s) - TRAIN_START ))s"
[[ $(sha256sum "$MODEL_PT" | cut -c1-16) != "$BEFORE" ]] || fail "training did not replace $MODEL_PT"

# 8. The new model serves: the same image again, its mask checked as before.
say "POST /infer/$BUNDLE?image=$STEM with the new model"
curl -sf -X POST "http://127.0.0.1:$PORT/infer/$BUNDLE?image=$STEM&output=image" -o "$WORK/mask_trained$EXT" \
    || { tail -40 "$WORK/server.log"; fail "inference request with the new model"; }
check_mask "$IMAGE" "$WORK/mask_trained$EXT"
say "PASS: labels saved in MONAI Label trained $BUNDLE, and the new model returned a plausible mask"

# 9. Active learning: score the unlabelled images with the new model, then ask for the next one to label.
say "POST /scoring/${BUNDLE}_entropy (synchronous)"
curl -sf -X POST "http://127.0.0.1:$PORT/scoring/${BUNDLE}_entropy?run_sync=true" -o "$WORK/scoring.json" \
    || { tail -40 "$WORK/server.log"; fail "scoring request"; }
curl -sf "http://127.0.0.1:$PORT/datastore/?output=all" -o "$WORK/datastore.json" \
    || { tail -40 "$WORK/server.log"; fail "datastore listing"; }
curl -sf -X POST "http://127.0.0.1:$PORT/activelearning/mdm_entropy" -H "Content-Type: application/json" -d '{}' \
    -o "$WORK/next.json" || { tail -40 "$WORK/server.log"; fail "next-sample request"; }
"$PY" - "$WORK/datastore.json" "$WORK/next.json" "$STEM" "${UNLABELLED[@]}" <<'EOF'
import json, sys

objects = json.load(open(sys.argv[1]))["objects"]
served = json.load(open(sys.argv[2]))
unlabelled = sys.argv[3:]
scores = {name: objects[name]["image"]["info"].get("mdm_entropy") for name in unlabelled}
print("entropy of the unlabelled images:", {k: None if v is None else round(v, 4) for k, v in scores.items()})
assert all(isinstance(v, float) for v in scores.values()), "an unlabelled image was not scored"
best = max(scores, key=scores.get)
print(f"next sample served: {served.get('id')} (most uncertain: {best})")
assert served.get("id") == best, "the strategy did not serve the most uncertain image"
EOF
say "PASS: active learning scored the ${#UNLABELLED[@]}+1 unlabelled images and served the most uncertain"
