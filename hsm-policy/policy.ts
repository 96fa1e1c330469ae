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

/** Attributes every private or secret key in the set must carry. */
export const REQUIRED_ATTRIBUTES = {
  token: true,
  private: true,
  sensitive: true,
  extractable: false,
  alwaysSensitive: true,
  neverExtractable: true,
  wrap: false,
  unwrap: false,
  // Frozen at creation, so nobody can widen usages or relabel a key later.
  modifiable: false,
} as const;

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
