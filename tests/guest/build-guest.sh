#!/usr/bin/env bash
# Builds the deskgrid test guest: a tiny BIOS-bootable raw disk image made from
# Debian packages, for real libvirt tests (TCG, `<domain type='qemu'>`).
#
#   tests/guest/build-guest.sh [--add SRC:DEST]... [--no-quiet]
#
# The last line on stdout is the absolute path of the image, `guest.img`; all
# progress goes to stderr. Run as root (it installs Debian packages).
#
# The image is an unpartitioned FAT filesystem ("superfloppy") made with
# `mkfs.vfat -C`, filled with mtools and made bootable with `syslinux --install`
# (no loop devices, no mount). SeaBIOS boots it as a virtio or SATA hard disk.
# It holds:
#   /ldlinux.sys /ldlinux.c32   syslinux
#   /syslinux.cfg               boots at once (no prompt), serial console ttyS0
#   /vmlinuz                    the kernel of Debian's linux-image-amd64
#   /initrd.gz                  busybox-static, /init, the virtio modules,
#                               and the --add files (with the shared libraries
#                               of dynamically linked executables among them)
#
# /init (tests/guest/guest-init.sh) loads virtio_console and its dependencies
# (and button + evdev for the ACPI power button), finds the virtio-serial
# port named org.deskgrid.agent.0 (/dev/vportNpM) and then either runs
# /deskgrid/agent PORT (restarting it if it exits; its output goes to the serial
# log) or, without an agent, writes
#   deskgrid-test-guest hello uuid=<SMBIOS UUID> boot_ms=<uptime in ms>
# to the port every second. Progress lines ("deskgrid-guest: ...") go to the
# serial port, so a failed boot can be read in the domain's serial log. The
# ACPI power button powers the guest off (`virsh shutdown` works).
#
# --add SRC:DEST puts the file SRC at the absolute path DEST in the initramfs
# (the split is at the last ':'), keeping its permission bits. If SRC is a
# dynamically linked ELF executable, the libraries `ldd` lists for it on this
# host are copied to the same paths, so a host-built binary (such as
# target/debug/deskgrid-agent) runs in the guest. Example:
#   tests/guest/build-guest.sh --add target/debug/deskgrid-agent:/deskgrid/agent
#
# --no-quiet (or DESKGRID_GUEST_QUIET=0) drops `quiet` from the kernel command
# line, so every kernel message reaches the serial log.
#
# Cache: the image goes to ${DESKGRID_GUEST_CACHE:-/var/cache/deskgrid-test-guest}
# /<key>/guest.img, where the key is the SHA-256 of this script, the Debian
# package versions used (kernel, busybox-static, syslinux), the --add files
# (destination, mode, content, libraries) and the quiet flag. A cached image is
# printed without rebuilding. Builds happen in a temporary directory renamed
# into place, so an interrupted build leaves no half image. Downloaded kernel
# packages are kept under <cache>/debs; images unused for 14 days are removed
# after each new build. Delete the cache directory at any time to start over.
set -euo pipefail
shopt -s inherit_errexit

script_path=$(readlink -f "${BASH_SOURCE[0]}")
init_path=${script_path%/*}/guest-init.sh
cache_root=${DESKGRID_GUEST_CACHE:-/var/cache/deskgrid-test-guest}
quiet=${DESKGRID_GUEST_QUIET:-1}
kernel_meta=linux-image-amd64
tool_packages=(busybox-static syslinux syslinux-common mtools dosfstools cpio gzip)
# Loaded in this order after their dependencies (read from the modules).
wanted_modules=(virtio_pci virtio_console button evdev)

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() {
  printf 'build-guest: error: %s\n' "$*" >&2
  exit 1
}
usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$script_path"
}

add_specs=()
while [ $# -gt 0 ]; do
  case $1 in
    --add)
      [ $# -ge 2 ] || die "--add needs SRC:DEST"
      add_specs+=("$2")
      shift 2
      ;;
    --add=*)
      add_specs+=("${1#--add=}")
      shift
      ;;
    --no-quiet)
      quiet=0
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown argument: $1 (try --help)" ;;
  esac
done
case $quiet in
  0 | 1) ;;
  *) die "DESKGRID_GUEST_QUIET must be 0 or 1, not '$quiet'" ;;
esac

[ "$(id -u)" -eq 0 ] || die "run as root (installs Debian packages, writes $cache_root)"

# --- Debian packages --------------------------------------------------------

# Prints "package version" for each installed package given.
installed_versions() {
  dpkg-query -W -f='${Package} ${db:Status-Abbrev} ${Version}\n' "$@" 2>/dev/null |
    awk '$2 == "ii" { print $1, $3 }' || true
}

ensure_tools() {
  local versions missing=() package
  versions=$(installed_versions "${tool_packages[@]}")
  for package in "${tool_packages[@]}"; do
    grep -q "^$package " <<<"$versions" || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  quietly apt-get install -y -q --no-install-recommends "${missing[@]}" ||
    { quietly apt-get update -q && quietly apt-get install -y -q --no-install-recommends "${missing[@]}"; } ||
    die "cannot install ${missing[*]}"
}

# Runs a command with its output kept back unless it fails.
quietly() {
  local output status=0
  output=$(DEBIAN_FRONTEND=noninteractive "$@" 2>&1) || status=$?
  [ "$status" -eq 0 ] || printf '%s\n' "$output" >&2
  return "$status"
}

# Prints "package version" of the kernel image that linux-image-amd64's
# candidate depends on. apt-cache takes ~0.5 s here (no pkgcache.bin), so the
# answer is remembered per state of the apt lists.
resolve_kernel() {
  local lists_key memo answer show
  lists_key=$({ stat -c '%n %s %Y' /var/lib/apt/lists/* /etc/apt/sources.list \
    /etc/apt/sources.list.d/* /etc/apt/preferences.d/* 2>/dev/null || true; } |
    sha256sum | cut -c1-32)
  memo=$cache_root/resolve/$kernel_meta.$lists_key
  if [ -s "$memo" ]; then
    cat "$memo"
    return 0
  fi
  if ! show=$(apt-cache show --no-all-versions "$kernel_meta" 2>/dev/null) || [ -z "$show" ]; then
    log "apt lists lack $kernel_meta: running apt-get update"
    quietly apt-get update -q
    show=$(apt-cache show --no-all-versions "$kernel_meta")
  fi
  # Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)
  answer=$(awk '/^Depends:/ {
      sub(/^Depends: */, "")
      n = split($0, deps, /, */)
      for (i = 1; i <= n; i++)
        if (deps[i] ~ /^linux-image-[0-9]/) {
          split(deps[i], f, /[ ()=]+/)
          print f[1], f[2]
          exit
        }
    }' <<<"$show")
  [ -n "$answer" ] || die "cannot find the kernel package $kernel_meta depends on"
  mkdir -p "$cache_root/resolve"
  rm -f "$cache_root/resolve/$kernel_meta".*
  printf '%s\n' "$answer" >"$memo.$$"
  mv -f "$memo.$$" "$memo"
  printf '%s\n' "$answer"
}

# --- the --add files ----------------------------------------------------------

add_srcs=()
add_dests=()
for spec in "${add_specs[@]}"; do
  [[ $spec == *:* ]] || die "--add '$spec': expected SRC:DEST"
  src=${spec%:*}
  dest=${spec##*:}
  [[ $dest == /* ]] || die "--add '$spec': DEST must be an absolute path"
  [[ /$dest/ != */../* && /$dest/ != */./* && $dest != */ ]] ||
    die "--add '$spec': DEST must be a plain absolute file path"
  case $dest in
    /init | /bin | /bin/* | /dev | /dev/* | /proc | /proc/* | /sys | /sys/* | /etc/deskgrid | /etc/deskgrid/* | /lib/modules/deskgrid/*)
      die "--add '$spec': DEST $dest is reserved by the guest"
      ;;
  esac
  [ -f "$src" ] || die "--add '$spec': $src is not a regular file"
  add_srcs+=("$(readlink -f "$src")")
  add_dests+=("$dest")
done

# Prints the absolute paths of the shared libraries (and the ELF interpreter)
# that a dynamically linked executable needs; nothing for other files.
shared_libraries() {
  local magic
  magic=$(head -c 4 "$1" | od -An -c | tr -d ' ')
  [ "$magic" = '177ELF' ] || return 0
  ldd "$1" 2>/dev/null | awk '
    $2 == "=>" && $3 ~ /^\// { print $3; next }
    $1 ~ /^\// { print $1 }' | sort -u || true
}

# --- cache key and fast path --------------------------------------------------

ensure_tools
tool_versions=$(installed_versions busybox-static syslinux syslinux-common)
kernel=$(resolve_kernel)
read -r kernel_package kernel_version <<<"$kernel"
[ -n "$kernel_version" ] || die "cannot tell which kernel package to use"

key_input=$(
  printf 'script %s\n' "$(sha256sum <"$script_path" | cut -d' ' -f1)"
  printf 'init %s\n' "$(sha256sum <"$init_path" | cut -d' ' -f1)"
  printf 'kernel %s %s\n' "$kernel_package" "$kernel_version"
  awk '{ print "tool", $0 }' <<<"$tool_versions"
  printf 'quiet %s\n' "$quiet"
  for i in "${!add_srcs[@]}"; do
    printf 'add %s %s %s\n' "${add_dests[$i]}" "$(stat -c %a "${add_srcs[$i]}")" \
      "$(sha256sum <"${add_srcs[$i]}" | cut -d' ' -f1)"
    while read -r lib; do
      [ -n "$lib" ] || continue
      printf 'lib %s %s\n' "$lib" "$(sha256sum <"$lib" | cut -d' ' -f1)"
    done <<<"$(shared_libraries "${add_srcs[$i]}")"
  done
)
key=$(sha256sum <<<"$key_input" | cut -d' ' -f1)
final=$cache_root/$key

if [ -f "$final/guest.img" ]; then
  touch "$final" 2>/dev/null || true
  printf '%s\n' "$final/guest.img"
  exit 0
fi

# --- build --------------------------------------------------------------------

started=$(date +%s.%N)
mkdir -p "$cache_root/debs"
work=$(mktemp -d "$cache_root/.build.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
log "building $final"

# A build holds the lock on its directory's lock file while it runs; the
# directories of builds killed with SIGKILL have an unlocked one.
exec 9>"$work/lock"
flock -n 9
# (A directory without one yet is a build just starting, or an old leftover.)
for stale in "$cache_root"/.build.*; do
  if [ "$stale" = "$work" ]; then
    continue
  elif [ -e "$stale/lock" ]; then
    flock -n "$stale/lock" true 2>/dev/null || continue
  elif [ -z "$(find "$stale" -maxdepth 0 -mmin +120)" ]; then
    continue
  fi
  log "removing $stale, left by a killed build"
  rm -rf "$stale"
done

deb=$cache_root/debs/${kernel_package}_${kernel_version//:/%3a}_amd64.deb
if [ ! -s "$deb" ]; then
  log "downloading $kernel_package $kernel_version"
  mkdir "$work/download"
  (cd "$work/download" &&
    quietly apt-get download -q -o APT::Sandbox::User=root "$kernel_package=$kernel_version")
  mv -f "$work/download"/*.deb "$deb"
  # Older kernels are no longer used by any new build.
  find "$cache_root/debs" -name 'linux-image-*.deb' ! -path "$deb" -delete
fi

log "extracting $(basename "$deb")"
mkdir "$work/kernel"
dpkg-deb --fsys-tarfile "$deb" |
  tar -x -C "$work/kernel" --wildcards './boot/vmlinuz-*' './lib/modules/*'
vmlinuzes=("$work"/kernel/boot/vmlinuz-*)
vmlinuz=${vmlinuzes[0]}
[ -f "$vmlinuz" ] || die "no vmlinuz in $deb"
kernel_release=${vmlinuz##*/vmlinuz-}
moddir=$work/kernel/lib/modules/$kernel_release
[ -d "$moddir" ] || die "no modules for $kernel_release in $deb"

# Module index: "name path" for every module (names use '_' for '-').
find "$moddir" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' |
  awk '{ n = $0; sub(/.*\//, "", n); sub(/\.ko(\.(xz|zst|gz))?$/, "", n); gsub(/-/, "_", n); print n, $0 }' \
    >"$work/module-index"

staging=$work/initramfs
mkdir -p "$staging"/{bin,dev,proc,sys,tmp,run,etc/deskgrid,etc/acpi/PWRF,lib/modules/deskgrid}
: >"$staging/etc/deskgrid/modules"

# Writes the module, uncompressed (busybox insmod reads plain .ko only).
decompress_module() {
  case $1 in
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -qdc "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
  esac
}

declare -A module_done=()
add_module() {
  local name=${1//-/_} path dep deps
  [ -z "${module_done[$name]:-}" ] || return 0
  module_done[$name]=1
  path=$(awk -v n="$name" '$1 == n { print $2; exit }' "$work/module-index")
  if [ -z "$path" ]; then
    grep -q "/${name//_/[-_]}\.ko\$" "$moddir/modules.builtin" 2>/dev/null && return 0
    die "kernel module $name is neither in $kernel_package nor built in"
  fi
  decompress_module "$path" >"$staging/lib/modules/deskgrid/$name.ko"
  deps=$(tr '\0' '\n' <"$staging/lib/modules/deskgrid/$name.ko" |
    awk '/^depends=/ && !seen { print substr($0, 9); seen = 1 }')
  for dep in ${deps//,/ }; do
    add_module "$dep"
  done
  printf '%s\n' "$name" >>"$staging/etc/deskgrid/modules"
}
for module in "${wanted_modules[@]}"; do
  add_module "$module"
done
log "modules: $(tr '\n' ' ' <"$staging/etc/deskgrid/modules")"

cp /bin/busybox "$staging/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "$staging/bin/$applet"
done
ln -s bin "$staging/sbin"
mknod -m 600 "$staging/dev/console" c 5 1 2>/dev/null || true # else /init copes
cat >"$staging/etc/acpi/PWRF/00000080" <<'POWEROFF'
#!/bin/sh
echo "deskgrid-guest: ACPI power button: powering off" >/dev/ttyS0 2>/dev/null
exec poweroff -f
POWEROFF
chmod 755 "$staging/etc/acpi/PWRF/00000080"
printf '%s\n' "$key_input" >"$staging/etc/deskgrid/build-inputs"

install -m 755 "$init_path" "$staging/init"

for i in "${!add_srcs[@]}"; do
  src=${add_srcs[$i]}
  install -D -m "$(stat -c %a "$src")" "$src" "$staging${add_dests[$i]}"
  while read -r lib; do
    [ -n "$lib" ] || continue
    [ -e "$staging$lib" ] || install -D -m 755 "$lib" "$staging$lib"
  done <<<"$(shared_libraries "$src")"
done

log "packing the initramfs"
(cd "$staging" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
  gzip -6 -n >"$work/initrd.gz"

# no_timer_check: under TCG on a loaded host the IO-APIC timer check can
# fail and panic the kernel ("IO-APIC + timer doesn't work!"); skip it.
kernel_args="console=ttyS0 console=tty0 no_timer_check"
[ "$quiet" = 0 ] || kernel_args+=" quiet"
cat >"$work/syslinux.cfg" <<CFG
SERIAL 0 115200
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND $kernel_args
CFG

payload_kib=$((($(stat -c %s "$vmlinuz") + $(stat -c %s "$work/initrd.gz") + 1023) / 1024))
image_kib=$(((payload_kib + 1024 + 1023) / 1024 * 1024)) # 1 MiB+ of room, whole MiB
log "making a $((image_kib / 1024)) MiB FAT image"
mkdir "$work/out"
image=$work/out/guest.img
mkfs.vfat -C -n DESKGRID -i 0d65c9d1 "$image" "$image_kib" >/dev/null
export MTOOLS_SKIP_CHECK=1
mcopy -i "$image" "$vmlinuz" ::/vmlinuz
mcopy -i "$image" "$work/initrd.gz" ::/initrd.gz
mcopy -i "$image" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$image"
printf '%s\n' "$key_input" >"$work/out/build-inputs"

if ! mv -T "$work/out" "$final" 2>/dev/null; then
  [ -f "$final/guest.img" ] || die "cannot move the image into $final"
  log "a concurrent build made $final first"
fi
log "built in $(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s"
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended \
  -regex '.*/[0-9a-f]{64}' -mtime +14 -exec rm -rf {} + 2>/dev/null || true
printf '%s\n' "$final/guest.img"
