"""Suite-wide guard: the tests never touch the network.

Every TCP connection the test process opens must go to this machine (Ray's GCS, the gloo
process groups of the distributed tests); anything else fails the test at once, naming the
address, instead of passing on a machine that happens to be online. UDP ``connect`` is allowed:
it sends nothing (Ray finds its node address that way). Child processes (Ray workers, notebook
kernels) are not covered; the code they run is the code that the in-process tests exercise.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

_LOCAL_NAMES = {"localhost", "", socket.gethostname(), socket.getfqdn()}


def _is_local(host: object) -> bool:
    if not isinstance(host, str):
        return True  # (AF_UNIX paths and the like)
    if host in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # a host name other than this machine's
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:  # one of this machine's own interface addresses (Ray's nodes listen there): it can be bound to
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
        return True
    except OSError:
        return False


@pytest.fixture(autouse=True, scope="session")
def no_network():
    original_connect = socket.socket.connect

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and self.type == socket.SOCK_STREAM \
                and not _is_local(address[0]):
            raise RuntimeError(f"a test tried to connect to {address[0]}:{address[1]}: the tests must not touch the "
                               f"network (replace the download or call with a fake, as tests/ablate/"
                               f"test_data_download.py does)")
        return original_connect(self, address)

    socket.socket.connect = guarded_connect
    try:
        yield
    finally:
        socket.socket.connect = original_connect
