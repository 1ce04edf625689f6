#!/usr/bin/env python3
"""Pay with the OFFICIAL Python x402 SDK (x402 on PyPI, pinned in python/requirements.txt) and print one JSON line.

  pay.py --url URL --key-env NAME [--method M] [--header 'K: v']... [--body S] [--max-amount ATOMIC]
         [--timeout-ms MS] [--rpc URL]
      Pays one URL with the SDK's requests client (x402_requests) and its EVM client schemes: exact (v2
      eip155:* and the v1 networks) and upto (v2 eip155:*). Prints, as pay.mjs does:
      {"status":N,"body":"...","settlement":{...}|null,"header":"payment-response"|"x-payment-response"|null}
      with "paymentRequired" on a final v2 402 that carries a PAYMENT-REQUIRED header, and "decodeError" when
      the settlement header could not be decoded.

  pay.py --payload --key-env NAME [--rpc URL | --eip2612-nonce N] < payment-required.json
      No HTTP: prints the PaymentPayload the SDK would send for the 402's PaymentRequired JSON on stdin.

An EIP-2612 permit (extensions.eip2612GasSponsoring) is signed only when the 402 declares the extension and the
signer can read the chain (the buyer's Permit2 allowance, and the token's nonces(buyer)): with --rpc URL it
reads that chain (the SDK's EthAccountSignerWithRPC); with --eip2612-nonce N (--payload only) the signer
answers those two reads itself, allowance 0 and nonce N, so that vectors need no token with `permit`.

The buyer's private key (0x + 64 hex) is read from the environment variable named by --key-env.
Exit codes: 0 done (whatever the HTTP status); 1 the SDK raised (message on stderr); 2 usage error.
"""

import argparse
import json
import os
import re
import sys

USAGE_EXIT = 2


def usage(message):
    sys.stderr.write(f"pay.py: {message}\n")
    sys.exit(USAGE_EXIT)


def parse_args():
    parser = argparse.ArgumentParser(prog="pay.py", add_help=True)
    parser.add_argument("--url")
    parser.add_argument("--payload", action="store_true")
    parser.add_argument("--key-env", required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--body")
    parser.add_argument("--max-amount", default="1000000")
    parser.add_argument("--timeout-ms", default="60000")
    parser.add_argument("--rpc")
    parser.add_argument("--eip2612-nonce")
    try:
        args = parser.parse_args()
    except SystemExit as exit:
        sys.exit(USAGE_EXIT if exit.code else 0)
    key = os.environ.get(args.key_env, "")
    if not re.fullmatch(r"0x[0-9a-fA-F]{64}", key):
        usage(f"{args.key_env} is not a 0x-prefixed 32-byte hex private key")
    if args.payload == bool(args.url):
        usage("give exactly one of --url and --payload")
    if args.url and not re.match(r"https?://", args.url):
        usage("--url must be http(s)")
    if args.eip2612_nonce is not None:
        if not args.payload or args.rpc:
            usage("--eip2612-nonce goes with --payload, without --rpc")
        if not args.eip2612_nonce.isdigit():
            usage("--eip2612-nonce must be an integer")
    if not args.max_amount.isdigit():
        usage("--max-amount must be an integer (atomic units)")
    if not args.timeout_ms.isdigit():
        usage("--timeout-ms must be an integer")
    return args, key


def signer_for(args, key):
    from eth_account import Account
    from x402.mechanisms.evm.signers import EthAccountSigner, EthAccountSignerWithRPC

    account = Account.from_key(key)
    if args.rpc:
        return EthAccountSignerWithRPC(account, rpc_url=args.rpc)
    if args.eip2612_nonce is None:
        return EthAccountSigner(account)
    nonce = int(args.eip2612_nonce)

    class AnsweringSigner(EthAccountSigner):
        def read_contract(self, address, abi, function_name, *call_args):
            if function_name == "allowance":
                return 0
            if function_name == "nonces":
                return nonce
            raise RuntimeError(f"pay.py answers no {function_name}() without --rpc")

    return AnsweringSigner(account)


def client_for(signer, max_amount):
    from x402 import max_amount as max_amount_policy
    from x402 import x402ClientSync
    from x402.mechanisms.evm.exact import register_exact_evm_client
    from x402.mechanisms.evm.upto import UptoEvmClientScheme

    client = x402ClientSync()
    register_exact_evm_client(client, signer)
    client.register("eip155:*", UptoEvmClientScheme(signer))
    # The default spend controls only pay the SDK's built-in stablecoins, capped at $1: a freshly deployed
    # test token would be refused. Accept any asset; cap by atomic amount instead.
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": False})
    client.register_policy(max_amount_policy(max_amount))
    return client


def print_payload(client):
    from x402.schemas import PaymentRequired

    payment_required = PaymentRequired.model_validate(json.loads(sys.stdin.read()))
    payload = client.create_payment_payload(payment_required)
    return json.loads(payload.model_dump_json(by_alias=True, exclude_none=True))


def pay(client, args):
    from x402.http.clients import x402_requests
    from x402.http.utils import decode_payment_required_header, decode_payment_response_header

    headers = {}
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            usage(f"bad --header (want 'Name: value'): {header}")
        headers[name.strip()] = value.strip()
    session = x402_requests(client)
    response = session.request(
        args.method.upper(),
        args.url,
        headers=headers,
        data=args.body.encode() if args.body is not None else None,
        timeout=int(args.timeout_ms) / 1000,
    )
    line = {"status": response.status_code, "body": response.text, "settlement": None, "header": None}
    raw = response.headers.get("PAYMENT-RESPONSE")
    if raw:
        line["header"] = "payment-response"
    else:
        raw = response.headers.get("X-PAYMENT-RESPONSE")
        if raw:
            line["header"] = "x-payment-response"
    if raw:
        try:
            line["settlement"] = decode_payment_response_header(raw).model_dump(by_alias=True, exclude_none=True)
        except Exception as error:  # noqa: BLE001 - reported, as pay.mjs does
            line["decodeError"] = str(error)
    required = response.headers.get("PAYMENT-REQUIRED") if response.status_code == 402 else None
    if required:
        try:
            decoded = decode_payment_required_header(required)
            line["paymentRequired"] = decoded.model_dump(by_alias=True, exclude_none=True)
        except Exception as error:  # noqa: BLE001
            line["paymentRequiredDecodeError"] = str(error)
    return line


def main():
    args, key = parse_args()
    try:
        client = client_for(signer_for(args, key), int(args.max_amount))
        line = print_payload(client) if args.payload else pay(client, args)
    except Exception as error:  # noqa: BLE001 - any SDK failure is the client's error
        sys.stderr.write(f"pay.py: {type(error).__name__}: {error}\n")
        sys.exit(1)
    sys.stdout.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
