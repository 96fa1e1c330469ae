// Operations surface of the real daemon process (its own SoftHSM2 token and
// SQLite file): /healthz, /readyz, /metrics, and bkv-admin going through the
// admin listener while the daemon owns the token. One fault the real token
// cannot produce on demand — its session going away and coming back — is
// injected at the VaultKeys seam in an in-process daemon, next to the real
// readiness test.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startDaemon, ADMIN, CLI, type RunningDaemon } from '../helpers/daemon.js';
import { captureLog, TEST_KDF } from '../helpers/vault.js';
import { enroll } from '../helpers/flows.js';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import type { VaultKeys } from '../../vault/hsm/vault-keys.js';
import { decorateKeys } from '../../vault/hsm/decorate.js';
import { VaultClient } from '../../client/sdk.js';
import { WebSocketTransport } from '../../client/transport.js';
import { readVaultKey } from '../../client/cli.js';

const KDF_ENV = { BKV_KDF: '{"m":64,"t":1,"p":1}' };

let d: RunningDaemon;
let admin: string;
let work: string;

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv, input = ''): Promise<Run> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [file, ...args], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    p.stdout.on('data', (b: Buffer) => out.push(b));
    p.stderr.on('data', (b: Buffer) => err.push(b));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() }));
    p.stdin.end(input);
  });
}

const bkv = (args: string[], input = '', env: NodeJS.ProcessEnv = d.cliEnv) => run(CLI, args, { ...env, ...KDF_ENV }, input);
const bkvAdmin = (args: string[]) => run(ADMIN, [...args, '--data', d.dataDir], { ...process.env, BKV_CONFIG: join(d.dataDir, 'test-config.json') });

async function get(url: string, headers: Record<string, string> = {}): Promise<{ status: number; text: string; json: () => any }> {
  const res = await fetch(url, { headers });
  const text = await res.text();
  return { status: res.status, text, json: () => JSON.parse(text) };
}

/** Sum of a metric's samples whose labels include `labels`. */
function metric(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = Object.fromEntries([...(m[2] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) sum += Number(m[3]);
  }
  return sum;
}

/** /readyz until it answers `status`, for at most 5 s: an answer may be up to a second old. */
async function readyzUntil(status: number): Promise<Awaited<ReturnType<typeof get>>> {
  let r = await get(`${admin}/readyz`);
  for (let i = 0; i < 25 && r.status !== status; i++) {
    await new Promise((res) => setTimeout(res, 200));
    r = await get(`${admin}/readyz`);
  }
  return r;
}

const adminPort = (logs: string[]): number => JSON.parse(logs.find((l) => l.includes('"event":"admin.listening"'))!).port as number;

beforeAll(async () => {
  d = await startDaemon();
  for (let i = 0; i < 100 && !d.logs.some((l) => l.includes('admin.listening')); i++) await new Promise((r) => setTimeout(r, 20));
  admin = `http://127.0.0.1:${adminPort(d.logs)}`;
  work = mkdtempSync(join(tmpdir(), 'bkv-admin-'));
  writeFileSync(join(work, 'chats.db'), randomBytes(50_000));
});

afterAll(async () => {
  await d?.cleanup();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('health and readiness of the real daemon', () => {
  it('/healthz is alive and /readyz ready on the real token, database and audit log', async () => {
    expect(d.logs.some((l) => /"event":"admin.listening".*"port":\d+/.test(l))).toBe(true);
    const h = await get(`${admin}/healthz`);
    expect(h.status).toBe(200);
    expect(h.json().status).toBe('alive');
    const r = await get(`${admin}/readyz`);
    expect(r.status).toBe(200);
    expect(r.json()).toMatchObject({ ready: true, checks: { hsm: { ok: true }, anchor: { ok: true, lag: 0 }, db: { ok: true }, audit: { ok: true } } });
  });

  it('/readyz turns not ready while the database file cannot be written, and ready again after', async (ctx) => {
    const files = [join(d.dataDir, 'vault.db'), join(d.dataDir, 'vault.db-wal')];
    // The daemon already holds the file open read-write: only an immutable flag makes the next write fail for real.
    if (spawnSync('chattr', ['+i', ...files]).status !== 0) return ctx.skip();
    try {
      // Readiness is evaluated at most once a second (the last answer may be that recent).
      const r = await readyzUntil(503);
      expect(r.status).toBe(503);
      expect(r.json().checks.db).toMatchObject({ ok: false });
      expect(r.json().checks.db.detail).toMatch(/not writable/);
      expect(r.json().checks.hsm.ok).toBe(true);
    } finally {
      spawnSync('chattr', ['-i', ...files]);
    }
    const again = await readyzUntil(200);
    expect(again.status).toBe(200);
  });
});

describe('metrics', () => {
  it('request, HSM, lockout and record counters move with traffic', async () => {
    // /metrics serves one rendering for a second (METRICS_TTL_MS in vault/admin/server.ts): each
    // scrape here comes after that second, so neither is a rendering from before it.
    const ttl = () => new Promise((r) => setTimeout(r, 1100));
    await ttl();
    const before = (await get(`${admin}/metrics`)).text;
    // The SDK in this process, not eleven bkv processes: the subject is the daemon's counters
    // (the CLI's own wrong-password path is e2e-cli's).
    const transport = new WebSocketTransport({ url: d.url, token: d.token });
    const sdk = new VaultClient({ transport, pinnedKey: readVaultKey(d.vaultKeyFile), kdf: TEST_KDF, maxRetries: 0 });
    await sdk.enrollPassword('metrics-user', 'right horse', randomBytes(32));
    for (let i = 0; i < 10; i++) {
      const err = await sdk.recoverWithPassword('metrics-user', `wrong ${i}`).then(() => undefined, (e: unknown) => e);
      expect((err as VaultError).code).toBe(i < 9 ? ErrorCodes.WRONG_PASSWORD : ErrorCodes.LOCKED);
    }
    transport.close();
    await ttl();
    const after = (await get(`${admin}/metrics`)).text;
    const delta = (name: string, labels: Record<string, string> = {}) => metric(after, name, labels) - metric(before, name, labels);
    expect(delta('bkv_rpc_requests_total', { method: 'enroll.finish', outcome: 'ok' })).toBe(1);
    expect(delta('bkv_rpc_requests_total', { method: 'recover.begin' })).toBe(10);
    expect(delta('bkv_rpc_requests_total', { method: 'recover.finish', outcome: 'wrong-password' })).toBe(9);
    expect(delta('bkv_rpc_requests_total', { method: 'recover.finish', outcome: 'locked' })).toBe(1);
    expect(delta('bkv_rpc_request_duration_seconds_count', { method: 'recover.begin' })).toBe(10);
    expect(delta('bkv_hsm_operation_duration_seconds_count', { op: 'oprf_evaluate' })).toBe(11);
    expect(delta('bkv_hsm_operation_duration_seconds_count', { op: 'check_verifier' })).toBe(10);
    expect(delta('bkv_hsm_operation_duration_seconds_count', { op: 'write_anchor' })).toBeGreaterThanOrEqual(11);
    expect(delta('bkv_lockouts_total')).toBe(1);
    expect(delta('bkv_security_events_total', { event: 'record.locked' })).toBe(1);
    expect(metric(after, 'bkv_records', { state: 'locked' })).toBeGreaterThanOrEqual(1);
    expect(metric(after, 'bkv_anchor_lag_batches')).toBe(0);
    expect(metric(after, 'bkv_rpc_in_flight')).toBe(0);
    expect(metric(after, 'bkv_hsm_in_flight')).toBe(0);
    // Nothing that names a user or a secret: labels are methods, outcomes, operations, events.
    expect(after).not.toContain('metrics-user');
    expect(after).not.toContain(d.token);
  });
});

describe('bkv-admin while the daemon owns the token', () => {
  it('refuses admin endpoints without the admin token, and records the attempt in the audit log', async () => {
    expect((await get(`${admin}/admin/status`)).status).toBe(401);
    expect((await get(`${admin}/admin/status`, { authorization: 'Bearer ' + 'ab'.repeat(32) })).status).toBe(401);
    const token = readFileSync(join(d.dataDir, 'admin-token'), 'utf8').trim();
    expect((await get(`${admin}/admin/status`, { authorization: `Bearer ${token}` })).status).toBe(200);
    expect(readFileSync(join(d.dataDir, 'audit.log'), 'utf8')).toContain('"event":"admin.denied","path":"/admin/status"');
  });

  it('status: keys policy-conform, counts, anchor consistent, epoch', async () => {
    const r = await bkvAdmin(['status', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const s = JSON.parse(r.stdout);
    expect(s).toMatchObject({ mode: 'daemon', policy: { conform: true }, anchor: { consistent: true }, currentEpoch: 1 });
    expect(s.policy.keys.map((k: { label: string }) => k.label)).toEqual(
      expect.arrayContaining(['bkv.kx', 'bkv.sig', 'bkv.oprf', 'bkv.verifier', 'bkv.tenant', 'bkv.seal.000001', 'bkv.state-anchor']),
    );
    expect(s.tenants.names).toContain('dev');
    const human = await bkvAdmin(['status']);
    expect(human.stdout).toMatch(/policy-conform: yes/);
    expect(human.stdout).toMatch(/consistent: yes/);
  });

  it('tenant add prints the secret once; tenant token mints a JWT the vault accepts; revoke cuts it off', async () => {
    const add = await bkvAdmin(['tenant', 'add', 'acme']);
    expect(add.code, add.stderr).toBe(0);
    const secret = /^\s+([0-9a-f]{64})$/m.exec(add.stdout)?.[1];
    expect(secret).toBeDefined();
    const list = await bkvAdmin(['tenant', 'list', '--json']);
    expect(JSON.parse(list.stdout)).toEqual(expect.arrayContaining([expect.objectContaining({ name: 'acme', version: 1, state: 'active' })]));
    expect(list.stdout).not.toContain(secret!);
    const tok = await bkvAdmin(['tenant', 'token', 'acme', '--ttl', '600']);
    expect(tok.code, tok.stderr).toBe(0);
    const jwt = tok.stdout.trim();
    expect(JSON.parse(Buffer.from(jwt.split('.')[0]!, 'base64url').toString())).toMatchObject({ alg: 'HS256', kid: 'acme:1' });
    const env = { ...d.cliEnv, BKV_TOKEN: jwt };
    expect((await bkv(['vault', 'status', '--user', 'nobody'], '', env)).code).toBe(0);
    const rev = await bkvAdmin(['tenant', 'revoke', 'acme']);
    expect(rev.code).toBe(0);
    expect(rev.stdout).toContain('1 credential version(s) revoked');
    expect((await bkv(['vault', 'status', '--user', 'nobody'], '', env)).code).toBe(9);
    expect((await bkvAdmin(['tenant', 'revoke', 'acme'])).code).toBe(5);
    expect((await bkvAdmin(['tenant', 'token', 'nope'])).code).toBe(5);
  });

  it('rotate re-seals through the daemon with progress; the backup still restores; the audit log verifies', async () => {
    const chats = join(work, 'chats.db');
    expect((await bkv(['backup', 'create', '--in', chats, '--out', join(work, 'r.bkv'), '--user', 'rotate-user', '--password-stdin'], 'pw one\n')).code).toBe(0);
    const r = await bkvAdmin(['rotate']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/re-sealed \d+, remaining 0/);
    expect(r.stdout).toMatch(/seal epoch is now 2/);
    expect(r.stdout).toMatch(/destroyed epoch keys: 1/);
    const restored = await bkv(['backup', 'restore', '--in', join(work, 'r.bkv'), '--out', join(work, 'r.out'), '--user', 'rotate-user', '--password-stdin'], 'pw one\n');
    expect(restored.code, restored.stderr).toBe(0);
    expect(readFileSync(join(work, 'r.out'))).toEqual(readFileSync(chats));
    const cp = await bkvAdmin(['audit', 'checkpoint']);
    expect(cp.code, cp.stderr).toBe(0);
    const v = await bkvAdmin(['audit', 'verify']);
    expect(v.code, v.stdout).toBe(0);
    expect(v.stdout).toMatch(/0 later line\(s\) protected by the hash chain only/);
    const audit = readFileSync(join(d.dataDir, 'audit.log'), 'utf8');
    for (const ev of ['enroll.finish', 'recover.finish', 'record.locked', 'tenant.add', 'tenant.token', 'tenant.revoke', 'rotate.start', 'rotate.done', 'audit.checkpoint']) {
      expect(audit).toContain(`"event":"${ev}"`);
    }
  });

  it('the audit log holds pseudonymous user refs only: no user id, password, tenant secret or token', async () => {
    const audit = readFileSync(join(d.dataDir, 'audit.log'), 'utf8');
    for (const s of ['metrics-user', 'rotate-user', 'right horse', 'wrong 1', 'pw one', d.token, readFileSync(join(d.dataDir, 'admin-token'), 'utf8').trim()]) {
      expect(audit).not.toContain(s);
    }
    expect(audit).toMatch(/"user":"[0-9a-f]{16}"/);
  });
});

describe('readiness when the HSM session is lost and comes back (fault seam, in-process daemon)', () => {
  /** The real token's keys, with a switch that makes the HSM vanish: ping fails and every call is refused. */
  class Unpluggable {
    down = false;
    readonly keys: VaultKeys;
    constructor(k: VaultKeys) {
      this.keys = decorateKeys(k, (op, call) => {
        if (!this.down || op === 'close') return call();
        return op === 'ping' ? Promise.resolve(false) : Promise.reject(new VaultError(ErrorCodes.HSM_UNAVAILABLE, 'HSM session lost (injected)'));
      });
    }
  }

  it('503 with the HSM check failing while it is gone; a change whose anchor write failed meanwhile is undone, and the undo anchored; 200 once it is back', async () => {
    const { loadConfig } = await import('../../vault/config.js');
    const { initVault } = await import('../../vault/setup.js');
    const { startDaemon: startInProcess, startAdmin } = await import('../../vault/daemon.js');
    const dir = mkdtempSync(join(tmpdir(), 'bkv-seam-'));
    const log = captureLog([]);
    const c = loadConfig({
      env: {},
      overrides: { dataDir: dir, listen: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 }, vault: { kdfFloor: { m: 64, t: 1, p: 1 } } },
    });
    await initVault(c, log);
    let keys: Unpluggable | undefined;
    const dm = await startInProcess(c, log, { wrapKeys: (k) => (keys = new Unpluggable(k)).keys });
    const ad = await startAdmin(dm, c, log);
    const url = `http://127.0.0.1:${ad.port}`;
    try {
      expect((await get(`${url}/readyz`)).status).toBe(200);
      await enroll(dm.vault, 'carol', 'pw', randomBytes(32));

      keys!.down = true;
      const lost = await get(`${url}/readyz`);
      expect(lost.status).toBe(503);
      expect(lost.json()).toMatchObject({ ready: false, checks: { hsm: { ok: false }, anchor: { ok: false }, db: { ok: true } } });
      expect(lost.json().checks.hsm.detail).toMatch(/does not answer/);
      // A change made now cannot be anchored: it is undone (SECURITY.md F5) and the caller gets HSM_UNAVAILABLE.
      // The undo is a batch of its own, waiting for the anchor.
      await expect(dm.vault.delete('carol')).rejects.toMatchObject({ code: ErrorCodes.HSM_UNAVAILABLE });
      const m = (await get(`${url}/metrics`)).text;
      expect(metric(m, 'bkv_hsm_up')).toBe(0);
      expect(metric(m, 'bkv_anchor_lag_batches')).toBeGreaterThanOrEqual(1);
      expect(metric(m, 'bkv_hsm_operation_errors_total', { op: 'write_anchor', code: 'HSM_UNAVAILABLE' })).toBe(1);
      expect(metric(m, 'bkv_ready', { check: 'hsm' })).toBe(0);
      expect((await get(`${url}/healthz`)).status).toBe(200);

      keys!.down = false;
      const back = await get(`${url}/readyz`);
      expect(back.status).toBe(200);
      expect(back.json().checks.anchor).toMatchObject({ ok: true, lag: 0 });
      expect(dm.vault.status('carol').state).toBe('active');
      expect(metric((await get(`${url}/metrics`)).text, 'bkv_hsm_up')).toBe(1);

      // The anchored undo and the database agree: a restart opens the same database (no false rollback alarm).
      await ad.close();
      await dm.stop();
      const again = await startInProcess(c, log);
      try {
        expect(again.vault.status('carol').state).toBe('active');
        expect((await again.readiness()).ready).toBe(true);
      } finally {
        await again.stop();
      }
    } finally {
      await ad.close();
      await dm.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
