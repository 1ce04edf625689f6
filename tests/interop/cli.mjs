// The interop scripts' command lines: options parsed strictly, `--help`, and the script's usage on any mistake
// (exit 2), the same way for each.
import { parseArgs } from "node:util";

// Parses `process.argv` with `options` (node:util parseArgs specs); `usage(message)` prints `text` and exits.
export function commandLine(script, text, options) {
  const usage = (msg) => {
    if (msg) process.stderr.write(`${script}: ${msg}\n`);
    process.stderr.write(`${text}\n`);
    process.exit(2);
  };
  let opts;
  try {
    ({ values: opts } = parseArgs({
      options: { ...options, help: { type: "boolean", short: "h" } },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    usage(e.message);
  }
  if (opts.help) usage();
  return { opts, usage };
}
