// Protocol v1 test vectors (test/vectors/protocol-v1.json, docs/PROTOCOL.md).
//
// Every output in the JSON is recomputed from the JSON's inputs twice: with the
// project's own protocol functions, and with an independent node:crypto
// implementation of the byte layouts written in docs/PROTOCOL.md. Changing any
// DST, any framing or any derivation step fails here. Pure: no HSM, no I/O
// beyond reading the JSON. Regenerate with
//   npx tsx scripts/gen-vectors.ts > test/vectors/protocol-v1.json
// only for a deliberate protocol version change.
import { describe, it, expect } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createCipheriv, createHash, createHmac, hkdfSync } from 'node:crypto';
import { p256, p256_hasher } from '@noble/curves/nist.js';
import { argon2id } from 'hash-wasm';
import { ErrorCodes } from '../../protocol/errors.js';
import { concat, fromHex, toB64, toHex, utf8 } from '../../protocol/bytes.js';
import { DST, PROTOCOL_VERSION, SIZES } from '../../protocol/suite.js';
import { blind, evaluateReference, finalize, hashToGroup, oprfInput, validatePoint } from '../../protocol/oprf.js';
import { argon2Salt, deriveClientKeys, type KdfParams } from '../../protocol/kdf.js';
import { envelopeAad, openEnvelope, sealEnvelope } from '../../protocol/envelope.js';
import { sealAad, verifierInput } from '../../protocol/record.js';
import { descriptorBytes, descriptorDigest, vaultIdOf, verifyDescriptor, type Descriptor } from '../../protocol/descriptor.js';
import {
  CHANNEL_DST,
  MAX_PLAINTEXT,
  PAD_BUCKET,
  channelIdOf,
  channelKeys,
  clientHandshake,
  messageAad,
  messageNonce,
  openMessage,
  pad,
  sealMessage,
  unpad,
  type Direction,
  type MessageHeader,
} from '../../protocol/channel.js';
import { mintToken, tenantSecretInput } from '../../vault/rpc/auth.js';
import { finishOprf, passwordBytes, startOprf } from '../../client/protocol.js';
import { codeOf, codeOfSync } from '../helpers/codes.js';

// ---- the vectors -------------------------------------------------------------------

interface CaseVector {
  name: string;
  inputs: {
    userId: string;
    password: string;
    r: string;
    kdf: KdfParams;
    backupKey: string;
    envelopeNonce: string;
    generation: number;
    sealIv: string;
  };
  outputs: Record<string, string> & { kBOddY: boolean };
}

interface MessageVector {
  dir: Direction;
  counter: number;
  method: string;
  ts: number;
  bodyJson: string;
  aad: string;
  nonce: string;
  padded: string;
  ciphertext: string;
}

interface Vectors {
  protocol: string;
  version: number;
  dst: Record<string, string> & { channel: Record<string, string> };
  constants: { padBucket: number; maxPlaintext: number };
  vault: {
    inputs: {
      sigSecret: string;
      oprfKey: string;
      kxSecret: string;
      verifierKey: string;
      sealKey: string;
      tenantKey: string;
      epoch: number;
      attemptLimit: number;
      kdfFloor: KdfParams;
    };
    outputs: Record<string, string>;
  };
  cases: CaseVector[];
  channel: {
    inputs: { e: string; userId: string; case: string };
    outputs: Record<string, string>;
    messages: MessageVector[];
  };
  tenant: {
    inputs: { name: string; version: number; now: number; ttlSec: number; sub: string };
    outputs: { secretInput: string; secret: string; token: string };
  };
}

const V = JSON.parse(readFileSync(join(import.meta.dirname, '..', 'vectors', 'protocol-v1.json'), 'utf8')) as Vectors;

const hex = (b: Uint8Array): string => toHex(b);
const scalar = (h: string): bigint => BigInt('0x' + h);
const Point = p256.Point;
const N = Point.Fn.ORDER;

const sigSecret = fromHex(V.vault.inputs.sigSecret);
const sigPublic = p256.getPublicKey(sigSecret, false);
const kxSecret = fromHex(V.vault.inputs.kxSecret);
const kxPublic = p256.getPublicKey(kxSecret, false);
const k = scalar(V.vault.inputs.oprfKey);
const vaultId = vaultIdOf(sigPublic);
const caseByName = (name: string): CaseVector => V.cases.find((c) => c.name === name)!;

// ---- an independent implementation of the spec's byte layouts (node:crypto only) ----

const ref = {
  lp(b: Uint8Array | string): Buffer {
    const bytes = typeof b === 'string' ? Buffer.from(b, 'utf8') : Buffer.from(b);
    const len = Buffer.alloc(2);
    len.writeUInt16BE(bytes.length);
    return Buffer.concat([len, bytes]);
  },
  frame(...parts: (Uint8Array | string)[]): Buffer {
    return Buffer.concat(parts.map((p) => ref.lp(p)));
  },
  u32(n: number): Buffer {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    return b;
  },
  u64(n: number): Buffer {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(n));
    return b;
  },
  sha256: (b: Uint8Array): Buffer => createHash('sha256').update(b).digest(),
  hmac: (key: Uint8Array | string, data: Uint8Array): Buffer => createHmac('sha256', key).update(data).digest(),
  /** RFC 5869 with L = 32: Expand is a single block, T(1) = HMAC(PRK, info ‖ 0x01). */
  expand32: (prk: Uint8Array, info: Uint8Array): Buffer => ref.hmac(prk, Buffer.concat([info, Buffer.from([1])])),
  gcm(key: Uint8Array, iv: Uint8Array, aad: Uint8Array, pt: Uint8Array): Buffer {
    const c = createCipheriv('aes-256-gcm', key, iv);
    c.setAAD(aad);
    return Buffer.concat([c.update(pt), c.final(), c.getAuthTag()]);
  },
};
const D = V.dst;
const CD = V.dst.channel;

// ---- tests -----------------------------------------------------------------------------

describe('protocol v1 constants', () => {
  it('the vectors are for this protocol version', () => {
    expect(V.protocol).toBe('bkv-v1');
    expect(V.version).toBe(PROTOCOL_VERSION);
  });

  it('pins every domain-separation string, and no two are equal', () => {
    const { channel, ...rest } = V.dst;
    expect({ ...DST }).toStrictEqual(rest);
    expect({ ...CHANNEL_DST }).toStrictEqual(channel);
    const all = [...Object.values(DST), ...Object.values(CHANNEL_DST)];
    expect(new Set(all).size).toBe(all.length);
    for (const s of all) expect(s.startsWith('bkv-v1-')).toBe(true);
  });

  it('pins sizes and the padding bucket', () => {
    expect(V.constants).toStrictEqual({ padBucket: PAD_BUCKET, maxPlaintext: MAX_PLAINTEXT });
    expect(SIZES).toMatchObject({ point: 65, x: 32, key: 32, authKey: 32, gcmNonce: 12, gcmTag: 16, envelope: 60, verifier: 32 });
  });

  it('hashes to P-256 with RFC 9380 P256_XMD:SHA-256_SSWU_RO_ (suite check with the RFC\'s own vector)', () => {
    // RFC 9380 Appendix J.1.1, msg = "".
    const P = p256_hasher.hashToCurve(new Uint8Array(0), { DST: 'QUUX-V01-CS02-with-P256_XMD:SHA-256_SSWU_RO_' });
    const { x, y } = P.toAffine();
    expect(x.toString(16)).toBe('2c15230b26dbc6fc9a37051158c95b79656e17a1a920b11394ca91c44247d3e4');
    expect(y.toString(16)).toBe('8a7a74985cc5c776cdfe4b1f19884970453912e9d31528c060be9ab5c43e8415');
  });
});

describe('vault identity and descriptor', () => {
  const o = V.vault.outputs;
  const descriptor: Descriptor = {
    version: PROTOCOL_VERSION,
    vaultId,
    channelKey: kxPublic,
    epoch: V.vault.inputs.epoch,
    attemptLimit: V.vault.inputs.attemptLimit,
    kdfFloor: V.vault.inputs.kdfFloor,
  };

  it('public keys and vault id', () => {
    expect(hex(sigPublic)).toBe(o.sigPublic);
    expect(hex(kxPublic)).toBe(o.kxPublic);
    expect(hex(Point.BASE.multiply(k).toBytes(false))).toBe(o.oprfPublic);
    expect(hex(vaultId)).toBe(o.vaultId);
    expect(hex(ref.sha256(ref.frame(D.vaultId!, sigPublic)).subarray(0, 16))).toBe(o.vaultId);
  });

  it('descriptor bytes and digest', () => {
    expect(hex(descriptorBytes(descriptor))).toBe(o.descriptorBytes);
    expect(hex(descriptorDigest(descriptor))).toBe(o.descriptorDigest);
    const f = V.vault.inputs.kdfFloor;
    const independent = ref.frame(
      D.descriptor!,
      ref.u32(PROTOCOL_VERSION),
      vaultId,
      kxPublic,
      ref.u32(descriptor.epoch),
      ref.u32(descriptor.attemptLimit),
      Buffer.concat([Buffer.from(f.alg), ref.u32(f.m), ref.u32(f.t), ref.u32(f.p)]),
    );
    expect(hex(independent)).toBe(o.descriptorBytes);
    expect(hex(ref.sha256(independent))).toBe(o.descriptorDigest);
  });

  it('signature: raw r‖s over the digest; low-S and high-S are both accepted', () => {
    const digest = fromHex(o.descriptorDigest!);
    expect(hex(p256.sign(digest, sigSecret, { prehash: false, format: 'compact', lowS: true }))).toBe(o.signatureRfc6979);
    const lo = fromHex(o.signatureRfc6979!);
    const hi = fromHex(o.signatureHighS!);
    expect(hex(hi.subarray(0, 32))).toBe(hex(lo.subarray(0, 32)));
    expect(scalar(hex(hi.subarray(32))) + scalar(hex(lo.subarray(32)))).toBe(N);
    // The HSM's CKM_ECDSA may return either s: the client must not require low-S.
    expect(verifyDescriptor({ ...descriptor, signature: lo }, sigPublic)).toBeTruthy();
    expect(verifyDescriptor({ ...descriptor, signature: hi }, sigPublic)).toBeTruthy();
  });

  it('the client refuses a descriptor that the pinned key did not sign, or that was altered', () => {
    const signature = fromHex(o.signatureRfc6979!);
    const bad = Uint8Array.from(signature);
    bad[10]! ^= 1;
    const other = p256.getPublicKey(fromHex('11'.repeat(32)), false);
    expect(codeOfSync(() => verifyDescriptor({ ...descriptor, signature: bad }, sigPublic))).toBe(ErrorCodes.FORBIDDEN);
    expect(codeOfSync(() => verifyDescriptor({ ...descriptor, epoch: 2, signature }, sigPublic))).toBe(ErrorCodes.FORBIDDEN);
    expect(codeOfSync(() => verifyDescriptor({ ...descriptor, attemptLimit: 1000, signature }, sigPublic))).toBe(ErrorCodes.FORBIDDEN);
    expect(codeOfSync(() => verifyDescriptor({ ...descriptor, channelKey: other, signature }, sigPublic))).toBe(ErrorCodes.FORBIDDEN);
    expect(codeOfSync(() => verifyDescriptor({ ...descriptor, signature }, other))).toBe(ErrorCodes.FORBIDDEN);
    expect(codeOfSync(() => verifyDescriptor({ ...descriptor, version: 2, signature }, sigPublic))).toBe(ErrorCodes.FORBIDDEN);
  });
});

describe.each(V.cases.map((c) => [c.name, c] as const))('case %s: OPRF, client keys, envelope, record', (_name, c) => {
  const o = c.outputs;
  const i = c.inputs;
  const r = scalar(i.r);

  it('inputs are as documented (NFC user id, NFC password bytes)', () => {
    expect(i.userId).toBe(i.userId.normalize('NFC'));
    expect(hex(utf8(i.userId))).toBe(o.userIdUtf8);
    expect(hex(passwordBytes(i.password))).toBe(o.passwordBytes);
    expect(hex(Buffer.from(i.password.normalize('NFC'), 'utf8'))).toBe(o.passwordBytes);
    if (c.name === 'non-ascii') {
      // Typed in NFD and holding compatibility characters: pins NFC (not "as typed", not NFKC).
      expect(i.password.normalize('NFC')).not.toBe(i.password);
      expect(i.password.normalize('NFKC')).not.toBe(i.password.normalize('NFC'));
      expect(i.userId).not.toMatch(/^[\x00-\x7f]*$/);
    }
  });

  it('OPRF: input, H, B, X, x(k·H), oprfOut', () => {
    const input = oprfInput(vaultId, i.userId, fromHex(o.passwordBytes!));
    expect(hex(input)).toBe(o.oprfInput);
    expect(hex(ref.frame(D.oprfInput!, vaultId, i.userId, fromHex(o.passwordBytes!)))).toBe(o.oprfInput);

    const H = hashToGroup(input);
    expect(hex(H.toBytes(false))).toBe(o.H);
    expect(hex(p256_hasher.hashToCurve(input, { DST: D.hashToCurve! }).toBytes(false))).toBe(o.H);

    const b = blind(input, r);
    expect(hex(b.blinded)).toBe(o.blinded);
    expect(hex(H.multiply(r).toBytes(false))).toBe(o.blinded);

    const kB = Point.fromBytes(fromHex(o.blinded!)).multiply(k);
    expect(hex(kB.toBytes(false))).toBe(o.kB);
    expect(kB.toAffine().y % 2n === 1n).toBe(o.kBOddY);
    expect(hex(evaluateReference(k, fromHex(o.blinded!)))).toBe(o.evaluated);
    expect(o.evaluated).toBe(o.kB!.slice(2, 66));

    expect(hex(evaluateReference(k, H.toBytes(false)))).toBe(o.unblindedX);
    expect(hex(finalize(input, r, fromHex(o.evaluated!)))).toBe(o.oprfOut);
    expect(hex(ref.sha256(ref.frame(D.oprfFinalize!, input, fromHex(o.unblindedX!))))).toBe(o.oprfOut);
  });

  it('the client SDK steps give the same blinded element and keys', async () => {
    const p = startOprf(vaultId, i.userId, i.password, r);
    expect(hex(p.input)).toBe(o.oprfInput);
    expect(hex(p.blinded)).toBe(o.blinded);
    const keys = await finishOprf(p, fromHex(o.evaluated!), i.kdf);
    expect(hex(keys.authKey)).toBe(o.authKey);
    expect(hex(keys.envKey)).toBe(o.envKey);
  });

  it('Argon2id salt, stretched output, rwd, authKey, envKey', async () => {
    const oprfOut = fromHex(o.oprfOut!);
    expect(hex(argon2Salt(vaultId, i.userId))).toBe(o.argon2Salt);
    expect(hex(ref.sha256(ref.frame(D.argon2Salt!, vaultId, i.userId)))).toBe(o.argon2Salt);

    const stretched = await argon2id({
      password: oprfOut,
      salt: fromHex(o.argon2Salt!),
      parallelism: i.kdf.p,
      iterations: i.kdf.t,
      memorySize: i.kdf.m,
      hashLength: 32,
      outputType: 'hex',
    });
    expect(stretched).toBe(o.argon2Out);

    // rwd = HKDF-Extract(salt = DST.rwd, ikm = oprfOut ‖ argon2Out) = HMAC(DST.rwd, ikm)
    const rwd = ref.hmac(D.rwd!, concat(oprfOut, fromHex(o.argon2Out!)));
    expect(hex(rwd)).toBe(o.rwd);
    expect(hex(ref.expand32(rwd, Buffer.from(D.authKey!)))).toBe(o.authKey);
    expect(hex(ref.expand32(rwd, Buffer.from(D.envKey!)))).toBe(o.envKey);
    const viaNode = Buffer.from(hkdfSync('sha256', concat(oprfOut, fromHex(o.argon2Out!)), D.rwd!, D.authKey!, 32));
    expect(hex(viaNode)).toBe(o.authKey);

    const keys = await deriveClientKeys(oprfOut, i.kdf, vaultId, i.userId);
    expect(hex(keys.authKey)).toBe(o.authKey);
    expect(hex(keys.envKey)).toBe(o.envKey);
  });

  it('envelope: AAD, bytes, and it opens to K', async () => {
    const envKey = fromHex(o.envKey!);
    expect(hex(envelopeAad(vaultId, i.userId))).toBe(o.envelopeAad);
    expect(hex(ref.frame(D.envelope!, vaultId, i.userId))).toBe(o.envelopeAad);
    const env = await sealEnvelope(envKey, fromHex(i.backupKey), vaultId, i.userId, fromHex(i.envelopeNonce));
    expect(hex(env)).toBe(o.envelope);
    const nonce = fromHex(i.envelopeNonce);
    expect(hex(Buffer.concat([nonce, ref.gcm(envKey, nonce, fromHex(o.envelopeAad!), fromHex(i.backupKey))]))).toBe(o.envelope);
    expect(hex(await openEnvelope(envKey, fromHex(o.envelope!), vaultId, i.userId))).toBe(i.backupKey);
    // Bound to the user: another user id does not open it.
    expect(await codeOf(openEnvelope(envKey, fromHex(o.envelope!), vaultId, i.userId + 'x'))).toBe(ErrorCodes.DECRYPT_FAILED);
  });

  it('vault side: verifier input, verifier (HMAC), seal AAD, sealed record', () => {
    const authKey = fromHex(o.authKey!);
    const vIn = verifierInput(vaultId, i.userId, i.generation, authKey);
    expect(hex(vIn)).toBe(o.verifierInput);
    expect(hex(ref.frame(D.verifier!, vaultId, i.userId, ref.u64(i.generation), authKey))).toBe(o.verifierInput);
    const verifier = ref.hmac(fromHex(V.vault.inputs.verifierKey), vIn);
    expect(hex(verifier)).toBe(o.verifier);

    const aad = sealAad(vaultId, i.userId, i.generation, V.vault.inputs.epoch, verifier);
    expect(hex(aad)).toBe(o.sealAad);
    expect(hex(ref.frame(D.seal!, vaultId, i.userId, ref.u64(i.generation), ref.u32(V.vault.inputs.epoch), verifier))).toBe(o.sealAad);
    const iv = fromHex(i.sealIv);
    expect(hex(Buffer.concat([iv, ref.gcm(fromHex(V.vault.inputs.sealKey), iv, aad, fromHex(o.envelope!))]))).toBe(o.sealed);
    expect(o.sealed!.length / 2).toBe(12 + SIZES.envelope + 16);
  });
});

describe('OPRF: x-only evaluation and the sign of lift_x', () => {
  it('the vectors cover both parities of y(k·B)', () => {
    expect(new Set(V.cases.map((c) => c.outputs.kBOddY))).toStrictEqual(new Set([true, false]));
  });

  it.each(V.cases.map((c) => [c.name, c] as const))('case %s: finalize gives the same output for +k·B and −k·B', (_n, c) => {
    const input = fromHex(c.outputs.oprfInput!);
    const r = scalar(c.inputs.r);
    const kB = Point.fromBytes(fromHex(c.outputs.kB!));
    for (const P of [kB, kB.negate()]) {
      // What a vault answering with either point's x would send: identical bytes by construction.
      const X = P.toBytes(true).slice(1);
      expect(hex(finalize(input, r, X))).toBe(c.outputs.oprfOut);
      // Unblinding either sign explicitly: r⁻¹·(±k·B) = ±k·H, whose x is the same.
      expect(hex(P.multiply(Point.Fn.inv(r)).toBytes(true).slice(1))).toBe(c.outputs.unblindedX);
    }
    // The negated blind (B' = −B) is just as good: x(k·B') = x(k·B), and r' = n − r unblinds it.
    const rNeg = N - r;
    const bNeg = blind(input, rNeg).blinded;
    expect(hex(evaluateReference(k, bNeg))).toBe(c.outputs.evaluated);
    expect(hex(finalize(input, rNeg, evaluateReference(k, bNeg)))).toBe(c.outputs.oprfOut);
  });

  it('over many blinding scalars, finalize always equals SHA-256(frame(DST, input, x(k·H))), for either parity', () => {
    const c = caseByName('ascii');
    const input = fromHex(c.outputs.oprfInput!);
    const want = c.outputs.oprfOut;
    const seen = new Set<boolean>();
    for (let j = 1n; j <= 24n; j++) {
      const r = (scalar(c.inputs.r) * j + j) % N;
      const { blinded } = blind(input, r);
      const kB = Point.fromBytes(blinded).multiply(k);
      seen.add(kB.toAffine().y % 2n === 1n);
      expect(hex(finalize(input, r, evaluateReference(k, blinded)))).toBe(want);
    }
    expect(seen.size).toBe(2);
  });

  it('a different OPRF key, password or user gives a different output', () => {
    const c = caseByName('ascii');
    const input = fromHex(c.outputs.oprfInput!);
    const r = scalar(c.inputs.r);
    const { blinded } = blind(input, r);
    expect(hex(finalize(input, r, evaluateReference(k + 1n, blinded)))).not.toBe(c.outputs.oprfOut);
    const other = oprfInput(vaultId, c.inputs.userId, utf8(c.inputs.password + '!'));
    expect(hex(finalize(other, r, evaluateReference(k, blind(other, r).blinded)))).not.toBe(c.outputs.oprfOut);
    const otherUser = oprfInput(vaultId, c.inputs.userId + '2', utf8(c.inputs.password));
    expect(hex(finalize(otherUser, r, evaluateReference(k, blind(otherUser, r).blinded)))).not.toBe(c.outputs.oprfOut);
  });

  it('finalize refuses an answer of the wrong length or an x that is on no curve point', () => {
    const c = caseByName('ascii');
    const input = fromHex(c.outputs.oprfInput!);
    const r = scalar(c.inputs.r);
    const X = fromHex(c.outputs.evaluated!);
    expect(codeOfSync(() => finalize(input, r, X.subarray(0, 31)))).toBe(ErrorCodes.INVALID_LENGTH);
    expect(codeOfSync(() => finalize(input, r, concat(X, new Uint8Array(1))))).toBe(ErrorCodes.INVALID_LENGTH);
    expect(codeOfSync(() => finalize(input, r, fromHex(c.outputs.kB!)))).toBe(ErrorCodes.INVALID_LENGTH);
    // Find an x with no y (about half of all x): not a genuine vault answer.
    let x = scalar(c.outputs.evaluated!);
    let notOnCurve: Uint8Array | undefined;
    for (let j = 0; j < 64 && !notOnCurve; j++, x++) {
      const candidate = fromHex(x.toString(16).padStart(64, '0'));
      try {
        Point.fromBytes(concat(new Uint8Array([2]), candidate));
      } catch {
        notOnCurve = candidate;
      }
    }
    expect(notOnCurve).toBeDefined();
    expect(codeOfSync(() => finalize(input, r, notOnCurve!))).toBe(ErrorCodes.INVALID_POINT);
  });

  it('blind refuses r = 0 and r ≥ n', () => {
    const input = fromHex(caseByName('ascii').outputs.oprfInput!);
    expect(() => blind(input, 0n)).toThrow(RangeError);
    expect(() => blind(input, N)).toThrow(RangeError);
  });
});

describe('validatePoint (every point from the network)', () => {
  const good = fromHex(caseByName('ascii').outputs.blinded!);
  const P = Point.fromBytes(good);
  const FP = Point.Fp.ORDER;
  const enc32 = (v: bigint) => fromHex(v.toString(16).padStart(64, '0'));

  it('accepts a valid uncompressed point and returns it unchanged', () => {
    expect(validatePoint(good)).toBe(good);
  });

  it('refuses the identity in every spelling', () => {
    expect(codeOfSync(() => validatePoint(new Uint8Array([0])))).toBe(ErrorCodes.INVALID_LENGTH); // SEC1 encoding of infinity
    expect(codeOfSync(() => validatePoint(concat(new Uint8Array([4]), new Uint8Array(64))))).toBe(ErrorCodes.INVALID_POINT);
    expect(codeOfSync(() => validatePoint(new Uint8Array(65)))).toBe(ErrorCodes.INVALID_POINT);
  });

  it('refuses off-curve points (invalid-curve attack) and out-of-range coordinates', () => {
    const { x, y } = P.toAffine();
    expect(codeOfSync(() => validatePoint(concat(new Uint8Array([4]), enc32(x), enc32((y + 1n) % FP))))).toBe(ErrorCodes.INVALID_POINT);
    expect(codeOfSync(() => validatePoint(concat(new Uint8Array([4]), enc32(x + 1n), enc32(y))))).toBe(ErrorCodes.INVALID_POINT);
    // A point of another curve (b = 7) with small order would leak k mod its order if evaluated.
    expect(codeOfSync(() => validatePoint(concat(new Uint8Array([4]), enc32(0n), enc32(1n))))).toBe(ErrorCodes.INVALID_POINT);
    // Coordinates must be field elements (< p).
    expect(codeOfSync(() => validatePoint(concat(new Uint8Array([4]), enc32(FP), enc32(y))))).toBe(ErrorCodes.INVALID_POINT);
    expect(codeOfSync(() => validatePoint(concat(new Uint8Array([4]), enc32(x), enc32(FP))))).toBe(ErrorCodes.INVALID_POINT);
  });

  it('refuses compressed and hybrid encodings', () => {
    const compressed = P.toBytes(true);
    expect(compressed.length).toBe(33);
    expect(codeOfSync(() => validatePoint(compressed))).toBe(ErrorCodes.INVALID_LENGTH);
    for (const prefix of [0x02, 0x03, 0x06, 0x07, 0x00, 0x05]) {
      const b = Uint8Array.from(good);
      b[0] = prefix;
      expect(codeOfSync(() => validatePoint(b))).toBe(ErrorCodes.INVALID_POINT);
    }
  });

  it('refuses wrong lengths', () => {
    for (const n of [0, 1, 32, 33, 64, 66, 97, 130]) {
      const b = new Uint8Array(n);
      if (n > 0) b[0] = 4;
      if (n >= 65) b.set(good.subarray(0, 65));
      expect(codeOfSync(() => validatePoint(b))).toBe(ErrorCodes.INVALID_LENGTH);
    }
  });

  it('evaluateReference goes through validatePoint too', () => {
    expect(codeOfSync(() => evaluateReference(k, P.toBytes(true)))).toBe(ErrorCodes.INVALID_LENGTH);
    expect(codeOfSync(() => evaluateReference(k, new Uint8Array(65)))).toBe(ErrorCodes.INVALID_POINT);
  });
});

describe('channel', () => {
  const ch = V.channel;
  const o = ch.outputs;
  const e = fromHex(ch.inputs.e);

  it('handshake: E, Z on both ends, channel id', () => {
    const hs = clientHandshake(kxPublic, e);
    expect(hex(hs.ephemeral)).toBe(o.ephemeral);
    expect(hex(hs.z)).toBe(o.z);
    // The vault's side: x(kx·E), what CKM_ECDH1_DERIVE with CKD_NULL returns.
    expect(hex(p256.getSharedSecret(kxSecret, fromHex(o.ephemeral!), true).slice(1))).toBe(o.z);
    expect(hex(channelIdOf(fromHex(o.ephemeral!)))).toBe(o.channelId);
    expect(hex(ref.sha256(ref.frame(CD.id!, fromHex(o.ephemeral!))).subarray(0, 16))).toBe(o.channelId);
  });

  it('key schedule: salt, PRK, kC2S, kS2C', () => {
    const E = fromHex(o.ephemeral!);
    const keys = channelKeys(fromHex(o.z!), E, vaultId, kxPublic);
    expect(hex(keys.id)).toBe(o.channelId);
    expect(hex(keys.c2s)).toBe(o.kC2S);
    expect(hex(keys.s2c)).toBe(o.kS2C);
    const salt = ref.sha256(ref.frame(CD.salt!, vaultId, kxPublic));
    expect(hex(salt)).toBe(o.salt);
    const prk = ref.hmac(salt, fromHex(o.z!));
    expect(hex(prk)).toBe(o.prk);
    expect(hex(ref.expand32(prk, ref.frame(CD.c2s!, E)))).toBe(o.kC2S);
    expect(hex(ref.expand32(prk, ref.frame(CD.s2c!, E)))).toBe(o.kS2C);
  });

  it.each(ch.messages.map((m) => [`${m.dir} #${m.counter} ${m.method}`, m] as const))('message %s', async (_n, m) => {
    const header: MessageHeader = { dir: m.dir, channelId: fromHex(o.channelId!), counter: m.counter, method: m.method, userId: ch.inputs.userId, ts: m.ts };
    const key = fromHex(m.dir === 'c2s' ? o.kC2S! : o.kS2C!);
    const body = JSON.parse(m.bodyJson) as unknown;
    expect(JSON.stringify(body)).toBe(m.bodyJson);

    expect(hex(messageAad(header))).toBe(m.aad);
    expect(hex(ref.frame(CD.aad!, m.dir, fromHex(o.channelId!), ref.u32(m.counter), m.method, ch.inputs.userId, ref.u64(m.ts)))).toBe(m.aad);
    expect(hex(messageNonce(m.counter))).toBe(m.nonce);
    expect(hex(Buffer.concat([Buffer.alloc(4), ref.u64(m.counter)]))).toBe(m.nonce);

    const padded = pad(body);
    expect(hex(padded)).toBe(m.padded);
    const json = Buffer.from(m.bodyJson, 'utf8');
    expect(padded.length % PAD_BUCKET).toBe(0);
    expect(padded.length).toBe(Math.ceil((json.length + 2) / PAD_BUCKET) * PAD_BUCKET);
    expect(hex(padded.subarray(0, 2))).toBe(json.length.toString(16).padStart(4, '0'));
    expect(padded.subarray(2 + json.length).every((b) => b === 0)).toBe(true);
    expect(unpad(padded)).toStrictEqual(body);

    const ct = await sealMessage(key, header, body);
    expect(hex(ct)).toBe(m.ciphertext);
    expect(hex(ref.gcm(key, fromHex(m.nonce), fromHex(m.aad), padded))).toBe(m.ciphertext);
    expect(await openMessage(key, header, fromHex(m.ciphertext))).toStrictEqual(body);
  });

  it('the messages carry this case\'s OPRF values (the whole recovery, end to end)', () => {
    const c = caseByName(ch.inputs.case);
    const [req0, res0, req1, res1] = ch.messages.map((m) => JSON.parse(m.bodyJson));
    expect(req0.blinded).toBe(toB64(fromHex(c.outputs.blinded!)));
    expect(res0.result.evaluated).toBe(toB64(fromHex(c.outputs.evaluated!)));
    expect(req1.authKey).toBe(toB64(fromHex(c.outputs.authKey!)));
    expect(res1.result.envelope).toBe(toB64(fromHex(c.outputs.envelope!)));
  });

  it('a message opens only under exactly its own header (counter, direction, method, user, ts, channel)', async () => {
    const m = ch.messages[0]!;
    const base: MessageHeader = { dir: m.dir, channelId: fromHex(o.channelId!), counter: m.counter, method: m.method, userId: ch.inputs.userId, ts: m.ts };
    const ct = fromHex(m.ciphertext);
    const key = fromHex(o.kC2S!);
    const variants: MessageHeader[] = [
      { ...base, counter: 1 },
      { ...base, dir: 's2c' },
      { ...base, method: 'enroll.begin' },
      { ...base, userId: ch.inputs.userId + 'x' },
      { ...base, ts: m.ts + 1 },
      { ...base, channelId: fromHex('00'.repeat(16)) },
    ];
    for (const h of variants) expect(await codeOf(openMessage(key, h, ct))).toBe(ErrorCodes.DECRYPT_FAILED);
    expect(await codeOf(openMessage(fromHex(o.kS2C!), base, ct))).toBe(ErrorCodes.DECRYPT_FAILED);
    const flipped = Uint8Array.from(ct);
    flipped[5]! ^= 1;
    expect(await codeOf(openMessage(key, base, flipped))).toBe(ErrorCodes.DECRYPT_FAILED);
  });

  it('every recover.finish outcome pads to the same size', () => {
    const c = caseByName('ascii');
    const sizes = [
      { ok: true, result: { outcome: 'ok', envelope: toB64(fromHex(c.outputs.envelope!)) } },
      { ok: true, result: { outcome: 'wrong-password', attemptsLeft: 9 } },
      { ok: true, result: { outcome: 'locked' } },
      { ok: false, error: { code: 'LOCKED', message: 'record is locked: the attempt limit was reached and the key destroyed' } },
    ].map((b) => pad(b).length);
    expect(new Set(sizes)).toStrictEqual(new Set([PAD_BUCKET]));
  });

  it('pad refuses bodies over the maximum plaintext', () => {
    expect(codeOfSync(() => pad({ x: 'a'.repeat(MAX_PLAINTEXT) }))).toBe(ErrorCodes.PAYLOAD_TOO_LARGE);
    expect(pad({ x: 'a'.repeat(MAX_PLAINTEXT - 2 - 8) }).length).toBe(MAX_PLAINTEXT);
  });
});

describe('tenant credential', () => {
  const t = V.tenant;
  it('secret input, secret (HMAC under the tenant key), and a minted HS256 token', () => {
    const input = tenantSecretInput(vaultId, t.inputs.name, t.inputs.version);
    expect(hex(input)).toBe(t.outputs.secretInput);
    expect(hex(ref.frame(D.tenantSecret!, vaultId, t.inputs.name, ref.u32(t.inputs.version)))).toBe(t.outputs.secretInput);
    const secret = ref.hmac(fromHex(V.vault.inputs.tenantKey), input);
    expect(hex(secret)).toBe(t.outputs.secret);
    const token = mintToken(secret, {
      tenant: t.inputs.name,
      version: t.inputs.version,
      vaultId,
      ttlSec: t.inputs.ttlSec,
      now: t.inputs.now,
      sub: t.inputs.sub,
    });
    expect(token).toBe(t.outputs.token);
    const [h, b, s] = token.split('.') as [string, string, string];
    expect(JSON.parse(Buffer.from(h, 'base64url').toString())).toStrictEqual({ alg: 'HS256', typ: 'JWT', kid: `${t.inputs.name}:${t.inputs.version}` });
    expect(JSON.parse(Buffer.from(b, 'base64url').toString())).toStrictEqual({
      aud: hex(vaultId),
      iat: t.inputs.now / 1000,
      exp: t.inputs.now / 1000 + t.inputs.ttlSec,
      sub: t.inputs.sub,
    });
    expect(s).toBe(createHmac('sha256', secret).update(`${h}.${b}`).digest('base64url'));
  });
});
