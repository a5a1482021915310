"""QIDO-RS and WADO-RS of the node's own results, for a viewer that speaks DICOMweb.

Only what the node made (the SEG, SR and overlay objects of a study, as the exports table lists them) is
searched and served, never the images it received: `GET /dicomweb/studies/{study}/instances` answers the
result objects as DICOM JSON (study, series, SOP class and instance, modality, RetrieveURL), and
`GET /dicomweb/studies/{study}/series/{series}/instances/{sop}` the object itself as multipart/related
application/dicom. Same bearer tokens as STOW-RS; each search and retrieve is an audit event.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pydicom

from node.audit import AuditStore


def search(store: AuditStore, study: str, base_url: str) -> list[dict[str, object]]:
    """QIDO-RS instance-level answer for the result objects of `study` (empty when there are none)."""
    out: list[dict[str, object]] = []
    for export in store.result_objects(study):
        try:
            ds = pydicom.dcmread(export.file_path, stop_before_pixels=True)
        except (OSError, ValueError):
            continue  # deleted by retention: nothing to retrieve
        series, sop = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        out.append(
            {
                "0020000D": {"vr": "UI", "Value": [study]},
                "0020000E": {"vr": "UI", "Value": [series]},
                "00080016": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                "00080018": {"vr": "UI", "Value": [sop]},
                "00080060": {"vr": "CS", "Value": [str(ds.get("Modality", ""))]},
                "00081190": {"vr": "UR", "Value": [f"{base_url}/studies/{study}/series/{series}/instances/{sop}"]},
            }
        )
    return out


def find(store: AuditStore, study: str, series: str, sop: str) -> Path | None:
    """The file of one result object, when the node made it for that study and series."""
    for export in store.result_objects(study):
        if export.sop_instance_uid != sop:
            continue
        path = Path(export.file_path)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, ValueError):
            return None
        return path if str(ds.SeriesInstanceUID) == series else None
    return None


def multipart(path: Path) -> tuple[bytes, str]:
    """(body, content type) of a WADO-RS answer with one application/dicom part."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def to_json(found: list[dict[str, object]]) -> bytes:
    return json.dumps(found).encode()
