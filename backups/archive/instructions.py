"""Restore instructions that travel with every backup: RESTORE.md for people, restore.sh for
a shell.

Both must work years later on a machine without vmbackup, so they only assume POSIX sh,
``sha256sum`` (restore.sh prefers ``openssl``, much faster where both are), ``qemu-img``
and ``virsh``.  Every value taken from the manifest is passed through ``shlex.quote``
before it reaches shell code: VM names may contain spaces, quotes and ``$(...)``, and a
manifest can be edited by anyone who can write to the backup store.
Manifest values never appear in shell comments either, where a newline would end the
comment and start a command.
"""

from __future__ import annotations

import re
from shlex import quote

from .format import DiskEntry, Manifest

CONSISTENCY = {
    "offline": "The VM was shut off: the disks are exactly as the guest left them.",
    "crash-consistent": (
        "The disks were copied while the VM ran, without the guest's help. Booting them is "
        "like booting after a power cut: journaling file systems replay their logs, and "
        "applications that do not survive a power loss may need their own recovery."
    ),
    "filesystem-frozen": (
        "The guest agent froze the file systems while the copy point was taken, so they "
        "are clean. Applications that hold data in memory (databases) may still run their "
        "own crash recovery."
    ),
    "with-ram": (
        "The RAM was saved at the same instant as the disks (`memory.save`): the VM can be "
        "resumed in the running state, or booted from the disks like after a power cut."
    ),
}


# ---------------------------------------------------------------------------- RESTORE.md


def _code(value: object) -> str:
    """Inline Markdown code that a backtick or newline in the value cannot break out of."""
    text = str(value).replace("\n", "\\n").replace("\r", "\\r")
    runs = re.findall(r"`+", text)
    fence = "`" * (max((len(r) for r in runs), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _consistency_text(label: str) -> str:
    key = re.sub(r"[\s_]+", "-", label.strip().lower())
    key = {"with-memory": "with-ram", "memory": "with-ram", "ram": "with-ram"}.get(key, key)
    return CONSISTENCY.get(key, "")


def _summary(m: Manifest) -> list[str]:
    kind = "full" if m.kind == "full" else f"incremental on top of {_code(m.parent)}"
    return [
        f"# Restore instructions: backup of VM {_code(m.vm_name)}",
        "",
        "This directory is a self-contained vmbackup backup. Everything below works with",
        "`sha256sum`, `qemu-img` and `virsh` alone; vmbackup itself is not needed.",
        "",
        f"- VM: {_code(m.vm_name)}, UUID {_code(m.vm_uuid)}, on host {_code(m.host)}",
        f"- Taken: {_code(m.started)} to {_code(m.finished)} by {_code(m.tool_version)}"
        f" (run {m.run_id})",
        f"- Method: {_code(m.method)}, {kind}",
        f"- Consistency: **{_code(m.consistency)}**. {_consistency_text(m.consistency)}".rstrip(),
        f"- Format: `backup.json` version {m.version}",
    ]


def _disk_line(d: DiskEntry) -> str:
    line = (
        f"- {_code(d.file)}: disk {_code(d.target)} ({d.format}, {_size(d.virtual_size)}"
        f" virtual, was {_code(d.source)})"
    )
    if d.backing:
        line += f"; holds only changed blocks, backing file {_code(d.backing)}"
    return line


def _files(m: Manifest) -> list[str]:
    lines = ["", "## Files", ""] + [_disk_line(d) for d in m.disks]
    if m.nvram:
        lines.append(f"- {_code(m.nvram)}: UEFI variable store (NVRAM)")
    if m.tpm:
        lines.append(f"- {_code(m.tpm + '/')}: TPM state (swtpm)")
    if m.memory:
        lines.append(f"- {_code(m.memory)}: RAM state, in `virsh save` format")
    lines += [
        "- `domain.xml`: the domain definition at backup time",
        "- `backup.json`: machine-readable description of this backup",
        "- `SHA256SUMS`: checksums of every other file here",
        "- `RESTORE.md`, `restore.sh`: these instructions and a script that follows them",
    ]
    for skip in m.skipped:
        reason = " ".join(skip["reason"].split())
        lines.append(f"- not backed up: disk {_code(skip['target'])} ({reason})")
    return lines


def _check_section(m: Manifest) -> list[str]:
    lines = [
        "",
        "## Check the files",
        "",
        "```sh",
        "cd /path/to/this/backup",
        "sha256sum -c SHA256SUMS",
        "```",
        "",
        "qcow2 images carry no data checksums; this is what detects bit rot.",
    ]
    if m.parent:
        lines += [
            f"This backup builds on {_code('../' + m.parent)}, which must pass the same check "
            "(and so on down the chain). `sh restore.sh --check` checks the whole chain.",
        ]
    return lines


def _disks_section(m: Manifest) -> list[str]:
    lines = [
        "",
        "## Restore the disks",
        "",
        "The quick way: `sh restore.sh /var/lib/libvirt/images/restored` converts every disk",
        "into that directory while it checks the files, renames the disks into place only if",
        "the check passed (otherwise removes them), and refuses to overwrite anything.",
        "",
        "By hand, from this directory (the restored file is a complete, standalone disk):",
        "",
        "```sh",
        "DEST=/var/lib/libvirt/images/restored",
    ]
    for d in m.disks:
        out = quote(f"{d.target}.{d.format}")
        src = quote(f"./{d.file}")
        lines.append(f'qemu-img convert -p -f {d.image_format} -O {d.format} {src} "$DEST"/{out}')
    lines.append("```")
    if any(d.backing for d in m.disks):
        lines += [
            "",
            "The images of this incremental backup hold only the blocks that changed since the",
            "backup it builds on; their backing file is named by a *relative* path. Converting",
            "the top image reads the whole chain and writes a flattened disk, so keep the",
            "backup directories of this VM side by side, as they are now.",
        ]
    return lines


def _firmware_section(m: Manifest) -> list[str]:
    if not (m.nvram or m.tpm):
        return []
    lines = ["", "## Firmware and TPM", ""]
    if m.nvram:
        nvram = quote(m.nvram)
        target = quote(f"/var/lib/libvirt/qemu/nvram/{m.vm_name}_VARS.fd")
        lines += ["```sh", f"cp {nvram} {target}", "```", ""]
        lines.append("and point `<nvram>` in the domain XML at the copy.")
    if m.tpm:
        lines += [
            "",
            f"Copy the contents of {_code(m.tpm + '/')} to `/var/lib/libvirt/swtpm/<uuid>/` "
            "(the UUID of the domain you define), owned by the swtpm user (often `tss`).",
        ]
    return lines


def _define_section(m: Manifest) -> list[str]:
    return [
        "",
        "## Define the domain",
        "",
        "Copy `domain.xml` and edit the copy: every `<disk>`'s `<source file=...>` must name",
        "the restored file and `<driver type=...>` its format; fix the `<nvram>` path. If the",
        "original VM still exists, also change `<name>`, delete `<uuid>` and every",
        "`<mac address=...>` so the two do not clash. Then:",
        "",
        "```sh",
        "virsh define domain-restored.xml",
        f"virsh start {quote(m.vm_name)}",
        "```",
    ]


def _memory_section(m: Manifest) -> list[str]:
    if not m.memory:
        return []
    memory = quote(f"./{m.memory}")
    return [
        "",
        "## Resume with RAM (optional)",
        "",
        "The RAM image matches the disks of this backup. To resume instead of booting:",
        "",
        "```sh",
        f"virsh restore {memory} --xml domain-restored.xml",
        "```",
        "",
        "Caveats: the disks must be the restored ones, unmodified since the restore, at the",
        "paths the XML names (otherwise the guest's file systems get corrupted); the host's",
        "QEMU must be able to load the state; the guest wakes with a clock jump and its",
        "network connections gone. Never resume the same state twice on the same disks.",
        "When in doubt, boot from the disks (like after a power cut) and skip this step.",
    ]


def restore_md(manifest: Manifest) -> str:
    """Human instructions, written so an operator can restore with nothing but a shell."""
    sections = [
        _summary(manifest),
        _files(manifest),
        _check_section(manifest),
        _disks_section(manifest),
        _firmware_section(manifest),
        _define_section(manifest),
        _memory_section(manifest),
    ]
    return "\n".join(line for section in sections for line in section) + "\n"


# ---------------------------------------------------------------------------- restore.sh

_SH_HEAD = """\
#!/bin/sh
# Restores the disks of one vmbackup backup without vmbackup. See RESTORE.md.
#   restore.sh [DEST_DIR]  convert every disk into DEST_DIR (default: the current
#                          directory) while this backup and the ones it builds on are
#                          checked; the disks appear there only if the check passed
#   restore.sh --check     only check this backup and the ones it builds on
#   restore.sh --headers   only check that every image names only its parent
# Nothing existing is overwritten. Needs: sh, qemu-img, openssl or sha256sum.
set -eu
"""

_SH_BODY = r"""
die() { printf 'restore.sh: %s\n' "$*" >&2; exit 1; }
usage() {
    printf 'usage: %s [DEST_DIR] | --check\n' "$0" >&2
    exit 2
}

cd_here() {
    HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd -P)
    cd -- "$HERE"
}

# Stored backups are untrusted input: a symlink or a FIFO named like a file would send
# the hash or qemu-img elsewhere or make them wait forever.
refuse_special() {
    odd=$(find . \( -type l -o -type p -o -type s -o -type b -o -type c \) -print | head -n 1)
    [ -z "$odd" ] || die "not a regular file in $HERE: $odd; not restoring"
}

check_chain() {
    depth=${VMBACKUP_CHECK_DEPTH:-0}
    [ "$depth" -lt 1000 ] || die "backup chain too long or circular"
    printf 'Checking %s\n' "$HERE"
    refuse_special
    check_sums || die "checksum mismatch in $HERE: not restoring"
    [ -n "$PARENT" ] || return 0
    [ -f "../$PARENT/restore.sh" ] || die "the backup this one builds on is missing: ../$PARENT"
    VMBACKUP_CHECK_DEPTH=$((depth + 1)) sh "../$PARENT/restore.sh" --check ||
        die "the backup this one builds on failed its check: ../$PARENT"
}

# Every file SHA256SUMS lists, as `sha256sum -c SHA256SUMS` checks it, with OpenSSL when
# it is installed: coreutils' sha256sum may not use the CPU's SHA instructions (6 s of CPU
# per GiB on the machine this was measured on, against 0.9 s for openssl dgst).
check_sums() {
    if ! command -v openssl >/dev/null 2>&1; then
        sha256sum -c SHA256SUMS
        return
    fi
    [ -f SHA256SUMS ] || die "SHA256SUMS is missing in $HERE: not restoring"
    bad=0 seen=0
    while IFS= read -r line || [ -n "$line" ]; do
        want=${line%% *}
        name=${line#"$want" }
        name=${name#[ *]}
        seen=$((seen + 1))
        case "$want" in *[!0-9a-f]*) want= ;; esac
        case "$name" in
            ''|/*|..|../*|*/..|*/../*) die "SHA256SUMS in $HERE names '$name': not restoring" ;;
        esac
        if [ "${#want}" -ne 64 ]; then
            die "SHA256SUMS in $HERE: not a checksum line: $line"
        elif [ ! -f "./$name" ] || [ -L "./$name" ]; then
            printf '%s: FAILED open or read\n' "$name"
            bad=1
        elif got=$(openssl dgst -sha256 -r "./$name") && [ "${got%% *}" = "$want" ]; then
            printf '%s: OK\n' "$name"
        else
            printf '%s: FAILED\n' "$name"
            bad=1
        fi
    done < SHA256SUMS
    [ "$seen" -gt 0 ] || die "SHA256SUMS in $HERE lists no file"
    [ "$bad" -eq 0 ]
}

# Before qemu-img opens a chain: every image's header names only what its manifest says
# (qemu-img info reads one header and opens no backing file), down the whole chain.
check_headers() {
    depth=${VMBACKUP_CHECK_DEPTH:-0}
    [ "$depth" -lt 1000 ] || die "backup chain too long or circular"
    refuse_special
    MODE=headers
    plan
    [ -n "$PARENT" ] || return 0
    [ -f "../$PARENT/restore.sh" ] || die "the backup this one builds on is missing: ../$PARENT"
    rc=0
    VMBACKUP_CHECK_DEPTH=$((depth + 1)) sh "../$PARENT/restore.sh" --headers || rc=$?
    [ "$rc" -ne 2 ] || printf 'restore.sh: ../%s predates header checks\n' "$PARENT" >&2
    [ "$rc" -eq 0 ] || [ "$rc" -eq 2 ] ||
        die "the backup this one builds on failed its header check: ../$PARENT"
}

# header IMAGE FORMAT BACKING
header() {
    [ -f "./$1" ] && [ ! -L "./$1" ] || die "not a regular file: $HERE/$1"
    [ "$2" = qcow2 ] || return 0
    info=$(qemu-img info -U -f qcow2 --output=json "./$1") || die "unreadable header: $HERE/$1"
    backing=$(printf '%s\n' "$info" | sed -n 's/^ *"backing-filename": "\(.*\)",*$/\1/p')
    [ "$backing" = "$3" ] || die "$HERE/$1 backs onto '$backing', not '$3': not restoring"
    case "$info" in
        *'"data-file"'*) die "$HERE/$1 names an external data file: not restoring" ;;
    esac
}

refuse_existing() {
    if [ -e "$1" ] || [ -L "$1" ]; then die "refusing to overwrite $1"; fi
}

# disk TARGET IMAGE IMAGE_FORMAT OUTPUT_FORMAT BACKING
disk() {
    out="${DEST:-}/$1.$4"
    case "$MODE" in
    headers)
        header "$2" "$3" "$5"
        ;;
    preflight)
        if [ -L "./$2" ] || { [ -e "./$2" ] && [ ! -f "./$2" ]; }; then
            die "not a regular file: $2; not restoring"
        fi
        [ -f "./$2" ] || die "image missing: $2"
        refuse_existing "$out"
        refuse_existing "$out.partial"
        ;;
    convert)
        printf 'Restoring disk %s -> %s\n' "$1" "$out"
        # around the page cache where the filesystem allows it (nothing reads the disk
        # back soon, and filling the cache can cost more than the copy)
        direct=
        if dd if=/dev/null of="$out.partial" oflag=direct 2>/dev/null; then direct="-t none"; fi
        qemu-img convert -p $direct -f "$3" -O "$4" "./$2" "$out.partial"
        ;;
    publish)
        refuse_existing "$out"
        mv -- "$out.partial" "$out"
        ;;
    discard)
        rm -f -- "$out.partial"
        ;;
    esac
}

# extra NAME: a file or directory copied as is (NVRAM, TPM state), once the check passed
extra() {
    case "$MODE" in
    headers) ;;
    preflight)
        [ -e "./$1" ] || die "missing: $1"
        refuse_existing "$DEST/$1"
        ;;
    publish)
        printf 'Copying %s -> %s\n' "$1" "$DEST/$1"
        refuse_existing "$DEST/$1"
        cp -R -- "./$1" "$DEST/$1"
        ;;
    esac
}

# On the way out: a check still running is stopped (a hash it started may finish
# reading on its own; it writes nothing), and every disk not published is removed.
cleanup() {
    if [ -n "$CHECK_PID" ]; then kill "$CHECK_PID" 2>/dev/null || :; fi
    if [ -n "$WRITING" ]; then MODE=discard; plan; fi
}

hints() {
    printf '\nRestored backup of VM %s into %s\n' "$VM_NAME" "$DEST"
    printf 'Next: copy %s, make each <disk> <source file=...> name the restored file\n' \
        "$HERE/domain.xml"
    printf '(and <driver type=...> its format, <nvram> the copied NVRAM), then run:\n'
    printf '  virsh define <your copy of domain.xml>\n'
    if [ -n "$MEMORY" ]; then
        printf 'This backup has a RAM image (%s); see RESTORE.md before using virsh restore.\n' \
            "$MEMORY"
    fi
}

main() {
    umask 077  # the restored disks hold the VM's secrets
    CHECK_PID=
    WRITING=
    trap cleanup EXIT
    trap 'exit 130' HUP INT TERM
    case "${1:-}" in
        --check) [ $# -eq 1 ] || usage; cd_here; check_chain; exit 0 ;;
        --headers) [ $# -eq 1 ] || usage; cd_here; check_headers; exit 0 ;;
        -h|--help) usage ;;
        -*) usage ;;
    esac
    [ $# -le 1 ] || usage
    mkdir -p -- "${1:-.}"
    DEST=$(CDPATH= cd -- "${1:-.}" && pwd -P)
    cd_here
    [ "$DEST" != "$HERE" ] || die "restore into another directory, not into the backup"
    command -v qemu-img >/dev/null 2>&1 || die "qemu-img is not installed"
    printf 'Backup of VM %s (UUID %s)\n' "$VM_NAME" "$VM_UUID"
    MODE=preflight
    plan
    if [ -n "$PARENT" ] && [ ! -f "../$PARENT/restore.sh" ]; then
        die "the backup this one builds on is missing: ../$PARENT"
    fi
    check_headers
    # The check reads every file of the chain while qemu-img converts (each on its own
    # core, the page cache serving whichever reads second); the disks are written under
    # a temporary name and renamed into place only when both have succeeded.
    WRITING=1
    (trap - EXIT HUP INT TERM; check_chain) &
    CHECK_PID=$!
    MODE=convert
    plan
    if ! wait "$CHECK_PID"; then
        CHECK_PID=
        die "the backup failed its check: nothing restored"
    fi
    CHECK_PID=
    MODE=publish
    plan
    WRITING=
    hints
}

main "$@"
"""


def _plan(m: Manifest) -> list[str]:
    lines = ["plan() {", "    :"]
    for d in m.disks:
        args = (d.target, d.file, d.image_format, d.format, d.backing or "")
        lines.append("    disk " + " ".join(quote(a) for a in args))
    for name in (m.nvram, m.tpm):
        if name:
            lines.append(f"    extra {quote(name)}")
    lines.append("}")
    return lines


def restore_sh(manifest: Manifest) -> str:
    """A POSIX sh script that checks, then flattens every disk into a chosen directory."""
    values = [
        f"VM_NAME={quote(manifest.vm_name)}",
        f"VM_UUID={quote(manifest.vm_uuid)}",
        f"PARENT={quote(manifest.parent or '')}",
        f"MEMORY={quote(manifest.memory or '')}",
        "",
    ]
    return _SH_HEAD + "\n".join(values + _plan(manifest)) + "\n" + _SH_BODY
