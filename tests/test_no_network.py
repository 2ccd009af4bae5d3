"""The suite-wide guard of tests/conftest.py: connections off this machine fail at once."""

import socket
import urllib.request

import pytest


def test_a_connection_off_this_machine_fails_naming_the_address():
    with pytest.raises(RuntimeError, match=r"connect to 203\.0\.113\.7:80: the tests must not touch the network"):
        with socket.create_connection(("203.0.113.7", 80), timeout=5):  # (TEST-NET-3: never routed)
            pass
    with pytest.raises(RuntimeError, match="must not touch the network"):
        urllib.request.urlopen("http://203.0.113.7/data.zip", timeout=5)


def test_this_machine_is_reachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            conn, _ = server.accept()
            conn.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # (sends nothing: how Ray finds its address)
        udp.connect(("8.8.8.8", 80))
