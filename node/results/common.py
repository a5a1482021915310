"""What SEG, SR and the overlay share: who made them, which algorithm, and the experimental-model wording."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.uid import generate_uid

from workers.api import ModelInfo

from . import codes

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
        return str(generate_uid(prefix=None, entropy_srcs=[self.manufacturer, self.model_name, self.serial_number]))


def algorithm_identification(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    """SEG Segment Algorithm Identification: family AI, name/version, and the model card hash."""
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=model.version,
        source="cxr-node",
        parameters={"architecture": model.architecture, "model_card_sha256": model.sha256,
                    "status": model.status},
    )


def experimental_models(models: Sequence[ModelInfo]) -> list[str]:
    return [m.name for m in models if m.status != "validated"]


def not_for_diagnostic_suffix(experimental: Sequence[str]) -> str:
    return f" - {NOT_FOR_DIAGNOSTIC_USE}" if experimental else ""
