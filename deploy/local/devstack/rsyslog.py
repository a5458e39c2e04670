"""Launch a throwaway, real ``rsyslogd`` for tests and benchmarks (Debian's rsyslog).

One :class:`RsyslogServer` owns one directory (``rsyslog.conf``, its work directory, the
output file) and at most one rsyslogd process, with an ``imtcp`` and an ``imudp`` input on
free 127.0.0.1 ports and an ``imuxsock`` input on a private datagram socket. Every message
received is written to :attr:`RsyslogServer.output` as one line: the input, then the RFC
5424 fields rsyslog parsed (PRI, APP-NAME, MSGID, STRUCTURED-DATA), then MSG, separated by
``\\t`` (see :data:`TEMPLATE` and :func:`parse_line`).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from .synapse import free_port

__all__ = ["RSYSLOGD", "RsyslogLine", "RsyslogServer", "free_udp_port", "parse_line",
           "rsyslog_available", "tls_available"]

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
# \t between fields (rsyslog escapes control characters inside a field as #011)
TEMPLATE = ("%inputname%\\t%pri%\\t%app-name%\\t%msgid%\\t%structured-data%\\t%msg%\\n")


def rsyslog_available() -> bool:
    return Path(RSYSLOGD).exists()


def tls_available() -> bool:
    """rsyslog's OpenSSL network stream driver (Debian package rsyslog-openssl)."""
    return any(Path(d, "lmnsd_ossl.so").exists()
               for d in ("/usr/lib/x86_64-linux-gnu/rsyslog", "/usr/lib/aarch64-linux-gnu/rsyslog",
                         "/usr/lib/rsyslog"))


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RsyslogLine:
    input: str  # imtcp, imudp, imuxsock
    pri: int
    app_name: str
    msgid: str
    structured_data: str
    msg: str


def parse_line(line: str) -> RsyslogLine:
    inp, pri, app, msgid, sd, msg = line.split("\t", 5)
    return RsyslogLine(inp, int(pri), app, msgid, sd, msg)


def _terminate(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=timeout)


class RsyslogServer:
    def __init__(self, base_dir: Path, *, tls: bool = False):
        self.dir = base_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tcp_port = 0
        self.udp_port = 0
        # tls: a third input, imtcp with rsyslog's OpenSSL driver (Debian rsyslog-openssl),
        # on tls_port, with a self-signed certificate for 127.0.0.1 (cert_path: also the CA)
        self.tls = tls
        self.tls_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def conf_path(self) -> Path:
        return self.dir / "rsyslog.conf"

    @property
    def output(self) -> Path:
        return self.dir / "received.log"

    @property
    def socket_path(self) -> Path:
        return self.dir / "log.sock"

    @property
    def log_path(self) -> Path:
        return self.dir / "rsyslogd.out"

    @property
    def cert_path(self) -> Path:
        return self.dir / "server.pem"

    @property
    def key_path(self) -> Path:
        return self.dir / "server.key"

    def _make_cert(self) -> None:
        if self.cert_path.exists():
            return
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(self.key_path), "-out", str(self.cert_path)],
            check=True, capture_output=True)

    def _tls_input(self) -> str:
        if not self.tls:
            return ""
        return f"""
input(type="imtcp" address="127.0.0.1" port="{self.tls_port}" ruleset="enclave"
      name="imtcp-tls" streamDriver.name="ossl" streamDriver.mode="1"
      streamDriver.authMode="anon" streamDriver.caFile="{self.cert_path}"
      streamDriver.certFile="{self.cert_path}" streamDriver.keyFile="{self.key_path}")
"""

    def _write_conf(self) -> None:
        work = self.dir / "work"
        work.mkdir(exist_ok=True)
        self.conf_path.write_text(f"""
global(workDirectory="{work}" maxMessageSize="256k")
module(load="imtcp" maxSessions="200")
module(load="imudp")
module(load="imuxsock" sysSock.use="off")
template(name="enclaveTest" type="string" string="{TEMPLATE}")
ruleset(name="enclave" queue.type="direct") {{
  action(type="omfile" file="{self.output}" template="enclaveTest")
}}
input(type="imtcp" address="127.0.0.1" port="{self.tcp_port}" ruleset="enclave")
input(type="imudp" address="127.0.0.1" port="{self.udp_port}" ruleset="enclave"
      rcvbufSize="8m")
input(type="imuxsock" socket="{self.socket_path}" useSpecialParser="off"
      parseHostname="on" ruleset="enclave" rateLimit.interval="0")
{self._tls_input()}""")

    def start(self, timeout: float = 20.0) -> None:
        """Start rsyslogd (new ports unless it ran before) and wait until TCP answers."""
        if self.tcp_port == 0:
            self.tcp_port, self.udp_port = free_port(), free_udp_port()
            self.tls_port = free_port() if self.tls else 0
        if self.tls:
            self._make_cert()
        self._write_conf()
        pidfile = self.dir / "rsyslogd.pid"
        pidfile.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf_path), "-i", str(pidfile)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._finalizer = weakref.finalize(self, _terminate, self._proc, signal.SIGKILL, 5)
        end = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.tcp_port), timeout=0.5):
                if self.socket_path.exists():
                    return
            if time.monotonic() > end:
                raise RuntimeError("rsyslogd did not start listening")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None:
            _terminate(self._proc, signal.SIGTERM, 10)
            self._proc = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def lines(self) -> list[RsyslogLine]:
        """Every message received so far (complete lines only)."""
        if not self.output.exists():
            return []
        text = self.output.read_text(encoding="utf-8", errors="replace")
        return [parse_line(x) for x in text.split("\n")[:-1]]

    def __enter__(self) -> RsyslogServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
