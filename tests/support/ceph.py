"""A real Ceph RADOS Gateway on 127.0.0.1 (Debian's Ceph packages) for integration tests.

A throwaway single-node cluster modelled on Ceph's own ``src/vstart.sh``: one monitor, one OSD
on memstore (every byte in RAM), no manager, no cephx, pools of size 1, and radosgw on beast.
Everything (config, data, sockets, logs) lives in one temporary directory; daemons listen on
free 127.0.0.1 ports and are stopped by PID (SIGTERM, then SIGKILL: a graceful stop takes
~10 s and the data is thrown away anyway). ``scripts/install-ceph.sh`` installs the packages.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import weakref
from pathlib import Path

from tests.support.controlplane import REPO_ROOT, ManagedProcess, free_port, wait_for
from tests.support.s3_access import S3Access

INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-ceph.sh"
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")
# memstore keeps every written byte in RAM; a test's uploads are aborted, so this is a cap.
MEMSTORE_BYTES = 4 * 1024**3


class CephError(RuntimeError):
    """Ceph failed to install, start or answer; the message carries the logs' tail."""


def ensure_ceph() -> None:
    """Install the Ceph packages when a binary is missing; raise if that fails (never skip)."""
    if all(shutil.which(name) for name in BINARIES):
        return
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, check=False
    )
    still = [name for name in BINARIES if not shutil.which(name)]
    if result.returncode != 0 or still:
        raise CephError(
            f"could not install Ceph with {INSTALL_SCRIPT} (exit {result.returncode}, "
            f"missing {', '.join(still)}):\n{result.stderr[-4000:]}"
        )


def _free_port_range(width: int) -> tuple[int, int]:
    """``width`` consecutive free ports for the messenger (kept off Ceph's default 6800-7300)."""
    for _ in range(200):
        start = 20000 + secrets.randbelow(30000)
        sockets: list[socket.socket] = []
        try:
            for port in range(start, start + width):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return start, start + width - 1
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise CephError(f"no {width} consecutive free ports on 127.0.0.1")


# Clusters not stopped yet: stopped at interpreter exit if a fixture's teardown never ran.
_running: weakref.WeakSet[CephCluster] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for cluster in list(_running):
        cluster.stop()


class CephCluster(S3Access):
    """One mon, one memstore OSD and one radosgw, with an S3 user, on free 127.0.0.1 ports."""

    def __init__(self) -> None:
        ensure_ceph()
        self.root = Path(tempfile.mkdtemp(prefix="mpu-janitor-ceph-"))
        self.conf = self.root / "ceph.conf"
        self.mon_port = free_port()
        self.rgw_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
        self.access_key = "janitor-" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(16)
        self.processes: list[ManagedProcess] = []
        self.started_seconds = 0.0

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> CephCluster:
        began = time.monotonic()
        _running.add(self)
        try:
            self._write_conf()
            self._start_mon()
            self._start_osd()
            self._start_rgw()
            self.admin(
                "user",
                "create",
                "--uid",
                "janitor",
                "--display-name",
                "mpu-janitor tests",
                "--access-key",
                self.access_key,
                "--secret",
                self.secret_key,
            )
        except BaseException as error:
            logs = self.logs()
            self.stop()
            raise CephError(f"Ceph did not start ({error}):\n{logs}") from error
        self.started_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """SIGTERM every daemon by PID, SIGKILL whatever still runs two seconds later."""
        for process in self.processes:
            if process.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        while any(p.running() for p in self.processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        for process in reversed(self.processes):
            process.stop(timeout=0.1)  # SIGKILL if still running; closes the log
        self.processes.clear()
        _running.discard(self)
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self, lines: int = 25) -> str:
        parts = []
        for path in sorted([*self.root.glob("*.log"), *self.root.glob("*.out")]):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    # -- steps ---------------------------------------------------------------------------
    def _write_conf(self) -> None:
        low, high = _free_port_range(40)
        root = self.root
        self.conf.write_text(
            f"""[global]
fsid = {uuid.uuid4()}
mon host = v2:127.0.0.1:{self.mon_port}
mon initial members = a
public addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind ipv6 = false
ms bind msgr1 = false
ms bind port min = {low}
ms bind port max = {high}
auth cluster required = none
auth service required = none
auth client required = none
; without cephx every daemon must drop the "secure" messenger mode, or radosgw loops on
; "get_initial_auth_request returned -13" and never connects
ms mon client mode = crc
ms mon service mode = crc
ms mon cluster mode = crc
ms client mode = crc
ms service mode = crc
ms cluster mode = crc
run dir = {root}/run
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
log file = {root}/$name.log
keyring = {root}/keyring
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
[mon]
mon data = {root}/$name
; each pool radosgw creates is a paxos round; the 1 s default makes startup ~12 s
paxos propose interval = 0.01
paxos min wait = 0.001
[osd]
osd data = {root}/$name
osd objectstore = memstore
memstore device bytes = {MEMSTORE_BYTES}
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port}
rgw dns name = localhost
rgw data = {root}/rgw
"""
        )
        (root / "run").mkdir()
        (root / "rgw").mkdir()

    def _env(self) -> dict[str, str]:
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    def _run(self, *argv: str, timeout: float = 60) -> str:
        result = subprocess.run(
            [*argv, "--conf", str(self.conf)],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise CephError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr[-2000:]}")
        return result.stdout

    def ceph(self, *args: str) -> str:
        return self._run("ceph", "--connect-timeout", "10", *args)

    def admin(self, *args: str) -> str:
        return self._run("radosgw-admin", *args)

    def _daemon(self, name: str, *argv: str) -> ManagedProcess:
        process = ManagedProcess(
            name, [*argv, "-f", "--conf", str(self.conf)], self.root / f"{name}.out", self._env()
        )
        self.processes.append(process)
        return process

    def _alive(self, process: ManagedProcess) -> None:
        if not process.running():
            raise CephError(f"{process.name} exited:\n{process.log_tail()}")

    def _start_mon(self) -> None:
        monmap = self.root / "monmap"
        fsid = next(
            line.split("=", 1)[1].strip()
            for line in self.conf.read_text().splitlines()
            if line.startswith("fsid")
        )
        self._run(
            "monmaptool",
            "--create",
            "--fsid",
            fsid,
            "--addv",
            "a",
            f"[v2:127.0.0.1:{self.mon_port}]",
            "--enable-all-features",
            "--set-min-mon-release",
            "pacific",
            str(monmap),
        )
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap))
        mon = self._daemon("mon.a", "ceph-mon", "-i", "a")

        def quorum() -> bool:
            self._alive(mon)
            try:
                return "quorum" in self.ceph("mon", "stat")
            except (CephError, subprocess.TimeoutExpired):
                return False

        wait_for(quorum, timeout=60, interval=0.1, what="ceph-mon quorum")

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise CephError(f"ceph osd new answered {osd_id!r}, expected 0")
        (self.root / "osd.0").mkdir()
        self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        osd = self._daemon("osd.0", "ceph-osd", "-i", "0")

        def up() -> bool:
            self._alive(osd)
            return "osd.0 up" in self.ceph("osd", "dump")

        wait_for(up, timeout=60, interval=0.1, what="osd.0 up")

    def _start_rgw(self) -> None:
        rgw = self._daemon("client.rgw.a", "radosgw", "-n", "client.rgw.a")

        def serving() -> bool:
            self._alive(rgw)
            try:
                with urllib.request.urlopen(self.endpoint, timeout=2) as response:
                    return bool(response.status)
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False

        wait_for(serving, timeout=90, interval=0.1, what=f"radosgw at {self.endpoint}")
