#!/usr/bin/env bash
# Boots the test guest (e2e/vm/build.sh) on a job directory that holds run.sh; prints the
# guest's out.log and exits with run.sh's exit code. The guest has no network (loopback only)
# and sees the host's root read-only. Emulated (TCG): for correctness, never for speed.
#   e2e/vm/run.sh JOB_DIR [TIMEOUT_SECS]
set -euo pipefail
job=$(cd "$1" && pwd)
timeout=${2:-300}
cache=$(cd "$(dirname "$0")" && ./build.sh)
[ -f "$job/run.sh" ] || { echo "$job/run.sh is missing" >&2; exit 2; }
rm -f "$job/rc" "$job/out.log"
set +e
timeout --kill-after=5 "$timeout" qemu-system-x86_64 \
  -machine q35,accel=tcg -cpu max -smp 2 -m "${STRATA_VM_MEM:-2048}" \
  -kernel "$cache/vmlinuz" -initrd "$cache/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 rdinit=/init strata.job=$job" \
  -display none -no-reboot -nic none \
  -serial "file:$job/serial.log" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs "local,path=$job,mount_tag=job,security_model=none"
q=$?
set -e
cat "$job/out.log" 2>/dev/null || true
if [ ! -f "$job/rc" ]; then
  echo "strata-vm: the guest stopped without a result (qemu exit $q); its console:" >&2
  tail -n 40 "$job/serial.log" >&2 || true
  exit 3
fi
exit "$(cat "$job/rc")"
