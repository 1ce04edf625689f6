#!/usr/bin/env node
// Pay one URL with an OFFICIAL x402 client and print one JSON line on stdout:
//   {"status":200,"body":"...","settlement":{...}|null,"header":"payment-response"|"x-payment-response"|null}
//
//   --client v2  @x402/fetch wrapFetchWithPayment + @x402/evm ExactEvmScheme and UptoEvmScheme (eip155:*),
//                viem account signer. Sends PAYMENT-SIGNATURE. Reads PAYMENT-RESPONSE, then X-PAYMENT-RESPONSE
//                (as the library does). With --rpc URL the schemes read that chain where they need it: for
//                an EIP-2612 permit (extensions.eip2612GasSponsoring), the buyer's Permit2 allowance and the
//                token's nonces(buyer); without it they sign no permit.
//   --client v1  legacy x402-fetch wrapFetchWithPayment + viem wallet client on chain 84532 (base-sepolia).
//                Sends X-PAYMENT. Reads X-PAYMENT-RESPONSE only (the v1 library knows no other header).
//
// "settlement" is the response header decoded by the client library's own decoder
// (@x402/fetch decodePaymentResponseHeader / x402-fetch decodeXPaymentResponse). If the header is
// present but cannot be decoded, "settlement" is null and "decodeError" carries the decoder's message.
// v2 only: when the final status is 402 and a PAYMENT-REQUIRED header is present, the line also has
// "paymentRequired" (decoded by @x402/core's decodePaymentRequiredHeader; its `error` is the reason).
//
// Exit codes: 0 the HTTP exchange happened (whatever the status); 1 the client threw (message on
// stderr); 2 usage error.
import { commandLine } from "./cli.mjs";

const USAGE = `usage: node pay.mjs --url URL --client v2|v1 --key-env ENV_NAME
         [--method GET] [--header 'Name: value']... [--body STRING]
         [--max-amount ATOMIC (default 1000000)] [--timeout-ms MS (default 60000)] [--rpc URL (v2)]
The buyer's private key (0x + 64 hex) is read from the environment variable named by --key-env.`;

const { opts, usage } = commandLine("pay.mjs", USAGE, {
  url: { type: "string" },
  client: { type: "string" },
  "key-env": { type: "string" },
  method: { type: "string", default: "GET" },
  header: { type: "string", multiple: true, default: [] },
  body: { type: "string" },
  "max-amount": { type: "string", default: "1000000" },
  "timeout-ms": { type: "string", default: "60000" },
  rpc: { type: "string" },
});
if (!opts.url) usage("--url is required");
let url;
try {
  url = new URL(opts.url);
} catch {
  usage(`invalid --url: ${opts.url}`);
}
if (url.protocol !== "http:" && url.protocol !== "https:") usage("--url must be http(s)");
if (opts.client !== "v2" && opts.client !== "v1") usage("--client must be v2 or v1");
if (!opts["key-env"]) usage("--key-env is required");
const key = process.env[opts["key-env"]];
if (!key) usage(`environment variable ${opts["key-env"]} is empty or unset`);
if (!/^0x[0-9a-fA-F]{64}$/.test(key)) usage(`${opts["key-env"]} is not a 0x-prefixed 32-byte hex private key`);
if (!/^\d+$/.test(opts["max-amount"])) usage("--max-amount must be an integer (atomic units)");
if (!/^\d+$/.test(opts["timeout-ms"])) usage("--timeout-ms must be an integer");
const maxAmount = BigInt(opts["max-amount"]);
if (opts.rpc !== undefined) {
  if (opts.client !== "v2") usage("--rpc is for --client v2");
  try {
    if (!/^https?:$/.test(new URL(opts.rpc).protocol)) usage("--rpc must be http(s)");
  } catch {
    usage(`invalid --rpc: ${opts.rpc}`);
  }
}

const headers = {};
for (const h of opts.header) {
  const i = h.indexOf(":");
  if (i <= 0) usage(`bad --header (want 'Name: value'): ${h}`);
  headers[h.slice(0, i).trim()] = h.slice(i + 1).trim();
}
const init = {
  method: opts.method.toUpperCase(),
  headers,
  signal: AbortSignal.timeout(Number(opts["timeout-ms"])),
};
if (opts.body !== undefined) init.body = opts.body;

function finish(line, code) {
  process.stdout.write(`${JSON.stringify(line)}\n`, () => process.exit(code));
}

async function runV2() {
  const { wrapFetchWithPayment, x402Client, decodePaymentResponseHeader } = await import("@x402/fetch");
  const { decodePaymentRequiredHeader } = await import("@x402/core/http");
  const { ExactEvmScheme } = await import("@x402/evm/exact/client");
  const { UptoEvmScheme } = await import("@x402/evm/upto/client");
  const { privateKeyToAccount } = await import("viem/accounts");

  const account = privateKeyToAccount(key);
  const schemeOptions = opts.rpc === undefined ? undefined : { rpcUrl: opts.rpc };
  const client = new x402Client()
    .register("eip155:*", new ExactEvmScheme(account, schemeOptions))
    .register("eip155:*", new UptoEvmScheme(account, schemeOptions))
    // The default spend controls only pay the SDK's built-in stablecoins (a freshly deployed test
    // token is refused) and cap them at $1 (for upto: the ceiling). Accept any asset; cap by atomic
    // amount instead.
    .setSpendControls({ allowedAssets: true, maxAmountPerPayment: false })
    .registerPolicy((version, reqs) =>
      reqs.filter((r) => {
        const amount = version === 1 ? r.maxAmountRequired : r.amount;
        try {
          return BigInt(amount) <= maxAmount;
        } catch {
          return false;
        }
      }),
    );
  const fetchWithPayment = wrapFetchWithPayment(fetch, client);
  const res = await fetchWithPayment(url.toString(), init);
  const body = await res.text();
  // Same order as x402HTTPClient.getPaymentSettleResponse.
  let header = null;
  let raw = res.headers.get("PAYMENT-RESPONSE");
  if (raw) header = "payment-response";
  else {
    raw = res.headers.get("X-PAYMENT-RESPONSE");
    if (raw) header = "x-payment-response";
  }
  const line = { status: res.status, body, settlement: null, header };
  if (raw) {
    try {
      line.settlement = decodePaymentResponseHeader(raw);
    } catch (e) {
      line.decodeError = e instanceof Error ? e.message : String(e);
    }
  }
  // A 402 on the paid retry (verify failed, no matching requirements...) carries the reason in a
  // fresh PAYMENT-REQUIRED header; expose it decoded so tests can assert on `error`.
  const required = res.status === 402 ? res.headers.get("PAYMENT-REQUIRED") : null;
  if (required) {
    try {
      line.paymentRequired = decodePaymentRequiredHeader(required);
    } catch (e) {
      line.paymentRequiredDecodeError = e instanceof Error ? e.message : String(e);
    }
  }
  return line;
}

async function runV1() {
  const { wrapFetchWithPayment, decodeXPaymentResponse } = await import("x402-fetch");
  const { createWalletClient, http } = await import("viem");
  const { privateKeyToAccount } = await import("viem/accounts");
  const { baseSepolia } = await import("viem/chains");

  // Signing is local (EIP-712 with a local account); the transport is a dead loopback port so
  // nothing can leave the machine should the library ever try an RPC call.
  const wallet = createWalletClient({
    account: privateKeyToAccount(key),
    chain: baseSepolia,
    transport: http("http://127.0.0.1:1"),
  });
  const fetchWithPayment = wrapFetchWithPayment(fetch, wallet, maxAmount);
  const res = await fetchWithPayment(url.toString(), init);
  const body = await res.text();
  const raw = res.headers.get("X-PAYMENT-RESPONSE");
  const line = { status: res.status, body, settlement: null, header: raw ? "x-payment-response" : null };
  if (raw) {
    try {
      line.settlement = decodeXPaymentResponse(raw);
    } catch (e) {
      line.decodeError = e instanceof Error ? e.message : String(e);
    }
  }
  return line;
}

try {
  const line = opts.client === "v2" ? await runV2() : await runV1();
  finish(line, 0);
} catch (e) {
  const msg = e instanceof Error ? e.message : String(e);
  process.stderr.write(`pay.mjs (${opts.client}): ${msg}\n`);
  process.exit(1);
}
