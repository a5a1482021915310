"""The DICOM conformance statement, generated from the code that implements it.

`python -m node.conformance` writes docs/conformance.md; `--check` regenerates it in memory and
fails (exit 1, with a diff) when the file differs, so the document cannot drift from the code:

- SCP presentation contexts come from the application entity `node.ingest.scp.StorageSCP` builds;
- the association policy from `node.ingest.scp` (A-ASSOCIATE-RJ diagnostics) and the config defaults;
- C-STORE statuses from the `STATUS_*` constants of `node.ingest.accept` and `node.ingest.header` (a new
  constant without a description here makes generation fail);
- which transfer syntaxes the analysis can decode from pydicom's installed decoders;
- SEG segments from `node.results.seg.SEGMENTS`, SR codes from `node.results.codes`/`node.results.sr`;
- TLS from `node.ingest.scp.server_ssl_context` and the config schema.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import ssl
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from pydicom.uid import UID

import node
from node.runtime.config import Settings

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"

# Why each C-STORE status is returned; keyed by constant name so a new constant cannot go undocumented.
STATUS_MEANINGS: dict[str, tuple[str, str]] = {
    "STATUS_SUCCESS": (
        "Success",
        "The data set is on disk (fsynced) and its audit row committed. Also returned "
        "for a second copy of an instance already stored (audited as duplicate, not "
        "analysed again).",
    ),
    "STATUS_OUT_OF_RESOURCES": (
        "Refused: Out of Resources",
        "Free space on the data volume fell below "
        "`storage.min_free_mb` during the association, or the data set is larger than "
        "`storage.max_instance_mb` (bytes past that are never written); nothing is "
        "stored. The sender may retry later.",
    ),
    "STATUS_DATASET_MISMATCH": (
        "Error: Data Set does not match SOP Class",
        "SOP Instance/Class UID missing or "
        "different from the C-STORE request, Study Instance UID missing, an "
        "impossible image size, or native Pixel Data shorter than Rows x Columns x Frames x Samples x "
        "BitsAllocated/8 or a whole frame longer. The bytes are kept in quarantine with an audit row.",
    ),
    "STATUS_STORED_NOT_MATCHING": (
        "Warning: Data Set does not match SOP Class",
        "Stored and analysed as for `0x0000`, but native Pixel Data carries trailing padding (less than "
        "one frame) past the image description, which is ignored; the instance.received audit event "
        "says so.",
    ),
    "STATUS_CANNOT_UNDERSTAND": (
        "Error: Cannot understand",
        "The data set cannot be parsed (corrupt or "
        "truncated bytes, not DICOM). The bytes are kept in quarantine with an audit row.",
    ),
    "STATUS_DUPLICATE_SOP_INSTANCE": (
        "Failure: Duplicate SOP Instance",
        "The SOP Instance UID is stored "
        "already with another data set (other SOP class, series or study, or "
        "other bytes in the same transfer syntax). The stored instance stays as "
        "it is; the new data set is kept in quarantine and audited as "
        "`instance.conflict`. A copy of the stored one gets 0x0000 (duplicate).",
    ),
    "STATUS_SOP_CLASS_NOT_SUPPORTED": (
        "Refused: SOP Class not supported",
        "STOW-RS only (C-STORE settles it in "
        "negotiation: no presentation context): the part is not of a storage SOP "
        "class listed in 3.2. The bytes are kept in quarantine with an audit row.",
    ),
    "STATUS_PROCESSING_FAILURE": (
        "Failure: Processing failure",
        "An internal error of the node (e.g. the audit "
        "database is unreachable). Nothing is acknowledged; the sender may retry.",
    ),
}

DIAGNOSTIC_NAMES = {
    "CALLING_AE_NOT_RECOGNISED": "calling AE title not recognised",
    "CALLED_AE_NOT_RECOGNISED": "called AE title not recognised",
}


def _uid_name(uid: str) -> str:
    return UID(uid).name if UID(uid).is_valid else uid


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return [*out, ""]


def scp_contexts(settings: Settings) -> list[tuple[str, list[str]]]:
    """(abstract syntax, transfer syntaxes) the listener accepts, read from the AE the SCP builds."""
    from node.ingest.scp import StorageSCP

    # `_make_ae` needs only the settings: build it without a store or spool (nothing is opened).
    scp = StorageSCP.__new__(StorageSCP)
    scp.settings = settings
    ae = scp._make_ae()
    return [(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax]) for cx in ae.supported_contexts]


def decodable(transfer_syntax: str) -> bool:
    """Whether node.analysis.prepare can decode pixel data in this transfer syntax with the installed plugins."""
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return bool(get_decoder(UID(transfer_syntax)).is_available)
    except NotImplementedError:
        return False


def status_constants() -> list[tuple[str, int]]:
    from node.ingest import accept as ingest
    from node.ingest import header as dicom_header

    found: dict[str, int] = {}
    for module in (ingest, dicom_header):
        for name, value in vars(module).items():
            if name.startswith("STATUS_") and isinstance(value, int):
                found[name] = value
    return sorted(found.items(), key=lambda kv: kv[1])


def _codes(module: ModuleType) -> list[Any]:
    """Every CodedConcept a module defines, also inside module-level tuples, lists and dicts."""
    from highdicom.sr import CodedConcept

    found: list[Any] = []

    def collect(value: Any) -> None:
        if isinstance(value, CodedConcept):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            for v in value:
                collect(v)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)

    for name, value in vars(module).items():
        if not name.startswith("_"):
            collect(value)
    return found


def render(settings: Settings | None = None) -> str:
    s = settings or Settings()
    d = s.dicom
    from node.ingest import scp as scp_module
    from node.results import codes as codes_module
    from node.results import seg as seg_module
    from node.results import sr as sr_module
    from node.results import study_sr as study_sr_module

    lines: list[str] = [
        f"# cxr-node {node.__version__} — DICOM Conformance Statement",
        "",
        "<!-- Generated by `python -m node.conformance` from the code; `python -m node.conformance --check` "
        "(run by the tests) fails when this file and the code disagree. Do not edit by hand. -->",
        "",
        "cxr-node receives chest radiographs by C-STORE, analyses them (lung, COVID-19 opacity and "
        "pneumothorax segmentation, severity score 0–6) and sends the results back as a DICOM "
        "Segmentation and a TID 1500 Comprehensive SR. Values below are the defaults; the configuration "
        "key that changes each is given in `code`.",
        "",
        "## 1. Application entities and network",
        "",
    ]
    lines += _table(
        ["Property", "Default", "Configuration"],
        [
            ("AE title", f"`{d.ae_title}`", "`dicom.ae_title`"),
            ("Listening port", d.port, "`dicom.port`"),
            ("Maximum concurrent associations", d.max_associations, "`dicom.max_associations`"),
            (
                "Maximum PDU size received (bytes, 0 = unlimited); a longer PDU is answered with A-ABORT",
                d.max_pdu,
                "`dicom.max_pdu`",
            ),
            (
                "Longest PDU accepted before the association is established (the A-ASSOCIATE-RQ)",
                d.max_request_pdu,
                "`dicom.max_request_pdu`",
            ),
            (
                "Time from connecting to a complete A-ASSOCIATE-RQ (and TLS handshake), s",
                f"{d.association_request_timeout_s:g}",
                "`dicom.association_request_timeout_s`",
            ),
            (
                "Connections waiting for association / from one address",
                f"{d.max_pending_associations} / {d.max_connections_per_peer}",
                "`dicom.max_pending_associations`, `dicom.max_connections_per_peer`",
            ),
            (
                "ACSE / DIMSE / network timeout (s)",
                f"{d.acse_timeout:g} / {d.dimse_timeout:g} / {d.network_timeout:g}",
                "`dicom.acse_timeout`, `dicom.dimse_timeout`, `dicom.network_timeout`",
            ),
            (
                "Implementation Class UID / Version Name",
                "pynetdicom's (see `pynetdicom.PYNETDICOM_IMPLEMENTATION_UID`)",
                "—",
            ),
            ("SCP/SCU Role Selection", "accepted for Storage Commitment Push Model only (section 4.1)", "—"),
            ("Extended negotiation, asynchronous operations", "not supported", "—"),
        ],
    )
    lines += [
        "## 2. Association acceptance policy",
        "",
        "Every association request, accepted or rejected, is written to the audit log (peer AE title, "
        "address, reason).",
        "",
        f"- Called AE title must equal `{d.ae_title}` (`dicom.require_called_ae = {str(d.require_called_ae).lower()}`).",
        "- Calling AE title must be in the node's AE table with role `source` or `both` "
        f"(`dicom.allow_unknown_calling_ae = {str(d.allow_unknown_calling_ae).lower()}`; AE titles are "
        "managed with `cxrnode ae …` or the web console and seeded from `[[ae]]` in the configuration).",
        "- When the AE entry has a host and `dicom.check_calling_host` is true, the peer must connect from one of "
        "that host's addresses.",
        "- A known AE title of any role (e.g. a `destination`) may open an association that proposes only "
        "Storage Commitment Push Model and Verification: a PACS reports its commitments that way (called AE "
        "title: the node's, or `sender.calling_ae` when that is set).",
        "",
        "Rejections are A-ASSOCIATE-RJ with:",
        "",
    ]
    lines += _table(
        ["Result", "Source", "Reason/Diag.", "When"],
        [
            (
                f"{scp_module.REJECT_PERMANENT} (rejected-permanent)",
                f"{scp_module.SOURCE_SERVICE_USER} (service-user)",
                f"{getattr(scp_module, name)} ({text})",
                f"the {text.split(' not')[0]} fails the policy above",
            )
            for name, text in DIAGNOSTIC_NAMES.items()
        ]
        + [
            (
                "2 (rejected-transient)",
                "1 (service-user)",
                "1 (no reason given)",
                "the policy check itself failed (e.g. audit database unreachable)",
            ),
            (
                "2 (rejected-transient)",
                "3 (service-provider, presentation)",
                "1 (temporary congestion)",
                f"free space on the data volume is below `storage.min_free_mb` ({s.storage.min_free_mb} MB) and "
                "the association proposes more than Verification",
            ),
            (
                "2 (rejected-transient)",
                "3 (service-provider, presentation)",
                "2 (local limit exceeded)",
                f"more than {d.max_associations} associations at once",
            ),
        ],
    )

    from node.export.commitment import STORAGE_COMMITMENT

    all_contexts = scp_contexts(s)
    contexts = [(a, tss) for a, tss in all_contexts if a != STORAGE_COMMITMENT]
    commit_syntaxes = next(tss for a, tss in all_contexts if a == STORAGE_COMMITMENT)
    syntaxes = sorted({ts for _, tss in contexts for ts in tss}, key=lambda u: [int(p) for p in u.split(".")])
    same = all(set(tss) == set(syntaxes) for _, tss in contexts)
    lines += [
        "## 3. SCP: Verification and Storage",
        "",
        f"The node accepts {len(contexts)} storage and verification abstract syntaxes as SCP (and Storage "
        "Commitment, section 4.1). Data sets are stored exactly as "
        "received (no transcoding); a proposed presentation context with an abstract syntax not listed "
        "here is rejected (abstract syntax not supported), and a C-STORE for it cannot be sent.",
        "",
        "After storage, routing rules (`[[rules]]`, first match wins; default: CR/DX chest PA/AP) decide "
        "whether an instance is analysed; others are stored and audited as skipped with the reason.",
        "",
        "### 3.1 Transfer syntaxes" + ("" if same else " (union; see 3.2 per SOP class)"),
        "",
        "Accepted for every SOP class below. *Analysed* says whether the pixel data can be decoded for "
        "analysis with the installed decoders; an instance that cannot is stored, audited as failed with the "
        "reason, and not retried.",
        "",
    ]
    lines += _table(
        ["Transfer syntax", "UID", "Analysed"],
        [(_uid_name(ts), f"`{ts}`", "yes" if decodable(ts) else "no (stored only)") for ts in syntaxes],
    )
    lines += ["### 3.2 SOP classes", ""]
    lines += _table(
        ["SOP class", "UID"] + ([] if same else ["Transfer syntaxes"]),
        [(_uid_name(a), f"`{a}`") + (() if same else (", ".join(f"`{t}`" for t in tss),)) for a, tss in contexts],
    )
    lines += ["### 3.3 C-STORE response statuses", ""]
    statuses = status_constants()
    missing = [name for name, _ in statuses if name not in STATUS_MEANINGS]
    if missing:
        raise RuntimeError(f"describe {', '.join(missing)} in node/conformance.py STATUS_MEANINGS")
    lines += _table(
        ["Status", "Meaning", "When"], [(f"`0x{value:04X}`", *STATUS_MEANINGS[name]) for name, value in statuses]
    )
    lines += [
        "A failure or warning status carries the reason in Error Comment (0000,0902), cut to 64 characters.",
        "",
        "C-ECHO always answers `0x0000` on an accepted association.",
        "",
    ]

    from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, SegmentationStorage

    seg_uid, sr_uid, sc_uid = str(SegmentationStorage), str(ComprehensiveSRStorage), str(SecondaryCaptureImageStorage)
    from node.export import sender as sender_module

    uncompressed = ", ".join(_uid_name(str(ts)) for ts in sender_module.UNCOMPRESSED)
    lines += [
        "## 4. SCU: results and verification",
        "",
        "The node sends its results with C-STORE to each destination of the matching rule: a named AE title "
        "from the AE table, or `reply-to-sender` (the calling AE of the source, which must have host and port). "
        "All objects for one destination go on one association. Each SOP class is proposed with the transfer "
        f"syntax its object is stored in; uncompressed objects also offer the other uncompressed syntaxes "
        f"({uncompressed}). Destinations marked `tls` are sent to over TLS.",
        "",
    ]
    lines += _table(
        ["SOP class", "UID", "Sent when"],
        [
            (_uid_name(seg_uid), f"`{seg_uid}`", f"`results.seg = {str(s.results.seg).lower()}`"),
            (_uid_name(sr_uid), f"`{sr_uid}`", f"`results.sr = {str(s.results.sr).lower()}`"),
            (
                _uid_name(sc_uid),
                f"`{sc_uid}`",
                f"`results.overlay = {str(s.results.overlay).lower()}` (overlay for viewers without SEG support)",
            ),
            ("Verification", "`1.2.840.10008.1.1`", "`cxrnode ae echo NAME` and the console's C-ECHO button"),
        ],
    )
    sd = s.sender
    delays = [sender_module.backoff_delay(n, sd) for n in range(1, sd.max_attempts)]
    retryable = ", ".join(f"`0x{p:02X}xx`" for p in sender_module.RETRYABLE_STATUS_PREFIXES)
    lines += [
        "A response of `0x0000` or a warning (`0xBxxx`) is delivered. The object is tried again later when the "
        f"association fails (unreachable, rejected, aborted), no response comes, or the status is {retryable}; "
        "other failure statuses are final. "
        f"Up to {sd.max_attempts} attempts (`sender.max_attempts`), waiting "
        f"{', '.join(f'{d:g}' for d in delays)} s between them (`sender.backoff_*`); then the export is *dead*: "
        "it stays on disk in the dead-letter queue until retried from the console or `cxrnode exports retry`. "
        "Every attempt is audited with the status or error.",
        "",
        *_commitment_section(s, commit_syntaxes),
        "## 5. Result objects",
        "",
        "Both objects copy the Patient and Study modules of the source image, start a new series, reference the "
        "source instance, and identify the algorithm (name, version, model card hash). Copied values are made "
        "valid, never invented: a Type 2 attribute the source lacks is sent empty; a date, time or sex in a "
        "legacy or lenient form (`1960-01-01`, ACR-NEMA `1960.01.01` and `10:15:00`, `MALE`) in its standard "
        "form; an unreadable one empty; a Specific Character Set with a typo (`ISO_IR100`) or an empty first "
        "value is corrected, one the result builder does not support (e.g. `ISO 2022 IR 149`) becomes UTF-8 "
        "(`ISO_IR 192`) after the text is decoded. The received file itself is kept as sent. When a model is marked "
        'experimental, the series description says "NOT FOR DIAGNOSTIC USE" and the SR says so in a Comment '
        "of each group that model made.",
        "",
    ]
    lines += _air_section()
    lines += [
        "### 5.2 Segmentation (BINARY)",
        "",
        "One frame per segment on the source image's own pixel grid (Rows × Columns of the source); "
        "Segment Algorithm Type AUTOMATIC with Segment Algorithm Name = the model's name and a Segmentation "
        "Algorithm Identification (family Artificial Intelligence, name, version, parameters: architecture, "
        "model card sha256, status); Tracking ID = the mask name and a Tracking UID per segment; "
        "empty segments are kept (an all-zero frame).",
        "",
    ]

    def code(c: Any) -> str:
        return f"{c.meaning} ({c.scheme_designator} {c.value})" if c is not None else "—"

    lines += _table(
        ["#", "Segment label", "Tracking ID", "Category", "Property type", "Laterality", "Model"],
        [
            (i, spec.label, key, code(spec.category), code(spec.property_type), code(spec.laterality), spec.model)
            for i, (key, spec) in enumerate(seg_module.SEGMENTS.items(), start=1)
        ],
    )
    lines += [
        "### 5.3 Comprehensive SR: TID 1500 Measurement Report",
        "",
    ]
    doc = inspect.getdoc(sr_module) or ""
    lines += [line for line in doc.splitlines() if line.startswith(("- ", "  "))] + [""]
    lines += ["Coded concepts used (SEG and SR):", ""]
    concepts = {(c.scheme_designator, c.value): c for c in _codes(codes_module) + _codes(sr_module)}
    lines += _table(
        ["Scheme", "Code", "Meaning"],
        [(c.scheme_designator, f"`{c.value}`", c.meaning) for _, c in sorted(concepts.items())],
    )
    lines += [
        "No private coding scheme is used. The SR's Coding Scheme Identification Sequence declares the schemes "
        "it uses:",
        "",
    ]
    lines += _table(
        ["Designator", "UID", "Name"], [(d, f"`{uid}`", name) for d, (uid, name) in sr_module.CODING_SCHEMES.items()]
    )
    summary_doc = (inspect.getdoc(study_sr_module) or "").split("\n\n", 1)[1]
    lines += [
        "### 5.4 Comprehensive SR: study summary (one per triage revision)",
        "",
        f"Series {study_sr_module.SERIES_NUMBER}, Series Description "
        f'"{study_sr_module.SERIES_DESCRIPTION}", with triage on and `results.study_sr` (default true); sent to '
        "the result destinations of one analysed image of the study, with that image's retries and dead letter.",
        "",
        *summary_doc.splitlines(),
        "",
    ]

    tls = s.dicom.tls
    ctx_src = inspect.getsource(scp_module.server_ssl_context)
    found = re.search(r"minimum_version\s*=\s*ssl\.TLSVersion\.(\w+)", ctx_src)
    min_version = ssl.TLSVersion[found.group(1)].name.replace("v", " ").replace("_", ".") if found else "default"
    lines += [
        "## 6. Security",
        "",
        f"- DICOM TLS (`dicom.tls.enabled`, default {str(tls.enabled).lower()}): the listener uses the server "
        f"certificate and key of `dicom.tls.cert_file`/`key_file`, minimum protocol {min_version}; "
        "with `dicom.tls.require_client_cert` peers must present a certificate signed by `dicom.tls.ca_file`. "
        "Per-AE `tls` marks destinations that are sent to over TLS.",
        "- AE title allow-list and optional host check (section 2).",
        "- No patient identifiers leave the node: worker messages carry pixels and opaque ids; logs redact "
        "patient names, IDs and birth dates.",
        "- Audit log of every association, instance state change, export attempt and administrative change "
        "(SQL, append-only events).",
        "",
        "## 7. Character sets",
        "",
        "Received data sets are stored unchanged whatever their Specific Character Set. Result objects copy the "
        "source's Patient/Study attributes and its Specific Character Set (corrected, or UTF-8 `ISO_IR 192`, "
        "where the source's is misspelled or not supported: section 5).",
        "",
    ]
    lines += _triage_section(s)
    lines += _dicomweb_section(s)
    return "\n".join(lines)


def _commitment_section(s: Settings, syntaxes: list[str]) -> list[str]:
    from node.export import commitment as c

    sd = s.sender
    lines = [
        "### 4.1 Storage Commitment Push Model",
        "",
    ]
    lines += _table(
        ["SOP class", "UID", "Roles", "Transfer syntaxes"],
        [
            (
                _uid_name(str(c.STORAGE_COMMITMENT)),
                f"`{c.STORAGE_COMMITMENT}`",
                "SCU and SCP",
                ", ".join(f"`{t}`" for t in syntaxes),
            )
        ],
    )
    lines += [
        "**As SCU.** For a destination whose AE entry has `storage_commitment` on (`cxrnode ae add … "
        "--storage-commitment`, the console's AE page, or `storage_commitment = true` in `[[ae]]`), the objects "
        "it stored on one association are asked to be committed right after, with one N-ACTION (Action Type "
        f"{c.ACTION_REQUEST_COMMITMENT}, SOP Instance `{c.STORAGE_COMMITMENT_INSTANCE}`) and a new Transaction UID. "
        "The transaction and its instances are written to the audit log before the N-ACTION is sent. The "
        f"node keeps that association open up to {sd.commitment_wait_s:g} s (`sender.commitment_wait_s`) for "
        "an N-EVENT-REPORT on it, and accepts the report on a new association to its own port as well (the "
        "peer proposes the SCP role by SCP/SCU Role Selection; the node accepts either role). Event Type 1 "
        "commits every instance; Event Type 2 lists failures (Failed SOP Sequence with Failure Reason). The "
        "export is then *committed*; a failed instance, or all of them when no report came within "
        f"{sd.commitment_timeout_s:g} s (`sender.commitment_timeout_s`, also after a restart of the node), "
        "is sent again with the same attempts and delays as a failed C-STORE, then dead. A report for an "
        "unknown or closed Transaction UID is answered `0x0000` and only audited.",
        "",
        "**As SCP.** A sender may ask the node to commit instances it sent (N-ACTION, Action Type 1). The node "
        "answers the N-ACTION at once and then reports, from its audit log and spool:",
        "",
    ]
    lines += _table(
        ["Result", "When"],
        [
            (
                "Committed (Referenced SOP Sequence)",
                "the instance is recorded as stored (not rejected), of the "
                "same SOP class, and its file is in the spool",
            ),
            (
                f"Failure Reason `0x{c.NO_SUCH_OBJECT_INSTANCE:04X}` (no such object instance)",
                "never received, refused at ingest, or removed by retention",
            ),
            (
                f"Failure Reason `0x{c.CLASS_INSTANCE_CONFLICT:04X}` (class/instance conflict)",
                "stored, but with another SOP class",
            ),
        ],
    )
    lines += [
        "The N-EVENT-REPORT (Event Type 1 when all are committed, else 2) goes on the requester's association "
        "while it is open, unless the requester took the SCP role for this SOP class on it (Role Selection); "
        "then, or when the association has ended, on a new association from the node to the requester's AE "
        "title, which must be in the AE table with host and port (TLS when the entry says so), proposing the "
        f"SCP role; tried {len(c.REPORT_RETRY_DELAYS_S) + 1} times, "
        f"{' and '.join(f'{d:g}' for d in c.REPORT_RETRY_DELAYS_S)} s apart. N-ACTION statuses: `0x0000`; "
        f"`0x{c.INVALID_ARGUMENT_VALUE:04X}` (no Transaction UID or Referenced SOP Sequence, reason in Error "
        f"Comment); `0x{c.NO_SUCH_ACTION_TYPE:04X}` (another Action Type); `0x{c.PROCESSING_FAILURE:04X}` "
        "(internal error). Requests, reports and their delivery are audited (`commitment.*` events).",
        "",
    ]
    return lines


def _dicomweb_section(s: Settings) -> list[str]:
    """Section 9: STOW-RS in and out (node.dicomweb)."""
    from node.dicomweb.stow import HTTP_STATUSES

    d = s.dicomweb
    lines = [
        "## 9. DICOMweb: STOW-RS",
        "",
        f"**Ingest** (`dicomweb.enabled`, default {str(d.enabled).lower()}; port `dicomweb.port`, default "
        f"{d.port}; HTTPS with `dicomweb.tls_cert_file`/`tls_key_file`): `POST /dicomweb/studies` and "
        '`POST /dicomweb/studies/{StudyInstanceUID}` take `multipart/related; type="application/dicom"`, one '
        "PS3.10 file per part (a bare data set without file meta gets the file meta the node writes for every "
        "C-STORE). Each request needs `Authorization: Bearer <token>`; a token (`cxrnode stow-token add SOURCE`) "
        "names a source that stands for the calling AE title in routing rules, `reply-to-sender` and the audit "
        "log, where each request is an association row with protocol `stow-rs`.",
        "",
        "The body is read as it streams, one spool file per part, and only once it is complete does each part "
        "go through the same ingest as a C-STORE data set (checks, quarantine, persist before answer, routing). "
        "Each part's outcome is the C-STORE status of section 3.3: success puts it in ReferencedSOPSequence "
        "(0008,1199), a failure in FailedSOPSequence (0008,1198) with that status as FailureReason (0008,1197), "
        "a warning in ReferencedSOPSequence with that status as WarningReason (0008,1196) and HTTP 202. "
        "An instance of another study than the one in the path fails with `0xA900`. The response is "
        "`application/dicom+json`, or the Native DICOM Model (`application/dicom+xml`) when the Accept header "
        "asks for it first. No RetrieveURL is given: the node does not serve the images it received.",
        "",
        "**Results by QIDO-RS / WADO-RS** (same port and tokens): `GET /dicomweb/studies/{study}/instances` lists "
        "the result objects the node made for a study (SEG, SR, overlay: Study/Series/SOP Instance UID, SOP "
        "Class UID, Modality, RetrieveURL; 204 when there is none) and "
        "`GET /dicomweb/studies/{study}/series/{series}/instances/{sop}` returns one as multipart/related "
        "application/dicom (404 for anything else). Each is an audit event (`dicomweb.search`, "
        "`dicomweb.retrieve`).",
        "",
    ]
    lines += _table(["HTTP status", "When"], [(f"`{code}`", text) for code, text in HTTP_STATUSES.items()])
    lines += [
        "Every refused request (4xx) is audited as a rejected association with the reason; nothing of its body "
        "is kept. Each part is held to `storage.max_instance_mb` like a C-STORE data set.",
        "",
        "**Export**: an AE table entry with a `url` is a STOW-RS destination: the results for it are POSTed in "
        "one request to `<url>/studies` (auth `none`, `bearer` or `basic`), with the same retries, backoff and "
        "dead letter as C-STORE (section 4): no connection, timeouts and HTTP 408/425/429/5xx are tried again, "
        "other HTTP errors are final; a FailureReason of `0xA7xx` is tried again, other failures are final.",
        "",
    ]
    return lines


def _triage_section(s: Settings) -> list[str]:
    """Section 8: study-level triage and the alerts it sends (not DICOM, but what a PACS/RIS team integrates)."""
    from node.alerts import hl7

    t = s.triage
    lines = [
        "## 8. Triage and alerts (HL7 v2, FHIR, webhook)",
        "",
        f"A study is decided when no instance arrived for {t.stable_s:g} s (`triage.stable_s`) and none of its "
        "instances is waiting for analysis; a late instance makes a new revision, and a destination is never told "
        "the same finding of a study twice. The level is the most pressing of the rules that hold "
        "(`[[triage.rules]]`); a rule whose finding comes from a model marked experimental raises nothing unless "
        f"`triage.allow_experimental` (default {str(t.allow_experimental).lower()}). A study with no analysable "
        'image is `routine` with the reason "no analysable image". Default rules:',
        "",
    ]
    lines += _table(
        ["Rule", "Level", "When"],
        [
            (r.name, r.level, ", ".join(f"`{k}` = {v:g}" for k, v in r.when.model_dump().items() if v is not None))
            for r in t.rules
        ],
    )
    lines += [
        "With `triage.priors_from` (default off) the node is also a Study Root Query/Retrieve SCU "
        "(C-FIND `1.2.840.10008.5.1.4.1.2.2.1`, C-MOVE `1.2.840.10008.5.1.4.1.2.2.2`): for a study whose patient "
        "has no earlier study here, it finds the patient's latest earlier CR/DX study at that AE and moves it to "
        "its own AE title; the moved study is decided without alerts and gives the later study its prior.",
        "",
        "The SR of an image whose patient (Patient ID and Issuer) has an earlier decided study carries the "
        "prior's severity in a measurement group of its own at the prior's time point (TID 1501/1502; the change "
        "is the difference of the two Severity values) and lists the prior image in the Pertinent Other "
        "Evidence Sequence.",
        "",
        f"**HL7 v{hl7.VERSION} ORU^R01 over MLLP** (waits for the ACK: AA/CA delivered, AE/CE retried, AR/CR "
        "dead at once). OBX-3 observation identifiers:",
        "",
    ]
    observations = [v for k, v in vars(hl7).items() if k.startswith("OBS_")]
    lines += _table(["Code", "Meaning", "Coding system"], [(f"`{c}`", m, sys_) for c, m, sys_ in observations])
    lines += [
        "**FHIR R4**: a transaction Bundle (Patient, Observations, DiagnosticReport referencing the ImagingStudy by "
        "its Study Instance UID), every entry a conditional create, POSTed with a bearer token. "
        "**Webhook**: JSON signed with HMAC-SHA256 (`X-CXRNode-Timestamp`, `X-CXRNode-Signature`), no patient "
        "fields unless `include_patient`. docs/operations.md has an example of each.",
        "",
        f"Each alert is tried up to {t.max_attempts} times (`triage.max_attempts`, backoff `triage.backoff_*`), "
        "then it is *dead* until `cxrnode alerts retry` or the console's worklist retries it; every attempt is "
        "audited.",
        "",
    ]
    return lines


def _air_section() -> list[str]:
    """Section 5.1: the IHE AI Results (AIR) content common to SEG and SR, read from node.results.common."""
    from node.results import codes as codes_module
    from node.results.common import DeviceInfo, contributing_equipment
    from workers.api import ModelInfo

    model = ModelInfo("lung", "1.2.0", "0" * 64, "validated", "DeepLabV3+")
    sample = contributing_equipment([model], DeviceInfo(), started=datetime(2026, 1, 1, tzinfo=UTC))[0]
    purpose = codes_module.PROCESSING_ALGORITHM
    meaning = {
        "PurposeOfReferenceCodeSequence": f'({purpose.value}, {purpose.scheme_designator}, "{purpose.meaning}")',
        "Manufacturer": "`results.manufacturer`",
        "ManufacturerModelName": "the model's name (`lung`, `opacity`, `pneumothorax`)",
        "SoftwareVersions": "the model card's version",
        "DeviceUID": "2.25 UID derived from the sha256 of the model's weights (its card's `sha256`): the same "
        "weights always give the same UID, new weights a new one",
        "ContributionDescription": "model name, version, architecture, status and the weights' sha256",
        "ContributionDateTime": "when the analysis started (UTC)",
    }
    lines = [
        "### 5.1 IHE AI Results (AIR) content",
        "",
        "- Contributing Equipment Sequence (0018,A001): one item per model whose results the object carries:",
        "",
    ]
    lines += _table(["Attribute", "Value"], [(e.name, meaning.get(e.keyword, "—")) for e in sample])
    lines += [
        "- Content Date/Time: when the analysis started (the worker's clock; for results of workers that do not "
        "send it, when the node queued the analysis).",
        "- Each finding has one Tracking UID: the SEG segment's Tracking UID is the Tracking Identifier UID of the "
        "SR measurement group of the same finding.",
        "- SR observer context: the node as device (Device Observer UID, stable for manufacturer, model and AE "
        "title), every measurement group with the TID 4019 Algorithm Identification of its model; its Algorithm "
        "Parameters give the architecture, the model card's sha256, the status and, from the card, the model's "
        "held-out performance and main weakness in one line.",
        "- Validation: every SEG and SR the tests produce passes dciodvfy without errors or warnings and PixelMed's "
        "DicomInstanceValidator/DicomSRValidator without errors, apart from the validator defects listed in "
        "tests/support/validators.py (e.g. Device UID in Contributing Equipment, required by AIR, is not yet in "
        "those validators' tables).",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.conformance", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file differs from the code")
    parser.add_argument("--output", type=Path, default=DOC_PATH)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            sys.stderr.writelines(
                difflib.unified_diff(
                    current.splitlines(True), text.splitlines(True), str(args.output), "generated from the code"
                )
            )
            sys.stderr.write(f"\n{args.output} is out of date: run python -m node.conformance\n")
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
