"""Network policy configuration (issue 17): destinations parsed from Python, a TOML
profile and the command line into one canonical form; mistakes are ConfigErrors
naming the field (and the option) with the bad value. No root needed."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from conftest import NDF_SANDBOX, ndf_host_env
from neural_doc_flow_security.sandbox import NetworkPolicy, SandboxConfig
from neural_doc_flow_security.sandbox.config import NamespaceConfig
from neural_doc_flow_security.sandbox.errors import ConfigError
from neural_doc_flow_security.sandbox.netdest import Destination, parse_destination


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.3.2:8080", Destination(network=ipaddress.ip_network("10.0.3.2/32"), ports=(8080, 8080))),
    ("[fd00::2]:443/tcp", Destination(network=ipaddress.ip_network("fd00::2/128"), ports=(443, 443),
                                      protocol="tcp")),
    ("192.0.2.0/24:1000-2000/udp", Destination(network=ipaddress.ip_network("192.0.2.0/24"), ports=(1000, 2000),
                                               protocol="udp")),
    ("Model-Server.internal:443", Destination(name="model-server.internal", ports=(443, 443))),
    ("host", Destination(name="host")),
    ("fd00::/8", Destination(network=ipaddress.ip_network("fd00::/8"))),
    ("169.254.169.254/TCP", Destination(network=ipaddress.ip_network("169.254.169.254/32"), protocol="tcp")),
])
def test_destinations_parse(text: str, expected: Destination) -> None:
    assert parse_destination(text) == expected
    assert parse_destination(str(expected)) == expected  # the canonical form reads back


@pytest.mark.parametrize(("text", "why"), [
    ("10.0.0.1/24", "host bits set"), ("[fd00::1", "[ADDR]"), ("10.0.0.1:0", "1-65535"),
    ("10.0.0.1:70000", "1-65535"), ("10.0.0.1:9-8", "1-65535"), ("a_b:1", "not an address"),
    ("10.0.0.1:", "missing port"), ("10.0.0.1:80/sctp", "tcp or udp"), ("", "must be a destination"),
    ("300.1.1.1", "not an IPv4"),
])
def test_bad_destinations_name_the_field_and_value(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        NetworkPolicy(deny=[text])
    assert info.value.field == "network.deny"
    assert repr(text) in str(info.value) and why in str(info.value)


def test_link_local_is_named_only_by_an_address_inside_it() -> None:
    assert parse_destination("169.254.169.254:80").names_link_local
    assert parse_destination("[fe80::1]").names_link_local
    assert not parse_destination("0.0.0.0/0:443").names_link_local


def test_profile_table_and_python_agree(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('[network]\nallow = ["10.0.3.2:8080", "[fd00::2]:443/tcp", "model.internal:443"]\n'
                       'deny = ["host"]\ndns = true\nhosts = { "model.internal" = ["10.0.3.9"] }\n')
    config = SandboxConfig.from_toml(profile)
    assert config.network == NetworkPolicy(allow=("10.0.3.2:8080", "[fd00::2]:443/tcp", "model.internal:443"),
                                           deny=("host",), dns=True, hosts={"model.internal": ["10.0.3.9"]})
    assert config.namespaces.net
    assert config.network is not None and config.network.names == ("model.internal",)


def test_a_policy_needs_the_sandboxs_own_namespace() -> None:
    with pytest.raises(ConfigError) as info:
        SandboxConfig(network=NetworkPolicy(allow=["10.0.0.1"]), namespaces=NamespaceConfig(net=False))
    assert info.value.field == "network"


def test_cli_options_build_the_policy() -> None:
    from neural_doc_flow_security.sandbox.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--net-allow", "10.0.3.2:8080", "--net-allow", "[fd00::2]:443/tcp",
                                      "--net-deny", "10.0.3.2:8080/udp", "--net-dns",
                                      "--net-host", "svc.internal=10.0.3.2,fd00::2", "--", "true"])
    config = config_from_args(args)
    assert config.network == NetworkPolicy(allow=("10.0.3.2:8080", "[fd00::2]:443/tcp"),
                                           deny=("10.0.3.2:8080/udp",), dns=True,
                                           hosts={"svc.internal": ["10.0.3.2", "fd00::2"]})


def test_cli_error_names_the_option() -> None:
    import subprocess

    done = subprocess.run([NDF_SANDBOX, "run", "--net-allow", "10.0.0.1:99999", "--", "true"], capture_output=True,
                          text=True, env=ndf_host_env(), check=False)
    assert done.returncode == 2
    assert "--net-allow" in done.stderr and "network.allow" in done.stderr and "'10.0.0.1:99999'" in done.stderr
    done = subprocess.run([NDF_SANDBOX, "run", "--net-host", "svc.internal=10.0.0.300", "--", "true"],
                          capture_output=True, text=True, env=ndf_host_env(), check=False)
    assert done.returncode == 2
    assert "--net-host" in done.stderr and "network.hosts" in done.stderr and "10.0.0.300" in done.stderr


def test_the_resolver_answers_only_allowed_names() -> None:
    """The sandbox's resolver (linux/dns_responder.py), packet in, packet out: A and
    AAAA for an allowed name, NXDOMAIN for another, nothing for garbage or a reply."""
    from dnslib import QTYPE, RCODE, DNSRecord

    from neural_doc_flow_security.sandbox.linux.dns_responder import answer

    names = {"svc.internal": ["10.0.3.2", "fd00::2"]}
    a = DNSRecord.parse(answer(DNSRecord.question("SVC.internal.", "A").pack(), names) or b"")
    assert [str(r.rdata) for r in a.rr] == ["10.0.3.2"] and a.header.rcode == RCODE.NOERROR
    aaaa = DNSRecord.parse(answer(DNSRecord.question("svc.internal", "AAAA").pack(), names) or b"")
    assert [str(r.rdata) for r in aaaa.rr] == ["fd00::2"] and aaaa.rr[0].rtype == QTYPE.AAAA
    other = DNSRecord.parse(answer(DNSRecord.question("example.com", "A").pack(), names) or b"")
    assert other.header.rcode == RCODE.NXDOMAIN and not other.rr
    assert answer(b"\x00garbage", names) is None
    assert answer(a.pack(), names) is None  # a reply is not a query
