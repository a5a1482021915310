"""Node configuration: one TOML file plus `CXRNODE_*` environment overrides, validated at start.

A wrong key or value stops start-up with a message naming it (`extra="forbid"` everywhere).
Environment overrides use `__` between levels, e.g. `CXRNODE_DICOM__PORT=11113`,
`CXRNODE_DATABASE__URL=postgresql+psycopg://…`.

Every command finds the file the way services do (:func:`find_config`): `--config`, else
`$CXRNODE_CONFIG`, else /etc/cxrnode/cxrnode.toml when it exists, else built-in defaults. Relative
paths in the file (data_dir, TLS and key files, `sqlite:///` URLs) are relative to the file, not to
the working directory, so `cxrnode ae add` run from a home directory reaches the node's database.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from workers.catalogue import MODEL_NAMES

log = logging.getLogger(__name__)

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


def validate_ae_title(value: str) -> str:
    """AE titles: 1–16 chars of the DICOM default repertoire, no backslash/control chars, not all spaces."""
    if not isinstance(value, str):
        raise ValueError("AE title must be a string")
    stripped = value.strip()
    if not stripped:
        raise ValueError("AE title must not be empty or all spaces")
    if len(value) > 16:
        raise ValueError(f"AE title {value!r} is {len(value)} characters long; the maximum is 16")
    if not AE_TITLE_RE.match(value):
        raise ValueError(
            f"AE title {value!r} has characters outside the DICOM default repertoire (no '\\' or control characters)"
        )
    return stripped


def validate_port(value: int) -> int:
    if not 1 <= int(value) <= 65535:
        raise ValueError(f"port {value} is outside 1..65535")
    return int(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Strict):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSConfig:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs cert_file and key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.require_client_cert needs ca_file")
        return self


class DicomConfig(_Strict):
    ae_title: str = "CXRNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 16
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu: int = 262144  # bytes; 0 = unlimited. A longer PDU from an associated peer: A-ABORT, dropped
    # Longest PDU read before the association is accepted (an A-ASSOCIATE-RQ is a few kB); longer: dropped.
    max_request_pdu: int = Field(default=65536, ge=1024)
    # Half-open connections (node.ingest.guard): the whole A-ASSOCIATE-RQ (and a TLS handshake) must arrive
    # within this many seconds of connecting, however slowly it drips.
    association_request_timeout_s: float = Field(default=10.0, gt=0)
    # Connections still waiting for their association, all peers together; a new one beyond this drops
    # the oldest waiting one (real modalities send their request within milliseconds).
    max_pending_associations: int = Field(default=8, ge=1)
    # Connections at once from one address; beyond, its oldest waiting one is dropped, or the new one
    # refused when all of that address's connections are accepted associations.
    max_connections_per_peer: int = Field(default=8, ge=1)
    require_called_ae: bool = True  # reject associations whose called AE title is not ours
    allow_unknown_calling_ae: bool = False  # True accepts any peer (testing only)
    listeners: int = 1  # receiving processes sharing the port (SO_REUSEPORT)
    check_calling_host: bool = True  # a source AE entry with a host may only connect from that host
    # Load balancers (their addresses) that start each connection with a PROXY protocol v2 header
    # (HAProxy `send-proxy-v2`): the sender's address from the header is the peer's, for the host
    # check, the per-peer limits and the audit log. Connections from other addresses carry none.
    proxy_protocol_from: list[str] = Field(default_factory=list)
    shutdown_grace_s: float = 60.0  # on SIGTERM, how long in-flight associations may take to finish
    tls: TLSConfig = Field(default_factory=TLSConfig)

    _ae = field_validator("ae_title")(lambda cls, v: validate_ae_title(v))
    _port = field_validator("port")(lambda cls, v: validate_port(v))

    @field_validator("max_associations", "listeners")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v


class StorageConfig(_Strict):
    data_dir: Path = Path("./var")
    # Below this free space, associations that may store are rejected (transient) and C-STORE answers 0xA700.
    min_free_mb: int = 1024
    # A data set larger than this is answered 0xA700 and not kept: bytes past the cap are never written.
    max_instance_mb: int = Field(default=512, ge=1)
    keep_days: int = 0  # 0 = keep forever

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"


class DatabaseConfig(_Strict):
    url: str = ""  # empty = sqlite:///<data_dir>/audit.db
    echo: bool = False


class BrokerConfig(_Strict):
    enabled: bool = True  # false: ingest only, instances stay `queued` (resumed when enabled again)
    url: str = ""  # empty = embedded (no server): sqla+sqlite:///<data_dir>/broker.db
    result_backend: str = ""
    embedded_worker: bool = True  # `cxrnode serve` starts and supervises a local CPU worker
    worker_concurrency: int = 1
    task_time_limit: float = 600.0
    # Redis: a task held by a worker that died as a whole runs again elsewhere after about this long
    # (live workers renew their lease every lease_s / 4; see workers.api.DEFAULT_LEASE_S). Give every
    # worker the same value (CXRNODE_BROKER__LEASE_S).
    lease_s: float = 60.0

    @field_validator("lease_s")
    @classmethod
    def _lease(cls, v: float) -> float:
        if v < 4:
            raise ValueError("must be >= 4 (leases are renewed every lease_s / 4 seconds)")
        return v


class PrepareConfig(_Strict):
    """Turning a stored image into model input (node.analysis.prepare): bounds that keep one bad image from
    looping or hurting the node."""

    # An unexpected error while preparing (not a bad attribute, which fails at once) is tried this many
    # times, one sweep apart, then the instance is `failed` with the reason: never retried for ever.
    max_attempts: int = Field(default=3, ge=1)
    # Nothing is decoded when Rows x Columns x Frames x Samples x bytes per sample is larger (MiB); the
    # largest chest detectors decode to ~35 MiB.
    max_pixel_mb: int = Field(default=100, ge=1)
    # Decoding runs in a child process with this address-space limit (MB): a decompression bomb fails its
    # image, never the node. 0 decodes in the node's own process (no isolation).
    decode_memory_mb: int = Field(default=2048, ge=0)
    decode_timeout_s: float = Field(default=120.0, gt=0)  # a decode taking longer fails the image


class AEEntry(_Strict):
    """An AE title known to the node (seeded from config into the DB)."""

    name: str
    host: str | None = None  # for sources: optional peer address check; for destinations: where to send
    port: int | None = None
    role: Literal["source", "destination", "both"] = "both"
    tls: bool = False
    # After results are sent to it, ask it to commit them (Storage Commitment Push Model, node.export.commitment).
    storage_commitment: bool = False
    description: str = ""
    # A STOW-RS destination: results are POSTed to this DICOMweb base URL + /studies (instead of host/port).
    url: str | None = None
    auth: Literal["none", "bearer", "basic"] = "none"
    username: str = ""  # basic
    secret: str = ""  # the bearer token or basic password (the audit DB keeps it; never logged)

    _ae = field_validator("name")(lambda cls, v: validate_ae_title(v))

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"url {v!r} must be an http:// or https:// URL")
        return v.rstrip("/")

    @field_validator("port")
    @classmethod
    def _port(cls, v: int | None) -> int | None:
        return None if v is None else validate_port(v)

    @model_validator(mode="after")
    def _destination_needs_address(self) -> AEEntry:
        if self.role == "destination" and self.url is None and (self.host is None or self.port is None):
            raise ValueError(f"destination AE {self.name!r} needs host and port (or a STOW-RS url)")
        if self.storage_commitment and (self.role == "source" or self.host is None or self.port is None):
            raise ValueError(f"storage_commitment of AE {self.name!r}: only for a destination with host and port")
        if self.auth != "none" and self.url is None:
            raise ValueError(f"auth {self.auth!r} is for STOW-RS destinations (url)")
        if self.auth != "none" and not self.secret:
            raise ValueError(f"auth {self.auth!r} needs a secret")
        if self.auth == "basic" and not self.username:
            raise ValueError("auth 'basic' needs a username")
        return self


# A Literal for pydantic's messages; the catalogue is the one list (checked on import).
ModelName = Literal["lung", "opacity", "pneumothorax"]
ALL_MODELS: tuple[ModelName, ...] = get_args(ModelName)
assert ALL_MODELS == MODEL_NAMES, "node.runtime.config.ModelName follows workers.catalogue.MODEL_NAMES"


class RuleMatch(_Strict):
    """Each list field holds the accepted values (case-insensitive); empty/absent = any.

    The age bounds (years, from Patient's Age or Study Date minus Patient's Birth Date) keep patients
    the models were not trained on away from them; an image whose age cannot be read still matches
    (anonymised films often carry none).
    """

    calling_ae: list[str] = Field(default_factory=list)
    modality: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list)
    view_position: list[str] = Field(default_factory=list)
    sop_class: list[str] = Field(default_factory=list)
    min_patient_age_years: float | None = Field(default=None, ge=0)
    max_patient_age_years: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _age_bounds_ordered(self) -> RuleMatch:
        low, high = self.min_patient_age_years, self.max_patient_age_years
        if low is not None and high is not None and high < low:
            raise ValueError(f"max_patient_age_years {high} is below min_patient_age_years {low}")
        return self


class Rule(_Strict):
    name: str
    match: RuleMatch = Field(default_factory=RuleMatch)
    action: Literal["analyze", "ignore"] = "analyze"
    models: list[ModelName] = Field(default_factory=lambda: list(ALL_MODELS))
    destinations: list[str] = Field(default_factory=lambda: ["reply-to-sender"])
    reason: str = ""  # for ignore rules: what the audit log says


#: The default rules analyse adults only: every labelled training image is an adult's, and the opacity
#: model reads a child's chest as diffuse opacity (opacity card `limitations`: severity >= 4 on most
#: small children among COVID-QU-Ex's normal films).
ADULT_YEARS = 18.0


def default_rules() -> list[Rule]:
    return [
        Rule(
            name="chest-frontal",
            match=RuleMatch(
                modality=["CR", "DX"],
                body_part=["CHEST", ""],
                view_position=["PA", "AP", ""],
                min_patient_age_years=ADULT_YEARS,
            ),
            action="analyze",
        ),
        Rule(
            name="secondary-capture-chest",
            match=RuleMatch(
                modality=["OT"],
                body_part=["CHEST"],
                sop_class=["1.2.840.10008.5.1.4.1.1.7"],
                min_patient_age_years=ADULT_YEARS,
            ),
            action="analyze",
        ),
    ]


class SenderConfig(_Strict):
    max_attempts: int = 6
    backoff_initial_s: float = 5.0
    backoff_factor: float = 2.0
    backoff_max_s: float = 600.0
    timeout_s: float = 30.0
    calling_ae: str = ""  # empty = dicom.ae_title
    # Storage commitment (destinations with storage_commitment = true): no N-EVENT-REPORT within this
    # many seconds of the N-ACTION counts as a failed send (retried with the backoff above, then dead).
    commitment_timeout_s: float = Field(default=300.0, gt=0)
    # How long the association of the N-ACTION stays open for a report on it (many peers answer on a
    # new association to the node's SCP instead; the wait ends early when such a report has come).
    commitment_wait_s: float = Field(default=5.0, ge=0)


class ModelsConfig(_Strict):
    lung: bool = True
    opacity: bool = True
    pneumothorax: bool = True  # experimental model: can be switched off
    severity_zone_threshold: float | None = None  # None = value from the model card


class ResultsConfig(_Strict):
    seg: bool = True
    sr: bool = True
    overlay: bool = False  # Secondary Capture overlay for viewers without SEG support
    study_sr: bool = True  # a study summary SR per triage revision (needs triage.enabled)
    manufacturer: str = "cxr-node"
    reanalyze_duplicates: bool = False

    @model_validator(mode="after")
    def _sr_needs_seg(self) -> ResultsConfig:
        if self.sr and not self.seg:
            raise ValueError("results.sr needs results.seg: the report's measurements reference SEG segments")
        return self


TriageLevelName = Literal["critical", "urgent", "routine"]


class TriageCondition(_Strict):
    """One rule's condition; every given field must hold (AND). Give at least one."""

    pneumothorax_probability_gte: float | None = None  # pneumothorax present with probability >= this
    severity_gte: int | None = None  # severity score (0-6) >= this
    severity_change_gte: int | None = None  # severity up by >= this against the patient's last prior

    @model_validator(mode="after")
    def _not_empty(self) -> TriageCondition:
        if all(v is None for v in (self.pneumothorax_probability_gte, self.severity_gte, self.severity_change_gte)):
            raise ValueError(
                "a triage rule needs at least one of pneumothorax_probability_gte, severity_gte, severity_change_gte"
            )
        return self


class TriageRule(_Strict):
    """`level` when `when` holds; the most pressing level over all matching rules wins."""

    name: str
    level: Literal["critical", "urgent"]
    when: TriageCondition


def default_triage_rules() -> list[TriageRule]:
    return [
        TriageRule(name="pneumothorax", level="critical", when=TriageCondition(pneumothorax_probability_gte=0.5)),
        TriageRule(name="severe-opacity", level="urgent", when=TriageCondition(severity_gte=4)),
        TriageRule(name="worsening", level="urgent", when=TriageCondition(severity_change_gte=2)),
    ]


class _AlertDestinationBase(_Strict):
    name: str
    timeout_s: float = 10.0

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("alert destination names are 1-64 of A-Z a-z 0-9 _ . -")
        return v


class HL7Destination(_AlertDestinationBase):
    """HL7 v2.5.1 ORU^R01 over MLLP to a RIS (waits for the ACK)."""

    type: Literal["hl7"]
    host: str
    port: int
    tls: bool = False  # MLLP over TLS with dicom.tls's CA/client certificate
    sending_application: str = "CXRNODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""

    _port = field_validator("port")(lambda cls, v: validate_port(v))


class FHIRDestination(_AlertDestinationBase):
    """FHIR R4: a DiagnosticReport with its Observations, POSTed as a transaction Bundle to `base_url`."""

    type: Literal["fhir"]
    base_url: str
    token: str = ""  # bearer token; prefer token_file
    token_file: Path | None = None
    ca_file: Path | None = None  # to verify an https server with a private CA


class WebhookDestination(_AlertDestinationBase):
    """JSON POST signed with HMAC-SHA256 (see docs/operations.md for verification)."""

    type: Literal["webhook"]
    url: str
    secret: str = ""  # HMAC key; prefer secret_file
    secret_file: Path | None = None
    include_patient: bool = False  # add patient id/name/birth date/sex (off: minimal PHI)
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _has_secret(self) -> WebhookDestination:
        if not self.secret and self.secret_file is None:
            raise ValueError(f"webhook {self.name!r} needs secret or secret_file (receivers verify the signature)")
        return self


AlertDestination = HL7Destination | FHIRDestination | WebhookDestination


class TriageConfig(_Strict):
    """Study-level triage: priority per study, alerts out (see README "Triage")."""

    enabled: bool = True
    stable_s: float = 15.0  # a study is processed when no instance arrived for this long
    # Studies whose last instance is older than this are not triaged (after an upgrade or a long outage,
    # alerting on old studies would only add noise to a RIS worklist).
    max_age_h: float = 24.0
    # An AE title (in the AE table, with host and port) to C-FIND/C-MOVE a patient's prior CR/DX study
    # from when the node holds none; it must know the node's AE title as a move destination. "" = off.
    priors_from: str = ""
    # Findings of models whose card says "experimental" may raise a level only when this is true.
    allow_experimental: bool = False
    rules: list[TriageRule] = Field(default_factory=default_triage_rules)
    destinations: list[Annotated[AlertDestination, Field(discriminator="type")]] = Field(default_factory=list)
    # Which levels go where: level -> destination names, e.g. critical = ["ris", "hook"].
    routes: dict[TriageLevelName, list[str]] = Field(default_factory=dict)
    max_attempts: int = 6  # then the alert is dead (retry with `cxrnode alerts retry`)
    backoff_initial_s: float = 5.0
    backoff_factor: float = 2.0
    backoff_max_s: float = 600.0

    @model_validator(mode="after")
    def _routes_known(self) -> TriageConfig:
        names = [d.name for d in self.destinations]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"alert destination name(s) {', '.join(twice)} given more than once")
        unknown = sorted({n for targets in self.routes.values() for n in targets if n not in names})
        if unknown:
            raise ValueError(f"triage.routes names unknown destination(s): {', '.join(unknown)}")
        rules = [r.name for r in self.rules]
        if len(set(rules)) != len(rules):
            raise ValueError("triage rule names must be unique")
        return self

    def destination(self, name: str) -> AlertDestination | None:
        return next((d for d in self.destinations if d.name == name), None)


WebRole = Literal["admin", "viewer"]


class WebUser(_Strict):
    """A console login (`[[web.users]]`). Viewers see every page; only admins run actions."""

    name: str
    password_hash: str  # "pbkdf2_sha256$iterations$salt$hash" (cxrnode web hash-password)
    role: WebRole = "viewer"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip() or len(v) > 64 or any(not c.isprintable() for c in v):
            raise ValueError("user names are 1-64 printable characters")
        return v


class WebConfig(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    # The single administrator of older configs; kept as one more admin login when password_hash is set.
    admin_user: str = "admin"
    password_hash: str = ""  # "pbkdf2_sha256$iterations$salt$hash"; empty = console disabled in production
    users: list[WebUser] = Field(default_factory=list)
    # Signs session cookies, so sessions outlive restarts and are shared by every console process that
    # reads the same file. None = <storage.data_dir>/web-session.key, generated (mode 0600) when missing.
    session_key_file: Path | None = None
    session_hours: float = 8.0
    production: bool = False
    json_logs: bool = False
    # Addresses of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (the client's
    # address for login throttling and the audit log, https for Secure cookies). Empty: nobody's.
    trusted_proxies: list[str] = Field(default_factory=list)
    # The console over HTTPS (PEM files), or behind_tls_proxy: a reverse proxy terminates TLS in front of
    # it. Production refuses to start with neither; with either, session cookies are always Secure.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    behind_tls_proxy: bool = False

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None

    _port = field_validator("port")(lambda cls, v: validate_port(v))

    @field_validator("session_hours")
    @classmethod
    def _positive_hours(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> WebConfig:
        names = [u.name for u in self.users] + ([self.admin_user] if self.password_hash else [])
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"user name(s) {', '.join(twice)} given more than once (web.users, web.admin_user)")
        return self


NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def default_node_name() -> str:
    """The host name, as far as it is a valid node name (the first label of an odd one)."""
    host = socket.gethostname()
    return host if NODE_NAME_RE.match(host) else (re.sub(r"[^A-Za-z0-9._-]", "-", host).strip("-._")[:64] or "node")


class NodeConfig(_Strict):
    """Who this node is among the nodes sharing one audit database (docs/operations.md, "Two nodes").

    Each node owns the rows of the images it received (their files are on its disk): it alone analyses,
    exports and purges them, and decides and alerts the studies whose first image it received. The name
    must stay the same across restarts (a renamed node leaves its pending work to nobody): set it where
    the host name changes (containers) and give every node a different one.
    """

    name: str = ""  # empty = the host name

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if v and not NODE_NAME_RE.match(v):
            raise ValueError(
                f"{v!r} is not a node name: letters, digits, '.', '_', '-', at most 64, starting with a letter or digit"
            )
        return v


class DicomwebConfig(_Strict):
    """STOW-RS ingest (`POST /dicomweb/studies`) on its own HTTP(S) port, one token per source."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8081
    # A request body larger than this is refused with 413 while it streams (nothing of it is kept);
    # each instance in it is also held to storage.max_instance_mb like a C-STORE.
    max_request_mb: int = Field(default=2048, ge=1)
    # More parts in one request: 413 (each part costs a file and an audit row, even an empty one).
    max_parts: int = Field(default=1000, ge=1)
    # A client that sends no byte of its body for this long is dropped (slow clients would hold threads).
    idle_timeout_s: float = Field(default=60.0, gt=0)
    # HTTPS with these PEM files (as web.tls_*); without them plain HTTP (behind a TLS proxy, or loopback).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None

    _port = field_validator("port")(lambda cls, v: validate_port(v))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXRNODE_", env_nested_delimiter="__", extra="forbid")

    node: NodeConfig = Field(default_factory=NodeConfig)
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    ae: list[AEEntry] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=default_rules)
    sender: SenderConfig = Field(default_factory=SenderConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    results: ResultsConfig = Field(default_factory=ResultsConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    dicomweb: DicomwebConfig = Field(default_factory=DicomwebConfig)
    triage: TriageConfig = Field(default_factory=TriageConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file (passed as init kwargs).
        return (env_settings, init_settings)

    @property
    def node_name(self) -> str:
        """This node's name in the audit log and its result queue (``node.name``, else the host name)."""
        return self.node.name or default_node_name()

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.storage.data_dir / 'audit.db').resolve()}"

    @property
    def broker_url(self) -> str:
        return self.broker.url or f"sqla+sqlite:///{(self.storage.data_dir / 'broker.db').resolve()}"

    @property
    def embedded(self) -> bool:
        return not self.broker.url


class ConfigError(ValueError):
    """Configuration that cannot start the node; the message names the key."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


#: Where services and admin commands look when neither --config nor $CXRNODE_CONFIG is given.
SYSTEM_CONFIG = Path("/etc/cxrnode/cxrnode.toml")
CONFIG_ENV = "CXRNODE_CONFIG"
CONFIG_SEARCH = f"--config, ${CONFIG_ENV}, {SYSTEM_CONFIG}"


def find_config(
    explicit: Path | str | None = None, environ: Mapping[str, str] | None = None, system: Path | None = None
) -> Path | None:
    """The configuration file a command uses: `explicit`, else $CXRNODE_CONFIG, else `system` when it
    exists; None means built-in defaults (the embedded development node)."""
    if explicit:
        return Path(explicit)
    env = (os.environ if environ is None else environ).get(CONFIG_ENV)
    if env:
        return Path(env)
    system = SYSTEM_CONFIG if system is None else system
    return system if system.is_file() else None


_SQLITE_URL = re.compile(r"^((?:sqla\+)?sqlite:///)(?!/)(.+)$")


def _resolve_url(url: str, base: Path) -> str:
    """`sqlite:///rel.db` (three slashes: relative) -> absolute against `base`."""
    m = _SQLITE_URL.match(url)
    if m is None or m.group(2).startswith(":memory:"):
        return url
    return f"{m.group(1)}{base / m.group(2)}"


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for a in get_args(annotation) for m in _models_of(a)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _is_path(annotation: Any) -> bool:
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_path(a) for a in get_args(annotation))
    return annotation is Path


def _resolve_relative(data: Any, annotation: Any, base: Path) -> Any:
    """Resolve relative paths in raw TOML `data` against `base`, guided by the model's annotations."""
    if isinstance(data, list):
        inner = get_args(annotation)[0] if get_origin(annotation) is list else annotation
        return [_resolve_relative(item, inner, base) for item in data]
    if isinstance(data, str):
        if _is_path(annotation) and data and not Path(data).is_absolute():
            return str(base / data)
        return data
    if not isinstance(data, dict):
        return data
    # A union of models (alert destinations): the member that has every given key.
    model = next((m for m in _models_of(annotation) if set(data) <= set(m.model_fields)), None)
    if model is None:
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        field = model.model_fields[key]
        if key == "url" and isinstance(value, str) and model in (DatabaseConfig, BrokerConfig):
            out[key] = _resolve_url(value, base)
        else:
            out[key] = _resolve_relative(value, field.annotation, base)
    return out


def _warn_worker_spellings(environ: Mapping[str, str]) -> None:
    """The workers' old variable names mean nothing to the node: say so rather than run on defaults."""
    from workers.api import DEPRECATED_ENV

    for old, new in DEPRECATED_ENV.items():
        if environ.get(old) and not environ.get(new):
            log.warning("%s is set but the node reads %s (the old worker spelling is ignored here)", old, new)


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Load TOML (if given) + environment; raise ConfigError naming every bad key.

    Relative paths in the file are resolved against the file's folder; environment values and
    built-in defaults stay relative to the working directory.
    """
    data: dict[str, Any] = {}
    source = "defaults/environment"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"configuration file {p} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from e
        except OSError as e:
            raise ConfigError(f"cannot read configuration file {p}: {e.strerror or e}") from e
        data = _resolve_relative(data, Settings, p.resolve().parent)
    data.update(overrides)
    _warn_worker_spellings(os.environ)
    try:
        return Settings(**data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from e
