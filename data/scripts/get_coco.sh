#!/usr/bin/env bash
# Download COCO 2017 detection data as cocodataset.org ships it, into datasets/coco (or $1):
#   datasets/coco/train2017/*.jpg  datasets/coco/val2017/*.jpg
#   datasets/coco/annotations/instances_{train,val}2017.json
# About 19 GB of downloads (train 18 GB, val 0.8 GB, annotations 0.25 GB) and 20 GB on disk after unzipping.
# Used by cfg/data/coco.yaml. Run it yourself once, with internet access; training never downloads anything.
# Usage: bash data/scripts/get_coco.sh [DEST] [--no-train]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${1:-$ROOT/datasets/coco}"
[[ "${DEST}" == --* ]] && DEST="$ROOT/datasets/coco"
NO_TRAIN=0
for a in "$@"; do [[ "$a" == "--no-train" ]] && NO_TRAIN=1; done

URL=http://images.cocodataset.org
FILES=(annotations/annotations_trainval2017.zip zips/val2017.zip)
[[ $NO_TRAIN == 0 ]] && FILES+=(zips/train2017.zip)

command -v unzip >/dev/null || { echo "error: 'unzip' is required" >&2; exit 2; }
if command -v curl >/dev/null; then GET=(curl -fL --retry 3 -C - -o); else GET=(wget -c -O); fi

mkdir -p "$DEST"
cd "$DEST"
for f in "${FILES[@]}"; do
  zip="$(basename "$f")"
  echo "downloading $URL/$f"
  "${GET[@]}" "$zip" "$URL/$f"   # resumes a partial download
  echo "unzipping $zip"
  unzip -q -o "$zip" && rm -f "$zip"
done
# annotations_trainval2017.zip also holds captions / keypoints files; the detector reads only instances_*.json
echo "done: $(ls "$DEST")"
