// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title Multicall
/// @notice Multicall3's `aggregate3`, with the same ABI, for tests on a local chain. The gateway's batched
///         settlement sends many EIP-3009 `transferWithAuthorization` calls in one transaction through it, each
///         allowed to fail alone. Public chains already have Multicall3 at
///         0xcA11bde05977b3631167028862bE2a173976CA11, which the gateway uses by default.
contract Multicall {
    struct Call3 {
        address target;
        bool allowFailure;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    function aggregate3(Call3[] calldata calls) external payable returns (Result[] memory results) {
        uint256 length = calls.length;
        results = new Result[](length);
        for (uint256 i = 0; i < length; ++i) {
            Call3 calldata call = calls[i];
            (bool success, bytes memory returnData) = call.target.call(call.callData);
            require(success || call.allowFailure, "Multicall3: call failed");
            results[i] = Result(success, returnData);
        }
    }
}
