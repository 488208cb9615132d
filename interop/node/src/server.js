// Start and stop a real `shellinfo serve` for the tests and the benchmark.
//
// The interpreter is $SHELLINFO_PYTHON (default `python`); the command line is
// found through the package's `shellinfo` console-script entry point, so it
// does not depend on where the package keeps its modules.

import { spawn } from "node:child_process";

const LAUNCH =
  "import sys; from importlib.metadata import entry_points; " +
  "(ep,) = entry_points(group='console_scripts', name='shellinfo'); sys.exit(ep.load()(sys.argv[1:]))";
const SERVING = /serving on 127\.0\.0\.1:(\d+)/;

export const python = () => process.env.SHELLINFO_PYTHON || "python";

/** Run the `shellinfo` command line once; resolve with {code, stdout, stderr}. */
export function shellinfo(args, { input = "" } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(python(), ["-c", LAUNCH, ...args], { stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
    child.stdin.end(input);
  });
}

/**
 * Start `shellinfo serve` on 127.0.0.1 (port 0 unless given) and wait for its
 * "serving on HOST:PORT" line.
 *
 * @param {{store: string, port?: number, tokenFile?: string, args?: string[]}} options
 * @returns {Promise<{port: number, url: string, stop: (signal?: string) => Promise<number|null>, stderr: () => string}>}
 */
export function startServer({ store, port = 0, tokenFile, args = [] }) {
  const argv = ["serve", "--address", `127.0.0.1:${port}`, "--store", store, ...args];
  if (tokenFile) argv.push("--token-file", tokenFile);
  const child = spawn(python(), ["-c", LAUNCH, ...argv], { stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  let started = false;
  const exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve(code ?? signal)));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`shellinfo serve did not start in 30 s:\n${log}`));
    }, 30_000);
    child.on("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
    exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`shellinfo serve exited (${code}):\n${log}`));
    });
    child.stderr.on("data", (data) => {
      log += data;
      const m = SERVING.exec(log);
      if (m && !started) {
        started = true;
        clearTimeout(timer);
        const bound = Number(m[1]);
        resolve({
          port: bound,
          url: `http://127.0.0.1:${bound}`,
          stderr: () => log,
          stop: async (signal = "SIGTERM") => {
            if (child.exitCode === null && child.signalCode === null) child.kill(signal);
            return exited;
          },
        });
      }
    });
  });
}
