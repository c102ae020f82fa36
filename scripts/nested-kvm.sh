#!/usr/bin/env bash
# Runs a command where /dev/kvm works, on a host that has none: inside a Linux guest of QEMU's
# TCG, whose emulated CPU has AMD's SVM with nested paging, so that kvm_amd loads there.
# The guest's root is this host's, shared read-write over 9p: the command sees the same
# files, binaries and libraries. Its /tmp is a fresh ext4 disk, because 9p and tmpfs cannot
# do what the tests need of /tmp (Unix sockets, O_DIRECT). Everything runs at TCG's speed.
#
# usage: scripts/nested-kvm.sh WORKDIR COMMAND...
#   WORKDIR holds the initramfs, the /tmp disk and the exit status; COMMAND runs as root in
#   this directory. The kernel is Debian's linux-image, unpacked by scripts/install-deps.sh
#   into $MIG_NESTED_KERNEL (default /opt/mig-nested-kvm). Exits with COMMAND's status; the
#   guest is stopped after $MIG_NESTED_TIMEOUT seconds (default 1800).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 WORKDIR COMMAND..." >&2; exit 2; }
work=$(realpath -m "$1"); shift
kernel_root=${MIG_NESTED_KERNEL:-/opt/mig-nested-kvm}
vmlinuz=$(ls "$kernel_root"/boot/vmlinuz-* 2>/dev/null | head -1 || true)
[ -n "$vmlinuz" ] || { echo "nested-kvm: no kernel in $kernel_root/boot (scripts/install-deps.sh unpacks one)" >&2; exit 2; }
modules=$kernel_root/lib/modules/${vmlinuz##*/vmlinuz-}
# In the order they load: each after what it depends on (their modinfo's depends=).
module_names=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
              crc16 mbcache jbd2 crc32c_generic ext4 9pnet 9pnet_virtio netfs fscache 9p
              irqbypass kvm ccp kvm-amd)
mkdir -p "$work"
# The guest mounts its own /tmp. A checkout under /tmp (CI's may be) stays in view: it is
# bind-mounted back over the guest's /tmp. WORKDIR must be in view too, since the command
# and its status travel through it.
repo=$(realpath "$(dirname "$0")/..")
case "$repo" in /tmp/*) keep=$repo ;; *) keep="" ;; esac
case "$work" in
  /tmp|/tmp/*) [ -n "$keep" ] && [[ "$work" == "$keep"/* ]] ||
    { echo "nested-kvm: WORKDIR must not be under /tmp, unless in $repo" >&2; exit 2; } ;;
esac

make_initramfs() {
  local tree=$work/initramfs
  rm -rf "$tree" && mkdir -p "$tree"/{bin,dev,mnt,proc,sys,modules}
  cp "$(command -v busybox)" "$tree/bin/busybox"
  for name in "${module_names[@]}"; do
    local file
    file=$(find "$modules" -name "$name.ko" | head -1)
    [ -n "$file" ] || { echo "nested-kvm: module $name is not in $modules" >&2; exit 2; }
    cp "$file" "$tree/modules/"
  done
  cat >"$tree/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in ${module_names[*]}; do insmod /modules/\$m.ko || echo "nested-kvm: insmod \$m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=loose hostroot /mnt
for fs in proc sys dev; do mount --rbind /\$fs /mnt/\$fs; done
mkdir -p /mnt/dev/pts /mnt/dev/shm; mount -t devpts devpts /mnt/dev/pts; mount -t tmpfs shm /mnt/dev/shm
keep="$keep"
[ -n "\$keep" ] && mkdir -p /kept && mount --bind "/mnt\$keep" /kept
mount -t ext4 /dev/vda /mnt/tmp && chmod 1777 /mnt/tmp
[ -n "\$keep" ] && mkdir -p "/mnt\$keep" && mount --move /kept "/mnt\$keep"
ip link set lo up
chroot /mnt /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
  /bin/bash "$work/command.sh"
echo \$? > "/mnt$work/status"
sync
poweroff -f
EOF
  chmod +x "$tree/init"
  (cd "$tree" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initramfs.gz"
}

[ -s "$work/initramfs.gz" ] && [ "$work/initramfs.gz" -nt "$0" ] || make_initramfs
{
  printf 'cd %q || exit 1\n' "$PWD"
  [ -n "${CI:-}" ] && printf 'export CI=%q\n' "$CI"
  printf '%q ' "$@"; echo
} >"$work/command.sh"
rm -f "$work/status" "$work/tmp.img"
truncate -s 32G "$work/tmp.img" && mkfs.ext4 -q -F "$work/tmp.img"
# -cpu max: under TCG, every feature TCG emulates, SVM and NPT among them. 8 GiB covers the
# largest test guest (4.5 GiB); TCG only takes what the guest touches.
timeout "${MIG_NESTED_TIMEOUT:-1800}" qemu-system-x86_64 -machine q35 -accel tcg,thread=single -cpu max -smp "$(nproc)" -m 8G -nographic -no-reboot \
  -kernel "$vmlinuz" -initrd "$work/initramfs.gz" -append "console=ttyS0 quiet panic=-1" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,id=hostroot,multidevs=remap \
  -drive file="$work/tmp.img",if=virtio,format=raw,cache=unsafe </dev/null
rm -f "$work/tmp.img"
[ -s "$work/status" ] || { echo "nested-kvm: the guest ended without running the command to its end" >&2; exit 1; }
exit "$(cat "$work/status")"
