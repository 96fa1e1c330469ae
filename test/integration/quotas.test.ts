// Session capacity under floods (issue 14, finding 1), in the core: a real vault
// on a real SoftHSM2 token and a real SQLite file, driven directly. Before the
// fix, 100 000 unfinished enrolments filled the session table; a right-password
// recover.begin then committed its attempt and only after that was refused
// OVERLOADED ("retryable, nothing changed"), so ten honest retries destroyed
// the record without a password ever being compared.
import { describe, it, expect, afterEach, beforeAll, afterAll } from 'vitest';
import { randomBytes } from 'node:crypto';
import WebSocket from 'ws';
import { TEST_KDF, tempVault, type TestVault } from '../helpers/vault.js';
import { enroll, recover, beginOnly } from '../helpers/flows.js';
import { startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { adminApi } from '../helpers/admin-api.js';
import { RawChannel, RawSocket, advConfig, pinnedKeyOf, waitFor } from '../helpers/adversarial.js';
import { startOprf } from '../../client/protocol.js';
import { VaultClient } from '../../client/sdk.js';
import { WebSocketTransport } from '../../client/transport.js';
import { toB64 } from '../../protocol/bytes.js';
import { ChannelTable } from '../../vault/rpc/channels.js';
import { ChannelParams, parse } from '../../vault/rpc/wire.js';
import type { Descriptor } from '../../protocol/descriptor.js';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';
import type { CallerContext } from '../../vault/core/vault.js';

const A: CallerContext = { tenant: 'tenant-a' };
const B: CallerContext = { tenant: 'tenant-b' };
const key = () => new Uint8Array(randomBytes(32));

let t: TestVault | undefined;
afterEach(() => {
  t?.close();
  t = undefined;
});

/** The refusal a promise ends in (code and detail), or undefined if it succeeded. */
async function refusal(p: Promise<unknown>): Promise<VaultError | undefined> {
  try {
    await p;
    return undefined;
  } catch (e) {
    if (e instanceof VaultError) return e;
    throw e;
  }
}

/** Count the HSM's OPRF evaluations (the real call still runs). */
function countOprf(v: TestVault): { n: number } {
  const c = { n: 0 };
  const keys = v.vault.keys;
  const real = keys.oprfEvaluate.bind(keys);
  keys.oprfEvaluate = (b: Uint8Array) => {
    c.n++;
    return real(b);
  };
  return c;
}

// Ten times the default tenant quota (5 000). scripts/flood sends 200 000 at the real daemon.
const FLOOD = 50_000;

describe('a flood of unfinished enrolments (issue 14, finding 1)', () => {
  it('50 000 enroll.begin without finish from one tenant leave every other user recovering, no attempt spent by a refusal', async () => {
    t = await tempVault();
    const keyA = key();
    const keyB = key();
    await enroll(t.vault, 'a-user', 'pw-a', keyA, undefined, A);
    await enroll(t.vault, 'b-user', 'pw-b', keyB, undefined, B);
    const oprf = countOprf(t);
    const blinded = startOprf(t.vault.vaultId, 'flood', 'x').blinded;
    let accepted = 0;
    const refused = new Map<string, number>();
    let maxRetryAfter = 0;
    for (let i = 0; i < FLOOD; i++) {
      try {
        await t.vault.enrollBegin(A, `flood-${i}`, blinded);
        accepted++;
      } catch (e) {
        const err = e as VaultError;
        refused.set(err.code, (refused.get(err.code) ?? 0) + 1);
        maxRetryAfter = Math.max(maxRetryAfter, Number(err.detail?.retryAfterMs ?? 0));
      }
    }
    // Recoveries of the flooding tenant's other user and of another tenant's user: the right
    // password works, and the count shows no attempt was spent by anything but themselves.
    for (const [ctx, user, pw, k] of [[A, 'a-user', 'pw-a', keyA], [B, 'b-user', 'pw-b', keyB]] as const) {
      const r = await recover(t.vault, user, pw, ctx);
      expect(r.outcome).toBe('ok');
      expect(r.outcome === 'ok' && Buffer.from(r.key).equals(Buffer.from(k))).toBe(true);
      expect(t.vault.status(user)).toMatchObject({ state: 'active', attemptsLeft: 10 });
    }
    // The flood got the tenant's enrolment quota and no more; every refusal was RATE_LIMITED
    // with a retry hint, and came before any HSM work.
    const quota = t.vault.options.tenantEnrollments;
    expect(accepted).toBe(quota);
    expect([...refused]).toEqual([[ErrorCodes.RATE_LIMITED, FLOOD - quota]]);
    expect(maxRetryAfter).toBeGreaterThan(0);
    expect(maxRetryAfter).toBeLessThanOrEqual(t.vault.options.sessionTtlMs);
    expect(oprf.n).toBe(quota + 2);
    expect(t.vault.sessionStats()).toMatchObject({ enroll: quota, live: quota + 2 });
    expect(t.vault.tenantSessionStats('tenant-a')).toEqual({ held: quota + 1, enroll: quota });
    // The flood's sessions expire: their slots come back at once, without a sweep.
    t.clock.now += t.vault.options.sessionTtlMs + 1;
    expect((await t.vault.enrollBegin(A, 'late-user', blinded)).sessionId).toMatch(/^[\w-]{22}$/);
  }, 120_000);
});

describe('a full session table refuses before it counts', () => {
  it('OVERLOADED spends no attempt, however often it is retried, and expired sessions free their slots at once', async () => {
    t = await tempVault({ maxSessions: 8 });
    await enroll(t.vault, 'victim', 'pw-victim', key(), undefined, A);
    // Eight other users (another tenant) each with a recovery in flight: the table is full.
    for (let i = 0; i < 8; i++) {
      await enroll(t.vault, `filler-${i}`, 'pw', key(), undefined, B);
      await beginOnly(t.vault, `filler-${i}`, 'pw', B);
    }
    const answers: (VaultError | undefined)[] = [];
    for (let i = 0; i < 12; i++) answers.push(await refusal(recover(t.vault, 'victim', 'pw-victim', A)));
    expect(t.vault.status('victim')).toMatchObject({ state: 'active', attemptsLeft: 10 });
    expect(answers.map((e) => e?.code)).toEqual(Array(12).fill(ErrorCodes.OVERLOADED));
    for (const e of answers) expect(Number(e?.detail?.retryAfterMs)).toBeGreaterThan(0);
    // The fillers' sessions expire: their slots are free at once, without a sweep.
    t.clock.now += t.vault.options.sessionTtlMs + 1;
    expect((await recover(t.vault, 'victim', 'pw-victim', A)).outcome).toBe('ok');
    expect(t.vault.status('victim').attemptsLeft).toBe(10);
  });

  it('a late finish on an expired session says SESSION_EXPIRED, and expired ids are bounded', async () => {
    t = await tempVault({ maxSessions: 4 });
    await enroll(t.vault, 'u', 'pw', key(), undefined, A);
    const b = await beginOnly(t.vault, 'u', 'pw', A);
    t.clock.now += t.vault.options.sessionTtlMs + 1;
    // 40 more sessions come and go through a table of 4: the expired ones count against nothing.
    const blinded = startOprf(t.vault.vaultId, 'x', 'x').blinded;
    for (let round = 0; round < 10; round++) {
      for (let i = 0; i < 2; i++) await t.vault.enrollBegin(B, `e-${round}-${i}`, blinded);
      t.clock.now += t.vault.options.sessionTtlMs + 1;
    }
    expect(await refusal(t.vault.recoverFinish(A, b.sessionId, b.authKey)).then((e) => e?.code)).toBe(ErrorCodes.SESSION_NOT_FOUND);
    const s = t.vault.sessionStats();
    expect(s.held).toBe(0);
    expect(s.tombstones).toBeLessThanOrEqual(4);
    // Within the bound, a late finish hears that its session expired.
    const c = await beginOnly(t.vault, 'u', 'pw', A);
    t.clock.now += t.vault.options.sessionTtlMs + 1;
    await t.vault.enrollBegin(B, 'another', blinded);
    expect(await refusal(t.vault.recoverFinish(A, c.sessionId, c.authKey)).then((e) => e?.code)).toBe(ErrorCodes.SESSION_EXPIRED);
  });

  it('a right password at a full table still gets its grant: nothing refuses after the commit', async () => {
    t = await tempVault({ maxSessions: 4 });
    await enroll(t.vault, 'victim', 'pw-victim', key(), undefined, A);
    for (let i = 0; i < 4; i++) await enroll(t.vault, `filler-${i}`, 'pw', key(), undefined, B);
    const b = await beginOnly(t.vault, 'victim', 'pw-victim', A);
    const fillers = [];
    for (let i = 0; i < 3; i++) fillers.push(await beginOnly(t.vault, `filler-${i}`, 'pw', B));
    // The finish runs while another begin races for the slot the finish is about to give up.
    const finish = t.vault.recoverFinish(A, b.sessionId, b.authKey);
    const racer = refusal(beginOnly(t.vault, 'filler-3', 'pw', B));
    const r = await finish;
    expect(r.outcome).toBe('ok');
    expect((await racer)?.code).toBe(ErrorCodes.OVERLOADED);
    expect(t.vault.status('filler-3').attemptsLeft).toBe(10);
    // The grant holds the recovery's slot, and works: one filler gives its slot up (a wrong
    // password), and the victim changes its password with the grant.
    expect(t.vault.sessionStats().held).toBe(4);
    expect((await t.vault.recoverFinish(B, fillers[0]!.sessionId, new Uint8Array(32))).outcome).toBe('wrong-password');
    const grant = r.outcome === 'ok' ? r.grant : '';
    const k2 = key();
    await enroll(t.vault, 'victim', 'pw-new', k2, grant, A);
    const again = await recover(t.vault, 'victim', 'pw-new', A);
    expect(again.outcome === 'ok' && Buffer.from(again.key).equals(Buffer.from(k2))).toBe(true);
  });
});

describe('per-tenant quotas', () => {
  it('a tenant at its session quota is RATE_LIMITED with a retry hint; other tenants and its counted attempts are untouched', async () => {
    t = await tempVault({ tenantSessions: 3, tenantEnrollments: 1 });
    for (let i = 0; i < 5; i++) await enroll(t.vault, `u${i}`, 'pw', key(), undefined, A);
    await enroll(t.vault, 'b-user', 'pw', key(), undefined, B);
    for (let i = 0; i < 3; i++) await beginOnly(t.vault, `u${i}`, 'pw', A);
    const e = await refusal(beginOnly(t.vault, 'u3', 'pw', A));
    expect(t.vault.status('u3').attemptsLeft).toBe(10);
    expect(e?.code).toBe(ErrorCodes.RATE_LIMITED);
    expect(Number(e?.detail?.retryAfterMs)).toBeGreaterThan(0);
    expect(Number(e?.detail?.retryAfterMs)).toBeLessThanOrEqual(t.vault.options.sessionTtlMs + 1);
    expect(t.vault.status('u3').attemptsLeft).toBe(10);
    expect((await recover(t.vault, 'b-user', 'pw', B)).outcome).toBe('ok');
    // Enrolments have a quota of their own inside the tenant's.
    const blinded = startOprf(t.vault.vaultId, 'x', 'x').blinded;
    expect((await refusal(t.vault.enrollBegin(A, 'new-a', blinded)))?.code).toBe(ErrorCodes.RATE_LIMITED);
    await t.vault.enrollBegin(B, 'new-b', blinded);
    expect((await refusal(t.vault.enrollBegin(B, 'new-b2', blinded)))?.code).toBe(ErrorCodes.RATE_LIMITED);
    expect((await recover(t.vault, 'b-user', 'pw', B)).outcome).toBe('ok');
  });
});

describe('over the wire: the real daemon with two tenants', () => {
  // Small quotas so "just above the quota" is a few dozen handshakes.
  const LIMITS = { tenantEnrollments: 20, tenantSessions: 40, tenantChannels: 60, tenantConnections: 8 };
  let d: RunningDaemon | undefined;
  let desc: Descriptor;
  let pinned: Uint8Array;
  const transports: WebSocketTransport[] = [];
  const transport = (token: string) => {
    const tr = new WebSocketTransport({ url: d!.url, token });
    transports.push(tr);
    return tr;
  };
  const sdk = (token: string) => new VaultClient({ transport: transport(token), pinnedKey: pinned, kdf: TEST_KDF, maxRetries: 0 });

  beforeAll(async () => {
    d = await startDaemon({ config: advConfig({ limits: LIMITS }) });
    pinned = pinnedKeyOf(d);
    desc = await sdk(d.token).descriptor();
  });
  afterAll(async () => {
    for (const tr of transports) tr.close();
    await d?.cleanup();
  });

  it('unfinished enrolments just above the tenant quota leave its own users and another tenant recovering', async () => {
    const other = await (await adminApi(d!)).tenant('other');
    const keyA = key();
    const keyB = key();
    await sdk(d!.token).enrollPassword('a-user', 'pw-a', keyA);
    await sdk(other.token).enrollPassword('b-user', 'pw-b', keyB);
    // The flood: enroll.begin on 25 fresh channels, never finished.
    const flood = transport(d!.token);
    const answers = await Promise.all(
      Array.from({ length: LIMITS.tenantEnrollments + 5 }, async (_, i) => {
        const ch = new RawChannel(desc, () => flood, `flood-${i}`);
        const p = await ch.params('enroll.begin', { blinded: toB64(startOprf(desc.vaultId, `flood-${i}`, 'x').blinded) }, 0);
        try {
          await flood.call('enroll.begin', p);
          return 'ok';
        } catch (e) {
          const err = e as VaultError;
          // Refused before the HSM, outside the channel: retryable, with a hint.
          expect(err.detail).toMatchObject({ retryable: true });
          expect(Number(err.detail?.retryAfterMs)).toBeGreaterThan(0);
          return err.code;
        }
      }),
    );
    expect(answers.filter((a) => a === 'ok')).toHaveLength(LIMITS.tenantEnrollments);
    expect(answers.filter((a) => a !== 'ok')).toEqual(Array(5).fill(ErrorCodes.RATE_LIMITED));
    // The flooding tenant's other user and the other tenant's user recover with the right
    // password; nothing but their own recoveries touched their counters.
    expect(Buffer.from(await sdk(d!.token).recoverWithPassword('a-user', 'pw-a')).equals(Buffer.from(keyA))).toBe(true);
    expect(Buffer.from(await sdk(other.token).recoverWithPassword('b-user', 'pw-b')).equals(Buffer.from(keyB))).toBe(true);
    expect(await sdk(d!.token).status('a-user')).toMatchObject({ state: 'active', attemptsLeft: 10 });
    expect(await sdk(other.token).status('b-user')).toMatchObject({ state: 'active', attemptsLeft: 10 });
    // And the other tenant can still begin enrolments of its own.
    await sdk(other.token).enrollPassword('b-user-2', 'pw', key());
    flood.close();
  });

  it('a tenant at its connection quota gets 429 RATE_LIMITED at the upgrade; another tenant still connects', async () => {
    const third = await (await adminApi(d!)).tenant('third');
    const open: RawSocket[] = [];
    try {
      for (let i = 0; i < LIMITS.tenantConnections; i++) open.push(await RawSocket.open(d!.url, third.token));
      const refused = await upgradeStatus(d!.url, third.token);
      expect(refused).toEqual({ status: 429, code: ErrorCodes.RATE_LIMITED });
      expect((await upgradeStatus(d!.url, d!.token)).status).toBe(101);
      // One closes: its slot comes back.
      open.pop()!.close();
      expect(await waitFor(async () => (await upgradeStatus(d!.url, third.token)).status === 101, 5_000)).toBe(true);
    } finally {
      for (const s of open) s.close();
    }
  });
});

/** Try an upgrade: 101 when it opened (closed again at once), else the HTTP status and error code. */
function upgradeStatus(url: string, token: string): Promise<{ status: number; code?: string }> {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { headers: { authorization: `Bearer ${token}` } });
    ws.on('open', () => {
      ws.close();
      resolve({ status: 101 });
    });
    ws.on('unexpected-response', (_q, res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, code: (JSON.parse(body) as { error: { code: string } }).error.code }));
    });
    ws.on('error', () => {});
  });
}

describe('the channel table (vault/rpc/channels.ts), on a real vault', () => {
  async function table(limits: { maxChannels: number; tenantChannels: number; tenantEnrollChannels: number; tenantClosedChannels: number }) {
    t = await tempVault();
    const v = t.vault;
    const clock = t.clock;
    const channels = new ChannelTable(v, { ttlMs: 120_000, freshnessMs: 60_000, now: () => clock.now, ...limits });
    const desc = { vaultId: v.vaultId, channelKey: v.keys.channelPublic } as Descriptor;
    /** A handshake on a fresh channel; resolves with the outer refusal code, or 'open'. */
    const handshake = async (ctx: CallerContext, method: 'enroll.begin' | 'recover.begin', userId: string, ch = new RawChannel(desc, () => undefined as never, userId)) => {
      const p = await ch.params(method, { blinded: toB64(startOprf(v.vaultId, userId, 'x').blinded) }, 0, { ts: clock.now });
      try {
        await channels.handle(ctx, method, parse(ChannelParams, p));
        return 'open';
      } catch (e) {
        return (e as VaultError).code;
      }
    };
    return { channels, handshake, desc, clock };
  }

  it("one tenant's handshakes take neither another tenant's room nor its own recoveries' (enrolments have their own quota)", async () => {
    const { handshake } = await table({ maxChannels: 12, tenantChannels: 6, tenantEnrollChannels: 3, tenantClosedChannels: 100 });
    const got: string[] = [];
    for (let i = 0; i < 5; i++) got.push(await handshake(A, 'enroll.begin', `e${i}`));
    expect(got).toEqual(['open', 'open', 'open', ErrorCodes.RATE_LIMITED, ErrorCodes.RATE_LIMITED]);
    // Room is left for the tenant's recoveries, up to its channel quota, and no more.
    for (let i = 0; i < 3; i++) expect(await handshake(A, 'recover.begin', `r${i}`)).toBe('open');
    expect(await handshake(A, 'recover.begin', 'r3')).toBe(ErrorCodes.RATE_LIMITED);
    // Another tenant opens its own, up to the vault's total, which is OVERLOADED for all.
    for (let i = 0; i < 6; i++) expect(await handshake(B, 'recover.begin', `b${i}`)).toBe('open');
    expect(await handshake({ tenant: 'c' }, 'recover.begin', 'c0')).toBe(ErrorCodes.OVERLOADED);
  });

  it('closed channel ids are bounded per tenant, refused rather than forgotten early, and age out in O(what expired)', async () => {
    const { channels, handshake, clock } = await table({ maxChannels: 100, tenantChannels: 10, tenantEnrollChannels: 5, tenantClosedChannels: 4 });
    const opened: RawChannel[] = [];
    const desc = { vaultId: t!.vault.vaultId, channelKey: t!.vault.keys.channelPublic } as Descriptor;
    for (let i = 0; i < 4; i++) {
      const ch = new RawChannel(desc, () => undefined as never, `u${i}`);
      opened.push(ch);
      expect(await handshake(A, 'recover.begin', `u${i}`, ch)).toBe('open');
    }
    // They expire and close: four remembered ids, the tenant's bound.
    clock.now += 120_001;
    channels.sweep();
    expect(await handshake(A, 'recover.begin', 'next')).toBe(ErrorCodes.RATE_LIMITED);
    expect(channels.tenantStats('tenant-a')).toEqual({ open: 0, enroll: 0, spent: 4 });
    expect(await handshake(B, 'recover.begin', 'b')).toBe('open');
    // A remembered id is still a replay.
    expect(await handshake(A, 'recover.begin', 'u0', opened[0])).toBe(ErrorCodes.REPLAY);
    // Once their handshakes can no longer be fresh, the ids go, and the tenant opens again.
    clock.now += 61_001;
    channels.sweep();
    expect(channels.tenantStats('tenant-a').spent).toBe(0);
    expect(await handshake(A, 'recover.begin', 'next')).toBe('open');
  });
});
