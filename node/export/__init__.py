"""Stage 4, export: delivery of result objects to DICOM destinations, with retries and a dead letter
(exporter drives the queue in the audit log, sender speaks C-STORE)."""
