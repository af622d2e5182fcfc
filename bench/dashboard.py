"""Server time of the dashboard's busiest pages on a big inventory.

Seeds 1,000 VMs (on 4 hosts), 100,000 runs and 20,000 backups into a throwaway SQLite database
(the embedded default) and times the overview, one VM page and the run list in-process
through Django's test client (server time: URL routing, views, queries, templates; no
network); also the overview's last page of a search (``overview-q``, out of range pages show
the last). Prints median and p95 per page; the last line is
``overview_p50_ms=<a> vm_p50_ms=<b> runs_p50_ms=<c>``. Target: each median <= 150 ms.

    .venv/bin/python bench/dashboard.py [--vms 1000] [--runs 100000] [--requests 30]
    .venv/bin/python bench/dashboard.py --smoke   # 20 VMs, 200 runs, 1 request: does it run?
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
import uuid
from datetime import timedelta

from _common import close_django, scratch_dir, setup_django

SMOKE = {"vms": 20, "runs": 200, "requests": 1}  # the smallest run (make bench-smoke)


def seed(vms: int, runs: int) -> tuple[int, int]:
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from backups.models import Backup, BackupPolicy, BackupRun, Disk, Host, VirtualMachine

    now = timezone.now()
    hosts = [
        Host.objects.create(name=f"host{i}", uri=f"qemu+ssh://host{i}/system") for i in range(4)
    ]
    machines = VirtualMachine.objects.bulk_create(
        VirtualMachine(host=hosts[i % 4], uuid=uuid.uuid4(), name=f"vm-{i:04d}", state="running")
        for i in range(vms)
    )
    Disk.objects.bulk_create(
        Disk(
            vm=vm,
            target=t,
            source=f"/var/lib/libvirt/images/{vm.name}-{t}.qcow2",
            format="qcow2",
            virtual_size=20 << 30,
        )  # fmt: skip
        for vm in machines
        for t in ("vda", "vdb")
    )
    policy = BackupPolicy.objects.create(name="nightly", schedule="0 2 * * *")
    policy.vms.add(*machines)
    per_vm = runs // vms
    statuses = ["succeeded"] * 8 + ["failed", "interrupted"]
    batch = []
    for vm in machines:
        for j in range(per_vm):
            started = now - timedelta(days=per_vm - j)
            batch.append(
                BackupRun(
                    vm=vm,
                    policy=policy,
                    status=statuses[j % 10],
                    method="push",
                    created_at=started,
                    started_at=started,
                    finished_at=started + timedelta(minutes=7),
                    bytes_done=1 << 30,
                    bytes_total=1 << 30,
                    bytes_written=1 << 30,
                    journal=[{"at": started.isoformat(), "step": "copy"}],
                )  # fmt: skip
            )
        if len(batch) >= 20000:
            BackupRun.objects.bulk_create(batch)
            batch = []
    BackupRun.objects.bulk_create(batch)
    backups = []
    for vm in machines:
        for j in range(20):
            created = now - timedelta(days=20 - j)
            backups.append(
                Backup(
                    vm=vm,
                    path=f"/var/backups/vms/{vm.name}/{created:%Y%m%dT%H%M%SZ}-{j}",
                    created_at=created,
                    kind="full" if j % 7 == 0 else "incremental",
                    method="push",
                    consistency="crash-consistent",
                    size_bytes=(1 << 30) // 7,
                    verify_status="ok",
                )  # fmt: skip
            )
    Backup.objects.bulk_create(backups, batch_size=5000)
    get_user_model().objects.create_superuser("bench", "", "bench-password-1")
    return machines[vms // 2].pk, BackupRun.objects.count()


def measure(client, url: str, requests: int) -> list[float]:
    client.get(url)  # warm caches (templates, query plans)
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    return times


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="smallest inventory, one request")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.vms < 2 or args.runs < args.vms or args.requests < 1:
        parser.error("--vms must be >= 2, --runs >= --vms, --requests >= 1")
    scratch = scratch_dir()
    try:
        setup_django(scratch)
        from django.conf import settings
        from django.contrib.auth import get_user_model
        from django.test import Client
        from django.test.utils import setup_test_environment

        settings.ALLOWED_HOSTS = ["testserver"]
        setup_test_environment()
        start = time.perf_counter()
        vm_id, run_count = seed(args.vms, args.runs)
        print(f"seeded {args.vms} VMs, {run_count} runs in {time.perf_counter() - start:.1f}s")
        client = Client()
        # force_login: the login throttle's backend wants a real request to authenticate
        client.force_login(get_user_model().objects.get(username="bench"))
        pages = {"overview": "/", "vm": f"/vms/{vm_id}/", "runs": "/runs/"}
        # Not in the last line: the overview's last page of a search, which must not cost more.
        extra = {"overview-q": f"/?q=vm-&page={args.vms}"}
        results = {name: measure(client, url, args.requests) for name, url in pages.items()}
        results.update({name: measure(client, url, args.requests) for name, url in extra.items()})
        print(f"{'page':10} {'p50 ms':>8} {'p95 ms':>8}")
        for name, times in results.items():
            print(f"{name:10} {statistics.median(times):8.1f} {p95(times):8.1f}")
        print(" ".join(f"{name}_p50_ms={statistics.median(results[name]):.1f}" for name in pages))
        return 0
    finally:
        close_django()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
