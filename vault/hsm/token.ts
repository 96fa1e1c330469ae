// The one place that talks to pkcs11js. A Token is a logged-in PKCS#11 token
// found by label, with a small session pool and typed wrappers for exactly the
// calls the vault and its policy need. Everything above sees opaque handles.
import pkcs11js from 'pkcs11js';
import { createHash, timingSafeEqual } from 'node:crypto';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { CKR, ckrOf, isHandleLost, isSessionLost, toVaultError, type HsmContext } from './ckr.js';

const P = pkcs11js;

export type Handle = Buffer & { readonly __handle?: never };

export interface TokenConfig {
  /** Path to the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so. */
  modulePath: string;
  /** Tokens are found by label: SoftHSM renumbers slots. */
  tokenLabel: string;
  /** User PIN. Never logged; a wrong one fails fast and is never retried. */
  pin: string;
  /** Upper bound on open sessions (one operation per session at a time). */
  maxSessions?: number;
  /**
   * C_Initialize library parameters (CK_C_INITIALIZE_ARGS.pReserved), for modules
   * that take their configuration there, e.g. NSS softoken:
   * `configdir='sql:/path' certPrefix='' keyPrefix='' secmod='secmod.db' flags=`.
   * One value per module and process: the first initialisation wins.
   */
  libraryParameters?: string;
  /** How this module's quirks are handled, as the capability check detected them (capabilities.ts). */
  quirks?: ModuleQuirks;
}

/**
 * Module differences the vault handles at this one seam, chosen by what the
 * capability check (capabilities.ts) measured on the module, never by its name.
 */
export interface ModuleQuirks {
  /**
   * How an HMAC verifier is compared. 'verify': C_Verify inside the token, whose
   * mismatch answer is CKR_SIGNATURE_INVALID. 'sign-compare': C_Sign and a
   * constant-time compare here, for modules whose C_Verify mismatch answer cannot be
   * told from a failure (NSS softoken answers CKR_DEVICE_ERROR).
   */
  verify: 'verify' | 'sign-compare';
  /**
   * Where the state anchor lives. 'data': two private token CKO_DATA objects.
   * 'key': the labels of two dedicated usage-less secret key objects, told apart by
   * CKA_ID, for modules that refuse token data objects (NSS softoken).
   */
  anchor: 'data' | 'key';
  /**
   * Key templates. 'full' states every usage flag, true or false. 'minimal' leaves
   * out the false ones for modules that reject explicit falses (tpm2-pkcs11 on EC
   * keys); the policy check still reads every flag back afterwards.
   */
  template: 'full' | 'minimal';
  /**
   * The phase a new vault's keys are made in (hsm-policy/policy.ts). 'open' (for
   * cloning) needs token keys with CKA_ALLOWED_MECHANISMS, CKA_WRAP_WITH_TRUSTED and
   * CKA_LOCAL as the policy reads them; on a module that refuses or drops those
   * (NSS softoken: CKR_GENERAL_ERROR for CKA_ALLOWED_MECHANISMS on token keys) the
   * keys are made 'not-cloneable', the original never-extractable set.
   */
  keyPhase: 'open' | 'not-cloneable';
}

export const DEFAULT_QUIRKS: ModuleQuirks = { verify: 'verify', anchor: 'data', template: 'full', keyPhase: 'open' };

// One loaded, initialised library per module path per process: a second
// C_Initialize on the same library fails, and finalising while another Token
// still uses it would pull sessions out from under it.
interface Library {
  p11: pkcs11js.PKCS11;
  refs: number;
  /** What C_Initialize got; a recycle initialises with the same. */
  parameters?: string;
}
const libraries = new Map<string, Library>();

// Login is per token and process: once one Token is logged in, C_Login for
// another answers CKR_USER_ALREADY_LOGGED_IN without looking at the PIN. We
// remember a hash of the PIN that did log in, so a wrong PIN still fails.
const loggedIn = new Map<string, string>();
const pinDigest = (pin: string): string => createHash('sha256').update(pin).digest('hex');

function initArgs(parameters: string | undefined): pkcs11js.InitializationOptions {
  // Without OS locking, concurrent sessions crash SoftHSM.
  return parameters ? { flags: P.CKF_OS_LOCKING_OK, libraryParameters: parameters } : { flags: P.CKF_OS_LOCKING_OK };
}

function initialize(p11: pkcs11js.PKCS11, parameters: string | undefined): void {
  try {
    p11.C_Initialize(initArgs(parameters));
  } catch (e) {
    if (ckrOf(e) === CKR.CRYPTOKI_ALREADY_INITIALIZED) return;
    throw toVaultError(e, 'C_Initialize', {
      hint: parameters
        ? 'the module refused hsm.libraryParameters; check their syntax against the module\'s documentation'
        : 'this module may need C_Initialize parameters: set hsm.libraryParameters (NSS softoken: configdir=\'sql:/path/to/db\' certPrefix=\'\' keyPrefix=\'\' secmod=\'secmod.db\' flags=)',
    });
  }
}

function acquireLibrary(modulePath: string, parameters?: string): pkcs11js.PKCS11 {
  const known = libraries.get(modulePath);
  if (known) {
    known.refs++;
    return known.p11;
  }
  const p11 = new P.PKCS11();
  try {
    p11.load(modulePath);
  } catch (e) {
    throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, `cannot load PKCS#11 module ${modulePath}: ${(e as Error).message}`);
  }
  try {
    initialize(p11, parameters);
  } catch (e) {
    try {
      p11.close();
    } catch {
      /* never loaded far enough */
    }
    throw e;
  }
  libraries.set(modulePath, { p11, refs: 1, ...(parameters ? { parameters } : {}) });
  return p11;
}

/**
 * Hold the module loaded and initialised in this JS realm until the returned
 * function is called. Worker threads are separate realms with their own
 * `libraries` map, but C_Initialize/C_Finalize are process-wide: a realm whose
 * refcount drops to 0 finalises the library for every thread. The HSM worker
 * pool pins the library in the main realm (and in each worker) so that only its
 * coordinated recycle ever finalises it while workers run.
 */
export function pinLibrary(modulePath: string, libraryParameters?: string): () => void {
  acquireLibrary(modulePath, libraryParameters);
  let released = false;
  return () => {
    if (released) return;
    released = true;
    releaseLibrary(modulePath);
  };
}

function releaseLibrary(modulePath: string): void {
  const lib = libraries.get(modulePath);
  if (!lib) return;
  if (--lib.refs > 0) return;
  libraries.delete(modulePath);
  for (const k of loggedIn.keys()) if (k.startsWith(`${modulePath}\0`)) loggedIn.delete(k);
  try {
    lib.p11.C_Finalize();
  } catch {
    /* already gone */
  }
  try {
    lib.p11.close();
  } catch {
    /* already gone */
  }
}

export type KeyClass = 'private' | 'public' | 'secret' | 'data';
const CLASS: Record<KeyClass, number> = {
  private: P.CKO_PRIVATE_KEY,
  public: P.CKO_PUBLIC_KEY,
  secret: P.CKO_SECRET_KEY,
  data: P.CKO_DATA,
};

/** The attributes the vault's policy reasons about, decoded. */
export interface KeyAttributes {
  label: string;
  keyType: 'ec' | 'aes' | 'generic' | 'other';
  token: boolean;
  private: boolean;
  sensitive: boolean;
  extractable: boolean;
  alwaysSensitive: boolean;
  neverExtractable: boolean;
  modifiable: boolean;
  derive: boolean;
  sign: boolean;
  verify: boolean;
  encrypt: boolean;
  decrypt: boolean;
  wrap: boolean;
  unwrap: boolean;
  /** Byte length of a secret key, 0 when not applicable. */
  valueLen: number;
  /** DER OID of an EC key's curve, empty when not applicable. */
  ecParams: Buffer;
  /** CKA_WRAP_WITH_TRUSTED: may leave the token only wrapped under a CKA_TRUSTED key. */
  wrapWithTrusted: boolean;
  /** CKA_LOCAL: generated on this token (false for a key unwrapped, created or cloned into it). */
  local: boolean;
  /** CKA_TRUSTED: the Security Officer marked this (wrapping) key trusted. */
  trusted: boolean;
  /** CKA_ALLOWED_MECHANISMS by name (CKM_…, or hex for a mechanism we do not name); empty: unrestricted. */
  allowedMechanisms: string[];
}

/**
 * How a new key may leave the token (see hsm-policy/policy.ts, "phases"). Without
 * one, the generators make the original never-extractable key.
 */
export interface KeyProtection {
  extractable: boolean;
  wrapWithTrusted: boolean;
  /** Must be true for CKA_EXTRACTABLE to be lowered later (the ceremony's seal). */
  modifiable: boolean;
  /** CKA_ALLOWED_MECHANISMS by CKM_ name: read-only once set, so widening a usage flag gains nothing. */
  allowedMechanisms: string[];
}

/** Mechanisms the vault and its ceremony name in attributes, by their PKCS#11 names. */
const MECHANISMS: Record<string, number> = {
  CKM_ECDH1_DERIVE: P.CKM_ECDH1_DERIVE,
  CKM_ECDSA: P.CKM_ECDSA,
  CKM_SHA256_HMAC: P.CKM_SHA256_HMAC,
  CKM_AES_GCM: P.CKM_AES_GCM,
  CKM_RSA_PKCS_OAEP: P.CKM_RSA_PKCS_OAEP,
  CKM_AES_KEY_WRAP_PAD: P.CKM_AES_KEY_WRAP_PAD,
};

function mechanismList(names: string[]): Buffer {
  // CK_MECHANISM_TYPE is a CK_ULONG: 8 bytes on the 64-bit platforms we run on.
  const b = Buffer.alloc(8 * names.length);
  names.forEach((n, i) => {
    const m = MECHANISMS[n];
    if (m === undefined) throw new VaultError(ErrorCodes.HSM_ERROR, `unknown mechanism ${n}`);
    b.writeBigUInt64LE(BigInt(m), 8 * i);
  });
  return b;
}

/** CKA_ALLOWED_MECHANISMS as names (the probe script decodes it the same way). */
export function mechanismNames(v: Buffer | undefined): string[] {
  if (!v || v.length % 8 !== 0) return [];
  const out: string[] = [];
  for (let i = 0; i < v.length; i += 8) {
    const m = Number(v.readBigUInt64LE(i));
    out.push(Object.entries(MECHANISMS).find(([, n]) => n === m)?.[0] ?? `0x${m.toString(16)}`);
  }
  return out;
}

function protectionTemplate(p: KeyProtection): pkcs11js.Attribute[] {
  return [
    { type: P.CKA_EXTRACTABLE, value: p.extractable },
    { type: P.CKA_WRAP_WITH_TRUSTED, value: p.wrapWithTrusted },
    { type: P.CKA_MODIFIABLE, value: p.modifiable },
    ...(p.allowedMechanisms.length ? [{ type: P.CKA_ALLOWED_MECHANISMS, value: mechanismList(p.allowedMechanisms) }] : []),
  ];
}

/** What a key to be unwrapped (cloned) into the token becomes. */
export interface UnwrapTemplate {
  label: string;
  kind: 'ec' | 'aes' | 'generic';
  usages: Usage[];
  protection: KeyProtection;
}

export type Usage = 'derive' | 'sign' | 'verify' | 'encrypt' | 'decrypt';
const USAGE_ATTR: Record<Usage, number> = {
  derive: P.CKA_DERIVE,
  sign: P.CKA_SIGN,
  verify: P.CKA_VERIFY,
  encrypt: P.CKA_ENCRYPT,
  decrypt: P.CKA_DECRYPT,
};

/** DER-encoded OID of secp256r1 (prime256v1). */
export const P256_OID = Buffer.from('06082a8648ce3d030107', 'hex');

export class Token {
  readonly label: string;
  private readonly p11: pkcs11js.PKCS11;
  private slot: Handle;
  private slotStale = false;
  private readonly pin: string;
  private readonly maxSessions: number;
  private readonly modulePath: string;
  /** The module differences this token is driven with (capabilities.ts detects them). */
  quirks: ModuleQuirks;
  /** Labels of the objects this token found or made, by handle: errors name the key, not a number. */
  private readonly names = new Map<string, string>();
  private idle: Handle[] = [];
  /**
   * Set when a call failed on a stale object handle (CKR_OBJECT/KEY_HANDLE_INVALID):
   * handles found before are no longer valid. TokenPort (token-port.ts) re-resolves and clears it.
   */
  handlesLost = false;
  private open = 0;
  private closed = false;

  private constructor(cfg: TokenConfig, p11: pkcs11js.PKCS11, slot: Handle) {
    this.label = cfg.tokenLabel;
    this.p11 = p11;
    this.slot = slot;
    this.pin = cfg.pin;
    this.maxSessions = cfg.maxSessions ?? 4;
    this.modulePath = cfg.modulePath;
    this.quirks = cfg.quirks ?? DEFAULT_QUIRKS;
  }

  /** Load the module, find the token by label and log in. Fails fast on a wrong PIN. */
  static open(cfg: TokenConfig): Token {
    const p11 = acquireLibrary(cfg.modulePath, cfg.libraryParameters);
    try {
      const slot = findSlot(p11, cfg.tokenLabel);
      const token = new Token(cfg, p11, slot);
      token.release(token.newSession());
      return token;
    } catch (e) {
      releaseLibrary(cfg.modulePath);
      throw e;
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const s of this.idle) {
      try {
        this.p11.C_CloseSession(s);
      } catch {
        /* session already gone */
      }
    }
    this.idle = [];
    releaseLibrary(this.modulePath);
  }

  /**
   * Close this token's idle sessions without touching the library. The HSM
   * worker pool calls it on every worker before one of them recycles the
   * library, so that no thread holds a session handle that the re-initialised
   * library could hand out again to another thread.
   */
  dropSessions(): void {
    this.dropIdle();
    // A recycle follows, and slot numbers can change across C_Initialize: the next session
    // must not open on whatever token now has our old slot number.
    this.slotStale = true;
  }

  /**
   * C_Finalize + C_Initialize the (process-wide) library, then log in again on a
   * fresh session. SoftHSM frees destroyed session objects (each ECDH derive
   * leaves one, ~250 B) only at C_Finalize, so a long-running vault recycles it.
   * Every session and object handle of every thread is invalid afterwards: the
   * caller must have quiesced all other users and must re-resolve the key
   * handles (enforcePolicy with create: false).
   */
  reinitialize(): void {
    if (this.closed) throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'HSM token is closed');
    this.dropIdle();
    for (const k of loggedIn.keys()) if (k.startsWith(`${this.modulePath}\0`)) loggedIn.delete(k);
    try {
      this.p11.C_Finalize();
    } catch (e) {
      if (ckrOf(e) !== CKR.CRYPTOKI_NOT_INITIALIZED) throw toVaultError(e, 'C_Finalize');
    }
    initialize(this.p11, libraries.get(this.modulePath)?.parameters);
    // Slot numbers can change across C_Initialize (SoftHSM numbers the tokens it finds anew):
    // the next session finds ours by label again, as other threads' tokens do after dropSessions().
    this.slotStale = true;
    this.open = 0;
    this.release(this.newSession());
  }

  /** True when a session can be opened and used right now (readiness probe). */
  ping(): boolean {
    try {
      this.run('ping', (s) => this.p11.C_GetSessionInfo(s));
      return true;
    } catch {
      return false;
    }
  }

  // ---- sessions -------------------------------------------------------------

  private newSession(): Handle {
    if (this.slotStale) {
      this.slot = findSlot(this.p11, this.label);
      this.slotStale = false;
    }
    const s = this.p11.C_OpenSession(this.slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION) as Handle;
    this.open++;
    const key = `${this.modulePath}\0${this.label}`;
    try {
      this.p11.C_Login(s, P.CKU_USER, this.pin);
      loggedIn.set(key, pinDigest(this.pin));
    } catch (e) {
      // Login is per token: another session of ours may already hold it. That
      // answer says nothing about our PIN, so compare with the PIN that did log in.
      const known = loggedIn.get(key);
      if (ckrOf(e) !== CKR.USER_ALREADY_LOGGED_IN || (known !== undefined && known !== pinDigest(this.pin))) {
        this.discard(s);
        throw toVaultError(ckrOf(e) === CKR.USER_ALREADY_LOGGED_IN ? Object.assign(new Error('CKR_PIN_INCORRECT:160'), { code: CKR.PIN_INCORRECT }) : e, 'C_Login');
      }
    }
    return s;
  }

  private acquire(): Handle {
    if (this.closed) throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'HSM token is closed');
    const s = this.idle.pop();
    if (s) return s;
    return this.newSession();
  }

  private release(s: Handle): void {
    if (this.closed || this.idle.length >= this.maxSessions) {
      this.discard(s);
      return;
    }
    this.idle.push(s);
  }

  private discard(s: Handle): void {
    this.open--;
    try {
      this.p11.C_CloseSession(s);
    } catch {
      /* already invalid */
    }
  }

  /**
   * Run one operation on a pooled session. A session that went bad (closed, login
   * lost, device error) is dropped together with its idle siblings and the call is
   * retried once on a fresh session; every vault operation is safe to repeat.
   * A wrong PIN is never retried: real HSMs lock the token after a few.
   */
  private run<T>(op: string, fn: (s: Handle) => T): T {
    for (let attempt = 0; ; attempt++) {
      let s: Handle;
      try {
        s = this.acquire();
      } catch (e) {
        throw toVaultError(e, op);
      }
      try {
        const out = fn(s);
        this.release(s);
        return out;
      } catch (e) {
        const ckr = ckrOf(e);
        // Stale key handles: the login ended under us. Only flagged here: the owner decides
        // how to recover (TokenPort resets the sessions and finds its keys again; the
        // worker pool has its own recycle, which must not have sessions closed under it).
        if (isHandleLost(ckr)) this.handlesLost = true;
        if (isSessionLost(ckr)) {
          this.discard(s);
          this.dropIdle();
          if (attempt === 0) continue;
        } else if (ckr === CKR.OPERATION_ACTIVE) {
          // An aborted multi-part call left state behind; never reuse that session.
          this.discard(s);
        } else {
          this.release(s);
        }
        throw e;
      }
    }
  }

  /** Close every idle session, so the next call opens a fresh one and logs in again. */
  resetSessions(): void {
    this.dropIdle();
  }

  private dropIdle(): void {
    const stale = this.idle;
    this.idle = [];
    for (const s of stale) this.discard(s);
  }

  // ---- objects --------------------------------------------------------------

  /** Token objects of a class with an exact label (labels are our names). */
  find(cls: KeyClass, label: string): Handle[] {
    return this.guard('C_FindObjects', () =>
      this.run('C_FindObjects', (s) => {
        this.p11.C_FindObjectsInit(s, [
          { type: P.CKA_CLASS, value: CLASS[cls] },
          { type: P.CKA_TOKEN, value: true },
          { type: P.CKA_LABEL, value: label },
        ]);
        try {
          return (this.p11.C_FindObjects(s, 16) as Handle[]).map((h) => this.named(h, label));
        } finally {
          this.p11.C_FindObjectsFinal(s);
        }
      }),
    );
  }

  /** Labels of all token objects of a class whose label starts with a prefix. */
  listLabels(cls: KeyClass, prefix: string): { label: string; handle: Handle }[] {
    return this.guard('C_FindObjects', () =>
      this.run('C_FindObjects', (s) => {
        this.p11.C_FindObjectsInit(s, [
          { type: P.CKA_CLASS, value: CLASS[cls] },
          { type: P.CKA_TOKEN, value: true },
        ]);
        const found: Handle[] = [];
        try {
          for (;;) {
            const batch = this.p11.C_FindObjects(s, 64) as Handle[];
            if (batch.length === 0) break;
            found.push(...batch);
          }
        } finally {
          this.p11.C_FindObjectsFinal(s);
        }
        const out: { label: string; handle: Handle }[] = [];
        for (const h of found) {
          const [attr] = this.p11.C_GetAttributeValue(s, h, [{ type: P.CKA_LABEL }]);
          const label = attr?.value?.toString('utf8') ?? '';
          if (label.startsWith(prefix)) out.push({ label, handle: this.named(h, label) });
        }
        return out;
      }),
    );
  }

  attributes(h: Handle): KeyAttributes {
    return this.guard('C_GetAttributeValue', () =>
      this.run('C_GetAttributeValue', (s) => {
        const read = (type: number): Buffer | undefined => {
          try {
            const [a] = this.p11.C_GetAttributeValue(s, h, [{ type }]);
            return a?.value;
          } catch (e) {
            const ckr = ckrOf(e);
            if (ckr === CKR.ATTRIBUTE_TYPE_INVALID || ckr === CKR.ATTRIBUTE_SENSITIVE) return undefined;
            throw e;
          }
        };
        const bool = (type: number): boolean => {
          const v = read(type);
          return v !== undefined && v.length > 0 && v[0] !== 0;
        };
        const ulong = (type: number): number => {
          const v = read(type);
          if (!v || v.length === 0) return 0;
          return v.length >= 8 ? Number(v.readBigUInt64LE(0)) : v.readUInt32LE(0);
        };
        const kt = ulong(P.CKA_KEY_TYPE);
        return {
          label: read(P.CKA_LABEL)?.toString('utf8') ?? '',
          keyType: kt === P.CKK_EC ? 'ec' : kt === P.CKK_AES ? 'aes' : kt === P.CKK_GENERIC_SECRET ? 'generic' : 'other',
          token: bool(P.CKA_TOKEN),
          private: bool(P.CKA_PRIVATE),
          sensitive: bool(P.CKA_SENSITIVE),
          extractable: bool(P.CKA_EXTRACTABLE),
          alwaysSensitive: bool(P.CKA_ALWAYS_SENSITIVE),
          neverExtractable: bool(P.CKA_NEVER_EXTRACTABLE),
          modifiable: bool(P.CKA_MODIFIABLE),
          derive: bool(P.CKA_DERIVE),
          sign: bool(P.CKA_SIGN),
          verify: bool(P.CKA_VERIFY),
          encrypt: bool(P.CKA_ENCRYPT),
          decrypt: bool(P.CKA_DECRYPT),
          wrap: bool(P.CKA_WRAP),
          unwrap: bool(P.CKA_UNWRAP),
          valueLen: ulong(P.CKA_VALUE_LEN),
          ecParams: read(P.CKA_EC_PARAMS) ?? Buffer.alloc(0),
          wrapWithTrusted: bool(P.CKA_WRAP_WITH_TRUSTED),
          local: bool(P.CKA_LOCAL),
          trusted: bool(P.CKA_TRUSTED),
          allowedMechanisms: mechanismNames(read(P.CKA_ALLOWED_MECHANISMS)),
        };
      }),
    );
  }

  /** Uncompressed SEC1 point (65 bytes) of an EC public key object. */
  ecPoint(pub: Handle): Buffer {
    return this.guard('C_GetAttributeValue', () =>
      this.run('C_GetAttributeValue', (s) => {
        const [a] = this.p11.C_GetAttributeValue(s, pub, [{ type: P.CKA_EC_POINT }]);
        return unwrapOctetString(a?.value ?? Buffer.alloc(0));
      }),
    );
  }

  /**
   * A fresh P-256 key pair held on the token, private half sensitive. Without
   * `protection` it is never extractable (the original key set); with one, as
   * the policy's phase says (hsm-policy/policy.ts).
   */
  generateEcKeyPair(label: string, usages: Usage[], protection?: KeyProtection, o: KeyMaking = {}): { priv: Handle; pub: Handle } {
    const template = o.template ?? this.quirks.template;
    const flags = trimmed(usageTemplate(usages, 'private'), template);
    const onToken = !o.session;
    return this.guard('C_GenerateKeyPair', () =>
      this.run('C_GenerateKeyPair', (s) => {
        const kp = this.p11.C_GenerateKeyPair(
          s,
          { mechanism: P.CKM_EC_KEY_PAIR_GEN },
          [
            { type: P.CKA_TOKEN, value: onToken },
            { type: P.CKA_PRIVATE, value: false },
            { type: P.CKA_LABEL, value: label },
            { type: P.CKA_EC_PARAMS, value: P256_OID },
            { type: P.CKA_VERIFY, value: usages.includes('sign') },
            { type: P.CKA_MODIFIABLE, value: false },
          ],
          [
            { type: P.CKA_TOKEN, value: onToken },
            { type: P.CKA_PRIVATE, value: true },
            { type: P.CKA_SENSITIVE, value: true },
            ...(protection ? protectionTemplate(protection) : [{ type: P.CKA_EXTRACTABLE, value: false }, { type: P.CKA_MODIFIABLE, value: false }]),
            { type: P.CKA_LABEL, value: label },
            ...flags,
          ],
        );
        return { priv: this.named(kp.privateKey as Handle, label), pub: this.named(kp.publicKey as Handle, label) };
      }),
      { label, mechanism: 'CKM_EC_KEY_PAIR_GEN' },
    );
  }

  /** A fresh secret key held on the token, sensitive; never extractable unless `protection` says otherwise. */
  generateSecretKey(label: string, kind: 'aes' | 'generic', bytes: number, usages: Usage[], protection?: KeyProtection, o: KeyMaking = {}): Handle {
    const mechanism = kind === 'aes' ? 'CKM_AES_KEY_GEN' : 'CKM_GENERIC_SECRET_KEY_GEN';
    return this.guard(
      'C_GenerateKey',
      () =>
        this.run('C_GenerateKey', (s) =>
          this.named(
            this.p11.C_GenerateKey(s, { mechanism: kind === 'aes' ? P.CKM_AES_KEY_GEN : P.CKM_GENERIC_SECRET_KEY_GEN }, [
              { type: P.CKA_CLASS, value: P.CKO_SECRET_KEY },
              { type: P.CKA_KEY_TYPE, value: kind === 'aes' ? P.CKK_AES : P.CKK_GENERIC_SECRET },
              { type: P.CKA_TOKEN, value: !o.session },
              { type: P.CKA_PRIVATE, value: true },
              { type: P.CKA_SENSITIVE, value: true },
              ...(protection ? protectionTemplate(protection) : [{ type: P.CKA_EXTRACTABLE, value: false }, { type: P.CKA_MODIFIABLE, value: false }]),
              { type: P.CKA_LABEL, value: label },
              { type: P.CKA_VALUE_LEN, value: bytes },
              ...trimmed(usageTemplate(usages, 'secret'), o.template ?? this.quirks.template),
            ]) as Handle,
            label,
          ),
        ),
      { label, mechanism },
    );
  }

  /**
   * One slot of the state anchor as a token secret key (ModuleQuirks.anchor 'key'),
   * for modules that refuse token data objects: a 128-bit AES key that can do
   * nothing (every usage false, never extractable), found by CKA_ID = `slot`, whose
   * CKA_LABEL carries the anchor. CKA_MODIFIABLE stays true so the label can move.
   */
  createAnchorKey(slot: string, label: string): Handle {
    return this.guard(
      'C_GenerateKey',
      () =>
        this.run('C_GenerateKey', (s) =>
          this.named(
            this.p11.C_GenerateKey(s, { mechanism: P.CKM_AES_KEY_GEN }, [
              { type: P.CKA_CLASS, value: P.CKO_SECRET_KEY },
              { type: P.CKA_KEY_TYPE, value: P.CKK_AES },
              { type: P.CKA_TOKEN, value: true },
              { type: P.CKA_PRIVATE, value: true },
              { type: P.CKA_SENSITIVE, value: true },
              { type: P.CKA_EXTRACTABLE, value: false },
              { type: P.CKA_MODIFIABLE, value: true },
              { type: P.CKA_ID, value: Buffer.from(slot) },
              { type: P.CKA_LABEL, value: label },
              { type: P.CKA_VALUE_LEN, value: 16 },
              ...trimmed(usageTemplate([], 'secret'), this.quirks.template),
            ]) as Handle,
            label,
          ),
        ),
      { label: slot, mechanism: 'CKM_AES_KEY_GEN' },
    );
  }

  /** Token secret keys whose CKA_ID is `id` (the anchor slots in 'key' mode). */
  findKeyById(id: string): Handle[] {
    return this.guard('C_FindObjects', () =>
      this.run('C_FindObjects', (s) => {
        this.p11.C_FindObjectsInit(s, [
          { type: P.CKA_CLASS, value: P.CKO_SECRET_KEY },
          { type: P.CKA_TOKEN, value: true },
          { type: P.CKA_ID, value: Buffer.from(id) },
        ]);
        try {
          return (this.p11.C_FindObjects(s, 16) as Handle[]).map((h) => this.named(h, id));
        } finally {
          this.p11.C_FindObjectsFinal(s);
        }
      }),
    );
  }

  destroy(h: Handle): void {
    this.guard('C_DestroyObject', () => this.run('C_DestroyObject', (s) => this.p11.C_DestroyObject(s, h)), this.ctx(h));
  }

  /**
   * A small private token data object, found by CKA_APPLICATION. Its value is
   * fixed once created; its label stays writable, which is what the state
   * anchor uses (PKCS#11 has no monotonic counter object).
   */
  createData(application: string, label: string, value: Buffer): Handle {
    return this.guard('C_CreateObject', () =>
      this.run('C_CreateObject', (s) =>
        this.p11.C_CreateObject(s, [
          { type: P.CKA_CLASS, value: P.CKO_DATA },
          { type: P.CKA_TOKEN, value: true },
          { type: P.CKA_PRIVATE, value: true },
          { type: P.CKA_MODIFIABLE, value: true },
          { type: P.CKA_APPLICATION, value: application },
          { type: P.CKA_LABEL, value: label },
          { type: P.CKA_VALUE, value },
        ]) as Handle,
      ),
      { label: application },
    );
  }

  findData(application: string): Handle[] {
    return this.guard('C_FindObjects', () =>
      this.run('C_FindObjects', (s) => {
        this.p11.C_FindObjectsInit(s, [
          { type: P.CKA_CLASS, value: P.CKO_DATA },
          { type: P.CKA_TOKEN, value: true },
          { type: P.CKA_APPLICATION, value: application },
        ]);
        try {
          return this.p11.C_FindObjects(s, 16) as Handle[];
        } finally {
          this.p11.C_FindObjectsFinal(s);
        }
      }),
    );
  }

  /** CKA_VALUE of a (non-sensitive) data object. */
  dataValue(h: Handle): Buffer {
    return this.guard('C_GetAttributeValue', () =>
      this.run('C_GetAttributeValue', (s) => {
        const [a] = this.p11.C_GetAttributeValue(s, h, [{ type: P.CKA_VALUE }]);
        return a?.value ?? Buffer.alloc(0);
      }),
    );
  }

  setLabel(h: Handle, label: string): void {
    this.guard(
      'C_SetAttributeValue',
      () => this.run('C_SetAttributeValue', (s) => this.p11.C_SetAttributeValue(s, h, [{ type: P.CKA_LABEL, value: label }])),
      this.ctx(h),
    );
  }

  readLabel(h: Handle): string {
    return this.guard('C_GetAttributeValue', () =>
      this.run('C_GetAttributeValue', (s) => {
        const [a] = this.p11.C_GetAttributeValue(s, h, [{ type: P.CKA_LABEL }]);
        return a?.value?.toString('utf8') ?? '';
      }),
    );
  }

  // ---- crypto ---------------------------------------------------------------

  random(n: number): Buffer {
    return this.guard('C_GenerateRandom', () =>
      this.run('C_GenerateRandom', (s) => this.p11.C_GenerateRandom(s, Buffer.alloc(n))),
    );
  }

  /**
   * Raw ECDH: x-coordinate of priv·point. The shared secret lands in a short-lived,
   * extractable session object that is read once and destroyed; the long-term key
   * itself never leaves the token. Callers must validate `point` first.
   */
  ecdhX(priv: Handle, point: Uint8Array): Buffer {
    return this.guard('C_DeriveKey', () =>
      this.run('C_DeriveKey', (s) => {
        const derived = this.p11.C_DeriveKey(
          s,
          {
            mechanism: P.CKM_ECDH1_DERIVE,
            parameter: {
              type: P.CK_PARAMS_EC_DH,
              kdf: P.CKD_NULL,
              publicData: Buffer.from(point),
            } as pkcs11js.ECDH1,
          },
          priv,
          [
            { type: P.CKA_CLASS, value: P.CKO_SECRET_KEY },
            { type: P.CKA_KEY_TYPE, value: P.CKK_GENERIC_SECRET },
            { type: P.CKA_TOKEN, value: false },
            { type: P.CKA_SENSITIVE, value: false },
            { type: P.CKA_EXTRACTABLE, value: true },
            { type: P.CKA_VALUE_LEN, value: 32 },
          ],
        );
        try {
          const [a] = this.p11.C_GetAttributeValue(s, derived, [{ type: P.CKA_VALUE }]);
          return Buffer.from(a?.value ?? Buffer.alloc(0));
        } finally {
          this.p11.C_DestroyObject(s, derived);
        }
      }),
      this.ctx(priv, 'CKM_ECDH1_DERIVE'),
    );
  }

  hmacSha256(key: Handle, data: Uint8Array): Buffer {
    return this.guard(
      'C_Sign',
      () =>
        this.run('C_Sign', (s) => {
          this.p11.C_SignInit(s, { mechanism: P.CKM_SHA256_HMAC }, key);
          return this.p11.C_Sign(s, Buffer.from(data), Buffer.alloc(32));
        }),
      this.ctx(key, 'CKM_SHA256_HMAC'),
    );
  }

  /**
   * Is `mac` the HMAC of `data`? A mismatch is `false`, never an error. With
   * ModuleQuirks.verify 'verify' the token compares (C_Verify; not constant time on
   * SoftHSM, which uses memcmp); with 'sign-compare' the token computes the HMAC and
   * this process compares in constant time, because that module's C_Verify answers a
   * mismatch with a code that also means a failure (NSS: CKR_DEVICE_ERROR): read as a
   * mismatch it would turn a broken HSM into counted guesses, read as a failure it
   * turns every wrong password into HSM_UNAVAILABLE.
   */
  hmacSha256Verify(key: Handle, data: Uint8Array, mac: Uint8Array): boolean {
    if (this.quirks.verify === 'sign-compare') {
      const want = this.hmacSha256(key, data);
      return mac.length === want.length && timingSafeEqual(want, mac);
    }
    return this.guard(
      'C_Verify',
      () =>
        this.run('C_Verify', (s) => {
          this.p11.C_VerifyInit(s, { mechanism: P.CKM_SHA256_HMAC }, key);
          try {
            return this.p11.C_Verify(s, Buffer.from(data), Buffer.from(mac));
          } catch (e) {
            const ckr = ckrOf(e);
            if (ckr === CKR.SIGNATURE_INVALID || ckr === CKR.SIGNATURE_LEN_RANGE) return false;
            throw e;
          }
        }),
      this.ctx(key, 'CKM_SHA256_HMAC'),
    );
  }

  /**
   * The raw answer of C_Verify to a wrong HMAC: the CKR code (0: it said "valid").
   * The capability check runs it on a throwaway session key to learn ModuleQuirks.verify.
   */
  verifyMismatchCode(key: Handle, data: Uint8Array, wrongMac: Uint8Array): number {
    // Not through run(): a DEVICE_ERROR here is the answer being measured, not a lost session.
    // A session of its own, closed afterwards with whatever state the failed verify left: not a
    // pooled one, whose closing would take the session objects made in it (the probe's keys) along.
    if (this.closed) throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'HSM token is closed');
    let s: Handle | undefined;
    try {
      s = this.newSession();
    } catch (e) {
      throw toVaultError(e, 'C_OpenSession');
    }
    try {
      this.p11.C_VerifyInit(s, { mechanism: P.CKM_SHA256_HMAC }, key);
      return this.p11.C_Verify(s, Buffer.from(data), Buffer.from(wrongMac)) ? 0 : CKR.SIGNATURE_INVALID;
    } catch (e) {
      return ckrOf(e) ?? -1;
    } finally {
      // Whatever state the failed verify left behind goes with the session.
      this.discard(s);
    }
  }

  aesGcmEncrypt(key: Handle, iv: Uint8Array, aad: Uint8Array, plaintext: Uint8Array): Buffer {
    return this.guard(
      'C_Encrypt',
      () =>
        this.run('C_Encrypt', (s) => {
          this.p11.C_EncryptInit(s, gcm(iv, aad), key);
          return this.p11.C_Encrypt(s, Buffer.from(plaintext), Buffer.alloc(plaintext.length + 16));
        }),
      this.ctx(key, 'CKM_AES_GCM'),
    );
  }

  /** ciphertext‖tag in, plaintext out; `null` when the tag does not verify. */
  aesGcmDecrypt(key: Handle, iv: Uint8Array, aad: Uint8Array, sealed: Uint8Array): Buffer | null {
    return this.guard('C_Decrypt', () =>
      this.run('C_Decrypt', (s) => {
        this.p11.C_DecryptInit(s, gcm(iv, aad), key);
        try {
          return this.p11.C_Decrypt(s, Buffer.from(sealed), Buffer.alloc(sealed.length));
        } catch (e) {
          // SoftHSM reports a bad tag as CKR_GENERAL_ERROR; others use ENCRYPTED_DATA_INVALID.
          const ckr = ckrOf(e);
          if (ckr === CKR.GENERAL_ERROR || ckr === CKR.ENCRYPTED_DATA_INVALID || ckr === CKR.ENCRYPTED_DATA_LEN_RANGE) {
            return null;
          }
          throw e;
        }
      }),
      this.ctx(key, 'CKM_AES_GCM'),
    );
  }

  /** ECDSA over a 32-byte digest; raw r‖s (64 bytes). */
  ecdsaSign(priv: Handle, digest: Uint8Array): Buffer {
    return this.guard(
      'C_Sign',
      () =>
        this.run('C_Sign', (s) => {
          this.p11.C_SignInit(s, { mechanism: P.CKM_ECDSA }, priv);
          return this.p11.C_Sign(s, Buffer.from(digest), Buffer.alloc(64));
        }),
      this.ctx(priv, 'CKM_ECDSA'),
    );
  }

  /**
   * Try to export `key` wrapped under `wrapping` (AES key wrap, or RSA-OAEP under a public key). Used by the
   * policy self-test to prove long-term keys cannot leave the token: it returns
   * the CKR code of the refusal, or 0 if the token let the key out.
   */
  tryWrap(wrapping: Handle, key: Handle, mechanism: WrapMechanism = 'aes-key-wrap-pad'): number {
    try {
      const out = this.run('C_WrapKey', (s) => this.p11.C_WrapKey(s, wrapMechanism(mechanism), wrapping, key, Buffer.alloc(4096)));
      // The wrapped bytes are never used: only whether the token let the key out matters.
      out.fill(0);
      return 0;
    } catch (e) {
      return ckrOf(e) ?? -1;
    }
  }

  /** A throwaway AES wrapping key as a session object (for tryWrap). */
  sessionWrappingKey(): Handle {
    return this.guard('C_GenerateKey', () =>
      this.run('C_GenerateKey', (s) =>
        this.p11.C_GenerateKey(s, { mechanism: P.CKM_AES_KEY_GEN }, [
          { type: P.CKA_TOKEN, value: false },
          { type: P.CKA_VALUE_LEN, value: 32 },
          { type: P.CKA_WRAP, value: true },
          { type: P.CKA_UNWRAP, value: true },
        ]) as Handle,
      ),
    );
  }

  // ---- key ceremony (vault/ceremony) ----------------------------------------

  /**
   * An RSA key pair whose private half can do exactly one thing: unwrap with
   * OAEP. A clone target makes it; the source wraps the vault keys under its
   * public half, so whatever leaves the source opens only inside this token.
   */
  generateRsaUnwrapKeyPair(label: string, bits: number): { priv: Handle; pub: Handle } {
    return this.guard('C_GenerateKeyPair', () =>
      this.run('C_GenerateKeyPair', (s) => {
        const kp = this.p11.C_GenerateKeyPair(
          s,
          { mechanism: P.CKM_RSA_PKCS_KEY_PAIR_GEN },
          [
            { type: P.CKA_TOKEN, value: true },
            { type: P.CKA_PRIVATE, value: false },
            { type: P.CKA_LABEL, value: label },
            { type: P.CKA_MODULUS_BITS, value: bits },
            { type: P.CKA_PUBLIC_EXPONENT, value: Buffer.from([1, 0, 1]) },
            { type: P.CKA_WRAP, value: false },
            { type: P.CKA_ENCRYPT, value: false },
            { type: P.CKA_VERIFY, value: false },
            { type: P.CKA_MODIFIABLE, value: false },
          ],
          [
            { type: P.CKA_TOKEN, value: true },
            { type: P.CKA_PRIVATE, value: true },
            { type: P.CKA_SENSITIVE, value: true },
            { type: P.CKA_EXTRACTABLE, value: false },
            { type: P.CKA_MODIFIABLE, value: false },
            { type: P.CKA_LABEL, value: label },
            { type: P.CKA_UNWRAP, value: true },
            { type: P.CKA_DECRYPT, value: false },
            { type: P.CKA_SIGN, value: false },
            { type: P.CKA_DERIVE, value: false },
            { type: P.CKA_ALLOWED_MECHANISMS, value: mechanismList(['CKM_RSA_PKCS_OAEP']) },
          ],
        );
        return { priv: kp.privateKey as Handle, pub: kp.publicKey as Handle };
      }),
    );
  }

  /** Modulus and public exponent of an RSA key object (either half carries them). */
  rsaPublic(h: Handle): { modulus: Buffer; exponent: Buffer } {
    return this.guard('C_GetAttributeValue', () =>
      this.run('C_GetAttributeValue', (s) => {
        const [m, e] = this.p11.C_GetAttributeValue(s, h, [{ type: P.CKA_MODULUS }, { type: P.CKA_PUBLIC_EXPONENT }]);
        return { modulus: Buffer.from(m?.value ?? Buffer.alloc(0)), exponent: Buffer.from(e?.value ?? Buffer.alloc(0)) };
      }),
    );
  }

  /** `key` (a secret key) wrapped under an RSA public key with OAEP. */
  wrapOaep(wrapping: Handle, key: Handle): Buffer {
    return this.guard('C_WrapKey', () => this.run('C_WrapKey', (s) => Buffer.from(this.p11.C_WrapKey(s, OAEP, wrapping, key, Buffer.alloc(2048)))));
  }

  /** `key` (an EC private key: OAEP cannot carry it) wrapped under an AES key with CKM_AES_KEY_WRAP_PAD. */
  wrapAesPad(wrapping: Handle, key: Handle): Buffer {
    return this.guard('C_WrapKey', () =>
      this.run('C_WrapKey', (s) => Buffer.from(this.p11.C_WrapKey(s, { mechanism: P.CKM_AES_KEY_WRAP_PAD }, wrapping, key, Buffer.alloc(4096)))),
    );
  }

  /** An OAEP-wrapped secret key, unwrapped into a token key as `t` says. */
  unwrapOaep(unwrapping: Handle, wrapped: Uint8Array, t: UnwrapTemplate): Handle {
    return this.guard('C_UnwrapKey', () =>
      this.run('C_UnwrapKey', (s) => this.p11.C_UnwrapKey(s, OAEP, unwrapping, Buffer.from(wrapped), unwrapTemplate(t)) as Handle),
    );
  }

  /** An OAEP-wrapped AES transport key, unwrapped into a session object that can only unwrap. */
  unwrapTransportKey(unwrapping: Handle, wrapped: Uint8Array): Handle {
    return this.guard('C_UnwrapKey', () =>
      this.run('C_UnwrapKey', (s) =>
        this.p11.C_UnwrapKey(s, OAEP, unwrapping, Buffer.from(wrapped), [
          { type: P.CKA_CLASS, value: P.CKO_SECRET_KEY },
          { type: P.CKA_KEY_TYPE, value: P.CKK_AES },
          { type: P.CKA_TOKEN, value: false },
          { type: P.CKA_PRIVATE, value: true },
          { type: P.CKA_SENSITIVE, value: true },
          { type: P.CKA_EXTRACTABLE, value: false },
          { type: P.CKA_UNWRAP, value: true },
          { type: P.CKA_WRAP, value: false },
          { type: P.CKA_ENCRYPT, value: false },
          { type: P.CKA_DECRYPT, value: false },
        ]) as Handle,
      ),
    );
  }

  /** An AES_KEY_WRAP_PAD-wrapped EC private key, unwrapped into a token key as `t` says. */
  unwrapAesPad(unwrapping: Handle, wrapped: Uint8Array, t: UnwrapTemplate): Handle {
    return this.guard('C_UnwrapKey', () =>
      this.run('C_UnwrapKey', (s) =>
        this.p11.C_UnwrapKey(s, { mechanism: P.CKM_AES_KEY_WRAP_PAD }, unwrapping, Buffer.from(wrapped), unwrapTemplate(t)) as Handle,
      ),
    );
  }

  /** A token P-256 public key object for a point made elsewhere (a clone's public half), as generateEcKeyPair makes it. */
  createEcPublicKey(label: string, point: Uint8Array, usages: Usage[]): Handle {
    return this.guard('C_CreateObject', () =>
      this.run('C_CreateObject', (s) =>
        this.p11.C_CreateObject(s, [
          { type: P.CKA_CLASS, value: P.CKO_PUBLIC_KEY },
          { type: P.CKA_KEY_TYPE, value: P.CKK_EC },
          { type: P.CKA_TOKEN, value: true },
          { type: P.CKA_PRIVATE, value: false },
          { type: P.CKA_LABEL, value: label },
          { type: P.CKA_EC_PARAMS, value: P256_OID },
          // DER OCTET STRING around the SEC1 point, as SoftHSM stores it for generated keys.
          { type: P.CKA_EC_POINT, value: Buffer.concat([Buffer.from([0x04, point.length]), Buffer.from(point)]) },
          { type: P.CKA_VERIFY, value: usages.includes('sign') },
          { type: P.CKA_MODIFIABLE, value: false },
        ]) as Handle,
      ),
    );
  }

  /** CKA_EXTRACTABLE true → false, the only direction PKCS#11 allows: afterwards the key cannot leave the token at all. */
  makeUnextractable(h: Handle): void {
    this.guard('C_SetAttributeValue', () =>
      this.run('C_SetAttributeValue', (s) => this.p11.C_SetAttributeValue(s, h, [{ type: P.CKA_EXTRACTABLE, value: false }])),
    );
  }

  /** Every token object, by class and label: what a refused ceremony step must leave exactly as it was. */
  objects(): { cls: KeyClass | 'other'; label: string; handle: Handle }[] {
    return this.guard('C_FindObjects', () =>
      this.run('C_FindObjects', (s) => {
        this.p11.C_FindObjectsInit(s, [{ type: P.CKA_TOKEN, value: true }]);
        const found: Handle[] = [];
        try {
          for (;;) {
            const batch = this.p11.C_FindObjects(s, 64) as Handle[];
            if (batch.length === 0) break;
            found.push(...batch);
          }
        } finally {
          this.p11.C_FindObjectsFinal(s);
        }
        return found.map((h) => {
          const [c, l] = this.p11.C_GetAttributeValue(s, h, [{ type: P.CKA_CLASS }, { type: P.CKA_LABEL }]);
          const n = c?.value && c.value.length >= 4 ? (c.value.length >= 8 ? Number(c.value.readBigUInt64LE(0)) : c.value.readUInt32LE(0)) : -1;
          const cls = (Object.entries(CLASS).find(([, v]) => v === n)?.[0] ?? 'other') as KeyClass | 'other';
          return { cls, label: l?.value?.toString('utf8') ?? '', handle: h };
        });
      }),
    );
  }

  /** Token objects the Security Officer marked CKA_TRUSTED: every exit a CKA_WRAP_WITH_TRUSTED key has. */
  trustedKeys(): { label: string; handle: Handle }[] {
    return this.guard('C_FindObjects', () =>
      this.run('C_FindObjects', (s) => {
        this.p11.C_FindObjectsInit(s, [
          { type: P.CKA_TOKEN, value: true },
          { type: P.CKA_TRUSTED, value: true },
        ]);
        let found: Handle[];
        try {
          found = this.p11.C_FindObjects(s, 64) as Handle[];
        } finally {
          this.p11.C_FindObjectsFinal(s);
        }
        return found.map((h) => ({ label: this.p11.C_GetAttributeValue(s, h, [{ type: P.CKA_LABEL }])[0]?.value?.toString('utf8') ?? '', handle: h }));
      }),
    );
  }

  /** Supported mechanisms, for the start-up capability check. */
  mechanisms(): Set<number> {
    return this.guard('C_GetMechanismList', () => new Set(this.p11.C_GetMechanismList(this.slot)));
  }

  /** C_GetMechanismInfo for a mechanism by CKM_ name; undefined when the token does not list it. */
  mechanismInfo(name: string): { minKeySize: number; maxKeySize: number; flags: number } | undefined {
    const m = (P as unknown as Record<string, number>)[name];
    if (typeof m !== 'number') throw new VaultError(ErrorCodes.INTERNAL, `unknown mechanism ${name}`);
    if (!this.mechanisms().has(m)) return undefined;
    return this.guard('C_GetMechanismInfo', () => {
      const i = this.p11.C_GetMechanismInfo(this.slot, m);
      return { minKeySize: i.minKeySize, maxKeySize: i.maxKeySize, flags: i.flags };
    }, { mechanism: name });
  }

  /** Who made the module and the token (C_GetInfo, C_GetTokenInfo), for the capability report. */
  describe(): { library: string; libraryVersion: string; manufacturer: string; cryptoki: string; token: { manufacturer: string; model: string; serial: string; firmware: string } } {
    return this.guard('C_GetInfo', () => {
      const i = this.p11.C_GetInfo();
      const t = this.p11.C_GetTokenInfo(this.slot);
      const v = (x: { major: number; minor: number }) => `${x.major}.${x.minor}`;
      return {
        library: i.libraryDescription.trim(),
        libraryVersion: v(i.libraryVersion),
        manufacturer: i.manufacturerID.trim(),
        cryptoki: v(i.cryptokiVersion),
        token: { manufacturer: t.manufacturerID.trim(), model: t.model.trim(), serial: t.serialNumber.trim(), firmware: v(t.firmwareVersion) },
      };
    });
  }

  /**
   * A throwaway token data object shaped like an anchor slot, destroyed at once:
   * 0 when the module accepts one, else its refusal code (capabilities.ts).
   */
  tryDataObject(application: string): number {
    try {
      const h = this.run('C_CreateObject', (s) =>
        this.p11.C_CreateObject(s, [
          { type: P.CKA_CLASS, value: P.CKO_DATA },
          { type: P.CKA_TOKEN, value: true },
          { type: P.CKA_PRIVATE, value: true },
          { type: P.CKA_MODIFIABLE, value: true },
          { type: P.CKA_APPLICATION, value: application },
          { type: P.CKA_LABEL, value: 'bkv.probe' },
          { type: P.CKA_VALUE, value: Buffer.from('probe') },
        ]),
      ) as Handle;
      this.destroy(h);
      return 0;
    } catch (e) {
      return ckrOf(e) ?? -1;
    }
  }

  /** The CKR code of a call that should succeed, 0 when it did (capabilities.ts). */
  attempt(fn: () => unknown): number {
    try {
      fn();
      return 0;
    } catch (e) {
      if (e instanceof VaultError) return ckrOfMessage(e.message);
      return ckrOf(e) ?? -1;
    }
  }

  private guard<T>(op: string, fn: () => T, ctx?: HsmContext): T {
    try {
      return fn();
    } catch (e) {
      throw toVaultError(e, op, ctx);
    }
  }

  /** Remember which label a handle carries, for error messages. */
  private named<H extends Handle>(h: H, label: string): H {
    this.names.set(h.toString('hex'), label);
    return h;
  }

  /** The label this token saw on a handle, if any (error messages only). */
  private nameOf(h: Handle): string | undefined {
    return this.names.get(h.toString('hex'));
  }

  private ctx(h: Handle, mechanism?: string): HsmContext {
    const label = this.nameOf(h);
    return { ...(label ? { label } : {}), ...(mechanism ? { mechanism } : {}) };
  }
}

/**
 * A Security Officer session, for the one thing the key ceremony needs the SO
 * for: marking a wrapping key CKA_TRUSTED (only the SO may, and only when the
 * object is created). Login state is per process and token, so no user Token of
 * this process may be open on the token meanwhile; the session is logged out
 * and closed before `run` returns. A wrong SO PIN fails at once and is never
 * retried: HSMs lock the SO after a few.
 */
export class SecurityOfficer {
  private constructor(
    private readonly p11: pkcs11js.PKCS11,
    private readonly s: Handle,
  ) {}

  static run<T>(cfg: { modulePath: string; tokenLabel: string; libraryParameters?: string }, soPin: string, fn: (so: SecurityOfficer) => T): T {
    const p11 = acquireLibrary(cfg.modulePath, cfg.libraryParameters);
    let s: Handle | undefined;
    try {
      const slot = findSlot(p11, cfg.tokenLabel);
      s = p11.C_OpenSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION) as Handle;
      try {
        p11.C_Login(s, P.CKU_SO, soPin);
      } catch (e) {
        const ckr = ckrOf(e);
        if (ckr === CKR.PIN_INCORRECT || ckr === CKR.PIN_LOCKED) {
          throw new VaultError(ErrorCodes.HSM_PIN_INCORRECT, `HSM refused the Security Officer PIN (0x${ckr.toString(16)}); not retrying`);
        }
        if (ckr === CKR.USER_ANOTHER_ALREADY_LOGGED_IN) {
          throw new VaultError(ErrorCodes.HSM_ERROR, 'the Security Officer cannot log in while a user session of this process is logged in to the token');
        }
        throw e;
      }
      try {
        return fn(new SecurityOfficer(p11, s));
      } finally {
        try {
          p11.C_Logout(s);
        } catch {
          /* the session is closed below anyway */
        }
      }
    } catch (e) {
      throw toVaultError(e, 'Security Officer session');
    } finally {
      if (s) {
        try {
          p11.C_CloseSession(s);
        } catch {
          /* already gone */
        }
      }
      releaseLibrary(cfg.modulePath);
    }
  }

  /** An RSA public key (a clone target's) as a public token object marked trusted, able only to wrap with OAEP. */
  createTrustedRsaPublicKey(label: string, modulus: Uint8Array, exponent: Uint8Array): Handle {
    return this.p11.C_CreateObject(this.s, [
      { type: P.CKA_CLASS, value: P.CKO_PUBLIC_KEY },
      { type: P.CKA_KEY_TYPE, value: P.CKK_RSA },
      { type: P.CKA_TOKEN, value: true },
      { type: P.CKA_PRIVATE, value: false },
      { type: P.CKA_LABEL, value: label },
      { type: P.CKA_MODULUS, value: Buffer.from(modulus) },
      { type: P.CKA_PUBLIC_EXPONENT, value: Buffer.from(exponent) },
      { type: P.CKA_TRUSTED, value: true },
      { type: P.CKA_WRAP, value: true },
      { type: P.CKA_ENCRYPT, value: false },
      { type: P.CKA_VERIFY, value: false },
      { type: P.CKA_MODIFIABLE, value: false },
      { type: P.CKA_ALLOWED_MECHANISMS, value: mechanismList(['CKM_RSA_PKCS_OAEP']) },
    ]) as Handle;
  }

  /**
   * A trusted AES-256 key generated inside the token that can only wrap (AES key
   * wrap with padding): the EC private keys leave under it, because OAEP cannot
   * carry them. Itself extractable only under a trusted key, i.e. under the
   * target's public key.
   */
  generateTrustedTransportKey(label: string): Handle {
    return this.p11.C_GenerateKey(this.s, { mechanism: P.CKM_AES_KEY_GEN }, [
      { type: P.CKA_CLASS, value: P.CKO_SECRET_KEY },
      { type: P.CKA_KEY_TYPE, value: P.CKK_AES },
      { type: P.CKA_TOKEN, value: true },
      // The SO cannot create private objects (CKR_USER_NOT_LOGGED_IN).
      { type: P.CKA_PRIVATE, value: false },
      { type: P.CKA_LABEL, value: label },
      { type: P.CKA_VALUE_LEN, value: 32 },
      { type: P.CKA_TRUSTED, value: true },
      { type: P.CKA_WRAP, value: true },
      { type: P.CKA_UNWRAP, value: false },
      { type: P.CKA_ENCRYPT, value: false },
      { type: P.CKA_DECRYPT, value: false },
      { type: P.CKA_SIGN, value: false },
      { type: P.CKA_VERIFY, value: false },
      { type: P.CKA_DERIVE, value: false },
      { type: P.CKA_SENSITIVE, value: true },
      { type: P.CKA_EXTRACTABLE, value: true },
      { type: P.CKA_WRAP_WITH_TRUSTED, value: true },
      { type: P.CKA_MODIFIABLE, value: false },
      { type: P.CKA_ALLOWED_MECHANISMS, value: mechanismList(['CKM_AES_KEY_WRAP_PAD']) },
    ]) as Handle;
  }

  /** Public token objects with this label (the SO sees no private ones). */
  find(label: string): Handle[] {
    this.p11.C_FindObjectsInit(this.s, [
      { type: P.CKA_TOKEN, value: true },
      { type: P.CKA_LABEL, value: label },
    ]);
    try {
      return this.p11.C_FindObjects(this.s, 16) as Handle[];
    } finally {
      this.p11.C_FindObjectsFinal(this.s);
    }
  }

  destroy(h: Handle): void {
    this.p11.C_DestroyObject(this.s, h);
  }
}

export type WrapMechanism = 'aes-key-wrap-pad' | 'aes-key-wrap' | 'aes-cbc-pad' | 'rsa-oaep';

function wrapMechanism(m: WrapMechanism): pkcs11js.Mechanism {
  switch (m) {
    case 'rsa-oaep':
      return OAEP;
    case 'aes-key-wrap':
      return { mechanism: P.CKM_AES_KEY_WRAP };
    case 'aes-cbc-pad':
      return { mechanism: P.CKM_AES_CBC_PAD, parameter: Buffer.alloc(16) };
    default:
      return { mechanism: P.CKM_AES_KEY_WRAP_PAD };
  }
}

/** The CKR code a VaultError's text names ("… (0x70) …"), -1 if none. */
function ckrOfMessage(m: string): number {
  const x = /\(0x([0-9a-f]+)\)/.exec(m);
  return x ? parseInt(x[1]!, 16) : -1;
}

/**
 * RSA-OAEP as SoftHSM 2.6.1 accepts it for wrapping: SHA-1 and MGF1-SHA-1
 * (SHA-256 parameters give CKR_ARGUMENTS_BAD). OAEP's security does not rest on
 * SHA-1's collision resistance.
 */
const OAEP: pkcs11js.Mechanism = {
  mechanism: P.CKM_RSA_PKCS_OAEP,
  parameter: { type: P.CK_PARAMS_RSA_OAEP, hashAlg: P.CKM_SHA_1, mgf: P.CKG_MGF1_SHA1, source: 1 } as pkcs11js.RsaOAEP,
};

function unwrapTemplate(t: UnwrapTemplate): pkcs11js.Attribute[] {
  const ec = t.kind === 'ec';
  return [
    { type: P.CKA_CLASS, value: ec ? P.CKO_PRIVATE_KEY : P.CKO_SECRET_KEY },
    { type: P.CKA_KEY_TYPE, value: ec ? P.CKK_EC : t.kind === 'aes' ? P.CKK_AES : P.CKK_GENERIC_SECRET },
    { type: P.CKA_TOKEN, value: true },
    { type: P.CKA_PRIVATE, value: true },
    { type: P.CKA_SENSITIVE, value: true },
    { type: P.CKA_LABEL, value: t.label },
    ...protectionTemplate(t.protection),
    ...usageTemplate(t.usages, ec ? 'private' : 'secret'),
  ];
}

/**
 * Initialise a token on the module's first free (uninitialised) slot and set
 * its user PIN. For development tokens (SoftHSM) and tests; a production HSM's
 * token is initialised in its own key ceremony. Going through the loaded
 * library, rather than softhsm2-util, lets a running process see the new token.
 */
export function initToken(modulePath: string, label: string, soPin: string, pin: string, libraryParameters?: string): void {
  const p11 = acquireLibrary(modulePath, libraryParameters);
  try {
    const free = p11.C_GetSlotList(true).find((slot) => (p11.C_GetTokenInfo(slot).flags & P.CKF_TOKEN_INITIALIZED) === 0);
    if (!free) throw new VaultError(ErrorCodes.HSM_TOKEN_NOT_FOUND, 'no free slot to initialise a token in');
    p11.C_InitToken(free, soPin, label.padEnd(32, ' '));
    const slot = findSlot(p11, label);
    const s = p11.C_OpenSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION);
    try {
      p11.C_Login(s, P.CKU_SO, soPin);
      p11.C_InitPIN(s, pin);
      p11.C_Logout(s);
    } finally {
      p11.C_CloseSession(s);
    }
  } catch (e) {
    throw toVaultError(e, 'C_InitToken');
  } finally {
    releaseLibrary(modulePath);
  }
}

function findSlot(p11: pkcs11js.PKCS11, label: string): Handle {
  let slots: Buffer[];
  try {
    slots = p11.C_GetSlotList(true);
  } catch (e) {
    throw toVaultError(e, 'C_GetSlotList');
  }
  for (const slot of slots) {
    const info = p11.C_GetTokenInfo(slot);
    if (info.label.trim() === label) return slot as Handle;
  }
  throw new VaultError(ErrorCodes.HSM_TOKEN_NOT_FOUND, `no initialised HSM token labelled "${label}"`);
}

// Every usage flag the object class knows is set explicitly, so no token default
// can grant a usage the policy did not ask for.
const PRIVATE_KEY_USAGES: Usage[] = ['derive', 'sign', 'decrypt'];
const SECRET_KEY_USAGES: Usage[] = ['derive', 'sign', 'verify', 'encrypt', 'decrypt'];

/** How a key is made, besides what it is: the capability check makes throwaway session keys. */
export interface KeyMaking {
  /** A session object (CKA_TOKEN=false), gone with the session. */
  session?: boolean;
  /** Overrides ModuleQuirks.template. */
  template?: ModuleQuirks['template'];
}

/** A 'minimal' template leaves out usage flags that are false (ModuleQuirks.template). */
function trimmed(attrs: pkcs11js.Attribute[], template: ModuleQuirks['template']): pkcs11js.Attribute[] {
  return template === 'minimal' ? attrs.filter((a) => a.value !== false) : attrs;
}

function usageTemplate(usages: Usage[], cls: 'private' | 'secret'): pkcs11js.Attribute[] {
  const known = cls === 'private' ? PRIVATE_KEY_USAGES : SECRET_KEY_USAGES;
  const attrs = known.map((u) => ({ type: USAGE_ATTR[u], value: usages.includes(u) }));
  attrs.push({ type: P.CKA_UNWRAP, value: false });
  if (cls === 'secret') attrs.push({ type: P.CKA_WRAP, value: false });
  return attrs;
}

function gcm(iv: Uint8Array, aad: Uint8Array): pkcs11js.Mechanism {
  return {
    mechanism: P.CKM_AES_GCM,
    parameter: {
      type: P.CK_PARAMS_AES_GCM_v240,
      iv: Buffer.from(iv),
      ivBits: iv.length * 8,
      aad: Buffer.from(aad),
      tagBits: 128,
    } as unknown as pkcs11js.IParams,
  };
}

/** CKA_EC_POINT is a DER OCTET STRING around the SEC1 point on SoftHSM (raw on some HSMs). */
function unwrapOctetString(v: Buffer): Buffer {
  if (v.length === 67 && v[0] === 0x04 && v[1] === 0x41) return v.subarray(2);
  return v;
}
