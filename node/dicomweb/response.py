"""The STOW-RS response (PS3.18 10.5.3): which instances were stored and which failed, and why.

One :class:`pydicom.Dataset` with ReferencedSOPSequence (stored, duplicates included) and FailedSOPSequence
(each item with its FailureReason, the C-STORE status ingest answered: 0xA700 out of resources, 0xA900
data set does not match, 0xC000 cannot understand, 0x0111 another data set under a stored UID, 0x0110
processing failure). A stored instance that earned a C-STORE warning (0xB007: Pixel Data with trailing
padding) carries it as WarningReason, and the answer is then 202, as for partial failures (PS3.18 10.5.3).
It is written as DICOM JSON (PS3.18 F.2) or as Native DICOM Model XML (PS3.19 A.1).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

JSON_TYPE = "application/dicom+json"
XML_TYPE = "application/dicom+xml"


@dataclass(frozen=True)
class InstanceResult:
    """The outcome of one part: stored (`failure_reason` None) or failed with a C-STORE status."""

    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int | None = None
    detail: str = ""  # the reason the audit log gives (not part of the standard response)
    warning_reason: int | None = None  # stored with a C-STORE warning status


def http_status(results: Sequence[InstanceResult]) -> int:
    """200 all stored, 202 some failed or stored with warnings, 409 all failed (PS3.18 10.5.3)."""
    failed = sum(r.failure_reason is not None for r in results)
    if failed == 0:
        return 202 if any(r.warning_reason is not None for r in results) else 200
    return 409 if failed == len(results) else 202


def response_dataset(results: Sequence[InstanceResult]) -> Dataset:
    ds = Dataset()
    stored, failed = [], []
    for r in results:
        item = Dataset()
        if r.sop_class_uid:
            item.ReferencedSOPClassUID = r.sop_class_uid
        if r.sop_instance_uid:
            item.ReferencedSOPInstanceUID = r.sop_instance_uid
        if r.failure_reason is None:
            if r.warning_reason is not None:
                item.WarningReason = r.warning_reason
            stored.append(item)
        else:
            item.FailureReason = r.failure_reason
            failed.append(item)
    if failed:
        ds.FailedSOPSequence = DicomSequence(failed)
    if stored:
        ds.ReferencedSOPSequence = DicomSequence(stored)
    return ds


def accepts_xml(accept: str) -> bool:
    """XML only when the client asks for it and not for JSON first; JSON is the default."""
    types = [t.split(";")[0].strip().lower() for t in accept.split(",")]
    for t in types:
        if t in (JSON_TYPE, "application/json"):
            return False
        if t in (XML_TYPE, "application/xml", "text/xml"):
            return True
    return False


def to_json(ds: Dataset) -> bytes:
    return json.dumps(ds.to_json_dict()).encode()


def to_xml(ds: Dataset) -> bytes:
    """Native DICOM Model: <NativeDicomModel><DicomAttribute tag keyword vr><Value number>… (PS3.19 A.1)."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n<NativeDicomModel xml:space="preserve">']
    _xml_dataset(ds, out)
    out.append("</NativeDicomModel>\n")
    return "".join(out).encode()


def _xml_dataset(ds: Dataset, out: list[str]) -> None:
    for elem in ds:
        tag = f"{elem.tag.group:04X}{elem.tag.element:04X}"
        vr = elem.VR or dictionary_VR(elem.tag)
        keyword = keyword_for_tag(elem.tag)
        out.append(f"<DicomAttribute tag={quoteattr(tag)} vr={quoteattr(vr)} keyword={quoteattr(keyword)}>")
        if vr == "SQ":
            for n, item in enumerate(elem.value, 1):
                out.append(f'<Item number="{n}">')
                _xml_dataset(item, out)
                out.append("</Item>")
        else:
            values = elem.value if elem.VM > 1 else [elem.value]
            for n, v in enumerate(values, 1):
                out.append(f'<Value number="{n}">{escape(str(v))}</Value>')
        out.append("</DicomAttribute>")
