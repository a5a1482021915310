"""A real MLLP listener (an HL7 v2 receiver such as a RIS interface engine) for the tests, as a process.

Run: python -m tests.support.mllp_server --out DIR [--port P] [--ack AA|AE|AR|none|close|garbage|wrongid]
     [--text REASON] [--delay S] [--tls-cert CERT --tls-key KEY]

Every message received is written to DIR/messages/NNNN.hl7 (exactly the bytes between the MLLP start and
end blocks) before it is answered. The answer is an HL7 v2.5.1 ACK built with hl7apy, whose MSA-1 is
the current mode; the other modes misbehave on purpose: ``none`` keeps the connection open and never
answers, ``close`` closes it without answering, ``garbage`` answers a frame that is no HL7 message,
``wrongid`` answers AA for another control id. The mode is re-read from DIR/control.json (written by
:class:`tests.support.mllp.MLLPListener`) for every message, so one listener can NAK and then accept.
Once listening, the port is written to DIR/port (``--port 0`` picks a free one).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import ssl
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message

MODES = ("AA", "AE", "AR", "none", "close", "garbage", "wrongid")
START, END = b"\x0b", b"\x1c\x0d"


def _escape(text: str) -> str:
    return (
        text.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def msh_fields(message: str) -> list[str]:
    """MSH split into fields, numbered as HL7 numbers them (index 1 is the field separator)."""
    first = message.split("\r", 1)[0].split("\n", 1)[0]
    if not first.startswith("MSH") or len(first) < 4:
        return []
    sep = first[3]
    return ["MSH", sep, *first[4:].split(sep)]


def build_ack(message: str, code: str, text: str = "", control_id: str | None = None) -> str:
    """An ACK for `message` (MSA-2 = its MSH-10 unless control_id is given), with ERR for AE/AR."""
    msh = msh_fields(message)

    def field(n: int) -> str:
        return msh[n] if len(msh) > n else ""

    ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    ack.msh.msh_3 = field(5) or "MLLPTEST"
    if field(6):
        ack.msh.msh_4 = field(6)
    if field(3):
        ack.msh.msh_5 = field(3)
    if field(4):
        ack.msh.msh_6 = field(4)
    ack.msh.msh_7 = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = f"ACK{time.time_ns()}"
    ack.msh.msh_11 = "P"
    ack.msh.msh_12 = "2.5.1"
    ack.msa.msa_1 = code
    ack.msa.msa_2 = _escape(control_id) if control_id is not None else field(10)
    if text:
        ack.msa.msa_3 = _escape(text)
    if code in ("AE", "AR", "CE", "CR"):
        err = ack.add_segment("ERR")
        err.err_3 = (
            "207^Application internal error^HL70357" if code in ("AE", "CE") else "200^Unsupported message type^HL70357"
        )
        err.err_4 = "E"
        if text:
            err.err_8 = _escape(text)
    ack.validate()
    return str(ack.to_er7())


class _State:
    def __init__(self, out: Path, default: dict[str, Any]) -> None:
        self.out = out
        self.default = default
        self.lock = threading.Lock()
        self.count = 0
        self.stopping = threading.Event()
        (out / "messages").mkdir(parents=True, exist_ok=True)

    def control(self) -> dict[str, Any]:
        try:
            data = json.loads((self.out / "control.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            data = {}
        return {**self.default, **data}

    def save(self, payload: bytes) -> Path:
        with self.lock:
            self.count += 1
            n = self.count
            while (self.out / "messages" / f"{n:04d}.hl7").exists():  # after a restart: keep numbering on
                n += 1
                self.count = n
        path = self.out / "messages" / f"{n:04d}.hl7"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, path)
        return path


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(0.5)
        buf = bytearray()
        state = self.server.state
        while not state.stopping.is_set():
            end = buf.find(END)
            if end < 0:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf.extend(chunk)
                continue
            start = buf.find(START)
            payload = bytes(buf[start + 1 if 0 <= start < end else 0 : end])
            del buf[: end + len(END)]
            if not self._answer(sock, payload, state):
                return

    def _answer(self, sock: socket.socket, payload: bytes, state: _State) -> bool:
        state.save(payload)
        control = state.control()
        mode, text, delay = str(control.get("ack", "AA")), str(control.get("text", "")), float(control.get("delay", 0))
        if delay:
            time.sleep(delay)
        if mode == "close":
            return False
        if mode == "none":
            while not state.stopping.is_set():  # hold the connection until the client gives up
                try:
                    if not sock.recv(65536):
                        return False
                except TimeoutError:
                    continue
                except OSError:
                    return False
            return False
        message = payload.decode("utf-8", "replace")
        if mode == "garbage":
            answer = "THIS IS NOT HL7"
        elif mode == "wrongid":
            answer = build_ack(message, "AA", text, control_id="SOMEONE-ELSE")
        else:
            answer = build_ack(message, mode, text)
        sock.sendall(START + answer.encode("utf-8") + END)
        return True


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: _State, context: ssl.SSLContext | None) -> None:
        self.state = state
        self.context = context
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.context is not None:
            sock.settimeout(10)
            sock = self.context.wrap_socket(sock, server_side=True)
        return sock, addr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ack", choices=MODES, default="AA")
    parser.add_argument("--text", default="")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    context = None
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(args.tls_cert), str(args.tls_key) if args.tls_key else None)
    state = _State(args.out, {"ack": args.ack, "text": args.text, "delay": args.delay})
    server = _Server((args.host, args.port), state, context)
    port = server.server_address[1]
    tmp = args.out / "port.tmp"
    tmp.write_text(str(port))
    os.replace(tmp, args.out / "port")
    print(f"mllp listening on {args.host}:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        state.stopping.set()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
