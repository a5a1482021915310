"""Triage benchmark (issue 14): time from the last image of a study to the RIS's HL7 ACK.

The embedded node (SQLite audit, kombu SQLite broker, one supervised CPU worker) receives studies of
two frontal CRs, one study every few seconds, each on its own `storescu` association, and alerts
every study (a route for all three levels) to an MLLP listener in this process that ACKs (AA) at
once. Per study: last C-STORE answered -> ACK sent. The reference, in the same run, is what the
node does without triage for the same images: last image received -> its SEG and SR acknowledged by
the DICOM destination. The difference is the stability window (``triage.stable_s``: the node waits
that long for more images of the study) plus the decision and the HL7 exchange.
"""

from __future__ import annotations

import logging
import shutil
import socketserver
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from benchmarks.common import DICOM_DIR, LOOPBACK, conditions, free_port, percentile
from benchmarks.pipeline import FINAL, NODE_AE, SENDER_AE, EmbeddedNode
from benchmarks.weights import resolve

log = logging.getLogger(__name__)

TEMPLATE = "02_cr_implicit_le_12bit.dcm"
START, END = b"\x0b", b"\x1c\x0d"


class _AckServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int) -> None:
        super().__init__((LOOPBACK, port), _AckHandler)
        self.acked: dict[str, float] = {}  # accession -> wall time the ACK was sent
        self.lock = threading.Lock()


class _AckHandler(socketserver.BaseRequestHandler):
    """A RIS that accepts everything: answers each framed ORU with MSA|AA|<its control id>."""

    server: _AckServer

    def handle(self) -> None:
        buf = b""
        self.request.settimeout(30)
        while True:
            try:
                chunk = self.request.recv(65536)
            except (TimeoutError, OSError):
                return
            if not chunk:
                return
            buf += chunk
            while END in buf:
                frame, _, buf = buf.partition(END)
                message = frame.lstrip(START).decode("utf-8", "replace")
                segments = [s.split("|") for s in message.replace("\n", "\r").split("\r") if s]
                msh = next((s for s in segments if s[0] == "MSH"), [])
                obr = next((s for s in segments if s[0] == "OBR"), [])
                control = msh[9] if len(msh) > 9 else ""
                ack = (
                    f"MSH|^~\\&|RIS||CXRNODE||{datetime.now():%Y%m%d%H%M%S}||ACK^R01^ACK|A{control}|P|2.5.1\r"
                    f"MSA|AA|{control}\r"
                )
                self.request.sendall(START + ack.encode() + END)
                accession = obr[2].split("^")[0] if len(obr) > 2 else ""
                with self.server.lock:
                    self.server.acked.setdefault(accession, time.time())


def _studies(out: Path, n: int, per_study: int) -> list[tuple[str, list[Path]]]:
    """`n` studies of `per_study` frontal CRs each, every study its own patient and accession."""
    template = pydicom.dcmread(DICOM_DIR / TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    studies = []
    for i in range(n):
        accession = f"BENCH{i:04d}{generate_uid()[-6:]}"[:16]
        template.StudyInstanceUID, template.AccessionNumber, template.PatientID = generate_uid(), accession, accession
        files = []
        for j in range(per_study):
            template.SeriesInstanceUID = generate_uid()
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = out / f"s{i:03d}_{j}.dcm"
            template.save_as(path, enforce_file_format=True)
            files.append(path)
        studies.append((accession, files))
    return studies


def run(
    out_dir: Path,
    cache: Path,
    *,
    n_studies: int = 10,
    per_study: int = 2,
    interval_s: float = 6.0,
    stable_s: float = 15.0,
    weights: str = "auto",
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    label, weights_dir = resolve(weights, cache)
    before = conditions()
    work = Path(tempfile.mkdtemp(prefix="cxrnode-bench-triage-"))
    ris_port = free_port()
    ris = _AckServer(ris_port)
    threading.Thread(target=ris.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    triage = (
        f"[triage]\nstable_s = {stable_s}\nallow_experimental = true\n"
        f'[[triage.destinations]]\nname = "ris"\ntype = "hl7"\nhost = "{LOOPBACK}"\nport = {ris_port}\n'
        '[triage.routes]\ncritical = ["ris"]\nurgent = ["ris"]\nroutine = ["ris"]\n'
    )
    node = EmbeddedNode(work / "node", weights_dir, cache, extra_toml=triage)
    sent_at: dict[str, float] = {}
    try:
        studies = _studies(work / "studies", n_studies, per_study)
        node.start()
        warm = _studies(work / "warm", 1, 1)  # the worker loads its models on the first image
        _send(node.port, warm[0][1])
        _wait(lambda: warm[0][0] in ris.acked, 300)
        for i, (accession, files) in enumerate(studies):
            t0 = time.monotonic()
            _send(node.port, files)
            sent_at[accession] = time.time()
            time.sleep(max(0.0, interval_s - (time.monotonic() - t0)) if i + 1 < len(studies) else 0)
        _wait(lambda: all(a in ris.acked for a in sent_at), timeout_s)
        instances = node.instances(
            {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for _, files in studies for f in files}
        )
    finally:
        node.stop()
        errors = node.log_errors()
        ris.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    to_ack = [ris.acked[a] - t for a, t in sent_at.items() if a in ris.acked]
    exported = [
        (r.exported_at - r.received_at).total_seconds()
        for r in instances
        if r.state in FINAL and r.exported_at is not None
    ]
    p50, ref50 = percentile(to_ack, 50), percentile(exported, 50)
    return {
        "benchmark": "triage",
        "weights": label,
        "mode": "embedded (SQLite audit, kombu sqla+sqlite broker, 1 supervised CPU inference worker)",
        "studies": n_studies,
        "images_per_study": per_study,
        "interval_s": interval_s,
        "stable_s": stable_s,
        "acked": len(to_ack),
        "last_image_to_hl7_ack_s": {
            "p50": _r(p50),
            "p95": _r(percentile(to_ack, 95)),
            "max": _r(max(to_ack, default=None)),
        },
        "reference_received_to_results_acknowledged_s": {"p50": _r(ref50), "p95": _r(percentile(exported, 95))},
        "ratio_ack_to_reference_p50": _r(p50 / ref50) if p50 and ref50 else None,
        "ack_minus_stable_window_p50_s": _r(p50 - stable_s) if p50 is not None else None,
        "node_log_tracebacks": errors,
        "conditions_before": before,
        "conditions_after": conditions(),
    }


def _send(port: int, files: list[Path]) -> None:
    subprocess.run(
        ["storescu", "-aet", SENDER_AE, "-aec", NODE_AE, LOOPBACK, str(port), *map(str, files)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
        check=True,
    )


def _wait(done: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {timeout_s} s")
        time.sleep(0.2)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)
