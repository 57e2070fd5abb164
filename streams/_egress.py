"""Where jobcast may send a request on a job's behalf: the one address policy and the LLM allowlist.

Webhooks (app/) and LLM calls (workers/) both go to URLs that a job names, so both need the same
answer to "may this address be called?"; it lives here, in the contract both import.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from streams._errors import JobcastError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_LLM_BASE_URL = "https://api.openai.com/v1"
"""The LLM endpoint when JOBCAST_LLM_BASE_URL is not set."""

_DEFAULT_PORTS = {"http": 80, "https": 443}
# "This network": on Linux a connect to 0.0.0.0 reaches this machine, yet Python counts it as private.
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
# A cloud metadata service outside link-local space (AWS's IPv6 one is a unique-local address).
_METADATA = ipaddress.ip_address("fd00:ec2::254")


class EgressRefusedError(JobcastError):
    """A request on a job's behalf would go to an address the operator has not allowed."""


class HostUnresolvedError(EgressRefusedError):
    """The host has no address right now (which may pass: a caller can try again later)."""


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which addresses a request on a job's behalf may reach: public ones, and loopback or private
    ones only where the operator allows them. Link-local addresses (where cloud metadata services
    such as 169.254.169.254 live) and fd00:ec2::254 are never allowed."""

    allow_loopback: bool = False
    allow_private: bool = False

    def allows(self, address: IPAddress) -> bool:
        """Whether a connection to `address` is allowed."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 to the kernel
        if address.is_loopback:
            return self.allow_loopback
        if address.is_link_local or address.is_multicast or address.is_unspecified or address == _METADATA:
            return False
        if isinstance(address, ipaddress.IPv4Address) and address in _THIS_NETWORK:
            return False
        # Python counts 127/8 and 169.254/16 as private too; both were decided above.
        return address.is_global or (self.allow_private and address.is_private)

    async def lookup(self, host: str, port: int | None) -> list[str]:
        """The addresses DNS gives for `host`, unchecked; raises OSError."""
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(info[4][0]) for info in infos]

    async def resolve(self, host: str, port: int | None = None) -> list[str]:
        """Every address of `host`, each one allowed; raises EgressRefusedError otherwise.

        One refused address refuses the host: a name that mixes public and internal answers is
        not to be trusted with whichever the connect happens to pick.
        """
        try:
            found = await self.lookup(host, port)
        except OSError as exc:
            raise HostUnresolvedError(f"cannot resolve {host}: {exc}") from None
        addresses: list[str] = []
        for text in found:
            address = ipaddress.ip_address(text.split("%")[0])
            if not self.allows(address):
                raise EgressRefusedError(f"refused: {host} resolves to the non-public address {address}")
            if str(address) not in addresses:
                addresses.append(str(address))
        if not addresses:
            raise HostUnresolvedError(f"cannot resolve {host}: no address")
        return addresses


def normalized_url(url: str) -> str:
    """`url` as the allowlist compares it: scheme, host, port and path without a trailing slash;
    raises ValueError unless it is an http(s) URL with a host."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = parts.hostname or ""  # lower-cased by urlsplit
    if scheme not in _DEFAULT_PORTS or not host:
        raise ValueError(f"not an http(s) URL with a host: {url!r}")
    port = parts.port or _DEFAULT_PORTS[scheme]  # an out-of-range port raises ValueError here
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


def llm_allowlist(text: str) -> tuple[str, ...]:
    """The URLs of JOBCAST_LLM_ALLOWED_BASE_URLS (comma-separated); raises ValueError on a bad one."""
    entries = tuple(item.strip() for item in text.split(",") if item.strip())
    for entry in entries:
        normalized_url(entry)
    return entries


@dataclass(frozen=True, slots=True)
class LlmEndpoints:
    """The LLM endpoints a job may name: the operator's configured one and the listed ones."""

    configured: str
    """JOBCAST_LLM_BASE_URL: used when a job names none, and always allowed."""
    listed: tuple[str, ...] = ()
    """JOBCAST_LLM_ALLOWED_BASE_URLS: the others a job may name."""

    def is_configured(self, url: str) -> bool:
        """Whether `url` is the operator's configured endpoint."""
        return _same(url, self.configured)

    def permitted(self, url: str) -> str | None:
        """The URL to call for a job that names `url`: its normalized form when the operator
        configured or listed it, else None."""
        if any(_same(url, allowed) for allowed in (self.configured, *self.listed)):
            return normalized_url(url)
        return None


def _same(a: str, b: str) -> bool:
    try:
        return normalized_url(a) == normalized_url(b)
    except ValueError:
        return False
