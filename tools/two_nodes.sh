#!/usr/bin/env bash
# Two emulated nodes on this machine, and the asynchronous mesh launched across them
# with `deepspeed --hostfile` (pdsh over ssh), one replica per node.
#
#   sudo bash tools/two_nodes.sh [--rate 1gbit] [--slots 4] [--run-dir DIR] [-- TRAIN ARGS]
#
# Each node is a network namespace with its own hostname (node0, node1), address
# (10.77.0.1, 10.77.0.2) and sshd (port 2222, a key made for this run); the one link
# between them is shaped with `tc tbf` to --rate in each direction. The launcher runs
# on node0, reaches both nodes through ssh as it would on a cluster, and every rank
# runs inside its node's namespace, so all traffic between the nodes crosses the
# shaped link. Without TRAIN ARGS it trains launch/configs/tiny.yaml as a 2-stage
# pipeline (2bw, Muon + error feedback) x 2 replicas of 2 data-parallel ranks per
# stage, sparse averaging between the replicas: 8 ranks, 4 per node.
# Writes DIR/node0.log, DIR/node1.log (each node's lines of the pdsh output), the
# run's metrics and summary, and tears everything down on exit (also on failure).
# Needs root (ip netns, tc), sshd and pdsh (`apt-get install openssh-server pdsh`);
# exits 77 (skipped) with a message when one is missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rate=1gbit
slots=4
run_dir="$here/runs/two-nodes"
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) rate="$2"; shift 2 ;;
    --slots) slots="$2"; shift 2 ;;
    --run-dir) run_dir="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "two_nodes.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

skip() { echo "two_nodes.sh: skipped: $*" >&2; exit 77; }
[ "$(id -u)" = 0 ] || skip "needs root for ip netns, tc and sshd (run it with sudo)."
command -v ip >/dev/null || skip "needs iproute2 (ip)."
command -v tc >/dev/null || skip "needs tc (iproute2)."
sshd_bin="$(command -v sshd || echo /usr/sbin/sshd)"
[ -x "$sshd_bin" ] || skip "needs sshd: apt-get install openssh-server"
command -v pdsh >/dev/null || skip "needs pdsh (DeepSpeed's multi-node launcher): apt-get install pdsh"

if [ $# -eq 0 ]; then
  set -- --config "$here/launch/configs/tiny.yaml" --pipeline-model-parallel-size 2 \
    --pipeline-schedule 2bw --untie-embeddings-and-output-weights --optimizer muon \
    --delay-error-feedback 0.5 --dp-averaging sparse --dp-ranks-per-replica 2 \
    --dp-fraction 0.25 --dp-delay 2 --global-batch-size 16 --train-iters 10 \
    --eval-interval 5 --lr-warmup-iters 2
fi

venv="$(bash "$here/tools/setup_env.sh")"
work="$(mktemp -d /tmp/asyncmesh-two-nodes.XXXXXX)"
ns=(asyncmesh-node0 asyncmesh-node1)
addr=(10.77.0.1 10.77.0.2)
dev=(amveth0 amveth1)

teardown() {
  for i in 0 1; do
    if [ -f "$work/sshd$i.pid" ]; then kill "$(cat "$work/sshd$i.pid")" 2>/dev/null || true; fi
    ip netns pids "${ns[$i]}" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "${ns[$i]}" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap teardown EXIT

for i in 0 1; do
  if ip netns list | grep -qw "${ns[$i]}"; then
    echo "two_nodes.sh: ${ns[$i]} exists (an earlier run still up?); removing it" >&2
    ip netns pids "${ns[$i]}" | xargs -r kill 2>/dev/null || true
    ip netns del "${ns[$i]}"
  fi
  ip netns add "${ns[$i]}"
  ip -n "${ns[$i]}" link set lo up
done
ip link add "${dev[0]}" type veth peer name "${dev[1]}"
for i in 0 1; do
  ip link set "${dev[$i]}" netns "${ns[$i]}"
  # The same interface name on both nodes, as on a cluster (GLOO/NCCL_SOCKET_IFNAME).
  ip -n "${ns[$i]}" link set "${dev[$i]}" name amlink
  ip -n "${ns[$i]}" addr add "${addr[$i]}/24" dev amlink
  ip -n "${ns[$i]}" link set amlink up
  # The link between the nodes, shaped in each direction.
  tc -n "${ns[$i]}" qdisc add dev amlink root tbf rate "$rate" burst 256kb latency 100ms
done

# One sshd per node, with a host key and a client key made for this run only.
ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$work/client_key"
cp "$work/client_key.pub" "$work/authorized_keys"
chmod 700 "$work"
mkdir -p /run/sshd
for i in 0 1; do
  cat > "$work/sshd$i.conf" <<EOF
Port 2222
ListenAddress ${addr[$i]}
HostKey $work/host_key
AuthorizedKeysFile $work/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
UsePAM no
PidFile $work/sshd$i.pid
AcceptEnv PDSH_* OMP_*
EOF
  ip netns exec "${ns[$i]}" unshare --uts sh -c \
    "hostname node$i && exec $sshd_bin -f $work/sshd$i.conf"
done
for _ in $(seq 50); do
  [ -f "$work/sshd0.pid" ] && [ -f "$work/sshd1.pid" ] && break
  sleep 0.1
done

# What every rank on every node gets in its environment (DeepSpeed's .deepspeed_env):
# gloo and NCCL talk over the nodes' link (by default gloo resolves the hostname, which
# no DNS knows here), and a lost node ends the job within 2 minutes.
printf 'GLOO_SOCKET_IFNAME=amlink\nNCCL_SOCKET_IFNAME=amlink\nASYNCMESH_DIST_TIMEOUT=120\n' \
  > "$work/deepspeed_env"
printf '%s slots=%s\n%s slots=%s\n' "${addr[0]}" "$slots" "${addr[1]}" "$slots" > "$work/hostfile"
mkdir -p "$run_dir"
echo "two_nodes.sh: nodes up: node0 ${addr[0]}, node1 ${addr[1]}, link $rate each way;" \
     "hostfile:" >&2
cat "$work/hostfile" >&2
ssh_args="-i $work/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
ssh_args+=" -o LogLevel=ERROR"
cmd=(env "PDSH_SSH_ARGS_APPEND=$ssh_args" "PYTHONPATH=$here" "DS_ENV_FILE=$work/deepspeed_env"
     "$venv/bin/deepspeed"
     --hostfile "$work/hostfile" --launcher pdsh --ssh_port 2222 --no_ssh_check
     --master_addr "${addr[0]}" --master_port 29500
     --module megatron_asyncmesh.train --run-dir "$run_dir" --no-progress "$@")
echo "two_nodes.sh: on node0: ${cmd[*]}" >&2
set +e
ip netns exec "${ns[0]}" unshare --uts sh -c 'hostname node0 && cd "$0" && exec "$@"' \
  "$here" "${cmd[@]}" 2>&1 | tee "$run_dir/launcher.log"
rc=${PIPESTATUS[0]}
set -e
for i in 0 1; do
  grep "^${addr[$i]}: " "$run_dir/launcher.log" | sed "s/^${addr[$i]}: //" \
    > "$run_dir/node$i.log" || true
done
echo "two_nodes.sh: exit $rc; per-node logs: $run_dir/node0.log $run_dir/node1.log" >&2
exit "$rc"
