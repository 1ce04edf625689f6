#!/usr/bin/env node
// Sign payments with the OFFICIAL v2 client in bulk, without sending them, for load tests that need many
// concurrent buyers (one node process per payment would not fit on a small machine). Prints ONE JSON line:
//   {"headers":["<PAYMENT-SIGNATURE value>", ...]}   (key by key, --per-key payments each)
//
//   node sign.mjs --payment-required VALUE --keys-env ENV_NAME [--per-key 1] [--max-amount ATOMIC]
//
// VALUE is a 402's PAYMENT-REQUIRED header, as received. The buyers' private keys (0x + 64 hex each,
// comma-separated) are read from the environment variable named by --keys-env. Each payment is what
// @x402/fetch's wrapFetchWithPayment would send: x402HTTPClient.getPaymentRequiredResponse, then
// createPaymentPayload (@x402/evm ExactEvmScheme, a viem account) and encodePaymentSignatureHeader.
//
// Exit codes: 0 signed; 1 the client threw (message on stderr); 2 usage error.
import { commandLine } from "./cli.mjs";

const USAGE = `usage: node sign.mjs --payment-required VALUE --keys-env ENV_NAME [--per-key 1] [--max-amount ATOMIC]
The buyers' private keys (0x + 64 hex, comma-separated) are read from the environment variable named by --keys-env.`;

const { opts, usage } = commandLine("sign.mjs", USAGE, {
  "payment-required": { type: "string" },
  "keys-env": { type: "string" },
  "per-key": { type: "string", default: "1" },
  "max-amount": { type: "string", default: "1000000" },
});
if (!opts["payment-required"]) usage("--payment-required is required");
if (!opts["keys-env"]) usage("--keys-env is required");
const keys = (process.env[opts["keys-env"]] || "").split(",").filter((k) => k !== "");
if (keys.length === 0) usage(`environment variable ${opts["keys-env"]} is empty or unset`);
if (!keys.every((k) => /^0x[0-9a-fA-F]{64}$/.test(k))) usage(`${opts["keys-env"]} holds a key that is not 0x + 64 hex`);
if (!/^[1-9]\d*$/.test(opts["per-key"])) usage("--per-key must be a positive integer");
if (!/^\d+$/.test(opts["max-amount"])) usage("--max-amount must be an integer (atomic units)");
const maxAmount = BigInt(opts["max-amount"]);

try {
  const { x402Client, x402HTTPClient } = await import("@x402/core/client");
  const { ExactEvmScheme } = await import("@x402/evm/exact/client");
  const { privateKeyToAccount } = await import("viem/accounts");
  const headers = [];
  for (const key of keys) {
    // As pay.mjs: any asset (a test token is not a built-in stablecoin), capped by atomic amount.
    const client = new x402Client()
      .register("eip155:*", new ExactEvmScheme(privateKeyToAccount(key)))
      .setSpendControls({ allowedAssets: true, maxAmountPerPayment: false })
      .registerPolicy((version, reqs) => reqs.filter((r) => BigInt(version === 1 ? r.maxAmountRequired : r.amount) <= maxAmount));
    const http = new x402HTTPClient(client);
    const required = http.getPaymentRequiredResponse((name) =>
      name.toLowerCase() === "payment-required" ? opts["payment-required"] : null,
    );
    for (let i = 0; i < Number(opts["per-key"]); i++) {
      const payload = await http.createPaymentPayload(required);
      const encoded = http.encodePaymentSignatureHeader(payload);
      const value = encoded["PAYMENT-SIGNATURE"];
      if (!value) throw new Error(`the client encoded no PAYMENT-SIGNATURE header: ${Object.keys(encoded)}`);
      headers.push(value);
    }
  }
  process.stdout.write(`${JSON.stringify({ headers })}\n`, () => process.exit(0));
} catch (e) {
  process.stderr.write(`sign.mjs: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exit(1);
}
