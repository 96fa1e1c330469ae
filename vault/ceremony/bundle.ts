// The two files the key ceremony carries between HSMs, so the HSMs never need
// to be on the same host. Pure: formats, parsing, fingerprints, the digest the
// source signs. No I/O, no HSM.
//
// Target file (written by `ceremony target-init` on the new HSM, public):
//   {"format":"bkv-ceremony-target","version":1,"fingerprint":HEX64,
//    "publicKey":PEM SPKI of the RSA-3072 unwrap key,"tokenLabel":…,"createdAt":ISO}
//   fingerprint = SHA-256 over the key's DER SubjectPublicKeyInfo; operators
//   compare it out of band between the two hosts before `trust`.
//
// Bundle (written by `ceremony export` on the source, useless without the target HSM):
//   {"format":"bkv-ceremony-bundle","version":1,
//    "kind":"full"|"epoch",          full: the whole key set; epoch: one seal epoch key
//    "vaultId":HEX32,                 the source's vault id (a hash of source.sig)
//    "target":HEX64,                  fingerprint of the target's unwrap key
//    "createdAt":ISO,
//    "source":{"sig":HEX130,"kx":HEX130|null,"oprf":HEX130|null},   public points (P-256, uncompressed)
//    "anchor":{"seq":N,"root":HEX64}|null,   the source's state anchor, only from an offline export
//    "transport":B64|null,            the AES transport key, RSA-OAEP-wrapped (full only)
//    "keys":[{"label":"bkv.kx","wrap":"aes-key-wrap-pad"|"rsa-oaep","blob":B64},…],
//    "kat":{"challenge":B64(32),"point":HEX130,"answers":{"bkv.oprf":B64,…}},
//    "signature":HEX128}
//   EC private keys are wrapped under the transport key (CKM_AES_KEY_WRAP_PAD),
//   secret keys and the transport key under the target's RSA key (CKM_RSA_PKCS_OAEP,
//   SHA-1/MGF1-SHA-1). signature = ECDSA P-256 (raw r‖s) by the source's bkv.sig
//   over SHA-256(frame("bkv-v1-ceremony-bundle", canonical JSON of every other
//   field, in the order above)). Known answers (kat.ts) prove the copy computes
//   what the source computes.
import { createPublicKey } from 'node:crypto';
import { p256 } from '@noble/curves/nist.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { z } from 'zod';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { frame, fromHex, toHex, utf8 } from '../../protocol/bytes.js';
import { vaultIdOf } from '../../protocol/descriptor.js';
import { KEY_SET, epochOfLabel, type KeySpec } from '../../hsm-policy/policy.js';

export const TARGET_FORMAT = 'bkv-ceremony-target';
export const BUNDLE_FORMAT = 'bkv-ceremony-bundle';
export const BUNDLE_DST = 'bkv-v1-ceremony-bundle';
/** Smallest RSA modulus a target may offer. */
export const MIN_RSA_BITS = 3072;

const hex = (n: number) => z.string().regex(new RegExp(`^[0-9a-f]{${n}}$`));
const b64 = z.string().regex(/^[A-Za-z0-9+/]*={0,2}$/).max(8192);

const TargetSchema = z
  .object({
    format: z.literal(TARGET_FORMAT),
    version: z.literal(1),
    fingerprint: hex(64),
    publicKey: z.string().min(1).max(4096),
    tokenLabel: z.string().max(64),
    createdAt: z.string().max(64),
  })
  .strict();

export type TargetFile = z.output<typeof TargetSchema>;

export interface Target extends TargetFile {
  modulus: Buffer;
  exponent: Buffer;
}

const KeyEntry = z.object({ label: z.string().max(64), wrap: z.enum(['aes-key-wrap-pad', 'rsa-oaep']), blob: b64 }).strict();

const BundleSchema = z
  .object({
    format: z.literal(BUNDLE_FORMAT),
    version: z.literal(1),
    kind: z.enum(['full', 'epoch']),
    vaultId: hex(32),
    target: hex(64),
    createdAt: z.string().max(64),
    source: z.object({ sig: hex(130), kx: hex(130).nullable(), oprf: hex(130).nullable() }).strict(),
    anchor: z.object({ seq: z.number().int().min(0), root: hex(64) }).strict().nullable(),
    transport: b64.nullable(),
    keys: z.array(KeyEntry).min(1).max(64),
    kat: z.object({ challenge: b64, point: hex(130), answers: z.record(z.string().max(64), b64) }).strict(),
    signature: hex(128),
  })
  .strict();

export type Bundle = z.output<typeof BundleSchema>;
export type BundleBody = Omit<Bundle, 'signature'>;
export type KeyEntry = z.output<typeof KeyEntry>;

const malformed = (what: string) => new VaultError(ErrorCodes.CEREMONY_BUNDLE_MALFORMED, what);

/** SHA-256 of an RSA public key's DER SubjectPublicKeyInfo, hex. */
export function rsaFingerprint(modulus: Uint8Array, exponent: Uint8Array): string {
  return toHex(sha256(rsaSpki(modulus, exponent)));
}

function rsaSpki(modulus: Uint8Array, exponent: Uint8Array): Buffer {
  const n = Buffer.from(modulus.subarray(modulus.findIndex((b) => b !== 0))).toString('base64url');
  const e = Buffer.from(exponent.subarray(exponent.findIndex((b) => b !== 0))).toString('base64url');
  return createPublicKey({ key: { kty: 'RSA', n, e }, format: 'jwk' }).export({ type: 'spki', format: 'der' });
}

/** "ab12 cd34 …": what operators read aloud and compare. */
export const groupFingerprint = (fp: string): string => fp.match(/.{1,4}/g)!.join(' ');

/** Accepts a fingerprint as printed (spaces, colons, upper case) or as stored. */
export const normalFingerprint = (fp: string): string => fp.replace(/[\s:]/g, '').toLowerCase();

export function makeTargetFile(modulus: Uint8Array, exponent: Uint8Array, tokenLabel: string, createdAt: string): TargetFile {
  const pem = createPublicKey({ key: rsaSpki(modulus, exponent), format: 'der', type: 'spki' }).export({ type: 'spki', format: 'pem' }) as string;
  return { format: TARGET_FORMAT, version: 1, fingerprint: rsaFingerprint(modulus, exponent), publicKey: pem, tokenLabel, createdAt };
}

/** A target file's text, checked: an RSA key of at least 3072 bits whose fingerprint is the one stated. */
export function parseTarget(text: string): Target {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw malformed('the target file is not JSON (expected the file "bkv-admin ceremony target-init" wrote)');
  }
  const r = TargetSchema.safeParse(json);
  if (!r.success) throw malformed(`not a ceremony target file: ${r.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ')}`);
  let jwk: { kty?: string; n?: string; e?: string };
  try {
    jwk = createPublicKey(r.data.publicKey).export({ format: 'jwk' }) as typeof jwk;
  } catch (e) {
    throw malformed(`the target file's public key does not parse: ${(e as Error).message}`);
  }
  if (jwk.kty !== 'RSA' || !jwk.n || !jwk.e) throw malformed('the target file must carry an RSA public key');
  const modulus = Buffer.from(jwk.n, 'base64url');
  const exponent = Buffer.from(jwk.e, 'base64url');
  if (modulus.length * 8 < MIN_RSA_BITS) throw malformed(`the target's RSA key has ${modulus.length * 8} bits; at least ${MIN_RSA_BITS} are required`);
  if (rsaFingerprint(modulus, exponent) !== r.data.fingerprint) {
    throw malformed("the target file's fingerprint is not the fingerprint of its public key: the file was altered");
  }
  return { ...r.data, modulus, exponent };
}

/** The policy entry a bundle key label names, and its epoch for seal keys. */
export function specOfLabel(label: string): { spec: KeySpec; epoch?: number } | undefined {
  const epoch = epochOfLabel(label);
  if (epoch !== undefined) return { spec: KEY_SET.find((k) => k.perEpoch)!, epoch };
  const spec = KEY_SET.find((k) => !k.perEpoch && k.label === label);
  return spec ? { spec } : undefined;
}

/** A bundle's text, checked for shape and completeness (not yet for its signature: verifyBundle). */
export function parseBundle(text: string): Bundle {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw malformed('the bundle is not JSON (expected the file "bkv-admin ceremony export" wrote)');
  }
  const r = BundleSchema.safeParse(json);
  if (!r.success) throw malformed(`not a ceremony bundle: ${r.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ')}`);
  const b = r.data;
  const labels = b.keys.map((k) => k.label);
  if (new Set(labels).size !== labels.length) throw malformed('the bundle lists a key twice');
  for (const k of b.keys) {
    const s = specOfLabel(k.label);
    if (!s) throw malformed(`the bundle carries "${k.label}", which is not a vault key`);
    const wantWrap = s.spec.kind === 'ec-p256' ? 'aes-key-wrap-pad' : 'rsa-oaep';
    if (k.wrap !== wantWrap) throw malformed(`${k.label} must be wrapped with ${wantWrap}`);
  }
  const seals = labels.filter((l) => epochOfLabel(l) !== undefined);
  if (b.kind === 'full') {
    const need = KEY_SET.filter((k) => !k.perEpoch).map((k) => k.label);
    const lacking = need.filter((l) => !labels.includes(l));
    if (lacking.length || seals.length === 0) throw malformed(`a full bundle must carry every vault key; missing ${[...lacking, ...(seals.length ? [] : ['a seal epoch'])].join(', ')}`);
    if (!b.transport || !b.source.kx || !b.source.oprf) throw malformed('a full bundle must carry the transport key and the kx and oprf public points');
  } else {
    if (labels.length !== 1 || seals.length !== 1) throw malformed('an epoch bundle carries exactly one seal epoch key');
    if (b.transport || b.anchor) throw malformed('an epoch bundle carries no transport key and no anchor');
  }
  for (const p of [b.source.sig, b.source.kx, b.source.oprf, b.kat.point]) {
    if (p === null) continue;
    try {
      p256.Point.fromBytes(fromHex(p)).assertValidity();
    } catch {
      throw malformed('the bundle carries a public point that is not on P-256');
    }
  }
  return b;
}

/** The signed part, in a fixed field order, whatever order the file had. */
export function bodyOf(b: BundleBody): BundleBody {
  return {
    format: b.format,
    version: b.version,
    kind: b.kind,
    vaultId: b.vaultId,
    target: b.target,
    createdAt: b.createdAt,
    source: { sig: b.source.sig, kx: b.source.kx, oprf: b.source.oprf },
    anchor: b.anchor ? { seq: b.anchor.seq, root: b.anchor.root } : null,
    transport: b.transport,
    keys: b.keys.map((k) => ({ label: k.label, wrap: k.wrap, blob: k.blob })),
    kat: {
      challenge: b.kat.challenge,
      point: b.kat.point,
      answers: Object.fromEntries(Object.entries(b.kat.answers).sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0))),
    },
  };
}

export const bundleDigest = (b: BundleBody): Uint8Array => sha256(frame(BUNDLE_DST, utf8(JSON.stringify(bodyOf(b)))));

/**
 * The bundle is what the source signed, and the source is the vault it claims
 * to be. Checked before anything touches the target: a failure changes nothing.
 */
export function verifyBundle(b: Bundle): void {
  const sig = fromHex(b.source.sig);
  const ok = p256.verify(fromHex(b.signature), bundleDigest(b), sig, { prehash: false, format: 'compact', lowS: false });
  if (!ok) {
    throw new VaultError(
      ErrorCodes.CEREMONY_BUNDLE_TAMPERED,
      "the bundle's signature does not verify against the source's signing key: it was altered after export (or damaged in transit); nothing was imported",
    );
  }
  if (toHex(vaultIdOf(sig)) !== b.vaultId) {
    throw new VaultError(ErrorCodes.CEREMONY_BUNDLE_TAMPERED, "the bundle's vault id is not the id of its signing key; nothing was imported");
  }
}

export function serializeBundle(body: BundleBody, signature: Uint8Array): string {
  return JSON.stringify({ ...bodyOf(body), signature: toHex(signature) }, null, 2) + '\n';
}
