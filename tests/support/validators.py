"""Run the DICOM validators the result objects must pass: dicom3tools' dciodvfy and PixelMed's validators.

Both are the Debian packages (`dicom3tools`, `libpixelmed-java`; PixelMedValidate.java runs with Java's
single-file source launcher, hence `default-jdk-headless`: see the Makefile's DEBS). Each check
returns what the validator reported minus a short, explicit list of KNOWN validator defects: places where
the installed validator contradicts DICOM PS3.3 / PS3.16 or where two validators demand opposite things.
Each entry says why and is narrow (message text plus the condition in the object that makes it a defect),
so anything else, including a real regression of the same attribute, still fails the test.

- dciodvfy (1.00~20220618): Device UID (0018,1002) in a Contributing Equipment Sequence item is what IHE
  AI Results requires to identify each trained model; this dicom3tools release does not list it there, so
  it reports "not present in standard DICOM IOD" (and the summary "Standard Extended SOP Class" line).
- PixelMed (20220618):
  - General Series Laterality "missing": PixelMed ignores that PS3.3 C.7.3.1 requires it only for a
    paired body part; for a chest dciodvfy reports an error when it IS present, so the objects omit it.
  - Patient Orientation "got 2 but expected 1-1": PS3.3 C.7.6.1.1.1 defines VM 2 (row and column
    direction); dciodvfy reports VM 1 as an error.
  - Derivation Image Sequence "missing" from the Shared Functional Groups when every Per-Frame item has
    it: a functional group macro belongs in one of the two (PS3.3 C.7.6.16), as highdicom writes it.
  - "Template 1411 ... Missing conditional content item" for a Measurement Group that has no region,
    segment or surface reference at all, i.e. a TID 1501 group: PixelMed picks the template of ALL groups
    of a report from whether ANY group has such a reference, while TID 1500 allows 1411 and 1501 groups
    side by side (the SR's prior-study group is TID 1501).
  - "Code ... not found in context group N" where PixelMed's own copy of CID N is extensible: PS3.16
    lets an application use other codes in an extensible context group (e.g. Procedure Reported "Plain
    chest X-ray" in CID 100, which lists no projection radiography procedure).
"""

from __future__ import annotations

import functools
import re
import subprocess
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
_PIXELMED_MAIN = Path(__file__).with_name("PixelMedValidate.java")
# JDK 17's XPath limits stop PixelMed's large stylesheets; lifting them is what PixelMed needs to run.
_JAVA_OPTS = ["-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0"]


@dataclass
class Report:
    """What one validator said about one file, with the known validator defects set apart."""

    path: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tolerated: list[str] = field(default_factory=list)  # known validator defects (module docstring)

    def __str__(self) -> str:
        lines = [f"{self.path}:"] + [f"  {m}" for m in self.errors + self.warnings]
        return "\n".join(lines)


# -- dciodvfy ---------------------------------------------------------------------------------------

_DEVICE_UID_NOT_IN_IOD = "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID"
_EXTENDED_SOP_CLASS = "Warning - Dicom dataset contains attributes not present in standard DICOM IOD"


def dciodvfy(path: Path) -> Report:
    """dciodvfy's errors and warnings for `path` (every line starting with Error or Warning)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    report = Report(Path(path))
    not_in_iod = 0
    for line in (run.stdout + run.stderr).splitlines():
        line = line.strip()
        if line.startswith(_DEVICE_UID_NOT_IN_IOD) and _has_contributing_device_uid(path):
            report.tolerated.append(line)
        elif line.startswith(_EXTENDED_SOP_CLASS):
            not_in_iod += 1
            report.tolerated.append(line)
        elif line.startswith("Error"):
            report.errors.append(line)
        elif line.startswith("Warning"):
            report.warnings.append(line)
    if not_in_iod and any("not present in standard DICOM IOD" in w for w in report.warnings):
        # Only the Device UID may make it an extended SOP class: anything else keeps the summary line.
        report.warnings.append(_EXTENDED_SOP_CLASS)
    return report


def _has_contributing_device_uid(path: Path) -> bool:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return any("DeviceUID" in item for item in ds.get("ContributingEquipmentSequence", []))


def dciodvfy_errors(path: Path) -> list[str]:
    return dciodvfy(path).errors


# -- PixelMed ---------------------------------------------------------------------------------------


def pixelmed_available() -> bool:
    return PIXELMED_JAR.exists()


def pixelmed(paths: Sequence[Path]) -> list[Report]:
    """PixelMed's findings for each file (one JVM for all of them: the stylesheets compile once).

    SR documents go through DicomSRValidator (content tree against the templates, and the IOD), other
    objects through DicomInstanceValidator (the IOD).
    """
    if not paths:
        return []
    run = subprocess.run(
        ["java", *_JAVA_OPTS, "-cp", str(PIXELMED_JAR), str(_PIXELMED_MAIN), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120 + 60 * len(paths),
    )
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in run.stdout.splitlines():
        if line.startswith("=== "):
            current = sections.setdefault(line[4:], [])
        elif current is not None:
            current.append(line.strip())
    reports = []
    for path in paths:
        lines = sections.get(str(path))
        if lines is not None and "IOD (SOP Class) unrecognized" in lines:
            raise ValueError(f"PixelMed has no IOD definition to check {path} against")
        if lines is None or "IOD validation complete" not in lines:
            raise RuntimeError(
                f"PixelMed did not validate {path} (exit {run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
            )
        reports.append(_pixelmed_report(Path(path), lines))
    return reports


def _pixelmed_report(path: Path, lines: Iterable[str]) -> Report:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    report = Report(path)
    for line in lines:
        if line.startswith("Error"):
            (report.tolerated if _pixelmed_defect(line, ds) else report.errors).append(line)
        elif line.startswith("Warning"):
            report.warnings.append(line)
    return report


def _pixelmed_defect(line: str, ds: pydicom.Dataset) -> bool:
    """Whether this PixelMed error is one of its known defects (module docstring) for this object."""
    if line.startswith("Error: GeneralSeriesModule/Laterality/") and "Missing conditional attribute" in line:
        return "Laterality" not in ds and str(ds.get("BodyPartExamined", "CHEST")).upper() in UNPAIRED_BODY_PARTS
    if "PatientOrientation: Incorrect value multiplicity - got 2 but expected 1-1" in line:
        return True
    if line.startswith("Error: DerivationImageMacro/DerivationImageSequence/: SharedFunctionalGroupsSequence"):
        frames = ds.get("PerFrameFunctionalGroupsSequence", [])
        return bool(frames) and all("DerivationImageSequence" in item for item in frames)
    tid1501 = re.search(
        r"^Error: Template 1411 VolumetricROIMeasurements/.* within ([\d.]+): .*"
        r"Missing conditional content item$",
        line,
    )
    if tid1501:
        return _is_tid1501_group(ds, tid1501.group(1))
    found = re.search(r"not found in context group (\d+)$", line)
    if found:
        return found.group(1) in _extensible_context_groups()
    return False


#: Concept names of the references that make a Measurement Group TID 1410/1411 rather than TID 1501:
#: Image Region, Referenced Segment, Volume Surface, Referenced Segmentation Frame.
_ROI_REFERENCES = frozenset({"111030", "121191", "121231", "121214"})


def _is_tid1501_group(ds: pydicom.Dataset, location: str) -> bool:
    """Whether the content item at PixelMed's `location` ("1.9.4": root, 9th child, its 4th child) is a
    Measurement Group without any ROI reference."""
    node: pydicom.Dataset = ds
    try:
        for index in location.split(".")[1:]:
            node = node.ContentSequence[int(index) - 1]
    except (AttributeError, IndexError, ValueError):
        return False
    if node.get("ValueType") != "CONTAINER" or node.ConceptNameCodeSequence[0].CodeValue != "125007":
        return False
    return not any(
        child.ConceptNameCodeSequence[0].CodeValue in _ROI_REFERENCES for child in node.get("ContentSequence", [])
    )


#: Body parts the node's results may name that are not paired structures (General Series Laterality absent).
UNPAIRED_BODY_PARTS = frozenset({"CHEST", "THORAX", ""})


@functools.cache
def _extensible_context_groups() -> frozenset[str]:
    """CIDs that PixelMed's own context group definitions mark extensible."""
    with zipfile.ZipFile(PIXELMED_JAR) as jar:
        text = jar.read("com/pixelmed/validate/DicomContextGroupsSource.xml").decode("utf-8", "replace")
    return frozenset(m.group(1) for m in re.finditer(r'<definecontextgroup cid="(\d+)"[^>]*extensible="T"', text))
