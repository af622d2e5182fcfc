"""Production settings: one switch (VMBACKUP_HTTPS) for running behind a TLS proxy, checked
with Django's own ``check --deploy`` in a fresh process, as an operator would run it."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings

BASE = Path(__file__).resolve().parent.parent
# Domain-wide HSTS choices Django always suggests: includeSubDomains and preload bind every
# host of the domain (often not ours), so they are opt-in (SECURE_HSTS_INCLUDE_SUBDOMAINS,
# SECURE_HSTS_PRELOAD) rather than defaults.
JUSTIFIED = {"security.W005", "security.W021"}


def run(tmp_path, code: list[str], **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VMBACKUP_", "SECURE_"))}
    clean.pop("DATABASE_URL", None)
    clean.pop("DEBUG", None)
    clean.update(VMBACKUP_DATA_DIR=str(tmp_path), SECRET_KEY=secrets.token_urlsafe(50), **env)
    return subprocess.run(
        [sys.executable, *code], cwd=BASE, env=clean, capture_output=True, text=True, timeout=60
    )


def deploy_warnings(tmp_path, **env) -> set[str]:
    result = run(tmp_path, ["manage.py", "check", "--deploy"], **env)
    output = result.stdout + result.stderr
    return {line.split("(")[1].split(")")[0] for line in output.splitlines() if ": (" in line}


def settings_in_process(tmp_path, names: list[str], **env) -> dict:
    code = (
        "import django, json, os; os.environ['DJANGO_SETTINGS_MODULE']='vmbackup_site.settings';"
        "django.setup(); from django.conf import settings as s;"
        f"print(json.dumps({{n: getattr(s, n, None) for n in {names!r}}}, default=str))"
    )
    result = run(tmp_path, ["-c", code], **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_it_passes_check_deploy_behind_https_but_for_domain_wide_hsts(tmp_path):
    assert deploy_warnings(tmp_path, VMBACKUP_HTTPS="true") == JUSTIFIED


def test_it_passes_check_deploy_with_no_warning_once_the_domain_opts_in(tmp_path):
    on = {"SECURE_HSTS_INCLUDE_SUBDOMAINS": "true", "SECURE_HSTS_PRELOAD": "true"}
    assert deploy_warnings(tmp_path, VMBACKUP_HTTPS="true", **on) == set()


def test_it_warns_without_the_switch(tmp_path):
    assert {"security.W004", "security.W012", "security.W016"} <= deploy_warnings(tmp_path)


def test_it_sets_secure_cookies_hsts_and_the_proxy_header_on_one_switch(tmp_path):
    names = [
        "SECURE_PROXY_SSL_HEADER",
        "SECURE_SSL_REDIRECT",
        "SECURE_HSTS_SECONDS",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
    ]
    on = settings_in_process(tmp_path, names, VMBACKUP_HTTPS="true")
    assert on == {
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
        "SECURE_SSL_REDIRECT": True,
        "SECURE_HSTS_SECONDS": 31536000,
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
    }
    off = settings_in_process(tmp_path, names)
    assert off["SECURE_PROXY_SSL_HEADER"] is None and off["SESSION_COOKIE_SECURE"] is False


def test_it_takes_the_session_age_and_the_roots_from_the_environment(tmp_path):
    names = ["SESSION_COOKIE_AGE", "VMBACKUP_ROOTS", "VMBACKUP_ALLOW_TEST_URI"]
    values = settings_in_process(tmp_path, names, VMBACKUP_ROOT="/srv/main")
    assert values == {
        "SESSION_COOKIE_AGE": 8 * 3600,
        "VMBACKUP_ROOTS": ["/srv/main"],
        "VMBACKUP_ALLOW_TEST_URI": False,
    }
    env = {"SESSION_COOKIE_AGE": "3600", "VMBACKUP_ROOTS": "/srv/main, /srv/nas"}
    values = settings_in_process(tmp_path, names, **env)
    assert values["SESSION_COOKIE_AGE"] == 3600
    assert values["VMBACKUP_ROOTS"] == ["/srv/main", "/srv/nas"]


@pytest.mark.parametrize(
    "validator",
    [
        "UserAttributeSimilarityValidator",
        "MinimumLengthValidator",
        "CommonPasswordValidator",
        "NumericPasswordValidator",
    ],
)
def test_it_uses_every_password_validator_django_ships(validator):
    names = {v["NAME"].rsplit(".", 1)[1] for v in django_settings.AUTH_PASSWORD_VALIDATORS}
    assert validator in names


def test_it_passes_check_deploy_with_the_production_env_file(tmp_path):
    """deploy/vmbackup.env.example, as install.sh writes it, is production-ready."""
    (tmp_path / "secret_key").write_text(secrets.token_urlsafe(50))
    env = {}
    for raw in (BASE / "deploy/vmbackup.env.example").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value.replace("/etc/vmbackup/", f"{tmp_path}/")
    env.pop("VMBACKUP_DATA_DIR")  # run() gives each test its own
    assert env["VMBACKUP_HTTPS"] == "true" and env["SECRET_KEY_FILE"].startswith(str(tmp_path))
    assert deploy_warnings(tmp_path, **env) == JUSTIFIED
