"""DICOMweb: STOW-RS in (:mod:`node.dicomweb.stow`, its own HTTP port, one bearer token per source) and
STOW-RS out (:mod:`node.dicomweb.client`, a destination kind next to DICOM AEs).

Both reuse what the DICOM side does: a STOW-RS part goes through :class:`node.ingest.accept.Ingest` exactly as a
C-STORE data set does (persist before answer, routing, quarantine, audit), and a STOW-RS destination is an
entry of the AE table with a URL, delivered by :mod:`node.export.exporter` with the same retries and dead letter.
"""
