"""The frames a buggy or malicious alice sends bob in ``test_client_fuzz.py``: valid
messages, and valid messages mutated in one structured way or at the byte level.

A :class:`Forger` holds alice's key, a seeded random generator and what alice knows of
bob's side (his channels with her, his latest co-signed state and ``max_signed`` when
the step began, his proposals, his co-signed store rows); each ``*_frame`` method makes
one frame with a label that says what was done to it.  Fields are built as CBOR values,
not as ``channel.codec`` messages, so that a mutation may break what the codec would
refuse to build (a negative version, a 31-byte channel id, a missing field).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import attrs
import cbor2

from channel import codec
from channel.client import Client
from channel.codec import Accept, Error, Open, Propose, Reject, Sync
from channel.eip712 import state_digest
from channel.errors import DecodeError
from channel.keys import HALF_N, SECP256K1_N, Signer
from channel.limits import MAX_VERSION
from channel.state import ETH, UINT64_MAX, UINT256_MAX, Address, Allocation, Params, State

#: Known bugs to steer around, comma-separated, to look for others meanwhile (the fuzz
#: found ``bignum``, a bignum protocol version or message type, which is fixed: steering
#: around it is kept for the next one).  Empty by default.
AVOID = frozenset(filter(None, os.environ.get("FUZZ_AVOID", "").split(",")))
TOKEN = Address(b"\x70" * 20)
#: A CBOR bignum far past Python's 4300-digit int-to-str limit.
BIG = 2**15000
#: What replaces a node of a decoded frame ("CBOR type confusion").
CONFUSION: list[object] = [
    BIG,
    -BIG,
    -1,
    2**64,
    2**256,
    1.5,
    float("nan"),
    "x",
    b"",
    bytes(65),
    None,
    True,
    [],
    {},
    {1: 2},
    cbor2.CBORTag(2, b"\x01"),
    cbor2.CBORTag(1, 0),
    cbor2.CBORTag(258, [1]),
    [[[[]]]],
    cbor2.CBORSimpleValue(16),
    cbor2.undefined,
]


@attrs.frozen
class Frame:
    label: str
    data: bytes


@attrs.frozen
class View:
    """Bob's side of one channel when the step began."""

    latest: State
    max_signed: int
    busy: bool  # a proposal of bob's own is in flight


def wire(*fields: object) -> bytes:
    """A frame of ``fields`` (type first), canonical CBOR, whatever the fields are."""
    return cbor2.dumps([codec.PROTOCOL_VERSION, *fields], canonical=True)


def totals(state: State) -> list[tuple[bytes, int]]:
    return [(a.asset, a.total) for a in state.allocations]


class Forger:
    def __init__(self, *, seed: int, alice: Signer, bob: Client, main: Params) -> None:
        self.rng = random.Random(seed)
        self.key = alice
        self.bob = bob
        self.main = main
        #: Bob's channels with alice (the main one, and those the fuzzer opened).
        self.channels: dict[bytes, Params] = {main.channel_id: main}
        self.views: dict[bytes, View] = {}
        #: Per channel, ``(tip version, max signed)`` after the valid proposals made so
        #: far in the step: the frames of a burst build on each other.
        self.model: dict[bytes, tuple[int, int]] = {}
        self.bob_props: list[Propose] = []  # bob's proposals, as he sent them
        self.burned: list[Propose] = []  # those alice refused
        #: Bob's co-signed store rows by (channel, version): ``states`` rows as read.
        self.cosigned: dict[tuple[bytes, int], tuple[Any, ...]] = {}

    def sign(self, params: Params, state: State) -> bytes:
        return self.key.sign(state_digest(params, state))

    def pick_channel(self) -> Params:
        side = [p for cid, p in self.channels.items() if cid != self.main.channel_id]
        if side and self.rng.random() < 0.3:
            return self.rng.choice(side)
        return self.main

    def tip(self, params: Params) -> tuple[State, int]:
        """The state a valid proposal builds on now, and the version it must exceed."""
        view = self.views[params.channel_id]
        version, max_signed = self.model.get(
            params.channel_id, (view.latest.version, view.max_signed)
        )
        return attrs.evolve(view.latest, version=version), max_signed

    def successor(self, params: Params, tip: State, version: int) -> State:
        """A valid next state: each asset moves a random amount either way."""
        r = self.rng
        main = params.channel_id == self.main.channel_id
        allocs = []
        for a in tip.allocations:
            b0, b1 = a.balances
            cap = 50 if main else r.choice([1, 1000, 2**128])
            hi, lo = min(b0, cap, UINT256_MAX - b1), -min(b1, cap, UINT256_MAX - b0)
            k = r.randint(lo, hi) if lo <= hi else 0
            allocs.append(Allocation(asset=a.asset, balances=(b0 - k, b1 + k), locked=a.locked))
        app_data = tip.app_data if r.random() < 0.8 else r.randbytes(r.choice([0, 1, 32, 300]))
        return State(
            channel_id=tip.channel_id, version=version, allocations=tuple(allocs), app_data=app_data
        )

    # -- proposals ---------------------------------------------------------------------

    def propose_fields(self, params: Params, *, valid: bool = False) -> tuple[str, list[Any]]:
        """A label and ``Propose`` fields: valid, or mutated in one way and then (mostly)
        signed again by alice, so that the mutation is what is wrong with it."""
        r = self.rng
        tip, max_signed = self.tip(params)
        skip = 1 if r.random() < 0.8 else r.randint(2, 3)
        if params.channel_id != self.main.channel_id and r.random() < 0.05:
            # To the end of the range: MAX_VERSION (beyond it, a proposal is refused).
            skip = max(1, MAX_VERSION - max_signed - r.randint(0, 2))
        version = min(max(max_signed, tip.version) + skip, MAX_VERSION)
        good = self.successor(params, tip, version)
        sig = self.sign(params, good)
        if valid or r.random() < 0.1:
            return f"propose/valid(skip {skip})", [tip.version, codec.state_to_wire(good), sig]
        base: Any = tip.version
        w: list[Any] = codec.state_to_wire(good)
        kind = r.choice(
            [
                "version",
                "base",
                "balance",
                "allocations",
                "locked",
                "app_data",
                "is_final",
                "signature",
                "signature",
                "channel_id",
                "arity",
            ]
        )
        if kind == "base":
            what, base = r.choice(
                [
                    ("-1 from tip", tip.version - 1),
                    ("+1 from tip", tip.version + 1),
                    ("0", 0),
                    ("uint64 max", UINT64_MAX),
                    ("-1", -1),
                    ("2**64", 2**64),
                    ("= version", version),
                    ("text", "v"),
                ]
            )
        elif kind in ("signature", "arity"):
            what = ""
        else:
            what = self.mutate_state(kind, w, params, tip, max_signed)
        fields: list[Any] = [base, w, sig]
        if kind == "signature":
            what = r.choice(
                [
                    "truncated",
                    "zero",
                    "high-s",
                    "bad-v",
                    "wrong-key",
                    "of-the-tip",
                    "other-chain-id",
                    "bob's",
                    "random",
                    "empty",
                    "66-bytes",
                    "none",
                ]
            )
            fields[2] = self.bad_signature(what, params, good, tip, sig)
        elif kind == "arity":
            what = r.choice(["no signature", "extra field"])
            if what == "no signature":
                fields.pop()
            else:
                fields.append(0)
        elif r.random() < 0.75:
            try:
                fields[2] = self.sign(params, codec.state_from_wire(w))
            except DecodeError:
                pass
            else:
                what += ", re-signed"
        return f"propose/{kind}={what}", fields

    def mutate_state(
        self, kind: str, w: list[Any], params: Params, tip: State, max_signed: int
    ) -> str:
        """Mutate the state fields ``w`` in place; what was done."""
        r = self.rng
        allocs: list[list[Any]] = w[2]
        if kind == "version":
            burned = [p.state.version for p in self.burned if p.state.channel_id == w[0]]
            what, w[1] = r.choice(
                [
                    ("0", 0),
                    ("-1", -1),
                    ("latest", tip.version),
                    ("latest-1", tip.version - 1),
                    ("max_signed", max_signed),
                    ("+2", max_signed + 2),
                    ("2**63", 2**63),
                    ("uint64 max", UINT64_MAX),
                    ("2**64", 2**64),
                    ("2**200", 2**200),
                    ("burned", r.choice(burned) if burned else max_signed),
                ]
            )
            return str(what)
        if kind == "balance":
            a, j = r.choice(allocs), r.choice([1, 2])
            what = r.choice(
                ["+1", "-1", "negative", "2**256", "uint256 max", "swap", "all to alice", "float"]
            )
            if what in ("+1", "-1"):
                a[j] += int(what)
            elif what == "negative":
                a[j], a[3 - j] = -1, a[3 - j] + a[j] + 1
            elif what in ("2**256", "uint256 max"):
                a[j] = 2**256 if what == "2**256" else UINT256_MAX
            elif what == "swap":
                a[1], a[2] = a[2], a[1]
            elif what == "all to alice":
                a[1], a[2] = a[1] + a[2], 0
            else:
                a[j] = float(a[j])
            return what
        if kind == "allocations":
            what = r.choice(
                [
                    "extra-asset",
                    "drop-one",
                    "empty",
                    "duplicate",
                    "reverse",
                    "17-assets",
                    "short-allocation",
                    "19-byte-asset",
                    "asset-as-text",
                ]
            )
            if what == "extra-asset":
                allocs.append([TOKEN if allocs[0][0] != TOKEN else bytes(20), 0, 0, 0])
            elif what == "drop-one":
                allocs.pop(r.randrange(len(allocs)))
            elif what == "empty":
                allocs.clear()
            elif what == "duplicate":
                allocs.append(list(allocs[0]))
            elif what == "reverse":
                allocs.reverse()
            elif what == "17-assets":
                allocs.extend([r.randbytes(20), 0, 0, 0] for _ in range(17 - len(allocs)))
            elif what == "short-allocation":
                allocs[0].pop()
            elif what == "19-byte-asset":
                allocs[0][0] = allocs[0][0][:19]
            else:
                allocs[0][0] = "ETH"
            return what
        if kind == "locked":
            a = r.choice(allocs)
            what = r.choice(["moved from a balance", "+1", "2**256", "-1"])
            if what == "moved from a balance":
                k = r.randint(0, a[1])
                a[1], a[3] = a[1] - k, a[3] + k
            else:
                a[3] = {"+1": a[3] + 1, "2**256": 2**256, "-1": -1}[what]
            return what
        if kind == "app_data":
            n = r.choice([1, 64, 16 * 1024, 16 * 1024 + 1, 60_000])
            w[3] = r.randbytes(n) if r.random() < 0.9 else "data"
            return str(n) if isinstance(w[3], bytes) else "text"
        if kind == "is_final":
            w[4] = not w[4]
            return "toggled"
        assert kind == "channel_id", kind
        others = [c for c in self.channels if c != params.channel_id]
        what, w[0] = r.choice(
            [
                ("random", r.randbytes(32)),
                ("another of ours", r.choice(others) if others else bytes(32)),
                ("31 bytes", w[0][:31]),
                ("text", "cid"),
            ]
        )
        return str(what)

    def bad_signature(self, what: str, params: Params, good: State, tip: State, sig: bytes) -> Any:
        if what == "truncated":
            return sig[:64]
        if what == "zero":
            return bytes(65)
        if what == "high-s":
            s = SECP256K1_N - int.from_bytes(sig[32:64], "big")
            assert s > HALF_N
            return sig[:32] + s.to_bytes(32, "big") + bytes([sig[64] ^ 1])
        if what == "bad-v":
            return sig[:64] + bytes([self.rng.choice([0, 1, 29, 255])])
        if what == "wrong-key":
            stranger = Signer.from_bytes(self.rng.randbytes(31) + b"\x01")
            return stranger.sign(state_digest(params, good))
        if what == "of-the-tip":
            return self.sign(params, tip)
        if what == "other-chain-id":
            return self.sign(attrs.evolve(params, chain_id=params.chain_id ^ 1), good)
        if what == "bob's":
            latest = self.bob.latest(params.channel_id)
            return latest.signatures[1] if latest is not None else bytes(65)
        if what == "random":
            return self.rng.randbytes(65)
        return {"empty": b"", "66-bytes": sig + b"\x00", "none": None}[what]

    def propose_frame(self, params: Params, *, valid: bool = False) -> Frame:
        label, fields = self.propose_fields(params, valid=valid)
        return Frame(label, wire(Propose.TYPE, *fields))

    # -- answers to bob's proposals, and Syncs ------------------------------------------

    def accept_frame(self, params: Params) -> Frame:
        r = self.rng
        tip, max_signed = self.tip(params)
        props = [p for p in self.bob_props if p.state.channel_id == params.channel_id]
        prop = r.choice(props).state if props else None
        what_v, version = r.choice(
            [
                ("latest", tip.version),
                ("latest+1", tip.version + 1),
                ("max_signed+1", max_signed + 1),
                ("bob's proposal", prop.version if prop else 0),
                ("uint64 max", UINT64_MAX),
                ("0", 0),
            ]
        )
        what_s, sig = r.choice(
            [
                ("alice on the tip", self.sign(params, tip)),
                ("alice on bob's proposal", self.sign(params, prop) if prop else b""),
                ("zero", bytes(65)),
                ("bob's own", self.bad_signature("bob's", params, tip, tip, b"")),
                ("random", r.randbytes(65)),
            ]
        )
        cid = params.channel_id if r.random() < 0.85 else r.randbytes(32)
        return Frame(f"accept/{what_v}, sig {what_s}", wire(Accept.TYPE, cid, version, sig))

    def reject_frame(self, params: Params) -> Frame:
        r = self.rng
        tip, _ = self.tip(params)
        props = [p for p in self.bob_props if p.state.channel_id == params.channel_id]
        prop = r.choice(props).state if props else None
        mine = prop is not None and r.random() < 0.7
        version = prop.version if prop is not None and mine else tip.version + 1
        what_h, digest = r.choice(
            [
                ("of bob's proposal", state_digest(params, prop) if prop else bytes(32)),
                ("random", r.randbytes(32)),
                ("of the tip", state_digest(params, tip)),
                ("31 bytes", bytes(31)),
            ]
        )
        what_r, reason = r.choice(
            [
                ("plain", "no"),
                ("conflict", "ProposalConflict: fuzz"),
                ("256 chars", "é" * 256),
                ("257 chars", "x" * 257),
                ("empty", ""),
            ]
        )
        return Frame(
            f"reject/v of {'bob' if mine else 'tip+1'}, hash {what_h}, reason {what_r}",
            wire(Reject.TYPE, params.channel_id, version, digest, reason),
        )

    def sync_frame(self, params: Params) -> Frame:
        """A ``Sync`` whose latest is bob's, older, or a forgery; its ``max_signed``
        anything; sometimes with proposals inside (as the first release sent them)."""
        r = self.rng
        cid = params.channel_id
        latest = self.bob.latest(cid)
        assert latest is not None
        view = self.views[cid]
        bob_sig = latest.signatures[1]
        nxt = self.successor(params, latest.state, view.max_signed + 1)
        older = [k[1] for k in self.cosigned if k[0] == cid and k[1] < latest.state.version]
        burned = [
            p
            for p in self.burned
            if p.state.channel_id == cid and p.state.version > latest.state.version
        ]
        options: list[tuple[str, Callable[[], list[Any]]]] = [
            ("current", lambda: codec.signed_to_wire(latest)),
            ("next, alice only", lambda: [codec.state_to_wire(nxt), self.sign(params, nxt), None]),
            (
                "next, bob's signature copied",
                lambda: [codec.state_to_wire(nxt), self.sign(params, nxt), bob_sig],
            ),
            ("no signatures", lambda: [codec.state_to_wire(nxt), None, None]),
            (
                "same version, another state, bob's signature copied",
                lambda: self.same_version_forgery(params, latest.state, bob_sig),
            ),
        ]
        if older:
            options.append(("older co-signed", lambda: self.cosigned_wire(cid, r.choice(older))))
        if burned:
            p = r.choice(burned)
            options.append(
                (
                    "bob's refused proposal, countersigned",
                    lambda: [codec.state_to_wire(p.state), self.sign(params, p.state), p.signature],
                )
            )
        what, make = r.choice(options)
        signed = make()
        if r.random() < 0.05:
            what, signed[0][0] = what + ", another channel id", r.randbytes(32)
        what_m, max_signed = r.choice(
            [
                ("0", 0),
                ("latest", latest.state.version),
                ("latest+5", latest.state.version + 5),
                ("uint64 max", UINT64_MAX),
                ("bob's", view.max_signed),
            ]
        )
        pending = []
        if r.random() < 0.3:
            for _ in range(r.randint(1, 3)):
                label, fields = self.propose_fields(params)
                what_m += f", pending {label}"
                pending.append(fields)
        return Frame(
            f"sync/{what}, max_signed {what_m}", wire(Sync.TYPE, signed, max_signed, pending)
        )

    def same_version_forgery(
        self, params: Params, state: State, bob_sig: bytes | None
    ) -> list[Any]:
        a = state.allocations[0]
        other = attrs.evolve(
            state,
            allocations=(
                attrs.evolve(a, balances=(a.balances[1], a.balances[0])),
                *state.allocations[1:],
            ),
            app_data=b"forged" if state.app_data != b"forged" else b"",
        )
        return [codec.state_to_wire(other), self.sign(params, other), bob_sig]

    def cosigned_wire(self, cid: bytes, version: int) -> list[Any]:
        row = self.cosigned[(cid, version)]
        return [cbor2.loads(row[3]), row[4], row[5]]

    # -- opens ----------------------------------------------------------------------------

    def open_frame(self) -> Frame:
        """An ``Open`` of a new channel with odd params (any chain id, adjudicator, app,
        challenge duration; up to 16 assets; balances up to uint256 each), valid or
        broken in one way; or the main channel's own ``Open`` again."""
        r = self.rng
        if r.random() < 0.1:
            row = self.cosigned[(self.main.channel_id, 0)]
            params_wire = codec.params_to_wire(self.main)
            data = wire(Open.TYPE, params_wire, cbor2.loads(row[3]), row[4])
            return Frame("open/the main channel again", data)
        assets = [ETH, *(Address(r.randbytes(20)) for _ in range(r.choice([0, 0, 1, 2, 15])))]

        def balances() -> tuple[int, int]:
            """Two balances whose sum fits uint256 (the adjudicator adds them up)."""
            b0 = int(r.choice([0, 1, 10**18, 2**255, UINT256_MAX, r.randrange(2**64)]))
            b1 = int(r.choice([0, 1, 10**18, 2**255 - 1, UINT256_MAX, r.randrange(2**64)]))
            return b0, min(b1, UINT256_MAX - b0)

        params = Params(
            chain_id=r.choice([1, 0, 31337, UINT256_MAX, r.randrange(2**256)]),
            adjudicator=Address(r.randbytes(20)),
            participants=(Address(self.key.address), Address(self.bob.address)),
            salt=r.randbytes(32),
            challenge_duration=r.choice([0, 1, 60, UINT64_MAX]),
            app=r.choice([ETH, Address(r.randbytes(20))]),
        )
        state = State.initial(params, [(a, *balances()) for a in assets])
        pw: list[Any] = codec.params_to_wire(params)
        sw: list[Any] = codec.state_to_wire(state)
        what = r.choice(
            ["valid"] * 5
            + [
                "final",
                "locked",
                "version-1",
                "state-of-another-channel",
                "bad-signature",
                "bob-first",
                "stranger-first",
                "stranger-second",
                "one-participant-twice",
                "chain-id-2**256",
                "31-byte-salt",
                "no-allocations",
                "total-over-uint256",
            ]
        )
        sig: Any = None
        if what == "final":
            sw[4] = True
        elif what == "locked":
            sw[2][0][1] //= 2
            sw[2][0][3] = sw[2][0][1]
        elif what == "version-1":
            sw[1] = 1
        elif what == "state-of-another-channel":
            sw[0] = r.randbytes(32)
        elif what == "bad-signature":
            sig = self.sign(params, attrs.evolve(state, app_data=b"x"))
        elif what == "bob-first":
            pw[2], pw[3] = pw[3], pw[2]
        elif what in ("stranger-first", "stranger-second"):
            pw[2 if what == "stranger-first" else 3] = r.randbytes(20)
        elif what == "one-participant-twice":
            pw[3] = pw[2]
        elif what == "chain-id-2**256":
            pw[0] = 2**256
        elif what == "31-byte-salt":
            pw[4] = pw[4][:31]
        elif what == "no-allocations":
            sw[2] = []
        elif what == "total-over-uint256":
            # Each balance is a uint256, their sum is not; signed as it is.
            sw[2][-1][1], sw[2][-1][2] = UINT256_MAX, r.choice([1, UINT256_MAX])
            over = Allocation.unchecked(Address(sw[2][-1][0]), (sw[2][-1][1], sw[2][-1][2]), 0)
            allocs = (*state.allocations[:-1], over)
            sig = self.sign(params, State.unchecked(state.channel_id, 0, allocs, b"", False))
        if sig is None:
            try:
                sig = self.sign(codec.params_from_wire(pw), codec.state_from_wire(sw))
            except DecodeError:
                sig = self.sign(params, state)
        return Frame(f"open/{what}", wire(Open.TYPE, pw, sw, sig))

    # -- any frame ----------------------------------------------------------------------

    def structured_frame(self) -> Frame:
        x = self.rng.random()
        params = self.pick_channel()
        if x < 0.22:
            return self.propose_frame(params, valid=True)
        if x < 0.6:
            return self.propose_frame(params)
        if x < 0.68:
            return self.accept_frame(params)
        if x < 0.76:
            return self.reject_frame(params)
        if x < 0.88:
            return self.sync_frame(params)
        if x < 0.96:
            return self.open_frame()
        reason = self.rng.choice(["", "é" * 256])
        return Frame("error/from alice", codec.encode(Error(reason=reason)))

    def byte_frame(self) -> Frame:
        r = self.rng
        inner = self.structured_frame()
        d = bytearray(inner.data)
        what = r.choice(["flip", "truncate", "append", "insert", "delete", "indefinite", "twice"])
        if what == "flip":
            for _ in range(r.randint(1, 3)):
                d[r.randrange(len(d))] ^= 1 << r.randrange(8)
        elif what == "truncate":
            del d[r.randrange(len(d)) :]
        elif what == "append":
            d += r.randbytes(r.randint(1, 8))
        elif what == "insert":
            d.insert(r.randrange(len(d)), r.randrange(256))
        elif what == "delete":
            del d[r.randrange(len(d))]
        elif what == "indefinite" and 0x81 <= d[0] <= 0x97:
            d[0:1] = b"\x9f"  # the same array, of indefinite length: not canonical
            d.append(0xFF)
        else:
            d += inner.data
        return Frame(f"bytes/{what} of {inner.label.split('/')[0]}", bytes(d))

    def confused_frame(self) -> Frame:
        """A decoded frame with one node (at any depth) replaced by a value of another
        CBOR type or range, encoded again."""
        r = self.rng
        inner = self.structured_frame()
        value = cbor2.loads(inner.data)
        parent, path = value, [r.randrange(len(value))]
        while r.random() < 0.6 and isinstance(parent[path[-1]], list) and parent[path[-1]]:
            parent = parent[path[-1]]
            path.append(r.randrange(len(parent)))
        new = r.choice(CONFUSION)
        while "bignum" in AVOID and path in ([0], [1]) and new in (BIG, -BIG):
            new = r.choice(CONFUSION)
        parent[path[-1]] = new
        try:
            data = cbor2.dumps(value, canonical=True)
        except Exception:  # a value canonical CBOR cannot hold: send the frame as it was
            data = inner.data
        kind = "bignum of 4516 digits" if new in (BIG, -BIG) else type(new).__name__
        return Frame(f"cbor/{inner.label.split('/')[0]}: {kind} at {path}", data)

    def one_frame(self) -> Frame:
        x = self.rng.random()
        if x < 0.7:
            return self.structured_frame()
        if x < 0.87:
            return self.byte_frame()
        return self.confused_frame()
