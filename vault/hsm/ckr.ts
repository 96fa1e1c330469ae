// PKCS#11 return values the vault reacts to, by numeric code. pkcs11js throws
// Pkcs11Error with `.code` from most calls but a plain Error whose message is
// "CKR_NAME:code" from C_CreateObject/C_SetAttributeValue/C_CopyObject, so
// callers must go through ckrOf() and switch on the number, never on text.
import pkcs11js from 'pkcs11js';
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
  TEMPLATE_INCOMPLETE: 0xd0,
  TEMPLATE_INCONSISTENT: 0xd1,
  ARGUMENTS_BAD: 0x7,
  FUNCTION_NOT_SUPPORTED: 0x54,
  KEY_SIZE_RANGE: 0x62,
  KEY_TYPE_INCONSISTENT: 0x63,
  DOMAIN_PARAMS_INVALID: 0x130,
  CURVE_NOT_SUPPORTED: 0x140,
  TOKEN_NOT_PRESENT: 0xe0,
  TOKEN_NOT_RECOGNIZED: 0xe1,
  USER_ALREADY_LOGGED_IN: 0x100,
  USER_NOT_LOGGED_IN: 0x101,
  USER_PIN_NOT_INITIALIZED: 0x102,
  USER_ANOTHER_ALREADY_LOGGED_IN: 0x104,
  USER_TYPE_INVALID: 0x103,
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
 * the key set must be found again by label (TokenPort.fresh in token-port.ts; the worker pool
 * re-resolves in its recycle).
 */
export function isHandleLost(ckr: number | undefined): boolean {
  return ckr === CKR.OBJECT_HANDLE_INVALID || ckr === CKR.KEY_HANDLE_INVALID;
}

// Names from pkcs11js's own constants, plus codes it does not export (PKCS#11 2.40
// and 3.0 additions) and NSS's vendor codes.
const EXTRA_CKR: Record<number, string> = {
  0x1b: 'CKR_ACTION_PROHIBITED',
  0x140: 'CKR_CURVE_NOT_SUPPORTED',
  0xce534351: 'CKR_NSS_CERTDB_FAILED',
  0xce534352: 'CKR_NSS_KEYDB_FAILED',
};

function namesOf(prefix: string): Map<number, string> {
  const m = new Map<number, string>();
  for (const [k, v] of Object.entries(pkcs11js)) if (k.startsWith(prefix) && typeof v === 'number' && !m.has(v)) m.set(v, k);
  return m;
}
let ckrNames: Map<number, string> | undefined;
let ckmNames: Map<number, string> | undefined;

/** "CKR_MECHANISM_INVALID (0x70)": a return value by name, with its number. */
export function ckrText(code: number): string {
  ckrNames ??= namesOf('CKR_');
  const name = EXTRA_CKR[code] ?? ckrNames.get(code) ?? (code >= 0x80000000 ? 'CKR_VENDOR_DEFINED' : 'CKR_UNKNOWN');
  return `${name} (0x${code.toString(16)})`;
}

/** A mechanism's CKM_ name, or its hex number when pkcs11js does not name it. */
export function ckmName(code: number): string {
  ckmNames ??= namesOf('CKM_');
  // pkcs11js also exports aliases (CKM_ECDSA_KEY_PAIR_GEN = CKM_EC_KEY_PAIR_GEN); prefer the current names.
  const preferred: Record<number, string> = { [pkcs11js.CKM_EC_KEY_PAIR_GEN]: 'CKM_EC_KEY_PAIR_GEN' };
  return preferred[code] ?? ckmNames.get(code) ?? `0x${code.toString(16)}`;
}

/** What an error message can say about the call that failed, besides its name. */
export interface HsmContext {
  /** CKA_LABEL of the key or object the call used. */
  label?: string;
  /** CKM_ name of the mechanism. */
  mechanism?: string;
  /** What the operator can do; replaces the hint derived from the return value. */
  hint?: string;
}

const CHECK = 'run "bkv-admin hsm check" for what this module and token can do';

/** The operator's next step for a return value, when there is a useful one. */
function hintFor(ckr: number | undefined, op: string, ctx: HsmContext): string | undefined {
  switch (ckr) {
    case CKR.MECHANISM_INVALID:
      return `this module does not support ${ctx.mechanism ?? 'a mechanism the vault needs'}; ${CHECK}`;
    case CKR.MECHANISM_PARAM_INVALID:
      return `the module refused the parameters of ${ctx.mechanism ?? 'the mechanism'}; ${CHECK}`;
    case CKR.ATTRIBUTE_TYPE_INVALID:
    case CKR.ATTRIBUTE_VALUE_INVALID:
    case CKR.TEMPLATE_INCOMPLETE:
    case CKR.TEMPLATE_INCONSISTENT:
      return `the module refused an attribute of the object template; ${CHECK}`;
    case CKR.GENERAL_ERROR:
      return /Generate|Create/.test(op) ? `some modules answer this to a template attribute they reject; ${CHECK}` : undefined;
    case CKR.DOMAIN_PARAMS_INVALID:
    case CKR.CURVE_NOT_SUPPORTED:
      return 'the module does not support the P-256 curve (secp256r1) for this key';
    case CKR.KEY_FUNCTION_NOT_PERMITTED:
      return 'the key\'s usage flags do not allow this operation: "bkv-admin status" checks the key set against hsm-policy';
    case CKR.ARGUMENTS_BAD:
      return op === 'C_Initialize' ? 'this module may need hsm.libraryParameters' : undefined;
    case CKR.DEVICE_MEMORY:
      return 'the token is out of memory (object storage full?)';
    case CKR.PIN_INCORRECT:
    case CKR.PIN_LOCKED:
      return 'check hsm.pinFile / BKV_HSM_PIN; real HSMs lock the token after a few wrong PINs';
    case CKR.USER_PIN_NOT_INITIALIZED:
      return 'the token has no user PIN yet: set one with the module\'s own tool';
    case CKR.USER_TYPE_INVALID:
      return op === 'C_Login'
        ? 'the token has no user yet (NSS softoken: no key database in the configdir of hsm.libraryParameters; create one with certutil -N -d sql:DIR)'
        : undefined;
    case CKR.TOKEN_NOT_PRESENT:
    case CKR.DEVICE_REMOVED:
      return 'the token is not present: check the HSM connection';
    default:
      return undefined;
  }
}

/** "C_Sign failed: CKR_… (0x…); key "bkv.verifier", mechanism CKM_…. Hint: …" */
function describe(op: string, ckr: number | undefined, ctx: HsmContext): string {
  const code = ckr === undefined ? 'a native error' : ckrText(ckr);
  const about = [ctx.label ? `key "${ctx.label}"` : '', ctx.mechanism ? `mechanism ${ctx.mechanism}` : ''].filter(Boolean).join(', ');
  const hint = ctx.hint ?? hintFor(ckr, op, ctx);
  return `${op}: ${code}${about ? `; ${about}` : ''}${hint ? `. Hint: ${hint}` : ''}`;
}

/**
 * Map a PKCS#11 failure to the vault's error vocabulary. The text names the
 * function, the return value by name, the key label and the mechanism when
 * known, and a hint; never data, PINs or key material.
 */
export function toVaultError(e: unknown, op: string, ctx: HsmContext = {}): VaultError {
  if (e instanceof VaultError) return e;
  const ckr = ckrOf(e);
  if (ckr === CKR.PIN_INCORRECT || ckr === CKR.PIN_LOCKED) {
    return new VaultError(ErrorCodes.HSM_PIN_INCORRECT, `HSM refused the PIN during ${describe(op, ckr, ctx)}; not retrying`);
  }
  // A lost login surfaces as stale handles: the HSM is momentarily unusable and nothing was
  // done. HSM_UNAVAILABLE is what the worker pool heals on (recycle and re-resolve), and
  // what TokenPort recovers from (test/integration/adversarial-hsm.test.ts, real C_Logout).
  if (isSessionLost(ckr) || isHandleLost(ckr) || ckr === CKR.DEVICE_MEMORY) {
    return new VaultError(ErrorCodes.HSM_UNAVAILABLE, `HSM unavailable during ${describe(op, ckr, ctx)}`);
  }
  return new VaultError(ErrorCodes.HSM_ERROR, `HSM operation ${describe(op, ckr, ctx)}`);
}
