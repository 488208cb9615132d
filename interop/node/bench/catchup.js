// Time a watch catch-up from revision 1 with the Node client (connect-node,
// protobuf-es). Driven by bench/bench_node_catchup.py, which starts the server
// and fills it.
//
//   node bench/catchup.js URL COUNT MODE      MODE: messages | rest
//
// Prints one JSON line: {"seconds": S, "updates": N}, timing a second catch-up
// after a warm-up one on the same connection. "messages" decodes each
// response into protobuf-es messages (what the transport does anyway); "rest"
// also writes every run as REST text with the reference adapter.

import { connect } from "../src/client.js";
import { registry } from "../src/registry.js";
import { createRestCodec } from "../src/rest.js";

const [url, countText, mode = "messages"] = process.argv.slice(2);
const count = Number(countText);
if (!url || !(count > 0) || !["messages", "rest"].includes(mode)) {
  console.error("usage: node bench/catchup.js URL COUNT messages|rest");
  process.exit(2);
}
const codec = createRestCodec(registry);
const client = connect(url);

/** Watch from revision 1 until `count` updates arrived; returns [seconds, REST characters written]. */
async function catchUp(count) {
  const controller = new AbortController();
  let got = 0;
  let chars = 0;
  const t0 = performance.now();
  try {
    for await (const response of client.watchRuns({ startRevision: 1n }, { signal: controller.signal })) {
      const n = response.updates.length;
      if (n === 0) continue;
      if (response.updates[0].revision !== BigInt(got + 1) || response.updates[n - 1].revision !== BigInt(got + n)) {
        throw new Error(`revisions out of order after ${got}`);
      }
      if (mode === "rest") for (const update of response.updates) chars += codec.toRestText(update.run).length;
      got += n;
      if (got >= count) break;
    }
  } finally {
    controller.abort();
  }
  if (got !== count) throw new Error(`${got} updates of ${count}`);
  return [(performance.now() - t0) / 1000, chars];
}

try {
  await catchUp(Math.min(count, 5000)); // warm-up: the connection and the JIT, as a running service has them
  const [seconds, restChars] = await catchUp(count);
  console.log(JSON.stringify({ seconds, updates: count, restChars }));
} finally {
  client.close();
}
