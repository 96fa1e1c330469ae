// The end-to-end channel between a client and the vault, through an untrusted
// relay (the backend). The client picks an ephemeral P-256 key E; the shared
// secret Z = x(e·KX) is computed by the vault inside its HSM from the kx key
// named in the signed descriptor, so only the genuine vault can read or answer.
//
//   channelId = SHA-256(frame(DST.id, E))[0..16]
//   prk       = HKDF-Extract(salt = SHA-256(frame(DST.salt, vaultId, KX)), ikm = Z)
//   kC2S      = HKDF-Expand(prk, frame(DST.c2s, E), 32); kS2C likewise with DST.s2c
//   message n = AES-256-GCM(k_dir, nonce = 0x00000000 ‖ u64(n), pad(json),
//                           aad = frame(DST.aad, dir, channelId, u32(n), method, userId, u64(ts)))
//
// Counters are strict (request n is answered with response n), so a replayed,
// dropped or reordered message fails; method and user id are in the AAD, so
// the relay cannot re-route a message. Plaintexts are padded to 256-byte
// buckets so the relay cannot tell outcomes apart by size. Pure: no I/O.
import { p256 } from '@noble/curves/nist.js';
import { extract, expand } from '@noble/hashes/hkdf.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { VaultError, ErrorCodes } from './errors.js';
import { concat, frame, fromUtf8, u32be, u64be, utf8 } from './bytes.js';

export const CHANNEL_DST = {
  id: 'bkv-v1-channel-id',
  salt: 'bkv-v1-channel-salt',
  c2s: 'bkv-v1-channel-c2s',
  s2c: 'bkv-v1-channel-s2c',
  aad: 'bkv-v1-channel-aad',
} as const;

/** Plaintexts are padded to a multiple of this many bytes. */
export const PAD_BUCKET = 256;
/** Largest padded plaintext either side accepts. */
export const MAX_PLAINTEXT = 4096;

export type Direction = 'c2s' | 's2c';

export interface ChannelKeys {
  id: Uint8Array;
  c2s: Uint8Array;
  s2c: Uint8Array;
}

export function channelIdOf(ephemeral: Uint8Array): Uint8Array {
  return sha256(frame(CHANNEL_DST.id, ephemeral)).slice(0, 16);
}

/** Both ends derive the same keys from Z; the vault gets Z from its HSM. */
export function channelKeys(z: Uint8Array, ephemeral: Uint8Array, vaultId: Uint8Array, channelKey: Uint8Array): ChannelKeys {
  const prk = extract(sha256, z, sha256(frame(CHANNEL_DST.salt, vaultId, channelKey)));
  return {
    id: channelIdOf(ephemeral),
    c2s: expand(sha256, prk, frame(CHANNEL_DST.c2s, ephemeral), 32),
    s2c: expand(sha256, prk, frame(CHANNEL_DST.s2c, ephemeral), 32),
  };
}

/** Client side: a fresh ephemeral key and Z against the vault's channel key. `e` is fixed only by test vectors. */
export function clientHandshake(channelKey: Uint8Array, e?: Uint8Array): { ephemeral: Uint8Array; z: Uint8Array } {
  const secret = e ?? p256.utils.randomSecretKey();
  return {
    ephemeral: p256.getPublicKey(secret, false),
    z: p256.getSharedSecret(secret, channelKey, true).slice(1),
  };
}

export interface MessageHeader {
  dir: Direction;
  channelId: Uint8Array;
  counter: number;
  method: string;
  userId: string;
  /** Client clock (ms) of the request; 0 in responses. */
  ts: number;
}

export function messageAad(h: MessageHeader): Uint8Array {
  return frame(CHANNEL_DST.aad, h.dir, h.channelId, u32be(h.counter), h.method, utf8(h.userId), u64be(h.ts));
}

export function messageNonce(counter: number): Uint8Array {
  return concat(new Uint8Array(4), u64be(counter));
}

/** u16 length ‖ UTF-8 JSON ‖ zeros up to the next PAD_BUCKET multiple. */
export function pad(body: unknown): Uint8Array {
  const json = utf8(JSON.stringify(body));
  const size = Math.ceil((json.length + 2) / PAD_BUCKET) * PAD_BUCKET;
  if (size > MAX_PLAINTEXT) throw new VaultError(ErrorCodes.PAYLOAD_TOO_LARGE, `message body over ${MAX_PLAINTEXT - 2} bytes`);
  const out = new Uint8Array(size);
  out[0] = json.length >>> 8;
  out[1] = json.length & 0xff;
  out.set(json, 2);
  return out;
}

export function unpad(pt: Uint8Array): unknown {
  const n = pt.length >= 2 ? (pt[0]! << 8) | pt[1]! : -1;
  if (n < 0 || n + 2 > pt.length || pt.length % PAD_BUCKET !== 0) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, 'channel plaintext is not correctly padded');
  }
  try {
    return JSON.parse(fromUtf8(pt.subarray(2, 2 + n)));
  } catch {
    throw new VaultError(ErrorCodes.BAD_REQUEST, 'channel plaintext is not JSON');
  }
}

const subtle = globalThis.crypto.subtle;

export async function sealMessage(key: Uint8Array, h: MessageHeader, body: unknown): Promise<Uint8Array> {
  const k = await subtle.importKey('raw', key as BufferSource, 'AES-GCM', false, ['encrypt']);
  const ct = await subtle.encrypt(
    { name: 'AES-GCM', iv: messageNonce(h.counter) as BufferSource, additionalData: messageAad(h) as BufferSource, tagLength: 128 },
    k,
    pad(body) as BufferSource,
  );
  return new Uint8Array(ct);
}

/** DECRYPT_FAILED for anything that does not authenticate under exactly this header. */
export async function openMessage(key: Uint8Array, h: MessageHeader, ct: Uint8Array): Promise<unknown> {
  if (ct.length < 16 || ct.length > MAX_PLAINTEXT + 16) {
    throw new VaultError(ErrorCodes.DECRYPT_FAILED, 'channel message has an impossible length');
  }
  let pt: ArrayBuffer;
  try {
    const k = await subtle.importKey('raw', key as BufferSource, 'AES-GCM', false, ['decrypt']);
    pt = await subtle.decrypt(
      { name: 'AES-GCM', iv: messageNonce(h.counter) as BufferSource, additionalData: messageAad(h) as BufferSource, tagLength: 128 },
      k,
      ct as BufferSource,
    );
  } catch {
    throw new VaultError(ErrorCodes.DECRYPT_FAILED, 'channel message does not authenticate');
  }
  return unpad(new Uint8Array(pt));
}
