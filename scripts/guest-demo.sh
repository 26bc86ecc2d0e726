# Runs on a KVM host (see scripts/demo.sh): boots the test guest with mcvmm and uses it.
. ./guest.sh
set -e
truncate -s 64M demo-disk.img
echo "== booting the test guest with mcvmm: 1 vCPU, 512 MiB, a virtio disk, a virtio NIC on a tap"
t0=$(cut -d' ' -f1 /proc/uptime)
start_guest demo vmlinux 1 512 --disk demo-disk.img
t1=$(cut -d' ' -f1 /proc/uptime)
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "== the agent answers over TCP %.2f s after mcvmm started\n", b - a }'
echo "== mcvmm ctl status"
./mcvmm ctl --api-sock demo.sock status
echo "== the agent's view"
agent demo status | tr '\n' ' '; echo
echo "== 500 acknowledged writes through virtio-blk"
agent demo records vda 1 500
echo "== self-checking memory workload, 64 MiB"
agent demo mem-start 64 5000
sleep 1
agent demo mem-verify
echo "== guest shutdown (i8042 reset), then the disk file is checked"
stop_guest demo
./agentctl check-records demo-disk.img 1 500
