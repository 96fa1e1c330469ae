// Protocol abuse over the real socket, from the relay's seat and from a
// malicious client's: replayed and reordered channel messages, a finish aimed
// at another user's session, sessions used after expiry, invalid curve points,
// reused keys, forged descriptors. Each is refused with its documented code,
// and every attempt is counted exactly where docs/PROTOCOL.md says.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { p256 } from '@noble/curves/nist.js';
import { startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { TEST_KDF } from '../helpers/vault.js';
import { LeakScan, advConfig, RawChannel as SharedRawChannel, RecordingTransport, codeOf, pinnedKeyOf, stateDigest } from '../helpers/adversarial.js';
import { VaultClient, decodeDescriptor } from '../../client/sdk.js';
import type { Transport } from '../../client/transport.js';
import { finishOprf, enrollPayload, startOprf, type PendingOprf } from '../../client/protocol.js';
import { channelIdOf } from '../../protocol/channel.js';
import { descriptorDigest, vaultIdOf, verifyDescriptor, type Descriptor } from '../../protocol/descriptor.js';
import { fromB64, toB64 } from '../../protocol/bytes.js';
import { ErrorCodes } from '../../protocol/errors.js';
import type { KdfParams } from '../../protocol/kdf.js';

const TTL_SEC = 5;
let d: RunningDaemon;
let desc: Descriptor;
let pinned: Uint8Array;
const wire: string[] = [];
const leaks = new LeakScan();
let t: RecordingTransport;
let sdk: VaultClient;

beforeAll(async () => {
  // Short sessions so expiry can be observed in seconds; everything else as in production tests.
  d = await startDaemon({ config: advConfig({ vault: { sessionTtlSec: TTL_SEC } }) });
  pinned = pinnedKeyOf(d);
  t = new RecordingTransport(d.url, d.token, wire);
  sdk = new VaultClient({ transport: t, pinnedKey: pinned, kdf: TEST_KDF, maxRetries: 0 });
  desc = await sdk.descriptor();
  leaks.text('wire', () => wire);
  leaks.daemon(d);
});

afterAll(async () => {
  t?.close();
  await d?.cleanup();
});

/** The shared raw channel, bound to this file's vault and (restartable) transport. */
class RawChannel extends SharedRawChannel {
  constructor(userId: string, e?: Uint8Array) {
    super(desc, () => t, userId, e);
  }
}

const passwords = new Map<string, string>();
async function enrolled(userId: string): Promise<string> {
  const pw = `proto-${userId}-${randomBytes(5).toString('hex')}`;
  const k = new Uint8Array(randomBytes(32));
  passwords.set(userId, pw);
  leaks.secret(`password of ${userId}`, pw);
  leaks.secret(`K of ${userId}`, k);
  await sdk.enrollPassword(userId, pw, k);
  return pw;
}

/** recover.begin on a raw channel; returns what the finish needs. */
async function begin(ch: RawChannel, password: string, n = 0) {
  const oprf = startOprf(desc.vaultId, ch.userId, password);
  const r = await ch.send('recover.begin', { blinded: toB64(oprf.blinded) }, n);
  if (!r.ok) return { r };
  const keys = await finishOprf(oprf, fromB64(r.result!.evaluated as string)!, r.result!.kdf as KdfParams);
  leaks.secret(`authKey of ${ch.userId}`, keys.authKey);
  leaks.secret(`envKey of ${ch.userId}`, keys.envKey);
  return { r, oprf, keys };
}

const left = async (u: string) => (await sdk.status(u)).attemptsLeft;

describe('replayed and reordered channel messages', () => {
  it('a replay is REPLAY, a message ahead is OUT_OF_ORDER, a reordered ciphertext is DECRYPT_FAILED; one attempt counted', async () => {
    const pw = await enrolled('pa-ann');
    const ch = new RawChannel('pa-ann');
    const oprf = startOprf(desc.vaultId, 'pa-ann', pw);
    const p0 = await ch.params('recover.begin', { blinded: toB64(oprf.blinded) }, 0);
    // A message for n = 1 before the channel exists: unknown channel, nothing stored, the client may resend later.
    expect((await ch.send('recover.finish', { authKey: toB64(new Uint8Array(32)) }, 1)).outer).toBe(ErrorCodes.SESSION_NOT_FOUND);
    const b = await ch.deliver('recover.begin', p0, 0);
    expect(b.ok).toBe(true);
    expect(b.result!.attemptsLeft).toBe(9);
    expect(await left('pa-ann')).toBe(9);
    // The same handshake again (a relay replaying it): REPLAY, and the attempt is not counted twice.
    expect((await ch.deliver('recover.begin', p0, 0)).outer).toBe(ErrorCodes.REPLAY);
    expect(await left('pa-ann')).toBe(9);
    const keys = await finishOprf(oprf, fromB64(b.result!.evaluated as string)!, b.result!.kdf as KdfParams);
    leaks.secret('authKey of pa-ann', keys.authKey);
    const authKey = toB64(keys.authKey);
    // Ahead of the counter: OUT_OF_ORDER, nothing spent.
    expect((await ch.send('recover.finish', { authKey }, 2)).outer).toBe(ErrorCodes.OUT_OF_ORDER);
    // A ciphertext sealed for counter 2 presented as counter 1 (reordered by the relay): does not authenticate.
    const at2 = await ch.params('recover.finish', { authKey }, 2);
    expect((await ch.deliver('recover.finish', { ...at2, channel: { ...at2.channel, n: 1 } }, 1)).outer).toBe(ErrorCodes.DECRYPT_FAILED);
    // A finish sealed as another method (method is in the AAD).
    const asEnroll = await ch.params('enroll.finish', { authKey }, 1);
    expect((await ch.deliver('recover.finish', asEnroll, 1)).outer).toBe(ErrorCodes.DECRYPT_FAILED);
    expect(await left('pa-ann')).toBe(9);
    // The channel is still usable: the right finish for n = 1.
    const f = await ch.send('recover.finish', { authKey }, 1);
    expect(f).toMatchObject({ ok: true, result: { outcome: 'ok' } });
    expect(await left('pa-ann')).toBe(10);
    // Every earlier message replayed after the fact: REPLAY, and no state change.
    const before = stateDigest(join(d.dataDir, 'vault.db'));
    expect((await ch.deliver('recover.begin', p0, 0)).outer).toBe(ErrorCodes.REPLAY);
    // REPLAY while the channel lives, SESSION_EXPIRED once the finish closed it: refused either way.
    expect([ErrorCodes.REPLAY, ErrorCodes.SESSION_EXPIRED]).toContain((await ch.send('recover.finish', { authKey }, 1)).outer);
    expect(stateDigest(join(d.dataDir, 'vault.db'))).toEqual(before);
  });

  it('a wrong-password finish replayed on a fresh channel cannot be re-counted or re-tried', async () => {
    await enrolled('pa-abe');
    const ch = new RawChannel('pa-abe');
    const g = await begin(ch, 'not the password');
    const fin = await ch.params('recover.finish', { authKey: toB64(g.keys!.authKey) }, 1);
    expect(await ch.deliver('recover.finish', fin, 1)).toMatchObject({ ok: true, result: { outcome: 'wrong-password', attemptsLeft: 9 } });
    // The channel is done: its finish replayed is refused outside the channel; no second verification happens.
    expect((await ch.deliver('recover.finish', fin, 1)).outer).toBe(ErrorCodes.SESSION_EXPIRED);
    expect(await left('pa-abe')).toBe(9);
  });
});

describe("a finish aimed at another user's session", () => {
  it('is refused (BAD_REQUEST outside, DECRYPT_FAILED if re-sealed), and the victim finishes normally', async () => {
    const benPw = await enrolled('pa-ben');
    await enrolled('pa-cat');
    const victim = new RawChannel('pa-ben');
    const vb = await begin(victim, benPw);
    const attacker = new RawChannel('pa-cat');
    const ab = await begin(attacker, 'cat guesses');
    expect(await left('pa-ben')).toBe(9);
    expect(await left('pa-cat')).toBe(9);
    // The attacker's own finish, relayed onto the victim's channel id.
    const own = await attacker.params('recover.finish', { authKey: toB64(ab.keys!.authKey) }, 1);
    const hijack = { ...own, channel: { ...own.channel, id: victim.id } };
    expect((await attacker.deliver('recover.finish', hijack, 1)).outer).toBe(ErrorCodes.BAD_REQUEST); // channel belongs to another user
    expect((await attacker.deliver('recover.finish', { ...hijack, userId: 'pa-ben' }, 1)).outer).toBe(ErrorCodes.DECRYPT_FAILED);
    // The attacker's channel re-labelled with the victim's user id.
    expect((await attacker.deliver('recover.finish', { ...own, userId: 'pa-ben' }, 1)).outer).toBe(ErrorCodes.BAD_REQUEST);
    // A guess sealed under the attacker's channel for the victim's user id cannot open any channel of the victim.
    const forged = new RawChannel('pa-ben', attacker.e);
    const fp = await forged.params('recover.finish', { authKey: toB64(ab.keys!.authKey) }, 1);
    expect((await forged.deliver('recover.finish', fp, 1)).outer).toBe(ErrorCodes.BAD_REQUEST);
    expect(await left('pa-ben')).toBe(9);
    // Nothing above touched the victim's session.
    expect(await victim.send('recover.finish', { authKey: toB64(vb.keys!.authKey) }, 1)).toMatchObject({ ok: true, result: { outcome: 'ok' } });
    expect(await left('pa-ben')).toBe(10);
    // The attacker's own guess stays counted (spent at its begin) until it finishes or expires.
    expect(await left('pa-cat')).toBe(9);
  });

  it('in the core, an enrolment session of one user cannot finish another user', async () => {
    // (The core's recovery session id never leaves the vault: the channel holds it. Enrolment shows the check.)
    const ch = new RawChannel('pa-new1');
    const oprf = startOprf(desc.vaultId, 'pa-new1', 'pw-new1-xx');
    const b = await ch.send('enroll.begin', { blinded: toB64(oprf.blinded) }, 0);
    expect(b.ok).toBe(true);
    const payload = await enrollPayload(oprf, fromB64(b.result!.evaluated as string)!, TEST_KDF, new Uint8Array(32).fill(9));
    leaks.secret('authKey of pa-new1', payload.authKey);
    // Sealed for another user: the AAD names pa-new1, the relay says pa-new2.
    const p = await ch.params('enroll.finish', { authKey: toB64(payload.authKey), envelope: toB64(payload.envelope), kdf: payload.kdf }, 1);
    expect((await ch.deliver('enroll.finish', { ...p, userId: 'pa-new2' }, 1)).outer).toBe(ErrorCodes.BAD_REQUEST);
    expect((await sdk.status('pa-new2')).state).toBe('absent');
    expect((await ch.deliver('enroll.finish', p, 1)).ok).toBe(true);
    expect((await sdk.status('pa-new1')).state).toBe('active');
  });
});

describe('sessions used after expiry', () => {
  it('a late finish is SESSION_EXPIRED and its attempt stays spent; abandoned guesses at the limit destroy the record', async () => {
    const pw = await enrolled('pa-dan');
    await enrolled('pa-eve');
    const ch = new RawChannel('pa-dan');
    const g = await begin(ch, pw);
    expect(await left('pa-dan')).toBe(9);
    // Ten begins for pa-eve that never finish: every attempt spent, the record kept while they are pending.
    for (let i = 0; i < 10; i++) expect((await begin(new RawChannel('pa-eve'), `eve-${i}`)).r.ok).toBe(true);
    expect((await begin(new RawChannel('pa-eve'), 'one more')).r).toMatchObject({ ok: false, code: ErrorCodes.LOCKED });
    expect(await sdk.status('pa-eve')).toMatchObject({ state: 'active', attemptsLeft: 0 });
    await new Promise((r) => setTimeout(r, TTL_SEC * 1000 + 2_500)); // expiry + one sweeper tick
    expect((await ch.send('recover.finish', { authKey: toB64(g.keys!.authKey) }, 1)).outer).toBe(ErrorCodes.SESSION_EXPIRED);
    expect(await sdk.status('pa-dan')).toMatchObject({ state: 'active', attemptsLeft: 9 });
    expect((await sdk.status('pa-eve')).state).toBe('locked');
    await expect(sdk.recoverWithPassword('pa-eve', passwords.get('pa-eve')!)).rejects.toMatchObject({ code: ErrorCodes.LOCKED });
  }, 30_000);
});

describe('invalid, identity, small-order and off-curve points', () => {
  const P = p256.Point;
  const good = P.BASE.multiply(123456789n).toBytes(false);
  const be32 = (n: bigint) => Buffer.from(n.toString(16).padStart(64, '0'), 'hex');
  const offCurve = new Uint8Array(good);
  offCurve[64]! ^= 1;
  const cases: [string, Uint8Array, string][] = [
    ['identity (0x04 ‖ 0…0)', new Uint8Array([4, ...new Uint8Array(64)]), ErrorCodes.INVALID_POINT],
    ['all zeros', new Uint8Array(65), ErrorCodes.INVALID_POINT],
    ['off-curve (y flipped)', offCurve, ErrorCodes.INVALID_POINT],
    ['small order on an invalid curve (x, 0)', new Uint8Array([4, ...be32(3n), ...new Uint8Array(32)]), ErrorCodes.INVALID_POINT],
    ['x not reduced (x + p)', new Uint8Array([4, ...be32(BigInt('0x' + Buffer.from(good.slice(1, 33)).toString('hex')) + P.Fp.ORDER).subarray(-32), ...good.slice(33)]), ErrorCodes.INVALID_POINT],
    ['hybrid encoding 0x06', new Uint8Array([6, ...good.slice(1)]), ErrorCodes.INVALID_POINT],
    ['compressed (33 bytes)', new Uint8Array([2, ...good.slice(1, 33)]), ErrorCodes.INVALID_LENGTH],
    ['the point at infinity as one byte', new Uint8Array([0]), ErrorCodes.INVALID_LENGTH],
  ];

  it('as the blinded element: refused inside the channel, no attempt spent, the channel stays at its step', async () => {
    const pw = await enrolled('pa-fay');
    const db = join(d.dataDir, 'vault.db');
    const before = stateDigest(db);
    const ch = new RawChannel('pa-fay');
    let n = 0;
    for (const [name, pt, code] of cases) {
      const r = await ch.send('recover.begin', { blinded: toB64(pt) }, n++);
      expect(r, name).toMatchObject({ ok: false, code });
      const e = await ch.send('enroll.begin', { blinded: toB64(pt) }, n++);
      // enroll.begin on an active record is RECORD_EXISTS only after the point passed; here the point fails first.
      expect(e, name).toMatchObject({ ok: false, code });
    }
    expect(stateDigest(db)).toEqual(before);
    expect(await left('pa-fay')).toBe(10);
    // Same channel, next counter: a valid begin still works (a refused step leaves the step unchanged).
    const ok = await begin(ch, pw, n);
    expect(ok.r.ok).toBe(true);
    expect(await left('pa-fay')).toBe(9);
    // For a fresh user, no record is created by an invalid point.
    const fresh = new RawChannel('pa-nobody');
    expect(await fresh.send('enroll.begin', { blinded: toB64(cases[0]![1]) }, 0)).toMatchObject({ ok: false, code: ErrorCodes.INVALID_POINT });
    expect((await sdk.status('pa-nobody')).state).toBe('absent');
  });

  it('as the channel key (epk): refused before the HSM with INVALID_POINT (or BAD_REQUEST for a wrong size)', async () => {
    const db = join(d.dataDir, 'vault.db');
    const before = stateDigest(db);
    const ch = new RawChannel('pa-fay');
    for (const [name, pt] of cases) {
      const p = await ch.params('recover.begin', { blinded: toB64(good) }, 0);
      const forged = { ...p, channel: { ...p.channel, epk: toB64(pt), id: toB64(channelIdOf(pt)) } };
      expect((await ch.deliver('recover.begin', forged, 0)).outer, name).toBe(pt.length === 65 ? ErrorCodes.INVALID_POINT : ErrorCodes.BAD_REQUEST);
    }
    expect(stateDigest(db)).toEqual(before);
  });
});

describe('a client key reused across sessions', () => {
  it('the same ephemeral key cannot open a second channel (REPLAY), live or closed', async () => {
    const pw = await enrolled('pa-gus');
    const first = new RawChannel('pa-gus');
    const g = await begin(first, pw);
    // While the first channel is live: another session with the same key (same channel id) is a replay.
    const twin = new RawChannel('pa-gus', first.e);
    expect((await begin(twin, pw)).r.outer).toBe(ErrorCodes.REPLAY);
    expect(await left('pa-gus')).toBe(9);
    expect(await first.send('recover.finish', { authKey: toB64(g.keys!.authKey) }, 1)).toMatchObject({ ok: true });
    // ...and after it is done (and after its owner's password change flow could have used it).
    expect((await begin(new RawChannel('pa-gus', first.e), pw)).r.outer).toBe(ErrorCodes.REPLAY);
    // The same key for another user: another AAD, but the same channel id, so still REPLAY.
    await enrolled('pa-hal');
    expect((await begin(new RawChannel('pa-hal', first.e), 'x')).r.outer).toBe(ErrorCodes.REPLAY);
    expect(await left('pa-gus')).toBe(10);
    expect(await left('pa-hal')).toBe(10);
  });

  it('the same blinded element on two channels is two counted guesses (the vault cannot tell, and must not refund)', async () => {
    const pw = await enrolled('pa-ivy');
    const oprf: PendingOprf = startOprf(desc.vaultId, 'pa-ivy', pw);
    const a = await new RawChannel('pa-ivy').send('recover.begin', { blinded: toB64(oprf.blinded) }, 0);
    const b = await new RawChannel('pa-ivy').send('recover.begin', { blinded: toB64(oprf.blinded) }, 0);
    expect([a.result!.attemptsLeft, b.result!.attemptsLeft].sort()).toEqual([8, 9]);
    // Deterministic evaluation: both answers are the same x(k·B).
    expect(a.result!.evaluated).toBe(b.result!.evaluated);
    expect(await left('pa-ivy')).toBe(8);
  });
});

describe('a descriptor signed by another key', () => {
  /** A relay that rewrites vault.descriptor answers and records what else it would have carried. */
  function forgingRelay(rewrite: (r: { descriptor: Record<string, unknown>; now: number }) => void): Transport & { channelCalls: number } {
    const inner = new RecordingTransport(d.url, d.token, wire);
    const relay = {
      channelCalls: 0,
      async call(method: string, params: object) {
        if (method !== 'vault.descriptor') relay.channelCalls++;
        const r = (await inner.call(method, params)) as { descriptor: Record<string, unknown>; now: number };
        if (method === 'vault.descriptor') rewrite(r);
        return r;
      },
      close: () => inner.close(),
    };
    return relay;
  }

  const attacker = p256.utils.randomSecretKey();
  const attackerKx = p256.getPublicKey(p256.utils.randomSecretKey(), false);
  const sign = (dsc: Descriptor, sk: Uint8Array) => p256.sign(descriptorDigest(dsc), sk, { prehash: false, lowS: false, format: 'compact' });

  const forgeries: [string, (r: { descriptor: Record<string, unknown> }) => void][] = [
    [
      "the attacker's channel key, signed by the attacker",
      (r) => {
        const dsc = { ...decodeDescriptor({ ...r, now: 0 }).descriptor, channelKey: attackerKx };
        r.descriptor.channelKey = toB64(attackerKx);
        r.descriptor.signature = toB64(sign(dsc, attacker));
      },
    ],
    [
      'a lower attempt limit under the genuine signature',
      (r) => {
        r.descriptor.attemptLimit = 1000;
      },
    ],
    [
      'a weaker KDF floor under the genuine signature',
      (r) => {
        r.descriptor.kdfFloor = { alg: 'argon2id', m: 8, t: 1, p: 1 };
      },
    ],
    [
      'a zero signature',
      (r) => {
        r.descriptor.signature = toB64(new Uint8Array(64));
      },
    ],
    [
      "another vault's id, signed by that vault's key",
      (r) => {
        const pub = p256.getPublicKey(attacker, false);
        const dsc = { ...decodeDescriptor({ ...r, now: 0 }).descriptor, vaultId: vaultIdOf(pub), channelKey: attackerKx };
        r.descriptor.vaultId = toB64(dsc.vaultId);
        r.descriptor.channelKey = toB64(attackerKx);
        r.descriptor.signature = toB64(sign(dsc, attacker));
      },
    ],
  ];

  it.each(forgeries)('%s: FORBIDDEN before any channel message is sent', async (_name, rewrite) => {
    const relay = forgingRelay(rewrite);
    const c = new VaultClient({ transport: relay, pinnedKey: pinned, kdf: TEST_KDF, maxRetries: 0 });
    expect(await codeOf(c.recoverWithPassword('pa-ann', passwords.get('pa-ann')!))).toBe(ErrorCodes.FORBIDDEN);
    expect(await codeOf(c.enrollPassword('pa-zed', 'pw-zed-zzz', new Uint8Array(32)))).toBe(ErrorCodes.FORBIDDEN);
    expect(relay.channelCalls).toBe(0);
    relay.close();
  });

  it('the genuine descriptor with its high-S twin signature is accepted (PKCS#11 does not normalise s)', async () => {
    const raw = (await t.call('vault.descriptor', {})) as { descriptor: Record<string, unknown>; now: number };
    const sig = fromB64(raw.descriptor.signature as string)!;
    const s = BigInt('0x' + Buffer.from(sig.slice(32)).toString('hex'));
    const twin = new Uint8Array(sig);
    twin.set(Buffer.from((p256.Point.Fn.ORDER - s).toString(16).padStart(64, '0'), 'hex'), 32);
    const dsc = decodeDescriptor({ ...raw, descriptor: { ...raw.descriptor, signature: toB64(twin) } }).descriptor;
    expect(verifyDescriptor(dsc, pinned).epoch).toBe(desc.epoch);
  });
});

describe('after a restart', () => {
  it('a handshake captured before the restart is STALE_MESSAGE (restart floor), not a fresh channel', async () => {
    const pw = await enrolled('pa-jon');
    const ch = new RawChannel('pa-jon');
    const oprf = startOprf(desc.vaultId, 'pa-jon', pw);
    const captured = await ch.params('recover.begin', { blinded: toB64(oprf.blinded) }, 0);
    expect((await ch.deliver('recover.begin', captured, 0)).ok).toBe(true);
    t.close();
    d = await d.restart();
    t = new RecordingTransport(d.url, d.token, wire);
    sdk = new VaultClient({ transport: t, pinnedKey: pinned, kdf: TEST_KDF, maxRetries: 0 });
    // The replay cache died with the old process; the restart floor still refuses the old handshake.
    expect((await ch.deliver('recover.begin', captured, 0)).outer).toBe(ErrorCodes.STALE_MESSAGE);
    expect(await left('pa-jon')).toBe(9);
    // The spent attempt stayed spent across the restart; a new recovery works.
    const k = await sdk.recoverWithPassword('pa-jon', pw);
    expect(k.length).toBe(32);
  }, 60_000);
});

describe('no leaks', () => {
  it('no password, K, authKey, envKey or PIN in the wire, the logs, the database or the audit log', () => {
    const r = leaks.scan();
    console.log(`protocol leak scan: ${r.secrets} secrets x ${r.places} places (${r.bytes} bytes)`);
    expect(r.secrets).toBeGreaterThan(30);
    expect(r.hits).toEqual([]);
  });
});
