"""The host page: connection, VMs, and what another installation left there."""

import pytest
from django.urls import reverse

pytestmark = pytest.mark.django_db


def test_it_shows_what_reconcile_found_of_another_installation(viewer_client, host, vm):
    host.foreign_artifacts = [
        "web1: disk vda runs on /images/.vmbackup-0badcafe-7-vda.overlay.qcow2"
    ]
    host.save()
    response = viewer_client.get(reverse("host_detail", args=[host.pk]))
    assert response.status_code == 200
    assert b".vmbackup-0badcafe-7-vda.overlay.qcow2" in response.content
    assert vm.name.encode() in response.content
    overview = viewer_client.get(reverse("overview"))
    assert b"1 foreign" in overview.content


def test_it_says_when_nothing_was_found(viewer_client, host):
    response = viewer_client.get(reverse("host_detail", args=[host.pk]))
    assert b"Not checked yet" in response.content
