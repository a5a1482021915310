"""End to end with real parts: storescu -> `cxrnode serve` -> Celery worker -> SEG + SR -> Orthanc / storescp.

The worker runs tiny models of the shipped architectures whose heads are pinned to constants (lungs
everywhere, opacity everywhere, no pneumothorax), so every number in the report is known in advance:
both lungs fully opaque -> severity 6, every zone fraction 1.0, pneumothorax absent.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.audit import InstanceFilter
from node.results.common import model_device_uid
from tests.support.dcmtk import StoreSCP, send_as_stored, storescu, storescu_opts
from tests.support.net import wait_for
from tests.support.node import NODE_AE, SENDER_AE, NodeProcess
from tests.support.orthanc import Orthanc
from tests.support.paths import dicom_dir, dicom_manifest
from tests.support.redis import RedisServer
from tests.support.summaries import check_chains, reports_issued, settled, split
from tests.support.tiny_models import write_tiny_weights
from tests.support.validators import dciodvfy, pixelmed
from workers.api import BROKER_ENV, ModelInfo

FINAL = {"exported", "skipped", "duplicate", "rejected", "failed", "dead"}
CR_FILE = "01_cr_explicit_le_mono2_12bit_2048x2500.dcm"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_weights(
        tmp_path_factory.mktemp("weights"),
        head_logits={"lung": (6.0, None), "opacity": (6.0, None), "pneumothorax": (-6.0, -6.0)},
    )


@pytest.fixture(autouse=True)
def worker_env(tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Inherited by `cxrnode serve` and the workers it spawns.
    monkeypatch.setenv("CXRNODE_WEIGHTS_DIR", str(tiny_weights))
    monkeypatch.setenv("CXRNODE_CACHE", str(tiny_weights.parent / "cache"))
    monkeypatch.setenv("CXRNODE_WORKER_THREADS", "1")


def node_toml(
    destinations: list[str],
    *,
    reply_port: int | None = None,
    broker_url: str = "",
    embedded_worker: bool = True,
    extra_ae: str = "",
    triage: bool = False,
) -> str:
    """The [broker]/[sender] sections, the two default chest rules sending to `destinations`, extra AEs.

    Triage (on in a real node) is off unless asked for: its study summary SRs arrive a stable window
    after the images and would blur these tests' exact counts of each image's results."""
    dest = ", ".join(f'"{d}"' for d in destinations)
    reply = (
        f'\n[[ae]]\nname = "{SENDER_AE}"\nhost = "127.0.0.1"\nport = {reply_port}\nrole = "both"\n'
        if reply_port
        else ""
    )
    return (
        f'\n[broker]\nurl = "{broker_url}"\nembedded_worker = {str(embedded_worker).lower()}\n'
        f"[sender]\nbackoff_initial_s = 0.5\nbackoff_factor = 1.0\nmax_attempts = 50\ntimeout_s = 10\n"
        f'[[rules]]\nname = "chest"\ndestinations = [{dest}]\n'
        f'match = {{ modality = ["CR", "DX"], body_part = ["CHEST", ""], view_position = ["PA", "AP", ""] }}\n'
        f'[[rules]]\nname = "sc-chest"\ndestinations = [{dest}]\n'
        f'match = {{ modality = ["OT"], body_part = ["CHEST"] }}\n'
        f"{reply}{extra_ae}" + ("" if triage else "\n[triage]\nenabled = false\n")
    )


def wait_final(node: NodeProcess, count: int, timeout: float = 600) -> dict[str, str]:
    """{SOP Instance UID: state} once `count` live instances are all in a final state."""
    store = node.store()

    def done() -> bool:
        rows = store.list_instances(InstanceFilter())
        live = [r for r in rows if r.state not in ("duplicate",)]
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(f"node exited:\n{node.log_text()[-4000:]}")
        return len(live) >= count and all(r.state in FINAL for r in live)

    try:
        wait_for(done, timeout, f"{count} instances to reach a final state")
    except TimeoutError:
        states = {r.id: (r.state, r.reason) for r in store.list_instances(InstanceFilter())}
        logs = "".join(
            (node.data_dir / "logs" / n).read_text()[-3000:]
            for n in ("node-worker.log", "inference-worker.log")
            if (node.data_dir / "logs" / n).exists()
        )
        raise AssertionError(f"states: {states}\n{node.log_text()[-3000:]}\n{logs}") from None
    return {r.sop_instance_uid: r.state for r in store.list_instances(InstanceFilter()) if r.state != "duplicate"}


def send_manifest(port: int) -> dict[str, dict[str, str]]:
    """Send every file of the DICOM test set the way the manifest says; returns rows of the files sent."""
    sent: dict[str, dict[str, str]] = {}
    for row in dicom_manifest():
        path = dicom_dir() / row["file"]
        opts = storescu_opts(row)
        if opts is not None:
            storescu(port, [path], opts=opts)
        elif row["file"].startswith(("28_", "30_")):
            send_as_stored(port, path)
        else:
            continue  # 34-36: no presentation context / not DICOM: nothing reaches the node
        sent[row["file"]] = row
    return sent


def sr_numbers(sr: pydicom.Dataset) -> dict[str, float]:
    found: dict[str, float] = {}

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "NUM" and "MeasuredValueSequence" in item:
                found.setdefault(
                    item.ConceptNameCodeSequence[0].CodeMeaning, float(item.MeasuredValueSequence[0].NumericValue)
                )
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "orthanc") as pacs:
        yield pacs


def test_every_test_file_through_the_embedded_node(tmp_path: Path, orthanc: Orthanc, tiny_weights: Path) -> None:
    """All 37 files: analysable ones come back as SEG + SR in Orthanc and at the sender; the rest get none."""
    with StoreSCP(tmp_path / "reply", ae_title=SENDER_AE) as reply:
        extra = f'\n[[ae]]\nname = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\nrole = "destination"\n'
        node = NodeProcess(
            tmp_path,
            extra_toml=node_toml(["ORTHANC", "reply-to-sender"], reply_port=reply.port, extra_ae=extra, triage=True),
            sources=(),
            analysis=True,
        )
        try:
            node.start()
            sent = send_manifest(node.port)
            stored = [r for r in sent.values() if r["expect"] == "accept"]
            states = wait_final(node, len(stored))
            store = node.store()
            by_file = {}
            for row in stored:
                uid = str(
                    pydicom.dcmread(dicom_dir() / row["file"], stop_before_pixels=True, force=True).SOPInstanceUID
                )
                by_file[row["file"]] = states[uid]
            analysable = {f for f, r in sent.items() if r["analysable"] == "yes"}
            assert {f for f, s in by_file.items() if s == "exported"} == analysable, by_file
            assert {f: s for f, s in by_file.items() if f not in analysable} == {
                f: "skipped" for f in by_file if f not in analysable
            }

            # Triage: each study with an analysed image gets its summary SR (once the study is stable).
            studies = {
                str(pydicom.dcmread(dicom_dir() / f, stop_before_pixels=True, force=True).StudyInstanceUID)
                for f in analysable
            }
            wait_for(lambda: settled(store, len(studies)), 120, "every study's summary SR sent")
            # Orthanc: one SEG and one SR per analysed image, in the source's study, and the summaries.
            received = [pydicom.dcmread(io.BytesIO(orthanc.instance_file(i))) for i in orthanc.instances()]
            objects, summaries = split(received)
            assert len(objects) == 2 * len(analysable)
            assert sorted({o.Modality for o in objects}) == ["SEG", "SR"]
            chains = check_chains(summaries)
            assert set(chains) == studies
            reply_files = sorted((tmp_path / "reply").iterdir())
            assert len(reply_files) == len(received)
            # Every SEG and SR, and every study summary SR: dciodvfy without errors or warnings, PixelMed
            # without errors (known validator defects set apart in tests/support/validators.py).
            for path in reply_files:
                report = dciodvfy(path)
                assert (report.errors, report.warnings) == ([], []), report
            for report in pixelmed(reply_files):
                assert report.errors == [], report

            source = pydicom.dcmread(dicom_dir() / CR_FILE, stop_before_pixels=True)
            mine = [o for o in objects if o.StudyInstanceUID == source.StudyInstanceUID]
            seg = next(o for o in mine if o.Modality == "SEG")
            sr = next(o for o in mine if o.Modality == "SR")
            assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
            assert (
                seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
                == source.SOPInstanceUID
            )
            assert [s.SegmentLabel for s in seg.SegmentSequence][:2] == ["Right lung", "Left lung"]
            assert seg.PatientID == source.PatientID and seg.SeriesInstanceUID != source.SeriesInstanceUID
            # IHE AIR: each model that ran is Contributing Equipment, its Device UID follows its weights.
            cards = {p.stem: json.loads(p.read_text()) for p in tiny_weights.glob("*.json")}
            expected = {
                name: model_device_uid(ModelInfo(name, "", card["sha256"], "", "")) for name, card in cards.items()
            }
            for obj in (seg, sr):
                got = {str(i.ManufacturerModelName): str(i.DeviceUID) for i in obj.ContributingEquipmentSequence}
                assert got == {name: expected[name] for name in got} and {"lung", "opacity"} <= set(got), got
            assert seg.ContentDate == sr.ContentDate and seg.ContentTime == sr.ContentTime  # the analysis start

            # The SR carries the worker's numbers, as the audit log recorded them.
            inst = store.list_instances(InstanceFilter(sop_instance_uid=str(source.SOPInstanceUID)))[0]
            analyzed = next(e for e in store.list_events(instance_id=inst.id) if e.kind == "instance.analyzed")
            assert analyzed.detail["severity_score"] == 6
            numbers = sr_numbers(sr)
            severity = [v for k, v in numbers.items() if "everity" in k]
            assert severity == [6.0], numbers

            kinds = [e.kind for e in store.list_events(instance_id=inst.id)]
            for kind in (
                "instance.received",
                "instance.queued",
                "analysis.published",
                "instance.analyzed",
                "export.sent",
                "instance.exported",
            ):
                assert kind in kinds, kinds
            # SEG + SR to Orthanc and back to the sender (and the study's summaries, when this image anchors
            # them), each sent once.
            exports = store.list_exports(inst.id)
            assert sorted(e.kind for e in exports if e.kind != "study-sr") == ["seg", "seg", "sr", "sr"]
            assert kinds.count("export.sent") == len(exports)

            # A late frontal image of that study: the study is decided again and its new summary SR, in
            # the same series, replaces the latest one Orthanc has.
            late = tmp_path / "late.dcm"
            ds = pydicom.dcmread(dicom_dir() / CR_FILE)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID, ds.InstanceNumber = generate_uid(), 2
            ds.save_as(late)
            before = len(summaries)
            assert storescu(node.port, [late]).status == 0x0000
            wait_for(lambda: reports_issued(store) > before and settled(store, len(studies)), 180, "revision 2")
            mine = [
                o
                for o in (pydicom.dcmread(io.BytesIO(orthanc.instance_file(i))) for i in orthanc.instances())
                if o.StudyInstanceUID == source.StudyInstanceUID
            ]
            _, revisions = split(mine)
            study = str(source.StudyInstanceUID)
            assert check_chains(revisions) == {study: chains[study] + 1}
        finally:
            node.close()


def test_orthanc_commits_the_results_of_an_analysed_image(tmp_path: Path) -> None:
    """storescu -> node -> worker -> SEG + SR to Orthanc with storage commitment: Orthanc stores them and
    reports on a new association to the node; the results are `committed`, the instance `exported`."""
    node = NodeProcess(tmp_path, extra_toml=node_toml(["ORTHANC"]), analysis=True)
    with Orthanc(tmp_path / "orthanc", modalities={"node": (NODE_AE, "127.0.0.1", node.port)}) as pacs:
        with node.config.open("a") as config:
            config.write(
                f'\n[[ae]]\nname = "ORTHANC"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
                'role = "destination"\nstorage_commitment = true\n'
            )
        try:
            node.start()
            assert storescu(node.port, [dicom_dir() / CR_FILE]).status == 0x0000
            assert list(wait_final(node, 1).values()) == ["exported"]
            store = node.store()
            [inst] = store.list_instances(InstanceFilter())
            exports = store.list_exports(inst.id)
            assert [(e.kind, e.state) for e in exports] == [("seg", "committed"), ("sr", "committed")]
            [commitment] = store.list_commitments()
            assert commitment.state == "committed" and commitment.destination_ae == "ORTHANC"
            stored = {pacs.get_json(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in pacs.instances()}
            assert stored == {e.sop_instance_uid for e in exports}
            [report] = store.list_events(kinds=["commitment.committed"])
            assert report.detail["via"] == "new association" and report.detail["committed"] == 2
        finally:
            node.close()


def _run_inference_worker(broker_url: str, log: Path) -> subprocess.Popen[bytes]:
    """A separate worker host, as in production: `celery -A workers.tasks worker -Q inference`."""
    env = {**os.environ, BROKER_ENV: broker_url}
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.tasks",
                "worker",
                "-Q",
                "inference",
                "-c",
                "1",
                "--pool",
                "prefork",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "INFO",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.postgres
@pytest.mark.redis
def test_production_mode_redis_postgres_and_broker_outage(tmp_path: Path, postgres_server, orthanc: Orthanc) -> None:  # type: ignore[no-untyped-def]
    """Redis broker, PostgreSQL audit log, worker in its own process; the broker is down when the
    first image arrives and comes back later: the image is delivered once."""
    redis = RedisServer().start()
    worker = _run_inference_worker(redis.url, tmp_path / "worker.log")
    extra = f'\n[[ae]]\nname = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\nrole = "destination"\n'
    node = NodeProcess(
        tmp_path,
        postgres_server.create_database(),
        extra_toml=node_toml(["ORTHANC"], broker_url=redis.url, embedded_worker=False, extra_ae=extra),
        analysis=True,
    )
    try:
        node.start()
        redis.proc.terminate()  # type: ignore[union-attr]
        redis.proc.wait(10)  # type: ignore[union-attr]
        assert storescu(node.port, [dicom_dir() / CR_FILE]).status == 0x0000
        store = node.store()
        wait_for(lambda: [i.state for i in store.list_instances(InstanceFilter())] == ["queued"], 30, "queued")
        time.sleep(3)  # the outbox tries and fails while the broker is down
        assert not [e for e in store.list_events() if e.kind == "analysis.published"]

        redis.dir.mkdir(parents=True, exist_ok=True)
        redis.start()  # same port
        states = wait_final(node, 1, timeout=300)
        assert list(states.values()) == ["exported"]
        assert len(orthanc.instances()) == 2  # one SEG, one SR: delivered exactly once
        assert len([e for e in store.list_events() if e.kind == "export.sent"]) == 2
    finally:
        node.close()
        _stop(worker)
        redis.stop()


def test_destination_down_then_up_is_delivered_after_retry(tmp_path: Path) -> None:
    reply = StoreSCP(tmp_path / "late", ae_title="LATEPACS")
    extra = f'\n[[ae]]\nname = "LATEPACS"\nhost = "127.0.0.1"\nport = {reply.port}\nrole = "destination"\n'
    node = NodeProcess(tmp_path, extra_toml=node_toml(["LATEPACS"], extra_ae=extra), analysis=True)
    try:
        node.start()
        assert storescu(node.port, [dicom_dir() / "02_cr_implicit_le_12bit.dcm"]).status == 0x0000
        store = node.store()
        wait_for(lambda: any(e.kind == "export.retry" for e in store.list_events()), 300, "a failed export attempt")
        with reply:  # the destination comes up on the port it was configured with
            states = wait_final(node, 1, timeout=120)
        assert list(states.values()) == ["exported"]
        exports = store.list_exports()
        assert len(exports) == 2 and all(e.state == "sent" and e.attempts >= 2 for e in exports)
        assert len(list((tmp_path / "late").iterdir())) == 2
    finally:
        node.close()


def _children(parent: int) -> dict[int, str]:
    """{pid: command line} of the direct children of `parent`."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return found


def _pool_processes(node: NodeProcess) -> list[int]:
    """The Celery pool processes of the node's embedded inference worker."""
    assert node.proc is not None
    main = [pid for pid, cmd in _children(node.proc.pid).items() if "workers.tasks worker" in cmd]
    assert len(main) == 1, main
    return list(_children(main[0]))


def test_worker_killed_mid_task_reruns_and_delivers_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ~1 s per image: long enough to kill the pool process while it works.
    slow = write_tiny_weights(
        tmp_path / "slow",
        size=448,
        head_logits={"lung": (6.0, None), "opacity": (6.0, None), "pneumothorax": (-6.0, -6.0)},
    )
    monkeypatch.setenv("CXRNODE_WEIGHTS_DIR", str(slow))
    with StoreSCP(tmp_path / "dest", ae_title="DESTSCP") as dest:
        extra = f'\n[[ae]]\nname = "DESTSCP"\nhost = "127.0.0.1"\nport = {dest.port}\nrole = "destination"\n'
        node = NodeProcess(tmp_path, extra_toml=node_toml(["DESTSCP"], extra_ae=extra), analysis=True)
        try:
            node.start()
            worker_log = node.data_dir / "logs" / "inference-worker.log"
            assert storescu(node.port, [dicom_dir() / "02_cr_implicit_le_12bit.dcm"]).status == 0x0000
            wait_for(lambda: worker_log.exists() and ": analysing" in worker_log.read_text(), 300, "the task to start")
            children = _pool_processes(node)
            assert len(children) == 1, children
            os.kill(children[0], 9)  # the process running the task dies mid-task
            states = wait_final(node, 1, timeout=300)
            assert list(states.values()) == ["exported"]
            assert worker_log.read_text().count(": analysing") == 2  # the task ran again
            assert len(list((tmp_path / "dest").iterdir())) == 2  # one SEG + one SR, once
        finally:
            node.close()


def test_dead_letter_retry_and_reanalysis_from_the_command_line(tmp_path: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", ae_title="LATEPACS")
    extra = f'\n[[ae]]\nname = "LATEPACS"\nhost = "127.0.0.1"\nport = {dest.port}\nrole = "destination"\n'
    toml = node_toml(["LATEPACS"], extra_ae=extra).replace("max_attempts = 50", "max_attempts = 2")
    node = NodeProcess(tmp_path, extra_toml=toml, analysis=True)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli.main", *args, "--config", str(node.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        node.start()
        assert storescu(node.port, [dicom_dir() / "02_cr_implicit_le_12bit.dcm"]).status == 0x0000
        assert list(wait_final(node, 1, timeout=300).values()) == ["dead"]
        store = node.store()
        assert {e.state for e in store.list_exports()} == {"dead"}
        listed = cli("exports", "list", "--state", "dead", "--json")
        assert [e["state"] for e in json.loads(listed.stdout)] == ["dead", "dead"]
        assert all(e.last_error.startswith("cannot connect to LATEPACS") for e in store.list_exports())
        with dest:
            result = cli("exports", "retry", "--all-dead")
            assert result.returncode == 0, result.stderr
            wait_for(
                lambda: [i.state for i in store.list_instances(InstanceFilter())] == ["exported"],
                120,
                "delivery after retry",
            )
            assert len(list((tmp_path / "dest").iterdir())) == 2
            inst = store.list_instances(InstanceFilter())[0]
            result = cli("reanalyze", str(inst.id))
            assert result.returncode == 0, result.stderr
            wait_for(lambda: len(list((tmp_path / "dest").iterdir())) == 4, 300, "the second result set")
            assert list(wait_final(node, 1, timeout=120).values()) == ["exported"]
        kinds = [e.kind for e in store.list_events(instance_id=inst.id)]
        assert kinds.count("export.dead") == 2 and kinds.count("export.requeued") == 2
        assert kinds.count("instance.analyzed") == 2
    finally:
        node.close()
