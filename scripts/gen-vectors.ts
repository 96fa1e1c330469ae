// Deterministic test-vector generator for protocol v1 (docs/PROTOCOL.md).
//
//   npx tsx scripts/gen-vectors.ts > test/vectors/protocol-v1.json
//
// Every value comes from the project's own pure protocol functions, run on the
// fixed inputs below. Where the real protocol asks the HSM, a software stand-in
// plays the vault: evaluateReference(k, B) for CKM_ECDH1_DERIVE on the OPRF key,
// node:crypto HMAC-SHA-256 for the verifier key (C_Sign), AES-256-GCM for the
// seal key (C_Encrypt), plain ECDH for the channel key and a deterministic
// (RFC 6979) ECDSA signature for the descriptor. A few extra intermediates that
// the project's functions do not expose (Argon2id output, rwd, channel salt and
// PRK) are computed from the spec text and checked against the project's
// outputs before anything is printed, so the JSON never disagrees with the code.
import { createCipheriv, createHmac } from 'node:crypto';
import { p256 } from '@noble/curves/nist.js';
import { extract, expand } from '@noble/hashes/hkdf.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { argon2id } from 'hash-wasm';
import { concat, equalBytes, frame, fromHex, toB64, toHex, utf8 } from '../protocol/bytes.js';
import { DST, PROTOCOL_VERSION } from '../protocol/suite.js';
import { blind, evaluateReference, finalize, hashToGroup, oprfInput } from '../protocol/oprf.js';
import { argon2Salt, deriveClientKeys, MIN_KDF, type KdfParams } from '../protocol/kdf.js';
import { envelopeAad, openEnvelope, sealEnvelope } from '../protocol/envelope.js';
import { sealAad, verifierInput } from '../protocol/record.js';
import { descriptorBytes, descriptorDigest, vaultIdOf, verifyDescriptor, type Descriptor } from '../protocol/descriptor.js';
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
  type Direction,
} from '../protocol/channel.js';
import { mintToken, tenantSecretInput } from '../vault/rpc/auth.js';
import { passwordBytes } from '../client/protocol.js';

// ---- fixed inputs -------------------------------------------------------------

const VAULT_INPUTS = {
  /** HSM `bkv.sig` private key (software stand-in). The RFC 6979 A.2.5 P-256 test key. */
  sigSecret: 'c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721',
  /** HSM `bkv.oprf` private key k. */
  oprfKey: '2b5f6e1a9c3d7e8f0a1b2c3d4e5f60718293a4b5c6d7e8f9011223344556677a',
  /** HSM `bkv.kx` private key (channel). */
  kxSecret: '5e7a1c0f3b9d2e4a6c8b0d1f2e3a4b5c6d7e8f90a1b2c3d4e5f6071829304152',
  /** HSM `bkv.verifier` generic secret (CKM_SHA256_HMAC). */
  verifierKey: '76657269666965722d6b65792d666f722d746573742d766563746f72732d3031',
  /** HSM `bkv.seal.000001` AES-256 key (CKM_AES_GCM). */
  sealKey: '7365616c2d6b65792d65706f63682d312d666f722d746573742d766563746f72',
  /** HSM `bkv.tenant` generic secret (CKM_SHA256_HMAC). */
  tenantKey: '74656e616e742d6b65792d666f722d746573742d766563746f72732d2d2d2d31',
  epoch: 1,
  attemptLimit: 10,
  kdfFloor: MIN_KDF,
};

interface CaseInputs {
  name: string;
  userId: string;
  password: string;
  r: string;
  kdf: KdfParams;
  backupKey: string;
  envelopeNonce: string;
  generation: number;
  /** IV the HSM would draw with C_GenerateRandom for the seal. */
  sealIv: string;
}

const CASES: CaseInputs[] = [
  {
    name: 'ascii',
    userId: 'alice@example.com',
    password: 'correct horse battery staple',
    r: '3f6a1e0c9b2d4f8e7a6c5b4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f',
    kdf: { alg: 'argon2id', m: 64, t: 1, p: 1 },
    backupKey: '000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f',
    envelopeNonce: '0a0b0c0d0e0f101112131415',
    generation: 1,
    sealIv: 'a0a1a2a3a4a5a6a7a8a9aaab',
  },
  {
    name: 'non-ascii',
    // NFC user id: é (U+00E9), CJK, and an astral-plane emoji.
    userId: 'zoé.用户.\u{1F511}',
    // Typed in NFD (e + U+0301, u + U+0308): the client normalises it to NFC before hashing.
    // U+FB01 (ﬁ) and U+00B2 (²) are left alone by NFC (NFKC would change them).
    password: 'Mot de passe: cafe\u0301 u\u0308ber \uFB01\u00B2',
    // Chosen so that k·B has an even y (case "ascii" has an odd one): both signs of lift_x are covered.
    r: '7c0ffee000000000000000000000000000000000000000000000000000000001',
    kdf: { alg: 'argon2id', m: 256, t: 2, p: 1 },
    backupKey: 'f0e1d2c3b4a5968778695a4b3c2d1e0ffedcba98765432100123456789abcdef',
    envelopeNonce: 'ffeeddccbbaa998877665544',
    generation: 3,
    sealIv: 'b0b1b2b3b4b5b6b7b8b9babb',
  },
];

const CHANNEL_INPUTS = {
  /** Client ephemeral secret e. */
  e: '1d4a7c2b9e8f0a3b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7081',
  /** The channel carries case 0 ("ascii"): a whole recovery, two round trips. */
  case: 0,
  requestTs: [1764198000000, 1764198001250],
};

const TENANT_INPUTS = { name: 'acme', version: 1, now: 1764198000000, ttlSec: 3600, sub: 'backend-7' };

// ---- helpers --------------------------------------------------------------------

const hex = (b: Uint8Array): string => toHex(b);
const scalar = (h: string): bigint => BigInt('0x' + h);

function check(ok: boolean, what: string): void {
  if (!ok) throw new Error(`vector self-check failed: ${what}`);
}

function hmac(key: Uint8Array, data: Uint8Array): Uint8Array {
  return new Uint8Array(createHmac('sha256', key).update(data).digest());
}

/** What the HSM's C_Encrypt(CKM_AES_GCM) plus the vault's framing produce: iv ‖ ct ‖ tag. */
function gcmSeal(key: Uint8Array, iv: Uint8Array, aad: Uint8Array, pt: Uint8Array): Uint8Array {
  const c = createCipheriv('aes-256-gcm', key, iv);
  c.setAAD(aad);
  return concat(iv, c.update(pt), c.final(), c.getAuthTag());
}

const Point = p256.Point;

// ---- vault ------------------------------------------------------------------------

const sigSecret = fromHex(VAULT_INPUTS.sigSecret);
const sigPublic = p256.getPublicKey(sigSecret, false);
const kxSecret = fromHex(VAULT_INPUTS.kxSecret);
const kxPublic = p256.getPublicKey(kxSecret, false);
const k = scalar(VAULT_INPUTS.oprfKey);
const oprfPublic = Point.BASE.multiply(k).toBytes(false);
const vaultId = vaultIdOf(sigPublic);

const descriptor: Descriptor = {
  version: PROTOCOL_VERSION,
  vaultId,
  channelKey: kxPublic,
  epoch: VAULT_INPUTS.epoch,
  attemptLimit: VAULT_INPUTS.attemptLimit,
  kdfFloor: VAULT_INPUTS.kdfFloor,
};
const dBytes = descriptorBytes(descriptor);
const dDigest = descriptorDigest(descriptor);
// The HSM signs with a random nonce; here RFC 6979 so the vector is reproducible. Either is accepted.
const signature = p256.sign(dDigest, sigSecret, { prehash: false, format: 'compact', lowS: true });
const sig = p256.Signature.fromBytes(signature, 'compact');
const highS = new p256.Signature(sig.r, Point.Fn.ORDER - sig.s).toBytes('compact');
verifyDescriptor({ ...descriptor, signature }, sigPublic);
verifyDescriptor({ ...descriptor, signature: highS }, sigPublic);

// ---- client + vault, per case -------------------------------------------------------

const verifierKey = fromHex(VAULT_INPUTS.verifierKey);
const sealKey = fromHex(VAULT_INPUTS.sealKey);

async function runCase(c: CaseInputs) {
  check(c.userId === c.userId.normalize('NFC'), 'user ids are NFC');
  const pw = passwordBytes(c.password);
  const input = oprfInput(vaultId, c.userId, pw);
  const H = hashToGroup(input);
  const { blinded } = blind(input, scalar(c.r));
  // Vault: X = x(k·B); the HSM would compute the same with CKM_ECDH1_DERIVE + CKD_NULL.
  const kB = Point.fromBytes(blinded).multiply(k);
  const evaluated = evaluateReference(k, blinded);
  check(equalBytes(evaluated, kB.toBytes(true).slice(1)), 'evaluateReference is x(k·B)');
  // Client: y = x(k·H) (what finalize recovers after unblinding), oprfOut = SHA-256(frame(DST, input, y)).
  const unblindedX = evaluateReference(k, H.toBytes(false));
  const oprfOut = finalize(input, scalar(c.r), evaluated);
  check(equalBytes(oprfOut, sha256(frame(DST.oprfFinalize, input, unblindedX))), 'oprfOut = H(frame(DST, input, x(k·H)))');

  const salt = argon2Salt(vaultId, c.userId);
  const stretched = await argon2id({
    password: oprfOut,
    salt,
    parallelism: c.kdf.p,
    iterations: c.kdf.t,
    memorySize: c.kdf.m,
    hashLength: 32,
    outputType: 'binary',
  });
  const rwd = extract(sha256, concat(oprfOut, stretched), utf8(DST.rwd));
  const keys = await deriveClientKeys(oprfOut, c.kdf, vaultId, c.userId);
  check(equalBytes(keys.authKey, expand(sha256, rwd, utf8(DST.authKey), 32)), 'authKey = HKDF-Expand(rwd, DST.authKey)');
  check(equalBytes(keys.envKey, expand(sha256, rwd, utf8(DST.envKey), 32)), 'envKey = HKDF-Expand(rwd, DST.envKey)');

  const backupKey = fromHex(c.backupKey);
  const envelope = await sealEnvelope(keys.envKey, backupKey, vaultId, c.userId, fromHex(c.envelopeNonce));
  check(equalBytes(await openEnvelope(keys.envKey, envelope, vaultId, c.userId), backupKey), 'envelope opens');

  const vInput = verifierInput(vaultId, c.userId, c.generation, keys.authKey);
  const verifier = hmac(verifierKey, vInput);
  const sAad = sealAad(vaultId, c.userId, c.generation, VAULT_INPUTS.epoch, verifier);
  const sealed = gcmSeal(sealKey, fromHex(c.sealIv), sAad, envelope);

  return {
    name: c.name,
    inputs: {
      userId: c.userId,
      password: c.password,
      r: c.r,
      kdf: c.kdf,
      backupKey: c.backupKey,
      envelopeNonce: c.envelopeNonce,
      generation: c.generation,
      sealIv: c.sealIv,
    },
    outputs: {
      userIdUtf8: hex(utf8(c.userId)),
      passwordBytes: hex(pw),
      oprfInput: hex(input),
      H: hex(H.toBytes(false)),
      blinded: hex(blinded),
      kB: hex(kB.toBytes(false)),
      kBOddY: kB.toAffine().y % 2n === 1n,
      evaluated: hex(evaluated),
      unblindedX: hex(unblindedX),
      oprfOut: hex(oprfOut),
      argon2Salt: hex(salt),
      argon2Out: hex(stretched),
      rwd: hex(rwd),
      authKey: hex(keys.authKey),
      envKey: hex(keys.envKey),
      envelopeAad: hex(envelopeAad(vaultId, c.userId)),
      envelope: hex(envelope),
      verifierInput: hex(vInput),
      verifier: hex(verifier),
      sealAad: hex(sAad),
      sealed: hex(sealed),
    },
  };
}

// ---- channel --------------------------------------------------------------------------

interface MessageSpec {
  dir: Direction;
  counter: number;
  method: string;
  ts: number;
  body: unknown;
}

async function runChannel(cs: Awaited<ReturnType<typeof runCase>>) {
  const e = fromHex(CHANNEL_INPUTS.e);
  const hs = clientHandshake(kxPublic, e);
  // Vault side: x(kx·E), what C_DeriveKey(CKM_ECDH1_DERIVE) on bkv.kx returns.
  const zVault = p256.getSharedSecret(kxSecret, hs.ephemeral, true).slice(1);
  check(equalBytes(hs.z, zVault), 'both ends agree on Z');
  const keys = channelKeys(hs.z, hs.ephemeral, vaultId, kxPublic);
  const salt = sha256(frame(CHANNEL_DST.salt, vaultId, kxPublic));
  const prk = extract(sha256, hs.z, salt);
  check(equalBytes(keys.c2s, expand(sha256, prk, frame(CHANNEL_DST.c2s, hs.ephemeral), 32)), 'kC2S schedule');
  check(equalBytes(keys.s2c, expand(sha256, prk, frame(CHANNEL_DST.s2c, hs.ephemeral), 32)), 'kS2C schedule');
  check(equalBytes(keys.id, channelIdOf(hs.ephemeral)), 'channel id');

  const userId = cs.inputs.userId;
  const o = cs.outputs;
  const specs: MessageSpec[] = [
    { dir: 'c2s', counter: 0, method: 'recover.begin', ts: CHANNEL_INPUTS.requestTs[0]!, body: { blinded: toB64(fromHex(o.blinded)) } },
    {
      dir: 's2c',
      counter: 0,
      method: 'recover.begin',
      ts: 0,
      body: { ok: true, result: { evaluated: toB64(fromHex(o.evaluated)), kdf: cs.inputs.kdf, attemptsLeft: 9, attemptLimit: 10 } },
    },
    { dir: 'c2s', counter: 1, method: 'recover.finish', ts: CHANNEL_INPUTS.requestTs[1]!, body: { authKey: toB64(fromHex(o.authKey)) } },
    { dir: 's2c', counter: 1, method: 'recover.finish', ts: 0, body: { ok: true, result: { outcome: 'ok', envelope: toB64(fromHex(o.envelope)) } } },
  ];
  const messages = [];
  for (const m of specs) {
    const h = { dir: m.dir, channelId: keys.id, counter: m.counter, method: m.method, userId, ts: m.ts };
    const key = m.dir === 'c2s' ? keys.c2s : keys.s2c;
    const ct = await sealMessage(key, h, m.body);
    check(JSON.stringify(await openMessage(key, h, ct)) === JSON.stringify(m.body), 'message round trip');
    messages.push({
      dir: m.dir,
      counter: m.counter,
      method: m.method,
      ts: m.ts,
      bodyJson: JSON.stringify(m.body),
      aad: hex(messageAad(h)),
      nonce: hex(messageNonce(m.counter)),
      padded: hex(pad(m.body)),
      ciphertext: hex(ct),
    });
  }
  return {
    inputs: { e: CHANNEL_INPUTS.e, userId, case: cs.name },
    outputs: {
      ephemeral: hex(hs.ephemeral),
      z: hex(hs.z),
      channelId: hex(keys.id),
      salt: hex(salt),
      prk: hex(prk),
      kC2S: hex(keys.c2s),
      kS2C: hex(keys.s2c),
    },
    messages,
  };
}

// ---- tenant credential ----------------------------------------------------------------

function runTenant() {
  const input = tenantSecretInput(vaultId, TENANT_INPUTS.name, TENANT_INPUTS.version);
  const secret = hmac(fromHex(VAULT_INPUTS.tenantKey), input);
  const token = mintToken(secret, {
    tenant: TENANT_INPUTS.name,
    version: TENANT_INPUTS.version,
    vaultId,
    ttlSec: TENANT_INPUTS.ttlSec,
    now: TENANT_INPUTS.now,
    sub: TENANT_INPUTS.sub,
  });
  return { inputs: TENANT_INPUTS, outputs: { secretInput: hex(input), secret: hex(secret), token } };
}

// ---- output -------------------------------------------------------------------------------

async function main(): Promise<void> {
  const cases = [];
  for (const c of CASES) cases.push(await runCase(c));
  const channelCase = cases[CHANNEL_INPUTS.case]!;
  const out = {
    protocol: 'bkv-v1',
    version: PROTOCOL_VERSION,
    generator: 'scripts/gen-vectors.ts',
    spec: 'docs/PROTOCOL.md',
    encoding:
      'byte strings are lowercase hex; scalars are 32-byte big-endian hex; points are uncompressed SEC1 (65 bytes); ' +
      'strings are JSON strings (UTF-8 on the wire); HSM operations are played by software keys given under vault.inputs',
    dst: { ...DST, channel: { ...CHANNEL_DST } },
    constants: { padBucket: PAD_BUCKET, maxPlaintext: MAX_PLAINTEXT },
    vault: {
      inputs: VAULT_INPUTS,
      outputs: {
        sigPublic: hex(sigPublic),
        vaultId: hex(vaultId),
        oprfPublic: hex(oprfPublic),
        kxPublic: hex(kxPublic),
        descriptorBytes: hex(dBytes),
        descriptorDigest: hex(dDigest),
        signatureRfc6979: hex(signature),
        signatureHighS: hex(highS),
      },
    },
    cases,
    channel: await runChannel(channelCase),
    tenant: runTenant(),
  };
  process.stdout.write(JSON.stringify(out, null, 2) + '\n');
}

await main();
