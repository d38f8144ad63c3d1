#!/usr/bin/env bash
# A one-node Slurm cluster in a temporary directory, for `make test-slurm`.
#   bash slurm/testing/cluster.sh up     # prints `export SLURM_CONF=...`; exit 3 when it cannot run here
#   bash slurm/testing/cluster.sh down   # stops what `up` started, nothing else
# Installs slurm-wlm and munge with apt when they are missing and this is root. Works in a
# container without systemd or cgroups (proctrack/linuxproc, task/none). State: $MMTRAIN_SLURM_DIR
# (default /tmp/mmtrain-slurm).
set -euo pipefail

dir=${MMTRAIN_SLURM_DIR:-/tmp/mmtrain-slurm}
conf=$dir/slurm.conf
host=$(hostname -s)

cannot() { echo "cluster.sh: cannot start a Slurm cluster here: $*" >&2; exit 3; }

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  [[ $(id -u) == 0 ]] || cannot "slurm-wlm/munge are missing and installing them needs root"
  command -v apt-get >/dev/null || cannot "slurm-wlm/munge are missing and there is no apt-get"
  echo "cluster.sh: installing slurm-wlm and munge" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; } ||
    cannot "apt-get install slurm-wlm munge failed"
}

start_munge() {
  if [[ -S /run/munge/munge.socket.2 ]] && munge -n </dev/null >/dev/null 2>&1; then
    return 0                                  # a munged is running: use it, and leave it running
  fi
  [[ -f /etc/munge/munge.key ]] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge: /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge: /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged --force
  echo started > "$dir/munged.ours"
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat > "$conf" <<EOF
ClusterName=mmtrain-test
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=${MMTRAIN_SLURMCTLD_PORT:-16817}
SlurmdPort=${MMTRAIN_SLURMD_PORT:-16818}
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=30
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  install_packages
  [[ $(id -u) == 0 ]] || cannot "slurmd must run as root here"
  mkdir -p "$dir"
  if [[ -f "$dir/slurmctld.ours" ]] && [[ "$(ps -o stat= -p "$(cat "$dir/slurmctld.ours")" 2>/dev/null)" == [RS]* ]]; then
    echo "export SLURM_CONF=$conf"       # already up (ours)
    return 0
  fi
  start_munge
  write_conf
  export SLURM_CONF=$conf
  slurmctld -D -i -f "$conf" >"$dir/log/slurmctld.out" 2>&1 &
  echo $! > "$dir/slurmctld.ours"
  slurmd -D -f "$conf" >"$dir/log/slurmd.out" 2>&1 &
  echo $! > "$dir/slurmd.ours"
  for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -q idle; then echo "export SLURM_CONF=$conf"; return 0; fi
    sleep 0.5
  done
  tail -5 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  down
  cannot "the node never became idle (logs above)"
}

down() {
  for d in slurmd slurmctld; do
    if [[ -f "$dir/$d.ours" ]]; then
      kill "$(cat "$dir/$d.ours")" 2>/dev/null || true
      rm -f "$dir/$d.ours" "$dir/$d.pid"
    fi
  done
  if [[ -f "$dir/munged.ours" ]]; then
    pkill -u munge -x munged 2>/dev/null || true
    rm -f "$dir/munged.ours"
  fi
  sleep 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
