#!/usr/bin/env bash
# A Slurm cluster in a temporary directory, for `make test-slurm` (one node: this host) and
# `make test-multinode` (two nodes on this machine, each a network namespace).
#   bash slurm/testing/cluster.sh up [--nodes 2]     prints the `export ...` lines the tests need;
#                                                   exit 3 when it cannot run here
#   bash slurm/testing/cluster.sh down [--nodes 2]   stops what `up` started, removes what it made
# Installs slurm-wlm and munge (and for two nodes openssh-server and pdsh) with apt when they are
# missing and this is root. Works in a container without systemd or cgroups (proctrack/linuxproc,
# task/none). State: $MMTRAIN_SLURM_DIR (default /tmp/mmtrain-slurm, /tmp/mmtrain-slurm2).
#
# Two nodes: a bridge (mmtbr0) with an address of a private subnet ($MMTRAIN_TEST_SUBNET,
# default 10.241.7) and one network namespace per node (mmt-node1, mmt-node2), each with a veth
# `eth0` on the bridge and its own address. No default route, no forwarding: nothing leaves the
# subnet, which exists only while the cluster is up. slurmctld listens on the bridge address; each
# node runs its own slurmd (and an sshd, for the deepspeed launcher's pdsh) inside its namespace,
# entered with `nsenter --net` (`ip netns exec` remounts /sys and slurmd then fails on cgroups).
set -euo pipefail

nodes=1
cmd=${1:-}
shift || true
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes=${2:?--nodes needs 1 or 2}; shift 2 ;;
    *) echo "usage: $0 up|down [--nodes 1|2]" >&2; exit 2 ;;
  esac
done
[[ $nodes == 1 || $nodes == 2 ]] || { echo "cluster.sh: --nodes must be 1 or 2" >&2; exit 2; }

if (( nodes == 1 )); then dir=${MMTRAIN_SLURM_DIR:-/tmp/mmtrain-slurm}; else dir=${MMTRAIN_SLURM_DIR:-/tmp/mmtrain-slurm2}; fi
conf=$dir/slurm.conf
host=$(hostname -s)
net=${MMTRAIN_TEST_SUBNET:-10.241.7}
bridge=mmtbr0

cannot() { echo "cluster.sh: cannot start a Slurm cluster here: $*" >&2; exit 3; }

install_packages() {
  local want=(slurmctld munged)
  (( nodes == 2 )) && want+=(sshd pdsh nsenter ip)
  local missing=0 c
  for c in "${want[@]}"; do command -v "$c" >/dev/null || [[ -x /usr/sbin/$c ]] || missing=1; done
  (( missing )) || return 0
  [[ $(id -u) == 0 ]] || cannot "slurm-wlm/munge are missing and installing them needs root"
  command -v apt-get >/dev/null || cannot "slurm-wlm/munge are missing and there is no apt-get"
  local pkgs=(slurm-wlm munge)
  (( nodes == 2 )) && pkgs+=(openssh-server openssh-client pdsh iproute2 util-linux)
  echo "cluster.sh: installing ${pkgs[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null; } ||
    cannot "apt-get install ${pkgs[*]} failed"
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

# Every CPU of the machine, whatever OMP_NUM_THREADS says (`nproc` honours it: with
# OMP_NUM_THREADS=1 a node had CPUs=1 and every 2-task job stayed PENDING forever).
cpus() { nproc --all; }

write_conf() {
  local mem ctld
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 / nodes ))
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  if (( nodes == 1 )); then ctld=$host; else ctld="$host($net.1)"; fi
  cat > "$conf" <<EOF
ClusterName=mmtrain-test$nodes
SlurmctldHost=$ctld
SlurmUser=root
SlurmctldPort=${MMTRAIN_SLURMCTLD_PORT:-$(( nodes == 1 ? 16817 : 16827 ))}
SlurmdPort=${MMTRAIN_SLURMD_PORT:-$(( nodes == 1 ? 16818 : 16828 ))}
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=30
SlurmdTimeout=10
SlurmctldTimeout=10
MessageTimeout=5
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
EOF
  if (( nodes == 1 )); then
    echo "NodeName=$host CPUs=$(cpus) RealMemory=$mem State=UNKNOWN" >> "$conf"
  else
    for i in 1 2; do
      echo "NodeName=node$i NodeAddr=$net.1$i CPUs=$(cpus) RealMemory=$mem State=UNKNOWN" >> "$conf"
    done
  fi
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$conf"
}

# -- two nodes: the network, one slurmd and one sshd per namespace ---------------------------
in_node() { local n=$1; shift; nsenter --net="/run/netns/mmt-$n" unshare --uts sh -c "hostname $n; exec \"\$@\"" sh "$@"; }

make_network() {
  ip link add "$bridge" type bridge
  ip addr add "$net.1/24" dev "$bridge"
  ip link set "$bridge" up
  for i in 1 2; do
    ip netns add "mmt-node$i"
    ip link add "mmtv$i" type veth peer name eth0 netns "mmt-node$i"
    ip link set "mmtv$i" master "$bridge" up
    ip -n "mmt-node$i" addr add "$net.1$i/24" dev eth0
    ip -n "mmt-node$i" link set eth0 up
    ip -n "mmt-node$i" link set lo up
  done
}

remove_network() {
  for i in 1 2; do
    ip netns pids "mmt-node$i" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip link del "mmtv$i" 2>/dev/null || true
    ip netns del "mmt-node$i" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
}

# what the deepspeed launcher needs: passwordless ssh (pdsh) into each node, with keys and a
# client config of the cluster's own, through an `ssh` in $dir/bin that the tests put first in PATH
# (ssh reads ~/.ssh of the passwd entry, not $HOME: nothing of the user's own is touched)
start_sshd() {
  mkdir -p "$dir/bin" /run/sshd
  ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key" <<<y >/dev/null 2>&1
  ssh-keygen -q -t ed25519 -N '' -f "$dir/client_key" <<<y >/dev/null 2>&1
  cp "$dir/client_key.pub" "$dir/authorized_keys"
  chmod 600 "$dir/authorized_keys"
  printf '%s\n' "Host *" "  IdentityFile $dir/client_key" "  IdentitiesOnly yes" \
    "  StrictHostKeyChecking no" "  UserKnownHostsFile /dev/null" "  LogLevel ERROR" > "$dir/ssh_config"
  printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$dir/ssh_config" > "$dir/bin/ssh"
  chmod +x "$dir/bin/ssh"
  for i in 1 2; do
    cat > "$dir/sshd-node$i.conf" <<EOF
ListenAddress $net.1$i
Port 22
HostKey $dir/host_key
PidFile $dir/sshd-node$i.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
StrictModes no
AcceptEnv *
EOF
    in_node "node$i" /usr/sbin/sshd -D -f "$dir/sshd-node$i.conf" >"$dir/log/sshd-node$i.out" 2>&1 &
  done
}

wait_idle() {
  local nodes_wanted=$1
  for _ in $(seq 120); do
    if [[ $(sinfo -h -o '%t %D' 2>/dev/null | awk '$1=="idle" {n+=$2} END {print n+0}') -ge $nodes_wanted ]]; then return 0; fi
    sleep 0.5
  done
  tail -5 "$dir"/log/*.log >&2 || true
  down
  cannot "the nodes never became idle (logs above)"
}

up() {
  install_packages
  [[ $(id -u) == 0 ]] || cannot "slurmd must run as root here"
  mkdir -p "$dir"
  if [[ -f "$dir/slurmctld.ours" ]] && [[ "$(ps -o stat= -p "$(cat "$dir/slurmctld.ours")" 2>/dev/null)" == [RS]* ]]; then
    exports                                  # already up (ours)
    return 0
  fi
  if (( nodes == 2 )); then
    ip link show "$bridge" >/dev/null 2>&1 && remove_network   # left by a killed run
    make_network 2>"$dir/network.err" || { cat "$dir/network.err" >&2; remove_network; cannot "network namespaces are not allowed here"; }
    echo made > "$dir/network.ours"
  fi
  start_munge
  rm -rf "$dir/state" "$dir/spool"   # a fresh cluster: no job of an earlier one comes back
  write_conf
  export SLURM_CONF=$conf
  slurmctld -D -i -f "$conf" >"$dir/log/slurmctld.out" 2>&1 &
  echo $! > "$dir/slurmctld.ours"
  if (( nodes == 1 )); then
    slurmd -D -f "$conf" >"$dir/log/slurmd.out" 2>&1 &
    echo $! > "$dir/slurmd.ours"
  else
    for i in 1 2; do start_node "node$i"; done
    start_sshd
  fi
  wait_idle "$nodes"
  exports
}

# a node's slurmd in its namespace (again after a node-loss test killed everything in it)
start_node() {
  local n=$1
  mkdir -p "$dir/spool/$n"
  in_node "$n" slurmd -D -N "$n" -f "$conf" >"$dir/log/slurmd-$n.out" 2>&1 &
  echo $! > "$dir/slurmd-$n.ours"
}

exports() {
  echo "export SLURM_CONF=$conf"
  if (( nodes == 2 )); then
    echo "export MMTRAIN_TEST_NODES='node1=$net.11 node2=$net.12' MMTRAIN_TEST_CLUSTER=$dir"
    echo "export MMTRAIN_TEST_SSH_PATH=$dir/bin"
  fi
}

down() {
  for f in "$dir"/slurmd*.ours "$dir"/slurmctld.ours; do
    [[ -f $f ]] || continue
    kill "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  rm -f "$dir"/*.pid
  if [[ -f "$dir/munged.ours" ]]; then
    pkill -u munge -x munged 2>/dev/null || true
    rm -f "$dir/munged.ours"
  fi
  if [[ -f "$dir/network.ours" ]]; then
    remove_network
    rm -f "$dir/network.ours"
  fi
  sleep 1
}

case "$cmd" in
  up) up ;;
  down) down ;;
  node-up)   # the test harness, after a node loss: the node's slurmd and sshd again
    n=${MMTRAIN_NODE:?MMTRAIN_NODE=nodeN}
    start_node "$n"
    in_node "$n" /usr/sbin/sshd -D -f "$dir/sshd-$n.conf" >>"$dir/log/sshd-$n.out" 2>&1 &
    ;;
  *) echo "usage: $0 up|down [--nodes 1|2]" >&2; exit 2 ;;
esac
