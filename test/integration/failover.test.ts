// Client fail-over between the nodes of one vault (docs/RPC.md#fail-over):
// the pure policy (which error moves a client on, which step may be sent
// again), the URL list, and the SDK against real daemons that share one
// identity. Two daemons started from copies of one data folder (token
// included) hold the same keys and the same records at the copy: the stand-in
// for cohort nodes until the cohort replicates (issue 17). A relay between
// the SDK and a node drops one answer, for the "sent, no answer" fate that a
// real kill cannot time exactly.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WebSocket, WebSocketServer } from 'ws';
import { VaultClient, type FailoverEvent } from '../../client/sdk.js';
import { WebSocketTransport, parseVaultUrls, webSocketTransports } from '../../client/transport.js';
import { afterFailure, NodeRing, REPEATABLE_WHEN_UNKNOWN, type Step } from '../../client/failover.js';
import { main, readVaultKey, vaultUrls } from '../../client/cli.js';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';
import { startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { TEST_KDF } from '../helpers/vault.js';
import { codeOf } from '../helpers/codes.js';

describe('the fail-over policy', () => {
  it('moves on only for node-side errors, and repeats a step of unknown fate only when a repeat costs nothing', () => {
    const steps = Object.keys(REPEATABLE_WHEN_UNKNOWN) as Step[];
    for (const step of steps) {
      // The caller's own errors and the record's answers would be the same on every node.
      for (const code of [ErrorCodes.WRONG_PASSWORD, ErrorCodes.LOCKED, ErrorCodes.RECORD_NOT_FOUND, ErrorCodes.BAD_REQUEST, ErrorCodes.UNAUTHENTICATED, ErrorCodes.RATE_LIMITED]) {
        expect(afterFailure(step, code, 'refused')).toBe('surface');
      }
      // Never sent: any node may take it.
      expect(afterFailure(step, ErrorCodes.VAULT_UNREACHABLE, 'refused')).toBe('failover');
      expect(afterFailure(step, ErrorCodes.VAULT_UNREACHABLE, 'unknown')).toBe(REPEATABLE_WHEN_UNKNOWN[step] ? 'failover' : 'unknown');
    }
    // A guess may have been counted or decided: never sent twice.
    expect(afterFailure('recover.begin', ErrorCodes.VAULT_UNREACHABLE, 'unknown')).toBe('unknown');
    expect(afterFailure('recover.finish', ErrorCodes.VAULT_UNREACHABLE, 'unknown')).toBe('unknown');
    expect(afterFailure('enroll.finish', ErrorCodes.VAULT_UNREACHABLE, 'unknown')).toBe('unknown');
    expect(afterFailure('record.delete', ErrorCodes.VAULT_UNREACHABLE, 'unknown')).toBe('unknown');
    // HSM_UNAVAILABLE may follow a committed, unanchored change (docs/SECURITY.md F5): as good as unknown.
    expect(afterFailure('recover.begin', ErrorCodes.HSM_UNAVAILABLE, 'refused')).toBe('unknown');
    expect(afterFailure('record.status', ErrorCodes.HSM_UNAVAILABLE, 'refused')).toBe('failover');
    expect(afterFailure('recover.finish', ErrorCodes.OVERLOADED, 'answered')).toBe('failover');
  });

  it('walks the nodes in order, follows a concurrent move, and backs off with jitter under a cap', () => {
    const ring = new NodeRing(3, { first: 1, random: () => 0.999, baseDelayMs: 100, maxDelayMs: 300 });
    expect(ring.node).toBe(1);
    expect(ring.advance(1)).toBe(2);
    expect(ring.advance(1)).toBe(2); // another operation already moved past node 1
    expect(ring.advance(2)).toBe(0);
    expect(ring.maxAttempts).toBe(6);
    const e = new VaultError(ErrorCodes.OVERLOADED, 'busy', { retryAfterMs: 1_000 });
    expect(ring.delayMs(1, e, false)).toBeLessThan(100);
    expect(ring.delayMs(7, e, false)).toBeLessThan(300); // capped
    expect(ring.delayMs(1, e, true)).toBe(1_000); // the node's own retry time, when it is tried again
    expect(new NodeRing(1).maxAttempts).toBe(1);
    expect(() => new NodeRing(0)).toThrow(/at least one/);
    expect(() => new NodeRing(2, { first: 2 })).toThrow(/index below 2/);
  });

  it('parses one URL or a comma-separated list, naming the bad entry and never echoing credentials', () => {
    expect(parseVaultUrls(' ws://a:1 , wss://b:2/x ')).toEqual(['ws://a:1', 'wss://b:2/x']);
    expect(parseVaultUrls(['ws://a:1'])).toEqual(['ws://a:1']);
    expect(() => parseVaultUrls('ws://a:1,,ws://b:2')).toThrow(/entry 2 of 3 is empty/);
    expect(() => parseVaultUrls('ws://a:1,http://b:2')).toThrow(/entry 2 of 2 .*must start with ws:\/\//);
    expect(() => parseVaultUrls('ws://a:1,ws://a:1')).toThrow(/repeats entry 1/);
    let m = '';
    try {
      parseVaultUrls('ws://a:1,https://user:hunter2@b:2/?token=abc');
    } catch (e) {
      m = (e as Error).message;
    }
    expect(m).toMatch(/entry 2/);
    expect(m).not.toMatch(/hunter2|abc/);
    expect(vaultUrls(undefined, 'ws://a:1,ws://b:2')).toEqual(['ws://a:1', 'ws://b:2']);
    expect(vaultUrls('ws://c:3', 'ws://a:1,ws://b:2')).toEqual(['ws://c:3']);
    expect(() => vaultUrls(undefined, 'ws://a:1,')).toThrow(/BKV_VAULT entry 2 of 2 is empty/);
    expect(() => new VaultClient({ pinnedKey: new Uint8Array(65) } as never)).toThrow();
  });
});

/** A TCP port with nothing listening on it (taken, then released). */
async function deadPort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as { port: number }).port;
  await new Promise((r) => s.close(r));
  return port;
}

/**
 * A WebSocket relay in front of one node that passes frames both ways, except
 * that the answer to the first request whose method is `drop` never comes back:
 * the relay cuts the client's connection when it arrives (the node did the work).
 */
async function droppingRelay(target: string, token: string, drop: string) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((r) => wss.once('listening', r));
  const seen: string[] = [];
  let armed = true;
  wss.on('connection', (client) => {
    const upstream = new WebSocket(target, { headers: { authorization: `Bearer ${token}` } });
    const queue: string[] = [];
    let dropId: unknown;
    upstream.on('open', () => queue.splice(0).forEach((f) => upstream.send(f)));
    client.on('message', (data) => {
      const text = data.toString();
      const msg = JSON.parse(text) as { id: unknown; method: string };
      seen.push(msg.method);
      if (armed && msg.method === drop) {
        armed = false;
        dropId = msg.id;
      }
      if (upstream.readyState === WebSocket.OPEN) upstream.send(text);
      else queue.push(text);
    });
    upstream.on('message', (data) => {
      const reply = JSON.parse(data.toString()) as { id: unknown };
      if (dropId !== undefined && reply.id === dropId) client.terminate();
      else client.send(data.toString());
    });
    client.on('close', () => upstream.close());
    upstream.on('close', () => client.close());
  });
  return { url: `ws://127.0.0.1:${(wss.address() as { port: number }).port}`, seen, close: () => new Promise((r) => wss.close(r)) };
}

describe('the SDK fails over between nodes of one vault', () => {
  let a: RunningDaemon;
  let b: RunningDaemon;
  let bDir: string;
  let pinnedKey: Uint8Array;
  const user = 'failover@example';
  const key = new Uint8Array(32).fill(7);

  beforeAll(async () => {
    a = await startDaemon();
    pinnedKey = readVaultKey(a.vaultKeyFile);
    const one = new VaultClient({ transport: new WebSocketTransport({ url: a.url, token: a.token }), pinnedKey, kdf: TEST_KDF });
    await one.enrollPassword(user, 'right horse', key);
    one.close();
    // B: a copy of A's data folder (token, anchor and database) taken while A is stopped.
    await a.stop();
    bDir = mkdtempSync(join(tmpdir(), 'bkv-node-b-'));
    cpSync(a.dataDir, bDir, { recursive: true });
    // The SoftHSM2 config names A's token folder; B writes its own on start.
    rmSync(join(bDir, 'softhsm2.conf'));
    a = await a.restart();
    b = await startDaemon({ dataDir: bDir });
  }, 120_000);

  afterAll(async () => {
    await a?.cleanup();
    await b?.cleanup();
  });

  it('both nodes present the one identity: the same descriptor verifies against the one pinned key', async () => {
    expect(readVaultKey(b.vaultKeyFile)).toEqual(pinnedKey);
    for (const n of [a, b]) {
      const c = new VaultClient({ transport: new WebSocketTransport({ url: n.url, token: n.token }), pinnedKey, kdf: TEST_KDF });
      const d = await c.descriptor();
      expect(d.attemptLimit).toBe(10);
      c.close();
    }
  });

  it('a node that refuses connections is skipped: the request goes to the next one, once', async () => {
    const events: FailoverEvent[] = [];
    const urls = `ws://127.0.0.1:${await deadPort()},${b.url}`;
    const c = new VaultClient({
      transports: webSocketTransports(urls, { token: b.token }),
      pinnedKey,
      kdf: TEST_KDF,
      failover: { first: 0, onFailover: (e) => events.push(e), baseDelayMs: 1 },
    });
    expect(await c.recoverWithPassword(user, 'right horse')).toEqual(key);
    expect(events).toEqual([{ from: 0, to: 1, step: 'vault.descriptor', code: ErrorCodes.VAULT_UNREACHABLE, attempt: 1 }]);
    // The node that answered is kept: no further fail-over.
    expect((await c.status(user)).state).toBe('active');
    expect(events).toHaveLength(1);
    c.close();
  });

  it('bkv takes BKV_VAULT as a list: a dead first node is passed over', async () => {
    let out = '';
    let err = '';
    const code = await main(['vault', 'status', '--user', user, '--json'], {
      env: { BKV_VAULT: `ws://127.0.0.1:${await deadPort()},${b.url}`, BKV_TOKEN: b.token, BKV_VAULT_KEY: b.vaultKeyFile },
      stdout: { write: (s: string) => (out += s) },
      stderr: { write: (s: string) => (err += s) },
    });
    expect({ code, err }).toEqual({ code: 0, err: '' });
    expect(JSON.parse(out).state).toBe('active');
  });

  it('kill -9 of the node in use: the next guess goes to the other node, and counts there once', async () => {
    const events: FailoverEvent[] = [];
    const c = new VaultClient({
      transports: [new WebSocketTransport({ url: a.url, token: a.token }), new WebSocketTransport({ url: b.url, token: b.token })],
      pinnedKey,
      kdf: TEST_KDF,
      failover: { first: 0, onFailover: (e) => events.push(e), baseDelayMs: 1 },
    });
    expect(await c.recoverWithPassword(user, 'right horse')).toEqual(key);
    expect(events).toHaveLength(0);
    await a.stop('SIGKILL');
    const before = (await new VaultClient({ transport: new WebSocketTransport({ url: b.url, token: b.token }), pinnedKey }).status(user)).attemptsLeft;
    expect(await codeOf(c.recoverWithPassword(user, 'wrong horse'))).toBe(ErrorCodes.WRONG_PASSWORD);
    expect(events.map((e) => [e.from, e.to, e.code])).toEqual([[0, 1, ErrorCodes.VAULT_UNREACHABLE]]);
    const after = (await c.status(user)).attemptsLeft;
    expect(after).toBe(before - 1);
    expect(await c.recoverWithPassword(user, 'right horse')).toEqual(key);
    c.close();
    a = await a.restart();
  }, 60_000);

  it('a guess sent and never answered is not sent again elsewhere: the caller is told its outcome is unknown', async () => {
    const relay = await droppingRelay(b.url, b.token, 'recover.finish');
    try {
      const statusOf = async () =>
        (await new VaultClient({ transport: new WebSocketTransport({ url: b.url, token: b.token }), pinnedKey }).status(user)).attemptsLeft;
      const before = await statusOf();
      const c = new VaultClient({
        transports: [new WebSocketTransport({ url: relay.url }), new WebSocketTransport({ url: a.url, token: a.token })],
        pinnedKey,
        kdf: TEST_KDF,
        failover: { first: 0, baseDelayMs: 1 },
      });
      const e = (await c.recoverWithPassword(user, 'wrong again').catch((x: unknown) => x)) as VaultError;
      expect(e).toBeInstanceOf(VaultError);
      expect(e.code).toBe(ErrorCodes.VAULT_UNREACHABLE);
      expect(e.detail?.outcomeUnknown).toBe(true);
      expect(e.message).toMatch(/not retried/);
      // The relayed node decided the guess (one attempt); the other node never saw it.
      expect(relay.seen.filter((m) => m === 'recover.finish')).toHaveLength(1);
      expect(await statusOf()).toBe(before - 1);
      c.close();
    } finally {
      await relay.close();
    }
  }, 60_000);
});
