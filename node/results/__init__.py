"""Result objects the node sends back: DICOM SEG, TID 1500 Comprehensive SR, optional Secondary Capture."""
