// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// Receives ETH and re-enters a target with armed calldata (the adjudicator's settle,
/// close or withdraw).  Its runtime code is placed at a participant's address with
/// anvil_setCode, so the participant's key still signs states.
contract ReentrantReceiver {
    address public target;
    bytes public payload;
    uint256 public reentered; // successful re-entries (only writable when given enough gas)

    function arm(address target_, bytes calldata payload_) external {
        target = target_;
        payload = payload_;
    }

    /// Lets the participant withdraw its credit through this code (the call comes from here).
    function pull(address adjudicator, address asset, address to) external {
        (bool ok, bytes memory ret) =
            adjudicator.call(abi.encodeWithSignature("withdraw(address,address)", asset, to));
        if (!ok) {
            assembly {
                revert(add(ret, 0x20), mload(ret))
            }
        }
    }

    receive() external payable {
        address t = target;
        if (t != address(0)) {
            (bool ok,) = t.call(payload);
            if (ok) reentered += 1;
        }
    }
}

/// Refuses every ETH transfer.
contract RevertingReceiver {
    function pull(address adjudicator, address asset, address to) external {
        (bool ok, bytes memory ret) =
            adjudicator.call(abi.encodeWithSignature("withdraw(address,address)", asset, to));
        if (!ok) {
            assembly {
                revert(add(ret, 0x20), mload(ret))
            }
        }
    }

    receive() external payable {
        revert("no thanks");
    }
}

/// Burns all the gas it is given on an ETH transfer.
contract GasBurner {
    function pull(address adjudicator, address asset, address to) external {
        (bool ok, bytes memory ret) =
            adjudicator.call(abi.encodeWithSignature("withdraw(address,address)", asset, to));
        if (!ok) {
            assembly {
                revert(add(ret, 0x20), mload(ret))
            }
        }
    }

    receive() external payable {
        while (true) {}
    }
}
