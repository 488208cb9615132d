// Every vector of tests/golden/conformance.json through the JS reference adapter,
// both ways (format: tests/golden/README.md).

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { canonicalize, JsonError } from "../src/json.js";
import { registry } from "../src/registry.js";
import { createRestCodec, createRunInstanceCodec, jobIdsKeep, RestError } from "../src/rest.js";

const vectors = JSON.parse(readFileSync(new URL("../../../tests/golden/conformance.json", import.meta.url), "utf8"));
const codec = createRestCodec(registry);
const instances = createRunInstanceCodec(registry, codec);
const hex = (bytes) => Buffer.from(bytes).toString("hex");
const unhex = (text) => new Uint8Array(Buffer.from(text, "hex"));

// The lists of vectors this file runs, each in its describe() below, and the
// members of the file that are not lists of vectors.
const SECTIONS = ["decode", "encode", "reject", "json_value", "run_instance", "run_instance_reject", "job_filter"];
const HEADER = ["format", "version", "spec", "readme"];

test("the file is the documented format", () => {
  assert.equal(vectors.format, "shellinfo-conformance");
  assert.equal(vectors.version, 1);
  for (const kind of SECTIONS) assert.ok(Array.isArray(vectors[kind]) && vectors[kind].length > 0, kind);
  const names = SECTIONS.flatMap((kind) => vectors[kind].map((v) => v.name));
  assert.equal(new Set(names).size, names.length, "vector names are unique");
});

test("this suite runs every section of the vector file", () => {
  // A section added to conformance.json must get a describe() here (and its
  // member in SECTIONS): a new section that no suite runs checks nothing.
  const notRun = Object.keys(vectors).filter((key) => !SECTIONS.includes(key) && !HEADER.includes(key));
  assert.deepEqual(notRun, [], "sections of tests/golden/conformance.json the Node suite does not run");
  for (const key of HEADER) assert.ok(!Array.isArray(vectors[key]), `${key} is a list: is it a new section?`);
});

describe("decode", () => {
  for (const v of vectors.decode) {
    test(v.name, () => {
      for (const strict of v.strict ? [false, true] : [false]) {
        assert.equal(hex(codec.toBinary(codec.fromRestText(v.rest_text, { strict }))), v.hex, `strict=${strict}`);
      }
      assert.equal(codec.toRestText(codec.fromBinary(unhex(v.hex))), v.rest_out);
    });
  }
});

describe("encode", () => {
  for (const v of vectors.encode) {
    test(v.name, () => assert.equal(codec.toRestText(codec.fromBinary(unhex(v.hex))), v.rest_out));
  }
});

describe("reject", () => {
  for (const v of vectors.reject) {
    test(v.name, () => {
      assert.throws(
        () => codec.fromRestText(v.rest_text, { strict: v.strict }),
        (error) => error instanceof RestError && error.field === v.field,
      );
      if (v.strict) codec.fromRestText(v.rest_text); // lenient mode keeps what strict refuses
    });
  }
});

describe("json_value", () => {
  for (const v of vectors.json_value) {
    test(v.name, () => {
      if ("canonical" in v) assert.equal(canonicalize(v.input), v.canonical);
      else assert.throws(() => canonicalize(v.input), JsonError);
    });
  }
});

describe("run_instance", () => {
  for (const v of vectors.run_instance) {
    test(v.name, () => {
      for (const strict of [false, true]) {
        const { run, job } = instances.fromRunInstanceText(v.rest_text, { strict });
        assert.equal(hex(codec.toBinary(run)), v.hex, `run, strict=${strict}`);
        assert.equal(job === null ? null : hex(instances.toBinary(job)), v.job_hex, `job, strict=${strict}`);
      }
      if (v.job_hex === null) assert.equal(v.job_out, null);
      else assert.equal(instances.jobToRestText(instances.fromBinary(unhex(v.job_hex))), v.job_out);
    });
  }
});

describe("run_instance_reject", () => {
  for (const v of vectors.run_instance_reject) {
    test(v.name, () => {
      assert.throws(
        () => instances.fromRunInstanceText(v.rest_text),
        (error) => error instanceof RestError && error.field === v.field,
      );
    });
  }
});

describe("job_filter", () => {
  for (const v of vectors.job_filter) {
    test(v.name, () => {
      const job = v.job === null ? undefined : instances.jobFromRestText(v.job);
      if (v.job !== null) assert.notEqual(job, null, "the vector's job has a job key");
      const update = create(registry.getMessage("shellinfo.v1.RunUpdate"), { source: "c1", revision: 1n, job });
      const jobIds = v.job_ids.map((id) => BigInt(id));
      assert.equal(jobIdsKeep(jobIds, update, instances.schema), v.matches);
    });
  }
});

// --- ProtectionRunInstance beyond the listed vectors (docs/contract.md 5.5) ---------------------
//
// Classes of bad input, generated from a seeded generator, must each be refused
// naming the key (dotted inside jobUid, unprefixed inside protectionShellInfo);
// what the spec ignores must be ignored in strict mode too; and every int64 job
// value must survive reading, binary and writing. (Here rather than in a file of
// its own because tests/test_node_interop.py runs this file.)

const INSTANCE_RUN = '"protectionShellInfo":{"jobRunId":1}';


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
      refusedNaming(`{"jobId":${bad},${INSTANCE_RUN}}`, "jobId");
      refusedNaming(`{"jobUid":{"${member}":${bad}},${INSTANCE_RUN}}`, `jobUid.${member}`);
    }
  });

  test("jobName must be a string, jobUid an object", () => {
    const g = generator(2);
    for (let i = 0; i < 200; i++) {
      refusedNaming(`{"jobName":${notString(g)},${INSTANCE_RUN}}`, "jobName");
      const uid = g.pick(["[]", '"x"', String(g.int(99)), "true", "[{}]"]);
      refusedNaming(`{"jobUid":${uid},${INSTANCE_RUN}}`, "jobUid");
    }
  });

  test("text-level faults name the key they are in", () => {
    refusedNaming(`{"jobName":"a\\ud800b",${INSTANCE_RUN}}`, "jobName"); // unpaired surrogate
    refusedNaming(`{"jobId":1,"jobId":2,${INSTANCE_RUN}}`, "jobId"); // repeated key
    refusedNaming(`{"jobUid":{"id":1,"id":2},${INSTANCE_RUN}}`, "jobUid.id");
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
    const text = `{"backupRun":${deep},"jobUid":{"id":3,"extra":"x"},"viewBoxId":"v",${INSTANCE_RUN}}`;
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
    const { job } = instances.fromRunInstanceText(`{${[...parts, INSTANCE_RUN].join(",")}}`);
    const again = job === null ? null : instances.jobToRestText(instances.fromBinary(instances.toBinary(job)));
    assert.equal(again, expected);
  }
});
