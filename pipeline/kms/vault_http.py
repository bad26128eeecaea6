"""The authenticated HTTP session to one Vault / OpenBao: the transport under `VaultKms`.

`VaultHttp` owns the pooled aiohttp session, the request headers (the token, read from its
`TokenSource` on every call, and the namespace) and the token's renewal task, and turns one
API call into the decoded JSON body or a KmsError. It knows nothing of transit: `VaultKms`
decides which paths to call, `vault_transit` what to send and what the answers must hold.
Keeping the token here, in one place, is what keeps it out of every repr and error message.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from pipeline.errors import KmsRequestError
from pipeline.kms.vault_errors import DecodedResponse, classify_response, translate_transport
from pipeline.kms.vault_ids import VaultKeyRef
from pipeline.kms.vault_token import TokenRenewer, TokenSource

__all__ = ["VaultHttp", "new_session"]

#: The ACL capability a method needs, for the message of a refused request.
_CAPABILITY = {"GET": "read", "POST": "update", "DELETE": "delete"}


def new_session(
    *,
    ssl_context: ssl.SSLContext | bool,
    max_connections: int,
    connect_timeout: float,
    total_timeout: float,
) -> aiohttp.ClientSession:
    """A pooled session with Vault's request header and orjson bodies. Inside the loop only."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, ssl=ssl_context),
        timeout=aiohttp.ClientTimeout(
            # Not `connect`: it would count the wait for a pooled connection too.
            total=total_timeout,
            sock_connect=connect_timeout,
        ),
        headers={"X-Vault-Request": "true"},
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
    )


class VaultHttp:
    """One session to `address` with `token`: API calls in, JSON bodies or KmsErrors out."""

    def __init__(
        self,
        address: str,
        session: aiohttp.ClientSession,
        token: TokenSource,
        namespace: str = "",
    ) -> None:
        self._base = address.rstrip("/") + "/v1/"
        self._session: aiohttp.ClientSession | None = session
        self._token = token
        self._renewer: TokenRenewer | None = None
        self.namespace = namespace

    @property
    def address(self) -> str:
        """The server's address as given, without a trailing slash."""
        return self._base[:-4]

    @property
    def token(self) -> TokenSource:
        """Where the token comes from (its repr hides the token)."""
        return self._token

    async def start_renewal(self) -> None:
        """Look the token up now and, if it is renewable, renew it in the background."""
        self._renewer = TokenRenewer(self._token, self._token_request)
        await self._renewer.start()

    async def close(self) -> None:
        """Stop token renewal and close the connection pool. Idempotent."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            await renewer.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _token_request(self, method: str, path: str, token: str) -> Mapping[str, Any]:
        """lookup-self / renew-self for `TokenRenewer`, with the token it is looking at."""
        return await self.request("token_renewal", method, path, None, token=token)

    async def request(
        self,
        operation: str,
        method: str,
        path: str,
        payload: Mapping[str, object] | None,
        *,
        ref: VaultKeyRef | None = None,
        token: str | None = None,
    ) -> Mapping[str, Any]:
        """One API call; every failure becomes a KmsError naming `path` and never the token."""
        session = self._session
        if session is None:
            raise KmsRequestError(operation, "client_closed", "VaultKms.close() was called")
        headers = {"X-Vault-Token": token if token is not None else self._token.current()}
        if self.namespace:
            headers["X-Vault-Namespace"] = self.namespace
        try:
            # No redirects: following one would hand the token to whatever host it names.
            async with session.request(
                method, self._base + path, json=payload, headers=headers, allow_redirects=False
            ) as response:
                status, raw = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise translate_transport(operation, self.address, exc) from exc
        decoded = DecodedResponse.parse(status, raw)
        if 200 <= status < 300 and decoded.body is not None:
            return decoded.body
        raise classify_response(
            operation,
            decoded,
            path=path,
            capability=_CAPABILITY.get(method, method.lower()),
            token_origin=self._token.origin,
            ref=ref,
        )
