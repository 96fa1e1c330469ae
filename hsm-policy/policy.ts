// The vault's HSM key set as data. Every long-term secret of the vault is one
// of these token objects; nothing else on the token is ours. The enforcement
// code (enforce.ts) creates what is missing and refuses to start when an
// existing object disagrees with this table in any attribute.

export type KeyKind = 'ec-p256' | 'aes-256' | 'hmac-256';
export type KeyUsage = 'derive' | 'sign' | 'verify' | 'encrypt' | 'decrypt';

export interface KeySpec {
  /** Name the vault uses in code. */
  name: 'kx' | 'sig' | 'oprf' | 'verifier' | 'tenant' | 'seal';
  /** CKA_LABEL on the token; per-epoch keys append a zero-padded epoch number. */
  label: string;
  kind: KeyKind;
  /** The only usage flags that may be true; every other usage flag must be false. */
  usages: KeyUsage[];
  /** The PKCS#11 mechanism the vault uses with it (documentation and capability check). */
  mechanism: 'CKM_ECDH1_DERIVE' | 'CKM_ECDSA' | 'CKM_SHA256_HMAC' | 'CKM_AES_GCM';
  /** One key per seal epoch (rotated), instead of a single key. */
  perEpoch?: true;
  purpose: string;
}

/**
 * Attributes every private or secret key in the set carries in every phase.
 * How a key may leave the token is the phase's business (PHASE_RULES below).
 */
export const REQUIRED_ATTRIBUTES = {
  token: true,
  private: true,
  sensitive: true,
  wrap: false,
  unwrap: false,
} as const;

// ---- phases: how a key may leave the token ------------------------------------
//
// A vault whose keys live in one HSM loses every password-protected backup with
// it, and cannot become a cohort. So new keys are born "open for cloning": they
// may leave the token, but only wrapped under a key the token's Security Officer
// marked CKA_TRUSTED (CKA_WRAP_WITH_TRUSTED), i.e. only into an HSM the SO
// vouched for (the ceremony, vault/ceremony/). After the ceremony every copy is
// "sealed": CKA_EXTRACTABLE=false, which PKCS#11 never lets anyone raise again.
//
// Lowering CKA_EXTRACTABLE needs CKA_MODIFIABLE=true, which would also let the
// PIN holder widen a key's usage flags; so open and sealed keys carry
// CKA_ALLOWED_MECHANISMS = exactly their one mechanism, which is read-only once
// set: a widened flag buys no new operation (measured on SoftHSM 2.6.1).
//
// Keys made before the ceremony existed are never extractable: "not cloneable".
// Keys an HSM vendor cloned with its own mechanism (Luna cloning, nShield
// Security World, CloudHSM cluster sync) are no longer CKA_LOCAL, and PKCS#11
// says a key not generated on the token was not always sensitive and not never
// extractable. Attributes cannot tell such a clone from a key imported in the
// clear by a PIN holder; the ceremony log and its witnesses vouch for it.

export type Phase = 'not-cloneable' | 'open' | 'sealed' | 'vendor-clone';

export const PHASE_TEXT: Record<Phase, string> = {
  'not-cloneable': 'not cloneable (never extractable: the keys exist in this HSM only)',
  open: 'open for cloning (keys leave only wrapped under a key the Security Officer marked trusted)',
  sealed: 'sealed (not extractable: no key can leave this HSM)',
  'vendor-clone': "cloned by the HSM vendor's own mechanism (not extractable)",
};

/**
 * One combination of protection attributes a key may have. A field left out may
 * be either value. `allowedMechanisms: 'own'` means CKA_ALLOWED_MECHANISMS must
 * be exactly the key's mechanism (KeySpec.mechanism); 'any' does not look.
 */
export interface PhaseRule {
  phase: Phase;
  /** How a key comes to look like this. */
  origin: string;
  extractable: boolean;
  wrapWithTrusted?: boolean;
  alwaysSensitive?: boolean;
  neverExtractable?: boolean;
  local?: boolean;
  modifiable: boolean;
  allowedMechanisms: 'own' | 'any';
}

/** Every protection a vault key may have; a key that matches none is refused. First match names the phase. */
export const PHASE_RULES: readonly PhaseRule[] = [
  { phase: 'not-cloneable', origin: 'generated never extractable (vaults made before the key ceremony)', extractable: false, alwaysSensitive: true, neverExtractable: true, modifiable: false, allowedMechanisms: 'any' },
  { phase: 'open', origin: 'generated open for cloning', extractable: true, wrapWithTrusted: true, alwaysSensitive: true, neverExtractable: false, local: true, modifiable: true, allowedMechanisms: 'own' },
  { phase: 'open', origin: 'unwrapped by the key ceremony (a clone)', extractable: true, wrapWithTrusted: true, alwaysSensitive: false, neverExtractable: false, local: false, modifiable: true, allowedMechanisms: 'own' },
  { phase: 'sealed', origin: 'generated open, then sealed', extractable: false, wrapWithTrusted: true, alwaysSensitive: true, neverExtractable: false, local: true, modifiable: true, allowedMechanisms: 'own' },
  { phase: 'sealed', origin: 'generated sealed (a rotation after the seal)', extractable: false, wrapWithTrusted: true, alwaysSensitive: true, neverExtractable: true, local: true, modifiable: true, allowedMechanisms: 'own' },
  { phase: 'sealed', origin: 'unwrapped by the key ceremony, then sealed', extractable: false, wrapWithTrusted: true, alwaysSensitive: false, neverExtractable: false, local: false, modifiable: true, allowedMechanisms: 'own' },
  { phase: 'vendor-clone', origin: "cloned by the HSM vendor's mechanism from a never-extractable key", extractable: false, wrapWithTrusted: false, alwaysSensitive: false, neverExtractable: false, local: false, modifiable: false, allowedMechanisms: 'any' },
];

/** What a key is created (or unwrapped) with in each phase a vault can create keys in. */
export const CREATE_PROTECTION = {
  'not-cloneable': { extractable: false, wrapWithTrusted: false, modifiable: false, ownMechanism: false },
  open: { extractable: true, wrapWithTrusted: true, modifiable: true, ownMechanism: true },
  sealed: { extractable: false, wrapWithTrusted: true, modifiable: true, ownMechanism: true },
} as const;

/** The phase new keys are made in, next to keys of phase `p` (a rotation keeps the vault in its phase). */
export const CREATE_PHASE: Record<Phase, keyof typeof CREATE_PROTECTION> = {
  'not-cloneable': 'not-cloneable',
  'vendor-clone': 'not-cloneable',
  open: 'open',
  sealed: 'sealed',
};

export const KEY_SET: readonly KeySpec[] = [
  {
    name: 'kx',
    label: 'bkv.kx',
    kind: 'ec-p256',
    usages: ['derive'],
    mechanism: 'CKM_ECDH1_DERIVE',
    purpose: 'vault end of the client↔vault end-to-end channel (ECDH)',
  },
  {
    name: 'sig',
    label: 'bkv.sig',
    kind: 'ec-p256',
    usages: ['sign'],
    mechanism: 'CKM_ECDSA',
    purpose: 'signs the vault descriptor; its public key is what clients pin',
  },
  {
    name: 'oprf',
    label: 'bkv.oprf',
    kind: 'ec-p256',
    usages: ['derive'],
    mechanism: 'CKM_ECDH1_DERIVE',
    purpose:
      'OPRF key k: x(k·B) ties every password-derived value to the HSM, so no guess can be tested offline without it; ' +
      'guesses are counted where they can be tested (recover.begin, before the verifier check); ' +
      'enroll.begin on an unused user id evaluates uncounted but leaves nothing to test against',
  },
  {
    name: 'verifier',
    label: 'bkv.verifier',
    kind: 'hmac-256',
    usages: ['sign', 'verify'],
    mechanism: 'CKM_SHA256_HMAC',
    purpose: 'makes verifiers at enrolment (C_Sign) and compares them inside the HSM (C_Verify)',
  },
  {
    name: 'tenant',
    label: 'bkv.tenant',
    kind: 'hmac-256',
    usages: ['sign'],
    mechanism: 'CKM_SHA256_HMAC',
    purpose: 'derives each backend tenant\'s credential secret, so none is stored on the host',
  },
  {
    name: 'seal',
    label: 'bkv.seal.',
    kind: 'aes-256',
    usages: ['encrypt', 'decrypt'],
    mechanism: 'CKM_AES_GCM',
    perEpoch: true,
    purpose: 'seals each record at rest; destroying an epoch key crypto-shreds every older copy',
  },
];

export const sealLabel = (epoch: number): string => `bkv.seal.${String(epoch).padStart(6, '0')}`;

export function epochOfLabel(label: string): number | undefined {
  const m = /^bkv\.seal\.(\d{6})$/.exec(label);
  return m ? Number(m[1]) : undefined;
}

/**
 * The state anchor: two private token data objects (found by CKA_APPLICATION,
 * told apart by CKA_VALUE) whose CKA_LABEL holds "bkv.anchor <batch> <Merkle
 * root hex>". The vault rewrites a label before any answer that depends on a
 * state change leaves, alternating between the slots: SoftHSM rewrites an
 * object's file in place, and a process killed mid-write loses that object, so
 * the other slot must still hold the previous anchor.
 */
export const ANCHOR = {
  application: 'bkv.state-anchor',
  slots: ['bkv state anchor v1', 'bkv state anchor v1 b'],
  purpose: 'root of the authenticated record state; a restored database older than it is refused',
} as const;

/**
 * The key ceremony's own token objects (vault/ceremony/), all removed by its
 * seal step. `fp` is the target's key fingerprint (hex): one trust per target.
 */
export const CEREMONY = {
  /** On a clone target: RSA-3072 key pair, the private half unwrap-only (OAEP). */
  unwrap: 'bkv.ceremony.unwrap',
  /** On the source: the target's public key, made CKA_TRUSTED by the Security Officer. */
  trust: (fp: string) => `bkv.ceremony.trust.${fp.slice(0, 16)}`,
  /** On the source: a trusted AES key the EC keys leave under; made by the SO, consumed by one full export. */
  transport: (fp: string) => `bkv.ceremony.transport.${fp.slice(0, 16)}`,
  prefix: 'bkv.ceremony.',
  /** RSA modulus of the target's unwrap key. */
  rsaBits: 3072,
} as const;
