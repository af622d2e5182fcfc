"""Saved RAM state (memory backups), transient domains, the host's free memory and a
domain's screen: what restores of a running VM and restore drills need."""

from __future__ import annotations

import contextlib

import libvirt

from .connection import HypervisorError


class SavedState:
    """Saved state, transient domains and screenshots of a ``Session`` (mixed into it)."""

    def has_managed_save(self, uuid: str) -> bool:
        """A saved RAM state that the next start would resume (``virsh managedsave``)."""
        return bool(self._call(self._dom(uuid).hasManagedSaveImage, 0, doing="check saved state"))

    # -- saved state (memory.save): read and ABI-checked by libvirt, resumed ----------------
    def save_image_xml(self, path: str) -> str:
        """The definition a save image carries, secure parts included."""
        flags = libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE
        return self._call(self._conn.saveImageGetXMLDesc, path, flags, doing="read saved state")

    def save_image_define(self, path: str, xml: str) -> None:
        """Replace a save image's definition; libvirt refuses one the saved state (its
        devices, its ABI) cannot run under — and any change of name, UUID or MAC."""
        self._call(self._conn.saveImageDefineXML, path, xml, 0, doing="check saved state")

    def restore_saved(self, path: str, *, paused: bool = False) -> None:
        """Resume a save image as the (defined) domain its definition names."""
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        self._call(self._conn.restoreFlags, path, None, flags, doing="resume saved state")

    def create_transient(self, xml: str) -> str:
        """Create and start a transient domain (gone once destroyed); returns its UUID."""
        dom = self._call(self._conn.createXML, xml, 0, doing="create domain")
        return dom.UUIDString()

    def free_memory_mib(self) -> int:
        """Memory the host could give a new domain: free plus page cache and buffers."""
        stats = self._call(
            self._conn.getMemoryStats, libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0,
            doing="read the host's memory",
        )  # fmt: skip
        return sum(stats.get(key, 0) for key in ("free", "cached", "buffers")) // 1024

    def screenshot(self, uuid: str, limit: int = 64 << 20) -> tuple[str, bytes]:
        """The domain's screen (``virDomainScreenshot``): (MIME type, image bytes)."""
        stream = self._call(self._conn.newStream, 0, doing="open a stream")
        try:
            mime = self._call(self._dom(uuid).screenshot, stream, 0, doing="take a screenshot")
            data = bytearray()
            while True:
                chunk = self._call(stream.recv, 1 << 20, doing="read the screenshot")
                if not chunk or chunk == -2:
                    break
                data += chunk
                if len(data) > limit:
                    raise HypervisorError(f"screenshot larger than {limit >> 20} MiB")
            self._call(stream.finish, doing="end the screenshot")
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise
        return mime or "", bytes(data)
