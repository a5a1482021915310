#!/bin/bash
# A packed campaign (`python -m training pack`) on a lent accelerator; what comes back is left in $OUT.
#
# This workplace's device tool copies the tracked working tree plus at most 8 ignored paths, 64 MiB in
# all, and returns at most 8 files of at most 16 MiB; its machine has torch but not
# segmentation-models-pytorch or albumentations, and no ../shared/data. So, on the CPU machine:
#   python -m training pack training/recipes/device15.toml --out .pack --jpeg-quality 80 --max-mib 29
#   tar czf .pack.tgz -C .pack .      # one file: many small ones are counted in disk blocks
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#     segmentation-models-pytorch==0.6.0 albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 \
#     pydantic-core==2.50.5 simsimd==6.5.16 stringzilla==5.3.2 typing-inspection==0.4.5 annotated-types==0.8.0
#   printf '/.pack/\n/.pack.tgz\n/.whl/\n' >> .git/info/exclude
# and, for the call only (74 MB of weights are tracked; untracked files git does not ignore travel too):
#   git rm -q --cached workers/weights/*.safetensors && echo '/workers/weights/*.safetensors' >> .git/info/exclude
# then run `bash training/recipes/on_device.sh .pack.tgz` there with carry [".pack.tgz", ".whl",
# <pack.json's carry>] and a timeout a few minutes over the recipe's `minutes`; afterwards restore with
#   git reset -q -- workers/weights && sed -i '\#^/workers/weights/\*.safetensors$#d' .git/info/exclude
# Bring the results home with
#   mkdir -p runs/device && tar xzf <files_at>/small.tgz -C runs/device && cat <files_at>/ckpt.part.* | tar xf - -C runs/device
# and run the evaluations pack.json lists ({run} = runs/device/<job>, {checkpoint} = the job's `checkpoint`).
set -u
pack_tgz=${1:?usage: on_device.sh PACK.tgz [campaign options]}
shift
out=${OUT:?the device tool sets OUT}
start=$(date +%s)
work=$(mktemp -d)
data=$work/pack
runs=$work/campaign
mkdir -p "$data" "$runs"
tar xzf "$pack_tgz" -C "$data" || exit 2
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CXR_SHARED_DATA=$data
if ! python3 -c "import segmentation_models_pytorch, albumentations" 2>/dev/null; then
  [ -d .whl ] || { echo "segmentation_models_pytorch is missing there and no .whl/ was carried" >&2; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 -c "import torch, training.train; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 4
python3 -m training campaign "$data/recipe.toml" --out "$runs" "$@"
code=$?
cd "$runs" || exit 5
tar czf "$out/small.tgz" campaign.json */*.json */*.csv */*.log 2>/dev/null
ls */*.fp16.pt >/dev/null 2>&1 && tar cf - */*.fp16.pt | split -b 15M - "$out/ckpt.part."
ls -l "$out"
echo "on_device: campaign exit $code after $(( $(date +%s) - start )) s"
exit $code
