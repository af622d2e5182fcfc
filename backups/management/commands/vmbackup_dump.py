from django.core.management.base import BaseCommand, CommandError

from backups import dump


class Command(BaseCommand):
    help = (
        "Copy the dashboard's database into <VMBACKUP_ROOT>/.vmbackup-db/ (private) and keep "
        "the newest VMBACKUP_DUMP_KEEP; the last line is the dump's path."
    )

    def add_arguments(self, parser):
        parser.add_argument("--keep", type=int, default=None, help="dumps to keep (0: all)")

    def handle(self, *args, keep=None, **options):
        try:
            result = dump.dump_database(keep)
        except (dump.DumpError, OSError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(result.split(" (", 1)[0])
