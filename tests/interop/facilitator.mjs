#!/usr/bin/env node
// The REFERENCE x402 facilitator (@x402/core x402Facilitator + @x402/evm exact schemes) served over
// HTTP on 127.0.0.1, for interop tests against a local chain (anvil).
//
//   node facilitator.mjs --rpc http://127.0.0.1:8545 --key-env FACILITATOR_KEY [--port 0]
//                        [--chain-id 84532] [--confirmation-timeout-ms 30000] [--no-multicall3]
//                        [--block-time-ms N]
//
// Endpoints (same shapes and status codes as the reference examples/typescript/facilitator):
//   POST /verify   {x402Version, paymentPayload, paymentRequirements} -> 200 VerifyResponse
//   POST /settle   {x402Version, paymentPayload, paymentRequirements} -> 200 SettleResponse
//   GET  /supported                                                   -> 200 SupportedResponse
//   400 {"error":"Missing paymentPayload or paymentRequirements"}; 500 {"error":msg} on exceptions.
// Registered kinds: v2 exact and upto on eip155:<chain-id>; v1 exact on the v1 name of that chain id
// ("base-sepolia" for 84532), when it has one.
//
// After listening, prints ONE line on stdout: {"port":N}. Logs go to stderr. SIGTERM/SIGINT stop it.
//
// --block-time-ms: the chain's block time, as viem's chain definitions give it (Base: 2000). viem polls for a
// receipt every half of it (at least 500 ms); without it, every 4 s. A receipt not there at the first look is
// only looked for again on a new block: on anvil's automine, where no block comes unless a transaction does,
// the test must also mine blocks on an interval (as a real chain does) or the wait lasts until the timeout.
//
// Multicall3: the EVM scheme diagnoses a failed verify simulation (insufficient balance, nonce used,
// wrong name/version) with one Multicall3 call at 0xcA11bde05977b3631167028862bE2a173976CA11. Anvil has
// no contract there, so every such failure would collapse into
// invalid_exact_evm_transaction_simulation_failed. Unless --no-multicall3 is given, the facilitator
// installs viem's Multicall3 runtime code there with anvil_setCode when the address is empty
// (silently skipped if the RPC refuses anvil_setCode).
import http from "node:http";
import { commandLine } from "./cli.mjs";

const USAGE = `usage: node facilitator.mjs --rpc URL --key-env ENV_NAME [--port N (0 = any)]
         [--chain-id 84532] [--confirmation-timeout-ms 30000] [--no-multicall3] [--block-time-ms N]
The facilitator's private key (0x + 64 hex) is read from the environment variable named by --key-env.`;

const { opts, usage } = commandLine("facilitator.mjs", USAGE, {
  port: { type: "string", default: "0" },
  rpc: { type: "string" },
  "key-env": { type: "string" },
  "chain-id": { type: "string", default: "84532" },
  "confirmation-timeout-ms": { type: "string", default: "30000" },
  "no-multicall3": { type: "boolean", default: false },
  "block-time-ms": { type: "string" },
});
if (!/^\d+$/.test(opts.port) || Number(opts.port) > 65535) usage("--port must be 0..65535");
if (!opts.rpc) usage("--rpc is required");
try {
  new URL(opts.rpc);
} catch {
  usage(`invalid --rpc: ${opts.rpc}`);
}
if (!opts["key-env"]) usage("--key-env is required");
const key = process.env[opts["key-env"]];
if (!key) usage(`environment variable ${opts["key-env"]} is empty or unset`);
if (!/^0x[0-9a-fA-F]{64}$/.test(key)) usage(`${opts["key-env"]} is not a 0x-prefixed 32-byte hex private key`);
if (!/^\d+$/.test(opts["chain-id"])) usage("--chain-id must be an integer");
if (!/^\d+$/.test(opts["confirmation-timeout-ms"])) usage("--confirmation-timeout-ms must be an integer");
if (opts["block-time-ms"] !== undefined && !/^[1-9]\d*$/.test(opts["block-time-ms"])) usage("--block-time-ms must be a positive integer");

const log = (...a) => process.stderr.write(`[facilitator] ${a.join(" ")}\n`);

const { x402Facilitator } = await import("@x402/core/facilitator");
const { toFacilitatorEvmSigner } = await import("@x402/evm");
const { ExactEvmScheme } = await import("@x402/evm/exact/facilitator");
const { ExactEvmSchemeV1 } = await import("@x402/evm/exact/v1/facilitator");
const { UptoEvmScheme } = await import("@x402/evm/upto/facilitator");
const { EVM_NETWORK_CHAIN_ID_MAP } = await import("@x402/evm/v1");
const { createWalletClient, defineChain, http: httpTransport, publicActions } = await import("viem");
const { privateKeyToAccount } = await import("viem/accounts");
const { readFile } = await import("node:fs/promises");

const chainId = Number(opts["chain-id"]);
const network = `eip155:${chainId}`;
const v1Network = Object.entries(EVM_NETWORK_CHAIN_ID_MAP).find(([, id]) => id === chainId)?.[0];
const MULTICALL3 = "0xcA11bde05977b3631167028862bE2a173976CA11";

const account = privateKeyToAccount(key);
const chain = defineChain({
  id: chainId,
  name: `local-${chainId}`,
  nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
  rpcUrls: { default: { http: [opts.rpc] } },
  ...(opts["block-time-ms"] ? { blockTime: Number(opts["block-time-ms"]) } : {}),
});
const viemClient = createWalletClient({ account, chain, transport: httpTransport(opts.rpc) }).extend(
  publicActions,
);

// Same adapter as the reference examples/typescript/facilitator.
const evmSigner = toFacilitatorEvmSigner(
  {
    address: account.address,
    getCode: (args) => viemClient.getCode(args),
    readContract: (args) => viemClient.readContract({ ...args, args: args.args || [] }),
    verifyTypedData: (args) => viemClient.verifyTypedData(args),
    writeContract: (args) => viemClient.writeContract({ ...args, args: args.args || [] }),
    sendTransaction: (args) => viemClient.sendTransaction(args),
    waitForTransactionReceipt: (args) => viemClient.waitForTransactionReceipt(args),
  },
  { confirmationTimeoutMs: Number(opts["confirmation-timeout-ms"]) },
);

const facilitator = new x402Facilitator();
facilitator.register(network, new ExactEvmScheme(evmSigner));
// upto (Permit2): /supported announces this signer as the facilitatorAddress that buyers' permits name.
facilitator.register(network, new UptoEvmScheme(evmSigner));
if (v1Network) facilitator.registerV1(v1Network, new ExactEvmSchemeV1(evmSigner));

async function ensureMulticall3() {
  const code = await viemClient.getCode({ address: MULTICALL3 });
  if (code && code !== "0x") return;
  // viem ships Multicall3's creation code (for deployless multicall) but does not export it.
  const src = await readFile(new URL("./constants/contracts.js", import.meta.resolve("viem")), "utf8");
  const creation = /multicall3Bytecode\s*=\s*'(0x[0-9a-fA-F]+)'/.exec(src)?.[1];
  if (!creation) throw new Error("Multicall3 bytecode not found in viem");
  // eth_call of the creation code (no `to`) returns the runtime code.
  const { data } = await viemClient.call({ data: creation });
  await viemClient.request({ method: "anvil_setCode", params: [MULTICALL3, data] });
  log(`installed Multicall3 at ${MULTICALL3}`);
}
if (!opts["no-multicall3"]) {
  try {
    await ensureMulticall3();
  } catch (e) {
    log(`Multicall3 not installed (${(e instanceof Error ? e.message : String(e)).split("\n")[0]})`);
  }
}

const MAX_BODY = 1 << 20;
function readJson(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on("data", (c) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(Object.assign(new Error("request body too large"), { status: 413 }));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on("end", () => {
      const text = Buffer.concat(chunks).toString("utf8");
      try {
        resolve(text ? JSON.parse(text) : {});
      } catch {
        reject(Object.assign(new Error("invalid JSON body"), { status: 400 }));
      }
    });
    req.on("error", reject);
  });
}

function send(res, status, obj) {
  const body = JSON.stringify(obj, (_, v) => (typeof v === "bigint" ? v.toString() : v));
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
  res.end(body);
}

const server = http.createServer(async (req, res) => {
  const path = new URL(req.url, "http://127.0.0.1").pathname.replace(/\/+$/, "") || "/";
  try {
    if (req.method === "GET" && path === "/supported") {
      return send(res, 200, facilitator.getSupported());
    }
    if (req.method === "GET" && path === "/health") {
      return send(res, 200, { status: "ok", address: account.address });
    }
    if (req.method === "POST" && (path === "/verify" || path === "/settle")) {
      let body;
      try {
        body = await readJson(req);
      } catch (e) {
        return send(res, e.status || 400, { error: e.message });
      }
      const { paymentPayload, paymentRequirements } = body || {};
      if (!paymentPayload || !paymentRequirements) {
        return send(res, 400, { error: "Missing paymentPayload or paymentRequirements" });
      }
      if (path === "/verify") {
        try {
          const r = await facilitator.verify(paymentPayload, paymentRequirements);
          log(`POST /verify v${paymentPayload.x402Version} -> isValid=${r.isValid}${r.invalidReason ? ` ${r.invalidReason}` : ""}`);
          return send(res, 200, r);
        } catch (e) {
          log(`POST /verify error: ${e instanceof Error ? e.message : e}`);
          return send(res, 500, { error: e instanceof Error ? e.message : "Unknown error" });
        }
      }
      try {
        const r = await facilitator.settle(paymentPayload, paymentRequirements);
        log(`POST /settle v${paymentPayload.x402Version} -> success=${r.success} tx=${r.transaction || "-"}${r.errorReason ? ` ${r.errorReason}` : ""}`);
        return send(res, 200, r);
      } catch (e) {
        const msg = e instanceof Error ? e.message : "Unknown error";
        log(`POST /settle error: ${msg}`);
        if (msg.includes("Settlement aborted:")) {
          return send(res, 200, {
            success: false,
            errorReason: msg.replace("Settlement aborted: ", ""),
            transaction: "",
            network: paymentPayload.accepted?.network || paymentPayload.network || "unknown",
          });
        }
        return send(res, 500, { error: msg });
      }
    }
    return send(res, 404, { error: "Not found" });
  } catch (e) {
    log(`internal error: ${e instanceof Error ? e.stack : e}`);
    if (!res.headersSent) send(res, 500, { error: e instanceof Error ? e.message : "Unknown error" });
  }
});

server.on("error", (e) => {
  log(`listen error: ${e.message}`);
  process.exit(1);
});
server.listen(Number(opts.port), "127.0.0.1", () => {
  const { port } = server.address();
  log(`address ${account.address}, ${network}${v1Network ? ` + v1 ${v1Network}` : ""}, rpc ${opts.rpc}, port ${port}`);
  process.stdout.write(`${JSON.stringify({ port })}\n`);
});

for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => {
    server.close();
    server.closeAllConnections?.();
    process.exit(0);
  });
}
