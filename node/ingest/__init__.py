"""Stage 1, ingest: the DICOM front door (scp), its defences (guard), header checks (header), the
durable spool and quarantine (spool), routing decisions (routing) and the accept pipeline that ties
them together, persisting before it answers (accept)."""
