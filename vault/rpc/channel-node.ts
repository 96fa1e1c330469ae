// The vault's side of the channel AEAD (channel.ts) on node:crypto. channel.ts
// is the portable definition (WebCrypto, shared with browser clients); on the
// vault WebCrypto's per-call overhead (algorithm normalisation, a key import
// and a thread-pool round trip per message) was the largest main-thread cost
// of a recovery: ~100 µs per message against ~5 µs here. Byte-for-byte the
// same construction (test/unit/perf-equivalence.test.ts checks it against channel.ts).
import { createCipheriv, createDecipheriv } from 'node:crypto';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { MAX_PLAINTEXT, messageAad, messageNonce, pad, unpad, type MessageHeader } from '../../protocol/channel.js';

const TAG = 16;

export async function sealMessage(key: Uint8Array, h: MessageHeader, body: unknown): Promise<Uint8Array> {
  const c = createCipheriv('aes-256-gcm', key, messageNonce(h.counter), { authTagLength: TAG });
  c.setAAD(messageAad(h));
  const out = Buffer.concat([c.update(pad(body)), c.final(), c.getAuthTag()]);
  return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
}

/** DECRYPT_FAILED for anything that does not authenticate under exactly this header. */
export async function openMessage(key: Uint8Array, h: MessageHeader, ct: Uint8Array): Promise<unknown> {
  if (ct.length < TAG || ct.length > MAX_PLAINTEXT + TAG) {
    throw new VaultError(ErrorCodes.DECRYPT_FAILED, 'channel message has an impossible length');
  }
  let pt: Buffer;
  try {
    const d = createDecipheriv('aes-256-gcm', key, messageNonce(h.counter), { authTagLength: TAG });
    d.setAAD(messageAad(h));
    d.setAuthTag(ct.subarray(ct.length - TAG));
    pt = Buffer.concat([d.update(ct.subarray(0, ct.length - TAG)), d.final()]);
  } catch {
    throw new VaultError(ErrorCodes.DECRYPT_FAILED, 'channel message does not authenticate');
  }
  return unpad(new Uint8Array(pt.buffer, pt.byteOffset, pt.byteLength));
}
