// A client that has only the server builds its schema from reflection
// (protobuf-es createFileRegistry from the reflected FileDescriptorProtos):
// it must get json_name on every field and the rest_name options, and the REST
// adapter built from that registry must pass the conformance vectors (issue 10.5).

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, test } from "node:test";
import { getOption } from "@bufbuild/protobuf";
import { reflectedRegistry } from "../src/reflect.js";
import { createRestCodec, REST_NAME } from "../src/rest.js";
import { startServer } from "../src/server.js";

const vectors = JSON.parse(readFileSync(new URL("../../../tests/golden/conformance.json", import.meta.url), "utf8"));
let server;
let registry;

before(async () => {
  server = await startServer({ store: "memory://" });
  registry = await reflectedRegistry(server.url, "shellinfo.v1.RunUpdateService");
});

after(async () => {
  await server?.stop();
});

test("every reflected field of shellinfo.v1 has its JSON name", () => {
  const missing = [];
  for (const type of registry) {
    if (type.kind !== "message" || !type.typeName.startsWith("shellinfo.v1.")) continue;
    for (const field of type.fields) if (field.jsonName === "") missing.push(`${type.typeName}.${field.name}`);
  }
  assert.deepEqual(missing, []);
});

test("the reflected enum values carry their rest_name options", () => {
  const restName = registry.getExtension(REST_NAME);
  assert.ok(restName, "the rest_name extension is reflected");
  const statuses = registry.getEnum("shellinfo.v1.RunStatus");
  assert.equal(getOption(statuses.values.find((v) => v.number === 5), restName), "kSuccess");
});

test("a REST adapter built from reflection alone passes the decode vectors", () => {
  const codec = createRestCodec(registry);
  const hex = (bytes) => Buffer.from(bytes).toString("hex");
  for (const v of vectors.decode) {
    assert.equal(hex(codec.toBinary(codec.fromRestText(v.rest_text))), v.hex, v.name);
    assert.equal(codec.toRestText(codec.fromBinary(new Uint8Array(Buffer.from(v.hex, "hex")))), v.rest_out, v.name);
  }
});
