"""Login throttling (django-axes): five failures for one username from one address lock that
pair out for the cool-off, even with the right password; a success resets the count."""

import io
from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

pytestmark = pytest.mark.django_db
PASSWORD = "a correct horse battery"


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("alice", password=PASSWORD)


def log_in(client, password, username="alice"):
    return client.post(reverse("login"), {"username": username, "password": password})


def logged_in(client) -> bool:
    return "_auth_user_id" in client.session


def test_it_locks_a_username_out_after_five_failures(client, user):
    for _ in range(6):
        log_in(client, "wrong")
    response = log_in(client, PASSWORD)
    assert response.status_code == 429
    assert not logged_in(client)
    page = response.content.decode()
    assert "Too many failed logins" in page and "after 5 failed attempts" in page
    assert "Try again in 15 minutes" in page


def test_it_lets_the_user_in_after_a_reset(client, user):
    for _ in range(6):
        log_in(client, "wrong")
    call_command("axes_reset_username", "alice", stdout=io.StringIO())
    assert log_in(client, PASSWORD).status_code == 302
    assert logged_in(client)


def test_it_lets_the_user_in_after_the_cool_off(client, user):
    for _ in range(5):
        log_in(client, "wrong")
    assert log_in(client, PASSWORD).status_code == 429
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=16))
    assert log_in(client, PASSWORD).status_code == 302


def test_it_resets_the_count_on_success(client, user):
    for _ in range(4):
        log_in(client, "wrong")
    assert log_in(client, PASSWORD).status_code == 302
    client.post(reverse("logout"))
    for _ in range(4):
        log_in(client, "wrong")
    assert log_in(client, PASSWORD).status_code == 302


def test_it_locks_the_pair_not_the_user_everywhere(user):
    attacker, alice = Client(REMOTE_ADDR="192.0.2.66"), Client(REMOTE_ADDR="192.0.2.10")
    for _ in range(6):
        log_in(attacker, "wrong")
    assert log_in(attacker, PASSWORD).status_code == 429
    assert log_in(alice, PASSWORD).status_code == 302


def test_it_still_lets_tests_log_in_with_force_login(client, user):
    client.force_login(user)
    assert logged_in(client)
