"""An OpenSSH server on 127.0.0.1 for sftp: repositories, with host and client keys made
for it, and the client configuration vmbackup is given (``VMBACKUP_SSH_CONFIG``): its key,
its known hosts (only this server's key), strict checking, no prompts. Everything lives in
one temporary directory, removed with the server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers import free_port

SSHD = "/usr/sbin/sshd"
KEYGEN = "/usr/bin/ssh-keygen"


class SftpServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vmbt-sshd-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = None
        self.config = self.dir / "ssh_config"  # the client's: VMBACKUP_SSH_CONFIG

    def url(self, path: Path) -> str:
        return f"sftp://root@127.0.0.1:{self.port}/{path}"

    def start(self) -> SftpServer:
        host_key, client_key = self.dir / "host_key", self.dir / "client_key"
        for key in (host_key, client_key):
            subprocess.run(
                [KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
            )
        (self.dir / "authorized_keys").write_text(Path(f"{client_key}.pub").read_text())
        key_type, key_data = Path(f"{host_key}.pub").read_text().split()[:2]
        (self.dir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {key_type} {key_data}\n")
        server = self.dir / "sshd_config"
        server.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
            f"PidFile {self.dir / 'sshd.pid'}\nSubsystem sftp internal-sftp\n"
        )
        self.config.write_text(
            f"Host *\n  IdentityFile {client_key}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.dir / 'known_hosts'}\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n"
        )
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.log = open(self.dir / "sshd.log", "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(server)], stdout=subprocess.DEVNULL, stderr=self.log
        )
        self._wait_listening()
        return self

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        probe = ["/usr/bin/ssh", "-F", str(self.config), "-p", str(self.port), "root@127.0.0.1"]
        while time.monotonic() < deadline:
            done = subprocess.run([*probe, "true"], capture_output=True, timeout=30)
            if done.returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        log = (self.dir / "sshd.log").read_text(errors="replace")
        self.stop()
        raise RuntimeError(f"sshd did not answer on port {self.port}: {log[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
