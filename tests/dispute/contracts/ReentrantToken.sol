// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {TestToken} from "./TestToken.sol";

/// An ERC-20 that, inside transfer and transferFrom, calls back into a target with
/// armed calldata (e.g. settle, close or withdraw again) and records whether it worked.
contract ReentrantToken is TestToken {
    address public target;
    bytes public payload;
    uint256 public reentrySucceeded;
    uint256 public reentryAttempts;
    bool private inside;

    function arm(address target_, bytes calldata payload_) external {
        target = target_;
        payload = payload_;
    }

    function transfer(address to, uint256 amount) public override returns (bool) {
        _attack();
        return super.transfer(to, amount);
    }

    function transferFrom(address from, address to, uint256 amount) public override returns (bool) {
        _attack();
        return super.transferFrom(from, to, amount);
    }

    function _attack() private {
        if (target == address(0) || inside) return;
        inside = true;
        reentryAttempts += 1;
        (bool ok,) = target.call(payload);
        if (ok) reentrySucceeded += 1;
        inside = false;
    }
}
