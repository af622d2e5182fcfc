"""Every route of the site, admin and ``/metrics`` included, is classified here, and each is
checked against its class: who may reach it anonymously, which methods it takes, and that a
POST without a CSRF token is refused. A route added without a row here fails the first test.
"""

import fnmatch
import re

import pytest
from django.test import Client
from django.urls import URLResolver, get_resolver, reverse

PUBLIC = "public"  # reachable without logging in; the row says what an anonymous GET gets
LOGIN = "login"  # the login page for visitors; any logged-in user
PERMISSION = "permission"  # the login page for visitors, 403 without the permission
ADMIN = "admin"  # Django's admin: staff only; others are sent to a login page

READ = "read"  # GET only: other methods 405
FORM = "form"  # GET shows a form, POST (with the CSRF token) submits it
POST = "post"  # POST only: GET 405
ADMIN_VIEW = "admin view"  # the admin's GET/POST views, protected by its CSRF check

# name (namespace:name; unnamed routes by their full route) -> (class, methods, anonymous GET)
ROUTES = {
    "login": (PUBLIC, FORM, 200),
    "logout": (LOGIN, POST, None),
    "metrics": (PUBLIC, READ, 401),  # a bearer token or a logged-in viewer
    "admin:login": (PUBLIC, FORM, 200),
    "overview": (PERMISSION, READ, None),
    "host_detail": (PERMISSION, READ, None),
    "vm_detail": (PERMISSION, READ, None),
    "vm_backup": (PERMISSION, POST, None),
    "run_list": (PERMISSION, READ, None),
    "run_detail": (PERMISSION, READ, None),
    "run_progress": (PERMISSION, READ, None),
    "run_cancel": (PERMISSION, POST, None),
    "backup_detail": (PERMISSION, READ, None),
    "backup_verify": (PERMISSION, POST, None),
    "backup_protect": (PERMISSION, POST, None),
    "backup_manifest": (PERMISSION, READ, None),
    "backup_restore_md": (PERMISSION, READ, None),
    "backup_restore_sh": (PERMISSION, READ, None),
    "backup_restore": (PERMISSION, FORM, None),
    "backup_restore_in_place": (PERMISSION, FORM, None),
    "backup_restore_disk": (PERMISSION, POST, None),
    "restore_list": (PERMISSION, READ, None),
    "restore_detail": (PERMISSION, READ, None),
    "restore_cancel": (PERMISSION, POST, None),
    "restore_progress": (PERMISSION, READ, None),
    "vm_drill": (PERMISSION, POST, None),
    "backup_drill": (PERMISSION, POST, None),
    "drill_detail": (PERMISSION, READ, None),
    "drill_progress": (PERMISSION, READ, None),
    "drill_screenshot": (PERMISSION, READ, None),
    "policy_list": (PERMISSION, READ, None),
    "policy_create": (PERMISSION, FORM, None),
    "policy_edit": (PERMISSION, FORM, None),
    "backup_copy": (PERMISSION, POST, None),
    "copy_list": (PERMISSION, READ, None),
    "copy_detail": (PERMISSION, READ, None),
    "copy_progress": (PERMISSION, READ, None),
    "copy_cancel": (PERMISSION, POST, None),
    "admin:index": (ADMIN, ADMIN_VIEW, None),
    "admin:logout": (ADMIN, ADMIN_VIEW, None),
    "admin:password_change": (ADMIN, ADMIN_VIEW, None),
    "admin:password_change_done": (ADMIN, ADMIN_VIEW, None),
    "admin:autocomplete": (ADMIN, ADMIN_VIEW, None),
    "admin:jsi18n": (ADMIN, ADMIN_VIEW, None),
    "admin:view_on_site": (ADMIN, ADMIN_VIEW, None),
    "admin:app_list": (ADMIN, ADMIN_VIEW, None),
    "admin:auth_user_password_change": (ADMIN, ADMIN_VIEW, None),
    "admin:admin/(?P<url>.*)$": (ADMIN, ADMIN_VIEW, None),  # the admin's catch-all
}
# Every ModelAdmin brings the same five views and a redirect; the admin guards them all.
ADMIN_MODEL_ROUTES = [
    "admin:*_changelist",
    "admin:*_add",
    "admin:*_history",
    "admin:*_delete",
    "admin:*_change",
    "admin:admin/*/*/<path:object_id>/",
]
# What the owner's GET of each form route gets: the form; 404 where the sample id does not
# exist; the admin's login page sends a logged-in staff member on to the admin's index.
FORM_GET = {
    "login": 200,
    "admin:login": 302,
    "policy_create": 200,
    "policy_edit": 404,
    "backup_restore": 404,
    "backup_restore_in_place": 404,
}
SAMPLES = {"object_id": "999999", "id": "999999", "content_type_id": "1", "url": "nowhere/"}
SAMPLES["app_label"] = "backups"


def _walk(resolver, prefix: str = "", namespace: str = ""):
    for pattern in resolver.url_patterns:
        if isinstance(pattern, URLResolver):
            inner = namespace + (f"{pattern.namespace}:" if pattern.namespace else "")
            yield from _walk(pattern, prefix + str(pattern.pattern), inner)
        else:
            route = prefix + str(pattern.pattern)
            yield (namespace + (pattern.name or route)), route


ALL_ROUTES = dict(_walk(get_resolver()))


def classify(key: str):
    if key in ROUTES:
        return ROUTES[key]
    if any(fnmatch.fnmatchcase(key, rule) for rule in ADMIN_MODEL_ROUTES):
        return (ADMIN, ADMIN_VIEW, None)
    return None


def sample_url(route: str) -> str:
    """The route with each parameter filled in (ids that do not exist), as a path."""
    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: SAMPLES[m[1]], route)
    path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: SAMPLES.get(m[1], "999999"), path)
    return "/" + path.replace("^", "").replace("$", "")


def test_it_classifies_every_route():
    unclassified = sorted(key for key in ALL_ROUTES if classify(key) is None)
    assert unclassified == [], "classify these routes in tests/test_urlconf.py"
    stale = sorted(set(ROUTES) - set(ALL_ROUTES))
    assert stale == [], "these classified routes no longer exist"


def test_it_walks_the_admin_and_metrics_too():
    assert "metrics" in ALL_ROUTES
    assert "admin:backups_host_change" in ALL_ROUTES
    assert "admin:django_q_schedule_change" in ALL_ROUTES
    assert sample_url(ALL_ROUTES["vm_detail"]) == "/vms/999999/"
    assert sample_url(ALL_ROUTES["admin:app_list"]) == "/admin/backups/"


CASES = sorted((key, route, *classify(key)) for key, route in ALL_ROUTES.items() if classify(key))


@pytest.mark.parametrize("key, route, kind, methods, anonymous", CASES)
def test_it_gives_anonymous_visitors_what_the_class_says(db, key, route, kind, methods, anonymous):
    response = Client().get(sample_url(route))
    if kind == PUBLIC:
        assert response.status_code == anonymous
    elif kind in (LOGIN, PERMISSION):
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login") + "?next=")
    else:  # the site's login page (LoginRequiredMiddleware) or the admin's
        assert response.status_code == 302
        location = response["Location"]
        assert location.startswith((reverse("login"), reverse("admin:login")))


@pytest.mark.parametrize(
    "key, route, kind, methods, anonymous", [c for c in CASES if c[2] in (PERMISSION, ADMIN)]
)
def test_it_refuses_logged_in_users_without_the_permission(
    outsider_client, key, route, kind, methods, anonymous
):
    url = sample_url(route)
    response = outsider_client.post(url) if methods == POST else outsider_client.get(url)
    if kind == PERMISSION:
        assert response.status_code == 403
    else:  # not staff: the admin sends them to its login page (its logout: to its index)
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("admin:index"))


@pytest.mark.parametrize("key, route, kind, methods, anonymous", CASES)
def test_it_allows_only_the_methods_of_the_class(
    owner_client, key, route, kind, methods, anonymous
):
    url = sample_url(route)
    if methods == READ:
        assert owner_client.post(url).status_code == 405
    elif methods == POST:
        assert owner_client.get(url).status_code == 405
    elif methods == FORM:
        assert owner_client.get(url).status_code == FORM_GET[key]


@pytest.mark.parametrize("key, route, kind, methods, anonymous", [c for c in CASES if c[3] != READ])
def test_it_refuses_a_post_without_the_csrf_token(owner, key, route, kind, methods, anonymous):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    response = client.post(sample_url(route), {"name": "x"})
    assert response.status_code == 403
    assert b"CSRF" in response.content
