// PKCS#11 return values the vault reacts to, by numeric code. pkcs11js throws
// Pkcs11Error with `.code` from most calls but a plain Error whose message is
// "CKR_NAME:code" from C_CreateObject/C_SetAttributeValue/C_CopyObject, so
// callers must go through ckrOf() and switch on the number, never on text.
import { VaultError, ErrorCodes } from '../../protocol/errors.js';

export const CKR = {
  OK: 0x0,
  GENERAL_ERROR: 0x5,
  ACTION_PROHIBITED: 0x1b,
  ATTRIBUTE_READ_ONLY: 0x10,
  ATTRIBUTE_SENSITIVE: 0x11,
  ATTRIBUTE_TYPE_INVALID: 0x12,
  ATTRIBUTE_VALUE_INVALID: 0x13,
  DATA_INVALID: 0x20,
  DATA_LEN_RANGE: 0x21,
  DEVICE_ERROR: 0x30,
  DEVICE_MEMORY: 0x31,
  DEVICE_REMOVED: 0x32,
  ENCRYPTED_DATA_INVALID: 0x40,
  ENCRYPTED_DATA_LEN_RANGE: 0x41,
  KEY_HANDLE_INVALID: 0x60,
  KEY_FUNCTION_NOT_PERMITTED: 0x68,
  KEY_NOT_WRAPPABLE: 0x69,
  KEY_UNEXTRACTABLE: 0x6a,
  MECHANISM_INVALID: 0x70,
  MECHANISM_PARAM_INVALID: 0x71,
  OBJECT_HANDLE_INVALID: 0x82,
  OPERATION_ACTIVE: 0x90,
  PIN_INCORRECT: 0xa0,
  PIN_LOCKED: 0xa4,
  SESSION_CLOSED: 0xb0,
  SESSION_HANDLE_INVALID: 0xb3,
  SIGNATURE_INVALID: 0xc0,
  SIGNATURE_LEN_RANGE: 0xc1,
  TEMPLATE_INCONSISTENT: 0xd1,
  TOKEN_NOT_PRESENT: 0xe0,
  TOKEN_NOT_RECOGNIZED: 0xe1,
  USER_ALREADY_LOGGED_IN: 0x100,
  USER_NOT_LOGGED_IN: 0x101,
  USER_PIN_NOT_INITIALIZED: 0x102,
  USER_ANOTHER_ALREADY_LOGGED_IN: 0x104,
  WRAPPED_KEY_INVALID: 0x110,
  CRYPTOKI_NOT_INITIALIZED: 0x190,
  CRYPTOKI_ALREADY_INITIALIZED: 0x191,
} as const;

/** Numeric CKR_* code of a pkcs11js error, or undefined for a non-PKCS#11 error. */
export function ckrOf(e: unknown): number | undefined {
  if (!(e instanceof Error)) return undefined;
  const code = (e as { code?: unknown }).code;
  if (typeof code === 'number' && code > 0) return code;
  const m = /CKR_\w+:(\d+)/.exec(e.message);
  return m ? Number(m[1]) : undefined;
}

/** Codes after which the session (or the login it carried) is gone and must be rebuilt. */
export function isSessionLost(ckr: number | undefined): boolean {
  return (
    ckr === CKR.SESSION_HANDLE_INVALID ||
    ckr === CKR.SESSION_CLOSED ||
    ckr === CKR.USER_NOT_LOGGED_IN ||
    ckr === CKR.DEVICE_ERROR ||
    ckr === CKR.DEVICE_REMOVED ||
    ckr === CKR.TOKEN_NOT_PRESENT ||
    ckr === CKR.CRYPTOKI_NOT_INITIALIZED
  );
}

/**
 * Codes after which the object handles we hold are stale: SoftHSM (and the PKCS#11
 * spec) invalidate private-object handles when the login ends, e.g. when every
 * session was closed or C_Logout ran. Retrying on the same handles never helps;
 * the key set must be found again by label (TokenVaultKeys.fresh; the worker pool
 * re-resolves in its recycle).
 */
export function isHandleLost(ckr: number | undefined): boolean {
  return ckr === CKR.OBJECT_HANDLE_INVALID || ckr === CKR.KEY_HANDLE_INVALID;
}

/** Map a PKCS#11 failure to the vault's error vocabulary. The text names the operation only. */
export function toVaultError(e: unknown, op: string): VaultError {
  if (e instanceof VaultError) return e;
  const ckr = ckrOf(e);
  const hex = ckr === undefined ? 'native' : `0x${ckr.toString(16)}`;
  if (ckr === CKR.PIN_INCORRECT || ckr === CKR.PIN_LOCKED) {
    return new VaultError(ErrorCodes.HSM_PIN_INCORRECT, `HSM refused the PIN during ${op} (${hex}); not retrying`);
  }
  // A lost login surfaces as stale handles: the HSM is momentarily unusable and nothing was
  // done. HSM_UNAVAILABLE is what the worker pool heals on (recycle and re-resolve), and
  // what TokenVaultKeys recovers from (test/adversarial-hsm.test.ts, real C_Logout).
  if (isSessionLost(ckr) || isHandleLost(ckr) || ckr === CKR.DEVICE_MEMORY) {
    return new VaultError(ErrorCodes.HSM_UNAVAILABLE, `HSM unavailable during ${op} (${hex})`);
  }
  return new VaultError(ErrorCodes.HSM_ERROR, `HSM operation ${op} failed (${hex})`);
}
