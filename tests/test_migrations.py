from io import StringIO

import pytest
from django.core.management import call_command


@pytest.mark.django_db
def test_it_has_no_pending_migrations():
    out = StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=StringIO())
    except SystemExit as exc:  # makemigrations --check exits 1 when changes are missing
        pytest.fail(f"pending migrations (exit {exc.code}):\n{out.getvalue()}")
