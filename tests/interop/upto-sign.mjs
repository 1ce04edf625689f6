#!/usr/bin/env node
// Print the PaymentPayload the OFFICIAL x402 client (@x402/core x402Client with @x402/evm UptoEvmScheme and
// ExactEvmScheme, viem account signer) makes for a 402, as one JSON line on stdout. No HTTP: the 402's
// PaymentRequired JSON (v2, as in the PAYMENT-REQUIRED header) is read from stdin.
//
// An EIP-2612 permit (extensions.eip2612GasSponsoring) is only signed when the 402 declares the extension and
// the client can read the chain: it reads the buyer's Permit2 allowance (it signs no permit if that covers
// the amount) and the token's `nonces(buyer)`.
//   --rpc URL            the client reads them from that chain (UptoEvmScheme's own `rpcUrl` option).
//   --eip2612-nonce N    no chain: the signer answers those two reads itself, allowance 0 and nonce N (the
//                        only chain data the client uses), so that vectors need no token with `permit`.
//   neither              the client has no way to read the chain and signs no permit.
//
// Exit codes: 0 printed; 1 the client threw (message on stderr); 2 usage error.
import { commandLine } from "./cli.mjs";

const USAGE = `usage: node upto-sign.mjs --key-env ENV_NAME [--rpc URL | --eip2612-nonce N] < payment-required.json
The buyer's private key (0x + 64 hex) is read from the environment variable named by --key-env.`;

const { opts, usage } = commandLine("upto-sign.mjs", USAGE, {
  "key-env": { type: "string" },
  rpc: { type: "string" },
  "eip2612-nonce": { type: "string" },
});
if (!opts["key-env"]) usage("--key-env is required");
const key = process.env[opts["key-env"]];
if (!key || !/^0x[0-9a-fA-F]{64}$/.test(key)) usage(`${opts["key-env"]} is not a 0x-prefixed 32-byte hex private key`);
if (opts.rpc !== undefined && opts["eip2612-nonce"] !== undefined) usage("--rpc and --eip2612-nonce exclude each other");
if (opts["eip2612-nonce"] !== undefined && !/^\d+$/.test(opts["eip2612-nonce"])) usage("--eip2612-nonce must be an integer");

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

try {
  const { x402Client } = await import("@x402/core/client");
  const { ExactEvmScheme } = await import("@x402/evm/exact/client");
  const { UptoEvmScheme } = await import("@x402/evm/upto/client");
  const { privateKeyToAccount } = await import("viem/accounts");

  const paymentRequired = JSON.parse(await readStdin());
  const account = privateKeyToAccount(key);
  let signer = account;
  let options;
  if (opts.rpc !== undefined) {
    options = { rpcUrl: opts.rpc };
  } else if (opts["eip2612-nonce"] !== undefined) {
    const nonce = BigInt(opts["eip2612-nonce"]);
    signer = {
      address: account.address,
      signTypedData: (message) => account.signTypedData(message),
      async readContract({ functionName }) {
        if (functionName === "allowance") return 0n;
        if (functionName === "nonces") return nonce;
        throw new Error(`upto-sign.mjs answers no ${functionName}() without --rpc`);
      },
    };
  }
  const client = new x402Client()
    .register("eip155:*", new ExactEvmScheme(signer, options))
    .register("eip155:*", new UptoEvmScheme(signer, options))
    // Test tokens are no default asset of the SDK's, and vectors may exceed its $1 cap.
    .setSpendControls(false);
  const payload = await client.createPaymentPayload(paymentRequired);
  process.stdout.write(`${JSON.stringify(payload)}\n`, () => process.exit(0));
} catch (e) {
  process.stderr.write(`upto-sign.mjs: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exit(1);
}
