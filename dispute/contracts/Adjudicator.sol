// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {IChannelApp} from "./IChannelApp.sol";

/// @title optichannel Adjudicator
/// @notice Holds the funds of two-party state channels and pays them out by the
/// latest state both participants signed (EIP-712, see channel/eip712.py).
///
/// Life of a channel (docs/adjudicator.md has the full timeline):
///   deposit*  ->  close(final co-signed state)                      -> paid
///   deposit*  ->  claim(co-signed state) -> refute(newer)* -> settle -> paid
///
/// Storage per dispute is ONE slot: keccak256(stateHash, version, deadline).
/// Version and deadline are re-supplied in calldata (they are in the Claimed /
/// Refuted events), so the contract never trusts a truncated hash.
contract Adjudicator {
    // ------------------------------------------------------------------ types

    struct Params {
        uint256 chainId;
        address adjudicator;
        address participantA;
        address participantB;
        bytes32 salt;
        uint64 challengeDuration;
        address app;
    }

    struct Allocation {
        address asset; // address(0) = ETH
        uint256 balanceA;
        uint256 balanceB;
        uint256 locked; // split by params.app on payout
    }

    struct State {
        bytes32 channelId;
        uint64 version;
        Allocation[] allocations;
        bytes appData;
        bool isFinal;
    }

    /// @notice What a registered dispute commits to (from the last Claimed/Refuted event).
    struct Dispute {
        bytes32 stateHash; // EIP-712 hashStruct(State)
        uint64 version;
        uint64 deadline; // unix seconds; refute while now < deadline, settle once now >= deadline
    }

    // ----------------------------------------------------------------- errors

    error WrongChain();
    error ChannelMismatch();
    error BadSignature();
    error NotFinal();
    error DisputeExists();
    error NoDispute();
    error DisputeMismatch();
    error NotNewer();
    error WindowClosed();
    error WindowOpen();
    error AppFailed(address asset);
    error GasTooLow();
    error Reentrancy();
    error NothingToWithdraw();
    error ZeroDeposit();
    error TokenTransferFailed(address asset);

    // ----------------------------------------------------------------- events

    /// @notice Holdings of (channelId, asset) rose to `newTotal` (the amount is the rise since the
    /// previous Deposited/Payout of that pair, and the transaction's value or calldata).
    event Deposited(bytes32 indexed channelId, address indexed asset, uint256 newTotal);
    /// @notice A co-signed state was registered; the full state is in the transaction's calldata.
    event Claimed(bytes32 indexed channelId, uint64 version, uint64 deadline, bytes32 stateHash);
    /// @notice A strictly newer co-signed state replaced the registered one; deadline unchanged.
    event Refuted(bytes32 indexed channelId, uint64 version, uint64 deadline, bytes32 stateHash);
    /// @notice The channel concluded (`cooperative`: by close, else by settle) at `version`.
    event Concluded(bytes32 indexed channelId, uint64 version, bool cooperative);
    /// @notice One asset of a concluding channel was paid out (pushed or credited).
    event Payout(bytes32 indexed channelId, address indexed asset, uint256 toA, uint256 toB);
    /// @notice A push to `account` failed; `amount` is withdrawable with withdraw().
    event Credited(address indexed account, address indexed asset, uint256 amount);
    /// @notice `account` withdrew its credited `amount` of `asset` to `to`.
    event Withdrawn(address indexed account, address indexed asset, address to, uint256 amount);

    // -------------------------------------------------------------- constants

    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant ALLOCATION_TYPEHASH =
        keccak256("Allocation(address asset,uint256 balanceA,uint256 balanceB,uint256 locked)");
    bytes32 private constant STATE_TYPEHASH = keccak256(
        "State(bytes32 channelId,uint64 version,Allocation[] allocations,bytes appData,bool isFinal)"
        "Allocation(address asset,uint256 balanceA,uint256 balanceB,uint256 locked)"
    );
    uint256 private constant HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    /// @notice Gas forwarded with an ETH push (the callee also gets the 2,300 value stipend).
    uint256 internal constant PUSH_GAS = 10_000;
    /// @notice Gas forwarded to an ERC-20 transfer on payout.
    uint256 internal constant TOKEN_PUSH_GAS = 100_000;
    /// @notice Gas the app always gets for split(); the caller cannot starve it.
    uint256 internal constant APP_GAS = 500_000;
    /// @notice After deadline + APP_GRACE a failing app no longer blocks settle: locked is split evenly.
    uint256 internal constant APP_GRACE = 14 days;

    uint256 private constant GUARD_SLOT = 0; // transient

    // ---------------------------------------------------------------- storage

    /// @notice Funds held per channel and asset.
    mapping(bytes32 channelId => mapping(address asset => uint256)) public holdings;
    /// @notice Payouts that could not be pushed, withdrawable by the account.
    mapping(address account => mapping(address asset => uint256)) public credits;
    /// @notice keccak256(abi.encode(stateHash, version, deadline)) of the registered dispute, or 0.
    mapping(bytes32 channelId => bytes32) public disputes;

    bytes32 private immutable _domainSeparator;
    uint256 private immutable _chainId;

    constructor() {
        _chainId = block.chainid;
        _domainSeparator = _buildDomainSeparator();
    }

    /// Transient-storage guard (EIP-1153): ~300 gas, cleared at the end of the transaction anyway.
    modifier nonReentrant() {
        bool entered;
        assembly {
            entered := tload(GUARD_SLOT)
        }
        if (entered) revert Reentrancy();
        assembly {
            tstore(GUARD_SLOT, 1)
        }
        _;
        assembly {
            tstore(GUARD_SLOT, 0)
        }
    }

    // --------------------------------------------------------------- deposits

    /// @notice Add msg.value ETH to the channel's holdings.  Anyone may deposit.
    /// Funding order matters when a channel may stay underfunded: see docs (participant A first).
    function depositEthToChannel(bytes32 channelId) external payable {
        uint256 total;
        // cannot overflow: bounded by the ETH supply
        unchecked {
            total = holdings[channelId][address(0)] + msg.value;
        }
        holdings[channelId][address(0)] = total;
        emit Deposited(channelId, address(0), total);
    }

    /// @notice Pull `amount` of ERC-20 `asset` from msg.sender (needs approval) into the channel.
    /// Credits what actually arrived (balance difference), so fee-on-transfer tokens cannot
    /// inflate holdings beyond what the contract holds.
    function deposit(bytes32 channelId, address asset, uint256 amount) external nonReentrant {
        if (amount == 0 || asset == address(0)) revert ZeroDeposit();
        uint256 before = _balanceOf(asset);
        _callToken(asset, abi.encodeWithSelector(0x23b872dd, msg.sender, address(this), amount));
        uint256 received = _balanceOf(asset) - before;
        if (received == 0) revert ZeroDeposit();
        uint256 total = holdings[channelId][asset] + received;
        holdings[channelId][asset] = total;
        emit Deposited(channelId, asset, total);
    }

    // ------------------------------------------------------------ conclusions

    /// @notice Cooperative close: a final state signed by both pays out at once.  Anyone may send it.
    /// Clears a registered dispute, if any (both signed the final state, which ends the channel).
    function close(Params calldata p, State calldata s, bytes calldata sigs) external nonReentrant {
        if (!s.isFinal) revert NotFinal();
        _checkSigned(p, s, sigs);
        bytes32 cid = s.channelId;
        if (disputes[cid] != 0) delete disputes[cid];
        emit Concluded(cid, s.version, true);
        _payAll(p, s, type(uint256).max);
    }

    /// @notice Register a co-signed state; starts the challenge window.  Anyone may send it.
    function claim(Params calldata p, State calldata s, bytes calldata sigs) external {
        bytes32 h = _checkSigned(p, s, sigs);
        bytes32 cid = s.channelId;
        if (disputes[cid] != 0) revert DisputeExists();
        uint64 version = s.version;
        // checked uint64: a duration that overflows cannot be claimed (it would never end anyway)
        uint64 deadline = uint64(block.timestamp) + p.challengeDuration;
        disputes[cid] = _record(h, version, deadline);
        emit Claimed(cid, version, deadline, h);
    }

    /// @notice The fraud proof: replace the registered state by a strictly newer co-signed one,
    /// while the window is open.  Anyone may send it.  The deadline does not move.
    function refute(Params calldata p, Dispute calldata d, State calldata s, bytes calldata sigs)
        external
    {
        bytes32 h = _checkSigned(p, s, sigs);
        bytes32 cid = s.channelId;
        uint64 deadline = d.deadline;
        bytes32 rec = disputes[cid];
        if (rec == 0) revert NoDispute();
        if (rec != _record(d.stateHash, d.version, deadline)) revert DisputeMismatch();
        if (block.timestamp >= deadline) revert WindowClosed();
        uint64 version = s.version;
        if (version <= d.version) revert NotNewer();
        disputes[cid] = _record(h, version, deadline);
        emit Refuted(cid, version, deadline, h);
    }

    /// @notice After the window, pay out by the registered state (supplied again in calldata,
    /// checked against the stored record).  Anyone may send it.
    function settle(Params calldata p, State calldata s, uint64 deadline) external nonReentrant {
        bytes32 cid = _channelId(p);
        if (cid != s.channelId) revert ChannelMismatch();
        bytes32 rec = disputes[cid];
        if (rec == 0) revert NoDispute();
        if (rec != _record(_stateHash(s), s.version, deadline)) revert DisputeMismatch();
        if (block.timestamp < deadline) revert WindowOpen();
        delete disputes[cid];
        emit Concluded(cid, s.version, false);
        _payAll(p, s, uint256(deadline) + APP_GRACE);
    }

    /// @notice Withdraw msg.sender's credited `asset` (pushes that failed) to `to`, with all gas.
    function withdraw(address asset, address to) external nonReentrant {
        uint256 amount = credits[msg.sender][asset];
        if (amount == 0) revert NothingToWithdraw();
        credits[msg.sender][asset] = 0;
        emit Withdrawn(msg.sender, asset, to, amount);
        if (asset == address(0)) {
            (bool ok,) = to.call{value: amount}("");
            if (!ok) revert TokenTransferFailed(asset);
        } else {
            _callToken(asset, abi.encodeWithSelector(0xa9059cbb, to, amount));
        }
    }

    // ------------------------------------------------------------------ views

    /// @notice keccak256(abi.encode(params)), the channel id.
    function channelIdOf(Params calldata p) external pure returns (bytes32) {
        return _channelId(p);
    }

    /// @notice EIP-712 hashStruct(State), as Python's channel.eip712.state_struct_hash.
    function stateHashOf(State calldata s) external pure returns (bytes32) {
        return _stateHash(s);
    }

    function domainSeparator() external view returns (bytes32) {
        return _domain();
    }

    /// @notice Dispute status: 0 none, 1 open (refutable), 2 settleable, 3 `d` is not the registered dispute.
    function disputeStatus(bytes32 channelId, Dispute calldata d) external view returns (uint8) {
        bytes32 rec = disputes[channelId];
        if (rec == 0) return 0;
        if (rec != _record(d.stateHash, d.version, d.deadline)) return 3;
        return block.timestamp < d.deadline ? 1 : 2;
    }

    // ---------------------------------------------------------------- payouts

    /// Pays every allocation of `s` from the channel's holdings.  Rule per asset, from what the
    /// channel holds: balanceA first, then balanceB, then the locked amount split by the app;
    /// a state never pays more than the holding (a shortfall falls on the later claims), and
    /// any surplus stays in holdings.
    function _payAll(Params calldata p, State calldata s, uint256 appFallbackAt) private {
        bytes32 cid = s.channelId;
        Allocation[] calldata al = s.allocations;
        for (uint256 i; i < al.length; ++i) {
            Allocation calldata x = al[i];
            address asset = x.asset;
            (uint256 toA, uint256 toB) = _shares(p, s, x, holdings[cid][asset], appFallbackAt);
            holdings[cid][asset] -= toA + toB;
            emit Payout(cid, asset, toA, toB);
            _push(asset, p.participantA, toA);
            _push(asset, p.participantB, toB);
        }
    }

    /// What A and B get of allocation `x` out of `avail` held.
    function _shares(
        Params calldata p,
        State calldata s,
        Allocation calldata x,
        uint256 avail,
        uint256 appFallbackAt
    ) private view returns (uint256 toA, uint256 toB) {
        toA = x.balanceA < avail ? x.balanceA : avail;
        avail -= toA;
        toB = x.balanceB < avail ? x.balanceB : avail;
        avail -= toB;
        uint256 locked = x.locked;
        if (locked != 0 && avail != 0) {
            (uint256 la,) = _split(p.app, s.channelId, x.asset, locked, s.appData, appFallbackAt);
            uint256 lk = locked < avail ? locked : avail;
            if (la > lk) la = lk;
            toA += la;
            toB += lk - la;
        }
    }

    /// Ask the app how to split `locked`.  It always gets APP_GAS (the caller cannot starve it);
    /// if it reverts or returns a split that does not add up, settle reverts until
    /// `fallbackAt`, after which the amount is split evenly (A gets the odd wei).
    function _split(
        address app,
        bytes32 cid,
        address asset,
        uint256 locked,
        bytes calldata appData,
        uint256 fallbackAt
    ) private view returns (uint256 toA, uint256 toB) {
        bool ok;
        if (app.code.length != 0) {
            if (gasleft() < APP_GAS + APP_GAS / 63 + 10_000) revert GasTooLow();
            bytes memory ret;
            (ok, ret) =
                app.staticcall{gas: APP_GAS}(abi.encodeCall(IChannelApp.split, (cid, asset, locked, appData)));
            if (ok && ret.length == 64) {
                (toA, toB) = abi.decode(ret, (uint256, uint256));
                ok = toA <= locked && toB == locked - toA;
            } else {
                ok = false;
            }
        }
        if (ok) return (toA, toB);
        if (block.timestamp < fallbackAt) revert AppFailed(asset);
        toB = locked / 2;
        toA = locked - toB;
    }

    /// Push `amount` of `asset` to `to` with bounded gas; on failure credit it for withdraw().
    function _push(address asset, address to, uint256 amount) private {
        if (amount == 0) return;
        bool ok;
        if (asset == address(0)) {
            if (gasleft() < PUSH_GAS + PUSH_GAS / 63 + 5_000) revert GasTooLow();
            assembly {
                ok := call(PUSH_GAS, to, amount, 0, 0, 0, 0)
            }
        } else {
            if (gasleft() < TOKEN_PUSH_GAS + TOKEN_PUSH_GAS / 63 + 30_000) revert GasTooLow();
            ok = _tryToken(asset, abi.encodeWithSelector(0xa9059cbb, to, amount), TOKEN_PUSH_GAS);
        }
        if (!ok) {
            credits[to][asset] += amount;
            emit Credited(to, asset, amount);
        }
    }

    // ---------------------------------------------------------------- helpers

    /// Checks params against this chain and contract, the state against the params, and both
    /// signatures; returns the state's EIP-712 struct hash.
    function _checkSigned(Params calldata p, State calldata s, bytes calldata sigs)
        private
        view
        returns (bytes32 h)
    {
        if (p.chainId != block.chainid || p.adjudicator != address(this)) revert WrongChain();
        if (_channelId(p) != s.channelId) revert ChannelMismatch();
        h = _stateHash(s);
        bytes32 digest;
        bytes32 dom = _domain();
        assembly {
            let m := mload(0x40)
            mstore(m, 0x1901000000000000000000000000000000000000000000000000000000000000)
            mstore(add(m, 0x02), dom)
            mstore(add(m, 0x22), h)
            digest := keccak256(m, 0x42)
        }
        if (sigs.length != 130) revert BadSignature();
        uint256 off;
        assembly {
            off := sigs.offset
        }
        if (_recover(digest, off) != p.participantA) revert BadSignature();
        if (_recover(digest, off + 65) != p.participantB) revert BadSignature();
    }

    /// ecrecover of r ‖ s ‖ v at calldata `off`, enforcing v in {27, 28} and s <= n/2.
    /// Returns address(1) (never a participant) for anything malformed.
    function _recover(bytes32 digest, uint256 off) private view returns (address signer) {
        assembly {
            let r := calldataload(off)
            let s := calldataload(add(off, 0x20))
            let v := byte(0, calldataload(add(off, 0x40)))
            signer := 1
            if and(lt(s, add(HALF_N, 1)), or(eq(v, 27), eq(v, 28))) {
                let m := mload(0x40)
                mstore(m, digest)
                mstore(add(m, 0x20), v)
                mstore(add(m, 0x40), r)
                mstore(add(m, 0x60), s)
                mstore(0, 0)
                if staticcall(gas(), 1, m, 0x80, 0, 0x20) {
                    signer := mload(0)
                }
                if iszero(signer) { signer := 1 }
            }
        }
    }

    function _record(bytes32 h, uint64 version, uint64 deadline) private pure returns (bytes32 r) {
        assembly {
            let m := mload(0x40)
            mstore(m, h)
            mstore(add(m, 0x20), version)
            mstore(add(m, 0x40), deadline)
            r := keccak256(m, 0x60)
        }
    }

    function _channelId(Params calldata p) private pure returns (bytes32 id) {
        assembly {
            let m := mload(0x40)
            calldatacopy(m, p, 0xe0)
            id := keccak256(m, 0xe0)
        }
    }

    /// EIP-712 hashStruct(State).  Raw calldata words are hashed; a dirty (non-canonical)
    /// encoding hashes differently from what was signed and so fails the signature check.
    function _stateHash(State calldata s) private pure returns (bytes32 h) {
        Allocation[] calldata al = s.allocations;
        bytes calldata appData = s.appData;
        bytes32 cid = s.channelId;
        uint64 version = s.version;
        bool fin = s.isFinal;
        bytes32 allocTypehash = ALLOCATION_TYPEHASH;
        bytes32 stateTypehash = STATE_TYPEHASH;
        assembly {
            let m := mload(0x40)
            let n := al.length
            let hs := add(m, 0xa0)
            mstore(m, allocTypehash)
            for { let i := 0 } lt(i, n) { i := add(i, 1) } {
                calldatacopy(add(m, 0x20), add(al.offset, mul(i, 0x80)), 0x80)
                mstore(add(hs, mul(i, 0x20)), keccak256(m, 0xa0))
            }
            let allocHash := keccak256(hs, mul(n, 0x20))
            calldatacopy(m, appData.offset, appData.length)
            let appHash := keccak256(m, appData.length)
            mstore(m, stateTypehash)
            mstore(add(m, 0x20), cid)
            mstore(add(m, 0x40), version)
            mstore(add(m, 0x60), allocHash)
            mstore(add(m, 0x80), appHash)
            mstore(add(m, 0xa0), fin)
            h := keccak256(m, 0xc0)
        }
    }

    function _domain() private view returns (bytes32) {
        return block.chainid == _chainId ? _domainSeparator : _buildDomainSeparator();
    }

    function _buildDomainSeparator() private view returns (bytes32) {
        return keccak256(
            abi.encode(DOMAIN_TYPEHASH, keccak256("optichannel"), keccak256("1"), block.chainid, address(this))
        );
    }

    function _balanceOf(address token) private view returns (uint256 bal) {
        (bool ok, bytes memory ret) = token.staticcall(abi.encodeWithSelector(0x70a08231, address(this)));
        if (!ok || ret.length < 32) revert TokenTransferFailed(token);
        bal = abi.decode(ret, (uint256));
    }

    /// A token call that must succeed (deposit, withdraw).
    function _callToken(address token, bytes memory data) private {
        if (!_tryToken(token, data, gasleft())) revert TokenTransferFailed(token);
    }

    /// Low-level ERC-20 call accepting no return data (old tokens) or a true word; copies at
    /// most 32 bytes of return data so a token cannot grief with a huge return.
    function _tryToken(address token, bytes memory data, uint256 gasLimit) private returns (bool ok) {
        if (token.code.length == 0) return false;
        assembly {
            mstore(0, 0)
            ok := call(gasLimit, token, 0, add(data, 0x20), mload(data), 0, 0x20)
            if ok {
                let rs := returndatasize()
                if rs { ok := and(gt(rs, 0x1f), eq(mload(0), 1)) }
            }
        }
    }
}
