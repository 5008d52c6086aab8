"""Start-up rules every network transport shares: plaintext only where it cannot be intercepted,
and TLS material parsed and checked before the first call, with the option and the file named.

Why at start-up: a certificate that is not PEM, or a key of another certificate, otherwise shows up
as a handshake failure on every call of a running robot, worded by the TLS library. Why refuse
plaintext to another machine: whoever is on the network path then reads the camera images and can
answer with actions (bounded only by the safety box). An SSH tunnel or a TLS-terminating proxy makes
plaintext safe again; ``allow_plaintext`` says so explicitly.

Pure (stdlib ``ssl`` + ``ipaddress``): no ROS, no gRPC.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import stat
from pathlib import Path
from urllib.parse import urlsplit

from rt2_ros.backends.base import BackendConfigError

_log = logging.getLogger(__name__)

PLAINTEXT_RISK = ("anyone on the network path could read the camera images and instructions, or answer with "
                  "actions")


def is_loopback(host: str | None) -> bool:
    """True for this machine: ``localhost``, a loopback address, or None (a unix socket). A DNS name
    is not resolved: any other name counts as another machine."""
    if host is None:
        return True
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext(key: str, where: str, host: str | None, allow_plaintext: bool) -> None:
    """Refuse an unencrypted connection to another machine unless ``allow_plaintext`` (option
    ``key``) was set; that case is logged once, as the risk it is."""
    if is_loopback(host):
        return
    if allow_plaintext:
        _log.warning("%s is not on this machine and unencrypted (%s: true): %s, unless the path is protected "
                     "otherwise (encrypted VPN, dedicated cable)", where, key, PLAINTEXT_RISK)
        return
    raise BackendConfigError(
        f"{where} is not on this machine and the connection would be unencrypted: {PLAINTEXT_RISK}. Use TLS "
        f"(directly or through a TLS-terminating proxy) or an SSH tunnel to a local port; only if the path is "
        f"protected otherwise (encrypted VPN, dedicated cable) set {key}: true")


def read_file(key: str, path: str, *, secret: bool = False) -> bytes:
    """Contents of the file named by option ``key``; BackendConfigError naming the key otherwise. A
    secret readable by other users is logged (not refused: containers often mount it so)."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise BackendConfigError(f"{key}: cannot read {str(p)!r} ({exc.strerror or exc})") from None
    if secret and os.name == "posix" and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warning("%s: %s is readable by other users; chmod 600 it", key, p)
    return data


def _pem_blocks(data: bytes, kind: str) -> int:
    """How many ``-----BEGIN <...kind>-----`` blocks ``data`` holds (kind: CERTIFICATE, PRIVATE KEY)."""
    return sum(1 for line in data.splitlines()
               if line.startswith(b"-----BEGIN ") and line.rstrip().endswith(f"{kind}-----".encode()))


def _reason(exc: Exception) -> str:
    return getattr(exc, "reason", None) or str(exc)


def load_ca_bundle(key: str, path: str) -> bytes:
    """The PEM CA bundle in ``path``, checked to hold at least one certificate that parses."""
    data = read_file(key, path)
    if not _pem_blocks(data, "CERTIFICATE"):
        raise BackendConfigError(f"{key}: {path!r} is not a PEM CA bundle (no '-----BEGIN CERTIFICATE-----' block)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        raise BackendConfigError(f"{key}: {path!r} holds a certificate that does not parse "
                                 f"({_reason(exc)})") from None
    return data


def load_cert_and_key(cert_key: str, cert_path: str, key_key: str, key_path: str) -> tuple[bytes, bytes]:
    """(certificate chain, private key) as PEM bytes, checked: both parse and the key belongs to the
    first certificate of the chain."""
    cert = read_file(cert_key, cert_path)
    key = read_file(key_key, key_path, secret=True)
    if not _pem_blocks(cert, "CERTIFICATE"):
        raise BackendConfigError(f"{cert_key}: {cert_path!r} is not a PEM certificate "
                                 "(no '-----BEGIN CERTIFICATE-----' block)")
    if not _pem_blocks(key, "PRIVATE KEY"):
        raise BackendConfigError(f"{key_key}: {key_path!r} is not a PEM private key "
                                 "(no '-----BEGIN ... PRIVATE KEY-----' block)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        raise BackendConfigError(f"{cert_key}: {cert_path!r} holds a certificate that does not parse "
                                 f"({_reason(exc)})") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(Path(cert_path).expanduser()),
                                                                 str(Path(key_path).expanduser()))
    except ssl.SSLError as exc:
        if "MISMATCH" in str(exc).upper():
            raise BackendConfigError(f"{key_key}: the private key in {key_path!r} does not belong to the "
                                     f"certificate in {cert_path!r} ({cert_key})") from None
        raise BackendConfigError(f"{key_key}: cannot load the private key in {key_path!r} with the certificate "
                                 f"in {cert_path!r} ({_reason(exc)}; an encrypted key is not supported)") from None
    return cert, key


def client_ssl_context(ca_key: str, ca_path: str) -> ssl.SSLContext:
    """The verifying client context of an HTTPS / WSS backend: the system's CAs, or only the bundle
    in ``ca_path`` (option ``ca_key``) when it is set."""
    if not ca_path:
        return ssl.create_default_context()
    return ssl.create_default_context(cadata=load_ca_bundle(ca_key, ca_path).decode("ascii"))


def check_server_url(prefix: str, url_key: str, options: dict, plain: str, secure: str, path: str = "") -> None:
    """The address rules of a URL backend that need neither a file nor the server (so ``rt2-bringup
    --check`` applies them too): the form ``<plain|secure>://host[:port]<path>``, the plaintext rule (option
    ``<prefix>allow_plaintext``), and ``<prefix>ca_cert_file`` only with the ``secure`` scheme."""
    url = options[url_key]
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = urlsplit("")
    if parts.scheme not in (plain, secure) or not parts.hostname:
        raise BackendConfigError(f"{prefix}{url_key}: expected {secure}://host:port{path} (or "
                                 f"{plain}://host:port{path}), got {url!r}")
    if parts.scheme == plain:
        if options["ca_cert_file"]:
            raise BackendConfigError(f"{prefix}ca_cert_file: only used with a {secure}:// {url_key}, got {url!r}")
        check_plaintext(prefix + "allow_plaintext", f"{prefix}{url_key} {url!r}", parts.hostname,
                        options["allow_plaintext"])


def server_ssl_context(prefix: str, url_key: str, options: dict, secure: str) -> ssl.SSLContext | None:
    """The verifying context for a ``secure`` URL (https, wss), its ``<prefix>ca_cert_file`` parsed;
    None for a plaintext one (allowed by :func:`check_server_url`, which must have run)."""
    if urlsplit(options[url_key]).scheme != secure:
        return None
    return client_ssl_context(prefix + "ca_cert_file", options["ca_cert_file"])


__all__ = ["PLAINTEXT_RISK", "check_plaintext", "check_server_url", "client_ssl_context", "is_loopback",
           "load_ca_bundle", "load_cert_and_key", "read_file", "server_ssl_context"]
