// Revocation reaches open connections (issue 14, finding 3), on the real daemon:
// before the fix a connection opened before `bkv-admin tenant revoke` went on
// spending attempts and deleting records, checked only against its token's `exp`
// (up to 24 h). Revoked through the admin listener, as bkv-admin does.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { ADMIN, startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { adminApi, type AdminApi } from '../helpers/admin-api.js';
import { RawSocket, advConfig, pinnedKeyOf } from '../helpers/adversarial.js';
import { TEST_KDF } from '../helpers/vault.js';
import { VaultClient } from '../../client/sdk.js';
import { WebSocketTransport } from '../../client/transport.js';

let d: RunningDaemon;
let api: AdminApi;
let pinned: Uint8Array;
const transports: WebSocketTransport[] = [];

function sdk(token: string, namespace?: string): VaultClient {
  const transport = new WebSocketTransport({ url: d.url, token });
  transports.push(transport);
  return new VaultClient({ transport, pinnedKey: pinned, kdf: TEST_KDF, maxRetries: 0, ...(namespace ? { namespace } : {}) });
}

beforeAll(async () => {
  // The dev tenant checks acme's record after the revoke: since tenant isolation (issue 14,
  // finding 5) only a tenant granted acme's namespace can see it.
  d = await startDaemon({ config: { ...advConfig(), tenants: { grants: { dev: ['acme'] } } } });
  api = await adminApi(d);
  pinned = pinnedKeyOf(d);
});
afterAll(async () => {
  for (const t of transports) t.close();
  await d?.cleanup();
});

/** The socket's close (code, and ms since `t0`), or undefined if it stays open for `ms`. */
async function closeWithin(s: RawSocket, t0: number, ms: number): Promise<{ code: number; after: number } | undefined> {
  return Promise.race([
    s.closed.then((c) => ({ code: c.code, after: performance.now() - t0 })),
    new Promise<undefined>((r) => setTimeout(() => r(undefined), ms)),
  ]);
}

/** A request's answer code ('ok' for a result), or 'closed' if the connection closes first. */
async function answer(s: RawSocket, method: string, params: object): Promise<string> {
  return Promise.race([
    s.call(method, params).then((a) => (a.error ? a.error.data.code : 'ok')),
    s.closed.then(() => 'closed'),
  ]);
}

function bkvAdmin(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [ADMIN, ...args, '--data', d.dataDir], {
      env: { ...process.env, BKV_CONFIG: join(d.dataDir, 'test-config.json') },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
    p.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

describe('revocation reaches open connections (issue 14, finding 3)', () => {
  it("closes a revoked tenant's open connections with 4401 within a second; a request sent right after the revoke changes nothing", async () => {
    const acme = await api.tenant('acme');
    await sdk(acme.token).enrollPassword('acme-user', 'pw-acme', new Uint8Array(randomBytes(32)));
    const sockets = [await RawSocket.open(d.url, acme.token), await RawSocket.open(d.url, acme.token)];
    for (const s of sockets) expect(await answer(s, 'health', {})).toBe('ok');
    const bystander = await RawSocket.open(d.url, d.token);
    const t0 = performance.now();
    const rev = await api.post('/admin/tenants/revoke', { name: 'acme' });
    expect(rev.status).toBe(200);
    // Right after the revoke returned: a request that would delete the record.
    const late = await answer(sockets[0]!, 'record.delete', { userId: 'acme-user' });
    const closes = await Promise.all(sockets.map((s) => closeWithin(s, t0, 1_000)));
    expect(await sdk(d.token, 'acme').status('acme-user')).toMatchObject({ state: 'active', attemptsLeft: 10 });
    expect(['closed', 'UNAUTHENTICATED']).toContain(late);
    for (const c of closes) {
      expect(c?.code).toBe(4401);
      expect(c!.after).toBeLessThan(1_000);
    }
    // The two sockets and the SDK connection that enrolled.
    expect(rev.body).toMatchObject({ name: 'acme', revoked: 1, connectionsClosed: 3 });
    // The vault serves everyone else.
    expect(await answer(bystander, 'health', {})).toBe('ok');
    bystander.close();
  });

  it('revoking one credential version closes its connections only; the other version keeps serving', async () => {
    const v1 = await api.tenant('multi');
    expect(v1.version).toBe(1);
    const v2 = await api.tenant('multi');
    expect(v2.version).toBe(2);
    const s1 = await RawSocket.open(d.url, v1.token);
    const s2 = await RawSocket.open(d.url, v2.token);
    const t0 = performance.now();
    const rev = await api.post('/admin/tenants/revoke', { name: 'multi', version: 1 });
    expect(rev.status).toBe(200);
    expect((await closeWithin(s1, t0, 1_000))?.code).toBe(4401);
    expect(await answer(s2, 'record.status', { userId: 'nobody' })).toBe('ok');
    expect(await closeWithin(s2, t0, 200)).toBeUndefined();
    expect(rev.body).toMatchObject({ name: 'multi', revoked: 1, connectionsClosed: 1 });
    // New connections: the revoked version is refused at the upgrade, the other accepted.
    await expect(RawSocket.open(d.url, v1.token)).rejects.toThrow(/401/);
    const again = await RawSocket.open(d.url, v2.token);
    expect(await answer(again, 'health', {})).toBe('ok');
    // A version that is not active is NOT_FOUND, a malformed one BAD_REQUEST; nothing is touched.
    expect((await api.post('/admin/tenants/revoke', { name: 'multi', version: 1 })).status).toBe(404);
    expect((await api.post('/admin/tenants/revoke', { name: 'multi', version: 0 })).status).toBe(400);
    expect(await answer(again, 'health', {})).toBe('ok');
    // The same through bkv-admin, the operator's path: version 2 goes too.
    const t1 = performance.now();
    const r = await bkvAdmin(['tenant', 'revoke', 'multi', '--version', '2']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('tenant "multi": 1 credential version(s) revoked, 2 open connection(s) closed');
    for (const s of [s2, again]) expect((await closeWithin(s, t1, 5_000))?.code).toBe(4401);
    expect((await bkvAdmin(['tenant', 'revoke', 'multi', '--version', '2'])).code).toBe(5);
  });
});
