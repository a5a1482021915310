"""Coded concepts used in SEG and SR, in one place so both objects say the same thing.

Choices:
- Lungs: SCT 39607008 "Lung" with the laterality modifier SCT 24028007 "Right" / 7771000 "Left"
  (DICOM CID 7151 style: one property type, laterality as a modifier), category "Anatomical Structure".
- COVID opacity: DCM 112001 "Opacity" (CID 6102 chest CAD findings). The opacity model is trained on
  COVID-QU-Ex "infection" masks that include ground glass AND consolidation, so the generic "Opacity"
  is what it finds; SCT/DCM "Ground glass opacity" would claim a subtype the model cannot tell apart.
  Category SCT 49755003 "Morphologically Altered Structure".
- Pneumothorax: SCT 36118008, category "Morphologically Altered Structure".
- Severity: SCT 246112005 "Severity"; AI algorithm family DCM 123110 "Artificial Intelligence".
- IHE AI Results (AIR): the Contributing Equipment item of each model has the Purpose of Reference
  (Newcode1, 99IHE, "Processing Algorithm") that AIR assigns (a code of IHE's own scheme, known to validators).
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

ANATOMICAL_STRUCTURE = CodedConcept("123037004", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED = CodedConcept("49755003", "SCT", "Morphologically Altered Structure")
LUNG = CodedConcept("39607008", "SCT", "Lung")
RIGHT = CodedConcept("24028007", "SCT", "Right")
LEFT = CodedConcept("7771000", "SCT", "Left")
RIGHT_AND_LEFT = CodedConcept("51440002", "SCT", "Right and left")
OPACITY = CodedConcept("112001", "DCM", "Opacity")
PNEUMOTHORAX = CodedConcept("36118008", "SCT", "Pneumothorax")
PLEURA = CodedConcept("3120008", "SCT", "Pleura")  # finding site of a pneumothorax (air in the pleural space)
SEVERITY = CodedConcept("246112005", "SCT", "Severity")
ARTIFICIAL_INTELLIGENCE = CodedConcept("123110", "DCM", "Artificial Intelligence")
PROCESSING_ALGORITHM = CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")
PRESENT = CodedConcept("121053", "DCM", "Present")
ABSENT = CodedConcept("121054", "DCM", "Absent")
FINDING = CodedConcept("121071", "DCM", "Finding")
AREA = CodedConcept("42798000", "SCT", "Area")
LATERALITY = CodedConcept("272741003", "SCT", "Laterality")
UPPER_ZONE = CodedConcept("281392002", "SCT", "Upper zone of lung")
MIDDLE_ZONE = CodedConcept("281393007", "SCT", "Middle zone of lung")
LOWER_ZONE = CodedConcept("281394001", "SCT", "Lower zone of lung")

#: UCUM units.
UNIT_CM2 = CodedConcept("cm2", "UCUM", "square centimeter")
UNIT_PIXELS = CodedConcept("{pixels}", "UCUM", "pixels")
UNIT_PERCENT = CodedConcept("%", "UCUM", "percent")
UNIT_RATIO = CodedConcept("1", "UCUM", "no units")
UNIT_SCORE = CodedConcept("{score}", "UCUM", "score")

__all__ = [name for name in dir() if name.isupper()] + ["codes"]
