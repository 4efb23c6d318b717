"""``EthBackend`` over JSON-RPC: any EVM node (anvil, geth, an L2), trio-native.

web3's async API does not run under Trio and its sync API costs milliseconds a call, so
this is a thin client over ``httpx.AsyncClient`` (httpx runs on Trio through anyio): one
POST per request (or per :meth:`JsonRpcBackend.batch`), one keep-alive connection pool,
hex quantities and data in, ``bytes``/``int`` values out.

Errors: a transport failure, an HTTP error or a JSON-RPC error object raises
``ChainError`` carrying the node's message; an execution revert (code 3, or a message
saying "revert" with a ``data`` field) raises ``Reverted`` with the revert data, and the
message names the custom error when the Adjudicator's ABI knows it (``WindowClosed()``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from channel.chain import Block
from channel.errors import ChainError, Reverted
from dispute.eth import BlockId, CallRequest, Log, Receipt, Transaction

DEFAULT_TIMEOUT = 30.0

# ----------------------------------------------------------------- hex (de)coding


def hex_quantity(n: int) -> str:
    """A JSON-RPC quantity: ``0x``-prefixed hex without leading zeros."""
    if n < 0:
        raise ValueError(f"negative quantity {n}")
    return hex(n)


def hex_data(b: bytes) -> str:
    return "0x" + b.hex()


def hex_block(block: BlockId) -> str:
    return block if isinstance(block, str) else hex_quantity(block)


def parse_quantity(value: Any) -> int:
    """Parse a JSON-RPC quantity; raises ``ChainError`` on anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value[:2] in ("0x", "0X"):
        try:
            return int(value, 16) if len(value) > 2 else 0
        except ValueError:
            pass
    raise ChainError(f"malformed quantity from node: {value!r}")


def parse_data(value: Any) -> bytes:
    """Parse ``0x``-prefixed hex data; raises ``ChainError`` on anything else."""
    if isinstance(value, str) and value[:2] in ("0x", "0X"):
        digits = value[2:]
        if len(digits) % 2:
            digits = "0" + digits
        try:
            return bytes.fromhex(digits)
        except ValueError:
            pass
    raise ChainError(f"malformed hex data from node: {value!r}")


def _opt_data(value: Any) -> bytes | None:
    return None if value is None else parse_data(value)


def _opt_quantity(value: Any) -> int | None:
    return None if value is None else parse_quantity(value)


def call_object(req: CallRequest) -> dict[str, str]:
    obj = {"to": hex_data(req.to), "data": hex_data(req.data)}
    if req.value:
        obj["value"] = hex_quantity(req.value)
    if req.sender is not None:
        obj["from"] = hex_data(req.sender)
    if req.gas is not None:
        obj["gas"] = hex_quantity(req.gas)
    return obj


def parse_block(obj: Mapping[str, Any]) -> Block:
    return Block(
        number=parse_quantity(obj["number"]),
        hash=parse_data(obj["hash"]),
        timestamp=parse_quantity(obj["timestamp"]),
        base_fee=parse_quantity(obj.get("baseFeePerGas") or 0),
    )


def parse_log(obj: Mapping[str, Any]) -> Log:
    return Log(
        address=parse_data(obj["address"]),
        topics=tuple(parse_data(t) for t in obj["topics"]),
        data=parse_data(obj["data"]),
        block_number=parse_quantity(obj["blockNumber"]),
        block_hash=parse_data(obj["blockHash"]),
        tx_hash=parse_data(obj["transactionHash"]),
        log_index=parse_quantity(obj["logIndex"]),
        removed=bool(obj.get("removed", False)),
    )


def parse_receipt(obj: Mapping[str, Any]) -> Receipt:
    return Receipt(
        tx_hash=parse_data(obj["transactionHash"]),
        block_number=parse_quantity(obj["blockNumber"]),
        block_hash=parse_data(obj["blockHash"]),
        status=parse_quantity(obj.get("status", "0x1")),
        gas_used=parse_quantity(obj["gasUsed"]),
        effective_gas_price=parse_quantity(obj.get("effectiveGasPrice") or 0),
        contract_address=_opt_data(obj.get("contractAddress")),
        logs=tuple(parse_log(x) for x in obj.get("logs", ())),
    )


def parse_transaction(obj: Mapping[str, Any]) -> Transaction:
    return Transaction(
        tx_hash=parse_data(obj["hash"]),
        sender=parse_data(obj["from"]),
        to=_opt_data(obj.get("to")),
        nonce=parse_quantity(obj["nonce"]),
        input=parse_data(obj.get("input", obj.get("data", "0x"))),
        value=parse_quantity(obj["value"]),
        block_number=_opt_quantity(obj.get("blockNumber")),
    )


def topics_param(topics: Sequence[Sequence[bytes] | bytes | None]) -> list[Any]:
    out: list[Any] = []
    for t in topics:
        if t is None:
            out.append(None)
        elif isinstance(t, bytes | bytearray):
            out.append(hex_data(bytes(t)))
        else:
            out.append([hex_data(x) for x in t])
    return out


# ----------------------------------------------------------------- errors


def rpc_error(method: str, error: Any) -> ChainError:
    """Map a JSON-RPC error object to ``Reverted`` (execution revert) or ``ChainError``."""
    if not isinstance(error, Mapping):
        return ChainError(f"{method}: malformed error from node: {error!r}")
    code = error.get("code")
    message = str(error.get("message", ""))
    data = error.get("data")
    if isinstance(data, Mapping):  # some nodes nest it: {"data": {"data": "0x..."}}
        data = data.get("data", data.get("result"))
    reverted = code == 3 or "revert" in message.lower()
    if reverted:
        raw = b""
        if isinstance(data, str) and data[:2] in ("0x", "0X"):
            try:
                raw = parse_data(data)
            except ChainError:
                raw = b""
        return Reverted(f"{method}: {_describe(raw, message)}", data=raw)
    return ChainError(f"{method}: {message or error!r} (code {code})")


def _describe(data: bytes, message: str) -> str:
    # Late import: ``dispute.abi`` is pure and loads the artifact; keep rpc importable alone.
    try:
        from dispute.abi import describe_revert
    except ImportError:  # pragma: no cover - abi not present
        return message or f"reverted 0x{data.hex()}"
    described = describe_revert(data)
    return described if data else (message or described)


# ----------------------------------------------------------------- the backend


class JsonRpcBackend:
    """An ``EthBackend`` that speaks JSON-RPC over HTTP(S) to ``url``.

    One ``httpx.AsyncClient`` (keep-alive, pooled) per backend; call :meth:`aclose` when
    done, or use ``async with``.  Every method raises ``ChainError`` on failure.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
            headers={"content-type": "application/json"},
        )
        self._ids = itertools.count(1)

    async def __aenter__(self) -> JsonRpcBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -------------------------------------------------------------- raw requests

    async def _post(self, payload: Any, what: str) -> Any:
        try:
            resp = await self._client.post(self.url, content=json.dumps(payload))
        except httpx.HTTPError as exc:
            raise ChainError(f"{what}: {type(exc).__name__}: {exc} ({self.url})") from exc
        try:
            body = resp.json()
        except ValueError:
            raise ChainError(
                f"{what}: HTTP {resp.status_code} with a non-JSON body: {resp.text[:200]!r}"
            ) from None
        if resp.status_code >= 400 and not isinstance(body, Mapping | list):
            raise ChainError(f"{what}: HTTP {resp.status_code}")
        return body

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        """Send one JSON-RPC request; return its ``result``.

        Raises ``Reverted`` for an execution revert, ``ChainError`` for anything else.
        """
        payload = {
            "jsonrpc": "2.0",
            "id": next(self._ids),
            "method": method,
            "params": list(params),
        }
        body = await self._post(payload, method)
        if not isinstance(body, Mapping):
            raise ChainError(f"{method}: malformed response {body!r:.200}")
        if body.get("error") is not None:
            raise rpc_error(method, body["error"])
        if "result" not in body:
            raise ChainError(f"{method}: response has neither result nor error")
        return body["result"]

    async def batch(self, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Send several requests in one HTTP POST; return their results in order.

        If any of them failed, raises that (first) error — ``Reverted`` or ``ChainError``.
        """
        if not calls:
            return []
        ids = [next(self._ids) for _ in calls]
        payload = [
            {"jsonrpc": "2.0", "id": i, "method": m, "params": list(p)}
            for i, (m, p) in zip(ids, calls, strict=True)
        ]
        body = await self._post(payload, "batch")
        if isinstance(body, Mapping) and body.get("error") is not None:
            raise rpc_error("batch", body["error"])
        if not isinstance(body, list):
            raise ChainError(f"batch: malformed response {body!r:.200}")
        by_id = {r.get("id"): r for r in body if isinstance(r, Mapping)}
        results: list[Any] = []
        for i, (method, _) in zip(ids, calls, strict=True):
            r = by_id.get(i)
            if r is None:
                raise ChainError(f"batch: no response for {method} (id {i})")
            if r.get("error") is not None:
                raise rpc_error(method, r["error"])
            results.append(r.get("result"))
        return results

    # -------------------------------------------------------------- EthBackend

    async def chain_id(self) -> int:
        return parse_quantity(await self.request("eth_chainId"))

    async def block(self, block: BlockId = "latest") -> Block:
        obj = await self.request("eth_getBlockByNumber", [hex_block(block), False])
        if obj is None:
            raise ChainError(f"eth_getBlockByNumber: no block {block!r}")
        return parse_block(obj)

    async def call(self, req: CallRequest, block: BlockId = "latest") -> bytes:
        return parse_data(await self.request("eth_call", [call_object(req), hex_block(block)]))

    async def estimate_gas(self, req: CallRequest) -> int:
        return parse_quantity(await self.request("eth_estimateGas", [call_object(req)]))

    async def send_raw_transaction(self, raw: bytes) -> bytes:
        return parse_data(await self.request("eth_sendRawTransaction", [hex_data(raw)]))

    async def receipt(self, tx_hash: bytes) -> Receipt | None:
        obj = await self.request("eth_getTransactionReceipt", [hex_data(tx_hash)])
        return None if obj is None else parse_receipt(obj)

    async def transaction(self, tx_hash: bytes) -> Transaction | None:
        obj = await self.request("eth_getTransactionByHash", [hex_data(tx_hash)])
        return None if obj is None else parse_transaction(obj)

    async def nonce(self, address: bytes, block: BlockId = "pending") -> int:
        result = await self.request(
            "eth_getTransactionCount", [hex_data(address), hex_block(block)]
        )
        return parse_quantity(result)

    async def balance(self, address: bytes, block: BlockId = "latest") -> int:
        result = await self.request("eth_getBalance", [hex_data(address), hex_block(block)])
        return parse_quantity(result)

    async def code(self, address: bytes, block: BlockId = "latest") -> bytes:
        return parse_data(await self.request("eth_getCode", [hex_data(address), hex_block(block)]))

    async def logs(
        self,
        *,
        address: bytes,
        from_block: int,
        to_block: int,
        topics: Sequence[Sequence[bytes] | bytes | None] = (),
    ) -> list[Log]:
        flt: dict[str, Any] = {
            "address": hex_data(address),
            "fromBlock": hex_quantity(from_block),
            "toBlock": hex_quantity(to_block),
        }
        if topics:
            flt["topics"] = topics_param(topics)
        result = await self.request("eth_getLogs", [flt])
        if not isinstance(result, list):
            raise ChainError(f"eth_getLogs: malformed result {result!r:.200}")
        return [parse_log(x) for x in result]

    async def max_priority_fee(self) -> int:
        return parse_quantity(await self.request("eth_maxPriorityFeePerGas"))

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()
