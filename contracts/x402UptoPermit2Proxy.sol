// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @notice The part of Uniswap's Permit2 (SignatureTransfer) the proxy calls.
interface ISignatureTransfer {
    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    struct PermitTransferFrom {
        TokenPermissions permitted;
        uint256 nonce;
        uint256 deadline;
    }

    struct SignatureTransferDetails {
        address to;
        uint256 requestedAmount;
    }

    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external;
}

/// @notice EIP-2612 `permit`, as USDC implements it.
interface IERC20Permit {
    function permit(address owner, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external;
}

/// @title x402UptoPermit2Proxy
/// @notice The spender of x402 `upto` Permit2 signatures: the buyer signs a ceiling, bound by the witness to one
///         payee and one facilitator; that facilitator alone settles any amount up to the ceiling, paid to the
///         payee and nowhere else. Written for the gateway's tests from the x402 `upto` EVM spec and the ABI the
///         official x402 EVM package ships (`x402UptoPermit2ProxyABI`): the same functions, events, errors and
///         checks as the reference contract.
/// @dev    No constructor and no immutables: the runtime code works wherever it is placed (`anvil_setCode` at the
///         canonical address). Permit2 is at the same address on every chain.
contract x402UptoPermit2Proxy {
    ISignatureTransfer public constant PERMIT2 = ISignatureTransfer(0x000000000022D473030F116dDEE9F6B43aC78BA3);

    /// @notice What follows `PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,
    ///         uint256 deadline,` in the type Permit2 hashes: the witness field, then the referenced types in
    ///         alphabetical order (EIP-712).
    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)";

    bytes32 public constant WITNESS_TYPEHASH = keccak256("Witness(address to,address facilitator,uint256 validAfter)");

    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    /// @dev Field order as the shipped ABI has it (v last).
    struct EIP2612Permit {
        uint256 value;
        uint256 deadline;
        bytes32 r;
        bytes32 s;
        uint8 v;
    }

    event Settled();
    event SettledWithPermit();
    /// @notice The buyer's EIP-2612 permit was refused (already used, expired, or not supported); settlement went
    ///         on with whatever allowance Permit2 already had.
    event EIP2612PermitFailed(address indexed token, address indexed owner, bytes reason);

    error AmountExceedsPermitted();
    error UnauthorizedFacilitator();
    error InvalidAmount();
    error InvalidOwner();
    error InvalidDestination();
    error PaymentTooEarly();
    error Permit2612AmountMismatch();
    error ReentrancyGuardReentrantCall();

    uint256 private constant NOT_ENTERED = 1;
    uint256 private constant ENTERED = 2;
    /// @dev Starts at 0 (no constructor), which counts as not entered; left at NOT_ENTERED after the first call,
    ///      so later calls pay for a non-zero write only.
    uint256 private _status;

    modifier nonReentrant() {
        if (_status == ENTERED) revert ReentrancyGuardReentrantCall();
        _status = ENTERED;
        _;
        _status = NOT_ENTERED;
    }

    /// @notice Settles `amount` (at most the signed ceiling) of a Permit2 authorization the buyer already approved
    ///         Permit2 for.
    function settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        _authorize(permit, amount, witness);
        _settle(permit, amount, owner, witness, signature);
        emit Settled();
    }

    /// @notice Like `settle`, after submitting the buyer's EIP-2612 permit of the ceiling to Permit2, so a buyer who
    ///         never approved Permit2 pays without a transaction of its own. A refused permit does not stop the
    ///         settlement: the allowance may exist already (the permit was used before), and Permit2 itself refuses
    ///         a transfer it has no allowance for.
    function settleWithPermit(
        EIP2612Permit calldata permit2612,
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external nonReentrant {
        _authorize(permit, amount, witness);
        if (permit2612.value != permit.permitted.amount) revert Permit2612AmountMismatch();
        address token = permit.permitted.token;
        try IERC20Permit(token).permit(
            owner, address(PERMIT2), permit2612.value, permit2612.deadline, permit2612.v, permit2612.r, permit2612.s
        ) {} catch (bytes memory reason) {
            emit EIP2612PermitFailed(token, owner, reason);
        }
        _settle(permit, amount, owner, witness, signature);
        emit SettledWithPermit();
    }

    /// @dev Only the facilitator the buyer named chooses the amount, and never above the ceiling.
    function _authorize(ISignatureTransfer.PermitTransferFrom calldata permit, uint256 amount, Witness calldata witness)
        private
        view
    {
        if (amount > permit.permitted.amount) revert AmountExceedsPermitted();
        if (msg.sender != witness.facilitator) revert UnauthorizedFacilitator();
    }

    /// @dev Permit2 checks the signature over the permit with this witness (so `to`, `facilitator` and `validAfter`
    ///      are the buyer's), the deadline, the ceiling and the nonce, which it spends.
    function _settle(
        ISignatureTransfer.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) private {
        if (amount == 0) revert InvalidAmount();
        if (owner == address(0)) revert InvalidOwner();
        if (witness.to == address(0)) revert InvalidDestination();
        if (block.timestamp < witness.validAfter) revert PaymentTooEarly();
        bytes32 witnessHash = keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.facilitator, witness.validAfter));
        PERMIT2.permitWitnessTransferFrom(
            permit,
            ISignatureTransfer.SignatureTransferDetails({to: witness.to, requestedAmount: amount}),
            owner,
            witnessHash,
            WITNESS_TYPE_STRING,
            signature
        );
    }
}
