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
const RUN = ["decode", "encode", "reject", "json_value", "run_instance", "run_instance_reject", "job_filter"];
const HEADER = ["format", "version", "spec", "readme"];

test("the file is the documented format", () => {
  assert.equal(vectors.format, "shellinfo-conformance");
  assert.equal(vectors.version, 1);
  for (const kind of RUN) assert.ok(Array.isArray(vectors[kind]) && vectors[kind].length > 0, kind);
  const names = RUN.flatMap((kind) => vectors[kind].map((v) => v.name));
  assert.equal(new Set(names).size, names.length, "vector names are unique");
});

test("this suite runs every section of the vector file", () => {
  // A section added to conformance.json must get a describe() here (and its
  // member in RUN): a new section that no suite runs checks nothing.
  const notRun = Object.keys(vectors).filter((key) => !RUN.includes(key) && !HEADER.includes(key));
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
