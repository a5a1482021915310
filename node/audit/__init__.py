"""Audit log: every association, study, instance (with its state machine), admin change and export.

Use :class:`AuditStore` to write; read the models directly or through the store's list methods.
"""

from node.audit.models import (
    FINAL_STATES,
    PENDING_STATES,
    AERole,
    AETitle,
    Association,
    Event,
    Export,
    ExportAttempt,
    ExportState,
    Instance,
    InstanceState,
    StowToken,
    Study,
)
from node.audit.store import (
    AuditStore,
    DuplicateInstance,
    InstanceFilter,
    NewExport,
    ReceivedInstance,
    StoreError,
    StudySummary,
)

__all__ = [
    "FINAL_STATES",
    "PENDING_STATES",
    "AERole",
    "AETitle",
    "Association",
    "AuditStore",
    "DuplicateInstance",
    "Event",
    "Export",
    "ExportAttempt",
    "ExportState",
    "Instance",
    "InstanceFilter",
    "InstanceState",
    "NewExport",
    "ReceivedInstance",
    "StoreError",
    "StowToken",
    "Study",
    "StudySummary",
]
