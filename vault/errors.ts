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

/** Errors that guarantee no state changed, so the caller may retry the same request. */
export const RETRYABLE: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  ErrorCodes.RATE_LIMITED,
  ErrorCodes.OVERLOADED,
  ErrorCodes.HSM_UNAVAILABLE,
  ErrorCodes.STORE_UNAVAILABLE,
]);
