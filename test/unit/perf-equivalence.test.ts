// The vault's fast paths must be the protocol, byte for byte:
// - vault/rpc/channel-node.ts (node:crypto) against channel.ts (WebCrypto),
// - the state hashes (state-hash.ts writes its frames in place) against the
//   framing spelled out with bytes.ts's frame(), as docs/PROTOCOL.md defines it.
import { describe, it, expect } from 'vitest';
import { createHash, randomBytes } from 'node:crypto';
import * as portable from '../../protocol/channel.js';
import * as fast from '../../vault/rpc/channel-node.js';
import { bucketHash, bucketOf, leafHash, type LeafFields } from '../../vault/core/state-hash.js';
import { concat, frame, u32be, u64be, utf8 } from '../../protocol/bytes.js';
import { ErrorCodes } from '../../protocol/errors.js';

const sha = (b: Uint8Array) => new Uint8Array(createHash('sha256').update(b).digest());
const opt = (b: Uint8Array | null) => (b ? concat(new Uint8Array([1]), b) : new Uint8Array([0]));

function referenceLeaf(r: LeafFields): Uint8Array {
  const kdf = r.kdf ? concat(utf8(r.kdf.alg), u32be(r.kdf.m), u32be(r.kdf.t), u32be(r.kdf.p)) : new Uint8Array(0);
  return sha(
    frame('bkv-v1-state-leaf', utf8(r.userId), utf8(r.state), u64be(r.generation), u32be(r.attempts), u32be(r.attemptLimit), opt(r.verifier), opt(r.sealed), u32be(r.sealEpoch ?? 0), kdf),
  );
}

describe('state hashes', () => {
  it('leaf, bucket and bucket index equal the frame() definition', () => {
    const users = ['alice', 'é', '用户', '😀x', 'a'.repeat(128)];
    for (let i = 0; i < 500; i++) {
      const r: LeafFields = {
        userId: `${users[i % users.length]}-${i}`,
        state: (['active', 'locked', 'deleted'] as const)[i % 3]!,
        generation: 1 + (i % 9) * 1_000_003,
        attempts: i % 11,
        attemptLimit: 1 + (i % 1000),
        verifier: i % 4 ? randomBytes(32) : null,
        sealed: i % 5 ? randomBytes(88) : null,
        sealEpoch: i % 3 ? i : null,
        kdf: i % 2 ? { alg: 'argon2id', m: 64 + i, t: 1 + (i % 4), p: 1 + (i % 3) } : null,
      };
      expect(Buffer.from(leafHash(r))).toEqual(Buffer.from(referenceLeaf(r)));
      const leaves = Array.from({ length: i % 6 }, () => new Uint8Array(randomBytes(32)));
      expect(Buffer.from(bucketHash(leaves))).toEqual(Buffer.from(sha(frame('bkv-v1-state-bucket', ...leaves))));
      const h = sha(utf8(r.userId));
      expect(bucketOf(r.userId)).toBe((h[0]! << 8) | h[1]!);
    }
  });
});

describe('channel AEAD on node:crypto', () => {
  const header = (n: number, dir: 'c2s' | 's2c' = 'c2s'): portable.MessageHeader => ({
    dir,
    channelId: new Uint8Array(randomBytes(16)),
    counter: n,
    method: 'recover.finish',
    userId: 'zoë',
    ts: dir === 'c2s' ? Date.now() : 0,
  });

  it('seals the same bytes and opens the other implementation’s messages', async () => {
    for (let n = 0; n < 20; n++) {
      const key = new Uint8Array(randomBytes(32));
      const h = header(n, n % 2 ? 's2c' : 'c2s');
      const body = { outcome: 'ok', envelope: 'x'.repeat(n * 30), n };
      const a = await portable.sealMessage(key, h, body);
      const b = await fast.sealMessage(key, h, body);
      expect(Buffer.from(b)).toEqual(Buffer.from(a));
      expect(await fast.openMessage(key, h, a)).toEqual(body);
      expect(await portable.openMessage(key, h, b)).toEqual(body);
    }
  });

  it('refuses what does not authenticate, as channel.ts does', async () => {
    const key = new Uint8Array(randomBytes(32));
    const h = header(3);
    const ct = await fast.sealMessage(key, h, { blinded: 'abc' });
    const flipped = new Uint8Array(ct);
    flipped[5]! ^= 1;
    for (const [k, hh, c] of [
      [key, h, flipped],
      [key, { ...h, counter: 4 }, ct],
      [key, { ...h, userId: 'zoe' }, ct],
      [new Uint8Array(32), h, ct],
      [key, h, ct.subarray(0, 10)],
      [key, h, new Uint8Array(5000)],
    ] as const) {
      await expect(fast.openMessage(k, hh, c)).rejects.toMatchObject({ code: ErrorCodes.DECRYPT_FAILED });
      await expect(portable.openMessage(k, hh, c)).rejects.toMatchObject({ code: ErrorCodes.DECRYPT_FAILED });
    }
  });
});
