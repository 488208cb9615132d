// The ProtectionRunInstance reader of src/rest.js (docs/contract.md 5.5) beyond
// the listed vectors: classes of bad input, generated from a seeded generator,
// must each be refused naming the key (dotted inside jobUid, unprefixed inside
// protectionShellInfo); what the spec ignores must be ignored in strict mode
// too; and every int64 job value must survive reading, binary and writing.

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { registry } from "../src/registry.js";
import { createRestCodec, createRunInstanceCodec, RestError } from "../src/rest.js";

const codec = createRestCodec(registry);
const instances = createRunInstanceCodec(registry, codec);
const RUN = '"protectionShellInfo":{"jobRunId":1}';

// A small deterministic generator (mulberry32), so a failure names a reproducible case.
function generator(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n) => Math.floor(next() * n);
  const pick = (items) => items[int(items.length)];
  const digits = (n) => Array.from({ length: n }, () => int(10)).join("");
  const bigint64 = () => {
    const bits = BigInt.asIntN(64, (BigInt(int(2 ** 32)) << 32n) | BigInt(int(2 ** 32)));
    return pick([bits, bits >> BigInt(int(64)), 0n, -(2n ** 63n), 2n ** 63n - 1n]);
  };
  return { int, pick, digits, bigint64 };
}

/** JSON texts that are not an int64 integer token. */
function notInt64(g) {
  return g.pick([
    () => `"${g.digits(1 + g.int(5))}"`,
    () => `${g.pick(["", "-"])}${g.int(100000)}.${g.digits(1 + g.int(3))}`, // no leading zeros: valid JSON
    () => `${1 + g.int(9)}e${g.int(5)}`,
    () => `${1 + g.int(9)}E-${g.int(5)}`,
    () => g.pick(["true", "false", "[]", "{}", `[${g.int(9)}]`, `{"id":${g.int(9)}}`]),
    () => (2n ** 63n + BigInt(g.int(1000))).toString(),
    () => (-(2n ** 63n) - 1n - BigInt(g.int(1000))).toString(),
  ])();
}

/** JSON texts that are not a string. */
function notString(g) {
  return g.pick([() => String(g.int(1000)), () => `${g.int(9)}.5`, () => g.pick(["true", "false", "[]", "{}", '["x"]'])])();
}

const refusedNaming = (text, field, options) =>
  assert.throws(
    () => instances.fromRunInstanceText(text, options),
    (error) => error instanceof RestError && error.field === field,
    `${text} must be refused naming ${field}`,
  );

describe("bad job values are refused naming the key", () => {
  test("int64 keys, at the top and inside jobUid", () => {
    const g = generator(1);
    for (let i = 0; i < 300; i++) {
      const bad = notInt64(g);
      const member = g.pick(["clusterId", "clusterIncarnationId", "id"]);
      refusedNaming(`{"jobId":${bad},${RUN}}`, "jobId");
      refusedNaming(`{"jobUid":{"${member}":${bad}},${RUN}}`, `jobUid.${member}`);
    }
  });

  test("jobName must be a string, jobUid an object", () => {
    const g = generator(2);
    for (let i = 0; i < 200; i++) {
      refusedNaming(`{"jobName":${notString(g)},${RUN}}`, "jobName");
      const uid = g.pick(["[]", '"x"', String(g.int(99)), "true", "[{}]"]);
      refusedNaming(`{"jobUid":${uid},${RUN}}`, "jobUid");
    }
  });

  test("text-level faults name the key they are in", () => {
    refusedNaming(`{"jobName":"a\\ud800b",${RUN}}`, "jobName"); // unpaired surrogate
    refusedNaming(`{"jobId":1,"jobId":2,${RUN}}`, "jobId"); // repeated key
    refusedNaming(`{"jobUid":{"id":1,"id":2},${RUN}}`, "jobUid.id");
    refusedNaming('{"protectionShellInfo":{"jobRunId":1,"jobRunId":2}}', "jobRunId");
    refusedNaming('{"protectionShellInfo":{"jobRunId":1,"note":"\\udc00"}}', "note");
    const deep = "[".repeat(65) + "]".repeat(65); // one level beyond the json_value limit
    refusedNaming(`{"protectionShellInfo":{"jobRunId":1,"deep":${deep}}}`, "deep");
    refusedNaming('{"protectionShellInfo":null}', "protectionShellInfo");
    refusedNaming('{"protectionShellInfo":"{}"}', "protectionShellInfo");
    refusedNaming("7", null);
  });

  test("strict mode refuses what the run does not know, naming the key without a prefix", () => {
    refusedNaming('{"jobId":1,"protectionShellInfo":{"jobRunId":1,"timezone":"UTC"}}', "timezone", { strict: true });
    refusedNaming('{"jobId":1,"protectionShellInfo":{"jobRunId":1,"status":"kNew"}}', "status", { strict: true });
  });
});

describe("what the spec ignores", () => {
  test("other instance keys and other jobUid members are not carried, in strict mode either", () => {
    const deep = "[".repeat(100) + "]".repeat(100); // deeper than a json_value, but not carried
    const text = `{"backupRun":${deep},"jobUid":{"id":3,"extra":"x"},"viewBoxId":"v",${RUN}}`;
    for (const strict of [false, true]) {
      const { run, job } = instances.fromRunInstanceText(text, { strict });
      assert.equal(codec.toRestText(run), '{"jobRunId":1}');
      assert.equal(instances.jobToRestText(job), '{"jobUid":{"id":3}}');
    }
  });
});

test("every int64 job value survives reading, binary and writing", () => {
  const g = generator(3);
  for (let i = 0; i < 500; i++) {
    const parts = [];
    if (g.int(2)) parts.push(`"jobId":${g.bigint64()}`);
    const uid = ["clusterId", "clusterIncarnationId", "id"].filter(() => g.int(2)).map((k) => `"${k}":${g.bigint64()}`);
    if (g.int(2)) parts.push(`"jobUid":{${uid.join(",")}}`);
    const expected = parts.length ? `{${parts.join(",")}}` : null;
    const { job } = instances.fromRunInstanceText(`{${[...parts, RUN].join(",")}}`);
    const again = job === null ? null : instances.jobToRestText(instances.fromBinary(instances.toBinary(job)));
    assert.equal(again, expected);
  }
});
