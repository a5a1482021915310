"""cxr-node: DICOM node for chest radiographs."""

__version__ = "0.1.0"
