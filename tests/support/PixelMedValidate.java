// Runs PixelMed's validators on many files in one JVM (the XSLT compilation is most of each run).
// Launched as a single-file source program by tests/support/validators.py:
//   java -cp /usr/share/java/pixelmed.jar tests/support/PixelMedValidate.java FILE...
// For each file it prints "=== FILE" and then what the validator reports: DicomSRValidator (content
// tree and IOD) for SR documents, DicomInstanceValidator (IOD) for everything else.
import com.pixelmed.dicom.AttributeList;
import com.pixelmed.dicom.TagFromName;
import com.pixelmed.validate.DicomInstanceValidator;
import com.pixelmed.validate.DicomSRValidator;

public class PixelMedValidate {
    public static void main(String[] args) throws Exception {
        DicomInstanceValidator instanceValidator = null;
        DicomSRValidator srValidator = null;
        for (String path : args) {
            System.out.println("=== " + path);
            AttributeList list = new AttributeList();
            list.read(path);
            String sopClass = com.pixelmed.dicom.Attribute.getSingleStringValueOrEmptyString(list, TagFromName.SOPClassUID);
            if (sopClass.startsWith("1.2.840.10008.5.1.4.1.1.88.")) {
                if (srValidator == null) {
                    srValidator = new DicomSRValidator();
                }
                System.out.print(srValidator.validate(path));
            } else {
                if (instanceValidator == null) {
                    instanceValidator = new DicomInstanceValidator();
                }
                System.out.print(instanceValidator.validate(list));
            }
            System.out.flush();
        }
    }
}
