#!/usr/bin/env bash
# Runs a pipeline through a real one-node Slurm cluster on this machine and checks that its
# results equal the local executor's. Installs Slurm and munge from Debian's packages if needed
# (root), starts the daemons in a scratch folder, and stops what it started on exit.
#
#   scripts/slurm_check.sh BINARY PIPELINE [--set ...]
set -euo pipefail
bin=$(realpath "$1"); pipeline=$(realpath "$2"); shift 2
scratch=$(mktemp -d /tmp/ril-slurm.XXXXXX)
started=()

cleanup() {
  for pidfile in "${started[@]}"; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
  rm -rf "$scratch"
}
trap cleanup EXIT

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "slurm_check: installing slurm-wlm and munge from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; }
fi

host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 2048 ))

# munge: a key, its folders, the daemon.
mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged --force
  started+=(/run/munge/munged.pid)
fi

# slurm.conf with every path in the scratch folder; no cgroup.conf (slurmd 22.05 refuses
# CgroupPlugin=disabled, and starts fine without the file).
mkdir -p "$scratch"/{state,spool,log} /etc/slurm
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=ril
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$scratch/state
SlurmdSpoolDir=$scratch/spool
SlurmctldPidFile=$scratch/slurmctld.pid
SlurmdPidFile=$scratch/slurmd.pid
SlurmctldLogFile=$scratch/log/slurmctld.log
SlurmdLogFile=$scratch/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
rm -f /etc/slurm/cgroup.conf
slurmctld
started+=("$scratch/slurmctld.pid")
slurmd
started+=("$scratch/slurmd.pid")
for _ in $(seq 30); do
  sinfo -h -o %t 2>/dev/null | grep -q idle && break
  sleep 1
done
sinfo

slurm_cache="$scratch/cache-slurm"
local_cache="$scratch/cache-local"
echo "slurm_check: running $pipeline through Slurm"
"$bin" run "$pipeline" "$@" --cache "$slurm_cache" --executor slurm --poll-seconds 1 -j 4 --no-progress --device cpu
echo "slurm_check: running $pipeline locally"
"$bin" run "$pipeline" "$@" --cache "$local_cache" --no-progress --device cpu

# Equal results: the same objects, each with the same files. Wall-clock times (the log, the
# `seconds` fields of training logs) naturally differ and are left out; everything else,
# adapters, metrics, per-image scores, rewards and losses per step, must match exactly.
python3 - "$slurm_cache" "$local_cache" <<'EOF'
import json, pathlib, sys
TIMES = {"seconds", "seconds_per_epoch"}
def strip(v):
    if isinstance(v, dict):
        return {k: strip(x) for k, x in v.items() if k not in TIMES}
    if isinstance(v, list):
        return [strip(x) for x in v]
    return v
def content(path):
    if path.suffix == ".json":
        return strip(json.loads(path.read_text()))
    if path.suffix == ".jsonl":
        return [strip(json.loads(l)) for l in path.read_text().splitlines()]
    return path.read_bytes()
def objects(root):
    out = {}
    for m in pathlib.Path(root, "objects").glob("*/*/MANIFEST.json"):
        doc = json.loads(m.read_text())
        out[doc["key"]] = {name: content(m.parent / name) for name in doc["files"] if name != "log.txt"}
    return out
a, b = objects(sys.argv[1]), objects(sys.argv[2])
assert a.keys() == b.keys(), f"different objects: {sorted(a.keys() ^ b.keys())}"
for k in a:
    for name in a[k].keys() | b[k].keys():
        assert a[k].get(name) == b[k].get(name), f"object {k[:12]}: file {name} differs"
files = sum(len(v) for v in a.values())
print(f"slurm_check: {len(a)} objects ({files} files), all equal between the Slurm and the local run")
EOF
