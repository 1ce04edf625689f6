#!/usr/bin/env node
// Print, as one JSON line, the x402UptoPermit2Proxy ABI that the official @x402/evm ships: the interface the
// official facilitator calls, which the repository's contracts/x402UptoPermit2Proxy.sol must implement.
import { x402UptoPermit2ProxyABI } from "@x402/evm";

process.stdout.write(`${JSON.stringify(x402UptoPermit2ProxyABI)}\n`);
