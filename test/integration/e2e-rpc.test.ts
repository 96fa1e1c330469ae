// The daemon over real sockets, seen from the relay's seat: what a backend
// can send, tamper with, replay and observe. Real daemon process, real
// SoftHSM2 token, real SQLite file.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { randomBytes } from 'node:crypto';
import { readVaultKey } from '../../client/cli.js';
import WebSocket from 'ws';
import { startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { VaultClient } from '../../client/sdk.js';
import { WebSocketTransport, type Transport } from '../../client/transport.js';
import { VaultError, ErrorCodes, ERRORS, JSONRPC_FRAMING, type ErrorCode } from '../../protocol/errors.js';
import { TEST_KDF } from '../helpers/vault.js';
import { codeOf } from '../helpers/codes.js';
import { RawChannel } from '../helpers/adversarial.js';
import { enrollPayload, finishOprf, startOprf } from '../../client/protocol.js';
import { channelIdOf } from '../../protocol/channel.js';
import { fromB64, toB64 } from '../../protocol/bytes.js';
import type { KdfParams } from '../../protocol/kdf.js';

let d: RunningDaemon;
let pinned: Uint8Array;

beforeAll(async () => {
  d = await startDaemon();
  pinned = readVaultKey(d.vaultKeyFile);
});
afterAll(async () => {
  await d?.cleanup();
});

/** A relay that records every frame it carries and may tamper with requests. */
class Relay implements Transport {
  readonly frames: string[] = [];
  tamper: ((method: string, params: Record<string, unknown>) => Record<string, unknown>) | undefined;
  readonly inner: WebSocketTransport;
  readonly sent: { method: string; params: Record<string, unknown> }[] = [];

  constructor(token = d.token) {
    this.inner = new WebSocketTransport({ url: d.url, token });
  }

  async call(method: string, params: object): Promise<unknown> {
    let p = params as Record<string, unknown>;
    if (this.tamper) p = this.tamper(method, structuredClone(p));
    this.sent.push({ method, params: p });
    this.frames.push(JSON.stringify({ method, params: p }));
    try {
      const r = await this.inner.call(method, p);
      this.frames.push(JSON.stringify(r));
      return r;
    } catch (e) {
      this.frames.push(JSON.stringify({ error: (e as VaultError).code, message: (e as Error).message }));
      throw e;
    }
  }

  close(): void {
    this.inner.close();
  }
}

function client(relay: Transport): VaultClient {
  return new VaultClient({ transport: relay, pinnedKey: pinned, kdf: TEST_KDF, maxRetries: 0 });
}

describe('authentication', () => {
  function upgrade(headers: Record<string, string>): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(d.url, { headers });
      ws.on('open', () => {
        ws.close();
        reject(new Error('connected without valid credentials'));
      });
      ws.on('unexpected-response', (_req, res) => {
        let body = '';
        res.on('data', (c: Buffer) => (body += c.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      });
      ws.on('error', () => {});
    });
  }

  it('an unauthenticated socket gets nothing but a 401 with UNAUTHENTICATED', async () => {
    const r = await upgrade({});
    expect(r.status).toBe(401);
    expect(JSON.parse(r.body).error.code).toBe('UNAUTHENTICATED');
  });

  it('a token with a forged signature, another algorithm or another audience is refused', async () => {
    const [h, b] = d.token.split('.');
    const forged = `${h}.${b}.${Buffer.alloc(32, 1).toString('base64url')}`;
    const none = `${Buffer.from(JSON.stringify({ alg: 'none', kid: 'dev:1' })).toString('base64url')}.${b}.`;
    for (const token of [forged, none, 'garbage']) {
      const r = await upgrade({ authorization: `Bearer ${token}` });
      expect(r.status).toBe(401);
      expect(JSON.parse(r.body).error.code).toBe('UNAUTHENTICATED');
    }
  });

  it('an authenticated socket reaches the vault', async () => {
    const relay = new Relay();
    try {
      expect(await relay.call('health', {})).toMatchObject({ status: 'ok' });
    } finally {
      relay.close();
    }
  });
});

describe('the daemon process', () => {
  it('runs its SQLite checkpoints on a thread of their own (docs/PERFORMANCE.md)', () => {
    const start = d.logs.find((l) => l.includes('"event":"vault.start"'));
    expect(start).toContain('"checkpointWorker":true');
  });
});

describe('what the relay can do', () => {
  it('sees no secret in any frame it carries', async () => {
    const relay = new Relay();
    const c = client(relay);
    const password = `relay-canary-${randomBytes(6).toString('hex')}`;
    const k = new Uint8Array(randomBytes(32));
    await c.enrollPassword('rhea', password, k);
    await expect(c.recoverWithPassword('rhea', 'wrong one')).rejects.toMatchObject({ code: ErrorCodes.WRONG_PASSWORD });
    const got = await c.recoverWithPassword('rhea', password);
    expect(Buffer.from(got).equals(Buffer.from(k))).toBe(true);
    relay.close();
    const wire = relay.frames.join('\n');
    const kb = Buffer.from(k);
    for (const needle of [password, kb.toString('hex'), kb.toString('base64'), kb.toString('base64url'), 'wrong one']) {
      expect(wire.includes(needle), needle.slice(0, 6)).toBe(false);
    }
    // Outcomes travel encrypted: the relay cannot tell the wrong guess from the right one.
    expect(wire).not.toMatch(/WRONG_PASSWORD|wrong-password|attemptsLeft/);
    // The channel requests carry only these fields in the clear.
    for (const { method, params } of relay.sent.filter((s) => s.method.includes('.begin') || s.method.includes('.finish'))) {
      expect(Object.keys(params).sort(), method).toEqual(['channel', 'userId']);
      expect(Object.keys(params.channel as object).sort().filter((k) => k !== 'epk')).toEqual(['ct', 'id', 'n', 'ts']);
    }
  });

  it('a tampered ciphertext is refused with DECRYPT_FAILED and changes nothing', async () => {
    const setup = client(new Relay());
    await setup.enrollPassword('tess', 'pw-tess', new Uint8Array(randomBytes(32)));
    const relay = new Relay();
    relay.tamper = (method, p) => {
      if (method === 'recover.begin') {
        const ch = p.channel as { ct: string };
        const ct = Buffer.from(ch.ct, 'base64url');
        ct[5]! ^= 0x01;
        ch.ct = ct.toString('base64url');
      }
      return p;
    };
    expect(await codeOf(client(relay).recoverWithPassword('tess', 'pw-tess'))).toBe(ErrorCodes.DECRYPT_FAILED);
    // A message re-routed to another user does not authenticate either (user id is in the AAD).
    relay.tamper = (method, p) => (method === 'recover.begin' ? { ...p, userId: 'someone-else' } : p);
    expect(await codeOf(client(relay).recoverWithPassword('tess', 'pw-tess'))).toBe(ErrorCodes.DECRYPT_FAILED);
    relay.close();
    expect(await setup.status('tess')).toMatchObject({ state: 'active', attemptsLeft: 10 });
  });

  it('a replayed recover.finish is refused and costs nothing more', async () => {
    const relay = new Relay();
    const c = client(relay);
    await c.enrollPassword('ruth', 'pw-ruth', new Uint8Array(randomBytes(32)));
    await expect(c.recoverWithPassword('ruth', 'nope')).rejects.toMatchObject({ code: ErrorCodes.WRONG_PASSWORD });
    const wrongFinish = relay.sent.filter((s) => s.method === 'recover.finish').at(-1)!;
    await c.recoverWithPassword('ruth', 'pw-ruth');
    const rightFinish = relay.sent.filter((s) => s.method === 'recover.finish').at(-1)!;
    const before = await c.status('ruth');
    // Both outcomes close the channel the same way, so a probe cannot tell them apart.
    expect(await codeOf(relay.call('recover.finish', wrongFinish.params))).toBe(ErrorCodes.SESSION_EXPIRED);
    expect(await codeOf(relay.call('recover.finish', rightFinish.params))).toBe(ErrorCodes.SESSION_EXPIRED);
    // A replayed handshake (recover.begin, n = 0) is refused too.
    const begin = relay.sent.filter((s) => s.method === 'recover.begin').at(-1)!;
    expect(await codeOf(relay.call('recover.begin', begin.params))).toBe(ErrorCodes.REPLAY);
    // A handshake stamped ahead of the vault clock (a relay skewing the client's clock) is stale.
    const ahead = relay.sent.find((s) => s.method === 'recover.begin')!;
    const skewed = { ...ahead.params, channel: { ...(ahead.params.channel as object), ts: Date.now() + 30_000 } };
    expect(await codeOf(relay.call('recover.begin', skewed))).toBe(ErrorCodes.STALE_MESSAGE);
    expect(await c.status('ruth')).toEqual(before);
    relay.close();
  });

  it('an oversized frame closes the connection (1009) and changes nothing', async () => {
    const c = client(new Relay());
    await c.enrollPassword('olaf', 'pw-olaf', new Uint8Array(randomBytes(32)));
    const closed = await new Promise<number>((resolve) => {
      const ws = new WebSocket(d.url, { headers: { authorization: `Bearer ${d.token}` } });
      ws.on('open', () =>
        ws.send(JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'record.delete', params: { userId: 'olaf', pad: 'x'.repeat(70_000) } })),
      );
      ws.on('close', (code) => resolve(code));
      ws.on('error', () => {});
    });
    expect(closed).toBe(1009);
    expect(await c.status('olaf')).toMatchObject({ state: 'active' });
  });

  it('malformed JSON-RPC gets a specific error and the connection stays usable', async () => {
    const ws = new WebSocket(d.url, { headers: { authorization: `Bearer ${d.token}` } });
    await new Promise((r) => ws.once('open', r));
    const ask = (frame: string) =>
      new Promise<{ error?: { code: number; data: { code: string } }; result?: unknown }>((resolve) => {
        ws.once('message', (m) => resolve(JSON.parse(m.toString())));
        ws.send(frame);
      });
    expect((await ask('{not json')).error!.code).toBe(-32700);
    expect((await ask('[1,2]')).error!.data.code).toBe('BAD_REQUEST');
    expect((await ask(JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'vault.rotate', params: {} }))).error!.code).toBe(-32601);
    expect((await ask(JSON.stringify({ jsonrpc: '2.0', id: 2, method: 'record.status', params: { userId: 5 } }))).error!.data.code).toBe('BAD_REQUEST');
    expect((await ask(JSON.stringify({ jsonrpc: '2.0', id: 3, method: 'record.status', params: { userId: 'x', extra: 1 } }))).error!.data.code).toBe('BAD_REQUEST');
    expect((await ask(JSON.stringify({ jsonrpc: '2.0', id: 4, method: 'health', params: {} }))).result).toMatchObject({ status: 'ok' });
    ws.close();
  });

  it('a burst of requests on one connection gets every answer, each under its own id', async () => {
    // The server holds a connection's writes to the end of the turn (vault/rpc/cork.ts).
    const ws = new WebSocket(d.url, { headers: { authorization: `Bearer ${d.token}` } });
    await new Promise((r) => ws.once('open', r));
    const answers = new Map<number, { error?: { code: number; data: { code: string } }; result?: unknown }>();
    const all = new Promise<void>((resolve) =>
      ws.on('message', (m) => {
        const a = JSON.parse(m.toString());
        answers.set(a.id, a);
        if (answers.size === 40) resolve();
      }),
    );
    for (let i = 0; i < 40; i++) {
      const method = i % 2 ? 'health' : 'no.such.method';
      ws.send(JSON.stringify({ jsonrpc: '2.0', id: i, method, params: {} }));
    }
    await all;
    for (let i = 0; i < 40; i++) {
      if (i % 2) expect(answers.get(i)!.result).toMatchObject({ status: 'ok' });
      else expect(answers.get(i)!.error!.code).toBe(-32601);
    }
    ws.close();
  });

  it('a descriptor signed by another key is refused by the client', async () => {
    const other = new Uint8Array(pinned);
    const { p256 } = await import('@noble/curves/nist.js');
    other.set(p256.getPublicKey(p256.utils.randomSecretKey(), false));
    const c = new VaultClient({ transport: new Relay(), pinnedKey: other, kdf: TEST_KDF });
    expect(await codeOf(c.recoverWithPassword('rhea', 'x'))).toBe(ErrorCodes.FORBIDDEN);
  });
});

type Answer = { jsonrpc: string; id: unknown; result?: unknown; error?: { code: number; message: string; data: { code: string; retryable: boolean } & Record<string, unknown> } };

/** One authenticated socket that sends raw frames and returns the next answer, parsed. */
async function rawSocket(path = ''): Promise<{ ask(frame: string | Buffer, binary?: boolean): Promise<Answer>; close(): void }> {
  const ws = new WebSocket(d.url + path, { headers: { authorization: `Bearer ${d.token}` } });
  await new Promise((r, j) => {
    ws.once('open', r);
    ws.once('error', j);
  });
  return {
    ask: (frame, binary = false) =>
      new Promise<Answer>((resolve) => {
        ws.once('message', (m) => resolve(JSON.parse(m.toString())));
        ws.send(frame, { binary });
      }),
    close: () => ws.close(),
  };
}

/** The error an answer carries, checked against the error table: its integer and retryable are the code's. */
function tableError(a: Answer, code: ErrorCode, framing?: number): Answer['error'] & object {
  expect(a.jsonrpc).toBe('2.0');
  expect(a.error, JSON.stringify(a)).toBeDefined();
  expect({ code: a.error!.code, data: { code: a.error!.data.code, retryable: a.error!.data.retryable } }).toEqual({
    code: framing ?? ERRORS[code].jsonrpc,
    data: { code, retryable: ERRORS[code].retryable },
  });
  return a.error!;
}

describe('the wire contract of docs/RPC.md', () => {
  it('a frame that is not one JSON-RPC 2.0 request object is -32600 Invalid Request; its id is echoed only when readable', async () => {
    const s = await rawSocket();
    const invalid = JSONRPC_FRAMING.INVALID_REQUEST;
    try {
      const cases: [string, string, unknown][] = [
        ['a batch', JSON.stringify([{ jsonrpc: '2.0', id: 1, method: 'health', params: {} }]), null],
        ['an empty batch', '[]', null],
        ['no "jsonrpc"', JSON.stringify({ id: 2, method: 'health', params: {} }), 2],
        ['"jsonrpc": "1.0"', JSON.stringify({ jsonrpc: '1.0', id: 3, method: 'health', params: {} }), 3],
        ['a notification (no id)', JSON.stringify({ jsonrpc: '2.0', method: 'health', params: {} }), null],
        ['an object as id', JSON.stringify({ jsonrpc: '2.0', id: { n: 4 }, method: 'health', params: {} }), null],
        ['a number as method', JSON.stringify({ jsonrpc: '2.0', id: 'five', method: 5, params: {} }), 'five'],
        ['a string as params', JSON.stringify({ jsonrpc: '2.0', id: 6, method: 'health', params: 'x' }), 6],
        ['null as params', JSON.stringify({ jsonrpc: '2.0', id: 7, method: 'health', params: null }), 7],
        ['a JSON string', '"health"', null],
      ];
      // All cases in one comparison, so a failure shows every case that differs.
      const got: unknown[] = [];
      const want: unknown[] = [];
      const answer = (a: Answer) => ({ id: a.id, code: a.error?.code, data: { code: a.error?.data.code, retryable: a.error?.data.retryable } });
      for (const [name, frame, id] of cases) {
        got.push([name, answer(await s.ask(frame))]);
        want.push([name, { id, code: invalid, data: { code: ErrorCodes.BAD_REQUEST, retryable: false } }]);
      }
      got.push(['a binary frame', answer(await s.ask(Buffer.from(JSON.stringify({ jsonrpc: '2.0', id: 8, method: 'health', params: {} })), true))]);
      want.push(['a binary frame', { id: null, code: invalid, data: { code: ErrorCodes.BAD_REQUEST, retryable: false } }]);
      expect(got).toEqual(want);
      // JSON-RPC's other two, and a method's own params check, for contrast.
      tableError(await s.ask('{"jsonrpc":"2.0",'), ErrorCodes.BAD_REQUEST, JSONRPC_FRAMING.PARSE_ERROR);
      tableError(await s.ask(JSON.stringify({ jsonrpc: '2.0', id: 9, method: 'vault.rotate', params: {} })), ErrorCodes.BAD_REQUEST, JSONRPC_FRAMING.METHOD_NOT_FOUND);
      tableError(await s.ask(JSON.stringify({ jsonrpc: '2.0', id: 10, method: 'health', params: [] })), ErrorCodes.BAD_REQUEST);
      // Nothing of that closed the connection, and params may be left out where a method takes none.
      expect((await s.ask(JSON.stringify({ jsonrpc: '2.0', id: 11, method: 'health' }))).result).toMatchObject({ status: 'ok' });
    } finally {
      s.close();
    }
  });

  it('record.status of a user id never enrolled is the state "absent", not an error; a non-NFC user id is INVALID_USER_ID (-32602)', async () => {
    const s = await rawSocket();
    try {
      const a = await s.ask(JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'record.status', params: { userId: 'never-enrolled' } }));
      expect(a.result).toEqual({ userId: 'never-enrolled', state: 'absent', attemptsLeft: 0, attemptLimit: 10 });
      const nfd = 'zoe\u0301';
      tableError(await s.ask(JSON.stringify({ jsonrpc: '2.0', id: 2, method: 'record.status', params: { userId: nfd } })), ErrorCodes.INVALID_USER_ID);
      tableError(await s.ask(JSON.stringify({ jsonrpc: '2.0', id: 3, method: 'record.delete', params: { userId: 'never-enrolled' } })), ErrorCodes.RECORD_NOT_FOUND);
    } finally {
      s.close();
    }
  });

  it('an invalid epk is INVALID_POINT with -32602; a stale handshake is STALE_MESSAGE (-32002) with data.now, and sealing again with it works', async () => {
    const desc = await client(new Relay()).descriptor();
    const t = new WebSocketTransport({ url: d.url, token: d.token });
    const s = await rawSocket();
    try {
      const ch = new RawChannel(desc, () => t, 'wire-stale');
      const blinded = toB64(startOprf(desc.vaultId, 'wire-stale', 'pw').blinded);
      // A 65-byte epk that is not on the curve, under the channel id it hashes to.
      const p = await ch.params('recover.begin', { blinded }, 0);
      const offCurve = new Uint8Array(ch.epk);
      offCurve[64]! ^= 1;
      const forged = { ...p, channel: { ...p.channel, epk: toB64(offCurve), id: toB64(channelIdOf(offCurve)) } };
      tableError(await s.ask(JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'recover.begin', params: forged })), ErrorCodes.INVALID_POINT);
      // Two minutes old: outside the 60 s window.
      const stale = await ch.params('recover.begin', { blinded }, 0, { ts: Date.now() - 120_000 });
      const before = Date.now();
      const e = tableError(await s.ask(JSON.stringify({ jsonrpc: '2.0', id: 2, method: 'recover.begin', params: stale })), ErrorCodes.STALE_MESSAGE);
      expect(typeof e.data.now).toBe('number');
      expect(Math.abs((e.data.now as number) - before)).toBeLessThan(5_000);
      expect(e.data).not.toHaveProperty('detail');
      // Nothing was stored: the same handshake sealed again with the vault's clock opens the channel.
      const again = await ch.send('recover.begin', { blinded }, 0, { ts: e.data.now as number });
      expect(again).toMatchObject({ ok: false, code: ErrorCodes.RECORD_NOT_FOUND });
    } finally {
      s.close();
      t.close();
    }
  });

  it('a grant is used once: presented again after its enrolment it is SESSION_NOT_FOUND (inside the channel)', async () => {
    const relay = new Relay();
    const c = client(relay);
    const desc = await c.descriptor();
    const t = new WebSocketTransport({ url: d.url, token: d.token });
    try {
      await c.enrollPassword('wire-grant', 'old password', new Uint8Array(randomBytes(32)));
      // Recover on a raw channel to hold the grant the way a client does.
      const rc = new RawChannel(desc, () => t, 'wire-grant');
      const oprf = startOprf(desc.vaultId, 'wire-grant', 'old password');
      const b = await rc.send('recover.begin', { blinded: toB64(oprf.blinded) }, 0);
      const keys = await finishOprf(oprf, fromB64(b.result!.evaluated as string)!, b.result!.kdf as KdfParams);
      const f = await rc.send('recover.finish', { authKey: toB64(keys.authKey) }, 1);
      expect(f).toMatchObject({ ok: true, result: { outcome: 'ok' } });
      const grant = f.result!.grant as string;
      expect(grant).toMatch(/^[A-Za-z0-9_-]{22}$/);
      // The grant replaces the record once...
      const enrol = async (password: string, withGrant: boolean) => {
        const ch = new RawChannel(desc, () => t, 'wire-grant');
        const p = startOprf(desc.vaultId, 'wire-grant', password);
        const begun = await ch.send('enroll.begin', { blinded: toB64(p.blinded), ...(withGrant ? { grant } : {}) }, 0);
        if (!begun.ok) return begun;
        const payload = await enrollPayload(p, fromB64(begun.result!.evaluated as string)!, TEST_KDF, new Uint8Array(randomBytes(32)));
        return ch.send('enroll.finish', { authKey: toB64(payload.authKey), envelope: toB64(payload.envelope), kdf: payload.kdf }, 1);
      };
      expect(await enrol('new password', true)).toMatchObject({ ok: true, result: { generation: 2 } });
      // ...and is gone after: used again it is unknown; without one the active record stays.
      expect(await enrol('third password', true)).toEqual({ ok: false, code: ErrorCodes.SESSION_NOT_FOUND });
      expect(await enrol('third password', false)).toEqual({ ok: false, code: ErrorCodes.RECORD_EXISTS });
      expect(await c.status('wire-grant')).toMatchObject({ state: 'active', attemptsLeft: 10 });
    } finally {
      relay.close();
      t.close();
    }
  });

  it('the upgrade ignores the path and query: any path reaches the one endpoint', async () => {
    const s = await rawSocket('/some/prefix?x=1');
    try {
      expect((await s.ask(JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'health', params: {} }))).result).toMatchObject({ status: 'ok' });
    } finally {
      s.close();
    }
  });
});

describe('token lifetime (daemon in this process, so the test can mint with the tenant secret)', () => {
  it('an expired token is refused at the upgrade; a token expiring mid-connection closes it with 4401', async () => {
    const { mkdtempSync, rmSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { join } = await import('node:path');
    const { loadConfig } = await import('../../vault/config.js');
    const { initVault } = await import('../../vault/setup.js');
    const { startDaemon: startInProcess, devToken } = await import('../../vault/daemon.js');
    const { mintToken } = await import('../../vault/rpc/auth.js');
    const { captureLog } = await import('../helpers/vault.js');
    const dir = mkdtempSync(join(tmpdir(), 'bkv-inproc-'));
    const logs: string[] = [];
    const log = captureLog(logs);
    const c = loadConfig({ env: {}, overrides: { dataDir: dir, listen: { host: '127.0.0.1', port: 0 } } });
    await initVault(c, log);
    const dm = await startInProcess(c, log);
    try {
      await devToken(dm, c, log);
      const secret = await dm.auth.secretFor('dev', 1);
      const url = `ws://127.0.0.1:${dm.server.port}`;
      const hourAgo = Date.now() - 3_600_000;
      const expired = mintToken(secret, { tenant: 'dev', version: 1, vaultId: dm.vault.vaultId, ttlSec: 600, now: hourAgo });
      const status = await new Promise<number>((resolve) => {
        const ws = new WebSocket(url, { headers: { authorization: `Bearer ${expired}` } });
        ws.on('unexpected-response', (_q, res) => resolve(res.statusCode ?? 0));
        ws.on('open', () => resolve(200));
        ws.on('error', () => {});
      });
      expect(status).toBe(401);
      expect(logs.some((l) => l.includes('auth.refused') && l.includes('expired'))).toBe(true);
      // Valid at the upgrade (inside the 30 s skew), expired for the request that follows.
      const edge = mintToken(secret, { tenant: 'dev', version: 1, vaultId: dm.vault.vaultId, ttlSec: 60, now: Date.now() - 89_000 });
      const ws = new WebSocket(url, { headers: { authorization: `Bearer ${edge}` } });
      await new Promise((r) => ws.once('open', r));
      await new Promise((r) => setTimeout(r, 1500));
      const closed = new Promise<number>((r) => ws.once('close', (code) => r(code)));
      const reply = new Promise<{ error: { data: { code: string } } }>((r) => ws.once('message', (m) => r(JSON.parse(m.toString()))));
      ws.send(JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'health', params: {} }));
      expect((await reply).error.data.code).toBe('UNAUTHENTICATED');
      expect(await closed).toBe(4401);
      // A revoked tenant's still-unexpired token is refused.
      dm.vault.store.tenants.revoke('dev', Date.now());
      const fresh = mintToken(secret, { tenant: 'dev', version: 1, vaultId: dm.vault.vaultId, ttlSec: 600 });
      const revoked = await new Promise<number>((resolve) => {
        const w = new WebSocket(url, { headers: { authorization: `Bearer ${fresh}` } });
        w.on('unexpected-response', (_q, res) => resolve(res.statusCode ?? 0));
        w.on('open', () => resolve(200));
        w.on('error', () => {});
      });
      expect(revoked).toBe(401);
    } finally {
      await dm.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
