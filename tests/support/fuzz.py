"""Mutated data sets and malformed PDUs for the fuzz campaign (issue 13): reproducible from a seed."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import generate_uid

from tests.support.paths import dicom_dir
from tests.support.poison import j2k_bomb, poison_files
from tests.support.synthetic_dicom import small_chest_copies

#: Shared test files small enough to send a thousand variants of quickly (not the 10 MB one).
SEEDS = (
    "02_cr_implicit_le_12bit.dcm",
    "07_cr_10bit_stored_16alloc.dcm",
    "12_cr_jpeg_baseline_8bit.dcm",
    "17_cr_j2k_lossless_12bit.dcm",
    "19_cr_rle_lossless_12bit.dcm",
    "20_cr_deflated_explicit_le_12bit.dcm",
    "23_sc_chest_rgb_annotated.dcm",
    "25_cr_hand_bodypart.dcm",
)


def seed_datasets(work: Path) -> list[Dataset]:
    paths = [dicom_dir() / name for name in SEEDS] + small_chest_copies(work / "small", 4)
    paths += [*list(poison_files(work / "poison").values()), j2k_bomb(work / "bomb")]
    return [pydicom.dcmread(p) for p in paths]


def mutated_files(work: Path, n: int, seed: int = 13) -> Iterator[Path]:
    """`n` files whose file meta is intact (so a sender can propose them) and whose data set is mutated:
    truncated, bytes flipped, length fields set to 0xFFFFFFFF, chunks inserted, zeroed or repeated."""
    rng = random.Random(seed)
    bases = seed_datasets(work)
    out = work / "mutated"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ds = rng.choice(bases)
        uid = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        body = BytesIO()
        fp = DicomFileLike(body)
        fp.is_little_endian = ds.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.2"
        fp.is_implicit_VR = ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99":
            fp.is_implicit_VR = False
        write_dataset(fp, ds)  # deflated seeds are sent inflated under the deflated syntax: garbage too
        data = bytearray(body.getvalue())
        for _ in range(rng.randint(1, 3)):
            data = _mutate(rng, data)
        path = out / f"{i:05d}.dcm"
        with open(path, "wb") as f:
            f.write(b"\0" * 128 + b"DICM")
            write_file_meta_info(f, ds.file_meta)  # type: ignore[arg-type]
            f.write(data)
        yield path


def _mutate(rng: random.Random, data: bytearray) -> bytearray:
    if not data:
        return bytearray(rng.randbytes(rng.randint(1, 64)))
    at = rng.randrange(len(data))
    kind = rng.randrange(6)
    if kind == 0:  # truncated
        return data[:at]
    if kind == 1:  # bytes flipped
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return data
    if kind == 2:  # a length field (or anything) set to undefined/huge
        data[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\xfe\xff\xff\x7f", b"\x00\x00\x00\x80"])
        return data
    if kind == 3:  # random bytes inserted
        return data[:at] + rng.randbytes(rng.randint(1, 256)) + data[at:]
    if kind == 4:  # a chunk zeroed
        end = min(len(data), at + rng.randint(1, 4096))
        data[at:end] = bytes(end - at)
        return data
    end = min(len(data), at + rng.randint(1, 512))  # a chunk repeated
    return data[:end] + data[at:end] * rng.randint(1, 8) + data[end:]


def malformed_pdus(n: int, seed: int = 31) -> Iterator[bytes]:
    """`n` byte strings a broken or hostile peer could open a connection with."""
    rng = random.Random(seed)
    rq = _associate_rq()
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:  # random bytes
            yield rng.randbytes(rng.randint(1, 4096))
        elif kind == 1:  # a valid PDU type with a random (often huge) length and a short body
            yield struct.pack(
                ">BBL", rng.randint(1, 7), 0, rng.choice([0, 1, 6, 2**31, 2**32 - 1, rng.randrange(2**32)])
            ) + rng.randbytes(rng.randint(0, 512))
        elif kind == 2:  # the A-ASSOCIATE-RQ with bits flipped
            data = bytearray(rq)
            for _ in range(rng.randint(1, 10)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            yield bytes(data)
        elif kind == 3:  # the A-ASSOCIATE-RQ truncated
            yield rq[: rng.randrange(len(rq))]
        elif kind == 4:  # an unknown PDU type
            yield struct.pack(">BBL", rng.randint(8, 255), 0, 4) + b"\0\0\0\0"
        else:  # P-DATA, release or abort without an association
            yield struct.pack(">BBL", rng.choice([4, 5, 6, 7]), 0, 4) + rng.randbytes(4)


def _associate_rq(calling: str = "STORESCU", called: str = "CXRNODE") -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification (encoded by pynetdicom)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title, prim.called_ae_title = calling, called
    cx = build_context("1.2.840.10008.1.1")
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    prim.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())
