#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod slice of several): create the VM or reuse it,
# install embedjax on every worker, start scripts/train.py on all workers at once.
# Run `scripts/run_tpu.sh --help` for the options.
# shellcheck disable=SC2088  # '~/...' in quotes on purpose: paths on the workers, expanded there
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=$(basename "$0")
DEFAULT_REPO=https://github.com/embedjax/embedjax
VENV='~/embedjax-venv'        # on each worker (quoted: expanded there, not here)
LOG='~/embedjax-train.log'    # one per worker, on that worker
PIDFILE='~/embedjax-train.pid'

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --config CONFIG --workdir WORKDIR [options] [--config.KEY=VALUE ...] [-- TRAIN_ARGS]
       $PROG --name NAME --zone ZONE --logs | --delete

Creates the TPU VM NAME (or reuses it if it exists), installs embedjax on every worker and
starts, on all workers at once and in the background,
    python scripts/train.py --config CONFIG --workdir WORKDIR [--config.KEY=VALUE ...] [TRAIN_ARGS]
each worker logging to $LOG. jax.distributed detects the pod itself: no coordinator flags.
To resume (after a crash or a spot preemption), run the same command again: the run
resumes from its last checkpoint in WORKDIR.

Required:
  --name NAME               TPU VM name
  --zone ZONE               e.g. us-central2-b
  --config CONFIG           config file, relative to the repository root (configs/stsb_angle.py[:variant])
  --workdir WORKDIR         run directory; gs://BUCKET/PATH on a slice of several workers (every
                            host reads and writes it); on one worker a path on it may do
Options:
  --project PROJECT         Google Cloud project (default: gcloud's configured one)
  --accelerator-type TYPE   default v4-8 (one worker); v4-32 is 4 workers
  --version RUNTIME         TPU VM software version (default tpu-ubuntu2204-base)
  --spot | --preemptible    create a spot / preemptible VM
  --repo URL                git repository to install (default: pyproject.toml's Repository,
                            else $DEFAULT_REPO)
  --ref REF                 branch, tag or commit of --repo (default main)
  --local                   copy this checkout (git's tracked and unignored files) instead of
                            cloning --repo: runs your uncommitted changes and local configs
  --data DIR                a data directory (local, or gs://) copied to each worker as
                            ~/embedjax-data and passed as EMBEDJAX_DATA (the configs' data root)
  --config.KEY=VALUE        passed to scripts/train.py; so is everything after --
  --logs                    show the end of every worker's log, then exit
  --delete                  delete the TPU VM, then exit
  --dry-run                 print every command (one per line, prefixed '+ ') and run none
                            except the read-only 'describe' that decides create or reuse
  -h, --help                this text

On each worker the checkout lives in ~/embedjax (scripts/ and configs/ are not part of the
package) and is installed with its 'train' extra, jax[tpu] and gcsfs (gs:// paths) into a
Python 3.11 virtualenv $VENV made by uv (the TPU images' own Python is older).

Example, a v4-32 (4 workers):
  $PROG --name emb --zone us-central2-b --accelerator-type v4-32 \\
      --config configs/stsb_angle.py --workdir gs://my-bucket/stsb_angle --config.batch_size=512 --dry-run
EOF
}

die() { echo "$PROG: $*" >&2; exit 2; }

# A word as the shell reads it back: as is when safe, else single-quoted (like printf %q, readable).
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A command line of quoted words.
qcmd() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(q "$word")"; done
  printf '%s' "$out"
}

# Prints a command ('+ ' and its quoted words); runs it unless --dry-run.
run() {
  echo "+ $(qcmd "$@")"
  if [[ -z $dry_run ]]; then "$@"; fi
}

# Hosts in a TPU slice: v2/v3/v4/v5p-N count TensorCores (8 per host), v5e/v6e-N chips
# (up to 8 on one host, else 4 per host); 0 = unknown (treated as several).
workers_of() {
  local n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || { echo 0; return; }
  case $1 in
    v2-* | v3-* | v4-* | v5p-*) echo $((n <= 8 ? 1 : n / 8)) ;;
    v5litepod-* | v5e-* | v6e-*) echo $((n <= 8 ? 1 : n / 4)) ;;
    *) echo 0 ;;
  esac
}

# The Repository of pyproject.toml's [project.urls], if any.
pyproject_repo() {
  [[ -f $ROOT/pyproject.toml ]] || return 0
  sed -n '/^\[project\.urls\]/,/^\[/s/^Repository *= *"\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n 1
}

name="" zone="" project="" accel=v4-8 runtime=tpu-ubuntu2204-base config="" workdir=""
repo="" ref=main local_src="" data="" capacity="" action=train dry_run=""
extra=()
while (($#)); do
  arg=$1
  case $arg in
    --*=*) key=${arg%%=*} value=${arg#*=} inline=1 ;;
    *) key=$arg value="" inline="" ;;
  esac
  case $key in
    --name | --zone | --project | --accelerator-type | --version | --config | --workdir | --repo | --ref | --data)
      if [[ -z $inline ]]; then
        (($# >= 2)) || die "$key needs a value"
        value=$2
        shift
      fi
      case $key in
        --name) name=$value ;;
        --zone) zone=$value ;;
        --project) project=$value ;;
        --accelerator-type) accel=$value ;;
        --version) runtime=$value ;;
        --config) config=$value ;;
        --workdir) workdir=$value ;;
        --repo) repo=$value ;;
        --ref) ref=$value ;;
        --data) data=$value ;;
      esac
      ;;
    --config.*) extra+=("$arg") ;;
    --spot) capacity=--spot ;;
    --preemptible) capacity=--preemptible ;;
    --local) local_src=1 ;;
    --logs) action=logs ;;
    --delete) action=delete ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    *) die "unknown option $arg (see --help)" ;;
  esac
  shift
done

[[ -n $name ]] || die "--name is required (the TPU VM's name)"
[[ -n $zone ]] || die "--zone is required (e.g. --zone us-central2-b)"
gcloud_opts=(--zone="$zone")
[[ -z $project ]] || gcloud_opts+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)

if [[ $action == delete ]]; then
  run "${tpu[@]}" delete "$name" "${gcloud_opts[@]}" --quiet
  exit 0
fi
if [[ $action == logs ]]; then
  run "${tpu[@]}" ssh "$name" "${gcloud_opts[@]}" --worker=all \
    --command="echo \"== \$(hostname) ==\"; tail -n 40 $LOG"
  exit 0
fi

[[ -n $config ]] || die "--config is required (e.g. --config configs/stsb_angle.py)"
[[ -n $workdir ]] || die "--workdir is required (e.g. --workdir gs://BUCKET/run)"
workers=$(workers_of "$accel")
if ((workers != 1)) && [[ $workdir != gs://* ]]; then
  hosts="$workers workers"
  ((workers)) || hosts="several workers"
  die "--workdir must be gs://BUCKET/PATH on a $accel slice ($hosts): every host reads and writes it; got $workdir"
fi
[[ -z $data || $data == gs://* || -d $data ]] || die "--data $data: no such directory"
[[ -n $repo ]] || repo=$(pyproject_repo)
[[ -n $repo ]] || repo=$DEFAULT_REPO

# 1. The VM: reuse it if it exists (a preempted one is deleted and created again), else create it.
#    'describe' is read-only: it runs even with --dry-run, to show which of the two would happen.
describe=("${tpu[@]}" describe "$name" "${gcloud_opts[@]}" --format='value(state)')
echo "+ $(qcmd "${describe[@]}")"
state="" create=1
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
if ! command -v gcloud >/dev/null; then
  [[ -n $dry_run ]] || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)"
  echo "$PROG: gcloud not found; assuming $name does not exist" >&2
elif state=$("${describe[@]}" 2>"$errors"); then
  create=""
elif ! grep -q -E "NOT_FOUND|not found" "$errors"; then
  cat "$errors" >&2
  # A dry run still shows every command (e.g. on a machine where gcloud has no project set yet).
  [[ -n $dry_run ]] || { echo "$PROG: gcloud could not describe $name (above)" >&2; exit 1; }
  echo "$PROG: gcloud could not describe $name (above); dry run: assuming it does not exist" >&2
fi
if [[ $state == PREEMPTED || $state == TERMINATED ]]; then
  echo "$PROG: $name is $state: deleting and creating it again (the run resumes from $workdir)" >&2
  run "${tpu[@]}" delete "$name" "${gcloud_opts[@]}" --quiet
  create=1
fi
if [[ -n $create ]]; then
  run "${tpu[@]}" create "$name" "${gcloud_opts[@]}" --accelerator-type="$accel" --version="$runtime" \
    ${capacity:+"$capacity"}
fi

# 2. The source and the install, on every worker.
if [[ -n $local_src ]]; then
  tarball=${TMPDIR:-/tmp}/embedjax-src-$name.tgz
  run bash -c "cd $(q "$ROOT") && git ls-files -z -co --exclude-standard | tar --null -czf $(q "$tarball") -T -"
  run "${tpu[@]}" scp "$tarball" "$name:embedjax-src.tgz" "${gcloud_opts[@]}" --worker=all
  fetch="rm -rf ~/embedjax && mkdir ~/embedjax && tar -xzf ~/embedjax-src.tgz -C ~/embedjax"
else
  fetch="{ [ -d ~/embedjax/.git ] || git clone -q $(q "$repo") ~/embedjax; }"
  fetch+=" && git -C ~/embedjax fetch -q origin $(q "$ref") && git -C ~/embedjax checkout -q --detach FETCH_HEAD"
fi
# Neither step touches a worker whose previous run is still going (its pid file names a live process).
busy="if [ -f $PIDFILE ] && kill -0 \$(cat $PIDFILE) 2>/dev/null;"
busy+=" then echo \"\$(hostname): a run is still going (see $LOG; $PROG --logs)\" >&2; exit 1; fi"
install="set -e; $busy; $fetch"
install+="; python3 -m pip install -q --user -U uv || python3 -m pip install -q --user --break-system-packages -U uv"
install+="; [ -x $VENV/bin/python ] || python3 -m uv venv -q --python 3.11 $VENV"
install+="; python3 -m uv pip install -q --python $VENV/bin/python -U \"jax[tpu]\" gcsfs -e ~/embedjax\"[train]\""
env="PYTHONUNBUFFERED=1 "
if [[ -n $data ]]; then  # the configs' data root on every worker: ~/embedjax-data
  env+="EMBEDJAX_DATA=~/embedjax-data "
  if [[ $data == gs://* ]]; then
    install+="; mkdir -p ~/embedjax-data && gcloud storage rsync -r $(q "$data") ~/embedjax-data"
  else
    install+="; rm -rf ~/embedjax-data"  # scp --recurse copies into a fresh one below
  fi
fi
run "${tpu[@]}" ssh "$name" "${gcloud_opts[@]}" --worker=all --command="$install"
if [[ -n $data && $data != gs://* ]]; then
  run "${tpu[@]}" scp --recurse "$data" "$name:embedjax-data" "${gcloud_opts[@]}" --worker=all
fi

# 3. The run: every worker at once, in the background.
train=$(qcmd scripts/train.py --config "$config" --workdir "$workdir" ${extra[@]+"${extra[@]}"})
launch="set -e; $busy; cd ~/embedjax"
launch+="; ${env}nohup $VENV/bin/python $train >> $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE"
run "${tpu[@]}" ssh "$name" "${gcloud_opts[@]}" --worker=all --command="$launch"

if [[ -z $dry_run ]]; then
  echo "started on every worker of $name; logs: $PROG --name $(q "$name") --zone $(q "$zone") --logs"
fi
