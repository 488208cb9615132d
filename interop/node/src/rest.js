// A reference REST adapter for shellinfo.v1.ProtectionShellInfo in JavaScript,
// written from docs/contract.md ("The REST mapping") and the schema descriptors
// alone: REST keys are the fields' JSON names, enum spellings the
// (shellinfo.v1.rest_name) option of each enum value, read from whatever
// registry it is given (the generated code's, or one built from server
// reflection). Nothing about the record is hard-coded here but the rules.
//
// REST documents are handled as text both ways, because an exact reader is
// needed anyway: int64 values and unknown keys' integers do not fit a double.

import { create, fromBinary, getOption, isFieldSet, ScalarType, toBinary } from "@bufbuild/protobuf";
import { canonical, JsonError, parse, quote } from "./json.js";

export const MESSAGE = "shellinfo.v1.ProtectionShellInfo";
export const UNRECOGNIZED = "shellinfo.v1.UnrecognizedRest";
export const REST_NAME = "shellinfo.v1.rest_name";

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;
const INT32_MIN = -(2n ** 31n);
const INT32_MAX = 2n ** 31n - 1n;
const HHMM = /^(?:[01][0-9]|2[0-3]):[0-5][0-9]$/;

/** A REST document that cannot be read: `field` is the REST key at fault (null: the whole document). */
export class RestError extends Error {
  constructor(field, reason) {
    super(field === null ? reason : `${field}: ${reason}`);
    this.name = "RestError";
    this.field = field;
    this.reason = reason;
  }
}

const describe = (node) =>
  node.kind === "number"
    ? node.integer
      ? "an integer"
      : "a number with a fraction or exponent"
    : node.kind === "literal"
      ? node.value === "null"
        ? "null"
        : "a boolean"
      : `${node.kind === "array" ? "an" : "a"} ${node.kind}`;

/** An int64 REST value: an integer token within int64 (docs/contract.md 1.3), or throw naming `key`. */
function int64(key, node) {
  if (node.kind !== "number" || !node.integer) throw new RestError(key, `expected an integer, got ${describe(node)}`);
  const n = BigInt(node.token);
  if (n < INT64_MIN || n > INT64_MAX) throw new RestError(key, `integer ${node.token} is outside the int64 range`);
  return n;
}

const isNull = (node) => node.kind === "literal" && node.value === "null";

/**
 * Build the codec of the message `shellinfo.v1.ProtectionShellInfo` from a registry.
 *
 * @param {import("@bufbuild/protobuf").Registry} registry holds the message, UnrecognizedRest and rest_name
 */
export function createRestCodec(registry) {
  const schema = registry.getMessage(MESSAGE);
  const restName = registry.getExtension(REST_NAME);
  if (!schema || !restName) throw new Error(`the registry lacks ${MESSAGE} or ${REST_NAME}`);

  let unrecognized = null; // the field holding what the schema does not know
  const fields = []; // {key, field, kind, byName, byNumber}
  for (const field of schema.fields) {
    if (field.fieldKind === "message" && field.message.typeName === UNRECOGNIZED) {
      unrecognized = field;
      continue;
    }
    const entry = { key: field.jsonName, field, byName: new Map(), byNumber: new Map() };
    if (field.fieldKind === "enum") {
      entry.kind = "enum";
      for (const value of field.enum.values) {
        const spelling = getOption(value, restName);
        if (spelling !== "") {
          entry.byName.set(spelling, value.number);
          entry.byNumber.set(value.number, spelling);
        }
      }
    } else if (field.fieldKind === "scalar" && field.scalar === ScalarType.INT64) {
      entry.kind = "int";
    } else if (field.fieldKind === "scalar" && field.scalar === ScalarType.STRING) {
      entry.kind = field.name.endsWith("_hhmm") ? "hhmm" : "string";
    } else {
      throw new Error(`no REST mapping for field ${field.name}`);
    }
    fields.push(entry);
  }
  if (!unrecognized) throw new Error(`${MESSAGE} has no ${UNRECOGNIZED} field`);
  const byKey = new Map(fields.map((entry) => [entry.key, entry]));
  const unField = (name) => unrecognized.message.fields.find((f) => f.name === name);
  const extraKeys = unField("extra_keys");
  const extraKey = extraKeys.message.fields.find((f) => f.name === "key");
  const extraValue = extraKeys.message.fields.find((f) => f.name === "json_value");

  /** The value of one known key, or throw naming it. */
  function known(entry, node, strict, spellings) {
    const { key, kind } = entry;
    if (kind === "int") return int64(key, node);
    if (kind === "enum") {
      if (node.kind === "string") {
        const number = entry.byName.get(node.value);
        if (number !== undefined) return number;
        if (strict) throw new RestError(key, `unknown value ${JSON.stringify(node.value)} (strict mode)`);
        if (!node.value.isWellFormed()) throw new RestError(key, "text is not valid Unicode (unpaired surrogate)");
        spellings.set(entry.field.name, node.value);
        return undefined;
      }
      if (node.kind === "number" && node.integer) {
        const n = BigInt(node.token);
        if (n < INT32_MIN || n > INT32_MAX) throw new RestError(key, `enum number ${node.token} is outside int32`);
        if (strict && !entry.byNumber.has(Number(n)))
          throw new RestError(key, `enum number ${node.token} has no spelling in this schema version (strict mode)`);
        // 0 is the zero value: it has no spelling and reads as unset.
        return n === 0n ? undefined : Number(n);
      }
      throw new RestError(key, `expected a string or an integer, got ${describe(node)}`);
    }
    if (node.kind !== "string") throw new RestError(key, `expected a string, got ${describe(node)}`);
    if (kind === "hhmm" && !HHMM.test(node.value))
      throw new RestError(key, `expected "HH:MM" (00:00 to 23:59), got ${JSON.stringify(node.value)}`);
    return node.value;
  }

  /**
   * Read one REST document (JSON text) into a message.
   * @param {string} text
   * @param {{strict?: boolean}} [options]
   */
  function fromRestText(text, { strict = false } = {}) {
    let tree;
    try {
      tree = parse(text);
    } catch (error) {
      if (error instanceof JsonError) throw new RestError(error.topKey, error.reason);
      throw error;
    }
    return fromRestTree(tree, { strict });
  }

  /**
   * Read one REST document already parsed by `parse` of json.js (its parse tree,
   * numbers as tokens) into a message; errors name keys of this document.
   */
  function fromRestTree(tree, { strict = false } = {}) {
    if (tree.kind !== "object") throw new RestError(null, `expected a JSON object, got ${describe(tree)}`);
    const init = {};
    const spellings = new Map(); // enum field name -> unknown spelling
    const extras = [];
    for (const [key, node] of tree.members) {
      const entry = byKey.get(key);
      if (entry) {
        if (isNull(node)) continue;
        const value = known(entry, node, strict, spellings);
        if (value !== undefined) init[entry.field.localName] = value;
        continue;
      }
      if (strict) throw new RestError(key, "unknown key (strict mode rejects keys the schema does not know)");
      let json;
      try {
        json = canonical(node);
      } catch (error) {
        if (error instanceof JsonError) throw new RestError(key, `value is not a valid json_value: ${error.reason}`);
        throw error;
      }
      extras.push({ [extraKey.localName]: key, [extraValue.localName]: json });
    }
    if (spellings.size || extras.length) {
      const un = { [extraKeys.localName]: extras };
      for (const [name, spelling] of spellings) un[unField(name).localName] = spelling;
      init[unrecognized.localName] = un;
    }
    return create(schema, init);
  }

  /** Write a message as REST text (docs/contract.md, "Writing REST"). */
  function toRestText(msg) {
    const parts = [];
    const written = new Set();
    const un = isFieldSet(msg, unrecognized) ? msg[unrecognized.localName] : null;
    for (const entry of fields) {
      const { key, kind, field } = entry;
      let text;
      if (kind === "enum") {
        const number = msg[field.localName];
        if (number) text = entry.byNumber.has(number) ? quote(entry.byNumber.get(number)) : String(number);
        else if (un && isFieldSet(un, unField(field.name))) text = quote(un[unField(field.name).localName]);
      } else if (isFieldSet(msg, field)) {
        const value = msg[field.localName];
        text = kind === "int" ? value.toString() : quote(value);
      }
      if (text !== undefined) {
        parts.push(quote(key) + ":" + text);
        written.add(key);
      }
    }
    for (const extra of un ? un[extraKeys.localName] : []) {
      const key = extra[extraKey.localName];
      if (written.has(key)) continue; // an invalid message: a known key, or a repeated one
      let json;
      try {
        json = canonical(parse(extra[extraValue.localName], { maxDepth: 64 }));
      } catch (error) {
        if (error instanceof JsonError) throw new RestError(key, `stored json_value is invalid: ${error.reason}`);
        throw error;
      }
      parts.push(quote(key) + ":" + json);
      written.add(key);
    }
    return "{" + parts.join(",") + "}";
  }

  return {
    schema,
    fromRestText,
    fromRestTree,
    toRestText,
    toBinary: (msg) => toBinary(schema, msg),
    fromBinary: (bytes) => fromBinary(schema, bytes),
  };
}

// --- the job of a ProtectionRunInstance (docs/contract.md 5.5) ---------------------------------

export const JOB = "shellinfo.v1.ProtectionJob";
/** The key of a ProtectionRunInstance that holds the run (the REST API's, not a field's JSON name). */
export const RUN_KEY = "protectionShellInfo";
// Deep enough for any REST instance; the json_value limit (64) of unknown keys
// inside the run is checked on each value, so that its error names the key.
const INSTANCE_MAX_DEPTH = 512;

/**
 * The REST keys of a message whose fields are all optional int64, string, or
 * messages of the same kind (ProtectionJob, UniversalId), from its descriptor.
 */
function plainFields(schema) {
  return schema.fields.map((field) => {
    let kind;
    if (field.fieldKind === "scalar" && field.scalar === ScalarType.INT64) kind = "int";
    else if (field.fieldKind === "scalar" && field.scalar === ScalarType.STRING) kind = "string";
    else if (field.fieldKind === "message") kind = "object";
    else throw new Error(`no REST mapping for field ${schema.typeName}.${field.name}`);
    return { key: field.jsonName, field, kind, nested: kind === "object" ? plainFields(field.message) : null };
  });
}

/**
 * The init object of a message from the members of a REST object: absent and
 * null leave a field unset, members the schema does not know are not carried.
 * Errors name the key as a dotted path from the instance (`jobUid.clusterId`).
 */
function readPlain(entries, members, prefix) {
  const init = {};
  for (const { key, field, kind, nested } of entries) {
    const node = members.get(key);
    if (node === undefined || isNull(node)) continue;
    const path = prefix + key;
    if (kind === "int") init[field.localName] = int64(path, node);
    else if (kind === "string") {
      if (node.kind !== "string") throw new RestError(path, `expected a string, got ${describe(node)}`);
      init[field.localName] = node.value; // parse() refuses unpaired surrogates
    } else {
      if (node.kind !== "object") throw new RestError(path, `expected an object, got ${describe(node)}`);
      init[field.localName] = readPlain(nested, new Map(node.members), path + ".");
    }
  }
  return init;
}

/** The REST text of the set fields of a message, in field-number order. */
function writePlain(entries, msg) {
  const parts = [];
  for (const { key, field, kind, nested } of entries) {
    if (!isFieldSet(msg, field)) continue;
    const value = msg[field.localName];
    const text = kind === "int" ? value.toString() : kind === "string" ? quote(value) : writePlain(nested, value);
    parts.push(quote(key) + ":" + text);
  }
  return "{" + parts.join(",") + "}";
}

/**
 * Build the reader of REST `ProtectionRunInstance` objects: the run (through the
 * ProtectionShellInfo codec) and its job (`shellinfo.v1.ProtectionJob`, keys from
 * the descriptor's JSON names), and the writer of a job's REST keys.
 *
 * @param {import("@bufbuild/protobuf").Registry} registry holds ProtectionJob besides what createRestCodec needs
 */
export function createRunInstanceCodec(registry, codec = createRestCodec(registry)) {
  const schema = registry.getMessage(JOB);
  if (!schema) throw new Error(`the registry lacks ${JOB}`);
  const entries = plainFields(schema);
  const nestedKeys = new Map(entries.filter((e) => e.nested).map((e) => [e.key, new Set(e.nested.map((n) => n.key))]));

  /** The key a parse error names: inside the run as the run's codec names it, else the job key (dotted). */
  function parseErrorField(path) {
    if (path.length === 0) return null;
    if (path[0] === RUN_KEY) return path.length > 1 ? path[1] : RUN_KEY;
    if (path.length > 1 && nestedKeys.get(path[0])?.has(path[1])) return `${path[0]}.${path[1]}`;
    return path[0];
  }

  /** The job of a parsed object holding job keys, or null when it has none of them. */
  function jobFromTree(tree) {
    if (tree.kind !== "object") throw new RestError(null, `expected a JSON object, got ${describe(tree)}`);
    const init = readPlain(entries, new Map(tree.members), "");
    return Object.keys(init).length ? create(schema, init) : null;
  }

  function parseText(text) {
    try {
      return parse(text, { maxDepth: INSTANCE_MAX_DEPTH });
    } catch (error) {
      if (error instanceof JsonError) throw new RestError(parseErrorField(error.path), error.reason);
      throw error;
    }
  }

  /**
   * Split one ProtectionRunInstance (JSON text) into `{run, job}`; `job` is null
   * when the instance has no job key with a value. `strict` applies to the run.
   */
  function fromRunInstanceText(text, { strict = false } = {}) {
    const tree = parseText(text);
    if (tree.kind !== "object") throw new RestError(null, `expected a JSON object, got ${describe(tree)}`);
    const info = new Map(tree.members).get(RUN_KEY);
    if (info === undefined || info.kind !== "object")
      throw new RestError(RUN_KEY, info === undefined ? "is missing" : `expected an object, got ${describe(info)}`);
    const run = codec.fromRestTree(info, { strict });
    return { run, job: jobFromTree(tree) };
  }

  return {
    schema,
    fromRunInstanceText,
    /** The job of a REST object with (some of) the job keys, as text; null for none. */
    jobFromRestText: (text) => jobFromTree(parseText(text)),
    /** The REST text of a job: `jobId`, `jobName`, `jobUid` as set, in that order. */
    jobToRestText: (job) => writePlain(entries, job),
    toBinary: (job) => toBinary(schema, job),
    fromBinary: (bytes) => fromBinary(schema, bytes),
  };
}

/**
 * Whether `RunFilter.job_ids` keeps a `RunUpdate` (docs/contract.md 5.5): an
 * empty list keeps every run; otherwise the update's job must have a `job_id`
 * in the list (no job, or a job without one, matches none).
 *
 * @param {bigint[]} jobIds
 * @param {{job?: {jobId?: bigint}}} update with `job` a ProtectionJob or undefined
 * @param {import("@bufbuild/protobuf").DescMessage} jobSchema
 */
export function jobIdsKeep(jobIds, update, jobSchema) {
  if (jobIds.length === 0) return true;
  const job = update.job;
  const idField = jobSchema.fields.find((f) => f.name === "job_id");
  if (!job || !isFieldSet(job, idField)) return false;
  return jobIds.includes(job[idField.localName]);
}
