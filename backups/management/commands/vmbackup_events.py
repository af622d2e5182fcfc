import os
import signal
import threading

from django.core.management.base import BaseCommand, CommandError

from backups import live_inventory
from backups.models import Host


class Command(BaseCommand):
    help = (
        "Keep the inventory live: follow libvirt's domain events of this worker's hosts "
        "(those whose cluster is $Q_CLUSTER_NAME, or without one) until stopped."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--host", action="append", default=[], help="follow this host (by name; repeatable)"
        )

    def handle(self, *args, host=(), **options):
        if host:
            hosts = list(Host.objects.filter(name__in=host))
            missing = sorted(set(host) - {h.name for h in hosts})
            if missing:
                raise CommandError("no host named " + ", ".join(missing))
        else:
            hosts = live_inventory.hosts_for(os.environ.get("Q_CLUSTER_NAME", ""))
        if not hosts:
            raise CommandError("no host to follow (is Q_CLUSTER_NAME a Host's cluster?)")
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: stop.set())
        self.stdout.write("following " + ", ".join(h.name for h in hosts))
        self.stdout.flush()
        threads = live_inventory.follow(hosts, stop)
        while not stop.wait(1):
            if not any(t.is_alive() for t in threads):
                raise CommandError("every follower ended")
        for thread in threads:
            thread.join(timeout=10)
        self.stdout.write("stopped")
