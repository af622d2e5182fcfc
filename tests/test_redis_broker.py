"""REDIS_URL makes Redis django-q2's broker: the settings select it, and a task enqueued by
one process is run by a real ``qcluster`` through it. Needs Redis at 127.0.0.1:6379 (the
test machine runs one); database 15, and a queue named for this test only."""

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

BASE = Path(__file__).resolve().parent.parent
URL = "redis://127.0.0.1:6379/15"


def redis_answers() -> bool:
    try:
        return redis.from_url(URL, socket_connect_timeout=2).ping()
    except redis.RedisError:
        return False


pytestmark = pytest.mark.skipif(not redis_answers(), reason="no Redis at 127.0.0.1:6379")


@pytest.fixture
def environment(tmp_path):
    cluster = f"vmbt-redis-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMBACKUP_", "Q_"))}
    env.pop("DATABASE_URL", None)
    env.update(
        VMBACKUP_DATA_DIR=str(tmp_path),
        SECRET_KEY=secrets.token_urlsafe(50),
        REDIS_URL=URL,
        Q_CLUSTER_NAME=cluster,  # the queue's key: django_q:<cluster>:q
        Q_WORKERS="1",
        DJANGO_SETTINGS_MODULE="vmbackup_site.settings",
    )
    yield env
    redis.from_url(URL).delete(f"django_q:{cluster}:q")


def python(env, code: str, timeout=60) -> str:
    done = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup()\n{code}"],
        cwd=BASE,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_it_selects_the_redis_broker_when_redis_url_is_set(environment):
    code = (
        "from django.conf import settings; from django_q.brokers import get_broker\n"
        "b = get_broker(); print(type(b).__module__, 'orm' in settings.Q_CLUSTER, b.ping())"
    )
    assert python(environment, code) == "django_q.brokers.redis_broker False True"


@pytest.mark.timeout(90)
def test_it_runs_a_task_through_redis_with_a_real_cluster(environment, tmp_path):
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=BASE,
        env=environment,
        check=True,
        capture_output=True,
        timeout=120,
    )
    log = (tmp_path / "qcluster.log").open("w")
    cluster = subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"],
        cwd=BASE,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        begin = time.monotonic()
        code = (
            "from django_q.tasks import async_task, result\n"
            "task = async_task('math.floor', 2.5)\n"
            "print(result(task, wait=15000))"
        )
        assert python(environment, code) == "2", (tmp_path / "qcluster.log").read_text()
        assert time.monotonic() - begin < 20
    finally:
        cluster.send_signal(signal.SIGTERM)  # the main process only, as the units do
        try:
            cluster.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(cluster.pid, signal.SIGKILL)
            cluster.wait(timeout=10)
        log.close()
