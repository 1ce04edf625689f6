#!/usr/bin/env node
// Compile the test contracts with solc-js (standard JSON), writing NAME.bin and NAME.abi.json for each, and
// NAME.runtime.bin (the deployed code) for the contracts tests place with `anvil_setCode` instead of deploying.
// Usage: node compile.js <path-to-solc-node_modules-dir>   (build.sh does this for you)
'use strict';
const fs = require('fs');
const path = require('path');

const here = __dirname;
const solcDir = process.argv[2] ? path.resolve(process.argv[2], 'solc') : 'solc';
const solc = require(solcDir);

const EXPECTED_VERSION = process.env.SOLC_VERSION;
const version = solc.version();
if (EXPECTED_VERSION && !version.startsWith(EXPECTED_VERSION + '+')) {
  console.error(`solc version mismatch: want ${EXPECTED_VERSION}, got ${version}`);
  process.exit(1);
}

const contracts = ['TestUSDC', 'Multicall', 'x402UptoPermit2Proxy'];
// Placed at a canonical address with `anvil_setCode`: no constructor runs, so the runtime code must not depend on one.
const placed = new Set(['x402UptoPermit2Proxy']);
const input = {
  language: 'Solidity',
  sources: Object.fromEntries(
    contracts.map((name) => [`${name}.sol`, { content: fs.readFileSync(path.join(here, `${name}.sol`), 'utf8') }]),
  ),
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: 'paris',
    metadata: { bytecodeHash: 'none' },
    outputSelection: {
      '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object', 'evm.deployedBytecode.immutableReferences'] },
    },
  },
};

const output = JSON.parse(solc.compile(JSON.stringify(input)));
let failed = false;
for (const e of output.errors || []) {
  console.error(e.formattedMessage);
  if (e.severity === 'error') failed = true;
}
if (failed) process.exit(1);

for (const name of contracts) {
  const contract = output.contracts[`${name}.sol`][name];
  const bin = contract.evm.bytecode.object;
  if (!/^[0-9a-f]+$/.test(bin)) {
    console.error(`unexpected bytecode output for ${name}`);
    process.exit(1);
  }
  fs.writeFileSync(path.join(here, `${name}.bin`), bin);
  fs.writeFileSync(path.join(here, `${name}.abi.json`), JSON.stringify(contract.abi, null, 2) + '\n');
  console.log(`compiled ${name}.sol with solc ${version}: ${bin.length / 2} bytes of creation code`);
  if (placed.has(name)) {
    const runtime = contract.evm.deployedBytecode;
    if (!/^[0-9a-f]+$/.test(runtime.object) || Object.keys(runtime.immutableReferences || {}).length > 0) {
      console.error(`${name}: the runtime code must exist and have no immutables (they are set by a constructor)`);
      process.exit(1);
    }
    fs.writeFileSync(path.join(here, `${name}.runtime.bin`), runtime.object);
    console.log(`  and ${runtime.object.length / 2} bytes of runtime code`);
  }
}
