"""Delivers pending triage alerts to their destinations, with retries and a dead letter.

The ``alerts`` table is the queue, exactly as ``exports`` is for DICOM results: an alert is
``pending`` with a due time until a destination acknowledges it, or ``dead`` after
``triage.max_attempts`` (or at once on an answer that will not change, e.g. an HL7 AR or an HTTP 401);
``cxrnode alerts retry`` and the console make dead alerts due again. Every attempt is an audit event.
The message content was fixed when the alert was queued (its payload), so a retry sends the same
message with the same control id and receivers can drop a repeat.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from node.alerts.message import AlertError, TriageAlert
from node.audit import AuditStore
from node.audit.models import Alert, utcnow
from node.export.sender import backoff_delay, client_ssl_context
from node.runtime import metrics
from node.runtime.config import AlertDestination, HL7Destination, Settings, WebhookDestination
from node.runtime.loop import BackgroundLoop

log = logging.getLogger(__name__)


def deliver_one(settings: Settings, dest: AlertDestination, alert: TriageAlert) -> str:
    """Send one alert to one destination; returns the receipt, raises AlertError."""
    if isinstance(dest, HL7Destination):
        from node.alerts import hl7

        tls = settings.dicom.tls
        ssl_context = client_ssl_context(tls.ca_file, tls.cert_file, tls.key_file) if dest.tls else None
        return hl7.deliver(dest, alert, ssl_context=ssl_context)
    if isinstance(dest, WebhookDestination):
        from node.alerts import webhook

        return webhook.deliver(dest, alert)
    from node.alerts import fhir

    return fhir.deliver(dest, alert)


class Alerter(BackgroundLoop):
    """The delivery loop (a thread beside the exporter); ``run_once`` is one pass over the due alerts."""

    def __init__(self, settings: Settings, store: AuditStore, *, interval_s: float = 1.0) -> None:
        super().__init__("alerter", interval_s)
        self.settings = settings
        self.store = store

    def run_once(self) -> int:
        """One pass; returns how many alerts were delivered."""
        sent = 0
        for alert in self.store.due_alerts(limit=100, own=True):  # one node per study: never sent twice
            if self.stopping:  # each try may take a destination's timeout: stop between them
                break
            sent += self._attempt(alert)
        return sent

    def _attempt(self, alert: Alert) -> bool:
        dest = self.settings.triage.destination(alert.destination)
        try:
            if dest is None:
                raise AlertError(
                    f"alert destination {alert.destination!r} is no longer configured (triage.destinations)",
                    retryable=False,
                )
            receipt = deliver_one(self.settings, dest, TriageAlert.from_json(alert.payload))
        except AlertError as e:
            self._failed(alert, e.reason, retryable=e.retryable)
            return False
        except Exception as e:  # a bug in a carrier must not stop the loop: audited and retried
            log.exception("alert %d to %s failed", alert.id, alert.destination)
            self._failed(alert, f"{type(e).__name__}: {e}", retryable=True)
            return False
        self.store.record_alert_attempt(alert.id, ok=True, receipt=receipt)
        metrics.count_alert(alert.kind, "success")
        log.info("alert %d (%s) delivered to %s: %s", alert.id, alert.level, alert.destination, receipt)
        return True

    def _failed(self, alert: Alert, error: str, *, retryable: bool) -> None:
        cfg = self.settings.triage
        attempt = alert.attempts + 1
        give_up = not retryable or attempt >= cfg.max_attempts
        next_at = None if give_up else utcnow() + timedelta(seconds=backoff_delay(attempt, cfg))
        log.warning(
            "alert %d to %s failed (attempt %d%s): %s",
            alert.id,
            alert.destination,
            attempt,
            ", giving up" if give_up else "",
            error,
        )
        self.store.record_alert_attempt(alert.id, ok=False, error=error, next_attempt_at=next_at, give_up=give_up)
        metrics.count_alert(alert.kind, "dead" if give_up else "retry")
