"""Result objects the node sends back: DICOM SEG, TID 1500 Comprehensive SR, optional Secondary Capture.

All three are built with highdicom (valid on construction) from the source data set and the worker's
AnalyzeResult, and pass dciodvfy without errors (tests/integration/test_results_dciodvfy.py).
"""

from node.results.common import DeviceInfo, ResultError
from node.results.overlay import build_overlay
from node.results.seg import build_seg, segment_numbers
from node.results.sr import build_sr

__all__ = ["DeviceInfo", "ResultError", "build_overlay", "build_seg", "build_sr", "segment_numbers"]
