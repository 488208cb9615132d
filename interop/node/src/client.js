// A small client of RunUpdateService on connect-node (gRPC protocol over
// HTTP/2), following docs/contract.md: error details decoded from
// grpc-status-details-bin, and a watch that resumes by the retry policy table.

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { BadRequestSchema, ErrorInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { RunUpdateService } from "../gen/shellinfo/v1/run_update_service_pb.js";

export const ERROR_DOMAIN = "shellinfo.v1";

/**
 * A RunUpdateService client for `url`, sending `authorization: Bearer <token>`
 * when a token is given. `client.close()` drops its HTTP/2 connection (an idle
 * one would otherwise keep the process alive for a while).
 */
export function connect(url, { token } = {}) {
  return connectService(RunUpdateService, url, { token });
}

/**
 * A client of any `service` at `url` (gRPC over HTTP/2), sending
 * `authorization: Bearer <token>` when a token is given, with `close()`.
 */
export function connectService(service, url, { token } = {}) {
  const sessionManager = new Http2SessionManager(url);
  const interceptors = token
    ? [
        (next) => (request) => {
          request.header.set("authorization", `Bearer ${token}`);
          return next(request);
        },
      ]
    : [];
  const client = createClient(service, createGrpcTransport({ baseUrl: url, interceptors, sessionManager }));
  return Object.assign(client, { close: () => sessionManager.abort() });
}

/**
 * The contract's view of a failed call: code, the ErrorInfo (reason, domain,
 * metadata) and the BadRequest field violations.
 */
export function describeError(error) {
  const err = ConnectError.from(error);
  const [info] = err.findDetails(ErrorInfoSchema);
  const violations = err.findDetails(BadRequestSchema).flatMap((bad) => bad.fieldViolations);
  return {
    code: err.code,
    message: err.rawMessage,
    reason: info?.reason ?? "",
    domain: info?.domain ?? "",
    metadata: info?.metadata ?? {},
    violations: violations.map((v) => ({ field: v.field, description: v.description })),
  };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The delay before the n-th consecutive retry: random in [d/2, d], d = min(50 ms * 2^(n-1), 5 s). */
export function backoff(n, { initial = 50, max = 5000 } = {}) {
  const ceiling = Math.min(initial * 2 ** Math.max(n - 1, 0), max);
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

/** Whether a watch resumes after this error (docs/contract.md, "Client retry policy"). */
export function resumable({ code, reason }) {
  return code === Code.Unavailable || (code === Code.ResourceExhausted && reason === "WATCHER_TOO_SLOW");
}

/**
 * Watch matching updates from `startRevision` (inclusive; 0 = from now),
 * resuming after UNAVAILABLE and WATCHER_TOO_SLOW from the revision after the
 * last one delivered. Yields {update} for each update and {revision} once per
 * response (its resume point); throws any other error, described.
 *
 * @param {ReturnType<typeof connect>} client
 * @param {{filter?: object, startRevision?: bigint, progressIntervalMs?: number, signal?: AbortSignal,
 *          maxAttempts?: number, onResume?: (error: object, from: bigint) => void}} options
 */
export async function* watch(client, { filter, startRevision = 0n, progressIntervalMs = 0, signal, maxAttempts = 100, onResume } = {}) {
  let position = startRevision > 0n ? startRevision - 1n : null; // everything up to here was delivered
  let failures = 0;
  for (;;) {
    const request = { filter, startRevision: position === null ? startRevision : position + 1n, progressIntervalMs };
    try {
      for await (const response of client.watchRuns(request, { signal })) {
        failures = 0;
        for (const update of response.updates) {
          if (position !== null && update.revision <= position) continue; // delivered already
          position = update.revision;
          yield { update };
        }
        if (position === null || response.revision > position) position = response.revision;
        yield { revision: response.revision };
      }
      // A stream that ends without an error is resumed like UNAVAILABLE.
      if (++failures > maxAttempts) throw new Error("the server kept ending the watch");
      await sleep(backoff(failures));
    } catch (error) {
      if (signal?.aborted) throw error;
      const described = describeError(error);
      if (!resumable(described) || ++failures > maxAttempts) throw Object.assign(new Error(described.message), described);
      if (position === null && /^\d+$/.test(described.metadata.last_revision ?? "")) {
        position = BigInt(described.metadata.last_revision);
      }
      onResume?.(described, position === null ? startRevision : position + 1n);
      await sleep(backoff(failures));
    }
  }
}
