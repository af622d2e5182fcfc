"""The guest agent: ping, commands, filesystem freeze and thaw."""

from __future__ import annotations

import json

import libvirt

from .connection import HypervisorError


class Guest:
    """Guest agent calls of a ``Session`` (mixed into it)."""

    # -- guest agent -----------------------------------------------------------------------------
    def agent_responds(self, uuid: str, timeout: int = 5) -> bool:
        import libvirt_qemu

        try:
            libvirt_qemu.qemuAgentCommand(self._dom(uuid), '{"execute":"guest-ping"}', timeout, 0)
        except libvirt.libvirtError:
            return False
        return True

    def agent_command(self, uuid: str, execute: str, arguments: dict | None = None,
                      timeout: int = 5):  # fmt: skip
        """One guest agent command; its ``return`` value (JSON-decoded)."""
        import libvirt_qemu

        command: dict = {"execute": execute}
        if arguments is not None:
            command["arguments"] = arguments
        reply = self._call(
            libvirt_qemu.qemuAgentCommand, self._dom(uuid), json.dumps(command), timeout, 0,
            doing=f"guest agent {execute}",
        )  # fmt: skip
        try:
            return json.loads(reply)["return"]
        except (ValueError, KeyError, TypeError) as exc:
            raise HypervisorError(f"guest agent {execute}: unreadable reply {reply!r}") from exc

    def freeze(self, uuid: str) -> int:
        return self._call(self._dom(uuid).fsFreeze, None, 0, doing="freeze guest filesystems")

    def thaw(self, uuid: str) -> int:
        return self._call(self._dom(uuid).fsThaw, None, 0, doing="thaw guest filesystems")
