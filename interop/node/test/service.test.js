// The Node client against a real `shellinfo serve` (SQLite store in a temporary
// directory, bearer token required): publish (unary and PublishRuns), read, list
// with paging, watch with resume across a server restart, error details.
// Everything goes through the JS REST adapter and the contract's rules only.

import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { RunFilterSchema } from "../gen/shellinfo/v1/run_update_service_pb.js";
import { connect, describeError, ERROR_DOMAIN, watch } from "../src/client.js";
import { registry } from "../src/registry.js";
import { createRestCodec, createRunInstanceCodec, jobIdsKeep } from "../src/rest.js";
import { shellinfo, startServer } from "../src/server.js";

const codec = createRestCodec(registry);
const instances = createRunInstanceCodec(registry, codec);
const vectors = JSON.parse(readFileSync(new URL("../../../tests/golden/conformance.json", import.meta.url), "utf8"));
const TOKEN = "node-suite-token-4b1f";
const dir = mkdtempSync(join(tmpdir(), "shellinfo-node-"));
const tokenFile = join(dir, "tokens.txt");
const store = `sqlite:///${join(dir, "runs.sqlite3")}`;
writeFileSync(tokenFile, `# tokens of the Node suite\n${TOKEN}\n`);

let server;
let client;

const run = (text) => codec.fromRestText(text);
const rest = (update) => codec.toRestText(update.run);

/** The described error of a call that must fail. */
async function failure(promise) {
  try {
    await promise;
  } catch (error) {
    return describeError(error);
  }
  assert.fail("the call succeeded");
}

/** An async iterable of PublishRunsRequest from [source, REST text] pairs. */
async function* requests(items) {
  for (const [source, text] of items) yield { source, run: run(text) };
}

before(async () => {
  server = await startServer({ store, tokenFile });
  client = open({ token: TOKEN });
});

const clients = [];
const open = (options) => {
  const c = connect(server.url, options);
  clients.push(c);
  return c;
};

after(async () => {
  for (const c of clients) c.close();
  await server?.stop();
  rmSync(dir, { recursive: true, force: true });
});

describe("authentication", () => {
  test("a call without a token is UNAUTHENTICATED", async () => {
    const err = await failure(open().getRun({ source: "x", jobRunId: 1n }));
    assert.equal(err.code, Code.Unauthenticated);
  });

  test("a wrong token is UNAUTHENTICATED", async () => {
    const err = await failure(open({ token: "wrong" }).getRun({ source: "x", jobRunId: 1n }));
    assert.equal(err.code, Code.Unauthenticated);
  });
});

describe("publish and read", () => {
  test("PublishRun records an update; the same state again changes nothing", async () => {
    const text = '{"jobRunId":48211,"startTimeUsecs":1732780800123456,"runType":"kRegular","status":"kRunning"}';
    const first = await client.publishRun({ source: "cluster-a", run: run(text) });
    assert.equal(first.changed, true);
    assert.ok(first.revision > 0n);
    const again = await client.publishRun({ source: "cluster-a", run: run(text) });
    assert.deepEqual([again.revision, again.changed], [first.revision, false]);
    const got = await client.getRun({ source: "cluster-a", jobRunId: 48211n });
    assert.equal(rest(got.update), text);
    assert.equal(got.update.revision, first.revision);
  });

  test("int64 beyond 2^53 and unknown keys survive the service exactly", async () => {
    const text =
      '{"jobRunId":9007199254740993,"status":"kReplicating","timezone":"Europe/Berlin","big":18446744073709551617}';
    await client.publishRun({ source: "exact", run: run(text) });
    const got = await client.getRun({ source: "exact", jobRunId: 9007199254740993n });
    assert.equal(rest(got.update), text);
  });

  test("PublishRuns acknowledges each update in order; a refused one does not end the stream", async () => {
    const items = [
      ["stream", '{"jobRunId":1,"status":"kRunning"}'],
      ["stream", '{"status":"kRunning"}'],
      ["stream", '{"jobRunId":1,"status":"kSuccess"}'],
      ["stream", '{"jobRunId":1,"status":"kFailure"}'],
      ["stream", '{"jobRunId":2,"startTimeUsecs":10,"endTimeUsecs":5}'],
      ["stream", '{"jobRunId":1,"status":"kSuccess"}'],
    ];
    const acks = [];
    for await (const ack of client.publishRuns(requests(items))) acks.push(ack);
    assert.deepEqual(
      acks.map((a) => Number(a.index)),
      [0, 1, 2, 3, 4, 5],
    );
    const [ok0, missing, final, refused, backwards, same] = acks;
    assert.equal(ok0.changed, true);
    assert.equal(final.changed, true);
    assert.ok(final.revision > ok0.revision);
    assert.deepEqual([missing.revision, missing.error.code, missing.error.reason], [0n, Code.InvalidArgument, "INVALID_RUN"]);
    assert.deepEqual(
      missing.error.fieldViolations.map((v) => v.field),
      ["jobRunId"],
    );
    assert.deepEqual([refused.error.code, refused.error.reason], [Code.FailedPrecondition, "RUN_FINAL"]);
    assert.deepEqual(
      refused.error.fieldViolations.map((v) => v.field),
      ["status"],
    );
    assert.deepEqual(
      backwards.error.fieldViolations.map((v) => v.field),
      ["endTimeUsecs"],
    );
    assert.deepEqual([same.revision, same.changed, same.error], [final.revision, false, undefined]);
  });

  test("ListRuns pages through every run in (source, jobRunId) order", async () => {
    const items = [];
    for (let n = 25; n >= 1; n--) items.push([n % 2 ? "page-b" : "page-a", `{"jobRunId":${n * 1000},"status":"kAccepted"}`]);
    for await (const ack of client.publishRuns(requests(items))) assert.equal(ack.error, undefined);
    const filter = create(RunFilterSchema, { sources: ["page-a", "page-b"] });
    const seen = [];
    let pageToken = "";
    let pages = 0;
    do {
      const page = await client.listRuns({ filter, pageSize: 10, pageToken });
      assert.ok(page.updates.length <= 10);
      seen.push(...page.updates.map((u) => `${u.source}/${u.run.jobRunId}`));
      pageToken = page.nextPageToken;
      pages++;
    } while (pageToken !== "");
    assert.equal(pages, 3);
    const expected = items
      .map(([source, text]) => [source, BigInt(JSON.parse(text).jobRunId)])
      .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0))
      .map(([s, id]) => `${s}/${id}`);
    assert.deepEqual(seen, expected);
  });
});

describe("error details", () => {
  test("a refused publish carries ErrorInfo (domain shellinfo.v1) and BadRequest with the REST key", async () => {
    const err = await failure(
      client.publishRun({ source: "err", run: run('{"jobRunId":3,"startTimeUsecs":20,"endTimeUsecs":10}') }),
    );
    assert.deepEqual([err.code, err.reason, err.domain], [Code.InvalidArgument, "INVALID_RUN", ERROR_DOMAIN]);
    assert.deepEqual(
      err.violations.map((v) => v.field),
      ["endTimeUsecs"],
    );
  });

  test("changing a final status is FAILED_PRECONDITION / RUN_FINAL naming status", async () => {
    await client.publishRun({ source: "err", run: run('{"jobRunId":4,"status":"kSuccess"}') });
    const err = await failure(client.publishRun({ source: "err", run: run('{"jobRunId":4,"status":"kRunning"}') }));
    assert.deepEqual([err.code, err.reason], [Code.FailedPrecondition, "RUN_FINAL"]);
    assert.deepEqual(
      err.violations.map((v) => v.field),
      ["status"],
    );
  });

  test("a missing run is NOT_FOUND / RUN_NOT_FOUND with its source and job_run_id", async () => {
    const err = await failure(client.getRun({ source: "nowhere", jobRunId: 77n }));
    assert.deepEqual([err.code, err.reason], [Code.NotFound, "RUN_NOT_FOUND"]);
    assert.deepEqual({ ...err.metadata }, { source: "nowhere", job_run_id: "77" });
  });

  test("a bad request field is named by its proto JSON name", async () => {
    const err = await failure(client.listRuns({ pageSize: -1 }));
    assert.deepEqual([err.code, err.reason], [Code.InvalidArgument, "INVALID_REQUEST"]);
    assert.deepEqual(
      err.violations.map((v) => v.field),
      ["pageSize"],
    );
  });

  test("a watch beyond the head + 1 is OUT_OF_RANGE / REVISION_IN_FUTURE with head_revision", async () => {
    const { revision: head } = await client.publishRun({ source: "err", run: run('{"jobRunId":5}') });
    const signal = AbortSignal.timeout(5000);
    let err = "no response and no error";
    try {
      for await (const response of client.watchRuns({ startRevision: head + 10n }, { signal })) {
        err = `a response with revision ${response.revision} instead of an error`;
        break;
      }
    } catch (error) {
      err = describeError(error);
    }
    assert.equal(typeof err, "object", err);
    assert.deepEqual([err.code, err.reason], [Code.OutOfRange, "REVISION_IN_FUTURE"]);
    assert.ok(BigInt(err.metadata.head_revision) >= head);
  });
});

describe("canonical json_value", () => {
  test("the same REST record from Python and from Node is one revision", async () => {
    // Python reads this text with its own JSON parser; Node with the exact reader.
    const text = '{"jobRunId":6,"status":"kRunning","ratio":1E-07,"obj":{"b":1,"a":[1.50,2]},"big":123456789012345678901}';
    const py = await shellinfo(
      ["publish", "--address", `127.0.0.1:${server.port}`, "--token", TOKEN, "--source", "canon", text],
      {},
    );
    assert.equal(py.code, 0, py.stderr);
    const again = await client.publishRun({ source: "canon", run: run(text) });
    assert.equal(again.changed, false, "Python and Node wrote different json_value for the same record");
  });
});

describe("watch", () => {
  test("a snapshot is followed by one snapshot_complete response", async () => {
    const signal = AbortSignal.timeout(10_000);
    const filter = create(RunFilterSchema, { sources: ["page-a"] });
    const runs = [];
    for await (const response of client.watchRuns({ filter, includeSnapshot: true }, { signal })) {
      if (response.snapshotComplete) {
        assert.equal(response.updates.length, 0);
        break;
      }
      runs.push(...response.updates.map((u) => u.run.jobRunId));
    }
    assert.equal(runs.length, 12);
  });

  test("a watch resumes after the server restarts, without gap or duplicate", async () => {
    const source = "resume";
    const first = await client.publishRun({ source, run: run('{"jobRunId":1,"status":"kAccepted"}') });
    const controller = new AbortController();
    const filter = create(RunFilterSchema, { sources: [source] });
    const resumes = [];
    const got = [];
    const events = watch(client, {
      filter,
      startRevision: first.revision,
      progressIntervalMs: 200,
      signal: controller.signal,
      onResume: (error, from) => resumes.push([error.code, error.reason, from]),
    });
    const expected = ["kAccepted", "kRunning", "kFinalizing", "kSuccess"];
    const reader = (async () => {
      for await (const event of events) {
        if (!event.update) continue;
        got.push([event.update.revision, JSON.parse(rest(event.update)).status]);
        if (got.length === 2) {
          // Restart the server on the same port and store while the watch is open.
          await server.stop("SIGTERM");
          server = await startServer({ store, tokenFile, port: server.port });
          await client.publishRun({ source, run: run('{"jobRunId":1,"status":"kFinalizing"}') });
          await client.publishRun({ source, run: run('{"jobRunId":1,"status":"kSuccess"}') });
        }
        if (got.length === expected.length) break;
      }
    })();
    await client.publishRun({ source, run: run('{"jobRunId":1,"status":"kRunning"}') });
    let timer;
    const stalled = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`watch stalled at ${got.length} updates`)), 30_000);
    });
    try {
      await Promise.race([reader, stalled]);
    } finally {
      clearTimeout(timer);
      controller.abort();
    }
    assert.deepEqual(
      got.map(([, status]) => status),
      expected,
    );
    const revisions = got.map(([revision]) => revision);
    assert.deepEqual(
      revisions,
      [...revisions].sort((a, b) => (a < b ? -1 : 1)),
    );
    assert.equal(new Set(revisions).size, revisions.length);
    assert.ok(resumes.length >= 1, "the watch never had to resume");
    assert.equal(resumes[0][0], Code.Unavailable);
  });
});

describe("jobs (ProtectionRunInstance, docs/contract.md 5.5)", () => {
  test("the service's job_ids filter agrees with every job_filter vector", async () => {
    for (const v of vectors.job_filter) {
      const source = `job-filter/${v.name}`;
      const job = v.job === null ? undefined : instances.jobFromRestText(v.job);
      const ack = await client.publishRun({ source, run: run('{"jobRunId":1}'), job });
      assert.equal(ack.changed, true, v.name);
      const jobIds = v.job_ids.map((id) => BigInt(id));
      const page = await client.listRuns({ filter: create(RunFilterSchema, { sources: [source], jobIds }) });
      assert.equal(page.updates.length, v.matches ? 1 : 0, `${v.name}: ListRuns`);
      for (const update of page.updates) assert.equal(jobIdsKeep(jobIds, update, instances.schema), true, v.name);
    }
  });

  test("an instance's job is stored with its run; a publish without one keeps it", async () => {
    const text = '{"jobId":12,"jobName":"vm-daily","jobUid":{"clusterId":1,"clusterIncarnationId":2,"id":12},' +
      '"protectionShellInfo":{"jobRunId":77,"status":"kRunning"},"backupRun":{"x":1}}';
    const { run: shellInfo, job } = instances.fromRunInstanceText(text, { strict: true });
    const first = await client.publishRun({ source: "jobs", run: shellInfo, job });
    assert.equal(first.changed, true);
    const again = await client.publishRun({ source: "jobs", run: shellInfo });
    assert.deepEqual([again.revision, again.changed], [first.revision, false]);
    const got = await client.getRun({ source: "jobs", jobRunId: 77n });
    const stored = '{"jobId":12,"jobName":"vm-daily","jobUid":{"clusterId":1,"clusterIncarnationId":2,"id":12}}';
    assert.equal(instances.jobToRestText(got.update.job), stored);
    const renamed = instances.fromRunInstanceText(text.replace("vm-daily", "vm-nightly"));
    const third = await client.publishRun({ source: "jobs", run: renamed.run, job: renamed.job });
    assert.equal(third.changed, true);
    assert.ok(third.revision > first.revision);
  });
});
