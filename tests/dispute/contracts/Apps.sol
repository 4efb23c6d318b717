// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// Splits the locked amount by a share in basis points for A, read from appData
/// (abi.encode(uint256 bpsA)); empty appData splits evenly.
contract TrivialApp {
    function split(bytes32, address, uint256 locked, bytes calldata appData)
        external
        pure
        returns (uint256 toA, uint256 toB)
    {
        uint256 bps = appData.length == 0 ? 5000 : abi.decode(appData, (uint256));
        toA = locked * bps / 10_000;
        toB = locked - toA;
    }
}

/// A broken app: mode 0 reverts, mode 1 returns a split that does not add up,
/// mode 2 burns all its gas.  The mode is appData's first word.
contract BrokenApp {
    function split(bytes32, address, uint256 locked, bytes calldata appData)
        external
        pure
        returns (uint256, uint256)
    {
        uint256 mode = abi.decode(appData, (uint256));
        if (mode == 0) revert("broken");
        if (mode == 1) return (locked, 1);
        while (true) {}
        return (0, 0);
    }
}
