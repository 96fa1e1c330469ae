// Errors as typed values with stable codes. The code is the contract (it goes on
// the wire and into metrics); the message is for humans and must never carry a
// secret, so callers pass only static text or non-secret identifiers.

export const ErrorCodes = {
  // Caller's fault: the request is wrong and retrying it unchanged will not help.
  BAD_REQUEST: 'BAD_REQUEST',
  INVALID_POINT: 'INVALID_POINT',
  INVALID_LENGTH: 'INVALID_LENGTH',
  INVALID_USER_ID: 'INVALID_USER_ID',
  INVALID_KDF_PARAMS: 'INVALID_KDF_PARAMS',
  PAYLOAD_TOO_LARGE: 'PAYLOAD_TOO_LARGE',
  // Record state.
  RECORD_NOT_FOUND: 'RECORD_NOT_FOUND',
  RECORD_EXISTS: 'RECORD_EXISTS',
  LOCKED: 'LOCKED',
  WRONG_PASSWORD: 'WRONG_PASSWORD',
  // Sessions and channel.
  SESSION_NOT_FOUND: 'SESSION_NOT_FOUND',
  SESSION_EXPIRED: 'SESSION_EXPIRED',
  OUT_OF_ORDER: 'OUT_OF_ORDER',
  REPLAY: 'REPLAY',
  DECRYPT_FAILED: 'DECRYPT_FAILED',
  STALE_MESSAGE: 'STALE_MESSAGE',
  // Integrity of stored state.
  RECORD_CORRUPT: 'RECORD_CORRUPT',
  STATE_ROLLBACK_DETECTED: 'STATE_ROLLBACK_DETECTED',
  // Service side.
  UNAUTHENTICATED: 'UNAUTHENTICATED',
  FORBIDDEN: 'FORBIDDEN',
  /** A request named a record namespace its tenant is not granted (vault/core/namespace.ts). */
  NAMESPACE_NOT_GRANTED: 'NAMESPACE_NOT_GRANTED',
  RATE_LIMITED: 'RATE_LIMITED',
  OVERLOADED: 'OVERLOADED',
  HSM_UNAVAILABLE: 'HSM_UNAVAILABLE',
  /** Client side only: no answer from the vault (refused, closed or timed out); a request's fate may be unknown. */
  VAULT_UNREACHABLE: 'VAULT_UNREACHABLE',
  HSM_PIN_INCORRECT: 'HSM_PIN_INCORRECT',
  HSM_TOKEN_NOT_FOUND: 'HSM_TOKEN_NOT_FOUND',
  HSM_POLICY_VIOLATION: 'HSM_POLICY_VIOLATION',
  HSM_ERROR: 'HSM_ERROR',
  STORE_UNAVAILABLE: 'STORE_UNAVAILABLE',
  INTERNAL: 'INTERNAL',
  // Key ceremony (bkv-admin ceremony, vault/ceremony/): operator-side only, never on the RPC wire.
  // Each refusal changes nothing on either HSM.
  CEREMONY_SO_PIN_MISSING: 'CEREMONY_SO_PIN_MISSING',
  CEREMONY_NOT_CLONEABLE: 'CEREMONY_NOT_CLONEABLE',
  CEREMONY_FINGERPRINT_MISMATCH: 'CEREMONY_FINGERPRINT_MISMATCH',
  CEREMONY_WRONG_TARGET: 'CEREMONY_WRONG_TARGET',
  CEREMONY_TRANSPORT_MISSING: 'CEREMONY_TRANSPORT_MISSING',
  CEREMONY_BUNDLE_MALFORMED: 'CEREMONY_BUNDLE_MALFORMED',
  CEREMONY_BUNDLE_TAMPERED: 'CEREMONY_BUNDLE_TAMPERED',
  CEREMONY_VAULT_MISMATCH: 'CEREMONY_VAULT_MISMATCH',
  CEREMONY_TARGET_NOT_EMPTY: 'CEREMONY_TARGET_NOT_EMPTY',
  CEREMONY_SELF_TEST_FAILED: 'CEREMONY_SELF_TEST_FAILED',
  CEREMONY_DAEMON_RUNNING: 'CEREMONY_DAEMON_RUNNING',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

export class VaultError extends Error {
  readonly code: ErrorCode;
  /** Non-secret structured detail safe to put on the wire (e.g. attempts left). */
  readonly detail: Readonly<Record<string, string | number | boolean>> | undefined;

  constructor(code: ErrorCode, message: string, detail?: Record<string, string | number | boolean>) {
    super(message);
    this.name = 'VaultError';
    this.code = code;
    this.detail = detail;
  }
}

export function isVaultError(e: unknown, code?: ErrorCode): e is VaultError {
  return e instanceof VaultError && (code === undefined || e.code === code);
}

// ---- the one error table ------------------------------------------------------
//
// Everything a code means outside this process is decided here, once: the
// JSON-RPC integer the WebSocket server answers with, whether a retry is safe,
// the admin listener's HTTP status and both command lines' exit codes. The
// servers and CLIs read this table; docs/RPC.md shows it and
// test/unit/error-table.test.ts keeps the two equal row by row. Pure data, no Node
// imports: it moves to a browser-safe package with the rest of the protocol.

/** Exit codes of `bkv` (README.md, `bkv --help`). */
export const BKV_EXIT = {
  OK: 0,
  OTHER: 1,
  USAGE: 2,
  WRONG_PASSWORD: 3,
  LOCKED: 4,
  NO_RECORD: 5,
  UNAVAILABLE: 6,
  WRONG_KEY: 7,
  CORRUPTED: 8,
  UNAUTHENTICATED: 9,
} as const;

/** Exit codes of `bkv-admin` (its `--help`). */
export const ADMIN_EXIT = {
  OK: 0,
  FAILED: 1,
  USAGE: 2,
  AUDIT_BROKEN: 3,
  NOT_CONFORM: 4,
  NOT_FOUND: 5,
  UNAVAILABLE: 6,
  /** A key ceremony step refused (its CEREMONY_* code); nothing changed. */
  CEREMONY_REFUSED: 7,
} as const;

/**
 * JSON-RPC 2.0's own codes for a frame that is not a call of a known method.
 * Their `data.code` is BAD_REQUEST: the integer says which rule was broken.
 */
export const JSONRPC_FRAMING = {
  /** The frame is not JSON. */
  PARSE_ERROR: -32700,
  /** JSON, but not one request object: binary frame, batch, no "jsonrpc": "2.0", no method, no id, params not structured. */
  INVALID_REQUEST: -32600,
  /** No such method. */
  METHOD_NOT_FOUND: -32601,
} as const;

export interface ErrorSpec {
  /** `error.code` of a JSON-RPC answer whose `error.data.code` is this code. */
  readonly jsonrpc: number;
  /** True only when the vault guarantees that nothing changed, so the same request may be sent again. */
  readonly retryable: boolean;
  /** HTTP status of this code on the admin listener. */
  readonly http: number;
  /** Exit code of `bkv` when a command fails with this code. */
  readonly bkv: number;
  /** Exit code of `bkv-admin` when a command fails with this code. */
  readonly admin: number;
}

const B = BKV_EXIT;
const A = ADMIN_EXIT;
const spec = (jsonrpc: number, retryable: boolean, http: number, bkv: number, admin: number): ErrorSpec => ({ jsonrpc, retryable, http, bkv, admin });

/**
 * Every code, in the order of docs/RPC.md's table. -32602 invalid params,
 * -32001 not allowed, -32002 the channel refused the message, -32003 not now,
 * -32004 the record refused it, -32603 the vault is broken.
 */
export const ERRORS: { readonly [C in ErrorCode]: ErrorSpec } = {
  BAD_REQUEST: spec(-32602, false, 400, B.OTHER, A.USAGE),
  INVALID_POINT: spec(-32602, false, 400, B.OTHER, A.FAILED),
  INVALID_LENGTH: spec(-32602, false, 400, B.OTHER, A.FAILED),
  INVALID_USER_ID: spec(-32602, false, 400, B.OTHER, A.FAILED),
  INVALID_KDF_PARAMS: spec(-32602, false, 400, B.OTHER, A.FAILED),
  PAYLOAD_TOO_LARGE: spec(-32600, false, 413, B.OTHER, A.FAILED),
  RECORD_NOT_FOUND: spec(-32004, false, 404, B.NO_RECORD, A.NOT_FOUND),
  RECORD_EXISTS: spec(-32004, false, 409, B.OTHER, A.FAILED),
  LOCKED: spec(-32004, false, 409, B.LOCKED, A.FAILED),
  WRONG_PASSWORD: spec(-32004, false, 403, B.WRONG_PASSWORD, A.FAILED),
  SESSION_NOT_FOUND: spec(-32002, false, 404, B.OTHER, A.FAILED),
  SESSION_EXPIRED: spec(-32002, false, 410, B.OTHER, A.FAILED),
  OUT_OF_ORDER: spec(-32002, false, 409, B.OTHER, A.FAILED),
  REPLAY: spec(-32002, false, 409, B.OTHER, A.FAILED),
  DECRYPT_FAILED: spec(-32002, false, 400, B.OTHER, A.FAILED),
  STALE_MESSAGE: spec(-32002, false, 400, B.OTHER, A.FAILED),
  RECORD_CORRUPT: spec(-32004, false, 500, B.OTHER, A.FAILED),
  STATE_ROLLBACK_DETECTED: spec(-32004, false, 500, B.OTHER, A.NOT_CONFORM),
  UNAUTHENTICATED: spec(-32001, false, 401, B.UNAUTHENTICATED, A.FAILED),
  FORBIDDEN: spec(-32001, false, 403, B.OTHER, A.FAILED),
  NAMESPACE_NOT_GRANTED: spec(-32001, false, 403, B.OTHER, A.FAILED),
  RATE_LIMITED: spec(-32003, true, 429, B.UNAVAILABLE, A.UNAVAILABLE),
  OVERLOADED: spec(-32003, true, 503, B.UNAVAILABLE, A.UNAVAILABLE),
  HSM_UNAVAILABLE: spec(-32003, true, 503, B.UNAVAILABLE, A.UNAVAILABLE),
  VAULT_UNREACHABLE: spec(-32003, false, 503, B.UNAVAILABLE, A.UNAVAILABLE),
  HSM_PIN_INCORRECT: spec(-32603, false, 500, B.UNAVAILABLE, A.FAILED),
  HSM_TOKEN_NOT_FOUND: spec(-32603, false, 500, B.UNAVAILABLE, A.UNAVAILABLE),
  HSM_POLICY_VIOLATION: spec(-32603, false, 500, B.UNAVAILABLE, A.NOT_CONFORM),
  HSM_ERROR: spec(-32603, false, 500, B.UNAVAILABLE, A.FAILED),
  STORE_UNAVAILABLE: spec(-32003, true, 503, B.UNAVAILABLE, A.UNAVAILABLE),
  INTERNAL: spec(-32603, false, 500, B.OTHER, A.FAILED),
  // bkv-admin only (the key ceremony): never on the RPC wire. Each is a refusal that
  // changed nothing; through the admin listener (export) it answers 409.
  CEREMONY_SO_PIN_MISSING: spec(-32602, false, 409, B.OTHER, A.CEREMONY_REFUSED),
  CEREMONY_NOT_CLONEABLE: spec(-32602, false, 409, B.OTHER, A.CEREMONY_REFUSED),
  CEREMONY_FINGERPRINT_MISMATCH: spec(-32602, false, 409, B.OTHER, A.CEREMONY_REFUSED),
  CEREMONY_WRONG_TARGET: spec(-32602, false, 409, B.OTHER, A.CEREMONY_REFUSED),
  CEREMONY_TRANSPORT_MISSING: spec(-32602, false, 409, B.OTHER, A.CEREMONY_REFUSED),
  CEREMONY_BUNDLE_MALFORMED: spec(-32602, false, 409, B.OTHER, A.CEREMONY_REFUSED),
  CEREMONY_BUNDLE_TAMPERED: spec(-32602, false, 409, B.OTHER, A.CEREMONY_REFUSED),
  CEREMONY_VAULT_MISMATCH: spec(-32602, false, 409, B.OTHER, A.CEREMONY_REFUSED),
  CEREMONY_TARGET_NOT_EMPTY: spec(-32602, false, 409, B.OTHER, A.CEREMONY_REFUSED),
  CEREMONY_SELF_TEST_FAILED: spec(-32602, false, 409, B.OTHER, A.CEREMONY_REFUSED),
  CEREMONY_DAEMON_RUNNING: spec(-32602, false, 409, B.OTHER, A.CEREMONY_REFUSED),
};

/** The table's row for a code from the wire, which may be one this build does not know. */
export function errorSpec(code: string): ErrorSpec | undefined {
  return Object.hasOwn(ERRORS, code) ? ERRORS[code as ErrorCode] : undefined;
}

/** Errors that guarantee no state changed, so the caller may retry the same request. */
export const RETRYABLE: ReadonlySet<ErrorCode> = new Set(
  (Object.keys(ERRORS) as ErrorCode[]).filter((c) => ERRORS[c].retryable),
);
