#!/bin/sh
# Runs inside the test VM, chrooted into the host's / (read-only 9p) by the initramfs of
# run-tests. Runs each "CWD EXE" line of /run/rewind/tests with the ignored (kernel) tests
# included and reports on the serial console with REWIND-VM: lines that run-tests parses.
export DM_DISABLE_UDEV=1 RUST_BACKTRACE=1 REWIND_KERNEL_VM=1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
up() { cut -d' ' -f1 /proc/uptime; }
echo "REWIND-VM: guest up at $(up)s, kernel $(uname -r)"
args=$(cat /run/rewind/test-args)
pass=0
fail=0
while read -r cwd exe; do
    echo "REWIND-VM: run $exe"
    (cd "$cwd" && exec "$exe" --include-ignored --test-threads=1 --color never $args) </dev/null 2>&1
    rc=$?
    echo "REWIND-VM: exit $rc $exe"
    if [ "$rc" = 0 ]; then pass=$((pass + 1)); else fail=$((fail + 1)); fi
done </run/rewind/tests
echo "REWIND-VM: done pass=$pass fail=$fail at $(up)s"
