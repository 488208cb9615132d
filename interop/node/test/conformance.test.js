// Every vector of tests/golden/conformance.json through the JS reference adapter,
// both ways (format: tests/golden/README.md).

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";
import { canonicalize, JsonError } from "../src/json.js";
import { registry } from "../src/registry.js";
import { createRestCodec, RestError } from "../src/rest.js";

const vectors = JSON.parse(readFileSync(new URL("../../../tests/golden/conformance.json", import.meta.url), "utf8"));
const codec = createRestCodec(registry);
const hex = (bytes) => Buffer.from(bytes).toString("hex");
const unhex = (text) => new Uint8Array(Buffer.from(text, "hex"));

test("the file is the documented format", () => {
  assert.equal(vectors.format, "shellinfo-conformance");
  assert.equal(vectors.version, 1);
  for (const kind of ["decode", "encode", "reject", "json_value"]) assert.ok(vectors[kind].length > 0, kind);
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
