"""What SEG, SR and the overlay share: who made them, which algorithm, and the experimental-model wording.

IHE AI Results (AIR) asks every AI result object to name each algorithm that contributed to it in the
Contributing Equipment Sequence, with a Device UID that identifies the trained model itself: here it is
derived from the sha256 of the model's weights (its card's `sha256`), so it changes exactly when the
weights do and is the same on every node, worker and restart. Content Date/Time say when the analysis
started (the worker's clock; the node's queueing time for results of older workers).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.dicom_values import conform_patient_study
from workers.api import ModelInfo

from . import codes

log = logging.getLogger(__name__)

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"


class ResultError(ValueError):
    """The inputs cannot make a valid result object (wrong mask shape, unknown mask, missing model)."""


@dataclass(frozen=True)
class DeviceInfo:
    """The General/Enhanced Equipment of every object the node creates."""

    manufacturer: str = "cxr-node"
    model_name: str = "cxr-node"
    software_version: str = "0.1.0"
    serial_number: str = "1"
    institution_name: str | None = None

    @property
    def uid(self) -> str:
        """Stable Device Observer UID, derived from the identity (same device, same UID)."""
        return stable_uid("device", self.manufacturer, self.model_name, self.serial_number)


def read_source_header(path: str | Path) -> Dataset:
    """The header of a received image (no pixels) as the result builders take it: the patient and study
    attributes they copy made valid (node.dicom_values): a Type 2 attribute the sender left out is
    present and empty, a legacy date, time or sex is in its standard form, instead of failing the results."""
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    changed = conform_patient_study(ds)
    if charset := conform_character_set(ds):
        changed.append(charset)
    if changed:
        log.info("%s: copied as %s", path, "; ".join(changed))
    return ds


#: Specific Character Set terms the result builders (highdicom) accept.
ACCEPTED_CHARACTER_SETS = frozenset(v.value for v in hd.SpecificCharacterSetValues)
_ISO_IR = re.compile(r"ISO[ _-]?IR[ _-]?(\d+)", re.IGNORECASE)
_ISO_2022 = re.compile(r"ISO[ _-]?2022[ _-]?IR[ _-]?(\d+)", re.IGNORECASE)


def conform_character_set(ds: Dataset) -> str | None:
    """Give `ds` a Specific Character Set the results can carry; returns what changed, if anything.

    Senders write `ISO_IR100` or `ISO-IR 100` (typos pydicom reads anyway), `ISO_IR 6` (the default),
    or `\\ISO 2022 IR 87` (an empty first value: the default repertoire with code extensions); and some
    valid terms (Korean `ISO 2022 IR 149`) are not among those highdicom accepts. Text values are decoded
    first, under the sender's set; then the set is corrected, or becomes UTF-8 (ISO_IR 192), which
    can hold any text that was decoded.
    """
    if "SpecificCharacterSet" not in ds:
        return None
    raw = ds.SpecificCharacterSet
    terms = [str(t).strip() for t in (raw if isinstance(raw, MultiValue) else [raw])]
    fixed = [_ISO_2022.sub(r"ISO 2022 IR \1", _ISO_IR.sub(r"ISO_IR \1", t)).upper() for t in terms]
    if len(fixed) > 1 and fixed[0] == "":
        fixed[0] = "ISO 2022 IR 6"  # what an empty first value means (PS3.3 C.12.1.1.2)
    if fixed == terms and all(t in ACCEPTED_CHARACTER_SETS for t in fixed):
        return None
    ds.decode()  # every text value as str under the sender's set, before the set changes
    if all(t in ("", "ISO_IR 6") for t in fixed):
        del ds.SpecificCharacterSet
        new = "default repertoire"
    else:
        chosen = fixed if all(t in ACCEPTED_CHARACTER_SETS for t in fixed) else ["ISO_IR 192"]
        ds.SpecificCharacterSet = chosen if len(chosen) > 1 else chosen[0]
        new = "\\".join(chosen)
    old = "\\".join(terms)
    return f"SpecificCharacterSet {old!r} -> {new!r}"


def algorithm_identification(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    """SEG Segment Algorithm Identification: family AI, name/version, and the model card hash."""
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=model.version,
        source="cxr-node",
        parameters={"architecture": model.architecture, "model_card_sha256": model.sha256, "status": model.status},
    )


def experimental_models(models: Sequence[ModelInfo]) -> list[str]:
    return [m.name for m in models if m.status != "validated"]


def not_for_diagnostic_suffix(experimental: Sequence[str]) -> str:
    return f" - {NOT_FOR_DIAGNOSTIC_USE}" if experimental else ""


def model_device_uid(model: ModelInfo) -> str:
    """Device UID of a trained model: a 2.25 UID derived from its weights' sha256 (same weights, same UID)."""
    return stable_uid("model", model.name, model.sha256)


#: Namespace of the name-based UUIDs below (a fixed random UUID: these UIDs belong to cxr-node alone).
_UID_NAMESPACE = uuid.UUID("6c3e1f0a-5b8e-4d0f-9a51-2f4c8f1d7e21")


def stable_uid(*parts: str) -> str:
    """A 2.25 UID (PS3.5 B.2) of a name-based UUID: the same parts always give the same UID.

    (pydicom's generate_uid ignores entropy_srcs when prefix is None and returns a random UUID.)
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


def set_contributing_equipment(
    ds: Dataset, models: Sequence[ModelInfo], device: DeviceInfo, started: datetime | None = None
) -> None:
    """The Contributing Equipment Sequence (0018,A001) of a result object: one item per model (IHE AIR)."""
    ds.ContributingEquipmentSequence = contributing_equipment(models, device, started)


def contributing_equipment(
    models: Sequence[ModelInfo], device: DeviceInfo, started: datetime | None = None
) -> list[Dataset]:
    """One Contributing Equipment item per model, as IHE AIR describes them.

    Built by hand: highdicom's ContributingEquipment accepts only the DCM purposes of CID 7005 and has
    no Device UID, and AIR asks for both (99IHE "Processing Algorithm", the model's Device UID).
    """
    items = []
    for model in models:
        item = Dataset()
        purpose = Dataset()
        purpose.CodeValue = codes.PROCESSING_ALGORITHM.value
        purpose.CodingSchemeDesignator = codes.PROCESSING_ALGORITHM.scheme_designator
        purpose.CodeMeaning = codes.PROCESSING_ALGORITHM.meaning
        item.PurposeOfReferenceCodeSequence = [purpose]
        item.Manufacturer = device.manufacturer
        item.ManufacturerModelName = model.name[:64]
        item.SoftwareVersions = model.version[:64]
        item.DeviceUID = model_device_uid(model)
        item.ContributionDescription = (
            f"{model.name} model {model.version} ({model.architecture}, {model.status}), weights sha256 {model.sha256}"
        )[:1024]
        if started is not None:
            item.ContributionDateTime = dicom_datetime(started)
        items.append(item)
    return items


def dicom_datetime(moment: datetime) -> str:
    """DT value in UTC with its offset (a naive datetime is taken as UTC)."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime("%Y%m%d%H%M%S.%f+0000")


def set_content_datetime(ds: Dataset, started: datetime | None) -> None:
    """Content Date/Time = when the analysis started, in this host's local time like highdicom's default
    (no Timezone Offset From UTC: it would also re-label the source's Study Date/Time that the object copies)."""
    if started is None:
        return
    moment = (started.replace(tzinfo=UTC) if started.tzinfo is None else started).astimezone()
    ds.ContentDate = moment.strftime("%Y%m%d")
    ds.ContentTime = moment.strftime("%H%M%S.%f")
