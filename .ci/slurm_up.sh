#!/usr/bin/env bash
# Start a one-node Slurm cluster on loopback for the launcher tests (idempotent, needs root).
#
# Debian's slurm-wlm + munge: munged runs as the munge user with the key in /etc/munge;
# slurmctld and slurmd run as root from a slurm.conf naming this host at 127.0.0.1, with
# state, spool and logs under $SLEEP_JAX_SLURM_DIR (default /tmp/sleep_jax_slurm).
# Prints "slurm: up" when sinfo reports the node ready. SLEEP_JAX_SLURM_NO_INSTALL=1 skips apt.
set -euo pipefail
dir=${SLEEP_JAX_SLURM_DIR:-/tmp/sleep_jax_slurm}
conf=/etc/slurm/slurm.conf
marker="# written by sleep_jax .ci/slurm_up.sh"

ready() {
  scontrol ping 2>/dev/null | grep -q "is UP" &&
    sinfo -h -o %T 2>/dev/null | grep -Eq "^(idle|mixed|allocated|completing)"
}

if [ "$(id -u)" != 0 ]; then echo "slurm_up: needs root" >&2; exit 1; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [ -n "${SLEEP_JAX_SLURM_NO_INSTALL:-}" ]; then echo "slurm_up: slurm-wlm/munge not installed" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null
fi
if ready; then echo "slurm: up (already)"; exit 0; fi
if [ -f "$conf" ] && ! grep -qF "$marker" "$conf"; then
  # Never replace a slurm.conf that someone else wrote: that is a real cluster's.
  echo "slurm_up: $conf exists and is not ours; not touching it" >&2; exit 1
fi

# munge: the Debian package creates the key; make one if it is missing.
if [ ! -s /etc/munge/munge.key ]; then mungekey --create --force; fi
chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force
fi

# Stop daemons a previous run of this script left (by their pid files only).
for pidfile in "$dir/slurmctld.pid" "$dir/slurmd.pid"; do
  if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
done
sleep 1
mkdir -p "$dir/state" "$dir/spool"
host=$(hostname -s)
# CPUs=8 with config_overrides: more task slots than this 2-core box has, so a sweep's
# array elements run side by side (they mostly wait on each other's I/O and compiles).
cat >"$conf" <<EOF
$marker
ClusterName=sleepjax
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# Finished jobs stay visible to scontrol (the tests read their restart counts).
MinJobAge=900
KillWait=15
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=5
# Schedule every 2 s (defaults 60 s and 30 s) so a requeued job starts soon after.
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=8 RealMemory=4096 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
/usr/sbin/slurmctld -c   # -c: start clean, forget jobs of an earlier cluster
/usr/sbin/slurmd
for _ in $(seq 60); do
  if ready; then echo "slurm: up"; exit 0; fi
  sleep 0.5
done
echo "slurm_up: the node did not become ready; see $dir/slurmctld.log and $dir/slurmd.log" >&2
sinfo >&2 || true
exit 1
