"""Which libvirt URIs a host may have: the one check shared by the admin, the forms and the
worker (``hypervisor`` asks again before it connects, so a row edited in the database
cannot make the root worker open anything else).

libvirt URIs are programs as much as addresses: ``qemu+ext`` runs a command, and query
parameters such as ``command``, ``socket``, ``keyfile``, ``netcat`` or ``pkipath`` choose
what libvirt executes or opens. Only the plain forms below are taken, with no query at all.
"""

import re

from django.conf import settings

_HOSTNAME = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*"
_IPV6 = r"\[[0-9A-Fa-f:.]+\]"
_PORT = r"(?::(?P<port>[0-9]{1,5}))?"
_REMOTE = re.compile(
    r"^qemu\+(?P<transport>ssh|tls)://"
    r"(?:(?P<user>[A-Za-z0-9._-]{1,64})@)?"
    rf"(?P<host>{_HOSTNAME}|{_IPV6}){_PORT}/system$"
)
_TEST = re.compile(r"^test:///[A-Za-z0-9._/-]*$")
LOCAL = "qemu:///system"

HELP = (
    "qemu:///system, qemu+ssh://[user@]host[:port]/system or qemu+tls://host[:port]/system "
    "(no query parameters)"
)


def refusal(uri: str) -> str:
    """Why ``uri`` is not accepted; empty when it is."""
    if uri == LOCAL:
        return ""
    if getattr(settings, "VMBACKUP_ALLOW_TEST_URI", False) and _TEST.match(uri):
        return ""
    match = _REMOTE.match(uri)
    if match is None:
        return f"{uri!r} is not an accepted libvirt URI; use {HELP}"
    if match["transport"] == "tls" and match["user"]:
        return f"{uri!r}: qemu+tls takes no user name"
    if match["port"] and not 1 <= int(match["port"]) <= 65535:
        return f"{uri!r}: port {match['port']} is outside 1-65535"
    return ""
