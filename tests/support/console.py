"""Helpers for console tests: a node fed with every test file and a console on its audit log
(`console_site`), and a logged-in HTTP client."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import httpx
import pydicom

from node.admin.service import AdminService
from node.audit import AuditStore
from node.runtime.config import Settings, load_settings
from node.web.auth import hash_password
from node.web.server import WebServer, start_in_thread
from tests.support.dcmtk import send_as_stored, storescu, storescu_opts
from tests.support.node import NodeProcess
from tests.support.paths import dicom_dir, dicom_manifest

ADMIN, PASSWORD = "admin", "console-test-password"
# Few iterations: tests log in often; production hashes use 600 000.
PASSWORD_HASH = hash_password(PASSWORD, iterations=1000)
# [[web.users]] beside the single `admin_user` of older configs: a second admin and a read-only viewer.
OPS, OPS_PASSWORD = "ops", "ops-test-password"
VIEWER, VIEWER_PASSWORD = "viewer", "viewer-test-password"
USERS = [
    {"name": OPS, "password_hash": hash_password(OPS_PASSWORD, iterations=1000), "role": "admin"},
    {"name": VIEWER, "password_hash": hash_password(VIEWER_PASSWORD, iterations=1000), "role": "viewer"},
]


def web_toml(port: int) -> str:
    """A [web] section for a node config: console on `port`, the legacy admin plus USERS."""
    users = "".join(
        f'\n[[web.users]]\nname = "{u["name"]}"\npassword_hash = "{u["password_hash"]}"\nrole = "{u["role"]}"\n'
        for u in USERS
    )
    return (
        f'[web]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\nadmin_user = "{ADMIN}"\n'
        f'password_hash = "{PASSWORD_HASH}"\n{users}'
    )


EXTRA_OPTS = {"21": ["-xb"]}  # keep big endian as stored
RAW_SENDS = {"28", "30"}  # storescu cannot read these; their bytes are sent as they are


def sop_instance_uid(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)


def send_test_files(port: int, aet: str = "STORESCU") -> dict[str, int | None]:
    """Send every file of the DICOM test set the way the manifest says; {file: response status}."""
    statuses: dict[str, int | None] = {}
    plan = []
    for row in dicom_manifest():
        prefix, opts = row["file"][:2], storescu_opts(row)
        if prefix in RAW_SENDS:
            statuses[row["file"]] = send_as_stored(port, dicom_dir() / row["file"], aet=aet)
        elif opts is not None:
            plan.append((tuple(opts + EXTRA_OPTS.get(prefix, [])), row["file"]))
    for opts, group in groupby(sorted(plan), key=lambda p: p[0]):
        files = [dicom_dir() / name for _, name in group]
        result = storescu(port, files, aet=aet, opts=list(opts))
        for f in files:
            statuses[f.name] = result.responses.get(sop_instance_uid(f))
    return statuses


@dataclass
class ConsoleSite:
    """The data of a node that received the whole test set, and a console serving it."""

    settings: Settings
    store: AuditStore
    web: WebServer
    statuses: dict[str, int | None]  # test file -> C-STORE response status
    handed_off: list[int] = field(default_factory=list)  # instance ids the console's re-runs handed on


@contextmanager
def console_site(root: Path) -> Iterator[ConsoleSite]:
    """`cxrnode serve` receives every test file from storescu and stops; then the console runs in this
    process (as `cxrnode serve` runs it) on the same data, with the legacy admin plus USERS.

    Use it in a module-scoped fixture: the node and the sends take a while.
    """
    node = NodeProcess(root, extra_toml="[broker]\nembedded_worker = false\n")
    node.start()
    try:
        statuses = send_test_files(node.port)
    finally:
        assert node.stop() == 0, node.log_text()[-3000:]
    settings = load_settings(
        None,
        storage={"data_dir": str(node.data_dir), "min_free_mb": 1},
        database={"url": node.database_url},
        web={"password_hash": PASSWORD_HASH, "users": USERS},
    )
    store = AuditStore.open(settings.database_url)
    handed_off: list[int] = []
    admin = AdminService(
        store, calling_ae=settings.dicom.ae_title, tls=settings.dicom.tls, enqueue_analysis=handed_off.append
    )
    web = start_in_thread(settings, store, admin=admin, port=0)
    try:
        yield ConsoleSite(settings, store, web, statuses, handed_off)
    finally:
        web.stop()
        store.close()


@contextmanager
def logged_in_console(node: NodeProcess, store: AuditStore) -> Iterator[ConsoleClient]:
    """The console, run in this process as `cxrnode serve` runs it, on a stopped node's data, and a
    client logged in as the admin."""
    settings = load_settings(
        None,
        storage={"data_dir": str(node.data_dir), "min_free_mb": 1},
        database={"url": node.database_url},
        web={"password_hash": PASSWORD_HASH},
    )
    web = start_in_thread(settings, store, admin=AdminService(store, calling_ae=settings.dicom.ae_title), port=0)
    client = ConsoleClient(web.url)
    try:
        client.login()
        yield client
    finally:
        client.close()
        web.stop()


class ConsoleClient:
    """An httpx client that logs in and posts forms with the session's CSRF token."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, follow_redirects=False, timeout=30)

    def login(self, user: str = ADMIN, password: str = PASSWORD) -> httpx.Response:
        return self.http.post("/login", data={"username": user, "password": password, "next": "/"})

    def csrf(self) -> str:
        found = re.search(r'name="csrf" value="([^"]+)"', self.http.get("/ae").text)
        assert found, "not logged in"
        return found.group(1)

    def post(self, path: str, **form: str) -> httpx.Response:
        return self.http.post(path, data={"csrf": self.csrf(), **form})

    def get(self, path: str, **params: str) -> httpx.Response:
        return self.http.get(path, params=params)

    def close(self) -> None:
        self.http.close()
