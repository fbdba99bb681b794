import shutil

import pytest

pytest_plugins = ["metastore.testing_plugin"]


@pytest.fixture(scope="session")
def etcdctl_installed() -> str:
    """etcdctl 3.4 is part of what the tests need (Debian's etcd-client); its
    absence is a failure, not a skip, so a green run always means it ran."""
    path = shutil.which("etcdctl")
    if path is None:
        pytest.fail("etcdctl not found: install Debian's etcd-client (see README)")
    return path


@pytest.fixture(scope="session")
def etcd_installed() -> str:
    """The etcd 3.4 server (Debian's etcd-server), for the tests that move
    data between etcd and metastore; like etcdctl, a failure when missing."""
    path = shutil.which("etcd")
    if path is None:
        pytest.fail("etcd not found: install Debian's etcd-server (see README)")
    return path
