// Known answers: proof that a cloned key computes what the source's key
// computes. The source answers a fresh challenge with every key it exports; the
// target, after unwrapping, must reproduce each answer with its copy:
//
//   ECDH keys (kx, oprf)   x(k·P) for a random point P                   equal
//   HMAC keys              HMAC(k, frame(DST, label, challenge))         equal (bkv.tenant may only sign)
//   seal keys (AES-GCM)    iv ‖ GCM(k, iv, aad = frame(DST, label), challenge)   the copy decrypts it to the challenge
//   sig (ECDSA)            no answer: the copy signs SHA-256(frame(DST, label, challenge)) and the
//                          signature must verify against the source's public point (what clients pin)
//
// The inputs carry their own domain-separation string, so no answer can pass
// for a verifier, a tenant secret or a sealed record.
import { randomBytes } from 'node:crypto';
import { p256 } from '@noble/curves/nist.js';
import { sha256 } from '@noble/hashes/sha2.js';
import type { Handle, Token } from '../hsm/token.js';
import { equalBytes, frame, fromHex, toHex } from '../../protocol/bytes.js';
import { specOfLabel } from './bundle.js';

export const KAT_DST = 'bkv-v1-ceremony-kat';
const IV = 12;

export interface Kat {
  challenge: string;
  point: string;
  answers: Record<string, string>;
}

export interface LabelledKey {
  label: string;
  handle: Handle;
}

const input = (label: string, challenge: Uint8Array): Uint8Array => frame(KAT_DST, label, challenge);
const b64 = (u: Uint8Array): string => Buffer.from(u).toString('base64');
const unb64 = (s: string): Buffer => Buffer.from(s, 'base64');

/** The source's answers for `keys` (run on the source token). */
export function makeKat(token: Token, keys: LabelledKey[]): Kat {
  const challenge = token.random(32);
  const point = p256.getPublicKey(p256.utils.randomSecretKey(), false);
  const answers: Record<string, string> = {};
  for (const { label, handle } of keys) {
    const { spec } = specOfLabel(label)!;
    if (spec.mechanism === 'CKM_ECDH1_DERIVE') answers[label] = b64(token.ecdhX(handle, point));
    else if (spec.mechanism === 'CKM_SHA256_HMAC') answers[label] = b64(token.hmacSha256(handle, input(label, challenge)));
    else if (spec.mechanism === 'CKM_AES_GCM') {
      const iv = randomBytes(IV);
      answers[label] = b64(Buffer.concat([iv, token.aesGcmEncrypt(handle, iv, frame(KAT_DST, label), challenge)]));
    }
    // CKM_ECDSA: no answer; the copy's signature is checked against the source's public point.
  }
  return { challenge: b64(challenge), point: toHex(point), answers };
}

/**
 * Labels of the copies in `keys` (on the target) that do not reproduce the
 * source's answers; empty when every one does. A key the answers do not cover
 * fails too: nothing is imported unchecked.
 */
export function checkKat(token: Token, keys: LabelledKey[], kat: Kat, sigPoint: Uint8Array): string[] {
  const challenge = unb64(kat.challenge);
  const point = fromHex(kat.point);
  const failed: string[] = [];
  for (const { label, handle } of keys) {
    const { spec } = specOfLabel(label)!;
    const want = kat.answers[label];
    let ok = false;
    try {
      if (spec.mechanism === 'CKM_ECDSA') {
        const digest = sha256(input(label, challenge));
        ok = p256.verify(token.ecdsaSign(handle, digest), digest, sigPoint, { prehash: false, format: 'compact', lowS: false });
      } else if (want === undefined) {
        ok = false;
      } else if (spec.mechanism === 'CKM_ECDH1_DERIVE') {
        ok = equalBytes(token.ecdhX(handle, point), unb64(want));
      } else if (spec.mechanism === 'CKM_SHA256_HMAC') {
        ok = equalBytes(token.hmacSha256(handle, input(label, challenge)), unb64(want));
      } else if (spec.mechanism === 'CKM_AES_GCM') {
        const blob = unb64(want);
        const opened = blob.length > IV ? token.aesGcmDecrypt(handle, blob.subarray(0, IV), frame(KAT_DST, label), blob.subarray(IV)) : null;
        ok = opened !== null && equalBytes(opened, challenge);
      }
    } catch {
      ok = false;
    }
    if (!ok) failed.push(label);
  }
  return failed;
}
