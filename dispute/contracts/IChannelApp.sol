// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title The interface a channel's app (params.app) implements.
/// @notice On payout the adjudicator asks the app how a state's locked amount of one asset
/// is split between participant A and participant B.  It is a static call with a fixed gas
/// budget (Adjudicator.APP_GAS); the answer must add up: toA + toB == locked.
interface IChannelApp {
    /// @param channelId the channel being paid out
    /// @param asset the asset (address(0) = ETH) whose locked amount is split
    /// @param locked the locked amount of `asset` in the state
    /// @param appData the state's app data (co-signed by both participants)
    /// @return toA the part paid to participant A
    /// @return toB the part paid to participant B
    function split(bytes32 channelId, address asset, uint256 locked, bytes calldata appData)
        external
        view
        returns (uint256 toA, uint256 toB);
}
