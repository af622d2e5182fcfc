"""Scale-out, proven end to end: two real ``manage.py qcluster`` processes, each named after
a Host's ``cluster`` field, on one PostgreSQL database (a database of this test's own, made
from a migrated template and dropped afterwards), with the ORM broker and then Redis.

Each host's backup runs and per-cluster schedules run on its own cluster only; a cluster
stopped by SIGTERM (ending cleanly) leaves its host's new runs queued and shown as "waiting
for a worker on HOST" while the other host's runs go on; started again, it drains them.

Both Hosts point at this machine's libvirtd, each with a domain of its own: the VM row is
made from libvirt by ``inventory.sync_domain`` (what the live inventory does when an event
names one domain). A full sync is never run: it would list every domain under both hosts.
The test process talks to the same database through its default connection, swapped to
PostgreSQL for the test, so requests, pages and checks are the application's own.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connections
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_q.conf import Conf
from django_q.models import Schedule, Task

from backups import hypervisor, inventory, requests, waiting
from backups.models import BackupRun, Host, RunStatus, VirtualMachine
from tests.domains import URI, DiskSpec
from tests.helpers import descendants, wait_until

BASE_DIR = Path(__file__).resolve().parent.parent
PG = urlsplit(
    os.environ.get("VMBACKUP_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/vmbackup")
)
REDIS_DB = 14  # this test's own index: flushed before and after
STOP_BOUND = 30  # seconds a cluster may take to end after SIGTERM (it is given 20)
DONE = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.INTERRUPTED, RunStatus.CANCELLED}


def admin() -> psycopg.Connection:
    """A connection to the server's maintenance database, to create and drop others."""
    return psycopg.connect(
        host=PG.hostname,
        port=PG.port or 5432,
        user=PG.username,
        password=PG.password or None,
        dbname="postgres",
        autocommit=True,
        connect_timeout=3,
    )


def admin_sql(statement: str) -> None:
    with admin() as conn:
        conn.execute(statement)


def database_name() -> str:
    """Named after this process, so a later run knows when its maker is gone."""
    return f"vmbt_scale_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def sweep_databases() -> None:
    """Drop the databases a killed earlier run left (their process is gone)."""
    with admin() as conn:
        names = [row[0] for row in conn.execute("SELECT datname FROM pg_database")]
    for name in names:
        made_by = re.fullmatch(r"vmbt_scale_(\d+)_[0-9a-f]{8}", name)
        if made_by and not Path(f"/proc/{made_by[1]}").exists():
            admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_answers() -> bool:
    try:
        admin_sql("SELECT 1")
    except psycopg.Error:
        return False
    return True


def redis_url() -> str:
    """``REDIS_URL``'s server (else this machine's), at this test's own database index."""
    parts = urlsplit(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    return urlunsplit(parts._replace(path=f"/{REDIS_DB}", query=""))


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


pytestmark = [
    pytest.mark.skipif(
        not postgres_answers(), reason="no PostgreSQL at VMBACKUP_TEST_POSTGRES_URL"
    ),
]


def database_url(name: str) -> str:
    auth = PG.username + (f":{PG.password}" if PG.password else "")
    return f"postgres://{auth}@{PG.hostname}:{PG.port or 5432}/{name}"


def environment(data_dir: Path, database: str, **extra: str) -> dict[str, str]:
    """What a worker host's processes get: this database, this test's secret key (django-q2
    signs tasks with it), mail kept in memory, nothing of the caller's configuration."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VMBACKUP_", "Q_")) and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="vmbackup_site.settings",
        DATABASE_URL=database_url(database),
        SECRET_KEY=settings.SECRET_KEY,
        VMBACKUP_DATA_DIR=str(data_dir),
        EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def manage(env: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr


class Cluster:
    """One ``manage.py qcluster`` serving the queue ``name``, in its own process group."""

    def __init__(self, name: str, env: dict[str, str], log: Path):
        self.name, self.log_path = name, log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "manage.py", "qcluster"],
                cwd=BASE_DIR,
                env={**env, "Q_CLUSTER_NAME": name},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pids: set[int] = set()  # every process of the cluster seen so far

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_running(self) -> None:
        def running() -> bool:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
            return " running." in self.log_path.read_text(errors="replace")

        wait_until(running, 60, lambda: f"{self.name} did not start:\n{self.log()}", 0.2)

    def runs(self, holder: str) -> bool:
        """Whether ``host:pid`` (a job's worker) is a process of this cluster."""
        self.pids |= descendants(self.proc.pid)
        return int(holder.rpartition(":")[2]) in self.pids

    def terminate(self) -> float:
        """SIGTERM to the whole group, as systemd's stop; returns how long it took."""
        begin = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_BOUND)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} still running {STOP_BOUND} s after SIGTERM:\n{self.log()}")
        assert code == 0, f"{self.name} ended with {code}:\n{self.log()}"
        return time.monotonic() - begin

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@contextmanager
def default_database(name: str):
    """This process's default connection, to the PostgreSQL database ``name`` meanwhile."""
    old_settings, old_connection = connections.settings["default"], connections["default"]
    connections.settings["default"] = {
        **old_settings,
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": PG.username,
        "PASSWORD": PG.password or "",
        "HOST": PG.hostname,
        "PORT": str(PG.port or 5432),
        "OPTIONS": {},
    }
    connections["default"] = connections.create_connection("default")
    try:
        yield
    finally:
        connections["default"].close()
        connections.settings["default"], connections["default"] = old_settings, old_connection


@pytest.fixture(scope="module")
def template_database(tmp_path_factory):
    """A migrated database with the cache table; each test copies it (migrate runs once)."""
    sweep_databases()
    name = database_name()
    admin_sql(f'CREATE DATABASE "{name}"')
    try:
        env = environment(tmp_path_factory.mktemp("template"), name)
        manage(env, "migrate", "--noinput")
        manage(env, "createcachetable")
        yield name
    finally:
        admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Site:
    """The shared database and what runs against it: the hosts' clusters and a web client."""

    env: dict[str, str]
    tmp: Path
    clusters: list[Cluster] = field(default_factory=list)

    def host(self, letter: str) -> Host:
        token = uuid.uuid4().hex[:6]
        return Host.objects.create(
            name=f"hv-{letter}-{token}", uri=URI, cluster=f"vmbt-{letter}-{token}"
        )

    def vm(self, host: Host, dom) -> VirtualMachine:
        with hypervisor.session(host.uri) as hv:
            assert inventory.sync_domain(host, dom.uuid, hv) == "added"
        return VirtualMachine.objects.get(host=host, uuid=dom.uuid)

    def start(self, *names: str, wait: bool = True) -> list[Cluster]:
        started = [Cluster(n, self.env, self.tmp / f"{n}.log") for n in names]
        self.clusters += started
        for cluster in started if wait else []:
            cluster.wait_running()
        return started


@pytest.fixture(params=["orm", "redis"])
def site(
    request, template_database, domains, backup_root, tmp_path, monkeypatch, django_db_blocker
):
    """A database of this test's own on PostgreSQL (and, for ``redis``, Redis as the broker,
    at this test's own index), this process connected to it; every cluster started is
    killed, the database dropped and the Redis index flushed at the end."""
    extra = {
        "VMBACKUP_ROOT": str(backup_root),
        "Q_WORKERS": "1",
        "VMBACKUP_WORKER_STOP_TIMEOUT": "20",
    }
    if request.param == "redis":
        url = redis_url()
        if not redis_answers(url):
            pytest.skip(f"no Redis at {url}")
        redis.from_url(url).flushdb()
        extra["REDIS_URL"] = url
        monkeypatch.setattr(Conf, "ORM", None)  # this process enqueues through Redis too
        monkeypatch.setattr(Conf, "REDIS", url)
    name = database_name()
    admin_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    data = tmp_path / "data"
    data.mkdir()
    the_site = Site(environment(data, name, **extra), tmp_path)
    try:
        with django_db_blocker.unblock(), default_database(name):
            yield the_site
    finally:
        for cluster in the_site.clusters:
            cluster.kill()
        admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if request.param == "redis":
            redis.from_url(redis_url()).flushdb()


def tiny():
    return [DiskSpec("vda", "qcow2", 8, [(0, 1, 0xA1)])]


def finished(run: BackupRun, clusters: list[Cluster]) -> BackupRun:
    def done():
        run.refresh_from_db()
        return run.status in DONE

    logs = lambda: "\n".join(c.log() for c in clusters)  # noqa: E731
    wait_until(done, 90, lambda: f"run {run.pk} still {run.status}:\n{logs()}", 0.2)
    assert run.status == RunStatus.SUCCEEDED, f"{run.error}\n{logs()}"
    return run


def task_of(run: BackupRun) -> Task:
    """The run's finished task (the monitor saves it a moment after the job has ended)."""
    found = lambda: Task.objects.filter(name=f"backup-{run.pk}").first()  # noqa: E731
    return wait_until(found, 30, f"no task saved for run {run.pk}", 0.2)


@pytest.mark.libvirt
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_it_runs_each_hosts_jobs_on_its_own_cluster_and_drains_a_stopped_one(site, domains):
    begin = time.monotonic()
    a, b = site.host("a"), site.host("b")
    cluster_a, cluster_b = site.start(a.cluster, b.cluster, wait=False)  # booting meanwhile
    vm_a, vm_b = site.vm(a, domains.create(tiny())), site.vm(b, domains.create(tiny()))
    call_command("vmbackup_schedules", stdout=io.StringIO())
    alerts = {h.cluster: f"vmbackup-alerts@{h.cluster}" for h in (a, b)}
    due = timezone.now() - timedelta(minutes=1)
    assert Schedule.objects.filter(name__in=alerts.values()).update(next_run=due) == 2
    for cluster in (cluster_a, cluster_b):
        cluster.wait_running()

    # each host's run runs on its own cluster, taken from its own queue
    run_a = requests.request_backup(vm_a, method="offline")
    run_b = requests.request_backup(vm_b, method="offline")
    for run, host, cluster in ((run_a, a, cluster_a), (run_b, b, cluster_b)):
        finished(run, site.clusters)
        assert cluster.runs(run.worker), (run.worker, host.cluster)
        assert task_of(run).cluster == host.cluster and task_of(run).success

    # B stopped: A's runs go on; B's wait, visibly, their task held in B's queue
    stop_took = cluster_b.terminate()
    b_schedule = Schedule.objects.get(name=alerts[b.cluster]).next_run
    b_tasks = list(Task.objects.filter(group=alerts[b.cluster]).values_list("cluster", flat=True))
    Schedule.objects.create(  # a ONCE schedule: its result is the pid of the worker that ran it
        name=f"pid@{a.cluster}", func="os.getpid", cluster=a.cluster, next_run=due
    )
    waiting_run = requests.request_backup(vm_b, method="offline")
    run_a2 = finished(requests.request_backup(vm_a, method="offline"), site.clusters)
    assert cluster_a.runs(run_a2.worker)

    # A's schedules run on A (its scheduler's first pass comes 30 s after it started) ...
    def ran(group: str) -> Task | None:
        return Task.objects.filter(group=group).first()

    message = lambda: cluster_a.log()  # noqa: E731
    pid_task = wait_until(lambda: ran(f"pid@{a.cluster}"), 75, message, 0.5)
    assert pid_task.cluster == a.cluster and cluster_a.runs(f"x:{pid_task.result}")
    alerts_a = wait_until(lambda: ran(alerts[a.cluster]), 30, message, 0.5)
    assert alerts_a.success and alerts_a.cluster == a.cluster, message()
    # ... and B's are left to B: A's scheduler has passed since B stopped, taking nothing
    assert Schedule.objects.get(name=alerts[b.cluster]).next_run == b_schedule
    assert list(Task.objects.filter(group=alerts[b.cluster]).values_list("cluster", flat=True)) == (
        b_tasks
    )
    assert set(b_tasks) <= {b.cluster}

    waiting_run.refresh_from_db()
    assert waiting_run.status == RunStatus.QUEUED and not waiting_run.worker
    owner = get_user_model().objects.create_superuser("olivia", "olivia@example.com")
    client = Client()
    client.force_login(owner)
    page = client.get(reverse("run_detail", args=[waiting_run.pk])).content.decode()
    assert f"waiting for a worker on {b.name}" in page
    later = timezone.now() + timedelta(seconds=settings.VMBACKUP_QUEUED_ALERT_AFTER + 60)
    found = waiting.check(b.cluster, now=later)  # reported, not requeued: B's queue holds it
    assert [(w.run.pk, w.requeued) for w in found] == [(waiting_run.pk, False)]

    # B again: it drains its queue
    (cluster_b2,) = site.start(b.cluster)
    finished(waiting_run, site.clusters)
    assert cluster_b2.runs(waiting_run.worker)
    assert task_of(waiting_run).cluster == b.cluster
    assert not cluster_a.runs(waiting_run.worker) and not cluster_a.runs(run_b.worker)
    for cluster in (cluster_a, cluster_b2):
        cluster.terminate()
    print(
        f"scale-out ({'redis' if 'REDIS_URL' in site.env else 'orm'}): "
        f"{time.monotonic() - begin:.1f} s, stopping a cluster {stop_took:.1f} s"
    )
