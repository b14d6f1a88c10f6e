"""A real Kubernetes control plane on 127.0.0.1 for the e2e tests.

etcd, kube-apiserver and kube-controller-manager (namespace, garbage-collector and
service-account controllers) run as child processes from the binaries that
``scripts/build-binaries.sh`` builds from the Go module proxy. There is no kubelet and no
scheduler: objects are stored, validated, authorised and garbage-collected, but Pods never run.

Everything lives in one temporary directory (data, certificates, kubeconfigs, logs) that
:meth:`ControlPlane.stop` removes. Processes are stopped by their PID, never by name.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-binaries.sh"
CONTROL_PLANE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")

# The controllers a test cluster needs without a kubelet: namespaces finish terminating,
# owner references are honoured, every namespace gets its "default" ServiceAccount, and
# aggregated ClusterRoles (the built-in view, edit and admin) collect their labelled rules.
CONTROLLERS = (
    "namespace-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "clusterrole-aggregation-controller",
)

ADMIN_USER = "admin"
CONTROLLER_MANAGER_USER = "system:kube-controller-manager"


class ControlPlaneError(RuntimeError):
    """A component failed to build, start or answer; the message carries its log's tail."""


class CommandError(RuntimeError):
    """A kubectl or helm call exited non-zero (with ``check=True``)."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        self.returncode = result.returncode
        self.stdout = result.stdout
        self.stderr = result.stderr
        super().__init__(
            f"{' '.join(map(str, result.args))} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )


def bin_dir() -> Path:
    explicit = os.environ.get("MPU_JANITOR_BIN_DIR")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mpu-janitor" / "bin"


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def ensure_binaries(names: Iterable[str] = CONTROL_PLANE_BINARIES) -> dict[str, Path]:
    """Paths of the named binaries, building the missing ones; raises if a build fails.

    A missing binary is never a reason to skip: the build script runs (slow on a cold cache)
    and a binary still missing afterwards is an error.
    """
    names = list(names)
    directory = bin_dir()
    missing = [name for name in names if not _is_executable(directory / name)]
    if missing:
        env = dict(os.environ)
        # The build script always writes to the cache folder; point it at the same place.
        if "MPU_JANITOR_BIN_DIR" in os.environ:
            env.setdefault("XDG_CACHE_HOME", str(directory.parent.parent))
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT), *missing],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        still = [name for name in missing if not _is_executable(directory / name)]
        if result.returncode != 0 or still:
            raise ControlPlaneError(
                f"could not build {', '.join(still or missing)} with {BUILD_SCRIPT} "
                f"(exit {result.returncode}):\n{_tail(result.stderr, 60)}"
            )
    return {name: directory / name for name in names}


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 60.0, interval: float = 0.5, what: str = ""
) -> Any:
    """Poll until ``condition()`` is truthy and return its value; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or condition}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    token: str,
    user: str,
    ca_file: Path | None,
    namespace: str | None = None,
) -> Path:
    cluster: dict[str, Any] = {"server": server}
    if ca_file is not None:
        cluster["certificate-authority"] = str(ca_file)
    else:
        cluster["insecure-skip-tls-verify"] = True
    context: dict[str, Any] = {"cluster": "mpu-janitor-test", "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "mpu-janitor-test", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "mpu-janitor-test", "context": context}],
        "current-context": "mpu-janitor-test",
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


class ManagedProcess:
    """One child process with its log file; stopped by PID."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"\n===== start {time.strftime('%H:%M:%S')}: {' '.join(argv)}\n".encode())
        self._log.flush()
        self.started_at = time.monotonic()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return _tail(self.log_path.read_text(errors="replace"), lines)
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()


# Control planes not stopped yet: stopped at interpreter exit if a fixture's teardown never ran.
_running: weakref.WeakSet[ControlPlane] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for plane in list(_running):
        plane.stop()


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on free 127.0.0.1 ports.

    ``start()`` returns once etcd is healthy, the API server's ``/readyz`` passes and the
    controller manager's ``/healthz`` passes. ``kubeconfig`` is an admin (system:masters)
    kubeconfig; :meth:`kubectl` and :meth:`helm` run the real binaries against it.
    """

    def __init__(self, *, start_timeout: float = 180.0) -> None:
        self.start_timeout = start_timeout
        self.binaries = ensure_binaries()
        self.root = Path(tempfile.mkdtemp(prefix="mpu-janitor-cp-"))
        self.pki_dir = self.root / "pki"
        self.pki_dir.mkdir()
        self.logs_dir = self.root / "logs"
        self.logs_dir.mkdir()
        self.etcd_client_port = free_port()
        self.etcd_peer_port = free_port()
        self.apiserver_port = free_port()
        self.controller_manager_port = free_port()
        self.server = f"https://127.0.0.1:{self.apiserver_port}"
        self.admin_token = secrets.token_hex(24)
        self.controller_manager_token = secrets.token_hex(24)
        self.kubeconfig = self.root / "admin.kubeconfig"
        self.controller_manager_kubeconfig = self.root / "controller-manager.kubeconfig"
        self.processes: dict[str, ManagedProcess] = {}
        self.apiserver_ready_seconds: float | None = None
        self.apiserver_restart_ready_seconds: float | None = None
        self._env = dict(os.environ)
        self._env.update(
            {
                "KUBECONFIG": str(self.kubeconfig),
                "HELM_CACHE_HOME": str(self.root / "helm" / "cache"),
                "HELM_CONFIG_HOME": str(self.root / "helm" / "config"),
                "HELM_DATA_HOME": str(self.root / "helm" / "data"),
                "KUBECACHEDIR": str(self.root / "kube-cache"),
                "HOME": str(self.root / "home"),
            }
        )
        (self.root / "home").mkdir()
        self._write_credentials()

    # ---------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        _running.add(self)
        try:
            self._start_etcd()
            self._start_apiserver()
            self.apiserver_ready_seconds = self._wait_apiserver_ready()
            self._write_admin_kubeconfig()
            self._start_controller_manager()
        except BaseException:
            # The logs go with the temp dir: print them first; pytest shows setup stderr.
            print(f"control plane failed to start; logs:\n{self.logs(60)}", file=sys.stderr)
            self.stop()
            raise

    def stop(self, *, keep_dir: bool = False) -> None:
        """Stop the processes by PID (SIGTERM, then SIGKILL) and remove the temp dir."""
        _running.discard(self)
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            process = self.processes.pop(name, None)
            if process is not None:
                process.stop()
        if not keep_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def restart_apiserver(self, *, grace: float = 3.0, down: float = 0.0) -> float:
        """Stop the API server by PID and start it again on the same port and data.

        SIGTERM first; after ``grace`` seconds, SIGKILL. kube-apiserver's graceful shutdown
        waits up to 60s for open watch connections (the controller manager's, an operator's) to
        go away, so a short grace is what keeps this fast; clients see their connections drop
        either way. ``down``: seconds it stays stopped. Returns the seconds from the new
        process's start to ``/readyz``.
        """
        self.processes.pop("kube-apiserver").stop(timeout=grace)
        time.sleep(down)
        self._start_apiserver()
        self.apiserver_restart_ready_seconds = self._wait_apiserver_ready()
        return self.apiserver_restart_ready_seconds

    def restart_etcd(self, *, grace: float = 10.0, down: float = 0.0) -> float:
        """Stop etcd by PID and start it again on the same ports and data directory, with the
        API server left running (it answers errors meanwhile and reconnects by itself).

        ``down``: seconds etcd stays stopped. Returns the seconds from etcd's new start until
        the API server's ``/readyz`` passes again (its etcd check included).
        """
        self.processes.pop("etcd").stop(timeout=grace)
        time.sleep(down)
        started = time.monotonic()
        self._start_etcd()
        self._wait_apiserver_ready()
        return time.monotonic() - started

    def logs(self, lines: int = 40) -> str:
        """The tail of every component's log (for failure reports)."""
        parts = []
        for path in sorted(self.logs_dir.glob("*.log")):
            text = _tail(path.read_text(errors="replace"), lines)
            parts.append(f"----- {path.name} (last {lines} lines) -----\n{text}")
        return "\n".join(parts)

    # ---------------------------------------------------------------------------- helpers

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl with the admin kubeconfig (or ``kubeconfig``)."""
        argv = [str(self.binaries["kubectl"]), f"--kubeconfig={kubeconfig or self.kubeconfig}"]
        return self._run([*argv, *args], input=input, check=check, timeout=timeout)

    def kubectl_json(self, *args: str, kubeconfig: Path | None = None) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json", kubeconfig=kubeconfig).stdout)

    def helm(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 180.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real helm with the admin kubeconfig and helm dirs inside the temp dir."""
        argv = [str(self.binaries["helm"]), f"--kubeconfig={self.kubeconfig}"]
        return self._run([*argv, *args], input=input, check=check, timeout=timeout)

    def create_namespace(self, name: str) -> str:
        self.kubectl("create", "namespace", name)
        return name

    def service_account_kubeconfig(
        self, namespace: str, name: str, *, create: bool = True, duration: str = "1h"
    ) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount ``namespace/name``.

        ``create=True`` creates the ServiceAccount (``create=False``: it exists already, for
        example the chart's). The token comes from the TokenRequest API
        (``kubectl create token``), as a Pod's projected token would, so the identity has
        exactly the RBAC it was given: run the operator or ``kubectl auth can-i`` with it.
        """
        if create:
            self.kubectl("create", "serviceaccount", name, "-n", namespace)
        token = self.kubectl(
            "create", "token", name, "-n", namespace, f"--duration={duration}"
        ).stdout.strip()
        if token.count(".") != 2:
            raise ControlPlaneError(f"kubectl create token returned no JWT: {token[:80]!r}")
        return write_kubeconfig(
            self.root / f"sa-{namespace}-{name}.kubeconfig",
            server=self.server,
            token=token,
            user=f"system:serviceaccount:{namespace}:{name}",
            ca_file=self.ca_file,
            namespace=namespace,
        )

    # ---------------------------------------------------------------------------- internals

    def _run(
        self,
        argv: list[str],
        *,
        input: str | None,
        check: bool,
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            env=self._env,
            timeout=timeout,
            check=False,
            cwd=REPO_ROOT,
        )
        if check and result.returncode != 0:
            raise CommandError(result)
        return result

    @property
    def ca_file(self) -> Path:
        # kube-apiserver writes a self-signed serving cert and its CA into --cert-dir.
        return self.pki_dir / "apiserver.crt"

    def _write_credentials(self) -> None:
        tokens = self.root / "tokens.csv"
        tokens.write_text(
            f'{self.admin_token},{ADMIN_USER},admin-uid,"system:masters"\n'
            f'{self.controller_manager_token},{CONTROLLER_MANAGER_USER},kcm-uid,"system:masters"\n'
        )
        tokens.chmod(0o600)
        self.sa_key = self.root / "sa.key"
        self.sa_pub = self.root / "sa.pub"
        for argv in (
            ["openssl", "genrsa", "-out", str(self.sa_key), "2048"],
            ["openssl", "rsa", "-in", str(self.sa_key), "-pubout", "-out", str(self.sa_pub)],
        ):
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise ControlPlaneError(f"{' '.join(argv)} failed: {result.stderr}")

    def _spawn(self, name: str, argv: Sequence[str]) -> ManagedProcess:
        process = ManagedProcess(name, argv, self.logs_dir / f"{name}.log", self._env)
        self.processes[name] = process
        return process

    def _wait(self, name: str, url: str, accept: Any, timeout: float) -> float:
        """Poll ``url`` until ``accept(status, body)``; fail early if the process died."""
        process = self.processes[name]
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        started = time.monotonic()
        last = "no answer yet"
        while time.monotonic() - started < timeout:
            if not process.running():
                raise ControlPlaneError(
                    f"{name} exited with {process.popen.returncode} before it was ready "
                    f"({url}: {last})\n{process.log_tail(60)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=5, context=context) as response:
                    status, body = response.status, response.read().decode(errors="replace")
            except urllib.error.HTTPError as exc:
                status, body = exc.code, exc.read().decode(errors="replace")
            except (OSError, ValueError) as exc:
                status, body = 0, str(exc)
            if accept(status, body):
                return time.monotonic() - process.started_at
            last = f"{status} {body[:300]}"
            time.sleep(0.2)
        raise ControlPlaneError(
            f"{name} not ready after {timeout:.0f}s ({url}: {last})\n{process.log_tail(60)}"
        )

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.etcd_client_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self._spawn(
            "etcd",
            [
                str(self.binaries["etcd"]),
                "--name=default",
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait(
            "etcd",
            f"{client}/health",
            lambda status, body: status == 200 and '"health":"true"' in body.replace(" ", ""),
            self.start_timeout,
        )

    def _start_apiserver(self) -> None:
        port = self.apiserver_port
        self._spawn(
            "kube-apiserver",
            [
                str(self.binaries["kube-apiserver"]),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_client_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.pki_dir}",
                "--service-cluster-ip-range=10.0.0.0/24",
                f"--service-account-issuer=https://127.0.0.1:{port}",
                f"--service-account-key-file={self.sa_pub}",
                f"--service-account-signing-key-file={self.sa_key}",
                "--authorization-mode=RBAC",
                f"--token-auth-file={self.root / 'tokens.csv'}",
                # No kubelet and no pods: the ServiceAccount admission plugin would only make
                # Pod creation wait for the default ServiceAccount.
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                "--v=1",
            ],
        )

    def _wait_apiserver_ready(self) -> float:
        return self._wait(
            "kube-apiserver",
            f"{self.server}/readyz",
            lambda status, body: status == 200 and body.strip() == "ok",
            self.start_timeout,
        )

    def _write_admin_kubeconfig(self) -> None:
        write_kubeconfig(
            self.kubeconfig,
            server=self.server,
            token=self.admin_token,
            user=ADMIN_USER,
            ca_file=self.ca_file,
        )
        write_kubeconfig(
            self.controller_manager_kubeconfig,
            server=self.server,
            token=self.controller_manager_token,
            user=CONTROLLER_MANAGER_USER,
            ca_file=self.ca_file,
        )

    def _start_controller_manager(self) -> None:
        kubeconfig = str(self.controller_manager_kubeconfig)
        self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries["kube-controller-manager"]),
                f"--kubeconfig={kubeconfig}",
                "--leader-elect=false",
                f"--controllers={','.join(CONTROLLERS)}",
                f"--service-account-private-key-file={self.sa_key}",
                f"--root-ca-file={self.ca_file}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.controller_manager_port}",
                f"--cert-dir={self.root / 'kcm-pki'}",
                "--v=1",
            ],
        )
        self._wait(
            "kube-controller-manager",
            f"https://127.0.0.1:{self.controller_manager_port}/healthz",
            lambda status, body: status == 200 and body.strip() == "ok",
            self.start_timeout,
        )
