"""A real Orthanc (the Debian package) as a test PACS: own config, free DICOM and HTTP ports on
127.0.0.1, storage in a temporary folder, stopped afterwards. Never the system service's 4242/8042."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.net import free_port, wait_for

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian orthanc-dicomweb


def orthanc_binary() -> str:
    found = shutil.which("Orthanc") or next((p for p in ORTHANC_CANDIDATES if Path(p).exists()), None)
    if found is None:
        raise RuntimeError("Orthanc is not installed (Debian package `orthanc`)")
    return found


class Orthanc:
    """`with Orthanc(tmp_path) as pacs:` starts it; `pacs.instances()` / `pacs.instance_file(id)` read it back.

    `modalities` maps a name to (AE title, host, port) for Orthanc's own C-STORE/C-ECHO targets.
    Orthanc checks the called AE title, so a wrong one is rejected like a strict PACS would.
    `dicomweb=True` loads the DICOMweb plugin (`dicomweb_url`); `users` ({name: password}) turns on
    HTTP basic authentication for the REST API and DICOMweb alike (the helpers here log in as the first).
    """

    def __init__(
        self,
        folder: Path,
        ae_title: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        *,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.modalities = modalities or {}
        self.dicomweb = dicomweb
        self.users = users or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "cxr-node-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {name: list(entry) for name, entry in self.modalities.items()},
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "DicomWeb": {
                "Enable": self.dicomweb,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
            "SaveJobs": False,
            "StableAge": 1,
            "HttpTimeout": 30,
            "DicomScpTimeout": 30,
        }

    def __enter__(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([orthanc_binary(), str(config_path)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(self._ready, 30, f"Orthanc REST on port {self.http_port}")
        except TimeoutError:
            self.__exit__()
            raise RuntimeError(f"Orthanc did not start:\n{self.log_path.read_text()[-3000:]}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            self.get_json("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    # --- REST -----------------------------------------------------------------------------------
    def get(self, path: str) -> bytes:
        request = urllib.request.Request(self.url + path)
        if self.users:
            name, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode())
        with urllib.request.urlopen(request, timeout=30) as rsp:
            return bytes(rsp.read())

    def get_json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def post_json(self, path: str, body: bytes | Any) -> Any:
        """POST raw bytes (e.g. a DICOM file to /instances) or a JSON body; the JSON answer."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=30) as rsp:
            return json.loads(rsp.read())

    def instances(self) -> list[str]:
        return list(self.get_json("/instances"))

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file")
