// A small exact JSON reader and the canonical json_value writer (docs/contract.md,
// "The canonical json_value form").
//
// JSON.parse is not used anywhere on the REST path: it turns every number into a
// double, so an int64 jobRunId beyond 2^53, or an unknown key's integer, would
// change. This reader keeps each number as its token and each object as its
// ordered member list, and reports duplicate names, unpaired surrogates and the
// nesting limit, which JSON.parse cannot.

/** Nesting depth of arrays and objects a json_value may have. */
export const MAX_DEPTH = 64;
/** Characters a number token of a json_value may have. */
export const MAX_NUMBER_CHARS = 100;

/** A text that is not valid JSON, or not within the limits. */
export class JsonError extends Error {
  /**
   * @param {string} reason what is wrong
   * @param {string[]} path the member names from the outermost object down to the
   *   member whose name or value the problem is in (empty: none)
   */
  constructor(reason, path = []) {
    super(reason);
    this.name = "JsonError";
    this.reason = reason;
    this.path = path;
    /** the member of the outermost object the problem is in, or null */
    this.topKey = path.length ? path[0] : null;
  }
}

// Node kinds of the parse tree.
// {kind: "object", members: [[name, node], ...]}   in document order
// {kind: "array", items: [node, ...]}
// {kind: "string", value}                          a JS (UTF-16) string
// {kind: "number", token, integer}                 integer: no fraction, no exponent
// {kind: "literal", value: "true" | "false" | "null"}

const NUMBER = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;
const WHITESPACE = /[ \t\n\r]*/y;
const ESCAPES = { '"': '"', "\\": "\\", "/": "/", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t" };

/**
 * Parse one JSON value from `text`, exactly.
 *
 * @param {string} text
 * @param {{maxDepth?: number}} [options] maxDepth bounds the nesting of the whole
 *   text (the default leaves room for one enclosing REST object around a json_value)
 * @returns the parse tree
 */
export function parse(text, { maxDepth = MAX_DEPTH + 1 } = {}) {
  let pos = 0;
  // The member names of the objects the reader is inside, down to the member
  // whose value is being read: a problem names the innermost one it is in.
  const path = [];

  const fail = (reason) => {
    throw new JsonError(reason, [...path]);
  };
  const skip = () => {
    WHITESPACE.lastIndex = pos;
    WHITESPACE.exec(text);
    pos = WHITESPACE.lastIndex;
  };

  const string = () => {
    // at the opening quote
    pos++;
    let out = "";
    let start = pos;
    for (;;) {
      if (pos >= text.length) fail("unterminated string");
      const c = text.charCodeAt(pos);
      if (c === 0x22) break;
      if (c < 0x20) fail("control character in a string must be escaped");
      if (c !== 0x5c) {
        pos++;
        continue;
      }
      out += text.slice(start, pos);
      const e = text[pos + 1];
      if (e === "u") {
        const hex = text.slice(pos + 2, pos + 6);
        if (!/^[0-9a-fA-F]{4}$/.test(hex)) fail("bad \\u escape");
        out += String.fromCharCode(parseInt(hex, 16));
        pos += 6;
      } else if (e !== undefined && Object.hasOwn(ESCAPES, e)) {
        out += ESCAPES[e];
        pos += 2;
      } else {
        fail("bad escape in a string");
      }
      start = pos;
    }
    out += text.slice(start, pos);
    pos++;
    if (!out.isWellFormed()) fail("unpaired surrogate in a string");
    return out;
  };

  const value = (depth) => {
    skip();
    if (pos >= text.length) fail("not one JSON value: the text ends early");
    const c = text[pos];
    if (c === "{" || c === "[") {
      if (depth + 1 > maxDepth) fail(`nesting deeper than ${MAX_DEPTH}`);
      pos++;
      skip();
      if (c === "[") {
        const items = [];
        if (text[pos] === "]") {
          pos++;
          return { kind: "array", items };
        }
        for (;;) {
          items.push(value(depth + 1));
          skip();
          if (text[pos] === ",") pos++;
          else if (text[pos] === "]") {
            pos++;
            return { kind: "array", items };
          } else fail("not one JSON value: expected , or ] in an array");
        }
      }
      const members = [];
      const names = new Set();
      if (text[pos] === "}") {
        pos++;
        return { kind: "object", members };
      }
      for (;;) {
        skip();
        if (text[pos] !== '"') fail("not one JSON value: expected a member name");
        const name = string();
        path.push(name);
        if (names.has(name)) fail(`duplicate member name ${JSON.stringify(name)}`);
        names.add(name);
        skip();
        if (text[pos] !== ":") fail("not one JSON value: expected :");
        pos++;
        members.push([name, value(depth + 1)]);
        path.pop();
        skip();
        if (text[pos] === ",") pos++;
        else if (text[pos] === "}") {
          pos++;
          return { kind: "object", members };
        } else fail("not one JSON value: expected , or } in an object");
      }
    }
    if (c === '"') return { kind: "string", value: string() };
    for (const literal of ["true", "false", "null"]) {
      if (text.startsWith(literal, pos)) {
        pos += literal.length;
        return { kind: "literal", value: literal };
      }
    }
    NUMBER.lastIndex = pos;
    const m = NUMBER.exec(text);
    if (m === null) fail("not one JSON value");
    pos = NUMBER.lastIndex;
    return { kind: "number", token: m[0], integer: m[1] === undefined && m[2] === undefined };
  };

  const tree = value(0);
  skip();
  if (pos !== text.length) fail("trailing data after the value");
  return tree;
}

/** Write a JS string as canonical JSON string text. */
export function quote(s) {
  let out = '"';
  let start = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    let esc;
    if (c === 0x22) esc = '\\"';
    else if (c === 0x5c) esc = "\\\\";
    else if (c < 0x20) {
      esc =
        c === 0x08 ? "\\b" : c === 0x09 ? "\\t" : c === 0x0a ? "\\n" : c === 0x0c ? "\\f" : c === 0x0d ? "\\r"
          : "\\u00" + c.toString(16).padStart(2, "0");
    } else continue;
    out += s.slice(start, i) + esc;
    start = i + 1;
  }
  return out + s.slice(start) + '"';
}

/** The canonical text of a number token, or a JsonError. */
export function canonicalNumber(token) {
  if (token.length > MAX_NUMBER_CHARS) throw new JsonError(`number token longer than ${MAX_NUMBER_CHARS} characters`);
  if (!/[.eE]/.test(token)) return BigInt(token).toString(); // exact; -0 is 0
  const n = Number(token); // correctly rounded to the nearest binary64
  if (!Number.isFinite(n)) throw new JsonError("number is not finite as a binary64");
  return String(n); // ECMAScript Number::toString; String(-0) is "0"
}

/** UTF-16 code unit order, which is what JS string comparison is. */
const byName = (a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0);

/**
 * The canonical json_value text of a parse tree, checking the json_value limits
 * (nesting depth counted from this node, number token length).
 */
export function canonical(node, depth = 0) {
  switch (node.kind) {
    case "literal":
      return node.value;
    case "string":
      return quote(node.value);
    case "number":
      return canonicalNumber(node.token);
    case "array":
      if (depth + 1 > MAX_DEPTH) throw new JsonError(`nesting deeper than ${MAX_DEPTH}`);
      return "[" + node.items.map((item) => canonical(item, depth + 1)).join(",") + "]";
    case "object":
      if (depth + 1 > MAX_DEPTH) throw new JsonError(`nesting deeper than ${MAX_DEPTH}`);
      return (
        "{" +
        [...node.members]
          .sort(byName)
          .map(([name, value]) => quote(name) + ":" + canonical(value, depth + 1))
          .join(",") +
        "}"
      );
    default:
      throw new Error(`not a parse tree node: ${node.kind}`);
  }
}

/** Canonicalize json_value text: any valid JSON within the limits in, the canonical form out. */
export function canonicalize(text) {
  return canonical(parse(text, { maxDepth: MAX_DEPTH }));
}
