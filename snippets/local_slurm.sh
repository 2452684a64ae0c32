#!/usr/bin/env bash
# A throw-away single-node Slurm cluster (munge + slurmctld + slurmd, no cgroups, no accounting) for the
# project's Slurm test tier and for trying the sbatch snippets on a workstation. Debian/Ubuntu, as root.
#
#   snippets/local_slurm.sh start    # installs the packages if needed, starts the daemons, prints the partition
#   snippets/local_slurm.sh stop     # cancels jobs, stops what `start` started
#   snippets/local_slurm.sh status   # exit 0 if the partition answers
#
# Idempotent. State and logs live in $SSI_SLURM_DIR (default /tmp/ssi-slurm). Ports 6817/6818 must be free.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
DIR=${SSI_SLURM_DIR:-/tmp/ssi-slurm}
PART=${SSI_SLURM_PARTITION:-debug}
NODE=$(hostname -s)
CONF=/etc/slurm/slurm.conf

say() { echo "local_slurm: $*" >&2; }
die() { say "ERROR: $*"; tail -n 20 "$DIR"/log/*.log 2>/dev/null >&2 || true; exit 1; }
# running PIDFILE NAME: the process in PIDFILE is alive, is NAME and is not a zombie
running() { local p; p=$(cat "$1" 2>/dev/null) && [ -n "$p" ] && [ "$(cat /proc/"$p"/comm 2>/dev/null)" = "$2" ] &&
            ! grep -q '^State:.*zombie' /proc/"$p"/status 2>/dev/null; }
partition_up() { case "$(timeout 5 sinfo -h -p "$PART" -o %T 2>/dev/null | head -n1)" in
                   idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac; }

start() {
  [ "$(id -u)" = 0 ] || die "must run as root (installs packages and starts daemons)"
  mkdir -p "$DIR"/{state/ctld,state/d,log,run}
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge"
    install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                slurmctld slurmd slurm-client munge >>"$DIR/log/apt.log" 2>&1; }
    install || { apt-get update >>"$DIR/log/apt.log" 2>&1 && install; } || die "apt-get install failed ($DIR/log/apt.log)"
  fi
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || { mungekey -c -k /etc/munge/munge.key && chown munge:munge /etc/munge/munge.key; }
    mkdir -p -m 755 /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 || die "munged did not start"
    touch "$DIR/run/munged.ours"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  local mem; mem=$(awk '/MemTotal/{print int($2/1024*0.9)}' /proc/meminfo)
  # cred_expire also sets how long a requeued job waits before it runs again (default 120 s)
  cat >"$DIR/slurm.conf" <<CONF
# written by ssi snippets/local_slurm.sh
ClusterName=ssilocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=$PART Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
  if running "$DIR/run/slurmctld.pid" slurmctld && running "$DIR/run/slurmd.pid" slurmd && cmp -s "$DIR/slurm.conf" "$CONF"; then
    say "already running"
  else
    stop_daemons
    mkdir -p /etc/slurm
    if [ -f "$CONF" ] && ! grep -q '^# written by ssi' "$CONF"; then cp -n "$CONF" "$CONF.before-ssi" || true; fi
    cp "$DIR/slurm.conf" "$CONF"
    slurmctld -c </dev/null >>"$DIR/log/slurmctld.out" 2>&1 || die "slurmctld did not start"
    slurmd -N "$NODE" </dev/null >>"$DIR/log/slurmd.out" 2>&1 || die "slurmd did not start"
  fi
  for _ in $(seq 120); do
    partition_up && { echo "$PART"; return 0; }
    timeout 5 sinfo -h -o %T 2>/dev/null | grep -q -E '^(down|drain)' && scontrol update nodename="$NODE" state=resume 2>/dev/null || true
    sleep 0.5
  done
  die "partition $PART not up after 60 s"
}

stop_daemons() {
  for d in slurmd slurmctld; do
    if running "$DIR/run/$d.pid" "$d"; then kill "$(cat "$DIR/run/$d.pid")" 2>/dev/null || true; fi
  done
  for _ in $(seq 50); do running "$DIR/run/slurmd.pid" slurmd || running "$DIR/run/slurmctld.pid" slurmctld || break; sleep 0.1; done
}

stop() {
  command -v scancel >/dev/null && timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
  stop_daemons
  if [ -f "$DIR/run/munged.ours" ]; then pkill -x munged 2>/dev/null || true; rm -f "$DIR/run/munged.ours"; fi
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) partition_up ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
